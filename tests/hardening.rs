//! A client that abuses the bus costs only itself: a flood of calls does not hold up the others,
//! and what a peak of its took comes back once it leaves.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use common::{Broker, RawClient, error_name, member_of};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use zbus::Message;

/// How many calls a flooding client pipelines.
const FLOOD: u32 = 100_000;

/// The bus's resident memory, in KiB, from `/proc/PID/status`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("broker status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A call to the driver with serial `serial`, as bytes.
fn driver_call<B>(serial: u32, member: &str, body: &B) -> Vec<u8>
where
    B: serde::Serialize + zbus::DynamicType,
{
    call(
        serial,
        "org.freedesktop.DBus",
        "org.freedesktop.DBus",
        member,
        body,
    )
}

/// A call to `destination` with serial `serial`, as bytes.
fn call<B>(serial: u32, destination: &str, interface: &str, member: &str, body: &B) -> Vec<u8>
where
    B: serde::Serialize + zbus::DynamicType,
{
    let msg = Message::method_call("/org/freedesktop/DBus", member)
        .interface(interface)
        .destination(destination)
        .serial(std::num::NonZeroU32::new(serial).expect("nonzero serial"))
        .build(body)
        .expect("build call");
    msg.data().bytes().to_vec()
}

/// `count` pipelined calls of `client` (serials from its next one on), built by `call` from
/// each serial and index.
fn flood_of(client: &mut RawClient, count: u32, call: impl Fn(u32, u32) -> Vec<u8>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for i in 0..count {
        let serial = client.next_serial().get();
        bytes.extend_from_slice(&call(serial, i));
    }
    bytes
}

/// Reads and drops whatever arrives on `stream` until the bus closes it or the test drops it.
fn drain(mut stream: std::os::unix::net::UnixStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = vec![0u8; 1 << 16];
        while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
    })
}

/// Waits until the kernel reports process `pid` stopped (after SIGSTOP).
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("broker stat");
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if state == Some("T") {
            return;
        }
        assert!(Instant::now() < deadline, "broker never stopped: {stat}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A race set up between a flooder and a bystander: the bus is stopped while the flooder
/// fills its socket and the bystander sends one call, so that both wait when the bus goes on.
/// The rest of the flood follows while the flooder reads its replies.
struct Race {
    /// Calls of the flooder's that were waiting with the bystander's.
    waiting: usize,
    sender: std::thread::JoinHandle<std::io::Result<()>>,
    reader: std::thread::JoinHandle<()>,
}

impl Race {
    /// `flood` is made of calls of one length each; `call` is the bystander's.
    fn run(
        broker: &Broker,
        flooder: &RawClient,
        flood: &[u8],
        bystander: &RawClient,
        call: &[u8],
    ) -> Race {
        let call_len = flood.len() / FLOOD as usize;
        let pid = Pid::from_raw(broker.pid() as i32);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP broker");
        wait_stopped(broker.pid());
        // As much of the flood as the socket takes while the bus is stopped.
        flooder.stream.set_nonblocking(true).expect("nonblocking");
        let mut written = 0;
        loop {
            match (&flooder.stream).write(&flood[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("flooder write: {e}"),
            }
        }
        (&bystander.stream)
            .write_all(call)
            .expect("bystander's call sent");
        kill(pid, Signal::SIGCONT).expect("SIGCONT broker");
        flooder.stream.set_nonblocking(false).expect("blocking");
        let reader = drain(flooder.stream.try_clone().expect("clone"));
        let mut writer = flooder.stream.try_clone().expect("clone");
        let rest = flood[written..].to_vec();
        Race {
            waiting: written / call_len,
            sender: std::thread::spawn(move || writer.write_all(&rest)),
            reader,
        }
    }

    /// Checks that the bus handled at most a bounded share of the waiting calls before the
    /// bystander's, then lets the flood end.
    fn check(self, what: &str, handled_first: usize) {
        let waiting = self.waiting;
        eprintln!(
            "{what}: the bystander's call came after {handled_first} of the flooder's {waiting} calls"
        );
        assert!(
            waiting >= 500,
            "{what}: the flooder's socket took only {waiting} calls: too few to tell"
        );
        assert!(
            handled_first <= 256 && handled_first < waiting / 4,
            "{what}: the bystander's call was handled after {handled_first} of the {waiting} \
             calls the flooder had sent before it"
        );
        self.sender
            .join()
            .expect("sender")
            .expect("the rest of the flood");
        drop(self.reader);
    }
}

/// While one client has 100k calls in flight, another's call is handled after a bounded share
/// of them, not after all that the flooder had sent. The bystander asks `ListNames`, and the
/// flooder's calls are `RequestName`, so the reply tells how many of the flooder's calls the
/// bus handled first.
#[test]
fn a_flooder_waits_its_turn_behind_a_bystander() {
    let broker = Broker::start();
    let mut flooder = RawClient::connect(&broker.socket);
    let mut bystander = RawClient::connect(&broker.socket);
    // The names have as many digits each, so the calls have one length.
    let flood = flood_of(&mut flooder, FLOOD, |serial, i| {
        driver_call(
            serial,
            "RequestName",
            &(format!("org.hardening.Flood.N{i:06}"), 4u32),
        )
    });
    let serial = bystander.next_serial();
    let list_names = driver_call(serial.get(), "ListNames", &());
    let race = Race::run(&broker, &flooder, &flood, &bystander, &list_names);
    let reply = bystander.reply_to(serial).expect("ListNames reply");
    let names: Vec<String> = reply.body().deserialize().expect("names");
    let handled_first = names
        .iter()
        .filter(|n| n.starts_with("org.hardening.Flood."))
        .count();
    race.check("RequestName", handled_first);
}

/// The same holds whatever the flooder calls: the driver's `AddMatch` or `Peer.Ping`, or
/// another peer (one that never answers). A monitor shows the order in which the bus handled
/// the calls.
#[test]
fn a_flood_of_any_call_waits_its_turn() {
    for kind in ["AddMatch", "Ping", "a peer"] {
        let broker = Broker::start();
        let mut flooder = RawClient::connect(&broker.socket);
        let mut bystander = RawClient::connect(&broker.socket);
        let callee = RawClient::connect(&broker.socket);
        let mut monitor = RawClient::connect(&broker.socket);
        let serial = monitor.next_serial();
        let become_monitor = call(
            serial.get(),
            "org.freedesktop.DBus",
            "org.freedesktop.DBus.Monitoring",
            "BecomeMonitor",
            &(vec!["type='method_call'"], 0u32),
        );
        (&monitor.stream)
            .write_all(&become_monitor)
            .expect("BecomeMonitor sent");
        monitor.reply_to(serial).expect("BecomeMonitor");
        // Rules and unique names of one length each, so the calls have one length.
        let flood = flood_of(&mut flooder, FLOOD, |serial, i| match kind {
            "AddMatch" => driver_call(
                serial,
                "AddMatch",
                &(format!("type='signal',member='M{i:06}'"),),
            ),
            "Ping" => call(
                serial,
                "org.freedesktop.DBus",
                "org.freedesktop.DBus.Peer",
                "Ping",
                &(),
            ),
            _ => call(serial, &callee.unique, "org.hardening.Callee", "Call", &()),
        });
        let get_id = driver_call(bystander.next_serial().get(), "GetId", &());
        let race = Race::run(&broker, &flooder, &flood, &bystander, &get_id);
        let mut handled_first = 0;
        loop {
            let msg = monitor.recv();
            let header = msg.header();
            let sender = header.sender().map(|s| s.as_str());
            if sender == Some(bystander.unique.as_str()) {
                break;
            }
            if sender == Some(flooder.unique.as_str()) {
                handled_first += 1;
            }
        }
        race.check(kind, handled_first);
        drop(monitor);
        drop(callee);
    }
}

/// Pipelines 100k calls whose replies it never reads, and returns when the bus has handled
/// them all (a last call's effect, a name, is visible to `observer`).
fn queue_unread_replies(broker: &Broker, observer: &mut RawClient) -> RawClient {
    let mut abuser = RawClient::connect(&broker.socket);
    let mut flood = flood_of(&mut abuser, FLOOD, |serial, _| {
        driver_call(serial, "GetId", &())
    });
    let done = "org.hardening.Done";
    flood.extend_from_slice(&driver_call(
        abuser.next_serial().get(),
        "RequestName",
        &(done, 4u32),
    ));
    let mut writer = abuser.stream.try_clone().expect("clone");
    std::thread::spawn(move || writer.write_all(&flood))
        .join()
        .expect("writer")
        .expect("flood written");
    let deadline = Instant::now() + Duration::from_secs(60);
    while observer.driver_call("GetNameOwner", &(done,)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the bus never handled the abuser's calls"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    abuser
}

/// Once an abuser that made the bus queue 100k replies for it leaves, the bus's memory comes
/// back to within 8 MiB of what it was before, in a bounded time.
#[test]
fn memory_of_unread_replies_comes_back_after_the_client_leaves() {
    let broker = Broker::start();
    let mut observer = RawClient::connect(&broker.socket);
    observer.driver_call("GetId", &()).expect("GetId");
    let fresh = rss_kib(broker.pid());
    let abuser = queue_unread_replies(&broker, &mut observer);
    let peak = rss_kib(broker.pid());
    assert!(
        peak > fresh + 16 * 1024,
        "no peak to come back from: {fresh} KiB fresh, {peak} KiB with 100k replies queued"
    );
    drop(abuser);
    let left = Instant::now();
    let deadline = left + Duration::from_secs(20);
    loop {
        let now = rss_kib(broker.pid());
        if now <= fresh + 8 * 1024 {
            eprintln!(
                "RSS {fresh} KiB fresh, {peak} KiB at the peak, {now} KiB {:?} after",
                left.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RSS still {now} KiB 20 s after the abuser left ({fresh} KiB fresh, {peak} KiB peak)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The bus still serves.
    observer.driver_call("GetId", &()).expect("GetId after");
}

/// How many names the leaving client holds: many times what the bus gives up per turn.
const LEAVING_NAMES: u32 = 20_000;

/// A client that leaves holding many names does not hold the others up while the bus announces
/// their release: a call made once the first `NameOwnerChanged` arrived is answered before the
/// last one. Every name is still announced, the unique name last, and none is left owned.
#[test]
fn a_client_leaving_with_many_names_waits_its_turn() {
    let broker = Broker::start();
    let mut holder = RawClient::connect(&broker.socket);
    let mut flood = flood_of(&mut holder, LEAVING_NAMES, |serial, i| {
        driver_call(
            serial,
            "RequestName",
            &(format!("org.hardening.Leave.N{i:06}"), 4u32),
        )
    });
    let last = format!("org.hardening.Leave.N{:06}", LEAVING_NAMES - 1);
    flood.extend_from_slice(&driver_call(holder.next_serial().get(), "GetId", &()));
    let reader = drain(holder.stream.try_clone().expect("clone"));
    (&holder.stream).write_all(&flood).expect("names requested");
    let mut bystander = RawClient::connect(&broker.socket);
    let deadline = Instant::now() + Duration::from_secs(60);
    while bystander.driver_call("GetNameOwner", &(&last,)).is_err() {
        assert!(Instant::now() < deadline, "the holder never got its names");
        std::thread::sleep(Duration::from_millis(20));
    }
    bystander
        .driver_call(
            "AddMatch",
            &("type='signal',member='NameOwnerChanged',arg0namespace='org.hardening.Leave'",),
        )
        .expect("AddMatch names");
    bystander
        .driver_call(
            "AddMatch",
            &(format!("type='signal',arg0='{}'", holder.unique),),
        )
        .expect("AddMatch unique");
    let unique = holder.unique.clone();
    holder
        .stream
        .shutdown(std::net::Shutdown::Both)
        .expect("holder leaves");
    drop(holder);
    reader.join().expect("reader");
    // The release has begun; now the bystander asks something.
    let is_name_gone = |m: &Message| member_of(m) == "NameOwnerChanged";
    bystander.recv_until(is_name_gone);
    let serial = bystander.next_serial();
    (&bystander.stream)
        .write_all(&driver_call(serial.get(), "GetId", &()))
        .expect("GetId sent");
    let mut announced = 1;
    loop {
        let msg = bystander.recv();
        if msg.header().reply_serial() == Some(serial) {
            break;
        }
        announced += usize::from(is_name_gone(&msg));
    }
    eprintln!("the bystander was answered after {announced} of {LEAVING_NAMES} names' release");
    assert!(
        announced < LEAVING_NAMES as usize / 2,
        "the bystander waited for {announced} of the {LEAVING_NAMES} names to be announced"
    );
    let mut names_left = LEAVING_NAMES as usize - announced;
    loop {
        let msg = bystander.recv_until(is_name_gone);
        let (name, old, new): (String, String, String) = msg.body().deserialize().expect("body");
        assert_eq!(
            (old.as_str(), new.as_str()),
            (unique.as_str(), ""),
            "{name}"
        );
        if name == unique {
            break;
        }
        names_left -= 1;
    }
    assert_eq!(
        names_left, 0,
        "the unique name was announced before every name"
    );
    let owner = bystander.driver_call("GetNameOwner", &(&last,));
    assert_eq!(
        error_name(&owner.expect_err("the last name has no owner")),
        "org.freedesktop.DBus.Error.NameHasNoOwner"
    );
}
