//! Round trips with one call in flight: latency percentiles for small
//! bodies, MB/s for large ones (64 KiB, 4 MiB).

use std::time::{Duration, Instant};

use anyhow::Result;

use super::{Route, echo_once, percentile, report};
use crate::args::Options;
use crate::wire::Body;

/// `roundtrip`: `--calls` timed calls after `--warmup` untimed ones, each
/// carrying `--size` bytes; reports `p50_us` and `p99_us`.
pub fn latency(opts: &Options) -> Result<()> {
    let (mut conn, dest) = Route::from_options(opts)?.connect(0)?;
    let size = opts.number("size", 8usize)?;
    let warmup = opts.number("warmup", 1000usize)?;
    let calls = opts.number("calls", 20_000usize)?.max(1);
    opts.finish()?;
    let body = Body::default().byte_array(&vec![0x5a; size]);
    let mut out = Vec::new();
    for _ in 0..warmup {
        echo_once(&mut conn, dest, &body, &mut out)?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        echo_once(&mut conn, dest, &body, &mut out)?;
        samples.push(start.elapsed());
    }
    samples.sort_unstable();
    report("p50_us", micros(percentile(&samples, 50)));
    report("p99_us", micros(percentile(&samples, 99)));
    Ok(())
}

/// `payload`: `--calls` round trips of `--size` bytes after one warm-up;
/// reports `mb_per_s`, payload bytes carried per second in each direction
/// (1 MB = 10^6 bytes).
pub fn payload(opts: &Options) -> Result<()> {
    let (mut conn, dest) = Route::from_options(opts)?.connect(0)?;
    let size = opts.number("size", 64 * 1024usize)?;
    let calls = opts.number("calls", 100usize)?.max(1);
    opts.finish()?;
    let body = Body::default().byte_array(&vec![0xa5; size]);
    let mut out = Vec::new();
    echo_once(&mut conn, dest, &body, &mut out)?;
    let start = Instant::now();
    for _ in 0..calls {
        echo_once(&mut conn, dest, &body, &mut out)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    report("mb_per_s", (size * calls) as f64 / elapsed / 1e6);
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
