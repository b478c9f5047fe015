//! Cutting a connection's incoming bytes into whole messages, with the file descriptors that
//! came along, each checked once and stamped with the connection's name as it is copied.

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use zbus::Message;
use zbus::names::UniqueName;
use zbus::wire::Endian;
use zbus::wire::serialized::{Context, Data};

use super::check::{Stamped, check_body, stamp};
use super::limits::{FrameLimits, MAX_ARRAY_LEN, MAX_MESSAGE_SIZE, WireError, invalid};
use super::raw::{FIXED_HEADER, Raw};

/// How many bytes one read takes at most.
const READ_CHUNK: usize = 128 * 1024;
/// How many file descriptors one read can carry.
const MAX_FDS_PER_READ: usize = 64;
/// How far ahead of the bytes received a large message's buffer is zeroed (see [`LargeFrame`]).
const LARGE_STEP: usize = 1 << 20;

/// The total length of the message whose first 16 bytes are `head`.
fn frame_len(head: &[u8], max_size: usize) -> Result<usize, WireError> {
    let raw = Raw::of_message(head).ok_or_else(|| {
        let byte = head.first().copied().unwrap_or(0);
        invalid(format!("bad endianness byte {byte:#04x}"))
    })?;
    let (Some(body), Some(fields)) = (raw.u32_at(4), raw.u32_at(12)) else {
        return Err(invalid("the fixed header is cut short"));
    };
    let (body, fields) = (body as usize, fields as usize);
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
    /// A message too large for one read, while it is read straight into a buffer of its own;
    /// `partial` is empty meanwhile.
    large: Option<LargeFrame>,
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
            large: None,
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
            let start = std::mem::take(&mut self.partial);
            self.large = Some(LargeFrame::new(start, missing));
        }
        if self.large.is_some() {
            return self.read_large(fd, limits, out);
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

    /// Reads more of a large message straight into its buffer, saving a copy of each byte.
    fn read_large(
        &mut self,
        fd: RawFd,
        limits: &FrameLimits,
        out: &mut Vec<Message>,
    ) -> Result<bool, WireError> {
        let Some(large) = self.large.as_mut() else {
            return Ok(false);
        };
        let space = large.space();
        let wanted = space.len();
        let fds_before = self.fds.len();
        let n = recv(fd, space, &mut self.fds)?;
        large.filled += n;
        let drained = n < wanted && self.fds.len() == fds_before;
        if let Some(whole) = self.large.take_if(|large| large.filled == large.total) {
            out.push(self.parse(&whole.buf, limits)?);
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
        // SAFETY: `from_bytes` checks the header itself; the body is checked by `parse`, the
        // only caller, right after, before anything reads it.
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
        // `frame_len` has read the endianness byte already.
        let raw = Raw::of_message(bytes).ok_or_else(|| invalid("bad endianness byte"))?;
        let endian = raw.endian();
        // The stamp is pure: made before the fd checks, it is only wasted on a refused message.
        let Stamped {
            bytes: stamped,
            fds: nfds,
        } = stamp(raw, &self.sender);
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
        let stamped = stamped.filter(|b| b.len() <= limits.max_message_size);
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

/// A message that one read cannot take whole, read straight into a buffer of its own, which
/// saves a copy of each byte. Every byte handed to `recvmsg` must be initialised memory (a
/// `&mut [u8]` over spare capacity would not be sound), so the buffer is zeroed ahead of the
/// reads, [`LARGE_STEP`] bytes at a time: each byte is zeroed once, not once per read, and a
/// peer that stalls mid-message costs at most one step more than it has sent.
struct LargeFrame {
    /// The message so far: `filled` bytes received, then zeros up to `buf.len()`.
    buf: Vec<u8>,
    filled: usize,
    /// The length of the whole message.
    total: usize,
}

impl LargeFrame {
    /// A frame whose first bytes are `start`, `missing` bytes short of whole.
    fn new(mut start: Vec<u8>, missing: usize) -> LargeFrame {
        let filled = start.len();
        start.reserve_exact(missing);
        LargeFrame {
            buf: start,
            filled,
            total: filled + missing,
        }
    }

    /// The initialised bytes that the next read may fill, zeroing the next step first when
    /// the last one is full.
    fn space(&mut self) -> &mut [u8] {
        if self.filled == self.buf.len() {
            let step = (self.total - self.filled).min(LARGE_STEP);
            self.buf.resize(self.filled + step, 0);
        }
        &mut self.buf[self.filled..]
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

    /// A message of several steps is read straight into its own buffer over many reads, which
    /// never zero more than one step ahead of the bytes received, and comes out whole.
    #[test]
    fn reads_a_large_message_over_many_reads() {
        use nix::poll::{PollFd, PollFlags, poll};
        use std::io::Write;
        use std::os::fd::{AsFd, AsRawFd};
        use std::os::unix::net::UnixStream;

        let payload: Vec<u8> = (0..3 * LARGE_STEP + 5).map(|i| (i % 251) as u8).collect();
        let msg = Message::method_call("/a", "Big")
            .build(&(payload.clone(),))
            .unwrap();
        let bytes = msg.data().bytes().to_vec();
        let (mut theirs, ours) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || theirs.write_all(&bytes));

        let mut reader = reader();
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        let (mut reads, mut large_reads) = (0, 0);
        while out.is_empty() {
            let mut ready = [PollFd::new(ours.as_fd(), PollFlags::POLLIN)];
            assert_eq!(
                poll(&mut ready, 10_000u16).unwrap(),
                1,
                "the writer stalled"
            );
            match reader.read(ours.as_raw_fd(), &mut scratch, &limits(), &mut out) {
                Ok(_) => reads += 1,
                Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if let Some(large) = &reader.large {
                large_reads += 1;
                assert!(reader.partial.is_empty());
                assert!(large.filled <= large.buf.len());
                assert!(large.buf.len() - large.filled <= LARGE_STEP);
                assert!(large.buf.len() <= large.total);
            }
        }
        writer.join().unwrap().unwrap();
        assert!(reads > 3, "{reads} reads");
        assert!(large_reads > 2, "{large_reads} reads into the large buffer");
        assert!(reader.large.is_none());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].header().sender().unwrap().as_str(), ":1.7");
        assert_eq!(out[0].body().deserialize::<Vec<u8>>().unwrap(), payload);
    }

    #[test]
    fn claims_the_declared_file_descriptors() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let msg = Message::method_call("/a", "Take")
            .build(&(zbus::Fd::from(&file),))
            .unwrap();
        let bytes = msg.data().bytes();
        assert_eq!(
            crate::wire::check::declared_fds(Raw::new(bytes, Endian::Little)),
            1
        );
        assert_eq!(stamp(Raw::new(bytes, Endian::Little), ":1.7").fds, 1);

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
