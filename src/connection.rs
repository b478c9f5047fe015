//! A client connection as the bus core holds it: its number, who is at the other end, and
//! what the core shares with the connection's task (the socket, the messages waiting to be
//! written, and a way to wake the task). The task itself is in `peer_task`.

use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;

use tokio::sync::Notify;
use tracing::debug;

use crate::socket::Socket;
use crate::wire::Outbox;

/// A connection's number: its unique name is `:1.<id>`.
pub type PeerId = u64;

/// What the bus and a connection's task share: the socket, the messages waiting to be written
/// to it, and a way to wake the task.
pub struct Conn {
    pub socket: Socket,
    pub outbox: RefCell<Outbox>,
    /// Wakes the connection's task: to wait until the socket takes more, or to close.
    pub wake: Notify,
    /// The bus has dropped this connection; its task ends.
    pub closing: Cell<bool>,
    /// The socket took less than the outbox held: the task waits until it takes more.
    pub write_blocked: Cell<bool>,
    /// The bus holds as much of this sender's messages as `max_incoming_bytes` and
    /// `max_incoming_unix_fds` allow: its socket is not read until they are delivered.
    pub paused: Cell<bool>,
}

impl Conn {
    pub fn new(socket: Socket) -> Rc<Conn> {
        Rc::new(Conn {
            socket,
            outbox: RefCell::new(Outbox::default()),
            wake: Notify::new(),
            closing: Cell::new(false),
            write_blocked: Cell::new(false),
            paused: Cell::new(false),
        })
    }

    /// Writes what the socket takes now; what it does not take waits for the task.
    pub fn flush(&self) {
        let result = self.outbox.borrow_mut().flush(self.socket.as_raw_fd());
        let blocked = matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        self.write_blocked.set(blocked);
        match result {
            Ok(()) => {}
            Err(_) if blocked => self.wake.notify_one(),
            Err(e) => {
                debug!("write failed: {e}");
                self.closing.set(true);
                self.wake.notify_one();
            }
        }
    }
}

/// Who is at the other end of a connection, as the kernel tells it.
#[derive(Debug)]
pub struct Credentials {
    pub uid: u32,
    pub pid: u32,
    pub gids: Vec<u32>,
    pub security_label: Option<Vec<u8>>,
    /// The client authenticated with ANONYMOUS: the bus does not vouch for its uid.
    pub anonymous: bool,
}

impl Credentials {
    /// The uid and groups the policy judges: for an anonymous client, the uid -1 and no
    /// groups, so that no `user` or `group` rule is about it, as in dbus-daemon.
    pub fn policy_identity(&self) -> (u32, &[u32]) {
        if self.anonymous {
            (u32::MAX, &[])
        } else {
            (self.uid, &self.gids)
        }
    }
}
