//! A client's socket from `accept` to `close`, registered with the runtime for reading only, and
//! the listening socket that accepts it.
//!
//! A socket registered for writing too (as tokio's `UnixStream` always is) raises an `EPOLLOUT`
//! edge each time its client reads what the bus wrote, and each such edge wakes the bus for
//! nothing: once per delivered message. Worse, the socket then sits in the kernel's ready list
//! ahead of sockets whose data arrived earlier, so the bus would read a reply that was sent
//! after a call before the call. Write readiness is asked for only while a write waits, through
//! a second registration of a duplicate of the socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub struct Socket {
    fd: AsyncFd<OwnedFd>,
}

impl Socket {
    /// Registers a freshly accepted (non-blocking) socket for reading only. The connection
    /// keeps this one registration from `accept` to `close`, handshake included: one
    /// `epoll_ctl` to add it and one to remove it.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Socket> {
        Ok(Socket {
            fd: register(fd, Interest::READABLE)?,
        })
    }

    /// One non-blocking write of `bytes` (no `SIGPIPE`); `WouldBlock` when the socket is full.
    pub fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        use nix::sys::socket::{MsgFlags, send};
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        send(self.as_raw_fd(), bytes, flags).map_err(io::Error::from)
    }

    /// Waits until the socket may have something to read.
    pub async fn readable(&self) -> io::Result<()> {
        // The guard is dropped without clearing: `try_read` clears when a read finds nothing.
        self.fd.readable().await.map(drop)
    }

    /// Runs `read` on the socket; a `WouldBlock` from it clears the read readiness.
    pub fn try_read<R>(&self, read: impl FnOnce(RawFd) -> io::Result<R>) -> io::Result<R> {
        self.fd
            .try_io(Interest::READABLE, |fd| read(fd.as_raw_fd()))
    }

    /// Waits until the socket takes more bytes. Registers a duplicate of the socket for write
    /// readiness for as long as the wait lasts; the kernel reports a socket that is writable
    /// already at once, so no edge is missed.
    pub async fn writable(&self) -> io::Result<()> {
        let duplicate = self.fd.get_ref().try_clone()?;
        let waiter = register(duplicate, Interest::WRITABLE)?;
        waiter.writable().await.map(drop)
    }
}

/// A listening socket, registered with the runtime for reading only (tokio's `UnixListener`
/// would register each accepted stream for both directions, to be registered again for reading
/// only after the handshake: two `epoll_ctl` calls per connection for nothing).
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
}

impl Listener {
    /// Takes over a listening socket that tokio registered.
    pub fn new(listener: tokio::net::UnixListener) -> io::Result<Listener> {
        let fd = OwnedFd::from(listener.into_std()?);
        Ok(Listener {
            fd: register(fd, Interest::READABLE)?,
        })
    }

    /// Waits for the next connection; it comes non-blocking and close-on-exec, not registered.
    pub async fn accept(&self) -> io::Result<OwnedFd> {
        use nix::sys::socket::{SockFlag, accept4};
        self.fd
            .async_io(Interest::READABLE, |fd| {
                let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
                let raw = accept4(fd.as_raw_fd(), flags).map_err(io::Error::from)?;
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
            })
            .await
    }
}

/// Registers `fd` with the runtime for `interest`.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which keeps it open, unchanged, until the
    // registration ends with it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
