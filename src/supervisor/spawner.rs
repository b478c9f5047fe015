//! The spawner: the bus's one helper process that forks a keeper per service start.
//!
//! The bus has threads by the time it starts services, and a forked copy of a threaded process
//! may only exec. So the bus execs `broker __spawner` once, with a `SOCK_SEQPACKET` socket on
//! fd 3 ([`CHANNEL_FD`]); this process is single-threaded, and may fork keepers that go on
//! running Rust code (see [`super::keeper`]). It is a child subreaper, so an orphan of a keeper
//! lands here rather than on the bus, and it reaps its keepers silently (the bus learns of a
//! keeper's end from its control socket).
//!
//! When its channel to the bus reaches EOF, or on SIGTERM or SIGINT, it sends SIGTERM to its
//! keepers (which stop their services), waits until every child is reaped, and exits.
//!
//! On a system bus it runs in *system mode* ([`SystemConfig`]): the bus execs it as root before
//! dropping to its `<user>`, with the service directories, the bus's address and the grace on
//! its command line, which it never takes from the bus afterwards. It then accepts only
//! [`SpawnerRequest::StartByName`], reads the name's file itself ([`system::resolve`]) and has
//! the keeper run the service as the file's `User=`, in `/`. A bus that asks for a program, or
//! for a name no service file provides, is refused. A session-mode spawner refuses name-only
//! requests.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use nix::unistd::{ForkResult, Pid, fork};

use super::keeper;
use super::protocol::{ExecSpec, MAX_MESSAGE, SpawnerReply, SpawnerRequest};
use super::system;
use crate::activation::StarterBus;

/// The descriptor the bus hands the spawner its channel on.
pub const CHANNEL_FD: RawFd = 3;

/// The hidden first argument that runs this binary as the spawner.
pub const MODE_ARG: &str = "__spawner";

/// What a system-mode spawner is given at its start, on its command line, and never by the
/// bus later: where the service files are, the bus's address for the services, the grace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemConfig {
    /// The service directories, searched in order (`--activation-dir`s, then the
    /// configuration's `<servicedir>`s, as read at the bus's start).
    pub dirs: Vec<PathBuf>,
    /// Where the bus listens, for the services' environment.
    pub starter: StarterBus,
    /// How long a service's processes have after SIGTERM before SIGKILL.
    pub grace: Duration,
}

const SYSTEM_ARG: &str = "--system";
const GRACE_ARG: &str = "--grace-ms=";
const ADDRESS_ARG: &str = "--starter-address=";
const BUS_TYPE_ARG: &str = "--bus-type=";
const DIR_ARG: &str = "--servicedir=";

impl SystemConfig {
    /// The arguments after [`MODE_ARG`] that start a spawner in system mode with this.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = vec![
            OsString::from(SYSTEM_ARG),
            format!("{GRACE_ARG}{}", self.grace.as_millis()).into(),
            format!("{ADDRESS_ARG}{}", self.starter.address).into(),
        ];
        if let Some(bus_type) = &self.starter.bus_type {
            args.push(format!("{BUS_TYPE_ARG}{bus_type}").into());
        }
        for dir in &self.dirs {
            let mut arg = OsString::from(DIR_ARG);
            arg.push(dir);
            args.push(arg);
        }
        args
    }

    /// Reads [`SystemConfig::to_args`]'s arguments; `None` without `--system` (session mode).
    pub fn from_args(args: &[OsString]) -> Result<Option<SystemConfig>, String> {
        if args.first().is_none_or(|a| a != SYSTEM_ARG) {
            return match args.first() {
                None => Ok(None),
                Some(other) => Err(format!("unexpected argument {other:?}")),
            };
        }
        let mut config = SystemConfig {
            dirs: Vec::new(),
            starter: StarterBus {
                address: String::new(),
                bus_type: None,
            },
            grace: super::DEFAULT_STOP_GRACE,
        };
        for arg in args.iter().skip(1) {
            let bytes = arg.as_bytes();
            let text = |prefix: &str| {
                bytes
                    .strip_prefix(prefix.as_bytes())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            if let Some(dir) = bytes.strip_prefix(DIR_ARG.as_bytes()) {
                config
                    .dirs
                    .push(PathBuf::from(OsString::from_vec(dir.to_vec())));
            } else if let Some(ms) = text(GRACE_ARG) {
                let ms = ms
                    .parse()
                    .map_err(|e| format!("bad {GRACE_ARG}{ms}: {e}"))?;
                config.grace = Duration::from_millis(ms);
            } else if let Some(address) = text(ADDRESS_ARG) {
                config.starter.address = address;
            } else if let Some(bus_type) = text(BUS_TYPE_ARG) {
                config.starter.bus_type = Some(bus_type);
            } else {
                return Err(format!("unexpected argument {arg:?}"));
            }
        }
        Ok(Some(config))
    }
}

/// Runs the spawner on [`CHANNEL_FD`], in the mode its arguments (those after [`MODE_ARG`])
/// say; the process's exit status.
pub fn main(args: &[OsString]) -> i32 {
    let system = match SystemConfig::from_args(args) {
        Ok(system) => system,
        Err(e) => {
            eprintln!("broker spawner: {e}");
            return 2;
        }
    };
    // SAFETY: the bus starts this mode with its channel on fd 3 and nothing else owns it.
    let channel = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    match Spawner::new(channel, system).and_then(|mut s| s.serve()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("broker spawner: {e}");
            1
        }
    }
}

struct Spawner {
    channel: OwnedFd,
    signals: SignalFd,
    keepers: HashSet<u32>,
    /// `Some` in system mode.
    system: Option<SystemConfig>,
}

impl Spawner {
    fn new(channel: OwnedFd, system: Option<SystemConfig>) -> io::Result<Spawner> {
        set_cloexec(&channel)?;
        super::become_subreaper()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot become a subreaper: {e}")))?;
        let mut mask = SigSet::empty();
        for signal in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
            mask.add(signal);
        }
        mask.thread_block()?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        Ok(Spawner {
            channel,
            signals,
            keepers: HashSet::new(),
            system,
        })
    }

    /// Serves requests until the bus goes or a signal says stop; then stops the keepers.
    fn serve(&mut self) -> io::Result<()> {
        loop {
            let (channel_ready, signal_ready) = {
                let mut fds = [
                    PollFd::new(self.channel.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => {
                        return Err(io::Error::new(
                            io::Error::from(e).kind(),
                            format!("poll: {e}"),
                        ));
                    }
                }
                let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            if signal_ready && self.read_signals() {
                break;
            }
            if channel_ready && !self.serve_one() {
                break;
            }
        }
        self.stop_keepers();
        Ok(())
    }

    /// Reaps ended keepers; whether a signal asked the spawner to stop.
    fn read_signals(&mut self) -> bool {
        let mut stop = false;
        while let Ok(Some(info)) = self.signals.read_signal() {
            let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
            stop |= signo == libc::SIGTERM || signo == libc::SIGINT;
        }
        self.reap(false);
        stop
    }

    /// Reads and answers one request; false once the bus is gone.
    fn serve_one(&mut self) -> bool {
        let (data, mut fds) = match recv_with_fds(&self.channel) {
            Ok(Some(received)) => received,
            Ok(None) | Err(_) => return false,
        };
        let reply = match SpawnerRequest::decode(&data) {
            Ok(request) if fds.len() == 3 => {
                let control = fds.pop();
                let stderr = fds.pop();
                let stdout = fds.pop();
                match (stdout, stderr, control) {
                    (Some(stdout), Some(stderr), Some(control)) => {
                        self.start(&request, [stdout, stderr], control)
                    }
                    _ => failed("the request lacks its descriptors"),
                }
            }
            Ok(_) => failed(&format!("{} descriptors instead of 3", fds.len())),
            Err(e) => failed(&e.to_string()),
        };
        drop(fds);
        send_with_fds(&self.channel, &reply.encode(), &[]).is_ok()
    }

    /// Checks `request` against the mode and forks a keeper for it.
    fn start(
        &mut self,
        request: &SpawnerRequest,
        output: [OwnedFd; 2],
        control: OwnedFd,
    ) -> SpawnerReply {
        match (request, &self.system) {
            (SpawnerRequest::Start { exec, grace, .. }, None) => {
                self.fork_keeper(exec, *grace, output, control)
            }
            (SpawnerRequest::StartByName { service }, Some(system)) => {
                match system_exec(system, service) {
                    Ok(exec) => {
                        let grace = system.grace;
                        self.fork_keeper(&exec, grace, output, control)
                    }
                    Err(refused) => refused,
                }
            }
            (SpawnerRequest::Start { service, .. }, Some(_)) => failed(&format!(
                "a system bus's spawner starts services by name only, not a program (for {service})"
            )),
            (SpawnerRequest::StartByName { service }, None) => failed(&format!(
                "a session bus's spawner cannot start {service} by name: it has no service files"
            )),
        }
    }

    /// Forks a keeper that runs `exec`.
    fn fork_keeper(
        &mut self,
        exec: &ExecSpec,
        grace: Duration,
        output: [OwnedFd; 2],
        control: OwnedFd,
    ) -> SpawnerReply {
        // SAFETY: this process is single-threaded, so the child may run any code.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                // The keeper keeps nothing of the spawner's: its channel and signalfd are
                // closed here (both close-on-exec would only help at an exec).
                // SAFETY: closing the spawner's own descriptors in the child, which owns copies.
                unsafe {
                    libc::close(self.channel.as_raw_fd());
                    libc::close(self.signals.as_raw_fd());
                }
                keeper::run(control, output, exec, grace)
            }
            Ok(ForkResult::Parent { child }) => {
                let keeper = u32::try_from(child.as_raw()).unwrap_or(0);
                self.keepers.insert(keeper);
                SpawnerReply::Started { keeper }
            }
            Err(e) => failed(&format!("cannot fork a keeper: {e}")),
        }
    }

    /// Reaps ended children; with `block`, waits until none is left at all.
    fn reap(&mut self, block: bool) {
        let flags = if block { 0 } else { libc::WNOHANG };
        loop {
            let mut status = 0;
            // SAFETY: waitpid only writes the status integer we pass.
            let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
            if pid < 0 && Errno::last() == Errno::EINTR {
                continue;
            }
            if pid <= 0 {
                return;
            }
            if let Ok(pid) = u32::try_from(pid) {
                self.keepers.remove(&pid);
            }
        }
    }

    /// SIGTERM to every keeper (each stops its service within its grace), then waits for all.
    fn stop_keepers(&mut self) {
        for &keeper in &self.keepers {
            if let Ok(pid) = i32::try_from(keeper) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        self.reap(true);
    }
}

/// What a system service runs as: its file's program and user, the minimal environment, `/`.
/// A spawner that is not root can only start services whose `User=` is its own account
/// (`Spawn.PermissionsInvalid` otherwise, the reference's name for a helper that lacks the
/// privilege to become the user), so an unprivileged test bus of type system still works.
fn system_exec(system: &SystemConfig, service: &str) -> Result<ExecSpec, SpawnerReply> {
    let refused = |e: &crate::bus::error::BusError| SpawnerReply::Refused {
        error: e.name().to_string(),
        message: e.text().to_owned(),
    };
    let resolved =
        system::resolve(&system.dirs, service, &system.starter).map_err(|e| refused(&e))?;
    let me = nix::unistd::geteuid();
    if !me.is_root() && resolved.user.uid != me {
        let e = zbus::fdo::Error::SpawnPermissionsInvalid(format!(
            "cannot start {service} as user '{}' (the User= of {}): the bus's spawner runs as \
             uid {me}, not as root, so it can start services of its own uid only",
            resolved.user.name,
            resolved.source.display()
        ));
        return Err(refused(&e.into()));
    }
    Ok(ExecSpec {
        argv: resolved.argv,
        env: resolved.env,
        working_directory: Some(PathBuf::from("/")),
        // Not root, the spawner already is the user, and may not call setgroups.
        user: me.is_root().then_some(resolved.user),
    })
}

fn failed(message: &str) -> SpawnerReply {
    SpawnerReply::Failed {
        message: message.to_owned(),
    }
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Sends one datagram with `fds` attached.
pub fn send_with_fds(socket: &OwnedFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one datagram and the descriptors that came with it (close-on-exec); `None` at EOF.
pub fn recv_with_fds(socket: &OwnedFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these descriptors for this process.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(io::Error::other("a message longer than the limit"));
        }
        (msg.bytes, fds)
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_configuration_survives_the_command_line() {
        let config = SystemConfig {
            dirs: vec![
                PathBuf::from("/usr/share/dbus-1/system-services"),
                PathBuf::from(OsString::from_vec(b"/srv/\xff".to_vec())),
            ],
            starter: StarterBus {
                address: "unix:path=/run/dbus/system_bus_socket,guid=00ff".into(),
                bus_type: Some("system".into()),
            },
            grace: Duration::from_millis(1500),
        };
        assert_eq!(SystemConfig::from_args(&config.to_args()), Ok(Some(config)));
    }

    #[test]
    fn no_arguments_is_session_mode_and_strange_ones_are_refused() {
        assert_eq!(SystemConfig::from_args(&[]), Ok(None));
        assert!(SystemConfig::from_args(&["--servicedir=/tmp".into()]).is_err());
        assert!(SystemConfig::from_args(&["--system".into(), "--exec=/bin/sh".into()]).is_err());
        assert!(SystemConfig::from_args(&["--system".into(), "--grace-ms=soon".into()]).is_err());
    }
}
