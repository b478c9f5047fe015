//! A service that daemonizes the classic way before it takes its name, for
//! trying activation of such services: the started process forks, the child
//! calls `setsid` and forks again, and both parents exit with status 0. Only
//! the grandchild (the daemon) connects to the bus. It owns
//! `org.broker.Daemon` (or the name given with `--name NAME`) and serves
//! interface `org.broker.Daemon` at `/org/broker/Daemon`:
//!
//! - `Pid() -> u32` is the daemon's pid, not the one the broker started;
//! - `Ppid() -> u32` is the daemon's parent pid: a subreaper broker adopts
//!   the daemon once its parents exit, so this is the broker's pid;
//! - `Quit()` replies, then the daemon exits with status 0.
//!
//! Unlike a textbook daemon it keeps its stdout, stderr and working
//! directory, so its output still reaches the broker's log.
//!
//! Options for testing failed starts:
//! - `--exit-code N`: the started process exits at once with status N;
//! - `--die-before-name`: daemonizes, then the daemon exits with status 1
//!   without connecting to the bus.

mod common;

use std::process::ExitCode;

use common::Quit;
use nix::unistd::{ForkResult, fork, getppid, setsid};

const PROGRAM: &str = "daemon_service";

struct Daemon {
    quit: Quit,
}

#[zbus::interface(name = "org.broker.Daemon")]
impl Daemon {
    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn ppid(&self) -> u32 {
        getppid().as_raw().unsigned_abs()
    }

    fn quit(&self) {
        self.quit.request();
    }
}

/// What the command line asks for besides the name.
#[derive(Default)]
struct Options {
    exit_code: Option<u8>,
    die_before_name: bool,
}

impl Options {
    /// Takes one of our own arguments; `Ok(false)` if `arg` is not one.
    fn take(&mut self, arg: &str, rest: &mut dyn Iterator<Item = String>) -> Result<bool, String> {
        match arg {
            "--die-before-name" => self.die_before_name = true,
            "--exit-code" => {
                let value = rest.next().ok_or("--exit-code needs a value")?;
                let code = value
                    .parse()
                    .map_err(|err| format!("bad --exit-code {value:?}: {err}"))?;
                self.exit_code = Some(code);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Which process of the double fork we are.
enum Role {
    /// One of the two parents, which exit at once.
    Parent,
    /// The grandchild, in a new session, adopted by the nearest subreaper.
    Daemon,
}

/// Forks, calls `setsid` in the child and forks again.
///
/// Must run before any thread exists (no tokio runtime yet): after `fork`
/// only the calling thread survives in the child.
fn daemonize() -> Result<Role, String> {
    // SAFETY: the process is single-threaded here, so the child can safely
    // run arbitrary code, including allocating and starting threads.
    if let ForkResult::Parent { .. } =
        unsafe { fork() }.map_err(|err| format!("first fork failed: {err}"))?
    {
        return Ok(Role::Parent);
    }
    setsid().map_err(|err| format!("setsid failed: {err}"))?;
    // SAFETY: as above; the child of the first fork is single-threaded too.
    match unsafe { fork() }.map_err(|err| format!("second fork failed: {err}"))? {
        ForkResult::Parent { .. } => Ok(Role::Parent),
        ForkResult::Child => Ok(Role::Daemon),
    }
}

fn main() -> ExitCode {
    common::announce(PROGRAM);
    let mut options = Options::default();
    let name = match common::parse_args("org.broker.Daemon", |arg, rest| options.take(arg, rest)) {
        Ok(name) => name,
        Err(err) => return common::fail(PROGRAM, &err),
    };
    if let Some(code) = options.exit_code {
        println!("{PROGRAM}: exiting with status {code} as asked");
        return ExitCode::from(code);
    }
    match daemonize() {
        Ok(Role::Parent) => return ExitCode::SUCCESS,
        Ok(Role::Daemon) => println!("{PROGRAM}: daemonized as pid {}", std::process::id()),
        Err(err) => return common::fail(PROGRAM, &err),
    }
    if options.die_before_name {
        println!("{PROGRAM}: exiting without taking {name} as asked");
        return ExitCode::FAILURE;
    }
    common::run(PROGRAM, async {
        let quit = Quit::default();
        let daemon = Daemon { quit: quit.clone() };
        common::serve(PROGRAM, &name, "/org/broker/Daemon", daemon, quit).await
    })
}
