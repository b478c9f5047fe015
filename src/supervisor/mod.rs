//! Spawning services and reaping every child process, the broker's own and
//! the daemons re-parented to it.
//!
//! The bus starts each service through its spawner ([`spawner`], exec'd once as
//! `broker __spawner`), which forks a keeper per start (`keeper`): `bus -> spawner ->
//! keeper -> service`. A keeper is a child subreaper in a process group of its own, so every
//! process a start leads to, a daemon that double-forked and called `setsid` included, stays
//! below it; its reports ([`protocol::KeeperReport`]) tell the bus which processes ended, and
//! the end of its control socket that nothing of the start is left. The bus finds a service's
//! processes below its keepers, and stops them by asking the keepers (SIGTERM, SIGKILL after
//! the grace). Since a service is not in the bus's process group, a Ctrl-C, Ctrl-\ or Ctrl-Z
//! typed at the broker's terminal reaches the broker alone, which decides when services stop.
//!
//! The broker itself is a child subreaper too ([`become_subreaper`]), and one reaper task (see
//! [`Supervisor::start`]) owns `waitpid` for the bus's process: it wakes on `SIGCHLD`, reaps
//! until nothing is left, logs each process and reports it as a [`ProcessEvent`]; keepers'
//! reports join that stream. Nothing else in the bus may wait for children: no
//! `tokio::process`, no `std::process::Child::wait` (both would steal statuses from the
//! reaper, or the reaper from them). There is one way to start a service: through the spawner, which
//! [`Supervisor::start_spawner`] (or, on a system bus, [`SystemSpawner::start`]) starts.
//!
//! Everything here runs on the bus's single-threaded runtime; [`Supervisor`]
//! is deliberately not `Send`.

mod instances;
mod keeper;
pub mod protocol;
mod reaper;
pub mod spawner;
mod stop;
pub mod system;
mod tree;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader, Interest};
use tokio::net::unix::pipe;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

pub use instances::InstanceGone;
pub use reaper::{ExitKind, ProcessEvent};
use reaper::{ReaperGuard, reap_forever};
pub use stop::{DEFAULT_STOP_GRACE, stop_all};
pub use tree::{Descendant, descendants, descendants_of};

/// Marks this process a child subreaper (`PR_SET_CHILD_SUBREAPER`), so
/// orphaned descendants are re-parented to it rather than to init.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
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
    /// A system spawner's refusal of the service (its file, its user): the D-Bus error the
    /// waiting callers get instead of `Spawn.ExecFailed`.
    pub refused: Option<crate::bus::error::BusError>,
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(refused) = &self.refused {
            return write!(f, "{}: {}", refused.name(), refused.text());
        }
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

/// How many tasks still read a service's output or a keeper's reports.
static READERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one reader in [`READERS`] for as long as it lives.
struct Reader;

impl Reader {
    fn new() -> Reader {
        READERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Reader
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        READERS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// At the bus's stop, once every process has ended: waits (at most `limit`) until what the
/// services wrote and what their keepers reported last has been read and logged. Every write
/// end is closed by then, so each reader soon reaches its end.
pub async fn drain_readers(limit: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while READERS.load(std::sync::atomic::Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// How many lines of each service's output are kept in memory, for `GetOutput`.
pub const OUTPUT_LINES: usize = 1000;

/// The last [`OUTPUT_LINES`] lines of each service's stdout and stderr, together in arrival
/// order, by service name. Shared between the tasks that read the services' output and the
/// driver that reads it back; everything runs on the bus's one thread.
pub type OutputLog = Rc<RefCell<HashMap<Rc<str>, VecDeque<String>>>>;

/// Starts service processes and remembers which pid belongs to which
/// service, so the reaper can name them.
pub struct Supervisor {
    output: OutputLog,
    /// The reaper's stream, which keepers' reports of their processes' ends join.
    events: mpsc::UnboundedSender<ProcessEvent>,
    /// Set once the spawner runs: services then start through keepers.
    keepers: Option<instances::Keepers>,
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
        let reaper_events = events.clone();
        tokio::task::spawn_local(reap_forever(sigchld, reaper_events, guard));
        let output = OutputLog::default();
        let supervisor = Supervisor {
            output,
            events,
            keepers: None,
        };
        Ok((supervisor, receiver))
    }

    /// Starts the spawner (`exe __spawner`): from then on each service start runs under a
    /// keeper of its own, which knows exactly which processes belong to it (see
    /// [`spawner`] and `keeper`). Returns the stream of instances that have ended entirely.
    /// Without a spawner no service can start.
    pub fn start_spawner(
        &mut self,
        exe: &Path,
    ) -> io::Result<mpsc::UnboundedReceiver<InstanceGone>> {
        let (keepers, gone) = instances::Keepers::start(exe, None)?;
        self.keepers = Some(keepers);
        Ok(gone)
    }

    /// Takes a spawner started earlier ([`SystemSpawner::start`]) as this supervisor's.
    pub fn adopt_spawner(
        &mut self,
        spawner: SystemSpawner,
    ) -> mpsc::UnboundedReceiver<InstanceGone> {
        self.keepers = Some(spawner.keepers);
        spawner.gone
    }

    /// Whether services start by name through a system spawner, which reads their files
    /// itself (so the bus must not ask for one whose file it would refuse).
    pub fn starts_by_name(&self) -> bool {
        self.keepers
            .as_ref()
            .is_some_and(instances::Keepers::by_name)
    }

    /// Lets the spawner go at the bus's stop: it stops its keepers, which stop their services
    /// within the grace, and exits. The bus needs this for a system spawner, which runs as
    /// root and whose services it may not signal itself.
    pub fn close_spawner(&self) {
        if let Some(keepers) = &self.keepers {
            keepers.close();
        }
    }

    /// The spawner's pid, if it runs.
    pub fn spawner_pid(&self) -> Option<u32> {
        self.keepers.as_ref().map(instances::Keepers::spawner_pid)
    }

    /// Asks every keeper of `service` to stop its processes (SIGTERM, SIGKILL after its grace).
    /// Returns how many were asked.
    pub fn stop(&self, service: &str) -> usize {
        self.keepers.as_ref().map_or(0, |k| k.stop(service))
    }

    /// The living processes of `service`'s instances, `main` first if alive; `None` when
    /// services do not run under keepers.
    pub fn processes_of(&self, service: &str, main: u32) -> Option<Vec<u32>> {
        self.keepers.as_ref().map(|k| k.processes_of(service, main))
    }

    /// Whether any process is left of the start whose main process was `main`; `None` when
    /// services do not run under keepers.
    pub fn instance_is_live(&self, main: u32) -> Option<bool> {
        self.keepers.as_ref().map(|k| k.is_live(main))
    }

    /// The keepers of `service`'s live instances, oldest first.
    pub fn keepers_of(&self, service: &str) -> Vec<u32> {
        self.keepers
            .as_ref()
            .map_or_else(Vec::new, |k| k.keepers_of(service))
    }

    /// The last `lines` lines of `service`'s output, oldest first.
    pub fn output_of(&self, service: &str, lines: usize) -> Vec<String> {
        let output = self.output.borrow();
        let Some(kept) = output.get(service) else {
            return Vec::new();
        };
        kept.iter()
            .skip(kept.len().saturating_sub(lines))
            .cloned()
            .collect()
    }

    /// Starts `spec` for `service` and returns its pid.
    ///
    /// stdin is `/dev/null`; each line of stdout and stderr is logged at
    /// `info` with the service name and pid. The process is never waited
    /// for here: its end arrives as a [`ProcessEvent`]. An exec that fails
    /// is reported here only, with no event.
    pub fn spawn(&self, service: &str, spec: &SpawnSpec) -> Result<u32, SpawnError> {
        self.spawn_with_grace(service, spec, DEFAULT_STOP_GRACE)
    }

    /// [`Supervisor::spawn`], where a keeper, if services run under keepers, gives the
    /// service's processes `grace` between SIGTERM and SIGKILL when it stops them.
    pub fn spawn_with_grace(
        &self,
        service: &str,
        spec: &SpawnSpec,
        grace: std::time::Duration,
    ) -> Result<u32, SpawnError> {
        if let Some(keepers) = &self.keepers {
            let started = keepers.spawn(service, spec, grace, &self.events)?;
            let service = Rc::from(service);
            forward_output(
                started.stdout,
                &service,
                started.main,
                "stdout",
                &self.output,
            );
            forward_output(
                started.stderr,
                &service,
                started.main,
                "stderr",
                &self.output,
            );
            return Ok(started.main);
        }
        Err(SpawnError {
            program: spec.argv.first().cloned().unwrap_or_default(),
            source: io::Error::other("no spawner runs: start it first (start_spawner)"),
            refused: None,
        })
    }
}

/// A system bus's spawner, started as root before the bus drops its privileges (see
/// [`spawner::SystemConfig`]) and handed to the bus's [`Supervisor`] later
/// ([`Supervisor::adopt_spawner`]).
pub struct SystemSpawner {
    keepers: instances::Keepers,
    gone: mpsc::UnboundedReceiver<InstanceGone>,
}

impl SystemSpawner {
    /// Execs `exe __spawner --system ...` with `config`. From then on the bus's shutdown
    /// leaves the spawner's processes to it ([`stop_all`] waits for it instead).
    pub fn start(exe: &Path, config: &spawner::SystemConfig) -> io::Result<SystemSpawner> {
        let (keepers, gone) = instances::Keepers::start(exe, Some(config))?;
        stop::SPAWNER_STOPS_ITS_OWN.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(SystemSpawner { keepers, gone })
    }
}

/// The pidfd of the process at the other end of a Unix socket, as of its
/// `connect()` (`SO_PEERPIDFD`, Linux 6.5+). `None` where the kernel does
/// not offer it or the peer is already gone.
pub fn peer_pidfd(socket: BorrowedFd<'_>) -> Option<OwnedFd> {
    nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::PeerPidfd)
        .inspect_err(|err| debug!(error = %err, "no pidfd for the socket's peer"))
        .ok()
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
// Service output.

/// Longest line logged as one; longer ones are split, so a service that
/// never writes a newline cannot grow the broker's memory.
const MAX_LINE: u64 = 16 * 1024;

fn forward_output(
    fd: OwnedFd,
    service: &Rc<str>,
    pid: u32,
    stream: &'static str,
    output: &OutputLog,
) {
    match pipe::Receiver::from_owned_fd(fd) {
        Ok(receiver) => {
            let kept = Rc::clone(output);
            let service = Rc::clone(service);
            let reader = Reader::new();
            tokio::task::spawn_local(async move {
                log_lines(receiver, service, pid, stream, kept).await;
                drop(reader);
            });
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
    kept: OutputLog,
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
                keep_line(&kept, &service, text.into_owned());
            }
            Err(err) => {
                debug!(service = %service, pid, stream, error = %err, "service output closed");
                return;
            }
        }
    }
}

/// Appends `line` to what is kept of `service`'s output, dropping the oldest past
/// [`OUTPUT_LINES`].
fn keep_line(kept: &OutputLog, service: &Rc<str>, line: String) {
    let mut kept = kept.borrow_mut();
    let lines = kept.entry(Rc::clone(service)).or_default();
    if lines.len() >= OUTPUT_LINES {
        lines.pop_front();
    }
    lines.push_back(line);
}
