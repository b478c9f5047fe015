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

/// Up to this many messages, one `sendmsg`'s iovecs live on the stack.
const SMALL_BATCH: usize = 16;

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
        let count = self.batch_len();
        // This runs for every message the bus writes, most often for one or a few: a small
        // array on the stack holds those without filling all of `MAX_IOVECS` slots first (that
        // was a 16 KiB memset per write), and one allocation serves a batch of more.
        if count <= SMALL_BATCH {
            let mut iov = [IoSlice::new(&[]); SMALL_BATCH];
            for (slot, bytes) in iov.iter_mut().zip(self.batch(count)) {
                *slot = IoSlice::new(bytes);
            }
            self.send_iov(fd, &iov[..count])
        } else {
            let iov: Vec<IoSlice> = self.batch(count).map(IoSlice::new).collect();
            self.send_iov(fd, &iov)
        }
    }

    /// How many front messages the next `sendmsg` covers: at most `MAX_IOVECS`, and none after
    /// the first that carries file descriptors.
    fn batch_len(&self) -> usize {
        let rest = self.queue.iter().skip(1).take(MAX_IOVECS - 1);
        self.queue.len().min(1) + rest.take_while(|m| m.data().fds().is_empty()).count()
    }

    /// The bytes of the first `count` messages still to write.
    fn batch(&self, count: usize) -> impl Iterator<Item = &[u8]> {
        self.queue.iter().take(count).enumerate().map(|(i, msg)| {
            let bytes = msg.data().bytes();
            if i == 0 { &bytes[self.offset..] } else { bytes }
        })
    }

    /// Sends `iov`, with the front message's file descriptors when its first byte is in it.
    fn send_iov(&self, fd: RawFd, iov: &[IoSlice<'_>]) -> nix::Result<usize> {
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
            iov,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn call(n: u32) -> Message {
        Message::method_call("/a", "Ping").build(&(n,)).unwrap()
    }

    /// Every queued message arrives whole and in order, whether a write covers a few messages
    /// (iovecs on the stack) or many (iovecs allocated), and when a message with fds among them
    /// ends a batch (that its fds reach the receiver is tests/bus.rs's to check).
    #[test]
    fn writes_small_and_large_batches_in_order_with_fds() {
        let (mut theirs, ours) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let with_fd = Message::method_call("/a", "Take")
            .build(&(zbus::Fd::from(&file),))
            .unwrap();
        let mut outbox = Outbox::default();
        let mut expected = Vec::new();
        for n in 0..3 {
            let msg = call(n);
            expected.extend_from_slice(msg.data().bytes());
            outbox.push(msg);
        }
        outbox.flush(ours.as_raw_fd()).unwrap();
        for n in 3..(3 + 2 * SMALL_BATCH as u32) {
            if n == 20 {
                expected.extend_from_slice(with_fd.data().bytes());
                outbox.push(with_fd.clone());
            }
            let msg = call(n);
            expected.extend_from_slice(msg.data().bytes());
            outbox.push(msg);
        }
        assert_eq!(outbox.queued_fds(), 1);
        outbox.flush(ours.as_raw_fd()).unwrap();
        assert!(outbox.is_empty());
        assert_eq!((outbox.queued_bytes(), outbox.queued_fds()), (0, 0));
        drop(ours);
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, expected);
    }
}
