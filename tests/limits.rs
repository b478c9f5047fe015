//! The limits of dbus-daemon's configuration that bound what one client can make the bus hold:
//! its messages held for a starting service (`max_incoming_bytes`), fds queued for a receiver
//! that does not read (`max_outgoing_unix_fds`), fds sent with a message that never completes
//! (`pending_fd_timeout`), and limits changed by `ReloadConfig`.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use common::{Broker, RawClient, error_name, member_of, open_config};
use zbus::Message;

/// A method call to `destination` carrying `payload`.
fn call_with_payload(
    client: &mut RawClient,
    destination: &str,
    payload: &[u8],
) -> (std::num::NonZeroU32, Message) {
    let serial = client.next_serial();
    let call = Message::method_call("/org/example", "Take")
        .interface("org.example.Test")
        .destination(destination)
        .serial(serial)
        .build(&(payload,))
        .unwrap();
    (serial, call)
}

/// Whether something arrives on `client`'s socket within `wait`.
fn readable_within(client: &RawClient, wait: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(client.stream.as_fd(), PollFlags::POLLIN)];
    let millis = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    poll(&mut fds, PollTimeout::from(millis)).expect("poll") > 0
}

/// Turns `client` into a monitor of everything.
fn become_monitor(client: &mut RawClient) {
    let serial = client.next_serial();
    let call = Message::method_call("/org/freedesktop/DBus", "BecomeMonitor")
        .interface("org.freedesktop.DBus.Monitoring")
        .destination("org.freedesktop.DBus")
        .serial(serial)
        .build(&(Vec::<String>::new(), 0u32))
        .unwrap();
    client.send(&call);
    client.reply_to(serial).expect("BecomeMonitor");
}

#[test]
fn a_sender_whose_held_messages_reach_max_incoming_bytes_is_not_read_until_they_are_delivered() {
    let services = tempfile::tempdir().unwrap();
    std::fs::write(
        services.path().join("org.example.Held.service"),
        "[D-BUS Service]\nName=org.example.Held\nExec=/bin/false\nSystemdService=held.service\n",
    )
    .unwrap();
    let extra = format!(
        r#"<servicedir>{}</servicedir>
  <limit name="max_incoming_bytes">2000</limit>"#,
        services.path().display()
    );
    let broker =
        Broker::start_with_config_files(&open_config(&extra), &[], &["--systemd-activation"]);
    // A stand-in for systemd: it is asked to start the service, and it is what takes the name.
    let mut systemd = RawClient::connect(&broker.socket);
    systemd
        .driver_call("RequestName", &("org.freedesktop.systemd1", 0u32))
        .unwrap();
    let mut monitor = RawClient::connect(&broker.socket);
    become_monitor(&mut monitor);
    let mut sender = RawClient::connect(&broker.socket);

    // Two calls of 1,500 bytes: held together they pass the 2,000-byte limit.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (serial, call) = call_with_payload(&mut sender, "org.example.Held", &[7u8; 1500]);
        sender.send(&call);
        held.push(serial);
    }
    systemd.recv_until(|m| member_of(m) == "ActivationRequest");
    for serial in &held {
        monitor
            .recv_until(|m| member_of(m) == "Take" && m.primary_header().serial_num() == *serial);
    }

    // The bus has both: it reads nothing more from this sender, not even a call to itself.
    let serial = sender.next_serial();
    let get_id = Message::method_call("/org/freedesktop/DBus", "GetId")
        .interface("org.freedesktop.DBus")
        .destination("org.freedesktop.DBus")
        .serial(serial)
        .build(&())
        .unwrap();
    sender.send(&get_id);
    assert!(
        !readable_within(&sender, Duration::from_millis(500)),
        "the bus answered a sender that was over max_incoming_bytes"
    );

    // The service takes its name: the held calls go to it (before the reply to RequestName),
    // and the sender is read again.
    let (_, before) = systemd.driver_call_keeping("RequestName", &("org.example.Held", 0u32));
    let delivered: Vec<_> = before
        .iter()
        .filter(|m| member_of(m) == "Take")
        .map(|m| m.primary_header().serial_num())
        .collect();
    assert_eq!(delivered, held);
    sender
        .reply_to(serial)
        .expect("GetId answered once the held calls were delivered");
}

#[test]
fn fds_queued_for_a_receiver_that_does_not_read_stop_at_max_outgoing_unix_fds() {
    let broker = Broker::start_with_config(&open_config(
        r#"<limit name="max_outgoing_unix_fds">2</limit>"#,
    ));
    let mut sender = RawClient::connect(&broker.socket);
    let stuck = RawClient::connect(&broker.socket);
    // 1 MiB fills the socket to the receiver; what follows waits in the bus.
    for _ in 0..4 {
        let (_, call) = call_with_payload(&mut sender, &stuck.unique, &vec![0u8; 256 << 10]);
        sender.send(&call);
    }
    let file = tempfile::tempfile().unwrap();
    let fd: RawFd = file.as_raw_fd();
    let mut serials = Vec::new();
    for _ in 0..3 {
        let serial = sender.next_serial();
        let call = Message::method_call("/org/example", "TakeFd")
            .interface("org.example.Test")
            .destination(stuck.unique.as_str())
            .serial(serial)
            .build(&(zbus::Fd::from(&file),))
            .unwrap();
        sender.send_with_fds(call.data().bytes(), &[fd]);
        serials.push(serial);
    }
    let refused = sender
        .reply_to(serials[2])
        .expect_err("the third fd is one past the limit");
    assert_eq!(
        error_name(&refused),
        "org.freedesktop.DBus.Error.LimitsExceeded"
    );
    // The first two were queued, not refused: no other reply is waiting.
    assert!(!readable_within(&sender, Duration::from_millis(200)));
}

#[test]
fn a_message_left_half_sent_with_fds_is_disconnected_after_pending_fd_timeout() {
    let broker = Broker::start_with_config(&open_config(
        r#"<limit name="pending_fd_timeout">500</limit>"#,
    ));
    let mut client = RawClient::connect(&broker.socket);
    // The start of a method call that declares 64 KiB of body and header fields, then nothing.
    let partial: [u8; 17] = [
        b'l', 1, 0, 1, 0xff, 0xff, 0, 0, 1, 2, 3, 4, 0xff, 0xff, 0, 0, 42,
    ];
    let file = tempfile::tempfile().unwrap();
    let started = Instant::now();
    client.send_with_fds(&partial, &[file.as_raw_fd()]);
    assert!(client.closed_by_broker(), "still connected after 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "closed after {:?}, before the 500 ms timeout",
        started.elapsed()
    );
    assert!(
        broker
            .log()
            .contains("Unix fds have been pending for too long")
    );

    // Without fds, the same half message is not cut off by this limit.
    let mut slow = RawClient::connect(&broker.socket);
    std::io::Write::write_all(&mut slow.stream, &partial).unwrap();
    assert!(
        !readable_within(&slow, Duration::from_millis(1000)),
        "a half-sent message without fds was cut off"
    );
}

#[test]
fn reload_config_puts_new_limits_in_force() {
    let broker = Broker::start_with_config(&open_config(
        r#"<limit name="max_message_size">1000000</limit>"#,
    ));
    let mut client = RawClient::connect(&broker.socket);
    let big_signal = |client: &mut RawClient| {
        let serial = client.next_serial();
        Message::signal("/org/example", "org.example.Test", "Big")
            .serial(serial)
            .build(&(vec![1u8; 200_000],))
            .unwrap()
    };
    let signal = big_signal(&mut client);
    client.send(&signal);
    client
        .driver_call("GetId", &())
        .expect("a 200 kB message is within 1 MB");

    std::fs::write(
        broker.dir.path().join("bus.conf"),
        open_config(r#"<limit name="max_message_size">100000</limit>"#),
    )
    .unwrap();
    client.driver_call("ReloadConfig", &()).expect("reload");
    let signal = big_signal(&mut client);
    client.send(&signal);
    assert!(
        client.closed_by_broker(),
        "a 200 kB message passed the reloaded 100 kB limit"
    );
}
