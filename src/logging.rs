//! Where log lines go: standard error, the system log, or both, as dbus-daemon decides it:
//! `--nosyslog` (standard error), `--syslog` (both), `--syslog-only`, and without a flag the
//! configuration's `<syslog/>` (both) or standard error alone.
//!
//! Logging starts on standard error, so that what happens while the configuration is read is
//! not lost; `direct` then turns to the system log once the configuration says so.

use std::io::{self, IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{Level, Metadata, warn};
use tracing_subscriber::fmt::MakeWriter;

use crate::cli::LogTarget;

/// The system log's socket; `BROKER_SYSLOG_SOCKET` names another (a container's relay, a test).
const SYSLOG_SOCKET: &str = "/dev/log";

/// The system log, once `direct` has connected to it.
static SYSLOG: OnceLock<UnixDatagram> = OnceLock::new();
/// Whether lines go to standard error too.
static STDERR: AtomicBool = AtomicBool::new(true);

/// Starts logging to standard error, at the level `BROKER_LOG` asks for (`info` by default).
pub fn init() {
    tracing_subscriber::fmt()
        .with_writer(Sink)
        .with_ansi(io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BROKER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// Sends log lines where the command line, or else the configuration (`<syslog/>`), says. A
/// system log that cannot be reached leaves logging on standard error, with a warning.
pub fn direct(target: LogTarget, config_syslog: bool) {
    let (syslog, stderr) = match target {
        LogTarget::Stderr => (false, true),
        LogTarget::Syslog => (true, true),
        LogTarget::SyslogOnly => (true, false),
        LogTarget::Config => (config_syslog, true),
    };
    if !syslog {
        return;
    }
    let path = std::env::var_os("BROKER_SYSLOG_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| SYSLOG_SOCKET.into());
    // Non-blocking: a system log that does not keep up loses lines rather than stall the bus.
    let connected = UnixDatagram::unbound().and_then(|socket| {
        socket.connect(&path)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    });
    match connected {
        Ok(socket) => {
            let _ = SYSLOG.set(socket);
            STDERR.store(stderr, Ordering::Relaxed);
        }
        Err(e) => warn!(
            "cannot reach the system log at {}: {e}; logging to standard error",
            path.display()
        ),
    }
}

/// Hands the formatter a writer for each line.
struct Sink;

/// Writes one formatted line (the formatter writes each line whole, in one call).
struct LineWriter {
    /// syslog's priority of the line.
    priority: u8,
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            priority: 3 * 8 + 6,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        let severity = match *meta.level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        LineWriter {
            priority: 3 * 8 + severity,
        }
    }
}

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if let Some(syslog) = SYSLOG.get() {
            let text = String::from_utf8_lossy(line);
            let entry = format!(
                "<{}>broker[{}]: {}",
                self.priority,
                std::process::id(),
                text.trim_end()
            );
            // A full or vanished system log must not stop the bus: the line is dropped.
            let _ = syslog.send(entry.as_bytes());
        }
        if STDERR.load(Ordering::Relaxed) {
            io::stderr().write_all(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}
