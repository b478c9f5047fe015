//! Activation: cold `StartServiceByName` of the trivial service until the
//! reply, then `Quit` and wait until the bus reports the name gone.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

use super::{percentile, report};
use crate::args::Options;
use crate::client::{BUS_NAME, Conn};
use crate::peers::QUIT_MEMBER;
use crate::wire::{Body, Kind};

/// `StartServiceByName` reply: the service was started.
const START_REPLY_SUCCESS: u32 = 1;

/// `activation --name NAME`: `--rounds` (20) timed starts after one
/// warm-up start. Reports `p50_ms`.
pub fn run(opts: &Options) -> Result<()> {
    let address = opts.required("address")?;
    let name = opts.required("name")?;
    let rounds = opts.number("rounds", 20usize)?.max(1);
    opts.finish()?;
    let mut conn = Conn::bus(address)?;
    conn.add_match(&format!(
        "type='signal',sender='{BUS_NAME}',member='NameOwnerChanged',arg0='{name}'"
    ))?;
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..=rounds {
        let start = Instant::now();
        let reply = conn.call_bus("StartServiceByName", &Body::default().string(name).u32(0))?;
        let elapsed = start.elapsed();
        let code = reply.frame()?.args().u32()?;
        ensure!(
            code == START_REPLY_SUCCESS,
            "StartServiceByName({name}) answered {code}: was it already running?"
        );
        stop(&mut conn, name)?;
        if round > 0 {
            samples.push(elapsed);
        }
    }
    samples.sort_unstable();
    report("p50_ms", millis(percentile(&samples, 50)));
    Ok(())
}

/// Tells the service to quit and waits for `NameOwnerChanged(name, old, "")`.
fn stop(conn: &mut Conn, name: &str) -> Result<()> {
    conn.call_no_reply(name, name, QUIT_MEMBER)?;
    loop {
        let frame = conn.recv()?;
        if frame.kind != Some(Kind::Signal) || frame.member != Some("NameOwnerChanged") {
            continue;
        }
        let mut args = frame.args();
        let (changed, _old, new) = (args.string()?, args.string()?, args.string()?);
        if changed == name && new.is_empty() {
            return Ok(());
        }
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
