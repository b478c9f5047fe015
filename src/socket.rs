//! A client's socket once it has authenticated, registered with the runtime for reading only.
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
use tokio::net::UnixStream;

pub struct Socket {
    fd: AsyncFd<OwnedFd>,
}

impl Socket {
    /// Takes over an authenticated stream: it leaves tokio's registration for both directions
    /// and joins the runtime again for reading only.
    pub fn new(stream: UnixStream) -> io::Result<Socket> {
        let fd = OwnedFd::from(stream.into_std()?);
        Ok(Socket {
            fd: register(fd, Interest::READABLE)?,
        })
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
