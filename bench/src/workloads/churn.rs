//! Connection churn: connect, authenticate, `Hello`, disconnect, in a loop.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::report;
use crate::args::Options;
use crate::client::Conn;

/// `churn`: as many connections as fit in `--seconds` (3), one after the
/// other, each waiting for its `Hello` reply. Reports `conns_per_s`.
pub fn run(opts: &Options) -> Result<()> {
    let address = opts.required("address")?;
    let duration = Duration::from_secs_f64(opts.number("seconds", 3.0f64)?);
    opts.finish()?;
    let start = Instant::now();
    let mut count = 0u64;
    while start.elapsed() < duration {
        drop(Conn::bus(address)?);
        count += 1;
    }
    report("conns_per_s", count as f64 / start.elapsed().as_secs_f64());
    Ok(())
}
