//! Server side of the D-Bus SASL handshake (spec: "Authentication Protocol").
//!
//! The handshake is the first thing an untrusted client talks to, so it is
//! bounded on every axis: one deadline for the whole exchange, a maximum line
//! length, and a maximum number of failed attempts. `EXTERNAL` is offered (the
//! caller already knows the peer's uid from `SO_PEERCRED`, and only the bus
//! owner or root may connect), and `ANONYMOUS` where the configuration allows
//! it (`<auth>`, `<allow_anonymous/>`).
//!
//! The logic lives in two sans-IO layers so it can be tested without sockets:
//! [`Sasl`] answers one line at a time, [`Handshake`] frames raw bytes into
//! lines (NUL byte, CRLF, length limit) and keeps the bytes that follow
//! `BEGIN`. [`authenticate`] drives them over the connection's [`Socket`] with
//! plain non-blocking reads and writes, so no buffered reader can swallow the
//! first D-Bus message a client pipelines after `BEGIN`.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::socket::Socket;

/// More failed attempts than this (REJECTED or ERROR replies) end the
/// connection: real clients try at most a few mechanisms, a hostile one
/// could otherwise keep the handshake going until the deadline.
pub const MAX_FAILURES: u32 = 8;

/// The SASL mechanisms the bus offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mechanisms {
    pub external: bool,
    /// A client may connect without saying who it is.
    pub anonymous: bool,
}

impl Mechanisms {
    pub const EXTERNAL: Mechanisms = Mechanisms {
        external: true,
        anonymous: false,
    };

    /// From the configuration: the `<auth>` mechanisms (none: every one the bus has), of which
    /// ANONYMOUS counts only with `<allow_anonymous/>`, as dbus-daemon refuses anonymous
    /// clients without it. A list that leaves nothing broker supports is an error.
    pub fn configured(auth: &[String], allow_anonymous: bool) -> Result<Mechanisms, String> {
        let listed = |name: &str| auth.is_empty() || auth.iter().any(|a| a == name);
        let mechanisms = Mechanisms {
            external: listed("EXTERNAL"),
            anonymous: allow_anonymous && listed("ANONYMOUS"),
        };
        if !mechanisms.external && !mechanisms.anonymous {
            return Err(format!(
                "the configuration allows the authentication mechanisms {} only; broker offers \
                 EXTERNAL, and ANONYMOUS with <allow_anonymous/>",
                auth.join(", ")
            ));
        }
        Ok(mechanisms)
    }

    /// The REJECTED line; the spec wants the same list each time.
    fn rejected(self) -> String {
        let mut line = String::from("REJECTED");
        if self.external {
            line.push_str(" EXTERNAL");
        }
        if self.anonymous {
            line.push_str(" ANONYMOUS");
        }
        line.push_str("\r\n");
        line
    }
}

/// How much is read from the socket at once. Small enough that a client
/// pipelining a flood after `BEGIN` costs us little here: the rest stays in
/// the socket for the message reader.
const READ_CHUNK: usize = 4096;

/// What the bus requires of a connecting client.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    /// Server GUID, 32 lowercase hex chars, sent in `OK <guid>`.
    pub guid: String,
    /// The uid that owns the bus; only it (or root, uid 0) may connect.
    pub owner_uid: u32,
    /// Deadline for the whole handshake (the bus uses 30 s).
    pub timeout: Duration,
    /// Longest accepted line including CRLF (the bus uses 16 KiB).
    pub max_line: usize,
    pub mechanisms: Mechanisms,
}

/// A finished handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// `NEGOTIATE_UNIX_FD` was agreed.
    pub unix_fds: bool,
    /// The client authenticated with ANONYMOUS: the bus does not know who it is.
    pub anonymous: bool,
    /// Bytes received after `BEGIN\r\n`: the start of the message stream
    /// (sd-bus sends `Hello` in the same write as `BEGIN`).
    pub leftover: Vec<u8>,
}

/// Why a handshake ended without success. Every variant means: disconnect.
#[derive(Debug)]
pub enum AuthError {
    /// The handshake did not finish within the policy's deadline.
    Timeout(Duration),
    /// The client closed (or reset) the connection.
    Closed,
    /// More than [`MAX_FAILURES`] rejections or errors.
    TooManyFailures,
    /// A line (including CRLF) exceeded the policy's `max_line`.
    LineTooLong(usize),
    /// The first byte was not the NUL byte the protocol starts with.
    BadFirstByte(u8),
    /// Reading from or writing to the socket failed.
    Io(io::Error),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout(limit) => write!(
                f,
                "authentication timed out (not finished within {} ms)",
                limit.as_millis()
            ),
            Self::Closed => f.write_str("client closed the connection during authentication"),
            Self::TooManyFailures => write!(
                f,
                "authentication rejected too often (more than {MAX_FAILURES} failed attempts)"
            ),
            Self::LineTooLong(max) => write!(f, "authentication line longer than {max} bytes"),
            Self::BadFirstByte(byte) => write!(
                f,
                "bad first byte 0x{byte:02x} (the protocol starts with a NUL byte)"
            ),
            Self::Io(err) => write!(f, "I/O error during authentication: {err}"),
        }
    }
}

impl std::error::Error for AuthError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(err) => Some(err),
            _ => None,
        }
    }
}

impl From<io::Error> for AuthError {
    /// A reset or broken pipe is just a client that went away.
    fn from(err: io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Self::Closed,
            _ => Self::Io(err),
        }
    }
}

/// Runs the server side of the handshake on `socket`, whose peer has uid
/// `peer_uid` (from `SO_PEERCRED`). On success the socket is positioned at
/// the message stream, with anything already read in `leftover`.
pub async fn authenticate(
    socket: &Socket,
    peer_uid: u32,
    policy: &AuthPolicy,
) -> Result<Authenticated, AuthError> {
    let mut handshake = Handshake::new(peer_uid, policy);
    let outcome = tokio::time::timeout(policy.timeout, drive(socket, &mut handshake))
        .await
        .unwrap_or(Err(AuthError::Timeout(policy.timeout)));
    match &outcome {
        Ok(done) => tracing::debug!(peer_uid, unix_fds = done.unix_fds, "client authenticated"),
        Err(err) => tracing::debug!(peer_uid, "authentication failed: {err}"),
    }
    outcome
}

/// Reads, answers and writes until the handshake ends; no deadline here.
async fn drive(socket: &Socket, handshake: &mut Handshake) -> Result<Authenticated, AuthError> {
    let mut chunk = [0u8; READ_CHUNK];
    let mut replies = Vec::new();
    let mut first = read_now(socket, &mut chunk)?;
    loop {
        let received = match first.take() {
            Some(n) => chunk.get(..n).unwrap_or_default(),
            None => read_some(socket, &mut chunk).await?,
        };
        if received.is_empty() {
            return Err(AuthError::Closed);
        }
        let done = handshake.receive(received, &mut replies)?;
        write_all(socket, &replies).await?;
        replies.clear();
        if let Some(done) = done {
            return Ok(done);
        }
    }
}

/// The first read of a handshake, tried before any wait: a client sends `\0AUTH ...` as soon
/// as `connect` returns, so the line is usually there when the bus accepts. Reading it at once,
/// as dbus-broker does, saves a trip through the event loop per connection (an `epoll_wait`
/// and a second scheduling of this task before the client's `OK` can go out). Returns the
/// bytes read (0: end of file), or `None` when nothing has come yet: then the usual wait
/// follows. Correct with the edge-triggered registration: the kernel reports the socket at the
/// next `epoll_wait` only if it is still readable then.
fn read_now(socket: &Socket, buf: &mut [u8]) -> Result<Option<usize>, AuthError> {
    use nix::errno::Errno;
    use std::os::fd::AsRawFd;
    match nix::sys::socket::recv(
        socket.as_raw_fd(),
        buf,
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(n) => Ok(Some(n)),
        Err(Errno::EAGAIN | Errno::EINTR) => Ok(None),
        Err(e) => Err(io::Error::from(e).into()),
    }
}

/// One non-blocking read into `buf`; an empty slice means end of file.
async fn read_some<'a>(socket: &Socket, buf: &'a mut [u8]) -> Result<&'a [u8], AuthError> {
    loop {
        socket.readable().await?;
        let mut received = None;
        let outcome = socket.try_read(|fd| {
            let n = nix::sys::socket::recv(fd, buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
                .map_err(io::Error::from)?;
            received = Some(n);
            // A short read drained the socket: saying `WouldBlock` clears the readiness now,
            // which saves the next read that would only return EAGAIN (the client is waiting
            // for our reply). New data raises a new edge, so none is missed.
            if n > 0 && n < buf.len() {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        if let Some(n) = received {
            return Ok(buf.get(..n).unwrap_or_default());
        }
        match outcome {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err.into()),
            Ok(()) => continue,
        }
    }
}

/// Writes all of `bytes`: at once, as a fresh socket takes a few lines; should it not, waits
/// for it to take more.
async fn write_all(socket: &Socket, mut bytes: &[u8]) -> Result<(), AuthError> {
    while !bytes.is_empty() {
        match socket.try_write(bytes) {
            Ok(0) => return Err(AuthError::Closed),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Byte-level framing of the handshake: the initial NUL byte, CRLF-terminated
/// lines of bounded length, and the bytes left over after `BEGIN`.
#[derive(Debug)]
pub struct Handshake {
    sasl: Sasl,
    max_line: usize,
    seen_nul: bool,
    /// Received bytes not yet consumed as a line.
    pending: Vec<u8>,
    /// Where the next CRLF search in `pending` resumes: everything before it
    /// was already searched, so a client that trickles bytes does not make
    /// us rescan the same line over and over.
    scanned: usize,
}

impl Handshake {
    /// A handshake for a peer with uid `peer_uid` under `policy`.
    pub fn new(peer_uid: u32, policy: &AuthPolicy) -> Self {
        Self {
            sasl: Sasl::new(peer_uid, policy),
            max_line: policy.max_line,
            seen_nul: false,
            pending: Vec::new(),
            scanned: 0,
        }
    }

    /// Consumes bytes from the client and appends the replies to `out`.
    /// Returns `Some` once `BEGIN` was received; bytes after it are the
    /// leftover and nothing more may be fed in.
    pub fn receive(
        &mut self,
        mut data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<Authenticated>, AuthError> {
        if !self.seen_nul {
            let Some((&first, rest)) = data.split_first() else {
                return Ok(None);
            };
            if first != 0 {
                return Err(AuthError::BadFirstByte(first));
            }
            self.seen_nul = true;
            data = rest;
        }
        self.pending.extend_from_slice(data);
        let done = self.answer_lines(out);
        if !matches!(done, Ok(None)) {
            return done;
        }
        if self.pending.len() >= self.max_line {
            // No CRLF within max_line bytes: the line can only get longer.
            return Err(AuthError::LineTooLong(self.max_line));
        }
        Ok(None)
    }

    /// Answers every complete line in `pending` and drops them from it.
    fn answer_lines(&mut self, out: &mut Vec<u8>) -> Result<Option<Authenticated>, AuthError> {
        let mut start = 0;
        let outcome = loop {
            let Some(end) = self.next_line_end(start) else {
                break Ok(None);
            };
            let line = self.pending.get(start..end).unwrap_or_default();
            start = end + 2;
            if line.len() + 2 > self.max_line {
                break Err(AuthError::LineTooLong(self.max_line));
            }
            tracing::trace!(line = %line.escape_ascii(), "auth line");
            match self.sasl.handle_line(line) {
                Ok(Step::Reply(reply)) => out.extend_from_slice(reply.as_bytes()),
                Ok(Step::Begin {
                    unix_fds,
                    anonymous,
                }) => {
                    let leftover = self.pending.get(start..).unwrap_or_default().to_vec();
                    break Ok(Some(Authenticated {
                        unix_fds,
                        anonymous,
                        leftover,
                    }));
                }
                Err(err) => break Err(err),
            }
        };
        self.pending.drain(..start);
        self.scanned = self.scanned.saturating_sub(start);
        outcome
    }

    /// Index of the CRLF ending the line that starts at `start`, if it has
    /// arrived. Remembers how far it looked when there is none yet.
    fn next_line_end(&mut self, start: usize) -> Option<usize> {
        let from = start.max(self.scanned);
        let rest = self.pending.get(from..).unwrap_or_default();
        match rest.windows(2).position(|pair| pair == b"\r\n") {
            Some(offset) => {
                self.scanned = from + offset + 2;
                Some(from + offset)
            }
            None => {
                // The last byte may be the CR of a CRLF still in flight.
                self.scanned = self.pending.len().saturating_sub(1).max(from);
                None
            }
        }
    }
}

/// What the server does after one line from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this reply (a complete line, CRLF included) and keep going.
    Reply(String),
    /// `BEGIN` after a successful `OK`: the message stream starts.
    Begin {
        /// `NEGOTIATE_UNIX_FD` was agreed.
        unix_fds: bool,
        /// ANONYMOUS it was.
        anonymous: bool,
    },
}

/// Server states of the spec's "Authentication state diagrams".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// WaitingForAuth: no exchange in progress.
    Idle,
    /// WaitingForData: `AUTH EXTERNAL` came without a response, we sent DATA.
    Challenged,
    /// WaitingForBegin: we sent OK.
    Accepted { unix_fds: bool, anonymous: bool },
}

/// The line-level SASL server: feed it each line (without CRLF), send back
/// what it answers.
#[derive(Debug)]
pub struct Sasl {
    state: State,
    peer_uid: u32,
    owner_uid: u32,
    guid: String,
    mechanisms: Mechanisms,
    failures: u32,
}

impl Sasl {
    /// A server for a peer with uid `peer_uid` under `policy`.
    pub fn new(peer_uid: u32, policy: &AuthPolicy) -> Self {
        Self {
            state: State::Idle,
            peer_uid,
            owner_uid: policy.owner_uid,
            guid: policy.guid.clone(),
            mechanisms: policy.mechanisms,
            failures: 0,
        }
    }

    /// Answers one line (CRLF already stripped). An error means disconnect.
    pub fn handle_line(&mut self, line: &[u8]) -> Result<Step, AuthError> {
        let Some(line) = printable_ascii(line) else {
            return self.error("Line is not printable ASCII");
        };
        let (command, args) = line.split_once(' ').unwrap_or((line, ""));
        match (command, self.state) {
            ("AUTH", State::Idle) => self.auth(args),
            ("AUTH", _) => self.error("AUTH while another AUTH is in progress"),
            ("DATA", State::Challenged) => self.external(args),
            ("DATA", _) => self.error("DATA without a pending AUTH"),
            ("CANCEL" | "ERROR", _) => self.reject(),
            ("NEGOTIATE_UNIX_FD", State::Accepted { anonymous, .. }) => {
                self.state = State::Accepted {
                    unix_fds: true,
                    anonymous,
                };
                Ok(Step::Reply("AGREE_UNIX_FD\r\n".to_owned()))
            }
            ("NEGOTIATE_UNIX_FD" | "BEGIN", State::Idle | State::Challenged) => {
                self.error("Not authenticated")
            }
            (
                "BEGIN",
                State::Accepted {
                    unix_fds,
                    anonymous,
                },
            ) => Ok(Step::Begin {
                unix_fds,
                anonymous,
            }),
            _ => self.error("Unknown command"),
        }
    }

    /// `AUTH [mechanism [initial-response]]`.
    fn auth(&mut self, args: &str) -> Result<Step, AuthError> {
        match args.split_once(' ').unwrap_or((args, "")) {
            ("EXTERNAL", "") if self.mechanisms.external => {
                self.state = State::Challenged;
                Ok(Step::Reply("DATA\r\n".to_owned()))
            }
            ("EXTERNAL", response) if self.mechanisms.external => self.external(response),
            // The response is optional trace text (RFC 4505); the bus does not use it.
            ("ANONYMOUS", _) if self.mechanisms.anonymous => Ok(self.accept(true)),
            _ => self.reject(),
        }
    }

    /// Judges an EXTERNAL response: the hex-encoded decimal uid the client
    /// claims, or empty for "whoever the socket says I am".
    fn external(&mut self, hex: &str) -> Result<Step, AuthError> {
        let claimed = if hex.is_empty() {
            Some(self.peer_uid)
        } else {
            decode_hex(hex).as_deref().and_then(parse_uid)
        };
        let allowed = self.peer_uid == self.owner_uid || self.peer_uid == 0;
        if claimed == Some(self.peer_uid) && allowed {
            Ok(self.accept(false))
        } else {
            tracing::debug!(peer_uid = self.peer_uid, ?claimed, "EXTERNAL rejected");
            self.reject()
        }
    }

    /// Says OK: the client may negotiate fds and begin.
    fn accept(&mut self, anonymous: bool) -> Step {
        self.state = State::Accepted {
            unix_fds: false,
            anonymous,
        };
        Step::Reply(format!("OK {}\r\n", self.guid))
    }

    /// Aborts the current exchange with REJECTED.
    fn reject(&mut self) -> Result<Step, AuthError> {
        self.state = State::Idle;
        let rejected = self.mechanisms.rejected();
        self.fail(rejected)
    }

    /// Refuses one line with ERROR; the state stays as it was.
    fn error(&mut self, reason: &str) -> Result<Step, AuthError> {
        self.fail(format!("ERROR \"{reason}\"\r\n"))
    }

    /// Counts a failed attempt; too many end the handshake.
    fn fail(&mut self, reply: String) -> Result<Step, AuthError> {
        self.failures += 1;
        if self.failures > MAX_FAILURES {
            return Err(AuthError::TooManyFailures);
        }
        Ok(Step::Reply(reply))
    }
}

/// The line as text if every byte is printable ASCII (space to `~`); the
/// protocol is ASCII-only and control bytes have no meaning in it.
fn printable_ascii(line: &[u8]) -> Option<&str> {
    if line.iter().all(|byte| (b' '..=b'~').contains(byte)) {
        std::str::from_utf8(line).ok()
    } else {
        None
    }
}

/// Decodes hex (either case); `None` for odd length or a non-hex digit.
fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.as_bytes()
        .chunks_exact(2)
        .map(|pair| match pair {
            [high, low] => Some(hex_digit(*high)? << 4 | hex_digit(*low)?),
            _ => None,
        })
        .collect()
}

fn hex_digit(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

/// A uid written as ASCII decimal digits only (no sign, no spaces). Login
/// names are not supported, as the spec allows.
fn parse_uid(text: &[u8]) -> Option<u32> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    const GUID: &str = "0123456789abcdef0123456789abcdef";
    const OWNER: u32 = 1000;
    const OK_LINE: &str = "OK 0123456789abcdef0123456789abcdef\r\n";
    const REJECTED: &str = "REJECTED EXTERNAL\r\n";
    const UNKNOWN: &str = "ERROR \"Unknown command\"\r\n";
    const NOT_AUTHENTICATED: &str = "ERROR \"Not authenticated\"\r\n";
    const NO_PENDING_AUTH: &str = "ERROR \"DATA without a pending AUTH\"\r\n";
    const AUTH_IN_PROGRESS: &str = "ERROR \"AUTH while another AUTH is in progress\"\r\n";

    fn policy() -> AuthPolicy {
        AuthPolicy {
            guid: GUID.to_owned(),
            owner_uid: OWNER,
            timeout: Duration::from_secs(10),
            max_line: 64,
            mechanisms: Mechanisms::EXTERNAL,
        }
    }

    /// Feeds `line` and returns the reply text; anything else fails the test.
    fn answer(sasl: &mut Sasl, line: impl AsRef<[u8]>) -> String {
        match sasl.handle_line(line.as_ref()) {
            Ok(Step::Reply(reply)) => reply,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// Asserts that BEGIN now ends the handshake with this fd agreement.
    fn assert_begins(sasl: &mut Sasl, unix_fds: bool) {
        assert_eq!(
            sasl.handle_line(b"BEGIN").ok(),
            Some(Step::Begin {
                unix_fds,
                anonymous: false
            })
        );
    }

    /// A server that already sent OK to the owner.
    fn authenticated_owner() -> Sasl {
        let mut sasl = Sasl::new(OWNER, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303030"), OK_LINE);
        sasl
    }

    #[test]
    fn external_with_owner_uid_is_accepted() {
        let mut sasl = authenticated_owner();
        assert_begins(&mut sasl, false);
    }

    #[test]
    fn claiming_another_uid_is_rejected() {
        let mut sasl = Sasl::new(OWNER, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 30"), REJECTED);
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303031"), REJECTED);
        assert_eq!(answer(&mut sasl, "BEGIN"), NOT_AUTHENTICATED);
    }

    #[test]
    fn non_owner_is_rejected_even_with_its_true_uid() {
        let mut sasl = Sasl::new(1001, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303031"), REJECTED);
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL"), "DATA\r\n");
        assert_eq!(answer(&mut sasl, "DATA"), REJECTED);
    }

    #[test]
    fn root_is_allowed_on_a_bus_it_does_not_own() {
        let mut sasl = Sasl::new(0, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 30"), OK_LINE);
        // ...but root must still claim its own uid.
        let mut sasl = Sasl::new(0, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303030"), REJECTED);
    }

    #[test]
    fn data_flow_with_identity() {
        let mut sasl = Sasl::new(OWNER, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL"), "DATA\r\n");
        assert_eq!(answer(&mut sasl, "DATA 31303030"), OK_LINE);
        assert_begins(&mut sasl, false);
    }

    #[test]
    fn empty_data_authorises_as_the_socket_peer() {
        let mut sasl = Sasl::new(OWNER, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL "), "DATA\r\n");
        assert_eq!(answer(&mut sasl, "DATA"), OK_LINE);
    }

    #[test]
    fn data_with_wrong_uid_is_rejected_and_restarts() {
        let mut sasl = Sasl::new(OWNER, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL"), "DATA\r\n");
        assert_eq!(answer(&mut sasl, "DATA 30"), REJECTED);
        // Back in WaitingForAuth: DATA is out of place now.
        assert_eq!(answer(&mut sasl, "DATA 31303030"), NO_PENDING_AUTH);
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303030"), OK_LINE);
    }

    #[test]
    fn cancel_or_error_while_waiting_for_data_is_rejected() {
        for abort in ["CANCEL", "ERROR", "ERROR some explanation"] {
            let mut sasl = Sasl::new(OWNER, &policy());
            assert_eq!(answer(&mut sasl, "AUTH EXTERNAL"), "DATA\r\n");
            assert_eq!(answer(&mut sasl, abort), REJECTED, "{abort}");
            assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303030"), OK_LINE);
        }
    }

    #[test]
    fn auth_while_waiting_for_data_is_an_error_and_keeps_the_exchange() {
        let mut sasl = Sasl::new(OWNER, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL"), "DATA\r\n");
        assert_eq!(
            answer(&mut sasl, "AUTH EXTERNAL 31303030"),
            AUTH_IN_PROGRESS
        );
        assert_eq!(answer(&mut sasl, "DATA 31303030"), OK_LINE);
    }

    fn with_mechanisms(mechanisms: Mechanisms) -> AuthPolicy {
        AuthPolicy {
            mechanisms,
            ..policy()
        }
    }

    #[test]
    fn anonymous_is_accepted_from_anyone_only_where_offered() {
        let both = Mechanisms {
            external: true,
            anonymous: true,
        };
        let stranger = OWNER + 1;
        for line in ["AUTH ANONYMOUS", "AUTH ANONYMOUS 7472616365"] {
            let mut sasl = Sasl::new(stranger, &with_mechanisms(both));
            assert_eq!(answer(&mut sasl, line), OK_LINE, "{line}");
            assert_eq!(answer(&mut sasl, "NEGOTIATE_UNIX_FD"), "AGREE_UNIX_FD\r\n");
            assert_eq!(
                sasl.handle_line(b"BEGIN").ok(),
                Some(Step::Begin {
                    unix_fds: true,
                    anonymous: true
                })
            );
        }
        let mut sasl = Sasl::new(stranger, &policy());
        assert_eq!(answer(&mut sasl, "AUTH ANONYMOUS"), REJECTED);
    }

    #[test]
    fn the_rejected_line_lists_what_is_offered_and_external_can_be_withheld() {
        let anonymous_only = Mechanisms {
            external: false,
            anonymous: true,
        };
        let mut sasl = Sasl::new(OWNER, &with_mechanisms(anonymous_only));
        let rejected = "REJECTED ANONYMOUS\r\n";
        assert_eq!(answer(&mut sasl, "AUTH"), rejected);
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303030"), rejected);
        let both = Mechanisms {
            external: true,
            anonymous: true,
        };
        let mut sasl = Sasl::new(OWNER, &with_mechanisms(both));
        assert_eq!(answer(&mut sasl, "AUTH"), "REJECTED EXTERNAL ANONYMOUS\r\n");
    }

    #[test]
    fn configured_mechanisms_follow_auth_and_allow_anonymous() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Mechanisms::configured(&[], false), Ok(Mechanisms::EXTERNAL));
        assert_eq!(
            Mechanisms::configured(&[], true),
            Ok(Mechanisms {
                external: true,
                anonymous: true
            })
        );
        assert_eq!(
            Mechanisms::configured(&names(&["EXTERNAL", "ANONYMOUS"]), false),
            Ok(Mechanisms::EXTERNAL)
        );
        assert_eq!(
            Mechanisms::configured(&names(&["ANONYMOUS"]), true),
            Ok(Mechanisms {
                external: false,
                anonymous: true
            })
        );
        let err = Mechanisms::configured(&names(&["DBUS_COOKIE_SHA1"]), false).unwrap_err();
        assert!(err.contains("DBUS_COOKIE_SHA1"), "{err}");
        assert!(Mechanisms::configured(&names(&["ANONYMOUS"]), false).is_err());
    }

    #[test]
    fn listing_and_unknown_mechanisms_get_the_mechanism_list() {
        let mut sasl = Sasl::new(OWNER, &policy());
        for line in [
            "AUTH",
            "AUTH ",
            "AUTH DBUS_COOKIE_SHA1 31303030",
            "AUTH ANONYMOUS",
            "AUTH external 31303030",
        ] {
            assert_eq!(answer(&mut sasl, line), REJECTED, "{line}");
        }
    }

    #[test]
    fn malformed_identities_are_rejected() {
        for hex in [
            "3",                                            // odd length
            "3g",                                           // not hex
            "31 30",                                        // space inside
            "2d31",                                         // "-1"
            "2b31303030",                                   // "+1000"
            "203130303020",                                 // " 1000 "
            "726f6f74",                                     // "root": login names unsupported
            "34323934393637323936",                         // 4294967296 overflows u32
            "31303030303030303030303030303030303030303030", // huge
            "00",                                           // NUL
        ] {
            let mut sasl = Sasl::new(OWNER, &policy());
            let line = format!("AUTH EXTERNAL {hex}");
            assert_eq!(answer(&mut sasl, &line), REJECTED, "{line}");
        }
    }

    #[test]
    fn leading_zeros_and_the_largest_uid_decode() {
        let mut sasl = Sasl::new(OWNER, &policy());
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 3031303030"), OK_LINE);
        let max_owner = AuthPolicy {
            owner_uid: u32::MAX,
            ..policy()
        };
        let mut sasl = Sasl::new(u32::MAX, &max_owner);
        assert_eq!(
            answer(&mut sasl, "AUTH EXTERNAL 34323934393637323935"),
            OK_LINE
        );
    }

    #[test]
    fn negotiate_unix_fd_needs_ok_first() {
        let mut sasl = Sasl::new(OWNER, &policy());
        assert_eq!(answer(&mut sasl, "NEGOTIATE_UNIX_FD"), NOT_AUTHENTICATED);
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL"), "DATA\r\n");
        assert_eq!(answer(&mut sasl, "NEGOTIATE_UNIX_FD"), NOT_AUTHENTICATED);
        assert_eq!(answer(&mut sasl, "DATA"), OK_LINE);
        assert_eq!(answer(&mut sasl, "NEGOTIATE_UNIX_FD"), "AGREE_UNIX_FD\r\n");
        assert_begins(&mut sasl, true);
    }

    #[test]
    fn begin_before_ok_is_an_error() {
        let mut sasl = Sasl::new(OWNER, &policy());
        assert_eq!(answer(&mut sasl, "BEGIN"), NOT_AUTHENTICATED);
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL"), "DATA\r\n");
        assert_eq!(answer(&mut sasl, "BEGIN"), NOT_AUTHENTICATED);
        // The pending exchange survives the error.
        assert_eq!(answer(&mut sasl, "DATA 31303030"), OK_LINE);
    }

    #[test]
    fn cancel_after_ok_starts_over_and_forgets_unix_fds() {
        let mut sasl = authenticated_owner();
        assert_eq!(answer(&mut sasl, "NEGOTIATE_UNIX_FD"), "AGREE_UNIX_FD\r\n");
        assert_eq!(answer(&mut sasl, "CANCEL"), REJECTED);
        assert_eq!(answer(&mut sasl, "BEGIN"), NOT_AUTHENTICATED);
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303030"), OK_LINE);
        assert_begins(&mut sasl, false);
    }

    #[test]
    fn error_after_ok_is_rejected() {
        let mut sasl = authenticated_owner();
        assert_eq!(answer(&mut sasl, "ERROR \"changed my mind\""), REJECTED);
        assert_eq!(answer(&mut sasl, "NEGOTIATE_UNIX_FD"), NOT_AUTHENTICATED);
    }

    #[test]
    fn other_commands_after_ok_are_errors_that_keep_ok() {
        let mut sasl = authenticated_owner();
        assert_eq!(
            answer(&mut sasl, "AUTH EXTERNAL 31303030"),
            AUTH_IN_PROGRESS
        );
        assert_eq!(answer(&mut sasl, "DATA"), NO_PENDING_AUTH);
        assert_eq!(answer(&mut sasl, "EXTENSION_FOO"), UNKNOWN);
        assert_begins(&mut sasl, false);
    }

    #[test]
    fn unknown_commands_are_errors_in_every_state() {
        let mut sasl = Sasl::new(OWNER, &policy());
        for line in ["FOOBAR", "", " ", "auth EXTERNAL 31303030", "BEGINX"] {
            assert_eq!(answer(&mut sasl, line), UNKNOWN, "{line:?}");
        }
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL"), "DATA\r\n");
        assert_eq!(answer(&mut sasl, "FOOBAR"), UNKNOWN);
        assert_eq!(answer(&mut sasl, "DATA"), OK_LINE);
        assert_eq!(answer(&mut sasl, "FOOBAR"), UNKNOWN);
    }

    #[test]
    fn non_ascii_and_control_bytes_get_an_error_and_change_nothing() {
        let garbage: [&[u8]; 5] = [
            b"AUTH EXTERNAL \xff\xfe",
            b"AUTH\0EXTERNAL 31303030",
            b"AUTH\tEXTERNAL 31303030",
            b"AUTH EXTERNAL 31303030\n",
            "AUTH EXTERNAL \u{e9}".as_bytes(),
        ];
        let mut sasl = Sasl::new(OWNER, &policy());
        for line in garbage {
            assert_eq!(
                answer(&mut sasl, line),
                "ERROR \"Line is not printable ASCII\"\r\n",
                "{}",
                line.escape_ascii()
            );
        }
        assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303030"), OK_LINE);
    }

    #[test]
    fn too_many_failures_disconnect() {
        let mut sasl = Sasl::new(OWNER, &policy());
        let failing = ["AUTH", "FOOBAR", "CANCEL", "AUTH EXTERNAL 30"];
        for line in failing.iter().cycle().take(MAX_FAILURES as usize) {
            assert!(matches!(
                sasl.handle_line(line.as_bytes()),
                Ok(Step::Reply(_))
            ));
        }
        assert!(matches!(
            sasl.handle_line(b"AUTH"),
            Err(AuthError::TooManyFailures)
        ));
    }

    #[test]
    fn successes_do_not_count_as_failures() {
        let mut sasl = Sasl::new(OWNER, &policy());
        for _ in 0..MAX_FAILURES {
            assert_eq!(answer(&mut sasl, "AUTH EXTERNAL 31303030"), OK_LINE);
            assert_eq!(answer(&mut sasl, "NEGOTIATE_UNIX_FD"), "AGREE_UNIX_FD\r\n");
            assert_eq!(answer(&mut sasl, "CANCEL"), REJECTED);
        }
        assert!(matches!(
            sasl.handle_line(b"CANCEL"),
            Err(AuthError::TooManyFailures)
        ));
    }

    const PIPELINED: &[u8] =
        b"\0AUTH EXTERNAL 30\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\nl\x01\0\x01\r\nBEGIN\r\n\0";
    const PIPELINED_LEFTOVER: &[u8] = b"l\x01\0\x01\r\nBEGIN\r\n\0";
    const PIPELINED_REPLIES: &str = "OK 0123456789abcdef0123456789abcdef\r\nAGREE_UNIX_FD\r\n";

    /// Feeds `chunks` in order and returns the outcome and every reply.
    fn feed(
        handshake: &mut Handshake,
        chunks: &[&[u8]],
    ) -> (Result<Option<Authenticated>, AuthError>, String) {
        let mut out = Vec::new();
        let mut outcome = Ok(None);
        for chunk in chunks {
            outcome = handshake.receive(chunk, &mut out);
            if !matches!(outcome, Ok(None)) {
                break;
            }
        }
        (outcome, String::from_utf8_lossy(&out).into_owned())
    }

    #[test]
    fn pipelined_handshake_keeps_the_leftover_exactly() {
        let mut handshake = Handshake::new(0, &policy());
        let (outcome, replies) = feed(&mut handshake, &[PIPELINED]);
        assert_eq!(replies, PIPELINED_REPLIES);
        let done = outcome.unwrap().unwrap();
        assert!(done.unix_fds);
        assert_eq!(done.leftover, PIPELINED_LEFTOVER);
    }

    #[test]
    fn byte_at_a_time_matches_pipelined() {
        let mut handshake = Handshake::new(0, &policy());
        let bytes: Vec<&[u8]> = PIPELINED.chunks(1).collect();
        let (outcome, replies) = feed(&mut handshake, &bytes);
        assert_eq!(replies, PIPELINED_REPLIES);
        let done = outcome.unwrap().unwrap();
        assert!(done.unix_fds);
        // Fed one byte at a time, BEGIN ends with its own LF: nothing left over.
        assert_eq!(done.leftover, b"");
    }

    #[test]
    fn nothing_after_begin_leaves_no_leftover() {
        let mut handshake = Handshake::new(OWNER, &policy());
        let (outcome, replies) = feed(
            &mut handshake,
            &[b"\0", b"AUTH EXTERNAL 31303030\r\n", b"BEGIN\r\n"],
        );
        assert_eq!(replies, OK_LINE);
        assert_eq!(
            outcome.unwrap(),
            Some(Authenticated {
                unix_fds: false,
                anonymous: false,
                leftover: Vec::new()
            })
        );
    }

    #[test]
    fn first_byte_must_be_nul() {
        for first in [b"A".as_slice(), b"\x01", b"\r\n"] {
            let mut handshake = Handshake::new(OWNER, &policy());
            let (outcome, replies) = feed(&mut handshake, &[first, b"AUTH EXTERNAL 31303030\r\n"]);
            assert!(
                matches!(outcome, Err(AuthError::BadFirstByte(b)) if Some(&b) == first.first())
            );
            assert_eq!(replies, "");
        }
    }

    #[test]
    fn a_second_nul_or_a_bare_lf_is_garbage_in_the_line() {
        for input in [
            b"\0\0AUTH EXTERNAL 31303030\r\n".as_slice(),
            b"\0FOO\nAUTH EXTERNAL 31303030\r\n",
        ] {
            let mut handshake = Handshake::new(OWNER, &policy());
            let (outcome, replies) = feed(&mut handshake, &[input]);
            assert!(matches!(outcome, Ok(None)));
            assert_eq!(replies, "ERROR \"Line is not printable ASCII\"\r\n");
        }
    }

    #[test]
    fn overlong_line_without_end_disconnects() {
        let max = policy().max_line;
        let mut handshake = Handshake::new(OWNER, &policy());
        let almost = vec![b'A'; max - 1];
        let (outcome, _) = feed(&mut handshake, &[b"\0", &almost]);
        assert!(
            matches!(outcome, Ok(None)),
            "{max} - 1 bytes may still end in time"
        );
        let (outcome, _) = feed(&mut handshake, &[b"A"]);
        assert!(matches!(outcome, Err(AuthError::LineTooLong(m)) if m == max));
    }

    #[test]
    fn overlong_complete_line_disconnects() {
        let max = policy().max_line;
        let mut line = vec![b'A'; max - 1];
        line.extend_from_slice(b"\r\n");
        let mut handshake = Handshake::new(OWNER, &policy());
        let (outcome, replies) = feed(&mut handshake, &[b"\0FOO\r\n", &line]);
        assert!(matches!(outcome, Err(AuthError::LineTooLong(_))));
        assert_eq!(replies, UNKNOWN, "lines before the long one were answered");
    }

    #[test]
    fn line_of_exactly_max_line_is_accepted() {
        let max = policy().max_line;
        let mut line = vec![b'X'; max - 2];
        line.extend_from_slice(b"\r\n");
        let mut handshake = Handshake::new(OWNER, &policy());
        // The line arrives with its CR, then the LF on its own.
        let (cr_end, lf) = line.split_at(max - 1);
        let (outcome, replies) = feed(&mut handshake, &[b"\0", cr_end, lf]);
        assert!(matches!(outcome, Ok(None)));
        assert_eq!(replies, UNKNOWN);
    }

    #[test]
    fn errors_read_as_one_line_reasons() {
        let cases = [
            (AuthError::Timeout(Duration::from_secs(30)), "timed out"),
            (AuthError::Closed, "closed"),
            (AuthError::TooManyFailures, "rejected too often"),
            (AuthError::LineTooLong(16384), "longer than 16384"),
            (AuthError::BadFirstByte(b'A'), "0x41"),
            (
                io::Error::other("boom").into(),
                "I/O error during authentication: boom",
            ),
            (
                io::Error::from(io::ErrorKind::ConnectionReset).into(),
                "closed",
            ),
        ];
        for (err, expected) in cases {
            let text = err.to_string();
            assert!(text.contains(expected), "{text:?} lacks {expected:?}");
            assert!(!text.contains('\n'), "{text:?}");
        }
    }

    // Over real sockets, on the current_thread runtime the bus uses.

    const PAIR_OWNER: u32 = 4242;

    fn socket_policy(timeout: Duration) -> AuthPolicy {
        AuthPolicy {
            owner_uid: PAIR_OWNER,
            timeout,
            max_line: 16 * 1024,
            ..policy()
        }
    }

    /// The server end of a fresh pair, as the bus holds it; and the client end.
    fn pair() -> (Socket, UnixStream) {
        let (server, client) = UnixStream::pair().unwrap();
        let server = std::os::fd::OwnedFd::from(server.into_std().unwrap());
        (Socket::from_fd(server).unwrap(), client)
    }

    /// Reads exactly `len` bytes of replies from the client side.
    async fn read_replies(client: &mut UnixStream, len: usize) -> String {
        let mut buf = vec![0; len];
        client.read_exact(&mut buf).await.unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[tokio::test]
    async fn socket_pipelined_success() {
        let (server, mut client) = pair();
        client.write_all(PIPELINED).await.unwrap();
        let done = authenticate(&server, 0, &socket_policy(Duration::from_secs(10)))
            .await
            .unwrap();
        assert!(done.unix_fds);
        assert_eq!(done.leftover, PIPELINED_LEFTOVER);
        let replies = read_replies(&mut client, PIPELINED_REPLIES.len()).await;
        assert_eq!(replies, PIPELINED_REPLIES);
    }

    /// A line that is there when the bus accepts is answered within the handshake's first poll,
    /// before any trip through the event loop: the first read does not wait for readiness.
    #[tokio::test]
    async fn socket_first_line_answered_without_waiting() {
        let (server, mut client) = pair();
        client.write_all(b"\0AUTH EXTERNAL 30\r\n").await.unwrap();
        let policy = socket_policy(Duration::from_secs(10));
        let mut handshake = std::pin::pin!(authenticate(&server, 0, &policy));
        let waiting = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(handshake.as_mut().poll(cx).is_pending())
        })
        .await;
        assert!(waiting, "the handshake goes on until BEGIN");
        // Read without the runtime: the OK must be in the socket already.
        let mut buf = [0u8; 64];
        let n = nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(&client),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .expect("the OK line was written in the first poll");
        assert_eq!(&buf[..n], b"OK 0123456789abcdef0123456789abcdef\r\n");
    }

    #[tokio::test]
    async fn socket_silent_client_times_out() {
        let (server, _client) = pair();
        let limit = Duration::from_millis(50);
        let outcome = authenticate(&server, PAIR_OWNER, &socket_policy(limit)).await;
        assert!(matches!(outcome, Err(AuthError::Timeout(d)) if d == limit));
    }

    #[tokio::test]
    async fn socket_deadline_covers_the_whole_handshake() {
        // A client that keeps talking but never finishes still hits the deadline.
        let (server, mut client) = pair();
        client
            .write_all(b"\0AUTH EXTERNAL 34323432\r\n")
            .await
            .unwrap();
        let limit = Duration::from_millis(50);
        let outcome = authenticate(&server, PAIR_OWNER, &socket_policy(limit)).await;
        assert!(matches!(outcome, Err(AuthError::Timeout(_))));
        assert_eq!(read_replies(&mut client, OK_LINE.len()).await, OK_LINE);
    }

    #[tokio::test]
    async fn socket_client_closing_mid_handshake() {
        let (server, mut client) = pair();
        client.write_all(b"\0AUTH EXTER").await.unwrap();
        drop(client);
        let outcome =
            authenticate(&server, PAIR_OWNER, &socket_policy(Duration::from_secs(10))).await;
        assert!(matches!(outcome, Err(AuthError::Closed)));
    }

    #[tokio::test]
    async fn socket_byte_at_a_time_client() {
        let (server, mut client) = pair();
        let policy = socket_policy(Duration::from_secs(10));
        let talk = async {
            for byte in b"\0AUTH EXTERNAL\r\nDATA\r\nBEGIN\r\nl" {
                client.write_all(&[*byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
        };
        let (outcome, ()) = tokio::join!(authenticate(&server, PAIR_OWNER, &policy), talk);
        let done = outcome.unwrap();
        assert!(!done.unix_fds);
        let replies = read_replies(&mut client, "DATA\r\n".len() + OK_LINE.len()).await;
        assert_eq!(replies, format!("DATA\r\n{OK_LINE}"));
        // The message stream ("l") is split between leftover and the socket,
        // depending on when the server saw BEGIN; nothing may be lost.
        let mut in_socket = vec![0; 1usize.saturating_sub(done.leftover.len())];
        if !in_socket.is_empty() {
            server.readable().await.unwrap();
            let n = server
                .try_read(|fd| {
                    nix::sys::socket::recv(fd, &mut in_socket, nix::sys::socket::MsgFlags::empty())
                        .map_err(io::Error::from)
                })
                .unwrap();
            assert_eq!(n, in_socket.len());
        }
        assert_eq!([done.leftover, in_socket].concat(), b"l");
    }
}
