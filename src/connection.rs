//! One client connection: its credentials, its handshake, then a loop that reads whole messages
//! into the bus core and writes out what the core queued for it.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;

use tokio::net::UnixStream;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::auth::{self, AuthPolicy};
use crate::bus::{Bus, Conn, Credentials, PeerId};
use crate::socket::Socket;
use zbus::Message;

use crate::wire::{FrameLimits, FrameReader, WireError};

/// How many reads one connection may do before the others get their turn.
const READS_PER_TURN: usize = 16;

/// What every connection task needs.
pub struct Shared {
    pub bus: RefCell<Bus>,
    pub auth: AuthPolicy,
    pub frame_limits: FrameLimits,
    /// One read buffer for all connections: they take turns on one thread.
    pub scratch: RefCell<Vec<u8>>,
    /// Connections still in the handshake.
    pub incomplete: Cell<usize>,
    /// Wakes the flusher: something was queued for writing.
    pub flush_wake: Notify,
    /// At most this many connections may be in the handshake at once
    /// (`max_incomplete_connections`), so that clients that connect and say nothing cannot
    /// exhaust the bus's fds.
    pub max_incomplete: usize,
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
    let creds = match peer_credentials(&stream) {
        Ok(creds) => creds,
        Err(e) => {
            warn!("refusing a connection whose credentials cannot be read: {e}");
            return;
        }
    };
    if shared.incomplete.get() >= shared.max_incomplete {
        warn!(
            pid = creds.pid,
            uid = creds.uid,
            "refusing a connection: {} others are still authenticating",
            shared.max_incomplete
        );
        return;
    }
    shared.incomplete.set(shared.incomplete.get() + 1);
    let handshake = Incomplete(&shared.incomplete);
    // EXTERNAL accepts the bus's own user and root; the policy's `user`/`group` rules may let
    // this one in too.
    let other_user = creds.uid != shared.auth.owner_uid && shared.bus.borrow().may_connect(&creds);
    let policy = other_user.then(|| AuthPolicy {
        owner_uid: creds.uid,
        ..shared.auth.clone()
    });
    let policy = policy.as_ref().unwrap_or(&shared.auth);
    let authenticated = auth::authenticate(&stream, creds.uid, policy).await;
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
    reader.drain_leftover(&shared.frame_limits, &mut batch)?;
    dispatch(shared, id, &mut batch);
    loop {
        if conn.closing.get() {
            return Ok(());
        }
        let pending_write = !conn.outbox.borrow().is_empty();
        tokio::select! {
            biased;
            _ = conn.wake.notified() => {}
            ready = conn.socket.writable(), if pending_write => {
                ready.map_err(WireError::Io)?;
                conn.flush();
            }
            ready = conn.socket.readable() => {
                ready.map_err(WireError::Io)?;
                read_turn(shared, conn, id, reader, &mut batch)?;
            }
        }
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
    for _ in 0..READS_PER_TURN {
        let outcome = conn.socket.try_read(|fd| {
            let mut scratch = shared.scratch.borrow_mut();
            match reader.read(fd, &mut scratch, &shared.frame_limits, batch) {
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
                if conn.closing.get() {
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
