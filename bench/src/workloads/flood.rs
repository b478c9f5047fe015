//! The flood and soak runner's workloads (issue 10, bench/flood.sh): one
//! abuser against a fresh bus, with the bus's resident set and open fds
//! read before, at the peak and after, a bystander that pings the bus
//! every 10 ms all along, and a new client that tries to get in at the
//! peak. It prints figures and what happened; it judges nothing, so a bus
//! that refuses, disconnects or stalls gives a figure or a sentence, never
//! an error exit.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::memory::vm_rss_kib;
use super::report;
use crate::args::Options;
use crate::client::{BUS_NAME, Conn, auth_external, connect_within};
use crate::wire::{Body, Frame, Kind};

/// How long one connect, read or write of the abuser or a probe may wait.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the bystander waits for one reply before it gives up.
const BYSTANDER_TIMEOUT: Duration = Duration::from_secs(30);
/// The bystander's pace.
const BYSTANDER_PERIOD: Duration = Duration::from_millis(10);
/// How often the sampler reads the bus's VmRSS and fd count.
const SAMPLE_PERIOD: Duration = Duration::from_millis(100);
/// Calls in flight for the pipelined peaks (AddMatch, RequestName).
const WINDOW: usize = 256;
/// Consecutive failed connects after which a flood or the soak stops
/// trying (with `FLOOD_CONNECT_TIMEOUT`, at most 40 s lost to a bus that
/// stopped accepting).
const MAX_CONSECUTIVE_FAILURES: usize = 20;
/// How long one flood connection's connect or SASL answer may take.
const FLOOD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What one workload does to the bus.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Abuse {
    Silent,
    Auth,
    Soak,
    Unread,
    Matches,
    Names,
}

/// The sizes and time bounds of a run.
struct Plan<'a> {
    address: &'a str,
    pid: u32,
    count: usize,
    /// How long floods hold their connections, and the cap on waiting for
    /// a peak to settle.
    hold: Duration,
    /// When the abuser's phase stops, whatever it reached.
    deadline: Instant,
}

/// `flood --address A --bus-pid P --kind K [--count N] [--hold-s 5]
/// [--after-s 15] [--budget-s 300]`.
pub fn run(opts: &Options) -> Result<()> {
    let address = opts.required("address")?;
    let pid: u32 = opts.required("bus-pid")?.parse().context("bad --bus-pid")?;
    let kind = match opts.required("kind")? {
        "silent" => Abuse::Silent,
        "auth" => Abuse::Auth,
        "soak" => Abuse::Soak,
        "unread" => Abuse::Unread,
        "matches" => Abuse::Matches,
        "names" => Abuse::Names,
        other => bail!("unknown --kind {other:?} (silent, auth, soak, unread, matches, names)"),
    };
    let count = opts.number("count", 5000usize)?;
    let hold = Duration::from_secs_f64(opts.number("hold-s", 5.0f64)?);
    let after = Duration::from_secs_f64(opts.number("after-s", 15.0f64)?);
    let budget = Duration::from_secs_f64(opts.number("budget-s", 300.0f64)?);
    opts.finish()?;
    let plan = Plan {
        address,
        pid,
        count,
        hold,
        deadline: Instant::now() + budget,
    };
    measure(&plan, kind, after)
}

/// Runs one workload between the three snapshots and reports everything.
fn measure(plan: &Plan, kind: Abuse, after: Duration) -> Result<()> {
    let bystander = Bystander::start(plan.address).context("the bystander could not connect")?;
    std::thread::sleep(Duration::from_millis(200));
    let before = Snapshot::take(plan.pid).context("the bus is gone before the workload")?;
    let sampler = Sampler::start(plan.pid);
    let started = Instant::now();
    let outcome = match kind {
        Abuse::Silent => flood(plan, false),
        Abuse::Auth => flood(plan, true),
        Abuse::Soak => soak(plan),
        Abuse::Unread => unread_replies(plan),
        Abuse::Matches => pipelined_peak(plan, "AddMatch", add_match),
        Abuse::Names => pipelined_peak(plan, "RequestName", request_name),
    };
    let abuse_s = started.elapsed().as_secs_f64();
    let peak = sampler.stop();
    eprintln!("abuser gone after {abuse_s:.1} s; waiting {after:?}");
    std::thread::sleep(after);
    let after_snapshot = Snapshot::take(plan.pid);
    let seen = bystander.stop();
    report_snapshot("before", Some(before));
    report_snapshot("peak", Some(peak.max.max(before)));
    report_snapshot("after", after_snapshot);
    report("abuse_s", abuse_s);
    report("after_s", after.as_secs_f64());
    seen.report();
    match &outcome.probe {
        Some(Ok(took)) => report("newclient_ms", took.as_secs_f64() * 1e3),
        Some(Err(why)) => text("newclient", why),
        None => {}
    }
    text(
        "outcome",
        &format!("{}; the abuser took {abuse_s:.1} s", outcome.text),
    );
    if after_snapshot.is_none() || peak.gone {
        text("bus", "exited during the workload");
    }
    Ok(())
}

/// What the abuser saw: a sentence, and the new client's try at the peak.
struct Outcome {
    text: String,
    probe: Option<Result<Duration, String>>,
}

/// Prints a `result NAME TEXT` line (run.sh-style, the value is the rest
/// of the line).
fn text(name: &str, value: &str) {
    println!("result {name} {}", value.replace('\n', " "));
}

// --- the bus process -----------------------------------------------------------

/// The bus's VmRSS and open fd count at one moment.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct Snapshot {
    rss_kib: u64,
    fds: u64,
}

impl Snapshot {
    /// `None` once the bus process is gone.
    fn take(pid: u32) -> Option<Self> {
        let rss_kib = vm_rss_kib(pid).ok()?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
        Some(Self { rss_kib, fds })
    }

    fn max(self, other: Self) -> Self {
        Self {
            rss_kib: self.rss_kib.max(other.rss_kib),
            fds: self.fds.max(other.fds),
        }
    }
}

fn report_snapshot(when: &str, snapshot: Option<Snapshot>) {
    match snapshot {
        Some(s) => {
            report(&format!("rss_{when}_kib"), s.rss_kib as f64);
            report(&format!("fds_{when}"), s.fds as f64);
        }
        None => {
            text(&format!("rss_{when}_kib"), "bus gone");
            text(&format!("fds_{when}"), "bus gone");
        }
    }
}

/// Reads the bus's snapshot every 100 ms and keeps the largest of each.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Peak>,
}

/// The largest figures the sampler saw, and whether the bus went away.
#[derive(Default)]
struct Peak {
    max: Snapshot,
    gone: bool,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = Peak::default();
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                match Snapshot::take(pid) {
                    Some(now) => peak.max = peak.max.max(now),
                    None => {
                        peak.gone = true;
                        return peak;
                    }
                }
                if stopping {
                    return peak;
                }
                std::thread::sleep(SAMPLE_PERIOD);
            }
        });
        Self { stop, handle }
    }

    fn stop(self) -> Peak {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(Peak {
            max: Snapshot::default(),
            gone: true,
        })
    }
}

/// Waits until the bus's RSS has not moved for a second (the bus has
/// worked through what it was sent), at most `cap`.
fn settle(pid: u32, cap: Duration) {
    let end = Instant::now() + cap;
    let mut last = Snapshot::take(pid);
    let mut still_since = Instant::now();
    while Instant::now() < end && still_since.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(200));
        let now = Snapshot::take(pid);
        if now.map(|s| s.rss_kib) != last.map(|s| s.rss_kib) {
            still_since = Instant::now();
        }
        last = now;
    }
}

// --- the bystander and the new client ----------------------------------------

/// A client already on the bus that calls `GetId` every 10 ms.
struct Bystander {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Seen>,
}

/// What the bystander saw.
#[derive(Default)]
struct Seen {
    pings: u64,
    worst: Duration,
    failure: Option<String>,
}

impl Seen {
    fn report(&self) {
        report("bystander_worst_ms", self.worst.as_secs_f64() * 1e3);
        report("bystander_pings", self.pings as f64);
        if let Some(why) = &self.failure {
            text("bystander_failure", why);
        }
    }
}

impl Bystander {
    fn start(address: &str) -> Result<Self> {
        let mut conn = Conn::bus_within(address, BYSTANDER_TIMEOUT)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen = Seen::default();
            while !flag.load(Ordering::Relaxed) {
                let start = Instant::now();
                if let Err(e) = conn.call_bus("GetId", &Body::default()) {
                    let waited = start.elapsed().as_secs_f64();
                    seen.failure = Some(format!(
                        "after {} pings, no answer ({waited:.1} s): {e:#}",
                        seen.pings
                    ));
                    seen.worst = seen.worst.max(start.elapsed());
                    break;
                }
                seen.worst = seen.worst.max(start.elapsed());
                seen.pings += 1;
                std::thread::sleep(BYSTANDER_PERIOD);
            }
            seen
        });
        Ok(Self { stop, handle })
    }

    fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_else(|_| Seen {
            failure: Some("bystander thread panicked".into()),
            ..Seen::default()
        })
    }
}

/// A new client's connect, EXTERNAL and `Hello`: how long it took, or why
/// it did not get in.
fn probe(address: &str) -> Result<Duration, String> {
    let start = Instant::now();
    match Conn::bus_within(address, STEP_TIMEOUT) {
        Ok(_) => Ok(start.elapsed()),
        Err(e) => Err(format!(
            "failed after {:.0} ms: {e:#}",
            start.elapsed().as_secs_f64() * 1e3
        )),
    }
}

// --- floods ------------------------------------------------------------------------

/// Floods A and B: `count` connections that connect and say nothing, or
/// that authenticate (EXTERNAL, BEGIN) and never say `Hello`, held for
/// `hold`; a new client tries to get in once they are all open.
fn flood(plan: &Plan, authenticate: bool) -> Outcome {
    let mut held = Vec::with_capacity(plan.count);
    let mut failed = 0usize;
    let mut consecutive = 0usize;
    let mut first_error = None;
    for _ in 0..plan.count {
        if Instant::now() > plan.deadline || consecutive >= MAX_CONSECUTIVE_FAILURES {
            break;
        }
        match open_flood_conn(plan.address, authenticate) {
            Ok(stream) => {
                held.push(stream);
                consecutive = 0;
            }
            Err(e) => {
                failed += 1;
                consecutive += 1;
                first_error.get_or_insert_with(|| short(&format!("{e:#}")));
            }
        }
    }
    let opened = held.len();
    eprintln!("flood: {opened} open, {failed} failed");
    std::thread::sleep(plan.hold.min(Duration::from_secs(1)));
    let probe = probe(plan.address);
    std::thread::sleep(plan.hold.saturating_sub(Duration::from_secs(1)));
    let closed = closed_by_peer(&held);
    let what = if authenticate {
        "authenticated"
    } else {
        "opened"
    };
    let mut text = format!(
        "{what} {opened} of {}; the bus closed {closed} of them within {} s",
        plan.count,
        plan.hold.as_secs_f64()
    );
    if let Some(e) = first_error {
        text += &format!("; {failed} failed, first: {e}");
    }
    if opened + failed < plan.count {
        text += "; gave up early";
    }
    drop(held);
    Outcome {
        text,
        probe: Some(probe),
    }
}

/// One flood connection: connected, and with `authenticate`, past
/// EXTERNAL's `OK` and `BEGIN`.
fn open_flood_conn(address: &str, authenticate: bool) -> Result<UnixStream> {
    let mut stream = connect_within(address, FLOOD_CONNECT_TIMEOUT)?;
    if authenticate {
        stream.set_write_timeout(Some(FLOOD_CONNECT_TIMEOUT))?;
        stream.write_all(auth_external().as_bytes())?;
        let line = read_line(&mut stream)?;
        if !line.starts_with("OK ") {
            bail!("authentication refused: {line:?}");
        }
        stream.write_all(b"BEGIN\r\n")?;
    }
    Ok(stream)
}

/// Reads one SASL line; the server sends nothing else before `BEGIN`.
fn read_line(stream: &mut UnixStream) -> Result<String> {
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while !line.ends_with(b"\r\n") {
        let n = match stream.read(&mut buf) {
            Ok(0) => bail!("closed by the bus during authentication"),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("no SASL answer within {FLOOD_CONNECT_TIMEOUT:?}")
            }
            Err(e) => return Err(e).context("read failed"),
        };
        line.extend_from_slice(&buf[..n]);
        if line.len() > 4096 {
            bail!("SASL line too long");
        }
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

/// How many of `streams` the bus has closed (hang-up seen by `poll`).
fn closed_by_peer(streams: &[UnixStream]) -> usize {
    let mut closed = 0;
    for chunk in streams.chunks(1024) {
        let mut fds: Vec<PollFd> = chunk
            .iter()
            .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
            .collect();
        if poll(&mut fds, PollTimeout::ZERO).is_err() {
            continue;
        }
        let hung_up = PollFlags::POLLHUP;
        closed += fds
            .iter()
            .filter(|fd| fd.revents().is_some_and(|r| r.intersects(hung_up)))
            .count();
    }
    closed
}

// --- soak -------------------------------------------------------------------------

/// `count` cycles of connect, EXTERNAL, `Hello`, `GetId`, close.
fn soak(plan: &Plan) -> Outcome {
    let start = Instant::now();
    let (mut done, mut failed, mut consecutive) = (0usize, 0usize, 0usize);
    let mut first_error = None;
    while done + failed < plan.count
        && Instant::now() < plan.deadline
        && consecutive < MAX_CONSECUTIVE_FAILURES
    {
        let cycle = Conn::bus_within(plan.address, STEP_TIMEOUT)
            .and_then(|mut conn| conn.call_bus("GetId", &Body::default()).map(drop));
        match cycle {
            Ok(()) => {
                done += 1;
                consecutive = 0;
            }
            Err(e) => {
                failed += 1;
                consecutive += 1;
                first_error.get_or_insert_with(|| short(&format!("{e:#}")));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut text = format!(
        "{done} cycles in {secs:.1} s ({:.0}/s), {failed} failed",
        done as f64 / secs.max(1e-9)
    );
    if let Some(e) = first_error {
        text += &format!(", first: {e}");
    }
    if done + failed < plan.count {
        text += "; gave up early";
    }
    Outcome { text, probe: None }
}

// --- peaks ------------------------------------------------------------------------

/// One client sends `count` `GetId` calls and never reads a reply; once
/// the bus has settled, a new client tries to get in and asks whether the
/// abuser is still connected; then the abuser disconnects.
fn unread_replies(plan: &Plan) -> Outcome {
    let mut conn = match Conn::bus_within(plan.address, STEP_TIMEOUT) {
        Ok(conn) => conn,
        Err(e) => return failed_to_start(e),
    };
    let mut sent = 0usize;
    let mut stopped = None;
    let mut out = Vec::new();
    while sent < plan.count {
        if Instant::now() > plan.deadline {
            stopped = Some("gave up early".to_owned());
            break;
        }
        out.clear();
        let batch = (plan.count - sent).min(1000);
        for _ in 0..batch {
            push_bus_call(&mut conn, &mut out, "GetId", &Body::default());
        }
        if let Err(e) = write_within(&conn, &out) {
            stopped = Some(format!("the bus stopped taking calls: {e:#}"));
            break;
        }
        sent += batch;
    }
    settle(plan.pid, plan.hold * 4);
    let probe = probe(plan.address);
    let connected = still_connected(plan.address, conn.unique_name.as_deref());
    let mut text = format!("sent {sent} of {}; the abuser {connected}", plan.count);
    if let Some(why) = stopped {
        text += &format!("; {why}");
    }
    drop(conn);
    Outcome {
        text,
        probe: Some(probe),
    }
}

/// Writes `bytes`, failing if the bus takes none of them for
/// `STEP_TIMEOUT` (a bus that stops reading a client that never reads).
fn write_within(conn: &Conn, bytes: &[u8]) -> Result<()> {
    conn.stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    conn.write(bytes)
}

/// Asks the bus (on a fresh connection) whether `name` still has an owner.
fn still_connected(address: &str, name: Option<&str>) -> String {
    let Some(name) = name else {
        return "had no unique name".into();
    };
    let asked = Conn::bus_within(address, STEP_TIMEOUT).and_then(|mut conn| {
        conn.call_bus("GetNameOwner", &Body::default().string(name))
            .map(drop)
    });
    match asked {
        Ok(()) => "was still connected at the peak".into(),
        Err(e) if format!("{e:#}").contains("NameHasNoOwner") => {
            "had been disconnected by the bus".into()
        }
        Err(e) => format!("state unknown ({e:#})"),
    }
}

fn push_bus_call(conn: &mut Conn, out: &mut Vec<u8>, member: &str, body: &Body) -> u32 {
    conn.push_call(out, Some(BUS_NAME), BUS_NAME, member, body)
}

fn add_match(conn: &mut Conn, out: &mut Vec<u8>, i: usize) {
    let rule = format!("type='signal',interface='bench.Flood',member='Tick',arg0='{i}'");
    push_bus_call(conn, out, "AddMatch", &Body::default().string(&rule));
}

fn request_name(conn: &mut Conn, out: &mut Vec<u8>, i: usize) {
    const DO_NOT_QUEUE: u32 = 4;
    let name = format!("bench.flood.N{i}");
    let body = Body::default().string(&name).u32(DO_NOT_QUEUE);
    push_bus_call(conn, out, "RequestName", &body);
}

/// One client makes `count` driver calls built by `push` (`WINDOW` in
/// flight), reading every reply; at the peak a new client tries to get in;
/// then the client disconnects.
fn pipelined_peak(plan: &Plan, member: &str, push: fn(&mut Conn, &mut Vec<u8>, usize)) -> Outcome {
    let mut conn = match Conn::bus_within(plan.address, STEP_TIMEOUT) {
        Ok(conn) => conn,
        Err(e) => return failed_to_start(e),
    };
    let tally = pipeline(&mut conn, plan, push);
    settle(plan.pid, plan.hold);
    let probe = probe(plan.address);
    let mut text = format!("{member}: {} of {} succeeded", tally.ok, plan.count);
    if tally.errors > 0 {
        text += &format!(", {} refused", tally.errors);
    }
    if let Some(e) = tally.first_error {
        text += &format!(" (first: {e})");
    }
    if let Some(why) = tally.stopped {
        text += &format!("; {why}");
    }
    drop(conn);
    Outcome {
        text,
        probe: Some(probe),
    }
}

#[derive(Default)]
struct Tally {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    stopped: Option<String>,
}

/// Sends `plan.count` calls with at most `WINDOW` unanswered, counting the
/// answers; stops early at the deadline or when the connection fails.
fn pipeline(conn: &mut Conn, plan: &Plan, push: fn(&mut Conn, &mut Vec<u8>, usize)) -> Tally {
    let mut tally = Tally::default();
    let (mut sent, mut in_flight) = (0usize, 0usize);
    let mut out = Vec::new();
    while sent < plan.count || in_flight > 0 {
        if Instant::now() > plan.deadline {
            tally.stopped = Some(format!("gave up early after {sent} calls"));
            break;
        }
        if in_flight <= WINDOW / 2 && sent < plan.count {
            out.clear();
            while in_flight < WINDOW && sent < plan.count {
                push(conn, &mut out, sent);
                sent += 1;
                in_flight += 1;
            }
            if let Err(e) = write_within(conn, &out) {
                tally.stopped = Some(format!("the bus stopped taking calls: {e:#}"));
                break;
            }
        }
        match conn.recv().map(|frame| judge(&frame)) {
            Ok(None) => {}
            Ok(Some(answer)) => {
                in_flight -= 1;
                match answer {
                    Ok(()) => tally.ok += 1,
                    Err(e) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert_with(|| short(&e));
                    }
                }
            }
            Err(e) => {
                tally.stopped = Some(format!("connection lost after {sent} calls: {e:#}"));
                break;
            }
        }
    }
    tally
}

/// `None` for a message that answers nothing (a signal); otherwise whether
/// the call succeeded (a RequestName that did not make us the primary
/// owner did not).
fn judge(frame: &Frame) -> Option<Result<(), String>> {
    frame.reply_serial?;
    match frame.kind {
        Some(Kind::Error) => Some(Err(frame.describe_error())),
        Some(Kind::MethodReturn) if frame.signature == "u" => match frame.args().u32() {
            Ok(1) => Some(Ok(())),
            Ok(code) => Some(Err(format!("RequestName answered {code}"))),
            Err(e) => Some(Err(format!("bad reply: {e:#}"))),
        },
        Some(Kind::MethodReturn) => Some(Ok(())),
        _ => None,
    }
}

/// An error message cut to fit a table cell beside the rest of a sentence.
fn short(message: &str) -> String {
    const MAX: usize = 100;
    match message.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &message[..at]),
        None => message.to_owned(),
    }
}

fn failed_to_start(e: anyhow::Error) -> Outcome {
    Outcome {
        text: format!("the abuser could not connect: {e:#}"),
        probe: None,
    }
}

// --- helpers for flood.sh --------------------------------------------------------

/// `wait-bus --address A [--timeout-s 10]`: returns once a client gets
/// through `Hello`, for buses that print no address (dbus-broker).
pub fn wait_bus(opts: &Options) -> Result<()> {
    let address = opts.required("address")?;
    let timeout = Duration::from_secs_f64(opts.number("timeout-s", 10.0f64)?);
    opts.finish()?;
    let end = Instant::now() + timeout;
    loop {
        match Conn::bus_within(address, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > end => {
                return Err(e).context(format!("no bus answered within {timeout:?}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `journal-sink PATH`: what dbus-broker-launch needs to start without
/// systemd, a datagram socket that drops what it receives. Prints
/// `present` and exits if something already answers at PATH, else binds
/// it, prints `ready` and reads until killed.
pub fn journal_sink(path: &str) -> Result<()> {
    let probe = UnixDatagram::unbound().context("socket() failed")?;
    if probe.connect(path).is_ok() {
        println!("present");
        return Ok(());
    }
    let _ = std::fs::remove_file(path);
    let sink = UnixDatagram::bind(path).with_context(|| format!("cannot bind {path}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        sink.recv(&mut buf).context("recv failed")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    #[test]
    fn judges_replies_and_skips_signals() -> Result<()> {
        let mut out = Vec::new();
        let ok = wire::Header {
            reply_serial: Some(1),
            ..Default::default()
        };
        wire::encode(
            &mut out,
            Kind::MethodReturn,
            5,
            &ok,
            "u",
            &3u32.to_le_bytes(),
        );
        let frame = wire::parse(&out)?;
        assert_eq!(judge(&frame), Some(Err("RequestName answered 3".into())));
        out.clear();
        wire::encode(&mut out, Kind::MethodReturn, 5, &ok, "", &[]);
        assert_eq!(judge(&wire::parse(&out)?), Some(Ok(())));
        out.clear();
        wire::encode(&mut out, Kind::Signal, 6, &wire::Header::default(), "", &[]);
        assert_eq!(judge(&wire::parse(&out)?), None);
        Ok(())
    }

    #[test]
    fn shortens_long_messages_on_a_char_boundary() {
        assert_eq!(short("LimitsExceeded"), "LimitsExceeded");
        let long = "é".repeat(150);
        assert_eq!(short(&long), format!("{}...", "é".repeat(100)));
    }

    #[test]
    fn snapshot_counts_our_own_fds() -> Result<()> {
        let pid = std::process::id();
        let before = Snapshot::take(pid).context("no snapshot of ourselves")?;
        assert!(before.rss_kib > 0);
        let pairs: Vec<_> = (0..50)
            .map(|_| UnixStream::pair())
            .collect::<Result<_, _>>()?;
        let during = Snapshot::take(pid).context("no snapshot of ourselves")?;
        // Other tests run in parallel threads and open sockets too.
        assert!(
            during.fds >= before.fds + 100 - 20,
            "{} -> {}",
            before.fds,
            during.fds
        );
        drop(pairs);
        assert!(Snapshot::take(u32::MAX).is_none());
        Ok(())
    }

    #[test]
    fn counts_sockets_whose_peer_closed() -> Result<()> {
        let (a, b) = UnixStream::pair()?;
        let (c, _d) = UnixStream::pair()?;
        drop(b);
        assert_eq!(closed_by_peer(&[a, c]), 1);
        Ok(())
    }
}
