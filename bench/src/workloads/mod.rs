//! The workloads of issue 5. Each prints its figures as `result NAME VALUE`
//! lines on stdout (what run.sh reads) and its progress on stderr.

pub mod activation;
pub mod broadcast;
pub mod churn;
pub mod flood;
pub mod memory;
pub mod roundtrip;
pub mod throughput;

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::client::Conn;
use crate::peers::ECHO_INTERFACE;
use crate::wire::{Body, Kind};

/// Prints one figure for run.sh.
pub fn report(name: &str, value: f64) {
    println!("result {name} {value:.3}");
}

/// The `p`-th percentile (0..=100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or_default()
}

/// The median of a few figures (the middle one, or the lower middle).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values
        .get(values.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0)
}

/// Sends one `Echo` call and waits for its reply, checking that the whole
/// body came back. `destination` is `None` on a p2p connection.
pub fn echo_once(
    conn: &mut Conn,
    destination: Option<&str>,
    body: &Body,
    out: &mut Vec<u8>,
) -> Result<()> {
    out.clear();
    let serial = conn.push_call(out, destination, ECHO_INTERFACE, "Echo", body);
    conn.write(out)?;
    loop {
        let frame = conn.recv()?;
        if frame.reply_serial != Some(serial) {
            continue;
        }
        ensure!(
            frame.kind == Some(Kind::MethodReturn),
            "echo failed: {}",
            frame.describe_error()
        );
        ensure!(
            frame.body.len() == body.bytes().len(),
            "echo returned {} of {} body bytes",
            frame.body.len(),
            body.bytes().len()
        );
        return Ok(());
    }
}

/// Where calls to the echo peer go: straight to a p2p echo peer
/// (`--p2p PATH`, the floor) or through a bus (`--address ADDR --dest
/// NAME[,NAME...]`).
pub enum Route<'a> {
    P2p(&'a str),
    Bus {
        address: &'a str,
        dests: Vec<&'a str>,
    },
}

impl<'a> Route<'a> {
    pub fn from_options(opts: &'a crate::args::Options) -> Result<Self> {
        if let Some(path) = opts.optional("p2p") {
            return Ok(Route::P2p(path));
        }
        let address = opts.required("address")?;
        let dests = opts
            .required("dest")
            .context("bus mode needs the echo peer's name")?;
        Ok(Route::Bus {
            address,
            dests: dests.split(',').collect(),
        })
    }

    /// Opens client `index`'s connection; on a bus, client `index` calls the
    /// `index`-th destination (cyclically).
    pub fn connect(&self, index: usize) -> Result<(Conn, Option<&'a str>)> {
        match self {
            Route::P2p(path) => Ok((Conn::p2p(path)?, None)),
            Route::Bus { address, dests } => {
                let dest = dests.get(index % dests.len().max(1)).copied();
                Ok((Conn::bus(address)?, dest))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 50), Duration::from_micros(50));
        assert_eq!(percentile(&samples, 99), Duration::from_micros(99));
        assert_eq!(percentile(&samples[..1], 99), Duration::from_micros(1));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.0);
    }
}
