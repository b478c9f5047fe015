//! Throughput: several clients, each keeping a fixed number of calls in
//! flight against echo peers, for a fixed time.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Route, report};
use crate::args::Options;
use crate::peers::ECHO_INTERFACE;
use crate::wire::{Body, Kind};

/// Calls each client makes before the clock starts.
const WARMUP_CALLS: usize = 200;

/// `throughput`: `--clients` connections (4), `--depth` calls in flight
/// each (32), for `--seconds` (3); client i calls the i-th name of the
/// comma-separated `--dest` list (cyclically), or the p2p echo peer.
/// Reports `calls_per_s`.
pub fn run(opts: &Options) -> Result<()> {
    let route = Route::from_options(opts)?;
    let clients = opts.number("clients", 4usize)?.max(1);
    let depth = opts.number("depth", 32usize)?.max(1);
    let duration = Duration::from_secs_f64(opts.number("seconds", 3.0f64)?);
    opts.finish()?;
    let barrier = Barrier::new(clients);
    let results: Vec<Result<(u64, Duration)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let (route, barrier) = (&route, &barrier);
                scope.spawn(move || client(route, i, depth, duration, barrier))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("client thread panicked")))
            .collect()
    });
    let mut calls = 0;
    let mut longest = Duration::ZERO;
    for result in results {
        let (done, elapsed) = result?;
        calls += done;
        longest = longest.max(elapsed);
    }
    report("calls_per_s", calls as f64 / longest.as_secs_f64());
    Ok(())
}

/// One client: keeps `depth` calls in flight until `duration` has passed,
/// then drains. Replies that arrive in one read are answered by new calls
/// in one write. Returns the calls completed and the time they took.
fn client(
    route: &Route,
    index: usize,
    depth: usize,
    duration: Duration,
    barrier: &Barrier,
) -> Result<(u64, Duration)> {
    // Connect before waiting so a failing client cannot leave others stuck.
    let connected = route.connect(index);
    barrier.wait();
    let (mut conn, dest) = connected?;
    let body = Body::default().byte_array(&[0x11; 8]);
    let mut out = Vec::new();
    for _ in 0..WARMUP_CALLS {
        super::echo_once(&mut conn, dest, &body, &mut out)?;
    }
    let start = Instant::now();
    out.clear();
    for _ in 0..depth {
        conn.push_call(&mut out, dest, ECHO_INTERFACE, "Echo", &body);
    }
    conn.write(&out)?;
    let (mut in_flight, mut completed) = (depth, 0u64);
    while in_flight > 0 {
        conn.inbox.fill(&conn.stream)?;
        let mut replies = 0;
        while let Some(frame) = conn.inbox.next_message()? {
            match frame.kind {
                Some(Kind::MethodReturn) => replies += 1,
                Some(Kind::Error) => bail!("echo failed: {}", frame.describe_error()),
                _ => {}
            }
        }
        in_flight = in_flight
            .checked_sub(replies)
            .context("more replies than calls")?;
        completed += replies as u64;
        if start.elapsed() < duration && replies > 0 {
            out.clear();
            for _ in 0..replies {
                conn.push_call(&mut out, dest, ECHO_INTERFACE, "Echo", &body);
            }
            conn.write(&out)?;
            in_flight += replies;
        }
    }
    Ok((completed, start.elapsed()))
}
