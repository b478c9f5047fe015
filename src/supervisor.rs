//! Spawning services and reaping every child process, the broker's own and
//! the daemons re-parented to it.
//!
//! The broker is a child subreaper ([`become_subreaper`]), so a service that
//! double-forks lands under the broker instead of init. One reaper task (see
//! [`Supervisor::start`]) owns `waitpid` for the whole process: it wakes on
//! `SIGCHLD`, reaps until nothing is left, logs each process and reports it as
//! a [`ProcessEvent`]. Nothing else may wait for children: no
//! `tokio::process`, no `std::process::Child::wait` (both would steal
//! statuses from the reaper, or the reaper from them).
//!
//! Every service is started in a process group of its own (its pid is the
//! group id). A Ctrl-C, Ctrl-\ or Ctrl-Z typed at the broker's terminal then
//! reaches the broker alone, and the broker stays the one place that decides
//! when services stop (it can signal a service and its helpers with
//! `killpg(pid, ..)`), instead of every service receiving the terminal's
//! signal at the same moment the broker starts shutting them down.
//!
//! Everything here runs on the bus's single-threaded runtime; [`Supervisor`]
//! is deliberately not `Send`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::libc;
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader, Interest};
use tokio::net::unix::pipe;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Marks this process a child subreaper (`PR_SET_CHILD_SUBREAPER`), so
/// orphaned descendants are re-parented to it rather than to init.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

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

/// What to execute.
#[derive(Debug, Clone, Default)]
pub struct SpawnSpec {
    /// The program and its arguments. The program is executed as given,
    /// without a PATH search: a name without `/` is relative to the working
    /// directory, as `execv` would take it.
    pub argv: Vec<String>,
    /// The complete environment of the new process; nothing is inherited.
    pub env: Vec<(OsString, OsString)>,
    /// Where to start it; the broker's own directory if `None`.
    pub working_directory: Option<PathBuf>,
}

/// The process could not be started. `source` is the OS error of `fork`,
/// `chdir` or `exec` (which the child reports through a close-on-exec pipe),
/// the one `Spawn.ExecFailed` carries.
#[derive(Debug)]
pub struct SpawnError {
    pub program: String,
    pub source: io::Error,
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "failed to execute program {}: {}",
            self.program, self.source
        )
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Starts service processes and remembers which pid belongs to which
/// service, so the reaper can name them.
pub struct Supervisor {
    services: Rc<RefCell<HashMap<u32, Rc<str>>>>,
}

impl Supervisor {
    /// Starts the process's one reaper and returns the supervisor and the
    /// stream of reaped processes.
    ///
    /// Must be called inside a tokio `LocalSet` on a runtime with I/O
    /// enabled (it uses `spawn_local`, which panics elsewhere). Fails if
    /// another reaper is still running in this process, or if the `SIGCHLD`
    /// handler cannot be installed. The reaper stops when the runtime does.
    pub fn start() -> io::Result<(Supervisor, mpsc::UnboundedReceiver<ProcessEvent>)> {
        let guard = ReaperGuard::acquire()?;
        // Listen before the first reap: a child that exits between the two
        // still raises a SIGCHLD that this stream will deliver.
        let sigchld = signal(SignalKind::child())?;
        let (events, receiver) = mpsc::unbounded_channel();
        let services = Rc::default();
        tokio::task::spawn_local(reap_forever(sigchld, Rc::clone(&services), events, guard));
        Ok((Supervisor { services }, receiver))
    }

    /// Starts `spec` for `service` and returns its pid.
    ///
    /// stdin is `/dev/null`; each line of stdout and stderr is logged at
    /// `info` with the service name and pid. The process is never waited
    /// for here: its end arrives as a [`ProcessEvent`]. An exec that fails
    /// is reported here only, with no event.
    pub fn spawn(&self, service: &str, spec: &SpawnSpec) -> Result<u32, SpawnError> {
        let Some((program, args)) = spec.argv.split_first() else {
            return Err(SpawnError {
                program: String::new(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "empty argv"),
            });
        };
        let mut command = Command::new(without_path_search(program));
        command
            .arg0(program)
            .args(args)
            .env_clear()
            .envs(spec.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(dir) = &spec.working_directory {
            command.current_dir(dir);
        }
        let mut child = command.spawn().map_err(|source| SpawnError {
            program: program.clone(),
            source,
        })?;
        let pid = child.id();
        let service: Rc<str> = Rc::from(service);
        // Recorded before we next yield, so the reaper always knows the name.
        self.services.borrow_mut().insert(pid, Rc::clone(&service));
        info!(service = %service, pid, argv = ?spec.argv, "service process started");
        if let Some(stdout) = child.stdout.take() {
            forward_output(stdout.into(), &service, pid, "stdout");
        }
        if let Some(stderr) = child.stderr.take() {
            forward_output(stderr.into(), &service, pid, "stderr");
        }
        // Dropping a `Child` neither waits for nor kills it; the reaper
        // collects its status.
        drop(child);
        Ok(pid)
    }
}

/// The direct children of this process not yet reaped, found by scanning
/// `/proc/*/stat` for our pid as parent. Activation uses it to tell whether a
/// service that daemonized still has processes. Zombies count: one that forked
/// and exited during the scan may have a child the listing missed, and its
/// reap, still to come, triggers another look.
pub fn children() -> io::Result<Vec<u32>> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        // A process may vanish between the listing and the read: skip it.
        if parent_of(pid) == Some(me) {
            found.push(pid);
        }
    }
    Ok(found)
}

/// The parent of `pid` unless it is already gone, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let after_comm = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = after_comm.split_whitespace();
    let state = fields.next()?;
    let parent = fields.next()?.parse().ok()?;
    (state != "X").then_some(parent)
}

/// The pidfd of the process at the other end of a Unix socket, as of its
/// `connect()` (`SO_PEERPIDFD`, Linux 6.5+). `None` where the kernel does
/// not offer it or the peer is already gone.
pub fn peer_pidfd(socket: BorrowedFd<'_>) -> Option<OwnedFd> {
    nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::PeerPidfd)
        .inspect_err(|err| debug!(error = %err, "no pidfd for the socket's peer"))
        .ok()
}

/// A pidfd for `pid` (`pidfd_open`, Linux 5.3+). It keeps naming that one
/// process even after its pid number is reused.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Resolves once the process behind `pidfd` has exited (a pidfd polls
/// readable then), whether or not it is our child.
///
/// Registers the fd with the runtime for the duration of the call, so two
/// concurrent waits on the same pidfd fail (`EEXIST`); dup it for that.
pub async fn wait_exit(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: the `AsyncFd` holds a `BorrowedFd` of `pidfd`, so the fd stays
    // open and unchanged for as long as it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(pidfd.as_fd(), Interest::READABLE) }?;
    // Readiness is never cleared: an exited process stays readable.
    fd.readable().await?.retain_ready();
    Ok(())
}

// ---------------------------------------------------------------------------
// The reaper.

/// Set while a reaper runs: two `waitpid(-1)` loops would steal each other's
/// statuses.
static REAPER_RUNNING: AtomicBool = AtomicBool::new(false);

/// Holds [`REAPER_RUNNING`]; owned by the reaper task, released when that
/// task ends or is dropped with its runtime.
struct ReaperGuard;

impl ReaperGuard {
    fn acquire() -> io::Result<ReaperGuard> {
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

async fn reap_forever(
    mut sigchld: tokio::signal::unix::Signal,
    services: Rc<RefCell<HashMap<u32, Rc<str>>>>,
    events: mpsc::UnboundedSender<ProcessEvent>,
    _guard: ReaperGuard,
) {
    loop {
        // Signals coalesce, so each wake-up reaps until nothing is left.
        while let Some(event) = reap_one() {
            let service = services.borrow_mut().remove(&event.pid);
            match service {
                Some(service) => {
                    info!(service = %service, pid = event.pid, status = %event.status, "service process ended")
                }
                None => info!(pid = event.pid, status = %event.status, "adopted process ended"),
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

// ---------------------------------------------------------------------------
// Service output.

/// Longest line logged as one; longer ones are split, so a service that
/// never writes a newline cannot grow the broker's memory.
const MAX_LINE: u64 = 16 * 1024;

/// `std::process::Command` searches PATH for a program without a `/`;
/// naming it `./program` executes it as given instead.
fn without_path_search(program: &str) -> PathBuf {
    if program.contains('/') {
        PathBuf::from(program)
    } else {
        Path::new(".").join(program)
    }
}

fn forward_output(fd: OwnedFd, service: &Rc<str>, pid: u32, stream: &'static str) {
    match pipe::Receiver::from_owned_fd(fd) {
        Ok(receiver) => {
            tokio::task::spawn_local(log_lines(receiver, Rc::clone(service), pid, stream));
        }
        Err(err) => {
            warn!(service = %service, pid, stream, error = %err, "cannot read the service's output")
        }
    }
}

async fn log_lines(
    output: impl AsyncRead + Unpin,
    service: Rc<str>,
    pid: u32,
    stream: &'static str,
) {
    let mut reader = BufReader::new(output);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) => return,
            Ok(_) => {
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                let text = String::from_utf8_lossy(text.strip_suffix(b"\r").unwrap_or(text));
                info!(service = %service, pid, stream, "{text}");
            }
            Err(err) => {
                debug!(service = %service, pid, stream, error = %err, "service output closed");
                return;
            }
        }
    }
}
