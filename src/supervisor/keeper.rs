//! The keeper: one process per started service instance, between the spawner and the service.
//!
//! The spawner forks it (no exec). It is a child subreaper with a process group of its own, so
//! every process its service ever starts (children, a daemon that double-forked and called
//! `setsid`, orphans of orphans) stays below it, and `waitpid` reaches every orphan. That makes
//! the bookkeeping exact without cgroups: the service's processes are the keeper's
//! descendants, and when `waitpid` answers `ECHILD` none is left, so the keeper exits and the
//! bus reads EOF on its control socket.
//!
//! The keeper is single-threaded and synchronous: it waits in `poll` on the control socket and
//! a signalfd (SIGCHLD and SIGTERM blocked). Stopping (a [`KeeperCommand::Stop`], the bus gone,
//! or SIGTERM) sends SIGTERM and SIGCONT to every living descendant, and to each one found by a
//! rescan every [`POLL`], until none is alive or the grace passes; then SIGKILL to every
//! descendant found, rescanning until `ECHILD` (a process with SIGKILL pending cannot finish a
//! `fork`, so the chase ends).
//!
//! The keeper has no log of its own: its stderr is the service's output. What the bus must
//! know travels over the control socket as [`KeeperReport`]s.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{MsgFlags, recv, send};

use super::ExitKind;
use super::protocol::{ExecSpec, KeeperCommand, KeeperReport};
use super::stop::{alive, signal};
use super::tree::{self, Descendant};

/// How often the keeper rescans its tree while it stops the service.
const POLL: Duration = Duration::from_millis(20);

/// Runs a keeper in the freshly forked child of the spawner; never returns. `control` is the
/// keeper's end of its control socket, `output` the pipes that become the service's stdout and
/// stderr. The caller has already closed the spawner's own descriptors.
pub fn run(control: OwnedFd, output: [OwnedFd; 2], exec: &ExecSpec, grace: Duration) -> ! {
    let code = match Keeper::new(control, output, grace) {
        Ok(mut keeper) => keeper.serve(exec),
        Err(_) => 1,
    };
    std::process::exit(code)
}

struct Keeper {
    control: OwnedFd,
    /// False once the bus's end is gone: nothing more to read or report.
    control_open: bool,
    signals: SignalFd,
    grace: Duration,
    main: u32,
    stop: Option<Stopping>,
}

/// A stop in progress.
struct Stopping {
    kill_at: Instant,
    terminated: HashSet<u32>,
}

impl Keeper {
    /// Sets the process up: own group, subreaper, stdio, signals.
    fn new(control: OwnedFd, output: [OwnedFd; 2], grace: Duration) -> io::Result<Keeper> {
        nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
        super::become_subreaper()?;
        redirect_stdio(&output)?;
        drop(output);
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGINT);
        mask.thread_block()?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        Ok(Keeper {
            control,
            control_open: true,
            signals,
            grace,
            main: 0,
            stop: None,
        })
    }

    /// Spawns the main process and keeps the instance until nothing of it is left; the exit
    /// status of the keeper.
    fn serve(&mut self, exec: &ExecSpec) -> i32 {
        match spawn_main(exec) {
            Ok(pid) => {
                self.main = pid;
                self.report(KeeperReport::Spawned { pid });
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                self.report(KeeperReport::ExecFailed { errno });
                return 1;
            }
        }
        loop {
            if self.reap_all() {
                return 0;
            }
            if let Some(stopping) = &mut self.stop {
                step_stop(stopping);
            }
            if self.wait().is_err() {
                // Without poll the keeper cannot watch anything: it stops what it keeps, at
                // the pace of a stop's rescans.
                self.begin_stop();
                std::thread::sleep(POLL);
            }
        }
    }

    /// Waits for a signal, a message or the next stop step; acts on what arrived.
    fn wait(&mut self) -> io::Result<()> {
        let timeout = if self.stop.is_some() {
            PollTimeout::try_from(POLL).unwrap_or(PollTimeout::MAX)
        } else {
            PollTimeout::NONE
        };
        let (control_ready, signal_ready) = {
            let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            if self.control_open {
                fds.push(PollFd::new(self.control.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            (
                fds.get(1).is_some_and(ready),
                fds.first().is_some_and(ready),
            )
        };
        if signal_ready {
            self.read_signals();
        }
        if control_ready {
            self.read_control();
        }
        Ok(())
    }

    /// Drains the signalfd: SIGTERM or SIGINT starts a stop; SIGCHLD needs nothing more, the
    /// loop reaps anyway.
    fn read_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
            if signo == libc::SIGTERM || signo == libc::SIGINT {
                self.begin_stop();
            }
        }
    }

    /// Reads one command; EOF or an error means the bus is gone, and the service goes too. A
    /// read interrupted or woken for nothing is not an error: the next poll tries again.
    fn read_control(&mut self) {
        let mut buf = [0u8; 64];
        match recv(self.control.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Ok(0) | Err(_) => {
                self.control_open = false;
                self.begin_stop();
            }
            Ok(n) => match KeeperCommand::decode(buf.get(..n).unwrap_or_default()) {
                Ok(KeeperCommand::Stop) => self.begin_stop(),
                // A malformed command is a bug in the bus; stopping is the safe reading.
                Err(_) => self.begin_stop(),
            },
        }
    }

    fn begin_stop(&mut self) {
        if self.stop.is_none() {
            self.stop = Some(Stopping {
                kill_at: Instant::now() + self.grace,
                terminated: HashSet::new(),
            });
        }
    }

    /// Reaps every ended child and reports each; whether none is left (`ECHILD`).
    fn reap_all(&mut self) -> bool {
        loop {
            let mut status = 0;
            // SAFETY: waitpid only writes the status integer we pass.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    Errno::ECHILD => return true,
                    _ => return false,
                }
            }
            let Ok(pid) = u32::try_from(pid) else {
                return false;
            };
            if pid == 0 {
                return false;
            }
            if let Some(status) = exit_kind(status) {
                self.report(KeeperReport::Exited { pid, status });
            }
        }
    }

    /// Sends `report` to the bus; a bus that is gone makes the keeper stop its service. The
    /// send never blocks: a bus too busy to read loses a report rather than a keeper that stops
    /// reaping and stopping.
    fn report(&mut self, report: KeeperReport) {
        if !self.control_open {
            return;
        }
        let data = report.encode();
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        match send(self.control.as_raw_fd(), &data, flags) {
            Ok(_) | Err(Errno::EAGAIN) => {}
            Err(_) => {
                self.control_open = false;
                self.begin_stop();
            }
        }
    }
}

/// One step of a stop: SIGTERM (and SIGCONT) to each living descendant not yet signalled, or
/// after the grace, SIGKILL to every living one.
fn step_stop(stopping: &mut Stopping) {
    let found = scan();
    if Instant::now() >= stopping.kill_at {
        for process in alive(&found) {
            signal(process, Signal::SIGKILL);
        }
        return;
    }
    for process in alive(&found) {
        if !stopping.terminated.contains(&process.pid)
            && signal(process, Signal::SIGTERM)
            && signal(process, Signal::SIGCONT)
        {
            stopping.terminated.insert(process.pid);
        }
    }
}

/// The keeper's descendants; none when `/proc` cannot be read (the grace's end still kills
/// what `waitpid` later finds only through its exit, so nothing is left forever).
fn scan() -> Vec<Descendant> {
    tree::descendants_of(std::process::id()).unwrap_or_default()
}

/// Decodes a `waitpid` status; `None` for a stop or continue (ptraced children only).
pub(super) fn exit_kind(status: i32) -> Option<ExitKind> {
    if libc::WIFEXITED(status) {
        Some(ExitKind::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(ExitKind::Signaled(
            libc::WTERMSIG(status),
            libc::WCOREDUMP(status),
        ))
    } else {
        None
    }
}

/// stdin from `/dev/null`, stdout and stderr into the two pipes; the service inherits them.
fn redirect_stdio([stdout, stderr]: &[OwnedFd; 2]) -> io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    dup_onto(null.as_fd(), libc::STDIN_FILENO)?;
    dup_onto(stdout.as_fd(), libc::STDOUT_FILENO)?;
    dup_onto(stderr.as_fd(), libc::STDERR_FILENO)?;
    Ok(())
}

fn dup_onto(fd: BorrowedFd<'_>, target: i32) -> io::Result<()> {
    // SAFETY: dup2 onto one of the three standard descriptors, which this process owns.
    if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts the main process; its pid, or the error of fork, chdir or exec. std's `Command`
/// does not reset the signal mask, so the child unblocks what the keeper blocked itself: a
/// service with SIGTERM blocked could never be stopped but by SIGKILL.
fn spawn_main(exec: &ExecSpec) -> io::Result<u32> {
    let Some((program, args)) = exec.argv.split_first() else {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    };
    let mut command = Command::new(without_path_search(program));
    command
        .arg0(program)
        .args(args)
        .env_clear()
        .envs(exec.env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if let Some(dir) = &exec.working_directory {
        command.current_dir(dir);
    }
    let user = exec.user.clone();
    // SAFETY: pthread_sigmask and the set*id calls of `switch_to` are async-signal-safe and
    // allocate nothing; they run between fork and exec. The user is switched last, just
    // before exec, so the keeper itself stays root and can signal every process of the
    // service, whatever user it runs as.
    unsafe {
        command.pre_exec(move || {
            SigSet::empty().thread_set_mask()?;
            if let Some(user) = &user {
                user.switch_to()?;
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    // Dropping a `Child` neither waits for nor kills it; the keeper's reaping collects it.
    Ok(child.id())
}

/// `std::process::Command` searches PATH for a program without a `/`; naming it `./program`
/// executes it as given instead.
pub(super) fn without_path_search(program: &str) -> PathBuf {
    if program.contains('/') {
        PathBuf::from(program)
    } else {
        Path::new(".").join(program)
    }
}
