//! A service that leaves a child behind when it dies, for trying what the broker does with the
//! processes a service leaves: at start it forks a helper that only waits, then owns
//! `org.broker.Leftover` (or the name given with `--name NAME`) and serves interface
//! `org.broker.Leftover` at `/org/broker/Leftover`:
//!
//! - `Pid() -> u32` is this process's pid;
//! - `HelperPid() -> u32` is the helper's;
//! - `Quit()` replies, then the service exits with status 0 and leaves the helper behind (its
//!   keeper, a subreaper, adopts it; the broker stops it after the grace period unless the
//!   activation file says `leftovers = "keep"`).
//!
//! It also exits with status 0, leaving the helper, when the bus closes its connection. With
//! `--ignore-term` the helper ignores SIGTERM, as a stubborn leftover does: only SIGKILL ends
//! it. When the broker stops, it stops the helper too (see `--stop-grace-ms`).

mod common;

use std::process::ExitCode;

use common::Quit;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{ForkResult, Pid, fork, pause};

const PROGRAM: &str = "leftover_service";

struct Leftover {
    helper: Pid,
    quit: Quit,
}

#[zbus::interface(name = "org.broker.Leftover")]
impl Leftover {
    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn helper_pid(&self) -> u32 {
        self.helper.as_raw().unsigned_abs()
    }

    fn quit(&self) {
        self.quit.request();
    }
}

/// Forks the helper, which waits for signals until one ends it; returns its pid.
///
/// Must run before any thread exists (no tokio runtime yet): after `fork` only the calling
/// thread survives in the child.
fn fork_helper(ignore_term: bool) -> Result<Pid, String> {
    // SAFETY: the process is single-threaded here, and the child only calls the
    // async-signal-safe `signal` and `pause` before it ends.
    match unsafe { fork() }.map_err(|err| format!("fork failed: {err}"))? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            if ignore_term {
                // SAFETY: SIG_IGN installs no handler code.
                let _ = unsafe { signal(Signal::SIGTERM, SigHandler::SigIgn) };
            }
            loop {
                pause();
            }
        }
    }
}

fn main() -> ExitCode {
    common::announce(PROGRAM);
    let mut ignore_term = false;
    let name = common::parse_args("org.broker.Leftover", |arg, _| {
        let ours = arg == "--ignore-term";
        ignore_term |= ours;
        Ok(ours)
    });
    let name = match name {
        Ok(name) => name,
        Err(err) => return common::fail(PROGRAM, &err),
    };
    let helper = match fork_helper(ignore_term) {
        Ok(helper) => helper,
        Err(err) => return common::fail(PROGRAM, &err),
    };
    println!("{PROGRAM}: helper started as pid {helper}");
    common::run(PROGRAM, async {
        let quit = Quit::default();
        let leftover = Leftover {
            helper,
            quit: quit.clone(),
        };
        common::serve(PROGRAM, &name, "/org/broker/Leftover", leftover, quit).await
    })
}
