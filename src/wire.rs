//! The D-Bus wire format at the level the bus needs it: cutting a byte stream into whole
//! messages (with the file descriptors that came along), checking each one once, and writing
//! queued messages out with vectored `sendmsg` calls.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tracing::debug;
use zbus::Message;
use zbus::names::UniqueName;
use zbus::wire::serialized::{Context, Data};
use zbus::wire::{Endian, Signature};

/// The largest message the specification allows (128 MiB).
pub const MAX_MESSAGE_SIZE: usize = 1 << 27;
/// The longest array the specification allows (64 MiB), the header-field array included.
pub const MAX_ARRAY_LEN: usize = 1 << 26;
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
    // Refused as soon as the fixed header is in: waiting for the bytes of a header that can never
    // be valid would hold the connection (and its buffer) for nothing.
    if fields > MAX_ARRAY_LEN {
        return Err(invalid(format!(
            "header field array of {fields} bytes exceeds the maximum of {MAX_ARRAY_LEN}"
        )));
    }
    // Each length alone is at most 2^27, so the sum cannot overflow.
    if body > MAX_MESSAGE_SIZE {
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
        check_body(&msg)?;
        Ok(msg)
    }
}

/// Checks the body against its signature. A Unix fd handle that points past the fds the message
/// brought is let through, as dbus-daemon and dbus-broker let it through, for the receiver to
/// refuse (dbus-python's tests count on it); everything else about the body must be valid.
fn check_body(msg: &Message) -> Result<(), WireError> {
    let bad_body = |e: zbus::Error| invalid(format!("bad body: {e}"));
    match msg.body().validate() {
        Ok(()) => Ok(()),
        Err(zbus::Error::UnknownFd) => {
            let copy = with_handles_as_u32(msg).ok_or_else(|| bad_body(zbus::Error::UnknownFd))?;
            copy.body().validate().map_err(bad_body)?;
            debug!(
                sender = ?msg.header().sender(),
                "passing on a message whose fd handles point past the fds it brought"
            );
            Ok(())
        }
        Err(e) => Err(bad_body(e)),
    }
}

/// A copy of `msg` in which every UNIX_FD type code of its signatures (the body's, and each
/// variant's in the body) reads UINT32, which is laid out the same way, and which declares no
/// fds: the validator then checks all of the body but the fd indexes. `None` if the body
/// cannot be walked, when the validator would refuse it anyway. (A header that kept an undefined
/// field of a type [`walk_fields`] cannot read may hide the SIGNATURE field from it: such a rare
/// message stays refused, as before.)
fn with_handles_as_u32(msg: &Message) -> Option<Message> {
    let bytes = msg.data().bytes();
    let endian = msg.data().context().endian();
    let body_start = bytes.len().checked_sub(msg.body().len())?;
    let mut walk = VariantSignatures {
        body: bytes.get(body_start..)?,
        endian,
        found: Vec::new(),
    };
    walk.value(msg.body().signature(), 0, 0)?;
    let mut copy = bytes.to_vec();
    let mut signatures: Vec<Range<usize>> = walk
        .found
        .iter()
        .map(|sig| body_start + sig.start..body_start + sig.end)
        .collect();
    let mut fds_value = None;
    walk_fields(bytes, endian, |code, _, field| {
        match code {
            // Code, signature "g", then the length byte, the signature and its 0.
            SIGNATURE_FIELD => signatures.push(field.start + 5..field.end - 1),
            // Code, signature "u", then the value, 8-aligned with the field.
            UNIX_FDS_FIELD => fds_value = Some(field.start + 4..field.end),
            _ => {}
        }
        true
    });
    for range in signatures {
        copy.get_mut(range)?
            .iter_mut()
            .filter(|code| **code == b'h')
            .for_each(|code| *code = b'u');
    }
    if let Some(range) = fds_value {
        copy.get_mut(range)?.fill(0);
    }
    // SAFETY: `from_bytes` checks the header; the caller validates the body before trusting it.
    unsafe { Message::from_bytes(Data::new(copy, Context::new(endian, 0))) }.ok()
}

/// Containers nested deeper than this end the walk (the validator refuses more than 64).
const MAX_WALK_DEPTH: usize = 128;

/// Finds where the signature of each variant of a body is, by walking the body's values by its
/// signature. The walk reads only the lengths it needs; the validator checks the rest.
struct VariantSignatures<'b> {
    body: &'b [u8],
    endian: Endian,
    /// The byte ranges of the variants' signatures, in the body.
    found: Vec<Range<usize>>,
}

impl VariantSignatures<'_> {
    /// Walks the value of type `sig` at `pos` (before its alignment); returns where it ends.
    fn value(&mut self, sig: &Signature, pos: usize, depth: usize) -> Option<usize> {
        if depth > MAX_WALK_DEPTH || sig.contains_maybe() {
            return None;
        }
        let pos = pos.checked_next_multiple_of(sig.alignment_dbus())?;
        let end = match sig {
            Signature::Unit => pos,
            Signature::Str | Signature::ObjectPath => {
                let len = u32_at(self.body, pos, self.endian)? as usize;
                pos.checked_add(len)?.checked_add(5)?
            }
            Signature::Signature => pos.checked_add(usize::from(*self.body.get(pos)?) + 2)?,
            Signature::Variant => self.variant(pos, depth)?,
            Signature::Array(element) => {
                let inside = element.to_string().contains('v');
                self.array(pos, element.alignment_dbus(), inside, |walk, at| {
                    walk.value(element, at, depth + 1)
                })?
            }
            Signature::Dict { key, value } => {
                let inside = value.to_string().contains('v');
                self.array(pos, 8, inside, |walk, at| {
                    let at = walk.value(key, at.checked_next_multiple_of(8)?, depth + 1)?;
                    walk.value(value, at, depth + 1)
                })?
            }
            Signature::Structure(fields) => fields
                .iter()
                .try_fold(pos, |at, field| self.value(field, at, depth + 1))?,
            // The fixed-size basic types are as long as they are aligned.
            fixed => pos.checked_add(fixed.alignment_dbus())?,
        };
        (end <= self.body.len()).then_some(end)
    }

    /// A variant at `pos`: its signature (recorded), then its value.
    fn variant(&mut self, pos: usize, depth: usize) -> Option<usize> {
        let start = pos.checked_add(1)?;
        let sig = start..start.checked_add(usize::from(*self.body.get(pos)?))?;
        let inner = Signature::from_bytes(self.body.get(sig.clone())?).ok()?;
        let value_at = sig.end.checked_add(1)?;
        self.found.push(sig);
        self.value(&inner, value_at, depth + 1)
    }

    /// An array at `pos` (4-aligned) whose first element is aligned to `align`; its elements are
    /// walked with `element` only when they can hold a variant (`inside`), and skipped otherwise.
    fn array(
        &mut self,
        pos: usize,
        align: usize,
        inside: bool,
        element: impl Fn(&mut Self, usize) -> Option<usize>,
    ) -> Option<usize> {
        let len = u32_at(self.body, pos, self.endian)? as usize;
        let first = pos.checked_add(4)?.checked_next_multiple_of(align)?;
        let end = first.checked_add(len)?;
        let mut at = first;
        while inside && at < end {
            let next = element(self, at)?;
            // Every element takes at least a byte: no walk can stall.
            (next > at).then_some(())?;
            at = next;
        }
        (end <= self.body.len()).then_some(end)
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
const SIGNATURE_FIELD: u8 = 8;
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

    /// A little-endian fixed header of a method call whose header-field array is `fields` long.
    fn fixed_header(fields: u32) -> Vec<u8> {
        let mut head = vec![b'l', 1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0];
        head.extend_from_slice(&fields.to_le_bytes());
        head
    }

    #[test]
    fn refuses_a_header_field_array_over_the_maximum_from_the_fixed_header_alone() {
        let over = fixed_header(MAX_ARRAY_LEN as u32 + 8);
        let err = reader()
            .take_messages(&over, &limits(), &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("header field array"), "{err}");

        // The same when the fixed header comes in two pieces.
        let mut split = reader();
        split
            .take_messages(&over[..10], &limits(), &mut Vec::new())
            .unwrap();
        let err = split
            .take_messages(&over[10..], &limits(), &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("header field array"), "{err}");

        // At the maximum itself the reader waits for the rest.
        let mut at_max = reader();
        let mut out = Vec::new();
        at_max
            .take_messages(&fixed_header(MAX_ARRAY_LEN as u32), &limits(), &mut out)
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(at_max.partial.len(), FIXED_HEADER);
    }

    #[test]
    fn refuses_a_body_array_declared_over_the_maximum() {
        // An `ay` that claims 2^26 + 8 bytes and brings 8: the validator refuses the length
        // itself (excess data), not only the bytes that are missing.
        let mut body = (MAX_ARRAY_LEN as u32 + 8).to_le_bytes().to_vec();
        body.extend_from_slice(&[7; 8]);
        let over = raw_call("ay", &body, Vec::new(), Endian::Little);
        let err = reader()
            .take_messages(over.data().bytes(), &limits(), &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("bad body"), "{err}");
        assert!(err.to_string().contains("xcess"), "{err}");

        // Nested in a struct inside a variant, the same.
        let mut body = vec![2, b'a', b'y', 0];
        body.extend_from_slice(&(MAX_ARRAY_LEN as u32 + 8).to_le_bytes());
        body.extend_from_slice(&[7; 8]);
        let nested = raw_call("v", &body, Vec::new(), Endian::Little);
        let err = reader()
            .take_messages(nested.data().bytes(), &limits(), &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("xcess"), "{err}");
    }

    #[test]
    fn refuses_a_message_that_its_sender_field_takes_past_the_maximum() {
        // A call of signature "ayay" whose two arrays make the whole message 8 bytes short of
        // 2^27: within the limit as sent, 8 bytes past it once the bus adds ":1.7" as SENDER,
        // which its receivers would refuse (libdbus drops the connection). zbus's `with_sender`
        // refuses to grow a message past 2^27; this pins that down.
        let small = raw_call("ayay", &[0; 8], Vec::new(), Endian::Little);
        let head_len = small.data().len() - 8;
        let second = (MAX_MESSAGE_SIZE - 8 - head_len - 8 - MAX_ARRAY_LEN) as u32;
        let mut bytes = small.data().bytes()[..head_len].to_vec();
        bytes.reserve_exact(MAX_MESSAGE_SIZE - head_len);
        bytes.extend_from_slice(&(MAX_ARRAY_LEN as u32).to_le_bytes());
        bytes.resize(bytes.len() + MAX_ARRAY_LEN, 0);
        bytes.extend_from_slice(&second.to_le_bytes());
        bytes.resize(MAX_MESSAGE_SIZE - 8, 0);
        let body_len = (bytes.len() - head_len) as u32;
        bytes[4..8].copy_from_slice(&body_len.to_le_bytes());
        assert_eq!(frame_len(&bytes, MAX_MESSAGE_SIZE).unwrap(), bytes.len());

        let err = reader()
            .take_messages(&bytes, &limits(), &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("cannot stamp the sender"), "{err}");

        // Eight bytes fewer in the second array and, stamped, it is 2^27 exactly.
        let fits = bytes.len() - 8;
        bytes.truncate(fits);
        let at = head_len + 4 + MAX_ARRAY_LEN;
        bytes[at..at + 4].copy_from_slice(&(second - 8).to_le_bytes());
        bytes[4..8].copy_from_slice(&((fits - head_len) as u32).to_le_bytes());
        let mut out = Vec::new();
        reader().take_messages(&bytes, &limits(), &mut out).unwrap();
        assert_eq!(out[0].data().len(), MAX_MESSAGE_SIZE);
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

    /// A call whose body is `body` as given, of signature `sig`, with `fds`.
    fn raw_call(sig: &str, body: &[u8], fds: Vec<OwnedFd>, endian: Endian) -> Message {
        // SAFETY: a test message, invalid on purpose; the reader under test checks it.
        unsafe {
            Message::method_call("/a", "Take")
                .endian(endian)
                .build_raw_body(body, sig, fds.into_iter().map(Into::into).collect())
        }
        .unwrap()
    }

    /// The body of `value`, with the signature of each variant holding a `u32` made `h`.
    fn with_variant_handles<B: serde::Serialize + zbus::wire::DynamicType>(value: &B) -> Vec<u8> {
        let msg = Message::method_call("/a", "Take").build(value).unwrap();
        let mut body = msg.body().data().bytes().to_vec();
        for at in 0..body.len().saturating_sub(2) {
            if body[at..at + 3] == [1, b'u', 0] {
                body[at + 1] = b'h';
            }
        }
        body
    }

    #[test]
    fn passes_on_fd_handles_past_the_fds_the_message_brought() {
        use std::collections::HashMap;
        use zbus::wire::Variant;
        let le =
            |values: &[u32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
        let dict = HashMap::from([("fd", Variant::U32(3)), ("name", Variant::from("x"))]);
        let nested = ("s", Variant::new(vec![Variant::U32(9), Variant::U32(1)]));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("h", le(&[3])),
            ("ah", [le(&[8]), le(&[0, 5])].concat()),
            ("sh", [&le(&[1])[..], b"x\0\0\0", &le(&[7])].concat()),
            ("v", with_variant_handles(&(Variant::U32(3),))),
            ("a{sv}", with_variant_handles(&(dict,))),
            ("sv", with_variant_handles(&nested)),
        ];
        for (sig, body) in cases {
            let msg = raw_call(sig, &body, Vec::new(), Endian::Little);
            let mut out = Vec::new();
            reader()
                .take_messages(msg.data().bytes(), &limits(), &mut out)
                .unwrap_or_else(|e| panic!("{sig}: {e}"));
            assert_eq!(out[0].body().signature().to_string_no_parens(), sig);
            assert_eq!(
                out[0].body().data().bytes(),
                &body[..],
                "{sig}: the body as sent"
            );
        }

        // Big-endian, and a handle one past the one fd that came.
        let file = std::fs::File::open("/dev/null").unwrap();
        let msg = raw_call(
            "h",
            &1u32.to_be_bytes(),
            vec![OwnedFd::from(file.try_clone().unwrap())],
            Endian::Big,
        );
        let mut reader = reader();
        reader.fds.push_back(OwnedFd::from(file));
        let mut out = Vec::new();
        reader
            .take_messages(msg.data().bytes(), &limits(), &mut out)
            .unwrap();
        assert_eq!(out[0].data().fds().len(), 1);
        assert_eq!(out[0].body().data().bytes(), 1u32.to_be_bytes());
    }

    #[test]
    fn a_body_with_a_handle_past_the_fds_and_another_fault_is_refused() {
        let cases: [(&str, Vec<u8>); 3] = [
            // A boolean of 2 after the handle.
            ("hb", [3u32.to_le_bytes(), 2u32.to_le_bytes()].concat()),
            // A string that is not UTF-8 after a variant holding the handle.
            ("vs", vec![1, b'h', 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0xff, 0]),
            // Bytes left over after the handle.
            ("h", vec![3, 0, 0, 0, 0, 0, 0, 0]),
        ];
        for (sig, body) in cases {
            let msg = raw_call(sig, &body, Vec::new(), Endian::Little);
            let err = reader()
                .take_messages(msg.data().bytes(), &limits(), &mut Vec::new())
                .unwrap_err();
            assert!(err.to_string().contains("bad body"), "{sig}: {err}");
        }
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
