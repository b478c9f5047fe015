//! One client connection: its credentials, its handshake, then a loop that reads whole messages
//! into the bus core and writes out what the core queued for it.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;

use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::auth::{self, AuthPolicy};
use crate::bus::{Bus, Conn, Credentials, PeerId};
use crate::socket::Socket;
use zbus::Message;

use crate::wire::{FrameReader, WireError};

/// How many reads one connection may do before the others get their turn.
const READS_PER_TURN: usize = 16;

/// What every connection task needs.
pub struct Shared {
    pub bus: RefCell<Bus>,
    /// How clients authenticate; the timeout comes from the limits in force.
    pub auth: AuthPolicy,
    /// One read buffer for all connections: they take turns on one thread.
    pub scratch: RefCell<Vec<u8>>,
    /// Connections still in the handshake.
    pub incomplete: Cell<usize>,
    /// Wakes the flusher: something was queued for writing.
    pub flush_wake: Notify,
}

impl Shared {
    /// Has the flusher write what was queued. It runs after the connections that are ready now
    /// have had their turn, so that a receiver gets one write for what many senders sent it.
    pub fn schedule_flush(&self) {
        self.flush_wake.notify_one();
    }

    /// The flusher: writes whatever the core queued, each time it is woken.
    pub async fn flush_forever(&self) {
        loop {
            self.flush_wake.notified().await;
            let dirty = self.bus.borrow_mut().take_dirty();
            for conn in dirty {
                conn.flush();
            }
        }
    }
}

/// Counts a connection as incomplete while it lives.
struct Incomplete<'a>(&'a Cell<usize>);

impl Drop for Incomplete<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Serves one accepted socket until it closes or the bus drops it.
pub async fn serve(shared: Rc<Shared>, stream: UnixStream) {
    let mut creds = match peer_credentials(&stream) {
        Ok(creds) => creds,
        Err(e) => {
            warn!("refusing a connection whose credentials cannot be read: {e}");
            return;
        }
    };
    // `max_incomplete_connections`: clients that connect and say nothing must not exhaust the
    // bus's fds.
    let (max_incomplete, auth_timeout) = {
        let limits = &shared.bus.borrow().limits;
        (limits.max_incomplete_connections, limits.auth_timeout)
    };
    if shared.incomplete.get() >= max_incomplete {
        warn!(
            pid = creds.pid,
            uid = creds.uid,
            "refusing a connection: {max_incomplete} others are still authenticating",
        );
        return;
    }
    shared.incomplete.set(shared.incomplete.get() + 1);
    let handshake = Incomplete(&shared.incomplete);
    // EXTERNAL accepts the bus's own user and root; the policy's `user`/`group` rules may let
    // this one in too.
    let other_user = creds.uid != shared.auth.owner_uid && shared.bus.borrow().may_connect(&creds);
    let policy = AuthPolicy {
        owner_uid: if other_user {
            creds.uid
        } else {
            shared.auth.owner_uid
        },
        timeout: auth_timeout,
        ..shared.auth.clone()
    };
    let authenticated = auth::authenticate(&stream, creds.uid, &policy).await;
    drop(handshake);
    let authenticated = match authenticated {
        Ok(a) => a,
        Err(e) => {
            debug!(
                pid = creds.pid,
                uid = creds.uid,
                "authentication failed: {e}"
            );
            return;
        }
    };
    creds.anonymous = authenticated.anonymous;
    let (pid, uid) = (creds.pid, creds.uid);
    if let Err(why) = shared.bus.borrow().admit(&creds) {
        warn!(pid, uid, "refusing a connection: {why}");
        return;
    }
    let socket = match Socket::new(stream) {
        Ok(socket) => socket,
        Err(e) => {
            warn!(pid, uid, "cannot register an authenticated connection: {e}");
            return;
        }
    };
    let conn = Conn::new(socket);
    let id = shared
        .bus
        .borrow_mut()
        .add_peer(conn.clone(), creds, authenticated.unix_fds);
    let mut reader = FrameReader::new(format!(":1.{id}"), authenticated.leftover);
    match run(&shared, &conn, id, &mut reader).await {
        Ok(()) | Err(WireError::Closed) => debug!(peer = id, "connection closed"),
        Err(WireError::Invalid(why)) => {
            warn!(peer = %format!(":1.{id}"), pid, uid, "disconnecting: invalid message: {why}")
        }
        Err(WireError::Io(e)) => debug!(peer = id, "connection error: {e}"),
    }
    shared.bus.borrow_mut().disconnect(id);
    shared.schedule_flush();
}

async fn run(
    shared: &Shared,
    conn: &Conn,
    id: PeerId,
    reader: &mut FrameReader,
) -> Result<(), WireError> {
    let mut batch = Vec::new();
    let frame_limits = shared.bus.borrow().limits.frame;
    reader.drain_leftover(&frame_limits, &mut batch)?;
    dispatch(shared, id, &mut batch);
    let mut fds_deadline = None;
    loop {
        if conn.closing.get() {
            return Ok(());
        }
        // Only a socket that refused bytes is waited on: what the core queued otherwise is the
        // flusher's to write, without a write-readiness registration.
        let pending_write = conn.write_blocked.get();
        // `max_incoming_bytes`: past it, the socket is left unread until the bus has delivered
        // what it holds of this sender's (the bus wakes the task then).
        let paused = conn.paused.get();
        fds_deadline = pending_fds_deadline(shared, reader, fds_deadline);
        tokio::select! {
            biased;
            _ = conn.wake.notified() => {}
            ready = conn.socket.writable(), if pending_write => {
                ready.map_err(WireError::Io)?;
                conn.flush();
            }
            ready = conn.socket.readable(), if !paused => {
                ready.map_err(WireError::Io)?;
                read_turn(shared, conn, id, reader, &mut batch)?;
            }
            () = sleep_until_some(fds_deadline), if fds_deadline.is_some() => {
                let limit = shared.bus.borrow().limits.pending_fd_timeout;
                warn!(
                    peer = %format!(":1.{id}"),
                    "disconnecting: Unix fds have been pending for too long \
                     (pending_fd_timeout={} ms)",
                    limit.as_millis()
                );
                return Ok(());
            }
        }
    }
}

/// `pending_fd_timeout`: once fds have arrived with a message that is not complete, the rest
/// must come within the limit, or the connection is closed (a client could otherwise pin fds
/// in the bus forever). Returns when the current wait for the rest ends.
fn pending_fds_deadline(
    shared: &Shared,
    reader: &FrameReader,
    deadline: Option<Instant>,
) -> Option<Instant> {
    if !reader.holds_fds() {
        return None;
    }
    deadline.or_else(|| Some(Instant::now() + shared.bus.borrow().limits.pending_fd_timeout))
}

/// Waits until `deadline`; forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Reads and dispatches what the socket has, for a bounded number of reads.
fn read_turn(
    shared: &Shared,
    conn: &Conn,
    id: PeerId,
    reader: &mut FrameReader,
    batch: &mut Vec<Message>,
) -> Result<(), WireError> {
    let frame_limits = shared.bus.borrow().limits.frame;
    for _ in 0..READS_PER_TURN {
        let outcome = conn.socket.try_read(|fd| {
            let mut scratch = shared.scratch.borrow_mut();
            match reader.read(fd, &mut scratch, &frame_limits, batch) {
                Err(WireError::Io(e)) => Err(e),
                // A short read drained the socket: saying `WouldBlock` clears the readiness
                // now, which saves the read that would only return EAGAIN. New data raises
                // a new edge, so none is missed.
                Ok(true) => Err(io::ErrorKind::WouldBlock.into()),
                other => Ok(other),
            }
        });
        match outcome {
            Ok(read) => {
                dispatch(shared, id, batch);
                read?;
                if conn.closing.get() || conn.paused.get() {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dispatch(shared, id, batch);
                return Ok(());
            }
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

/// Hands each message to the bus core, then writes what it queued.
fn dispatch(shared: &Shared, id: PeerId, batch: &mut Vec<Message>) {
    if batch.is_empty() {
        return;
    }
    let mut bus = shared.bus.borrow_mut();
    for msg in batch.drain(..) {
        bus.dispatch(id, msg);
    }
    drop(bus);
    shared.schedule_flush();
}

/// The peer's uid, pid and groups from the kernel.
fn peer_credentials(stream: &UnixStream) -> io::Result<Credentials> {
    use nix::sys::socket::{getsockopt, sockopt};
    let cred = getsockopt(&stream.as_fd(), sockopt::PeerCredentials).map_err(io::Error::from)?;
    Ok(Credentials {
        uid: cred.uid(),
        pid: u32::try_from(cred.pid()).unwrap_or(0),
        gids: peer_groups(stream, cred.gid()),
        security_label: None,
        anonymous: false,
    })
}

/// The peer's primary group `gid` first, then its supplementary groups from `SO_PEERGROUPS`
/// (Linux 4.13+), without repeats, as dbus-daemon reports them.
fn peer_groups(stream: &UnixStream, gid: u32) -> Vec<u32> {
    let mut gids = vec![gid];
    for other in supplementary_groups(stream).unwrap_or_default() {
        if !gids.contains(&other) {
            gids.push(other);
        }
    }
    gids
}

/// `SO_PEERGROUPS`: the peer's supplementary groups.
fn supplementary_groups(stream: &UnixStream) -> Option<Vec<u32>> {
    let mut groups = vec![0u32; 64];
    let mut len = (groups.len() * 4) as nix::libc::socklen_t;
    // SAFETY: the buffer and its length describe valid, writable memory.
    let rc = unsafe {
        nix::libc::getsockopt(
            stream.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    groups.truncate(len as usize / 4);
    Some(groups)
}
