//! Writing a connection's queued messages out with vectored `sendmsg` calls.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use zbus::Message;

/// Messages waiting to be written to one connection.
#[derive(Default)]
pub struct Outbox {
    queue: VecDeque<Message>,
    /// How much of the front message has been written already.
    offset: usize,
    /// Bytes queued and not yet written.
    bytes: usize,
    /// Fds of the queued messages, until each message is written whole.
    fds: usize,
}

/// How many messages one `sendmsg` call covers at most: Linux's IOV_MAX. A broadcast burst or a
/// pipelined client fills a receiver's queue with many small messages, and each write that takes
/// more of them is one wakeup less for the receiver.
const MAX_IOVECS: usize = 1024;

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    pub fn queued_fds(&self) -> usize {
        self.fds
    }

    pub fn push(&mut self, msg: Message) {
        self.bytes += msg.data().len();
        self.fds += msg.data().fds().len();
        self.queue.push_back(msg);
    }

    /// Writes as much as the socket takes without blocking. Fails with `WouldBlock` when the
    /// socket is full before the queue is empty.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<()> {
        while !self.queue.is_empty() {
            let written = match self.send_some(fd) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            self.advance(written);
        }
        // Give back the memory of a burst once it is written.
        if self.queue.capacity() > 64 {
            self.queue.shrink_to(8);
        }
        Ok(())
    }

    /// One `sendmsg` over the front messages. The file descriptors of a message go with its
    /// first byte, so a batch stops before the next message that carries any.
    fn send_some(&self, fd: RawFd) -> nix::Result<usize> {
        // On the stack: this runs for every message the bus writes.
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let mut count = 0;
        for (i, msg) in self.queue.iter().take(MAX_IOVECS).enumerate() {
            let bytes = msg.data().bytes();
            if i == 0 {
                iov[0] = IoSlice::new(&bytes[self.offset..]);
            } else if !msg.data().fds().is_empty() {
                break;
            } else {
                iov[i] = IoSlice::new(bytes);
            }
            count = i + 1;
        }
        let front_fds = self.queue.front().map_or(&[][..], |m| m.data().fds());
        let fds: Vec<RawFd> = if self.offset == 0 {
            front_fds.iter().map(|f| f.as_raw_fd()).collect()
        } else {
            Vec::new()
        };
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            fd,
            &iov[..count],
            cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        )
    }

    fn advance(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let Some(front) = self.queue.front() else {
                break;
            };
            let left = front.data().len() - self.offset;
            if written >= left {
                written -= left;
                self.offset = 0;
                self.fds -= front.data().fds().len();
                self.queue.pop_front();
            } else {
                self.offset += written;
                written = 0;
            }
        }
    }
}
