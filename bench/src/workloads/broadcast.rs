//! Broadcast: one emitter, subscribers whose match rules select its
//! signals, and connections holding many rules that never match (so a bus
//! that scans every rule pays for it). Deliveries are counted by one
//! thread polling all subscriber sockets.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{median, report};
use crate::args::Options;
use crate::client::{Conn, Inbox};
use crate::wire::{self, Header, Kind};

const INTERFACE: &str = "bench.Broadcast";
const MEMBER: &str = "Tick";
/// How long a round may take before the bench declares deliveries lost.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

/// `broadcast`: `--subscribers` (100) matching connections,
/// `--idle-conns` (10) × `--rules-per-conn` (100) non-matching rules,
/// `--signals` (2000) signals per round, `--rounds` (5) timed rounds after
/// one warm-up round. Reports the median `deliveries_per_s`.
pub fn run(opts: &Options) -> Result<()> {
    let address = opts.required("address")?;
    let subscribers = opts.number("subscribers", 100usize)?;
    let idle_conns = opts.number("idle-conns", 10usize)?;
    let rules_per_conn = opts.number("rules-per-conn", 100usize)?;
    let signals = opts.number("signals", 2000usize)?.max(1);
    let rounds = opts.number("rounds", 5usize)?.max(1);
    opts.finish()?;

    let mut emitter = Conn::bus(address)?;
    let (streams, mut inboxes) = subscribe(address, subscribers)?;
    let _rule_holders = non_matching_rules(address, idle_conns, rules_per_conn)?;
    let mut rates = Vec::with_capacity(rounds);
    for round in 0..=rounds {
        let burst = signal_burst(&mut emitter, signals);
        let elapsed = timed_round(&emitter, &burst, &streams, &mut inboxes, signals)?;
        let rate = (subscribers * signals) as f64 / elapsed.as_secs_f64();
        let note = if round == 0 { " (warm-up)" } else { "" };
        eprintln!("broadcast round {round}: {rate:.0} deliveries/s{note}");
        if round > 0 {
            rates.push(rate);
        }
    }
    report("deliveries_per_s", median(&mut rates));
    Ok(())
}

/// Connects `count` subscribers with the matching rule; returns their
/// sockets and receive buffers apart, so one thread can poll them all.
fn subscribe(address: &str, count: usize) -> Result<(Vec<UnixStream>, Vec<Inbox>)> {
    let matching = format!("type='signal',interface='{INTERFACE}',member='{MEMBER}'");
    let mut streams = Vec::with_capacity(count);
    let mut inboxes = Vec::with_capacity(count);
    for _ in 0..count {
        let mut conn = Conn::bus(address)?;
        conn.add_match(&matching)?;
        streams.push(conn.stream);
        inboxes.push(conn.inbox);
    }
    Ok((streams, inboxes))
}

/// Sends `burst` from another thread and returns the time until every
/// subscriber has received all `signals` of it.
fn timed_round(
    emitter: &Conn,
    burst: &[u8],
    streams: &[UnixStream],
    inboxes: &mut [Inbox],
    signals: usize,
) -> Result<Duration> {
    std::thread::scope(|scope| {
        let start = Instant::now();
        let writer = scope.spawn(|| emitter.write(burst));
        let counted = count_deliveries(streams, inboxes, signals);
        writer
            .join()
            .unwrap_or_else(|_| bail!("emitter thread panicked"))?;
        counted.map(|()| start.elapsed())
    })
}

/// `count` signals from `emitter`, marshalled back to back.
fn signal_burst(emitter: &mut Conn, count: usize) -> Vec<u8> {
    let header = Header {
        path: Some("/bench"),
        interface: Some(INTERFACE),
        member: Some(MEMBER),
        ..Header::default()
    };
    let body = wire::Body::default().byte_array(&[0x42; 8]);
    let mut out = Vec::new();
    for _ in 0..count {
        let serial = emitter.serials.next();
        wire::encode(
            &mut out,
            Kind::Signal,
            serial,
            &header,
            body.signature(),
            body.bytes(),
        );
    }
    out
}

/// Connections holding rules that look like the subscribers' but never
/// match: half name another interface, half another member.
fn non_matching_rules(address: &str, conns: usize, rules_each: usize) -> Result<Vec<Conn>> {
    (0..conns)
        .map(|c| {
            let mut conn = Conn::bus(address)?;
            for r in 0..rules_each {
                let rule = if r % 2 == 0 {
                    format!("type='signal',interface='bench.Other{c}x{r}',member='{MEMBER}'")
                } else {
                    format!("type='signal',interface='{INTERFACE}',member='Tock{c}x{r}'")
                };
                conn.add_match(&rule)?;
            }
            Ok(conn)
        })
        .collect()
}

/// Reads every subscriber until each has received `signals` ticks.
fn count_deliveries(streams: &[UnixStream], inboxes: &mut [Inbox], signals: usize) -> Result<()> {
    let mut missing = streams.len() * signals;
    let mut fds: Vec<PollFd> = streams
        .iter()
        .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
        .collect();
    let deadline = Instant::now() + ROUND_TIMEOUT;
    while missing > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        if poll(&mut fds, timeout).context("poll failed")? == 0 {
            bail!("{missing} deliveries still missing after {ROUND_TIMEOUT:?}");
        }
        for ((fd, stream), inbox) in fds.iter().zip(streams).zip(inboxes.iter_mut()) {
            if fd.revents().is_none_or(|r| r.is_empty()) {
                continue;
            }
            inbox.fill(stream)?;
            while let Some(frame) = inbox.next_message()? {
                if frame.kind == Some(Kind::Signal) && frame.member == Some(MEMBER) {
                    missing = missing
                        .checked_sub(1)
                        .context("more deliveries than signals")?;
                }
            }
        }
    }
    Ok(())
}
