//! Stopping every process the bus started or adopted, when the bus stops.
//!
//! By the time [`stop_all`] runs, the bus has closed its connections, so a well-behaved
//! service sees its bus go and exits on its own. For the first half of the grace period the
//! broker only watches. Then every descendant still alive gets SIGTERM (and SIGCONT, so a
//! stopped one can act on it), and so does each one found later (a process may fork while the
//! broker looks). When the grace period is over, what is left is frozen with SIGSTOP, scanned
//! again until no unfrozen process remains, and killed with SIGKILL. [`stop_all`] returns once
//! no descendant is left at all, zombies included: the reaper, which runs meanwhile, has
//! collected every one that was the broker's child.
//!
//! Time is tokio's clock, like every timeout of the bus.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::{Instant, sleep};
use tracing::{debug, info, warn};

use super::tree::{self, Descendant};

/// How long, by default, the processes left at stop have before SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);

/// How often the tree is scanned while processes are expected to go.
const POLL: Duration = Duration::from_millis(20);

/// How many SIGSTOP rounds may chase a tree that keeps forking before SIGKILL goes out anyway.
const FREEZE_ROUNDS: usize = 50;

/// After SIGKILL, how long processes may take to die and be reaped before the bus gives up on
/// them (one in uninterruptible sleep, or one the broker may not signal).
const AFTER_KILL: Duration = Duration::from_secs(5);

/// Stops every descendant of the broker within `grace` (see the module's description), and
/// returns once none is left, or once the ones that cannot be killed have been named in a
/// warning.
pub async fn stop_all(grace: Duration) {
    let start = Instant::now();
    if !wait_until_gone(start + grace / 2).await {
        terminate_until(start + grace).await;
        // Both do nothing when SIGTERM was enough and only zombies wait for the reaper.
        freeze();
        if !kill_until_gone(Instant::now() + AFTER_KILL).await {
            let left: Vec<u32> = scan().iter().map(|d| d.pid).collect();
            warn!(pids = ?left, "processes left behind by services did not end after SIGKILL");
        }
    }
    if SPAWNER_STOPS_ITS_OWN.load(Ordering::Relaxed) {
        wait_for_spawner(start + grace + AFTER_KILL).await;
    }
}

/// Set when the spawner is a system bus's: it runs as root, so the bus (running as its
/// `<user>`) may not signal it, its keepers or its services. Its channel closed, it stops
/// them itself; the bus's scans leave its whole tree out and wait for it to end instead.
pub(super) static SPAWNER_STOPS_ITS_OWN: AtomicBool = AtomicBool::new(false);

/// Waits until the spawner and every process below it are gone (and reaped), or `deadline`.
async fn wait_for_spawner(deadline: Instant) {
    let spawner = SPAWNER.load(Ordering::Relaxed);
    loop {
        let left = tree::descendants()
            .map(|all| subtree(&all, spawner))
            .unwrap_or_default();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            warn!(pids = ?left, "the spawner did not stop its services in time");
            return;
        }
        sleep(POLL).await;
    }
}

/// The pids of `root` and its descendants in `found`.
fn subtree(found: &[Descendant], root: u32) -> HashSet<u32> {
    let mut inside: HashSet<u32> = found
        .iter()
        .filter(|d| d.pid == root)
        .map(|d| d.pid)
        .collect();
    loop {
        let before = inside.len();
        for d in found {
            if inside.contains(&d.parent) {
                inside.insert(d.pid);
            }
        }
        if inside.len() == before {
            return inside;
        }
    }
}

/// The spawner's pid (0: none). It lives as long as the bus, and has nothing of its own to
/// stop once its keepers are gone, so waiting for the services to leave does not wait for it.
pub(super) static SPAWNER: AtomicU32 = AtomicU32::new(0);

/// Watches until no descendant is left (zombies included) but the spawner, or `deadline`
/// passes; whether none is.
async fn wait_until_gone(deadline: Instant) -> bool {
    let spawner = SPAWNER.load(Ordering::Relaxed);
    loop {
        if scan().iter().all(|d| d.pid == spawner) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(POLL).await;
    }
}

/// Sends SIGTERM to every living descendant, and to each one found later, until none is alive
/// or `deadline` passes.
async fn terminate_until(deadline: Instant) {
    let mut signalled = HashSet::new();
    loop {
        let found = scan();
        // SIGCONT too, so that a stopped process can act on the SIGTERM.
        signal_fresh(&found, &mut signalled, &[Signal::SIGTERM, Signal::SIGCONT]);
        if alive(&found).is_empty() || Instant::now() >= deadline {
            return;
        }
        sleep(POLL).await;
    }
}

/// Freezes what is left: SIGSTOP to each living process, scanning again until a scan finds
/// none that has not had it. A process with a signal pending cannot finish a `fork`, so each
/// round can only find children forked before the last one's signals went out.
fn freeze() {
    let mut frozen = HashSet::new();
    for _ in 0..FREEZE_ROUNDS {
        let found = scan();
        let fresh: Vec<&Descendant> = alive(&found)
            .into_iter()
            .filter(|d| !d.is_stopped() && !frozen.contains(&d.pid))
            .collect();
        if fresh.is_empty() {
            return;
        }
        for process in fresh {
            if signal(process, Signal::SIGSTOP) {
                frozen.insert(process.pid);
            }
        }
    }
}

/// Sends SIGKILL to every living descendant, and to each one found later (a process killed
/// while it forked leaves a child behind), until none is left at all or `deadline` passes;
/// whether none is.
async fn kill_until_gone(deadline: Instant) -> bool {
    let mut killed = HashSet::new();
    loop {
        let found = scan();
        if found.is_empty() {
            return true;
        }
        signal_fresh(&found, &mut killed, &[Signal::SIGKILL]);
        if Instant::now() >= deadline {
            return false;
        }
        sleep(POLL).await;
    }
}

/// Sends `signals` to each living process of `found` not yet in `done`, and adds it there;
/// logs at info how many, named by the first signal.
fn signal_fresh(found: &[Descendant], done: &mut HashSet<u32>, signals: &[Signal]) {
    let fresh: Vec<&Descendant> = alive(found)
        .into_iter()
        .filter(|d| !done.contains(&d.pid))
        .collect();
    if fresh.is_empty() {
        return;
    }
    let name = signals.first().map_or("", |s| s.as_str());
    info!(
        "stopping {} processes left behind by services: {name}",
        fresh.len()
    );
    for process in fresh {
        // One re-parented since the scan (its keeper or the spawner died) is signalled after
        // the next scan, which sees its new parent.
        let mut sent = true;
        for &sig in signals {
            sent &= signal(process, sig);
        }
        if sent {
            done.insert(process.pid);
        }
    }
}

/// The living ones of a scan.
pub(super) fn alive(found: &[Descendant]) -> Vec<&Descendant> {
    found.iter().filter(|d| d.is_alive()).collect()
}

/// The broker's descendants; none when `/proc` cannot be read (with a warning: without
/// `/proc` there is no way to find them).
///
/// A system spawner's tree is left out: the spawner stops it ([`SPAWNER_STOPS_ITS_OWN`]).
fn scan() -> Vec<Descendant> {
    let found = tree::descendants().unwrap_or_else(|e| {
        warn!("cannot scan for processes left behind by services: {e}");
        Vec::new()
    });
    if !SPAWNER_STOPS_ITS_OWN.load(Ordering::Relaxed) {
        return found;
    }
    let theirs = subtree(&found, SPAWNER.load(Ordering::Relaxed));
    found
        .into_iter()
        .filter(|d| !theirs.contains(&d.pid))
        .collect()
}

/// Signals `process` if its pid still names the process the scan saw: one that has ended and
/// been reaped since could have given its pid to a process that is not the broker's. The
/// parent is read again first; the new holder of a recycled pid has another parent (or is a
/// sibling under the same parent, and so the broker's too).
///
/// Returns false when the pid was not signalled because its parent changed: gone, or
/// re-parented since the scan (to the broker, the spawner or a keeper, when one in between
/// died), which the next scan shows.
pub(super) fn signal(process: &Descendant, signal: Signal) -> bool {
    let me = std::process::id();
    match tree::stat_of(process.pid) {
        Some((parent, _)) if parent == process.parent || parent == me => {}
        _ => return false,
    }
    let name = std::fs::read_to_string(format!("/proc/{}/comm", process.pid)).unwrap_or_default();
    debug!(pid = process.pid, name = name.trim_end(), %signal, "signalling a process left behind");
    let pid = i32::try_from(process.pid).map(Pid::from_raw);
    match pid.map(|pid| kill(pid, signal)) {
        Ok(Ok(())) | Ok(Err(Errno::ESRCH)) => {}
        Ok(Err(e)) => warn!(pid = process.pid, %signal, "cannot signal a process left behind: {e}"),
        Err(_) => {}
    }
    true
}
