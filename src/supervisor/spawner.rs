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
//! A later system bus will start it as root in a mode that takes a service *name* and reads
//! the file itself; the request type and the keeper's [`ExecSpec`] are where that fits.

use std::collections::HashSet;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use nix::unistd::{ForkResult, Pid, fork};

use super::keeper;
use super::protocol::{MAX_MESSAGE, SpawnerReply, SpawnerRequest};

/// The descriptor the bus hands the spawner its channel on.
pub const CHANNEL_FD: RawFd = 3;

/// The hidden first argument that runs this binary as the spawner.
pub const MODE_ARG: &str = "__spawner";

/// Runs the spawner on [`CHANNEL_FD`]; the process's exit status.
pub fn main() -> i32 {
    // SAFETY: the bus starts this mode with its channel on fd 3 and nothing else owns it.
    let channel = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    match Spawner::new(channel).and_then(|mut s| s.serve()) {
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
}

impl Spawner {
    fn new(channel: OwnedFd) -> io::Result<Spawner> {
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

    /// Forks a keeper for `request`.
    fn start(
        &mut self,
        request: &SpawnerRequest,
        output: [OwnedFd; 2],
        control: OwnedFd,
    ) -> SpawnerReply {
        let SpawnerRequest::Start { exec, grace, .. } = request;
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
                keeper::run(control, output, exec, *grace)
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
