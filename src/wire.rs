//! The D-Bus wire format at the level the bus needs it: cutting a byte stream into whole
//! messages (with the file descriptors that came along), checking each one once, and writing
//! queued messages out with vectored `sendmsg` calls.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use zbus::Message;
use zbus::names::UniqueName;
use zbus::wire::Endian;
use zbus::wire::serialized::{Context, Data};

/// The largest message the specification allows (128 MiB).
pub const MAX_MESSAGE_SIZE: usize = 1 << 27;
/// The fixed part of the header plus the length of the header-field array.
const FIXED_HEADER: usize = 16;
/// How many bytes one read takes at most.
const READ_CHUNK: usize = 128 * 1024;
/// How many file descriptors one read can carry.
const MAX_FDS_PER_READ: usize = 64;

/// Why a connection's byte stream cannot be read as messages.
#[derive(Debug)]
pub enum WireError {
    Io(io::Error),
    /// The peer closed the connection.
    Closed,
    /// The bytes are not a valid message; the text says why.
    Invalid(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "I/O error: {e}"),
            WireError::Closed => f.write_str("connection closed by peer"),
            WireError::Invalid(why) => write!(f, "invalid message: {why}"),
        }
    }
}

fn invalid(why: impl Into<String>) -> WireError {
    WireError::Invalid(why.into())
}

/// The total length of the message whose first 16 bytes are `head`.
fn frame_len(head: &[u8], max_size: usize) -> Result<usize, WireError> {
    let endian = match head[0] {
        b'l' => Endian::Little,
        b'B' => Endian::Big,
        other => return Err(invalid(format!("bad endianness byte {other:#04x}"))),
    };
    let u32_at = |at: usize| {
        let b = [head[at], head[at + 1], head[at + 2], head[at + 3]];
        match endian {
            Endian::Little => u32::from_le_bytes(b),
            Endian::Big => u32::from_be_bytes(b),
        }
    };
    let body = u32_at(4) as usize;
    let fields = u32_at(12) as usize;
    // Each length alone is at most 2^27, so the sum cannot overflow.
    if body > MAX_MESSAGE_SIZE || fields > MAX_MESSAGE_SIZE {
        return Err(invalid("message length exceeds the maximum"));
    }
    let total = (FIXED_HEADER + fields).next_multiple_of(8) + body;
    if total > max_size {
        return Err(invalid(format!(
            "message of {total} bytes exceeds the limit of {max_size}"
        )));
    }
    Ok(total)
}

/// Cuts a connection's incoming bytes into messages.
pub struct FrameReader {
    /// The start of a message not yet complete. Empty between messages, so an idle connection
    /// holds no buffer.
    partial: Vec<u8>,
    /// File descriptors received and not yet claimed by a message.
    fds: VecDeque<OwnedFd>,
    /// The connection's unique name, stamped into each message's header as it is copied.
    sender: String,
}

impl FrameReader {
    /// A reader for the connection named `sender`, starting with bytes already read (those
    /// that followed `BEGIN` in the handshake).
    pub fn new(sender: String, leftover: Vec<u8>) -> FrameReader {
        FrameReader {
            partial: leftover,
            fds: VecDeque::new(),
            sender,
        }
    }

    /// Whether fds have arrived for a message that is not complete yet.
    pub fn holds_fds(&self) -> bool {
        !self.fds.is_empty()
    }

    /// Reads what the socket has (without blocking) and appends each whole, valid message to
    /// `out`. Returns whether the socket was drained: the read was short, and brought no fds
    /// (the kernel ends a read after bytes that carried fds, whatever follows them).
    pub fn read(
        &mut self,
        fd: RawFd,
        scratch: &mut Vec<u8>,
        limits: &FrameLimits,
        out: &mut Vec<Message>,
    ) -> Result<bool, WireError> {
        if let Some(missing) = self.missing_bytes(limits)?.filter(|&m| m > READ_CHUNK) {
            return self.read_large(fd, missing, limits, out);
        }
        scratch.resize(READ_CHUNK, 0);
        let fds_before = self.fds.len();
        let n = recv(fd, scratch, &mut self.fds)?;
        let drained = n < READ_CHUNK && self.fds.len() == fds_before;
        self.take_messages(&scratch[..n], limits, out)?;
        Ok(drained)
    }

    /// How many bytes the partial message still lacks, once its length is known.
    fn missing_bytes(&self, limits: &FrameLimits) -> Result<Option<usize>, WireError> {
        if self.partial.len() < FIXED_HEADER {
            return Ok(None);
        }
        let total = frame_len(&self.partial, limits.max_message_size)?;
        Ok(Some(total.saturating_sub(self.partial.len())))
    }

    /// Reads the rest of a large message straight into its buffer, saving a copy of each byte.
    fn read_large(
        &mut self,
        fd: RawFd,
        missing: usize,
        limits: &FrameLimits,
        out: &mut Vec<Message>,
    ) -> Result<bool, WireError> {
        self.partial.reserve_exact(missing);
        let spare = &mut self.partial.spare_capacity_mut()[..missing];
        // SAFETY: the kernel only writes into this memory; the bytes it reports are then set.
        let buf = unsafe { &mut *(spare as *mut [std::mem::MaybeUninit<u8>] as *mut [u8]) };
        let fds_before = self.fds.len();
        let n = recv(fd, buf, &mut self.fds)?;
        // SAFETY: `recv` initialized `n` bytes past the old length, within the reserved capacity.
        unsafe { self.partial.set_len(self.partial.len() + n) };
        let drained = n < missing && self.fds.len() == fds_before;
        if n == missing {
            let whole = std::mem::take(&mut self.partial);
            out.push(self.parse(&whole, limits)?);
        }
        Ok(drained)
    }

    /// Parses whatever complete messages the bytes held so far form (used for the handshake's
    /// leftover before the first read).
    pub fn drain_leftover(
        &mut self,
        limits: &FrameLimits,
        out: &mut Vec<Message>,
    ) -> Result<(), WireError> {
        let partial = std::mem::take(&mut self.partial);
        self.take_messages(&partial, limits, out)
    }

    fn take_messages(
        &mut self,
        mut data: &[u8],
        limits: &FrameLimits,
        out: &mut Vec<Message>,
    ) -> Result<(), WireError> {
        if !self.partial.is_empty() {
            data = self.complete_partial(data, limits, out)?;
        }
        while data.len() >= FIXED_HEADER {
            let total = frame_len(data, limits.max_message_size)?;
            if data.len() < total {
                break;
            }
            out.push(self.parse(&data[..total], limits)?);
            data = &data[total..];
        }
        if !data.is_empty() {
            self.partial.extend_from_slice(data);
        }
        Ok(())
    }

    /// Feeds bytes into the partial message; returns the bytes that remain after it.
    fn complete_partial<'d>(
        &mut self,
        mut data: &'d [u8],
        limits: &FrameLimits,
        out: &mut Vec<Message>,
    ) -> Result<&'d [u8], WireError> {
        if self.partial.len() < FIXED_HEADER {
            let take = (FIXED_HEADER - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < FIXED_HEADER {
                return Ok(data);
            }
        }
        let total = frame_len(&self.partial, limits.max_message_size)?;
        self.partial
            .reserve_exact(total.saturating_sub(self.partial.len()));
        let take = (total - self.partial.len()).min(data.len());
        self.partial.extend_from_slice(&data[..take]);
        if self.partial.len() == total {
            let whole = std::mem::take(&mut self.partial);
            out.push(self.parse(&whole, limits)?);
        }
        Ok(&data[take..])
    }

    /// A header with a field whose value `stamp` cannot walk (an undefined field of some other
    /// type): zbus's parser reads it, with undefined fields dropped first if there are any, and
    /// the sender is stamped after.
    fn parse_unreadable_header(
        &self,
        bytes: &[u8],
        endian: Endian,
        fds: Vec<OwnedFd>,
    ) -> Result<Message, WireError> {
        let data = Data::new_fds(bytes.to_vec(), Context::new(endian, 0), fds);
        // SAFETY: `from_bytes` checks the header itself; the body is checked by the caller.
        let msg = match unsafe { Message::from_bytes(data.clone()) } {
            Ok(msg) => msg,
            Err(e) => crate::header_filter::without_unknown_fields(&data)
                // SAFETY: as above.
                .and_then(|filtered| unsafe { Message::from_bytes(filtered) }.ok())
                .ok_or_else(|| invalid(format!("bad header: {e}")))?,
        };
        msg.with_sender(&UniqueName::from_str_unchecked(&self.sender))
            .map_err(|e| invalid(format!("cannot stamp the sender: {e}")))
    }

    /// Checks one whole message, stamped with the connection's name as it is copied: header, then
    /// body against its signature.
    fn parse(&mut self, bytes: &[u8], limits: &FrameLimits) -> Result<Message, WireError> {
        let endian = if bytes[0] == b'B' {
            Endian::Big
        } else {
            Endian::Little
        };
        let nfds = declared_fds(bytes, endian);
        if nfds > limits.max_fds {
            return Err(invalid(format!(
                "message carries {nfds} file descriptors, more than {}",
                limits.max_fds
            )));
        }
        if nfds > self.fds.len() {
            return Err(invalid(format!(
                "message declares {nfds} file descriptors but {} arrived",
                self.fds.len()
            )));
        }
        let fds: Vec<OwnedFd> = self.fds.drain(..nfds).collect();
        let stamped =
            stamp(bytes, endian, &self.sender).filter(|b| b.len() <= limits.max_message_size);
        let msg = match stamped {
            // SAFETY: `from_bytes` checks the header itself; the body is checked right below,
            // before anything reads it.
            Some(stamped) => {
                unsafe { Message::from_bytes(Data::new_fds(stamped, Context::new(endian, 0), fds)) }
                    .map_err(|e| invalid(format!("bad header: {e}")))?
            }
            None => self.parse_unreadable_header(bytes, endian, fds)?,
        };
        msg.body()
            .validate()
            .map_err(|e| invalid(format!("bad body: {e}")))?;
        Ok(msg)
    }
}

/// One `recvmsg`: the bytes into `buf`, any file descriptors that came with them onto `received_fds`.
fn recv(
    fd: RawFd,
    buf: &mut [u8],
    received_fds: &mut VecDeque<OwnedFd>,
) -> Result<usize, WireError> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(|e| WireError::Io(e.into()))?;
    let n = msg.bytes;
    for c in msg.cmsgs().map_err(|e| WireError::Io(e.into()))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just handed us these descriptors; nothing else owns them.
            received_fds.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(invalid("too many file descriptors in one read"));
    }
    if n == 0 {
        return Err(WireError::Closed);
    }
    Ok(n)
}

/// Header field codes the reader looks at before the header is checked properly.
const SENDER_FIELD: u8 = 7;
const UNIX_FDS_FIELD: u8 = 9;
/// The highest field code the specification defines.
const MAX_KNOWN_FIELD: u8 = 9;

fn u32_at(bytes: &[u8], at: usize, endian: Endian) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(match endian {
        Endian::Little => u32::from_le_bytes(b),
        Endian::Big => u32::from_be_bytes(b),
    })
}

/// Walks the header fields of a message, calling `f` with each field's code, its value if it is
/// a `u32`, and the bytes of the whole field, until `f` returns false. Returns false if the walk
/// met a field it cannot read. The header is checked properly later; here a malformed one just
/// ends the walk.
fn walk_fields(
    bytes: &[u8],
    endian: Endian,
    mut f: impl FnMut(u8, Option<u32>, Range<usize>) -> bool,
) -> bool {
    let Some(fields_len) = u32_at(bytes, 12, endian) else {
        return false;
    };
    let end = (FIXED_HEADER + fields_len as usize).min(bytes.len());
    let mut at = FIXED_HEADER;
    while at + 4 <= end {
        let code = bytes[at];
        let sig_len = bytes[at + 1] as usize;
        let sig = bytes.get(at + 2..at + 2 + sig_len).unwrap_or(b"");
        let value_at = at + 2 + sig_len + 1;
        let (value_end, value) = match sig {
            b"u" => {
                let v = value_at.next_multiple_of(4);
                (v + 4, u32_at(bytes, v, endian))
            }
            b"s" | b"o" => {
                let v = value_at.next_multiple_of(4);
                (
                    v + 4 + u32_at(bytes, v, endian).unwrap_or(0) as usize + 1,
                    None,
                )
            }
            b"g" => (
                value_at + 1 + *bytes.get(value_at).unwrap_or(&0) as usize + 1,
                None,
            ),
            _ => return false,
        };
        if value_end > end || !f(code, value, at..value_end) {
            return value_end <= end;
        }
        at = value_end.next_multiple_of(8);
    }
    true
}

/// The value of the UNIX_FDS header field, 0 if there is none.
fn declared_fds(bytes: &[u8], endian: Endian) -> usize {
    let mut fds = 0;
    walk_fields(bytes, endian, |code, value, _| {
        if code == UNIX_FDS_FIELD {
            fds = value.unwrap_or(0) as usize;
        }
        code != UNIX_FDS_FIELD
    });
    fds
}

/// The message in `bytes` with the bus's stamp: a SENDER field naming `sender` in place of any
/// the client wrote, and without the header fields the specification does not define (it asks
/// that they be ignored; passing them on is what it leaves open, and dropping them keeps every
/// receiver's parser happy). It is built while the bytes are copied anyway, so that the message
/// is parsed once and never copied again. `None` if a field cannot be read: the header is then
/// refused by the real parser.
fn stamp(bytes: &[u8], endian: Endian, sender: &str) -> Option<Vec<u8>> {
    let fields_end = FIXED_HEADER + u32_at(bytes, 12, endian)? as usize;
    let body = bytes.get(fields_end.next_multiple_of(8)..)?;
    let write_u32 = |out: &mut Vec<u8>, value: usize| {
        let value = value as u32;
        out.extend_from_slice(&match endian {
            Endian::Little => value.to_le_bytes(),
            Endian::Big => value.to_be_bytes(),
        });
    };
    let mut out = Vec::with_capacity(fields_end + 16 + sender.len() + body.len());
    out.extend_from_slice(&bytes[..12]);
    write_u32(&mut out, 0); // the length of the fields, known at the end
    // Each field starts on an 8-byte boundary in both messages, so copied whole it stays aligned.
    let complete = walk_fields(bytes, endian, |code, _, field| {
        if (1..=MAX_KNOWN_FIELD).contains(&code) && code != SENDER_FIELD {
            out.resize(out.len().next_multiple_of(8), 0);
            out.extend_from_slice(&bytes[field]);
        }
        true
    });
    if !complete {
        return None;
    }
    out.resize(out.len().next_multiple_of(8), 0);
    out.extend_from_slice(&[SENDER_FIELD, 1, b's', 0]);
    write_u32(&mut out, sender.len());
    out.extend_from_slice(sender.as_bytes());
    out.push(0);
    let fields_len = out.len() - FIXED_HEADER;
    out[12..16].copy_from_slice(&match endian {
        Endian::Little => (fields_len as u32).to_le_bytes(),
        Endian::Big => (fields_len as u32).to_be_bytes(),
    });
    out.resize(out.len().next_multiple_of(8), 0);
    out.extend_from_slice(body);
    Some(out)
}

/// The size limits that reading enforces.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    pub max_message_size: usize,
    pub max_fds: usize,
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FrameLimits {
        FrameLimits {
            max_message_size: MAX_MESSAGE_SIZE,
            max_fds: 16,
        }
    }

    /// A little-endian message with one more header field (its bytes as given) after the others.
    fn with_extra_field(msg: &Message, field: &[u8]) -> Vec<u8> {
        let bytes = msg.data().bytes();
        let fields_end = 16 + u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        let mut out = bytes[..fields_end].to_vec();
        out.resize(fields_end.next_multiple_of(8), 0);
        out.extend_from_slice(field);
        let new_len = (out.len() - 16) as u32;
        out[12..16].copy_from_slice(&new_len.to_le_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
        out.extend_from_slice(&bytes[fields_end.next_multiple_of(8)..]);
        out
    }

    fn reader() -> FrameReader {
        FrameReader::new(":1.7".into(), Vec::new())
    }

    fn call() -> Message {
        Message::method_call("/a", "Ping")
            .interface("org.example.I")
            .destination("org.example")
            .build(&("hello", 42u32))
            .unwrap()
    }

    #[test]
    fn cuts_messages_split_at_any_byte() {
        let bytes = [call().data().bytes(), call().data().bytes()].concat();
        for cut in 0..bytes.len() {
            let mut reader = reader();
            let mut out = Vec::new();
            reader
                .take_messages(&bytes[..cut], &limits(), &mut out)
                .unwrap();
            reader
                .take_messages(&bytes[cut..], &limits(), &mut out)
                .unwrap();
            assert_eq!(out.len(), 2, "cut at {cut}");
            assert!(reader.partial.is_empty());
        }
    }

    #[test]
    fn rejects_garbage_and_oversized_messages() {
        let err = reader()
            .take_messages(&[b'x'; 32], &limits(), &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("endianness"));

        let mut big = call().data().bytes().to_vec();
        big[4..8].copy_from_slice(&(200u32 << 20).to_le_bytes());
        let err = reader()
            .take_messages(&big, &limits(), &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[test]
    fn rejects_a_body_that_does_not_match_its_signature() {
        let mut bytes = call().data().bytes().to_vec();
        // The string's length field is the first 4 bytes of the body; make it run past the end.
        let body_start = bytes.len() - 16;
        bytes[body_start..body_start + 4].copy_from_slice(&1000u32.to_le_bytes());
        let err = reader()
            .take_messages(&bytes, &limits(), &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("bad body"), "{err}");
    }

    #[test]
    fn claims_the_declared_file_descriptors() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let msg = Message::method_call("/a", "Take")
            .build(&(zbus::Fd::from(&file),))
            .unwrap();
        let bytes = msg.data().bytes();
        assert_eq!(declared_fds(bytes, Endian::Little), 1);

        let err = reader()
            .take_messages(bytes, &limits(), &mut Vec::new())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("declares 1 file descriptors but 0 arrived"),
            "{err}"
        );

        let mut reader = reader();
        reader
            .fds
            .push_back(OwnedFd::from(file.try_clone().unwrap()));
        let mut out = Vec::new();
        reader.take_messages(bytes, &limits(), &mut out).unwrap();
        assert_eq!(out[0].data().fds().len(), 1);
        assert!(reader.fds.is_empty());
    }

    #[test]
    fn stamps_the_sender_while_copying() {
        let mut out = Vec::new();
        reader()
            .take_messages(call().data().bytes(), &limits(), &mut out)
            .unwrap();
        let msg = &out[0];
        assert_eq!(msg.header().sender().unwrap().as_str(), ":1.7");
        assert_eq!(
            msg.body().deserialize::<(String, u32)>().unwrap(),
            ("hello".into(), 42)
        );
        assert_eq!(msg.header().member().unwrap().as_str(), "Ping");
        assert_eq!(msg.header().destination().unwrap().as_str(), "org.example");

        // Big-endian too.
        let be = Message::signal("/p", "a.B", "C")
            .endian(Endian::Big)
            .build(&(7u8,))
            .unwrap();
        let mut out = Vec::new();
        reader()
            .take_messages(be.data().bytes(), &limits(), &mut out)
            .unwrap();
        assert_eq!(out[0].header().sender().unwrap().as_str(), ":1.7");
        assert_eq!(out[0].body().deserialize::<u8>().unwrap(), 7);
    }

    #[test]
    fn replaces_a_forged_sender() {
        let forged = Message::signal("/p", "a.B", "C")
            .sender(":1.99")
            .build(&("x",))
            .unwrap();
        let mut out = Vec::new();
        reader()
            .take_messages(forged.data().bytes(), &limits(), &mut out)
            .unwrap();
        assert_eq!(out[0].header().sender().unwrap().as_str(), ":1.7");
        assert_eq!(out[0].body().deserialize::<String>().unwrap(), "x");
    }

    #[test]
    fn drops_header_fields_the_specification_does_not_define() {
        // A signal with an extra field of code 42 (a string) inserted before the body.
        let plain = Message::signal("/p", "a.B", "C").build(&("body",)).unwrap();
        let extra = with_extra_field(&plain, &[42, 1, b's', 0, 3, 0, 0, 0, b'x', b'y', b'z', 0]);

        let mut out = Vec::new();
        reader().take_messages(&extra, &limits(), &mut out).unwrap();
        assert_eq!(out[0].header().member().unwrap().as_str(), "C");
        assert_eq!(out[0].header().sender().unwrap().as_str(), ":1.7");
        assert_eq!(out[0].body().deserialize::<String>().unwrap(), "body");
    }

    #[test]
    fn an_undefined_field_of_another_type_is_dropped_and_the_sender_still_stamped() {
        let forged = Message::signal("/p", "a.B", "C")
            .sender(":1.99")
            .build(&("body",))
            .unwrap();
        // Code 50, a variant of type "ay" holding [1, 2].
        let extra = with_extra_field(&forged, &[50, 2, b'a', b'y', 0, 0, 0, 0, 2, 0, 0, 0, 1, 2]);

        let mut out = Vec::new();
        reader().take_messages(&extra, &limits(), &mut out).unwrap();
        assert_eq!(out[0].header().sender().unwrap().as_str(), ":1.7");
        assert_eq!(out[0].body().deserialize::<String>().unwrap(), "body");
    }
}
