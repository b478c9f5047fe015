//! The reaper: the one task that owns `waitpid` for the whole process. It wakes on `SIGCHLD`,
//! reaps until nothing is left, logs each process (a service's, or one adopted as subreaper) and
//! reports it as a [`ProcessEvent`].

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::libc;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It exited with this status.
    Exited(i32),
    /// It was killed by this signal number; `true` if it dumped core.
    Signaled(i32, bool),
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitKind::Exited(code) => write!(f, "exited with status {code}"),
            ExitKind::Signaled(signal, core) => {
                write!(f, "killed by signal {signal}")?;
                if let Ok(name) = Signal::try_from(signal) {
                    write!(f, " ({name})")?;
                }
                if core {
                    write!(f, ", core dumped")?;
                }
                Ok(())
            }
        }
    }
}

/// A reaped process: one the supervisor spawned or one re-parented to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessEvent {
    pub pid: u32,
    pub status: ExitKind,
}

/// Set while a reaper runs: two `waitpid(-1)` loops would steal each other's
/// statuses.
static REAPER_RUNNING: AtomicBool = AtomicBool::new(false);

/// Holds [`REAPER_RUNNING`]; owned by the reaper task, released when that
/// task ends or is dropped with its runtime.
pub(super) struct ReaperGuard;

impl ReaperGuard {
    pub(super) fn acquire() -> io::Result<ReaperGuard> {
        if REAPER_RUNNING.swap(true, Ordering::SeqCst) {
            return Err(io::Error::other(
                "a reaper is already running in this process",
            ));
        }
        Ok(ReaperGuard)
    }
}

impl Drop for ReaperGuard {
    fn drop(&mut self) {
        REAPER_RUNNING.store(false, Ordering::SeqCst);
    }
}

pub(super) async fn reap_forever(
    mut sigchld: tokio::signal::unix::Signal,
    events: mpsc::UnboundedSender<ProcessEvent>,
    _guard: ReaperGuard,
) {
    loop {
        // Signals coalesce, so each wake-up reaps until nothing is left.
        while let Some(event) = reap_one() {
            // Services end below their keepers, which report them; the spawner ends with the
            // bus. What else ends here was adopted (or is `broker run`'s command).
            if event.pid == super::stop::SPAWNER.load(Ordering::Relaxed) {
                debug!(pid = event.pid, status = %event.status, "the spawner ended");
            } else {
                info!(pid = event.pid, status = %event.status, "adopted process ended");
            }
            // Nobody listening is no reason to stop reaping.
            let _ = events.send(event);
        }
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

/// Reaps one ended child without blocking; `None` when none is left to reap.
///
/// Uses `waitpid` directly: nix's decoding fails on real-time signals,
/// which would lose the pid of a process already reaped.
fn reap_one() -> Option<ProcessEvent> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid only writes the status integer we pass.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => {}
                _ => warn!(error = %err, "waitpid failed"),
            }
            return None;
        }
        let pid = u32::try_from(pid).ok().filter(|&pid| pid != 0)?;
        let status = if libc::WIFEXITED(status) {
            ExitKind::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            ExitKind::Signaled(libc::WTERMSIG(status), libc::WCOREDUMP(status))
        } else {
            // Stopped or continued (only seen for ptraced children): not an end.
            continue;
        };
        return Some(ProcessEvent { pid, status });
    }
}
