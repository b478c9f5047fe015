//! The messages between the bus, its spawner and the keepers, and their wire format.
//!
//! Every message travels as one `SOCK_SEQPACKET` datagram, so a message is never split or
//! merged with the next. The format is a tag byte followed by the fields in order: integers
//! little-endian, strings and byte strings as a `u32` length and the bytes, lists as a `u32`
//! count and the items, an optional value as a 0/1 byte and the value. A datagram that ends
//! early, has bytes left over, or carries an unknown tag is refused: the peers are all this
//! binary, so a malformed message is a bug, never something to guess around.
//!
//! Descriptors do not appear here: a [`SpawnerRequest::Start`] carries three (the write ends of
//! the service's stdout and stderr pipes, and the keeper's end of its control socket) as
//! `SCM_RIGHTS` beside the bytes.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use super::ExitKind;
use super::system::ServiceUser;

/// Longest datagram any peer sends or accepts: an argv and environment well past any real one.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// What a keeper executes as the service's main process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecSpec {
    /// The program and its arguments; the program is not searched for on PATH.
    pub argv: Vec<String>,
    /// The whole environment of the process.
    pub env: Vec<(OsString, OsString)>,
    /// Where it starts; the spawner's directory (the bus's) if `None`.
    pub working_directory: Option<PathBuf>,
    /// The account the process becomes just before exec. Never on the wire: only a system
    /// spawner sets it, from the service file it read itself, so the bus cannot choose it.
    pub user: Option<ServiceUser>,
}

/// Bus → spawner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnerRequest {
    /// Fork a keeper for one start of `service` (three descriptors accompany it).
    Start {
        service: String,
        exec: ExecSpec,
        /// How long the service's processes have after SIGTERM before SIGKILL.
        grace: Duration,
    },
    /// A system bus's request: start the service that provides this name, as its file says.
    /// The system spawner reads the file itself and accepts nothing else; a session spawner
    /// refuses it. Three descriptors accompany it, as with `Start`.
    StartByName { service: String },
}

/// Spawner → bus, one per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnerReply {
    /// The keeper runs, with this pid.
    Started { keeper: u32 },
    /// No keeper could be forked; why.
    Failed { message: String },
    /// The request was refused with this D-Bus error (a system spawner's checks of the
    /// service file: `org.freedesktop.DBus.Error.Spawn.FileInvalid` and the like).
    Refused { error: String, message: String },
}

/// Keeper → bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeeperReport {
    /// The main process runs, with this pid.
    Spawned { pid: u32 },
    /// The main process could not be executed (`errno` of fork, chdir or exec); the keeper
    /// exits after this.
    ExecFailed { errno: i32 },
    /// The keeper reaped a process of the service: its main process, or one that was
    /// re-parented to it (a daemon that double-forked).
    Exited { pid: u32, status: ExitKind },
}

/// Bus → keeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeeperCommand {
    /// Stop every process of the service: SIGTERM, then SIGKILL after the grace.
    Stop,
}

/// A datagram that does not decode; what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

// Tags, distinct across all message types so a message sent to the wrong peer is refused too.
const START: u8 = 1;
const STARTED: u8 = 2;
const FAILED: u8 = 3;
const SPAWNED: u8 = 4;
const EXEC_FAILED: u8 = 5;
const EXITED: u8 = 6;
const STOP: u8 = 7;
const START_BY_NAME: u8 = 8;
const REFUSED: u8 = 9;

impl SpawnerRequest {
    pub fn encode(&self) -> Vec<u8> {
        let (service, exec, grace) = match self {
            SpawnerRequest::Start {
                service,
                exec,
                grace,
            } => (service, exec, grace),
            SpawnerRequest::StartByName { service } => {
                let mut out = Writer(vec![START_BY_NAME]);
                out.bytes(service.as_bytes());
                return out.0;
            }
        };
        let mut out = Writer(vec![START]);
        out.bytes(service.as_bytes());
        out.count(exec.argv.len());
        for arg in &exec.argv {
            out.bytes(arg.as_bytes());
        }
        out.count(exec.env.len());
        for (key, value) in &exec.env {
            out.bytes(key.as_bytes());
            out.bytes(value.as_bytes());
        }
        match &exec.working_directory {
            Some(dir) => {
                out.0.push(1);
                out.bytes(dir.as_os_str().as_bytes());
            }
            None => out.0.push(0),
        }
        out.u64(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        out.0
    }

    pub fn decode(data: &[u8]) -> Result<SpawnerRequest, DecodeError> {
        let mut r = Reader::new(data);
        if r.tag(&[START, START_BY_NAME])? == START_BY_NAME {
            let service = r.string()?;
            r.end()?;
            return Ok(SpawnerRequest::StartByName { service });
        }
        let service = r.string()?;
        let argv = (0..r.count()?)
            .map(|_| r.string())
            .collect::<Result<_, _>>()?;
        let env = (0..r.count()?)
            .map(|_| Ok((r.os_string()?, r.os_string()?)))
            .collect::<Result<_, _>>()?;
        let working_directory = match r.u8()? {
            0 => None,
            1 => Some(PathBuf::from(r.os_string()?)),
            other => return Err(DecodeError(format!("bad option flag {other}"))),
        };
        let grace = Duration::from_millis(r.u64()?);
        r.end()?;
        Ok(SpawnerRequest::Start {
            service,
            exec: ExecSpec {
                argv,
                env,
                working_directory,
                user: None,
            },
            grace,
        })
    }
}

impl SpawnerReply {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            SpawnerReply::Started { keeper } => {
                let mut out = Writer(vec![STARTED]);
                out.u32(*keeper);
                out.0
            }
            SpawnerReply::Failed { message } => {
                let mut out = Writer(vec![FAILED]);
                out.bytes(message.as_bytes());
                out.0
            }
            SpawnerReply::Refused { error, message } => {
                let mut out = Writer(vec![REFUSED]);
                out.bytes(error.as_bytes());
                out.bytes(message.as_bytes());
                out.0
            }
        }
    }

    pub fn decode(data: &[u8]) -> Result<SpawnerReply, DecodeError> {
        let mut r = Reader::new(data);
        let reply = match r.tag(&[STARTED, FAILED, REFUSED])? {
            STARTED => SpawnerReply::Started { keeper: r.u32()? },
            FAILED => SpawnerReply::Failed {
                message: r.string()?,
            },
            _ => SpawnerReply::Refused {
                error: r.string()?,
                message: r.string()?,
            },
        };
        r.end()?;
        Ok(reply)
    }
}

impl KeeperReport {
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            KeeperReport::Spawned { pid } => {
                let mut out = Writer(vec![SPAWNED]);
                out.u32(pid);
                out.0
            }
            KeeperReport::ExecFailed { errno } => {
                let mut out = Writer(vec![EXEC_FAILED]);
                out.i32(errno);
                out.0
            }
            KeeperReport::Exited { pid, status } => {
                let mut out = Writer(vec![EXITED]);
                out.u32(pid);
                match status {
                    ExitKind::Exited(code) => {
                        out.0.push(0);
                        out.i32(code);
                    }
                    ExitKind::Signaled(signal, core) => {
                        out.0.push(if core { 2 } else { 1 });
                        out.i32(signal);
                    }
                }
                out.0
            }
        }
    }

    pub fn decode(data: &[u8]) -> Result<KeeperReport, DecodeError> {
        let mut r = Reader::new(data);
        let report = match r.tag(&[SPAWNED, EXEC_FAILED, EXITED])? {
            SPAWNED => KeeperReport::Spawned { pid: r.u32()? },
            EXEC_FAILED => KeeperReport::ExecFailed { errno: r.i32()? },
            _ => {
                let pid = r.u32()?;
                let status = match (r.u8()?, r.i32()?) {
                    (0, code) => ExitKind::Exited(code),
                    (1, signal) => ExitKind::Signaled(signal, false),
                    (2, signal) => ExitKind::Signaled(signal, true),
                    (kind, _) => return Err(DecodeError(format!("bad exit kind {kind}"))),
                };
                KeeperReport::Exited { pid, status }
            }
        };
        r.end()?;
        Ok(report)
    }
}

impl KeeperCommand {
    pub fn encode(&self) -> Vec<u8> {
        vec![STOP]
    }

    pub fn decode(data: &[u8]) -> Result<KeeperCommand, DecodeError> {
        let mut r = Reader::new(data);
        r.tag(&[STOP])?;
        r.end()?;
        Ok(KeeperCommand::Stop)
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn i32(&mut self, value: i32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    /// A length or count; anything near `u32::MAX` is far past [`MAX_MESSAGE`] and would be
    /// refused by the receiver anyway.
    fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.count(bytes.len());
        self.0.extend_from_slice(bytes);
    }
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError(format!(
                "{n} bytes wanted, {} left",
                self.data.len()
            )));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn tag(&mut self, allowed: &[u8]) -> Result<u8, DecodeError> {
        let tag = self.u8()?;
        if allowed.contains(&tag) {
            Ok(tag)
        } else {
            Err(DecodeError(format!("unexpected tag {tag}")))
        }
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items that each take at least 4 bytes: one larger than what is left cannot
    /// be real, and is refused before anything is allocated for it.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        if n > self.data.len() / 4 {
            return Err(DecodeError(format!("count {n} past the message's end")));
        }
        Ok(n)
    }

    fn byte_string(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        self.take(n)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.byte_string()?.to_vec())
            .map_err(|_| DecodeError("a string is not UTF-8".into()))
    }

    fn os_string(&mut self) -> Result<OsString, DecodeError> {
        Ok(OsString::from_vec(self.byte_string()?.to_vec()))
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(DecodeError(format!("{} bytes left over", self.data.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> SpawnerRequest {
        SpawnerRequest::Start {
            service: "org.example.Svc".into(),
            exec: ExecSpec {
                argv: vec!["/bin/svc".into(), "--flag".into(), String::new()],
                env: vec![
                    ("PATH".into(), "/bin".into()),
                    (
                        OsString::from_vec(b"RAW".to_vec()),
                        OsString::from_vec(vec![0xff, 0xfe]),
                    ),
                ],
                working_directory: Some("/srv/é".into()),
                user: None,
            },
            grace: Duration::from_millis(1500),
        }
    }

    #[test]
    fn every_message_survives_a_round_trip() {
        for request in [
            start(),
            SpawnerRequest::Start {
                service: String::new(),
                exec: ExecSpec::default(),
                grace: Duration::ZERO,
            },
            SpawnerRequest::StartByName {
                service: "org.freedesktop.PolicyKit1".into(),
            },
        ] {
            assert_eq!(SpawnerRequest::decode(&request.encode()), Ok(request));
        }
        for reply in [
            SpawnerReply::Started { keeper: 4242 },
            SpawnerReply::Failed {
                message: "fork: Resource temporarily unavailable".into(),
            },
            SpawnerReply::Refused {
                error: "org.freedesktop.DBus.Error.Spawn.FileInvalid".into(),
                message: "no User=".into(),
            },
        ] {
            assert_eq!(SpawnerReply::decode(&reply.encode()), Ok(reply));
        }
        for report in [
            KeeperReport::Spawned { pid: 7 },
            KeeperReport::ExecFailed { errno: 2 },
            KeeperReport::Exited {
                pid: 8,
                status: ExitKind::Exited(-1),
            },
            KeeperReport::Exited {
                pid: 9,
                status: ExitKind::Signaled(9, false),
            },
            KeeperReport::Exited {
                pid: 10,
                status: ExitKind::Signaled(11, true),
            },
        ] {
            assert_eq!(KeeperReport::decode(&report.encode()), Ok(report));
        }
        let stop = KeeperCommand::Stop.encode();
        assert_eq!(KeeperCommand::decode(&stop), Ok(KeeperCommand::Stop));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = start().encode();
        // Every truncation, and one byte too many.
        for n in 0..good.len() {
            assert!(
                SpawnerRequest::decode(&good[..n]).is_err(),
                "truncated at {n}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(SpawnerRequest::decode(&long).is_err());
        // A count far past the end is refused without allocating for it.
        let mut huge = vec![START];
        huge.extend_from_slice(&0u32.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(SpawnerRequest::decode(&huge).is_err());
        // A message of another kind, an unknown tag, a bad option flag, a bad exit kind.
        assert!(SpawnerRequest::decode(&KeeperCommand::Stop.encode()).is_err());
        assert!(KeeperCommand::decode(&[0]).is_err());
        assert!(KeeperCommand::decode(&[STOP, 0]).is_err());
        let mut bad_flag = SpawnerRequest::Start {
            service: "a".into(),
            exec: ExecSpec::default(),
            grace: Duration::ZERO,
        }
        .encode();
        bad_flag[1 + 4 + 1 + 4 + 4] = 7;
        assert!(SpawnerRequest::decode(&bad_flag).is_err());
        let mut bad_kind = KeeperReport::Exited {
            pid: 1,
            status: ExitKind::Exited(0),
        }
        .encode();
        bad_kind[5] = 3;
        assert!(KeeperReport::decode(&bad_kind).is_err());
        // A service name that is not UTF-8.
        let mut not_utf8 = vec![START];
        not_utf8.extend_from_slice(&1u32.to_le_bytes());
        not_utf8.push(0xff);
        assert!(SpawnerRequest::decode(&not_utf8).is_err());
        // A name-only request with bytes left over, or cut short.
        let by_name = SpawnerRequest::StartByName {
            service: "org.example.Svc".into(),
        }
        .encode();
        let mut by_name_long = by_name.clone();
        by_name_long.push(0);
        assert!(SpawnerRequest::decode(&by_name_long).is_err());
        assert!(SpawnerRequest::decode(&by_name[..by_name.len() - 1]).is_err());
    }

    #[test]
    fn the_user_never_travels() {
        let mut request = start();
        let SpawnerRequest::Start { exec, .. } = &mut request else {
            unreachable!()
        };
        exec.user = Some(ServiceUser {
            name: "root".into(),
            uid: nix::unistd::Uid::from_raw(0),
            gid: nix::unistd::Gid::from_raw(0),
            groups: Vec::new(),
        });
        assert_eq!(SpawnerRequest::decode(&request.encode()), Ok(start()));
    }
}
