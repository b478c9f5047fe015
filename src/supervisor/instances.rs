//! The bus's side of the spawner and the keepers: starting the spawner, asking it for a keeper
//! per start, and following each keeper's reports until its control socket reaches EOF, which
//! means every process of that start is gone.
//!
//! The round trips to the spawner and the wait for the keeper's first report are blocking, as
//! the direct spawn was (it waited for `exec`), with a receive timeout ([`ROUND_TRIP`]): a stuck
//! spawner fails the start with a clear error instead of stalling the bus.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, recv, send, setsockopt, socketpair, sockopt,
};
use nix::sys::time::TimeVal;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use zbus::names::OwnedErrorName;

use super::protocol::{ExecSpec, KeeperCommand, KeeperReport, SpawnerReply, SpawnerRequest};
use super::spawner::{self, SystemConfig, recv_with_fds, send_with_fds};
use super::{ProcessEvent, SpawnError, SpawnSpec, tree};
use crate::bus::error::BusError;

/// How long the spawner may take to answer, and a keeper to report its main process started.
const ROUND_TRIP: Duration = Duration::from_secs(5);

/// A start's processes have all ended: its keeper exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceGone {
    pub service: String,
    pub keeper: u32,
    /// The start's main process.
    pub main: u32,
}

/// One start, while any process of it lives.
struct Instance {
    keeper: u32,
    main: u32,
    control: Rc<OwnedFd>,
}

type Live = Rc<RefCell<HashMap<Rc<str>, Vec<Instance>>>>;

/// What a start through a keeper gives back.
pub(super) struct Started {
    pub main: u32,
    /// The read ends of the service's stdout and stderr.
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The spawner's channel and the live instances.
pub(super) struct Keepers {
    channel: RefCell<Option<OwnedFd>>,
    spawner: u32,
    /// A system-mode spawner: it takes service names only, and runs as another user than
    /// the bus may signal.
    by_name: bool,
    live: Live,
    gone: mpsc::UnboundedSender<InstanceGone>,
}

impl Keepers {
    /// Execs `exe __spawner` with its channel on fd 3, in a process group of its own (a Ctrl-C
    /// at the bus's terminal is for the bus to act on), in system mode with `system`. The
    /// reaper collects it when it ends. Needs no runtime: a system bus starts it before it
    /// drops its privileges, before the bus's runtime tasks exist.
    pub(super) fn start(
        exe: &Path,
        system: Option<&SystemConfig>,
    ) -> io::Result<(Keepers, mpsc::UnboundedReceiver<InstanceGone>)> {
        let (ours, theirs) = seqpacket_pair().map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create the spawner's socket: {e}"))
        })?;
        set_timeout(&ours)?;
        let raw = theirs.as_raw_fd();
        let mut command = Command::new(exe);
        command
            .arg(spawner::MODE_ARG)
            .args(system.map(SystemConfig::to_args).unwrap_or_default())
            .stdin(Stdio::null())
            .process_group(0);
        // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if nix::libc::dup2(raw, spawner::CHANNEL_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start the spawner {}: {e}", exe.display()),
            )
        })?;
        drop(theirs);
        let spawner = child.id();
        // Dropping a `Child` neither waits for nor kills it; the reaper collects its status.
        drop(child);
        super::stop::SPAWNER.store(spawner, std::sync::atomic::Ordering::Relaxed);
        debug!(pid = spawner, system = system.is_some(), "spawner started");
        let (gone, receiver) = mpsc::unbounded_channel();
        let keepers = Keepers {
            channel: RefCell::new(Some(ours)),
            spawner,
            by_name: system.is_some(),
            live: Live::default(),
            gone,
        };
        Ok((keepers, receiver))
    }

    pub(super) fn spawner_pid(&self) -> u32 {
        self.spawner
    }

    /// Whether the spawner is a system bus's, which starts services by name only.
    pub(super) fn by_name(&self) -> bool {
        self.by_name
    }

    /// Closes the channel: the spawner stops its keepers (each within its grace) and exits.
    pub(super) fn close(&self) {
        self.channel.borrow_mut().take();
    }

    /// Starts `spec` under a new keeper; the main process's pid and the output's read end.
    /// The keeper's later reports of reaped processes go to `events`.
    pub(super) fn spawn(
        &self,
        service: &str,
        spec: &SpawnSpec,
        grace: Duration,
        events: &mpsc::UnboundedSender<ProcessEvent>,
    ) -> Result<Started, SpawnError> {
        let program = spec.argv.first().cloned().unwrap_or_default();
        let failed = |message: String| SpawnError {
            program: program.clone(),
            source: io::Error::other(message),
            refused: None,
        };
        if program.is_empty() && !self.by_name {
            return Err(SpawnError {
                program,
                source: io::Error::new(io::ErrorKind::InvalidInput, "empty argv"),
                refused: None,
            });
        }
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| failed(format!("cannot create an output pipe: {e}")))
        };
        let ((stdout, stdout_w), (stderr, stderr_w)) = (pipe()?, pipe()?);
        let (control, keeper_end) = seqpacket_pair()
            .map_err(|e| failed(format!("cannot create the keeper's socket: {e}")))?;
        let request = if self.by_name {
            SpawnerRequest::StartByName {
                service: service.to_owned(),
            }
        } else {
            SpawnerRequest::Start {
                service: service.to_owned(),
                exec: ExecSpec {
                    argv: spec.argv.clone(),
                    env: spec.env.clone(),
                    working_directory: spec.working_directory.clone(),
                    user: None,
                },
                grace,
            }
        };
        let keeper = self
            .ask(
                &request,
                &[
                    stdout_w.as_raw_fd(),
                    stderr_w.as_raw_fd(),
                    keeper_end.as_raw_fd(),
                ],
            )
            .map_err(|e| match e {
                Asked::Failed(e) => failed(format!("the spawner failed: {e}")),
                Asked::Refused(refusal) => SpawnError {
                    refused: Some(refusal),
                    ..failed(String::new())
                },
            })?;
        drop((stdout_w, stderr_w, keeper_end));
        let main = first_report(&control).map_err(|source| SpawnError {
            program: program.clone(),
            source,
            refused: None,
        })?;
        info!(service = %service, pid = main, keeper, argv = ?spec.argv, "service process started");
        self.follow(service, keeper, main, control, events.clone());
        Ok(Started {
            main,
            stdout,
            stderr,
        })
    }

    /// One round trip to the spawner: the keeper's pid. A spawner that fails to answer in
    /// time is dropped, so its late answer cannot be read as the next request's.
    fn ask(&self, request: &SpawnerRequest, fds: &[i32]) -> Result<u32, Asked> {
        let mut channel = self.channel.borrow_mut();
        let Some(socket) = channel.as_ref() else {
            return Err(Asked::Failed(io::Error::other("the spawner is gone")));
        };
        let answer = send_with_fds(socket, &request.encode(), fds).and_then(|()| {
            match recv_with_fds(socket)? {
                Some((data, _)) => SpawnerReply::decode(&data).map_err(io::Error::other),
                None => Err(io::Error::other("the spawner exited")),
            }
        });
        match answer {
            Ok(SpawnerReply::Started { keeper }) => Ok(keeper),
            Ok(SpawnerReply::Failed { message }) => Err(Asked::Failed(io::Error::other(message))),
            Ok(SpawnerReply::Refused { error, message }) => {
                Err(Asked::Refused(refusal(error, message)))
            }
            Err(e) => {
                warn!("the spawner does not answer, no more services can start: {e}");
                *channel = None;
                Err(Asked::Failed(e))
            }
        }
    }

    /// Records the instance and reads its keeper's reports until EOF.
    fn follow(
        &self,
        service: &str,
        keeper: u32,
        main: u32,
        control: OwnedFd,
        events: mpsc::UnboundedSender<ProcessEvent>,
    ) {
        let control = Rc::new(control);
        let name: Rc<str> = Rc::from(service);
        self.live
            .borrow_mut()
            .entry(Rc::clone(&name))
            .or_default()
            .push(Instance {
                keeper,
                main,
                control: Rc::clone(&control),
            });
        let live = Rc::clone(&self.live);
        let gone = self.gone.clone();
        let reader = super::Reader::new();
        tokio::task::spawn_local(async move {
            let _reader = reader;
            if let Err(e) = read_reports(&control, &name, &events).await {
                warn!(service = %name, keeper, "lost the keeper's reports: {e}");
            }
            debug!(service = %name, keeper, "every process of the start has ended");
            if let Some(list) = live.borrow_mut().get_mut(&name) {
                list.retain(|i| i.keeper != keeper);
            }
            let _ = gone.send(InstanceGone {
                service: name.to_string(),
                keeper,
                main,
            });
        });
    }

    /// Sends Stop to every keeper of `service`; how many.
    pub(super) fn stop(&self, service: &str) -> usize {
        let live = self.live.borrow();
        let Some(list) = live.get(service) else {
            return 0;
        };
        for instance in list {
            let data = KeeperCommand::Stop.encode();
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            if let Err(e) = send(instance.control.as_raw_fd(), &data, flags) {
                debug!(service = %service, keeper = instance.keeper, "cannot send Stop: {e}");
            }
        }
        list.len()
    }

    /// The living processes below `service`'s keepers, `main` first.
    pub(super) fn processes_of(&self, service: &str, main: u32) -> Vec<u32> {
        let mut found = Vec::new();
        for keeper in self.keepers_of(service) {
            match tree::descendants_of(keeper) {
                Ok(all) => found.extend(all.iter().filter(|d| d.is_alive()).map(|d| d.pid)),
                Err(e) => warn!(service = %service, "cannot list the service's processes: {e}"),
            }
        }
        if let Some(at) = found.iter().position(|&pid| pid == main) {
            found.remove(at);
            found.insert(0, main);
        }
        found
    }

    /// Whether the start whose main process was `main` still has a process.
    pub(super) fn is_live(&self, main: u32) -> bool {
        self.live
            .borrow()
            .values()
            .any(|list| list.iter().any(|i| i.main == main))
    }

    pub(super) fn keepers_of(&self, service: &str) -> Vec<u32> {
        self.live
            .borrow()
            .get(service)
            .map_or_else(Vec::new, |list| list.iter().map(|i| i.keeper).collect())
    }
}

/// Why the spawner started no keeper.
enum Asked {
    /// It could not (or did not answer).
    Failed(io::Error),
    /// It refused, with a D-Bus error for the waiting callers.
    Refused(BusError),
}

/// The spawner's refusal as the error the callers get; a name that is not a valid error name
/// (a bug) becomes `Spawn.Failed` with the text.
fn refusal(error: String, message: String) -> BusError {
    match OwnedErrorName::try_from(error) {
        Ok(name) => BusError::foreign(name, message),
        Err(_) => zbus::fdo::Error::SpawnFailed(message).into(),
    }
}

/// Waits (blocking, within [`ROUND_TRIP`]) for the keeper's first report: the main process's
/// pid, or the OS error that kept it from starting.
fn first_report(control: &OwnedFd) -> io::Result<u32> {
    set_timeout(control)?;
    let mut buf = [0u8; 64];
    let n = recv(control.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(|e| io::Error::other(format!("no word from the keeper: {e}")))?;
    if n == 0 {
        return Err(io::Error::other(
            "the keeper exited before it started the service",
        ));
    }
    match KeeperReport::decode(buf.get(..n).unwrap_or_default()).map_err(io::Error::other)? {
        KeeperReport::Spawned { pid } => Ok(pid),
        KeeperReport::ExecFailed { errno } => Err(io::Error::from_raw_os_error(errno)),
        other => Err(io::Error::other(format!(
            "unexpected first report {other:?}"
        ))),
    }
}

/// Turns the keeper's reports into the reaper's process events, until EOF.
async fn read_reports(
    control: &OwnedFd,
    service: &str,
    events: &mpsc::UnboundedSender<ProcessEvent>,
) -> io::Result<()> {
    nix::fcntl::fcntl(
        control,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    // SAFETY: the `AsyncFd` holds a `BorrowedFd` of `control`, which outlives it.
    let fd = unsafe { AsyncFd::register_with_interest(control.as_fd(), Interest::READABLE) }?;
    let mut buf = [0u8; 64];
    loop {
        let mut guard = fd.readable().await?;
        let n = match guard.try_io(|fd| {
            recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
        }) {
            Ok(result) => result?,
            Err(_would_block) => continue,
        };
        if n == 0 {
            return Ok(());
        }
        match KeeperReport::decode(buf.get(..n).unwrap_or_default()) {
            Ok(KeeperReport::Exited { pid, status }) => {
                info!(service = %service, pid, status = %status, "service process ended");
                let _ = events.send(ProcessEvent { pid, status });
            }
            Ok(other) => debug!(service = %service, "keeper report: {other:?}"),
            Err(e) => warn!(service = %service, "bad report from the keeper: {e}"),
        }
    }
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

fn set_timeout(socket: &OwnedFd) -> io::Result<()> {
    let limit = TimeVal::new(i64::try_from(ROUND_TRIP.as_secs()).unwrap_or(i64::MAX), 0);
    setsockopt(socket, sockopt::ReceiveTimeout, &limit)?;
    Ok(())
}
