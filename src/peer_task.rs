//! The task that serves one client connection: its admission at accept, its handshake, then a
//! loop that reads whole messages into the bus core in fair turns and writes out what the core
//! queued for it; and the flusher that writes for all of them.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::auth::{self, AuthPolicy};
use crate::bus::Bus;
use crate::bus::admission::{Lost, Ticket};
use crate::connection::{Conn, Credentials, PeerId};
use crate::log_limit;
use crate::socket::Socket;
use zbus::Message;

use crate::wire::{FrameReader, WireError};

/// How many reads one connection may do before the others get their turn.
const READS_PER_TURN: usize = 16;

/// How many messages of one connection the bus handles before the others get their turn. One
/// read may bring hundreds of small messages: a bound on reads alone let a client that
/// pipelines calls hold the bus for a fifth of a second. At a few microseconds per message, a
/// turn stays well under a millisecond, and a batch this size still fills a vectored write.
const MESSAGES_PER_TURN: usize = 64;

/// How long one connection's turn may run: a turn ends early when its messages are costly.
const TURN_TIME: std::time::Duration = std::time::Duration::from_millis(2);

/// What every connection task needs.
pub struct Shared {
    pub bus: RefCell<Bus>,
    /// How clients authenticate; the timeout comes from the limits in force.
    pub auth: AuthPolicy,
    /// One read buffer for all connections: they take turns on one thread.
    pub scratch: RefCell<Vec<u8>>,
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

/// A connection that passed the checks at `accept` and holds its place among the incomplete
/// connections of its uid.
pub struct Admitted {
    /// Registered with the runtime for reading, once for the connection's whole life.
    socket: Socket,
    creds: Credentials,
    ticket: Rc<Ticket>,
}

/// Checks a connection at `accept`, before it takes any place: one whose credentials cannot be
/// read, or of a uid that the bus would never let in, is closed at once. Any other is counted
/// among the incomplete connections of its uid; past `max_incomplete_connections`, the oldest
/// connection of the uid that holds the most is closed instead of this one (see
/// [`crate::bus::admission`]).
pub fn admit(shared: &Shared, stream: OwnedFd) -> Option<Admitted> {
    let creds = match peer_credentials(stream.as_fd()) {
        Ok(creds) => creds,
        Err(e) => {
            if log_limit::REFUSED_CONNECTION.allow() {
                warn!("refusing a connection whose credentials cannot be read: {e}");
            }
            return None;
        }
    };
    let mechanisms = shared.auth.mechanisms;
    let mut bus = shared.bus.borrow_mut();
    if !bus.could_connect(&creds, mechanisms.external, mechanisms.anonymous) {
        if log_limit::REFUSED_CONNECTION.allow() {
            warn!(
                pid = creds.pid,
                uid = creds.uid,
                "refusing a connection: the policy does not let uid {} connect",
                creds.uid
            );
        }
        return None;
    }
    let socket = match Socket::from_fd(stream) {
        Ok(socket) => socket,
        Err(e) => {
            if log_limit::REFUSED_CONNECTION.allow() {
                warn!(
                    pid = creds.pid,
                    uid = creds.uid,
                    "cannot register a connection: {e}"
                );
            }
            return None;
        }
    };
    let cap = bus.limits().max_incomplete_connections;
    let (ticket, evicted) = bus.enter_incomplete(creds.uid);
    for victim in evicted {
        if log_limit::INCOMPLETE_CLOSED.allow() {
            info!(
                uid = victim.uid,
                "closing the oldest incomplete connection of uid {}: \
                 max_incomplete_connections ({cap}) reached",
                victim.uid
            );
        }
    }
    Some(Admitted {
        socket,
        creds,
        ticket,
    })
}

/// Keeps a connection among the incomplete ones until it has joined or has gone.
struct Counted<'a>(&'a Shared, &'a Ticket);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        // Only when the runtime drops the task at exit could the core be in use.
        if let Ok(mut bus) = self.0.bus.try_borrow_mut() {
            bus.leave_incomplete(self.1);
        }
    }
}

/// Serves one admitted connection until it closes or the bus drops it.
pub async fn serve(shared: Rc<Shared>, admitted: Admitted) {
    let Admitted {
        socket,
        mut creds,
        ticket,
    } = admitted;
    let _counted = Counted(&shared, &ticket);
    let auth_timeout = shared.bus.borrow().limits().auth_timeout;
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
    // Boxed, so that the handshake's state is freed once it is done instead of sizing the
    // task of every connection for as long as it lives.
    let handshake = Box::pin(async {
        tokio::select! {
            done = auth::authenticate(&socket, creds.uid, &policy) => Some(done),
            why = must_close(&ticket) => {
                debug!(pid = creds.pid, uid = creds.uid, "closing during authentication: {why:?}");
                None
            }
        }
    });
    let Some(authenticated) = handshake.await else {
        return;
    };
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
        if log_limit::REFUSED_CONNECTION.allow() {
            warn!(pid, uid, "refusing a connection: {why}");
        }
        return;
    }
    let conn = Conn::new(socket);
    let id = shared
        .bus
        .borrow_mut()
        .add_peer(conn.clone(), creds, authenticated.unix_fds, &ticket);
    tokio::task::spawn_local(close_unless_joined(shared.clone(), ticket.clone(), id));
    let mut reader = FrameReader::new(format!(":1.{id}"), authenticated.leftover);
    match run(&shared, &conn, id, &mut reader).await {
        Ok(()) | Err(WireError::Closed) => debug!(peer = id, "connection closed"),
        Err(WireError::Invalid(why)) => {
            if log_limit::PROTOCOL_VIOLATION.allow() {
                warn!(peer = %format!(":1.{id}"), pid, uid, "disconnecting: invalid message: {why}")
            }
        }
        Err(WireError::Io(e)) => debug!(peer = id, "connection error: {e}"),
    }
    shared.bus.borrow_mut().disconnect(id);
    // A peer with many names gives them up a share per turn, the others' turns between.
    while shared.bus.borrow_mut().release_names(id) {
        shared.schedule_flush();
        tokio::task::yield_now().await;
    }
    shared.bus.borrow_mut().disconnect(id);
    shared.schedule_flush();
}

/// Resolves when an incomplete connection must close: pushed out by newer ones, or out of time.
async fn must_close(ticket: &Ticket) -> Lost {
    match ticket.lost().await {
        Some(why) => why,
        None => std::future::pending().await,
    }
}

/// Drops peer `id` if it has not said `Hello` within `auth_timeout` of its connecting (as
/// dbus-daemon does), or if newer connections push it out first; once it has, does nothing.
async fn close_unless_joined(shared: Rc<Shared>, ticket: Rc<Ticket>, id: PeerId) {
    let Some(why) = ticket.lost().await else {
        return;
    };
    if why == Lost::TimedOut && log_limit::INCOMPLETE_CLOSED.allow() {
        let limit = shared.bus.borrow().limits().auth_timeout;
        info!(
            peer = %format!(":1.{id}"),
            uid = ticket.uid,
            "disconnecting: no Hello within auth_timeout ({} ms)",
            limit.as_millis()
        );
    } else {
        debug!(peer = id, "disconnecting before Hello: {why:?}");
    }
    shared.bus.borrow_mut().disconnect(id);
    shared.schedule_flush();
}

/// Reads, hands to the core, and waits, until the connection closes. Each turn handles at most
/// `MESSAGES_PER_TURN` messages; a connection with more to do yields before its next turn, so
/// every other ready connection (and the flusher) runs between two of its turns.
async fn run(
    shared: &Shared,
    conn: &Conn,
    id: PeerId,
    reader: &mut FrameReader,
) -> Result<(), WireError> {
    let mut batch = Vec::new();
    let frame_limits = shared.bus.borrow().limits().frame;
    reader.drain_leftover(&frame_limits, &mut batch)?;
    let mut more = turn(shared, conn, id, reader, &mut batch, false)?;
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
            // The rest of a turn cut short: the others run first (tokio wakes a yielded task
            // only after it has polled the sockets again).
            () = tokio::task::yield_now(), if more => {
                more = turn(shared, conn, id, reader, &mut batch, !paused)?;
            }
            ready = conn.socket.readable(), if !paused && !more => {
                ready.map_err(WireError::Io)?;
                more = turn(shared, conn, id, reader, &mut batch, true)?;
            }
            () = sleep_until_some(fds_deadline), if fds_deadline.is_some() => {
                if log_limit::PROTOCOL_VIOLATION.allow() {
                    let limit = shared.bus.borrow().limits().pending_fd_timeout;
                    warn!(
                        peer = %format!(":1.{id}"),
                        "disconnecting: Unix fds have been pending for too long \
                         (pending_fd_timeout={} ms)",
                        limit.as_millis()
                    );
                }
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
    deadline.or_else(|| Some(Instant::now() + shared.bus.borrow().limits().pending_fd_timeout))
}

/// Waits until `deadline`; forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One turn: hands the core at most `MESSAGES_PER_TURN` messages, those read before first,
/// reading (when `read`) at most `READS_PER_TURN` times for more. Returns whether the
/// connection has more to do at once: messages read and not yet handled, or a socket not
/// drained. Messages that arrived before an invalid one are all handled before the error.
fn turn(
    shared: &Shared,
    conn: &Conn,
    id: PeerId,
    reader: &mut FrameReader,
    batch: &mut Vec<Message>,
    mut read: bool,
) -> Result<bool, WireError> {
    let frame_limits = shared.bus.borrow().limits().frame;
    let started = std::time::Instant::now();
    let mut budget = MESSAGES_PER_TURN;
    let mut reads = 0;
    loop {
        budget -= dispatch(shared, id, batch, budget, started);
        if conn.closing.get() {
            return Ok(false);
        }
        if !batch.is_empty() {
            return Ok(true);
        }
        // The core may have paused this sender while handling its messages.
        if !read || conn.paused.get() {
            return Ok(false);
        }
        if budget == 0 || reads == READS_PER_TURN || started.elapsed() >= TURN_TIME {
            return Ok(true);
        }
        reads += 1;
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
            Ok(Ok(_)) => {}
            Ok(Err(invalid)) => {
                dispatch(shared, id, batch, usize::MAX, None);
                return Err(invalid);
            }
            // Drained: what this read brought is handled, within the budget, and no more read.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => read = false,
            Err(e) => return Err(WireError::Io(e)),
        }
    }
}

/// Hands the first messages of the batch to the bus core, in order: at most `limit`, and none
/// once the turn that began at `started` has run for `TURN_TIME` (one costly message, such as a
/// broadcast to thousands, ends it early). Has the flusher write what the core queued. Returns
/// how many it handed over.
fn dispatch(
    shared: &Shared,
    id: PeerId,
    batch: &mut Vec<Message>,
    limit: usize,
    started: impl Into<Option<std::time::Instant>>,
) -> usize {
    let started = started.into();
    let mut count = 0;
    let mut messages = std::mem::take(batch).into_iter();
    let mut bus = shared.bus.borrow_mut();
    while count < limit && started.is_none_or(|t| t.elapsed() < TURN_TIME) {
        let Some(msg) = messages.next() else {
            break;
        };
        bus.dispatch(id, msg);
        count += 1;
    }
    drop(bus);
    // What is left stays for the next turn (in the same buffer).
    *batch = messages.collect();
    if count > 0 {
        shared.schedule_flush();
    }
    count
}

/// The peer's uid, pid and groups from the kernel.
fn peer_credentials(stream: BorrowedFd<'_>) -> io::Result<Credentials> {
    use nix::sys::socket::{getsockopt, sockopt};
    let cred = getsockopt(&stream, sockopt::PeerCredentials).map_err(io::Error::from)?;
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
fn peer_groups(stream: BorrowedFd<'_>, gid: u32) -> Vec<u32> {
    let mut gids = vec![gid];
    for other in supplementary_groups(stream).unwrap_or_default() {
        if !gids.contains(&other) {
            gids.push(other);
        }
    }
    gids
}

/// `SO_PEERGROUPS`: the peer's supplementary groups.
fn supplementary_groups(stream: BorrowedFd<'_>) -> Option<Vec<u32>> {
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
