//! The D-Bus wire format, cut down to what the bench needs: it builds method
//! calls, returns and signals whose bodies are strings, `u32`s and byte
//! arrays, and reads back the header fields and the few body values it looks
//! at. Hand-written rather than taken from zbus so that a message costs a few
//! hundred nanoseconds and the load generator never becomes the bottleneck.

use anyhow::{Context, Result, bail, ensure};

/// Length of the fixed part of every header (endianness .. fields length).
const FIXED_HEADER_LEN: usize = 16;
/// The specification's limit on a whole message (128 MiB).
const MAX_MESSAGE_LEN: usize = 1 << 27;

/// The four message types of the specification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    MethodCall = 1,
    MethodReturn = 2,
    Error = 3,
    Signal = 4,
}

/// Header flag: the sender does not want a reply.
pub const NO_REPLY_EXPECTED: u8 = 0x1;

/// Header field codes (specification, "Header Fields").
mod field {
    pub const PATH: u8 = 1;
    pub const INTERFACE: u8 = 2;
    pub const MEMBER: u8 = 3;
    pub const ERROR_NAME: u8 = 4;
    pub const REPLY_SERIAL: u8 = 5;
    pub const DESTINATION: u8 = 6;
    pub const SENDER: u8 = 7;
    pub const SIGNATURE: u8 = 8;
}

/// The header of an outgoing message; absent fields are not written.
#[derive(Default, Clone, Copy)]
pub struct Header<'a> {
    pub flags: u8,
    pub path: Option<&'a str>,
    pub interface: Option<&'a str>,
    pub member: Option<&'a str>,
    pub error_name: Option<&'a str>,
    pub reply_serial: Option<u32>,
    pub destination: Option<&'a str>,
}

/// A marshalled body and its signature, built argument by argument.
///
/// Offsets are relative to the body start, which is 8-aligned in every
/// message, so the padding computed here stays right once it is framed.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct Body {
    bytes: Vec<u8>,
    signature: String,
}

impl Body {
    /// Appends a string (`s`).
    pub fn string(mut self, value: &str) -> Self {
        push_string(&mut self.bytes, 0, value);
        self.signature.push('s');
        self
    }

    /// Appends an unsigned 32-bit integer (`u`).
    pub fn u32(mut self, value: u32) -> Self {
        pad_to(&mut self.bytes, 0, 4);
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self.signature.push('u');
        self
    }

    /// Appends a byte array (`ay`).
    pub fn byte_array(mut self, value: &[u8]) -> Self {
        pad_to(&mut self.bytes, 0, 4);
        self.bytes
            .extend_from_slice(&wire_len(value.len()).to_le_bytes());
        self.bytes.extend_from_slice(value);
        self.signature.push_str("ay");
        self
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn signature(&self) -> &str {
        &self.signature
    }
}

/// Appends one little-endian message to `out`.
///
/// `signature` and `body` are passed apart from [`Body`] so that a reply can
/// echo the raw body of a received message without re-marshalling it.
pub fn encode(
    out: &mut Vec<u8>,
    kind: Kind,
    serial: u32,
    header: &Header,
    signature: &str,
    body: &[u8],
) {
    let base = out.len();
    out.extend_from_slice(&[b'l', kind as u8, header.flags, 1]);
    out.extend_from_slice(&wire_len(body.len()).to_le_bytes());
    out.extend_from_slice(&serial.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // header fields length, patched below
    let fields_start = out.len();
    let strings = [
        (field::PATH, b'o', header.path),
        (field::INTERFACE, b's', header.interface),
        (field::MEMBER, b's', header.member),
        (field::ERROR_NAME, b's', header.error_name),
        (field::DESTINATION, b's', header.destination),
    ];
    for (code, type_code, value) in strings {
        if let Some(value) = value {
            push_field_start(out, base, code, type_code);
            push_string(out, base, value);
        }
    }
    if let Some(reply_serial) = header.reply_serial {
        push_field_start(out, base, field::REPLY_SERIAL, b'u');
        pad_to(out, base, 4);
        out.extend_from_slice(&reply_serial.to_le_bytes());
    }
    if !signature.is_empty() {
        push_field_start(out, base, field::SIGNATURE, b'g');
        out.push(signature.len() as u8);
        out.extend_from_slice(signature.as_bytes());
        out.push(0);
    }
    let fields_len = wire_len(out.len() - fields_start).to_le_bytes();
    out[fields_start - 4..fields_start].copy_from_slice(&fields_len);
    pad_to(out, base, 8);
    out.extend_from_slice(body);
}

/// One received message, borrowing the receive buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    /// `None` for a message type this bench does not know (to be ignored).
    pub kind: Option<Kind>,
    pub flags: u8,
    pub serial: u32,
    pub reply_serial: Option<u32>,
    pub path: Option<&'a str>,
    pub interface: Option<&'a str>,
    pub member: Option<&'a str>,
    pub error_name: Option<&'a str>,
    pub destination: Option<&'a str>,
    pub sender: Option<&'a str>,
    pub signature: &'a str,
    pub body: &'a [u8],
    /// The whole message as received.
    pub raw: &'a [u8],
    big_endian: bool,
}

impl<'a> Frame<'a> {
    /// A reader over the body's arguments.
    pub fn args(&self) -> Args<'a> {
        Args {
            data: self.body,
            pos: 0,
            big_endian: self.big_endian,
        }
    }

    /// The error name and message of an error reply, for error reports.
    pub fn describe_error(&self) -> String {
        let name = self.error_name.unwrap_or("(no error name)");
        let text = if self.signature.starts_with('s') {
            self.args().string().unwrap_or_default()
        } else {
            ""
        };
        format!("{name}: {text}")
    }
}

/// The total length of the message at the start of `buf`, once its fixed
/// header is there; `None` while fewer than 16 bytes have arrived.
pub fn message_len(buf: &[u8]) -> Result<Option<usize>> {
    let Some(fixed) = buf.get(..FIXED_HEADER_LEN) else {
        return Ok(None);
    };
    let big_endian = endianness(fixed[0])?;
    let body_len = read_u32(fixed, 4, big_endian)? as usize;
    let fields_len = read_u32(fixed, 12, big_endian)? as usize;
    let total = align(FIXED_HEADER_LEN + fields_len, 8) + body_len;
    ensure!(
        total <= MAX_MESSAGE_LEN,
        "message of {total} bytes exceeds the 128 MiB limit"
    );
    Ok(Some(total))
}

/// Parses one complete message (exactly `message_len` bytes).
pub fn parse(msg: &[u8]) -> Result<Frame<'_>> {
    let total = message_len(msg)?.context("message shorter than its fixed header")?;
    ensure!(
        total == msg.len(),
        "message is {} bytes, header says {total}",
        msg.len()
    );
    let big_endian = endianness(msg[0])?;
    let fields_len = read_u32(msg, 12, big_endian)? as usize;
    let body_start = align(FIXED_HEADER_LEN + fields_len, 8);
    let mut frame = Frame {
        kind: kind_from_code(msg[1]),
        flags: msg[2],
        serial: read_u32(msg, 8, big_endian)?,
        reply_serial: None,
        path: None,
        interface: None,
        member: None,
        error_name: None,
        destination: None,
        sender: None,
        signature: "",
        body: msg.get(body_start..).context("body out of bounds")?,
        raw: msg,
        big_endian,
    };
    let mut fields = Args {
        data: msg
            .get(..FIXED_HEADER_LEN + fields_len)
            .context("fields out of bounds")?,
        pos: FIXED_HEADER_LEN,
        big_endian,
    };
    while fields.pos < fields.data.len() {
        read_field(&mut fields, &mut frame)?;
    }
    Ok(frame)
}

/// Reads one `(yv)` header field into `frame`.
fn read_field<'a>(fields: &mut Args<'a>, frame: &mut Frame<'a>) -> Result<()> {
    fields.align(8)?;
    let code = fields.byte()?;
    let signature = fields.signature()?;
    match (code, signature) {
        (field::REPLY_SERIAL, "u") => frame.reply_serial = Some(fields.u32()?),
        (field::SIGNATURE, "g") => frame.signature = fields.signature()?,
        (_, "s" | "o") => {
            let value = Some(fields.string()?);
            match code {
                field::PATH => frame.path = value,
                field::INTERFACE => frame.interface = value,
                field::MEMBER => frame.member = value,
                field::ERROR_NAME => frame.error_name = value,
                field::DESTINATION => frame.destination = value,
                field::SENDER => frame.sender = value,
                _ => {}
            }
        }
        (_, "u") => {
            fields.u32()?;
        }
        (_, "g") => {
            fields.signature()?;
        }
        _ => bail!("header field {code} has unsupported type {signature:?}"),
    }
    Ok(())
}

/// Sequential reader of marshalled values; `pos` is relative to a point
/// that is 8-aligned in the message, so alignment can be computed from it.
pub struct Args<'a> {
    data: &'a [u8],
    pos: usize,
    big_endian: bool,
}

impl<'a> Args<'a> {
    pub fn u32(&mut self) -> Result<u32> {
        self.align(4)?;
        let value = read_u32(self.data, self.pos, self.big_endian)?;
        self.pos += 4;
        Ok(value)
    }

    pub fn string(&mut self) -> Result<&'a str> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        ensure!(self.byte()? == 0, "string not nul-terminated");
        std::str::from_utf8(bytes).context("string is not UTF-8")
    }

    #[cfg(test)] // the bench compares body lengths only
    pub fn byte_array(&mut self) -> Result<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn signature(&mut self) -> Result<&'a str> {
        let len = usize::from(self.byte()?);
        let bytes = self.take(len)?;
        ensure!(self.byte()? == 0, "signature not nul-terminated");
        std::str::from_utf8(bytes).context("signature is not ASCII")
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn align(&mut self, to: usize) -> Result<()> {
        let aligned = align(self.pos, to);
        ensure!(aligned <= self.data.len(), "padding runs past the end");
        self.pos = aligned;
        Ok(())
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(len).context("length overflow")?;
        let bytes = self
            .data
            .get(self.pos..end)
            .with_context(|| format!("value of {len} bytes runs past the end"))?;
        self.pos = end;
        Ok(bytes)
    }
}

fn kind_from_code(code: u8) -> Option<Kind> {
    match code {
        1 => Some(Kind::MethodCall),
        2 => Some(Kind::MethodReturn),
        3 => Some(Kind::Error),
        4 => Some(Kind::Signal),
        _ => None,
    }
}

fn endianness(marker: u8) -> Result<bool> {
    match marker {
        b'l' => Ok(false),
        b'B' => Ok(true),
        other => bail!("bad endianness marker {other:#04x}"),
    }
}

fn read_u32(data: &[u8], pos: usize, big_endian: bool) -> Result<u32> {
    let bytes: [u8; 4] = data
        .get(pos..pos + 4)
        .and_then(|b| b.try_into().ok())
        .context("u32 runs past the end")?;
    Ok(if big_endian {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_le_bytes(bytes)
    })
}

fn push_field_start(out: &mut Vec<u8>, base: usize, code: u8, type_code: u8) {
    pad_to(out, base, 8);
    out.extend_from_slice(&[code, 1, type_code, 0]);
}

fn push_string(out: &mut Vec<u8>, base: usize, value: &str) {
    pad_to(out, base, 4);
    out.extend_from_slice(&wire_len(value.len()).to_le_bytes());
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

fn pad_to(out: &mut Vec<u8>, base: usize, to: usize) {
    let len = base + align(out.len() - base, to);
    out.resize(len, 0);
}

fn align(offset: usize, to: usize) -> usize {
    offset.div_ceil(to) * to
}

/// Lengths on the wire are `u32`; the bench never builds anything near 4 GiB.
fn wire_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_method_call() -> Result<()> {
        let body = Body::default()
            .string("bench.Echo")
            .u32(4)
            .byte_array(b"xyz");
        let header = Header {
            path: Some("/bench"),
            interface: Some("bench.Echo"),
            member: Some("Echo"),
            destination: Some(":1.7"),
            ..Header::default()
        };
        let mut out = vec![0xAA; 3]; // encoding must not depend on where it starts
        encode(
            &mut out,
            Kind::MethodCall,
            42,
            &header,
            body.signature(),
            body.bytes(),
        );
        let msg = &out[3..];
        assert_eq!(message_len(msg)?, Some(msg.len()));
        let frame = parse(msg)?;
        assert_eq!(frame.kind, Some(Kind::MethodCall));
        assert_eq!(frame.serial, 42);
        assert_eq!(frame.path, Some("/bench"));
        assert_eq!(frame.member, Some("Echo"));
        assert_eq!(frame.destination, Some(":1.7"));
        assert_eq!(frame.signature, "suay");
        let mut args = frame.args();
        assert_eq!(args.string()?, "bench.Echo");
        assert_eq!(args.u32()?, 4);
        assert_eq!(args.byte_array()?, b"xyz");
        Ok(())
    }

    #[test]
    fn reads_reply_serial_and_error_text() -> Result<()> {
        let body = Body::default().string("no such name");
        let header = Header {
            error_name: Some("org.freedesktop.DBus.Error.ServiceUnknown"),
            reply_serial: Some(9),
            ..Header::default()
        };
        let mut out = Vec::new();
        encode(
            &mut out,
            Kind::Error,
            3,
            &header,
            body.signature(),
            body.bytes(),
        );
        let frame = parse(&out)?;
        assert_eq!(frame.kind, Some(Kind::Error));
        assert_eq!(frame.reply_serial, Some(9));
        assert_eq!(
            frame.describe_error(),
            "org.freedesktop.DBus.Error.ServiceUnknown: no such name"
        );
        Ok(())
    }

    #[test]
    fn matches_the_specification_layout_of_hello() -> Result<()> {
        // The bytes of a Hello call as dbus-send/zbus produce them, by hand.
        let header = Header {
            path: Some("/org/freedesktop/DBus"),
            member: Some("Hello"),
            destination: Some("org.freedesktop.DBus"),
            ..Header::default()
        };
        let mut out = Vec::new();
        encode(&mut out, Kind::MethodCall, 1, &header, "", &[]);
        assert_eq!(&out[..12], &[b'l', 1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(out.len() % 8, 0, "no body: the header is padded to 8");
        // PATH field: code 1, signature "o", then the u32 length at offset 20.
        assert_eq!(&out[16..20], &[1, 1, b'o', 0]);
        assert_eq!(&out[20..24], &21u32.to_le_bytes());
        Ok(())
    }

    #[test]
    fn rejects_truncated_and_oversized_messages() {
        let mut out = Vec::new();
        encode(&mut out, Kind::Signal, 1, &Header::default(), "", &[]);
        assert!(message_len(&out[..15]).is_ok_and(|len| len.is_none()));
        assert!(parse(&out[..out.len() - 1]).is_err());
        let mut huge = out.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(message_len(&huge).is_err());
        let mut bad = out;
        bad[0] = b'x';
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn reads_big_endian_messages() -> Result<()> {
        // A signal with no fields and body "u" = 7, big-endian, fields by hand.
        let mut msg = vec![b'B', 4, 0, 1, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0, 7];
        msg.extend_from_slice(&[8, 1, b'g', 0, 1, b'u', 0]);
        msg.push(0); // header padding to 8
        msg.extend_from_slice(&7u32.to_be_bytes());
        let frame = parse(&msg)?;
        assert_eq!(frame.serial, 5);
        assert_eq!(frame.signature, "u");
        assert_eq!(frame.args().u32()?, 7);
        Ok(())
    }
}
