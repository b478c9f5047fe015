//! Memory: the bus's resident set idle and with many idle connections.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result};

use super::report;
use crate::args::Options;
use crate::client::Conn;

/// `memory --bus-pid PID`: reads VmRSS, opens `--conns` (10000)
/// authenticated connections (after `Hello`), waits `--settle-ms` (1000),
/// reads VmRSS again. Reports `idle_kib`, `loaded_kib` and
/// `bytes_per_conn`.
pub fn run(opts: &Options) -> Result<()> {
    let address = opts.required("address")?;
    let pid: u32 = opts.required("bus-pid")?.parse().context("bad --bus-pid")?;
    let conns = opts.number("conns", 10_000usize)?.max(1);
    let settle = Duration::from_millis(opts.number("settle-ms", 1000u64)?);
    opts.finish()?;
    let idle = vm_rss_kib(pid)?;
    let mut held: Vec<UnixStream> = Vec::with_capacity(conns);
    for i in 0..conns {
        let conn = Conn::bus(address).with_context(|| format!("connection {i} of {conns}"))?;
        held.push(conn.stream); // keep the socket, drop the 64 KiB buffer
    }
    std::thread::sleep(settle);
    let loaded = vm_rss_kib(pid)?;
    report("idle_kib", idle as f64);
    report("loaded_kib", loaded as f64);
    report(
        "bytes_per_conn",
        (loaded.saturating_sub(idle) * 1024) as f64 / conns as f64,
    );
    Ok(())
}

/// The `VmRSS` line of `/proc/PID/status`, in KiB.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\tdbus-daemon\nVmPeak:\t  9000 kB\nVmRSS:\t    4321 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(4321));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }
}
