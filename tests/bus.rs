//! The bus against raw protocol clients: registration, names, routing, replies, fds, limits and
//! bad input. Each test starts its own `broker`.

mod common;

use std::io::Write;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{Broker, RawClient, error_name, member_of};
use zbus::Message;
use zbus::message::{Flags, Type};

fn call_to(dest: &str, member: &str, serial: NonZeroU32) -> zbus::message::Builder<'static> {
    Message::method_call("/org/example", member.to_owned())
        .interface("org.example.Test")
        .destination(dest.to_owned())
        .serial(serial)
}

#[test]
fn hello_comes_first_then_name_owner_changed_then_name_acquired() {
    let broker = Broker::start();
    let mut watcher = RawClient::connect(&broker.socket);
    watcher
        .driver_call("AddMatch", &("type='signal',member='NameOwnerChanged'",))
        .unwrap();

    let mut client = RawClient::connect_unregistered(&broker.socket);
    let serial = client.next_serial();
    let hello = Message::method_call("/org/freedesktop/DBus", "Hello")
        .interface("org.freedesktop.DBus")
        .destination("org.freedesktop.DBus")
        .serial(serial)
        .build(&())
        .unwrap();
    client.send(&hello);
    let reply = client.recv();
    assert_eq!(reply.header().reply_serial(), Some(serial));
    let unique: String = reply.body().deserialize().unwrap();
    let acquired = client.recv();
    assert_eq!(member_of(&acquired), "NameAcquired");
    assert_eq!(acquired.body().deserialize::<String>().unwrap(), unique);

    let changed = watcher.recv_until(|m| member_of(m) == "NameOwnerChanged");
    let (name, old, new): (String, String, String) = changed.body().deserialize().unwrap();
    assert_eq!(
        (name.as_str(), old.as_str(), new.as_str()),
        (unique.as_str(), "", unique.as_str())
    );
    assert_eq!(
        changed.header().sender().unwrap().as_str(),
        "org.freedesktop.DBus"
    );
}

/// The bus builds `NameOwnerChanged` only when some rule could take it; rules keyed by the
/// interface alone and rules with neither interface nor member must still count.
#[test]
fn owner_changes_reach_rules_by_interface_and_catch_all_rules() {
    let broker = Broker::start();
    let mut by_interface = RawClient::connect(&broker.socket);
    by_interface
        .driver_call("AddMatch", &("interface='org.freedesktop.DBus'",))
        .unwrap();
    let mut catch_all = RawClient::connect(&broker.socket);
    catch_all
        .driver_call("AddMatch", &("type='signal'",))
        .unwrap();
    let passer = RawClient::connect(&broker.socket);
    let unique = passer.unique.clone();
    drop(passer);
    for watcher in [&mut by_interface, &mut catch_all] {
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let changed = watcher.recv_until(|m| member_of(m) == "NameOwnerChanged");
            let (name, old, new): (String, String, String) = changed.body().deserialize().unwrap();
            if name == unique {
                seen.push((old, new));
            }
        }
        assert_eq!(
            seen,
            [
                (String::new(), unique.clone()),
                (unique.clone(), String::new())
            ]
        );
    }
}

#[test]
fn unique_names_count_up_and_hello_is_answered_once() {
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    let b = RawClient::connect(&broker.socket);
    let n = |s: &str| s.trim_start_matches(":1.").parse::<u64>().unwrap();
    assert!(
        n(&b.unique) > n(&a.unique),
        "{} then {}",
        a.unique,
        b.unique
    );
    let again = a.driver_call("Hello", &()).unwrap_err();
    assert_eq!(error_name(&again), "org.freedesktop.DBus.Error.Failed");
}

#[test]
fn a_message_before_hello_disconnects() {
    let broker = Broker::start();
    let mut client = RawClient::connect_unregistered(&broker.socket);
    let serial = client.next_serial();
    client.send(
        &Message::method_call("/org/freedesktop/DBus", "ListNames")
            .interface("org.freedesktop.DBus")
            .destination("org.freedesktop.DBus")
            .serial(serial)
            .build(&())
            .unwrap(),
    );
    assert!(client.closed_by_broker());
    broker.wait_for_log("the first message was not Hello");
}

#[test]
fn request_name_queues_and_hands_over() {
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    let mut b = RawClient::connect(&broker.socket);
    let name = "org.example.Queue";
    let request = |c: &mut RawClient, flags: u32| -> u32 {
        c.driver_call("RequestName", &(name, flags))
            .unwrap()
            .body()
            .deserialize()
            .unwrap()
    };
    assert_eq!(request(&mut a, 0), 1, "primary owner");
    assert_eq!(request(&mut a, 0), 4, "already owner");
    assert_eq!(request(&mut b, 0x4), 3, "exists with DO_NOT_QUEUE");
    assert_eq!(request(&mut b, 0), 2, "in queue");
    let owners: Vec<String> = a
        .driver_call("ListQueuedOwners", &(name,))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    assert_eq!(owners, vec![a.unique.clone(), b.unique.clone()]);

    // Replacement needs ALLOW_REPLACEMENT from the owner.
    assert_eq!(request(&mut b, 0x2), 2);
    assert_eq!(request(&mut a, 0x1), 4);
    assert_eq!(request(&mut b, 0x2), 1, "replaced the owner");
    let lost = a.recv_until(|m| member_of(m) == "NameLost");
    assert_eq!(lost.body().deserialize::<String>().unwrap(), name);
    let owners: Vec<String> = a
        .driver_call("ListQueuedOwners", &(name,))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    assert_eq!(
        owners,
        vec![b.unique.clone(), a.unique.clone()],
        "the replaced owner queues behind"
    );

    // Releasing hands the name to the next in line.
    let released: u32 = b
        .driver_call("ReleaseName", &(name,))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    assert_eq!(released, 1);
    let acquired = a.recv_until(|m| member_of(m) == "NameAcquired");
    assert_eq!(acquired.body().deserialize::<String>().unwrap(), name);
    let owner: String = b
        .driver_call("GetNameOwner", &(name,))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    assert_eq!(owner, a.unique);
    let not_owner: u32 = b
        .driver_call("ReleaseName", &(name,))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    assert_eq!(not_owner, 3);
    let missing: u32 = b
        .driver_call("ReleaseName", &("org.example.Nobody",))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    assert_eq!(missing, 2);
}

#[test]
fn names_that_cannot_be_owned_are_refused() {
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    for bad in [
        ":1.99",
        "org.freedesktop.DBus",
        "no-dots",
        "org..example",
        "",
    ] {
        let err = a.driver_call("RequestName", &(bad, 0u32)).unwrap_err();
        assert_eq!(
            error_name(&err),
            "org.freedesktop.DBus.Error.InvalidArgs",
            "{bad}"
        );
    }
}

#[test]
fn names_of_a_peer_that_leaves_pass_on() {
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    let mut b = RawClient::connect(&broker.socket);
    a.driver_call("RequestName", &("org.example.Pass", 0u32))
        .unwrap();
    b.driver_call("RequestName", &("org.example.Pass", 0u32))
        .unwrap();
    b.driver_call("AddMatch", &("member='NameOwnerChanged'",))
        .unwrap();
    let a_unique = a.unique.clone();
    drop(a);
    let acquired = b.recv_until(|m| member_of(m) == "NameAcquired");
    assert_eq!(
        acquired.body().deserialize::<String>().unwrap(),
        "org.example.Pass"
    );
    let gone = b.recv_until(|m| {
        member_of(m) == "NameOwnerChanged"
            && m.body()
                .deserialize::<(String, String, String)>()
                .unwrap()
                .0
                == a_unique
    });
    let (_, old, new): (String, String, String) = gone.body().deserialize().unwrap();
    assert_eq!((old.as_str(), new.as_str()), (a_unique.as_str(), ""));
}

#[test]
fn unknown_destinations_get_an_error_at_once() {
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    let serial = a.next_serial();
    a.send(
        &call_to("org.example.Missing", "Do", serial)
            .build(&())
            .unwrap(),
    );
    let err = a.reply_to(serial).unwrap_err();
    assert_eq!(
        error_name(&err),
        "org.freedesktop.DBus.Error.ServiceUnknown"
    );

    let serial = a.next_serial();
    a.send(
        &call_to("org.example.Missing", "Do", serial)
            .with_flags(Flags::NO_AUTO_START)
            .build(&())
            .unwrap(),
    );
    let err = a.reply_to(serial).unwrap_err();
    assert_eq!(
        error_name(&err),
        "org.freedesktop.DBus.Error.NameHasNoOwner"
    );

    let serial = a.next_serial();
    a.send(&call_to(":1.9999", "Do", serial).build(&()).unwrap());
    assert!(a.reply_to(serial).is_err());
}

#[test]
fn the_bus_stamps_the_sender_over_a_forged_one() {
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    let mut b = RawClient::connect(&broker.socket);
    let serial = a.next_serial();
    let forged = Message::signal("/org/example", "org.example.Test", "Forged")
        .sender(":1.4242")
        .destination(b.unique.clone())
        .serial(serial)
        .build(&("payload",))
        .unwrap();
    a.send(&forged);
    let got = b.recv_until(|m| member_of(m) == "Forged");
    assert_eq!(got.header().sender().unwrap().as_str(), a.unique);
    assert_eq!(got.body().deserialize::<String>().unwrap(), "payload");
    assert_eq!(
        got.primary_header().serial_num(),
        serial,
        "the serial is kept"
    );
}

#[test]
fn calls_and_replies_route_and_unsolicited_replies_are_dropped() {
    let broker = Broker::start();
    let mut caller = RawClient::connect(&broker.socket);
    let mut callee = RawClient::connect(&broker.socket);
    callee
        .driver_call("RequestName", &("org.example.Callee", 0u32))
        .unwrap();

    // A reply nobody asked for never arrives.
    let bogus = Message::method_return(
        &call_to(&caller.unique, "X", NonZeroU32::new(77).unwrap())
            .sender(caller.unique.clone())
            .build(&())
            .unwrap()
            .header(),
    )
    .destination(caller.unique.clone())
    .build(&("bogus",))
    .unwrap();
    callee.send(&bogus);

    let serial = caller.next_serial();
    caller.send(
        &call_to("org.example.Callee", "Echo", serial)
            .build(&("hi",))
            .unwrap(),
    );
    let call = callee.recv_until(|m| member_of(m) == "Echo");
    assert_eq!(call.header().sender().unwrap().as_str(), caller.unique);
    let reply = Message::method_return(&call.header())
        .build(&("hi back",))
        .unwrap();
    callee.send(&reply);
    // A second reply to the same call is not expected any more.
    callee.send(&reply);
    let first = caller.recv();
    assert_eq!(
        first.header().reply_serial(),
        Some(serial),
        "the bogus reply was not delivered first"
    );
    assert_eq!(first.body().deserialize::<String>().unwrap(), "hi back");

    let ping_serial = caller.next_serial();
    caller.send(
        &Message::method_call("/org/freedesktop/DBus", "Ping")
            .interface("org.freedesktop.DBus.Peer")
            .destination("org.freedesktop.DBus")
            .serial(ping_serial)
            .build(&())
            .unwrap(),
    );
    let next = caller.recv();
    assert_eq!(
        next.header().reply_serial(),
        Some(ping_serial),
        "the duplicate reply was dropped"
    );
}

#[test]
fn callers_get_no_reply_when_the_callee_disconnects() {
    let broker = Broker::start();
    let mut caller = RawClient::connect(&broker.socket);
    let mut callee = RawClient::connect(&broker.socket);
    let serials: Vec<_> = (0..3).map(|_| caller.next_serial()).collect();
    for &s in &serials {
        caller.send(&call_to(&callee.unique, "Slow", s).build(&()).unwrap());
    }
    for _ in 0..3 {
        callee.recv_until(|m| member_of(m) == "Slow");
    }
    drop(callee);
    for &s in &serials {
        let err = caller.reply_to(s).unwrap_err();
        assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.NoReply");
    }
}

#[test]
fn messages_from_one_sender_arrive_in_order() {
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    let mut b = RawClient::connect(&broker.socket);
    for i in 0..500u32 {
        let s = a.next_serial();
        a.send(
            &Message::signal("/o", "org.example.Test", "Seq")
                .destination(b.unique.clone())
                .serial(s)
                .build(&(i,))
                .unwrap(),
        );
    }
    for i in 0..500u32 {
        let m = b.recv_until(|m| member_of(m) == "Seq");
        assert_eq!(m.body().deserialize::<u32>().unwrap(), i);
    }
}

#[test]
fn broadcast_signals_reach_only_matching_rules() {
    let broker = Broker::start();
    let mut emitter = RawClient::connect(&broker.socket);
    let mut yes = RawClient::connect(&broker.socket);
    let mut no = RawClient::connect(&broker.socket);
    yes.driver_call(
        "AddMatch",
        &("type='signal',interface='org.example.Test',member='Tick'",),
    )
    .unwrap();
    no.driver_call("AddMatch", &("type='signal',member='Tock'",))
        .unwrap();
    let s = emitter.next_serial();
    emitter.send(
        &Message::signal("/o", "org.example.Test", "Tick")
            .serial(s)
            .build(&())
            .unwrap(),
    );
    let s = emitter.next_serial();
    emitter.send(
        &Message::signal("/o", "org.example.Test", "Tock")
            .serial(s)
            .build(&())
            .unwrap(),
    );
    assert_eq!(
        member_of(
            &yes.recv_until(|m| m.message_type() == Type::Signal && member_of(m) != "NameAcquired")
        ),
        "Tick"
    );
    assert_eq!(
        member_of(
            &no.recv_until(|m| m.message_type() == Type::Signal && member_of(m) != "NameAcquired")
        ),
        "Tock"
    );

    let err = yes.driver_call("AddMatch", &("type='bogus'",)).unwrap_err();
    assert_eq!(
        error_name(&err),
        "org.freedesktop.DBus.Error.MatchRuleInvalid"
    );
    let err = yes
        .driver_call("RemoveMatch", &("member='Never'",))
        .unwrap_err();
    assert_eq!(
        error_name(&err),
        "org.freedesktop.DBus.Error.MatchRuleNotFound"
    );
    yes.driver_call(
        "RemoveMatch",
        &("type='signal',interface='org.example.Test',member='Tick'",),
    )
    .unwrap();
}

#[test]
fn file_descriptors_pass_to_peers_that_take_them() {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    let mut b = RawClient::connect(&broker.socket);
    let file = tempfile::tempfile().unwrap();
    let serial = a.next_serial();
    let msg = Message::signal("/o", "org.example.Test", "Fd")
        .destination(b.unique.clone())
        .serial(serial)
        .build(&(zbus::Fd::from(&file),))
        .unwrap();
    let fds = [file.as_raw_fd()];
    let iov = [std::io::IoSlice::new(msg.data().bytes())];
    sendmsg::<()>(
        a.stream.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let got = b.recv_until(|m| member_of(m) == "Fd");
    assert_eq!(got.header().unix_fds(), Some(1));
    let received = &got.data().fds()[0];
    let same = |fd: std::os::fd::BorrowedFd<'_>| {
        nix::sys::stat::fstat(fd)
            .map(|st| (st.st_dev, st.st_ino))
            .unwrap()
    };
    use std::os::fd::AsFd;
    assert_eq!(
        same(received.as_fd()),
        same(file.as_fd()),
        "the same open file arrived"
    );

    // A peer that did not negotiate fds: the sender gets an error.
    let plain = RawClient::register(RawClient::authenticate(&broker.socket, false));
    let unique = plain.unique.clone();
    let serial = a.next_serial();
    let call = call_to(&unique, "TakeFd", serial)
        .build(&(zbus::Fd::from(&file),))
        .unwrap();
    let iov = [std::io::IoSlice::new(call.data().bytes())];
    sendmsg::<()>(
        a.stream.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let err = a.reply_to(serial).unwrap_err();
    assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.NotSupported");
}

#[test]
fn messages_with_fds_sent_back_to_back_all_arrive() {
    // The kernel ends a read after bytes that carried fds: such a short read does not mean the
    // socket is drained, and the rest must still be read.
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    let mut b = RawClient::connect(&broker.socket);
    let file = tempfile::tempfile().unwrap();
    let mut bytes = Vec::new();
    let mut serials = Vec::new();
    for _ in 0..3 {
        let serial = a.next_serial();
        let msg = Message::signal("/o", "org.example.Test", "Fd")
            .destination(b.unique.clone())
            .serial(serial)
            .build(&(zbus::Fd::from(&file),))
            .unwrap();
        bytes.push(msg.data().bytes().to_vec());
        serials.push(serial);
    }
    for message in &bytes {
        a.send_with_fds(message, &[file.as_raw_fd()]);
    }
    for serial in serials {
        let got = b.recv_until(|m| member_of(m) == "Fd");
        assert_eq!(got.primary_header().serial_num(), serial);
        assert_eq!(got.data().fds().len(), 1);
    }
}

#[test]
fn a_receiver_that_reads_late_gets_everything_in_order() {
    // 4 MiB cannot sit in the sockets: the bus must wait until the receiver reads, then go on.
    let broker = Broker::start();
    let mut sender = RawClient::connect(&broker.socket);
    let mut late = RawClient::connect(&broker.socket);
    let payload = vec![7u8; 1 << 19];
    let mut serials = Vec::new();
    for _ in 0..8 {
        let serial = sender.next_serial();
        let signal = Message::signal("/o", "org.example.Test", "Chunk")
            .destination(late.unique.clone())
            .serial(serial)
            .build(&(payload.as_slice(),))
            .unwrap();
        sender.send(&signal);
        serials.push(serial);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    for serial in serials {
        let got = late.recv_until(|m| member_of(m) == "Chunk");
        assert_eq!(got.primary_header().serial_num(), serial);
        assert_eq!(got.body().deserialize::<Vec<u8>>().unwrap().len(), 1 << 19);
    }
}

#[test]
fn a_receiver_that_never_reads_costs_only_itself() {
    let broker = Broker::start();
    let mut sender = RawClient::connect(&broker.socket);
    let stuck = RawClient::connect(&broker.socket);
    let mut bystander = RawClient::connect(&broker.socket);
    let payload = vec![0u8; 1 << 20];
    let mut refused = None;
    // 64 MiB fills the stuck receiver's queue; the socket buffers take a little more.
    for _ in 0..100 {
        let serial = sender.next_serial();
        sender.send(
            &call_to(&stuck.unique, "Take", serial)
                .with_flags(Flags::NO_REPLY_EXPECTED)
                .build(&(payload.as_slice(),))
                .unwrap(),
        );
        // The bystander is served promptly all along.
        let started = Instant::now();
        bystander.driver_call("GetId", &()).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    let serial = sender.next_serial();
    sender.send(
        &call_to(&stuck.unique, "Take", serial)
            .build(&(payload.as_slice(),))
            .unwrap(),
    );
    if let Err(err) = sender.reply_to(serial) {
        refused = Some(error_name(&err));
    }
    assert_eq!(
        refused.as_deref(),
        Some("org.freedesktop.DBus.Error.LimitsExceeded")
    );
    broker.wait_for_log("outgoing queue full");
}

#[test]
fn garbage_after_the_handshake_disconnects_only_its_sender() {
    let broker = Broker::start();
    let mut good = RawClient::connect(&broker.socket);
    let mut bad = RawClient::connect(&broker.socket);
    bad.stream
        .write_all(&[
            b'l', 1, 0, 1, 0xff, 0xff, 0xff, 0x7f, 1, 0, 0, 0, 0, 0, 0, 0,
        ])
        .unwrap();
    assert!(bad.closed_by_broker());
    let log = broker.wait_for_log("invalid message");
    assert!(log.contains(&bad.unique), "the log names the peer:\n{log}");
    good.driver_call("GetId", &()).unwrap();

    // A header that lies about its body is caught by validation.
    let mut liar = RawClient::connect(&broker.socket);
    let serial = liar.next_serial();
    let mut bytes = call_to(&good.unique, "Lie", serial)
        .build(&("text",))
        .unwrap()
        .data()
        .bytes()
        .to_vec();
    let len = bytes.len();
    bytes[len - 8..len - 4].copy_from_slice(&100u32.to_le_bytes());
    liar.stream.write_all(&bytes).unwrap();
    assert!(liar.closed_by_broker());
    good.driver_call("GetId", &()).unwrap();
}

#[test]
fn garbage_during_the_handshake_is_refused_and_harmless() {
    use std::io::Read;
    let broker = Broker::start();
    for garbage in [
        &b"\0HELLO THERE\r\n"[..],
        b"\0AUTH EXTERNAL zz\r\n",
        b"no nul byte\r\n",
        &[0xffu8; 64][..],
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&broker.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(garbage).unwrap();
        let mut reply = [0u8; 256];
        let n = s.read(&mut reply).unwrap_or(0);
        let text = String::from_utf8_lossy(&reply[..n]);
        assert!(
            n == 0 || text.starts_with("ERROR") || text.starts_with("REJECTED"),
            "{garbage:?} got {text:?}"
        );
    }
    // An over-long line is cut off.
    let mut s = std::os::unix::net::UnixStream::connect(&broker.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&[b'A'; 100_000]);
    let mut buf = [0u8; 64];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "the bus kept an over-long line"
    );
    let mut client = RawClient::connect(&broker.socket);
    client.driver_call("GetId", &()).unwrap();
}

#[test]
fn sigterm_stops_the_bus_and_removes_its_socket() {
    let mut broker = Broker::start();
    assert!(broker.socket.exists());
    let status = broker.stop();
    assert!(status.success(), "exit status {status:?}");
    assert!(!broker.socket.exists(), "the socket file was left behind");
    assert!(broker.log().contains("shutting down"));
}

#[test]
fn a_second_bus_on_a_live_socket_is_refused() {
    let broker = Broker::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "--session",
            &format!("--address=unix:path={}", broker.socket.display()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a bus already listens"), "{stderr}");
    // The first bus is untouched.
    RawClient::connect(&broker.socket)
        .driver_call("GetId", &())
        .unwrap();
}

#[test]
fn print_address_and_pid_go_to_the_given_fds_in_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bus");
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "exec {} --session --address=unix:path={} --print-address=3 --print-pid=4 3>{}/addr 4>{}/pid",
            env!("CARGO_BIN_EXE_broker"),
            socket.display(),
            dir.path().display(),
            dir.path().display()
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    while !(read("addr").ends_with('\n') && read("pid").ends_with('\n')) {
        assert!(Instant::now() < deadline, "nothing printed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let address = read("addr");
    assert!(
        address.starts_with(&format!("unix:path={},guid=", socket.display())),
        "{address}"
    );
    assert_eq!(address.lines().count(), 1);
    assert_eq!(read("pid").trim(), child.id().to_string());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    child.wait().unwrap();
}

#[test]
fn without_an_address_the_session_bus_listens_in_the_runtime_dir() {
    use std::io::BufRead;
    let runtime = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--session", "--print-address"])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let socket = runtime.path().join("bus");
    assert!(
        line.starts_with(&format!("unix:path={},guid=", socket.display())),
        "{line}"
    );
    RawClient::connect(&socket)
        .driver_call("GetId", &())
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    child.wait().unwrap();
    assert!(!socket.exists());
}

const POLICY_CONFIG: &str = r#"<busconfig>
  <type>session</type>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <deny send_interface="org.example.Forbidden"/>
    <deny own="org.example.NotYours"/>
  </policy>
</busconfig>
"#;

#[test]
fn a_configured_policy_refuses_what_it_denies_and_passes_the_rest() {
    let broker = Broker::start_with_config(POLICY_CONFIG);
    let mut owner = RawClient::connect(&broker.socket);
    let mut caller = RawClient::connect(&broker.socket);
    owner
        .driver_call("RequestName", &("org.example.Target", 0u32))
        .unwrap();

    let err = caller
        .driver_call("RequestName", &("org.example.NotYours", 0u32))
        .unwrap_err();
    assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.AccessDenied");

    let denied = caller.next_serial();
    caller.send(
        &Message::method_call("/o", "Do")
            .interface("org.example.Forbidden")
            .destination("org.example.Target")
            .serial(denied)
            .build(&())
            .unwrap(),
    );
    let err = caller.reply_to(denied).unwrap_err();
    assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.AccessDenied");

    let allowed = caller.next_serial();
    caller.send(
        &call_to("org.example.Target", "Do", allowed)
            .build(&())
            .unwrap(),
    );
    let call = owner.recv_until(|m| member_of(m) == "Do");
    assert_eq!(
        call.header().interface().unwrap().as_str(),
        "org.example.Test"
    );
    assert_eq!(
        call.primary_header().serial_num(),
        allowed,
        "only the allowed call arrived"
    );
}

#[test]
fn debug_stats_counts_connections_names_and_rules() {
    use std::collections::HashMap;
    let broker = Broker::start();
    let mut a = RawClient::connect(&broker.socket);
    a.driver_call("RequestName", &("org.example.Stats", 0u32))
        .unwrap();
    a.driver_call("AddMatch", &("type='signal',member='It''s'",))
        .unwrap();
    let mut stats_call = |member: &str, body: Option<&str>| {
        let serial = a.next_serial();
        let builder = Message::method_call("/org/freedesktop/DBus", member.to_owned())
            .interface("org.freedesktop.DBus.Debug.Stats")
            .destination("org.freedesktop.DBus")
            .serial(serial);
        let call = match body {
            Some(name) => builder.build(&(name,)),
            None => builder.build(&()),
        };
        a.send(&call.unwrap());
        a.reply_to(serial).unwrap()
    };
    let stats: HashMap<String, zbus::OwnedVariant> =
        stats_call("GetStats", None).body().deserialize().unwrap();
    assert_eq!(u32::try_from(&*stats["BusNames"]).unwrap(), 1);
    assert_eq!(u32::try_from(&*stats["MatchRules"]).unwrap(), 1);
    let mine: HashMap<String, zbus::OwnedVariant> =
        stats_call("GetConnectionStats", Some("org.example.Stats"))
            .body()
            .deserialize()
            .unwrap();
    assert_eq!(u32::try_from(&*mine["MatchRules"]).unwrap(), 1);
    let rules: HashMap<String, Vec<String>> = stats_call("GetAllMatchRules", None)
        .body()
        .deserialize()
        .unwrap();
    let unique = rules.keys().find(|k| rules[*k].len() == 1).unwrap().clone();
    assert_eq!(
        rules[&unique],
        vec!["type='signal',member='Its'".to_string()]
    );
}

/// A call to `dest` whose body is `body` as given, of signature `sig`, with `fds` declared.
fn raw_body_call(
    dest: &str,
    member: &str,
    serial: NonZeroU32,
    (sig, body): (&str, &[u8]),
    fds: Vec<std::os::fd::OwnedFd>,
) -> Message {
    // SAFETY: a test message; its body is checked by the bus under test.
    unsafe {
        call_to(dest, member, serial).build_raw_body(
            body,
            sig,
            fds.into_iter().map(Into::into).collect(),
        )
    }
    .expect("build a raw call")
}

#[test]
fn a_fd_handle_past_the_fds_sent_is_delivered_and_the_sender_stays() {
    // dbus-daemon and dbus-broker pass such a message on and let the receiver refuse it;
    // dbus-python's tests count on it.
    let broker = Broker::start();
    let mut sender = RawClient::connect(&broker.socket);
    let mut receiver = RawClient::connect(&broker.socket);
    let to = receiver.unique.clone();

    // Handle 3, no fds at all.
    let body = 3u32.to_le_bytes();
    let call = raw_body_call(&to, "NoFds", sender.next_serial(), ("h", &body), Vec::new());
    sender.send(&call);
    let got = receiver.recv_until(|m| member_of(m) == "NoFds");
    assert_eq!(got.body().signature().to_string(), "h");
    assert_eq!(got.body().data().bytes(), body);
    assert!(got.data().fds().is_empty());

    // Handle 1 with one fd, and handle 3 inside a variant.
    let file = tempfile::tempfile().unwrap();
    let body = 1u32.to_le_bytes();
    let one = vec![file.try_clone().unwrap().into()];
    let call = raw_body_call(&to, "OneFd", sender.next_serial(), ("h", &body), one);
    sender.send_with_fds(call.data().bytes(), &[file.as_raw_fd()]);
    let got = receiver.recv_until(|m| member_of(m) == "OneFd");
    assert_eq!(got.header().unix_fds(), Some(1));
    assert_eq!(got.data().fds().len(), 1);
    assert_eq!(got.body().data().bytes(), body);
    let variant = [1, b'h', 0, 0, 3, 0, 0, 0];
    let call = raw_body_call(
        &to,
        "InVariant",
        sender.next_serial(),
        ("v", &variant),
        Vec::new(),
    );
    sender.send(&call);
    let got = receiver.recv_until(|m| member_of(m) == "InVariant");
    assert_eq!(got.body().data().bytes(), variant);

    sender
        .driver_call("GetId", &())
        .expect("the sender is still connected");
    assert!(
        !broker.log().contains("invalid message"),
        "{}",
        broker.log()
    );
}

#[test]
fn a_fd_handle_past_the_fds_does_not_excuse_another_fault_in_the_body() {
    let broker = Broker::start();
    let mut sender = RawClient::connect(&broker.socket);
    let mut receiver = RawClient::connect(&broker.socket);
    // A boolean of 2 after the handle.
    let body = [3u32.to_le_bytes(), 2u32.to_le_bytes()].concat();
    let call = raw_body_call(
        &receiver.unique,
        "Bad",
        sender.next_serial(),
        ("hb", &body),
        Vec::new(),
    );
    sender.send(&call);
    assert!(sender.closed_by_broker());
    broker.wait_for_log("bad body");
    receiver
        .driver_call("GetId", &())
        .expect("the receiver is unharmed");
}

#[test]
fn a_header_field_array_over_the_maximum_disconnects_at_once() {
    let broker = Broker::start();
    let mut good = RawClient::connect(&broker.socket);
    let mut bad = RawClient::connect(&broker.socket);
    // The fixed header of a call whose header-field array claims 2^26 + 8 bytes, one more
    // 8-byte field than the specification's 64 MiB allows, and nothing after it: the bus must
    // not wait for the rest.
    let mut head = vec![b'l', 1, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0];
    head.extend_from_slice(&((1u32 << 26) + 8).to_le_bytes());
    bad.stream.write_all(&head).unwrap();
    // `closed_by_broker` waits 5 s at most; the bus's read of 16 bytes is all it needs.
    assert!(
        bad.closed_by_broker(),
        "the bus kept a connection whose header can never be valid"
    );
    let log = broker.wait_for_log("header field array");
    assert!(log.contains(&bad.unique), "the log names the peer:\n{log}");
    good.driver_call("GetId", &()).unwrap();
    let mut late = RawClient::connect(&broker.socket);
    late.driver_call("GetId", &()).unwrap();
}
