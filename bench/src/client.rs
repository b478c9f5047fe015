//! One D-Bus connection over a blocking unix socket: address parsing, the
//! SASL EXTERNAL handshake (both sides, the server side for the p2p echo
//! peer), `Hello`, a receive buffer that yields whole messages, and calls
//! to the bus driver.

use std::io::{ErrorKind, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::wire::{self, Body, Frame, Header, Kind};

/// How long a blocking read or write waits before the bench gives up on a
/// bus that stopped reading or answering.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes asked of the kernel per read when no bigger message is pending.
const READ_CHUNK: usize = 64 * 1024;

pub const BUS_NAME: &str = "org.freedesktop.DBus";
const BUS_PATH: &str = "/org/freedesktop/DBus";

/// Opens a unix socket to the first `unix:` entry of a D-Bus address
/// (`path=` or `abstract=`), as printed by `--print-address`.
fn connect_socket(address: &str) -> Result<UnixStream> {
    let addr = socket_addr(address)?;
    let stream =
        UnixStream::connect_addr(&addr).with_context(|| format!("cannot connect to {address}"))?;
    with_timeouts(stream)
}

fn with_timeouts(stream: UnixStream) -> Result<UnixStream> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Like `connect_socket`, but nothing waits longer than `timeout`: a bus
/// that leaves us in its listen backlog makes a blocking unix `connect`
/// wait for ever, and `SO_SNDTIMEO` is what bounds it. The flood runner
/// opens thousands of sockets to buses that may stop accepting.
pub fn connect_within(address: &str, timeout: Duration) -> Result<UnixStream> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
    use std::os::fd::AsRawFd;
    let addr = socket_addr(address)?;
    let addr = match (addr.as_pathname(), addr.as_abstract_name()) {
        (Some(path), _) => UnixAddr::new(path)?,
        (None, Some(name)) => UnixAddr::new_abstract(name)?,
        (None, None) => bail!("unnamed socket address in {address:?}"),
    };
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket() failed")?;
    let tv = nix::sys::time::TimeVal::new(
        timeout.as_secs().try_into().unwrap_or(i64::MAX),
        timeout.subsec_micros().into(),
    );
    socket::setsockopt(&fd, sockopt::SendTimeout, &tv).context("SO_SNDTIMEO")?;
    socket::connect(fd.as_raw_fd(), &addr)
        .with_context(|| format!("cannot connect to {address}"))?;
    let stream = UnixStream::from(fd);
    stream.set_read_timeout(Some(timeout))?;
    Ok(stream)
}

fn socket_addr(address: &str) -> Result<SocketAddr> {
    for entry in address.split(';') {
        let Some(params) = entry.trim().strip_prefix("unix:") else {
            continue;
        };
        for param in params.split(',') {
            if let Some(path) = param.strip_prefix("path=") {
                return Ok(SocketAddr::from_pathname(unescape(path)?)?);
            }
            if let Some(name) = param.strip_prefix("abstract=") {
                return Ok(SocketAddr::from_abstract_name(unescape(name)?)?);
            }
        }
    }
    bail!("no unix:path= or unix:abstract= entry in address {address:?}")
}

/// Undoes the `%xx` escaping of D-Bus address values.
fn unescape(value: &str) -> Result<String> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.bytes();
    while let Some(byte) = bytes.next() {
        if byte == b'%' {
            let hex = [bytes.next(), bytes.next()];
            let [Some(hi), Some(lo)] = hex else {
                bail!("truncated %-escape in {value:?}");
            };
            let digits = std::str::from_utf8(&[hi, lo])?.to_owned();
            out.push(u8::from_str_radix(&digits, 16).context("bad %-escape")?);
        } else {
            out.push(byte);
        }
    }
    String::from_utf8(out).context("address value is not UTF-8")
}

/// The opening of a client's SASL exchange: the NUL byte and `AUTH
/// EXTERNAL` with our uid.
pub fn auth_external() -> String {
    let uid = nix::unistd::getuid().as_raw().to_string();
    let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
    format!("\0AUTH EXTERNAL {hex}\r\n")
}

/// A receive buffer that hands out whole messages (or SASL lines).
#[derive(Default)]
pub struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbox {
    /// Reads once from `stream`; `false` at end of stream.
    pub fn try_fill(&mut self, mut stream: &UnixStream) -> Result<bool> {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let pending = wire::message_len(self.pending())?.unwrap_or(0);
        let want = pending.max(self.end + READ_CHUNK);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        loop {
            match stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no data from the peer for {IO_TIMEOUT:?}")
                }
                Err(e) => return Err(e).context("read failed"),
            }
        }
    }

    /// Reads once from `stream`; end of stream is an error.
    pub fn fill(&mut self, stream: &UnixStream) -> Result<()> {
        ensure!(self.try_fill(stream)?, "connection closed by the peer");
        Ok(())
    }

    /// Whether a whole message is buffered.
    pub fn has_message(&self) -> Result<bool> {
        let pending = self.pending();
        Ok(wire::message_len(pending)?.is_some_and(|len| len <= pending.len()))
    }

    /// The next whole buffered message, if any.
    pub fn next_message(&mut self) -> Result<Option<Frame<'_>>> {
        let pending = &self.buf[self.start..self.end];
        let Some(len) = wire::message_len(pending)?.filter(|len| *len <= pending.len()) else {
            return Ok(None);
        };
        let range = self.start..self.start + len;
        self.start += len;
        wire::parse(&self.buf[range]).map(Some)
    }

    /// Reads one `\r\n`-terminated SASL line (without the terminator).
    fn read_line(&mut self, stream: &UnixStream) -> Result<String> {
        loop {
            if let Some(at) = self.pending().windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.pending()[..at]).into_owned();
                self.start += at + 2;
                return Ok(line);
            }
            ensure!(self.pending().len() < 16 * 1024, "SASL line too long");
            self.fill(stream)?;
        }
    }

    /// Drops one byte (the NUL that opens a SASL exchange).
    fn skip_byte(&mut self, stream: &UnixStream) -> Result<u8> {
        if self.pending().is_empty() {
            self.fill(stream)?;
        }
        let byte = self.buf[self.start];
        self.start += 1;
        Ok(byte)
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

/// Serial numbers for outgoing messages (never 0).
#[derive(Default)]
pub struct Serials(u32);

impl Serials {
    pub fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(1).max(1);
        self.0
    }
}

/// A reply copied out of the receive buffer, for setup calls.
pub struct Reply(Vec<u8>);

impl Reply {
    pub fn frame(&self) -> Result<Frame<'_>> {
        wire::parse(&self.0)
    }
}

/// An authenticated connection, to a bus or directly to a peer.
pub struct Conn {
    pub stream: UnixStream,
    pub inbox: Inbox,
    pub serials: Serials,
    /// Our unique name on the bus; `None` on a p2p connection.
    pub unique_name: Option<String>,
}

impl Conn {
    /// Connects to a bus, authenticates and sends `Hello` (pipelined with
    /// `BEGIN`), and waits for the unique name.
    pub fn bus(address: &str) -> Result<Self> {
        Self::hello(connect_socket(address)?)
    }

    /// `bus`, where connecting, authenticating and `Hello` each wait at most
    /// `timeout` (and so does every later read or write).
    pub fn bus_within(address: &str, timeout: Duration) -> Result<Self> {
        Self::hello(connect_within(address, timeout)?)
    }

    /// Authenticates on a connected socket and says `Hello`.
    fn hello(stream: UnixStream) -> Result<Self> {
        let mut conn = Self::new(stream);
        conn.authenticate()?;
        let mut out = b"BEGIN\r\n".to_vec();
        let serial = conn.push_bus_call(&mut out, "Hello", &Body::default());
        conn.write(&out)?;
        let reply = conn.wait_reply(serial).context("Hello failed")?;
        let name = reply
            .frame()?
            .args()
            .string()
            .context("bad Hello reply")?
            .to_owned();
        conn.unique_name = Some(name);
        Ok(conn)
    }

    /// Connects straight to a p2p echo peer listening on `path`.
    pub fn p2p(path: &str) -> Result<Self> {
        let stream =
            UnixStream::connect(path).with_context(|| format!("cannot connect to {path}"))?;
        Self::p2p_handshake(with_timeouts(stream)?)
    }

    /// The client side of a p2p handshake (no `Hello`) on a connected socket.
    pub fn p2p_handshake(stream: UnixStream) -> Result<Self> {
        let mut conn = Self::new(stream);
        conn.authenticate()?;
        conn.write(b"BEGIN\r\n")?;
        Ok(conn)
    }

    /// The server side of the handshake, for a p2p listener.
    pub fn accept(stream: UnixStream) -> Result<Self> {
        let mut conn = Self::new(stream);
        ensure!(
            conn.inbox.skip_byte(&conn.stream)? == 0,
            "client did not send the NUL byte"
        );
        loop {
            let line = conn.inbox.read_line(&conn.stream)?;
            let answer = match line.split(' ').next() {
                Some("AUTH") if line.starts_with("AUTH EXTERNAL") => {
                    "OK 0123456789abcdef0123456789abcdef\r\n"
                }
                Some("NEGOTIATE_UNIX_FD") => "AGREE_UNIX_FD\r\n",
                Some("BEGIN") => return Ok(conn),
                _ => "REJECTED EXTERNAL\r\n",
            };
            conn.write(answer.as_bytes())?;
        }
    }

    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            inbox: Inbox::default(),
            serials: Serials::default(),
            unique_name: None,
        }
    }

    /// Client side of SASL EXTERNAL up to (not including) `BEGIN`.
    fn authenticate(&mut self) -> Result<()> {
        self.write(auth_external().as_bytes())?;
        let answer = self.inbox.read_line(&self.stream)?;
        ensure!(
            answer.starts_with("OK "),
            "authentication refused: {answer:?}"
        );
        Ok(())
    }

    pub fn write(&self, bytes: &[u8]) -> Result<()> {
        (&self.stream).write_all(bytes).context("write failed")
    }

    /// Blocks until a whole message is buffered and returns it.
    pub fn recv(&mut self) -> Result<Frame<'_>> {
        while !self.inbox.has_message()? {
            self.inbox.fill(&self.stream)?;
        }
        self.inbox
            .next_message()?
            .context("buffered message vanished")
    }

    /// Appends a method call to `out` and returns its serial.
    pub fn push_call(
        &mut self,
        out: &mut Vec<u8>,
        destination: Option<&str>,
        interface: &str,
        member: &str,
        body: &Body,
    ) -> u32 {
        let serial = self.serials.next();
        let header = call_header(destination, interface, member);
        wire::encode(
            out,
            Kind::MethodCall,
            serial,
            &header,
            body.signature(),
            body.bytes(),
        );
        serial
    }

    /// Sends a method call without arguments that asks for no reply.
    pub fn call_no_reply(
        &mut self,
        destination: &str,
        interface: &str,
        member: &str,
    ) -> Result<()> {
        let header = Header {
            flags: wire::NO_REPLY_EXPECTED,
            ..call_header(Some(destination), interface, member)
        };
        let mut out = Vec::new();
        wire::encode(
            &mut out,
            Kind::MethodCall,
            self.serials.next(),
            &header,
            "",
            &[],
        );
        self.write(&out)
    }

    fn push_bus_call(&mut self, out: &mut Vec<u8>, member: &str, body: &Body) -> u32 {
        self.push_call(out, Some(BUS_NAME), BUS_NAME, member, body)
    }

    /// Calls a bus driver method and waits for its reply.
    pub fn call_bus(&mut self, member: &str, body: &Body) -> Result<Reply> {
        let mut out = Vec::new();
        let serial = self.push_bus_call(&mut out, member, body);
        self.write(&out)?;
        self.wait_reply(serial)
            .with_context(|| format!("{member} failed"))
    }

    /// Waits for the reply to `serial`, skipping everything else
    /// (NameAcquired and other signals).
    pub fn wait_reply(&mut self, serial: u32) -> Result<Reply> {
        loop {
            let frame = self.recv()?;
            if frame.reply_serial != Some(serial) {
                continue;
            }
            match frame.kind {
                Some(Kind::MethodReturn) => return Ok(Reply(frame.raw.to_vec())),
                Some(Kind::Error) => bail!("error reply {}", frame.describe_error()),
                _ => continue,
            }
        }
    }

    /// Takes `name`, failing unless we became its primary owner.
    pub fn request_name(&mut self, name: &str) -> Result<()> {
        const DO_NOT_QUEUE: u32 = 4;
        const PRIMARY_OWNER: u32 = 1;
        let body = Body::default().string(name).u32(DO_NOT_QUEUE);
        let reply = self.call_bus("RequestName", &body)?;
        let code = reply.frame()?.args().u32()?;
        ensure!(code == PRIMARY_OWNER, "RequestName({name}) answered {code}");
        Ok(())
    }

    pub fn add_match(&mut self, rule: &str) -> Result<()> {
        self.call_bus("AddMatch", &Body::default().string(rule))?;
        Ok(())
    }
}

/// The header of a method call; calls to the driver go to its own path.
fn call_header<'a>(
    destination: Option<&'a str>,
    interface: &'a str,
    member: &'a str,
) -> Header<'a> {
    Header {
        path: Some(if destination == Some(BUS_NAME) {
            BUS_PATH
        } else {
            "/bench"
        }),
        interface: Some(interface),
        member: Some(member),
        destination,
        ..Header::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unix_entry_of_an_address() -> Result<()> {
        let addr = socket_addr("tcp:host=x;unix:path=/tmp/a%20b/bus,guid=00ff")?;
        assert_eq!(
            addr.as_pathname(),
            Some(std::path::Path::new("/tmp/a b/bus"))
        );
        let addr = socket_addr("unix:abstract=/tmp/dbus-x,guid=1")?;
        assert_eq!(addr.as_abstract_name(), Some(&b"/tmp/dbus-x"[..]));
        assert!(socket_addr("tcp:host=localhost,port=1").is_err());
        assert!(unescape("bad%2").is_err());
        Ok(())
    }

    #[test]
    fn handshake_and_call_over_a_socket_pair() -> Result<()> {
        let (client_side, server_side) = UnixStream::pair()?;
        let server = std::thread::spawn(move || -> Result<Vec<u8>> {
            let mut conn = Conn::accept(server_side)?;
            let frame = conn.recv()?;
            Ok(frame.args().byte_array()?.to_vec())
        });
        let mut client = Conn::new(client_side);
        client.authenticate()?;
        // The call rides in the same write as BEGIN: accept must keep it.
        let mut out = b"BEGIN\r\n".to_vec();
        client.push_call(
            &mut out,
            None,
            "bench.Echo",
            "Echo",
            &Body::default().byte_array(b"hi"),
        );
        client.write(&out)?;
        let got = server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        assert_eq!(got, b"hi");
        Ok(())
    }

    #[test]
    fn inbox_yields_split_and_batched_messages() -> Result<()> {
        let (a, b) = UnixStream::pair()?;
        let mut out = Vec::new();
        let mut serials = Serials::default();
        for _ in 0..3 {
            let serial = serials.next();
            wire::encode(&mut out, Kind::Signal, serial, &Header::default(), "", &[]);
        }
        let (first, rest) = out.split_at(10);
        (&a).write_all(first)?;
        let mut inbox = Inbox::default();
        inbox.fill(&b)?;
        assert!(!inbox.has_message()?);
        (&a).write_all(rest)?;
        inbox.fill(&b)?;
        let serials: Vec<u32> =
            std::iter::from_fn(|| inbox.next_message().ok().flatten().map(|f| f.serial)).collect();
        assert_eq!(serials, [1, 2, 3]);
        drop(a);
        assert!(!inbox.try_fill(&b)?);
        Ok(())
    }
}
