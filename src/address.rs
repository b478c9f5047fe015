//! D-Bus server addresses: parsing the `unix:` transports that a bus listens on, binding them, and
//! printing the address that clients connect to.

use std::ffi::OsStr;
use std::fmt;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixListener as StdListener, UnixStream as StdStream};
use std::path::{Path, PathBuf};

/// Where a bus listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// A socket file at this path.
    Path(PathBuf),
    /// A name in Linux's abstract socket namespace.
    Abstract(Vec<u8>),
    /// A fresh, randomly named socket file in this directory (`tmpdir=` and `dir=`).
    Dir(PathBuf),
    /// `systemd:`: the listening sockets systemd passes (socket activation).
    Systemd,
}

/// An address that could not be parsed or bound.
#[derive(Debug)]
pub struct AddressError(pub String);

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AddressError {}

fn error(msg: impl Into<String>) -> AddressError {
    AddressError(msg.into())
}

impl ListenAddress {
    /// The default session address: `$XDG_RUNTIME_DIR/bus`, where clients look first, when that
    /// directory exists and no bus answers there yet. Otherwise a fresh socket in `/tmp`, as the
    /// stock session configuration says: beside a desktop's own bus (`dbus-run-session` on a
    /// desktop, say) dbus-daemon listens there too, and the desktop's bus is left alone.
    pub fn session_default() -> ListenAddress {
        match runtime_dir().map(|dir| dir.join("bus")) {
            Some(path) if StdStream::connect(&path).is_err() => ListenAddress::Path(path),
            _ => ListenAddress::Dir(PathBuf::from("/tmp")),
        }
    }

    /// Parses one address, such as `unix:path=/run/user/1000/bus`. Of a list separated by `;`,
    /// the first is taken.
    pub fn parse(address: &str) -> Result<ListenAddress, AddressError> {
        let first = address.split(';').find(|a| !a.is_empty()).unwrap_or("");
        if first == "systemd:" {
            return Ok(ListenAddress::Systemd);
        }
        let rest = first.strip_prefix("unix:").ok_or_else(|| {
            error(format!(
                "unsupported address {first:?}: only unix: transports and systemd: are supported"
            ))
        })?;
        let mut found = None;
        for pair in rest.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                error(format!(
                    "malformed key=value pair {pair:?} in address {first:?}"
                ))
            })?;
            let value = unescape(value)?;
            let parsed = match key {
                "path" => ListenAddress::Path(PathBuf::from(OsStr::from_bytes(&value))),
                "abstract" => ListenAddress::Abstract(value),
                "tmpdir" | "dir" => ListenAddress::Dir(PathBuf::from(OsStr::from_bytes(&value))),
                "runtime" if value == b"yes" => ListenAddress::Path(
                    runtime_dir()
                        .ok_or_else(|| {
                            error("unix:runtime=yes needs XDG_RUNTIME_DIR to name a directory")
                        })?
                        .join("bus"),
                ),
                "runtime" => return Err(error("unix:runtime only takes the value yes")),
                "guid" => continue,
                other => return Err(error(format!("unknown key {other:?} in address {first:?}"))),
            };
            if found.replace(parsed).is_some() {
                return Err(error(format!(
                    "address {first:?} names more than one of path, abstract, tmpdir, dir, runtime"
                )));
            }
        }
        found.ok_or_else(|| {
            error(format!(
                "address {first:?} names no path, abstract, tmpdir, dir or runtime"
            ))
        })
    }

    /// Binds the address. A socket file where a bus already answers is refused; a stale one is
    /// replaced. Returns the listener and the address of what was bound (a `Dir` becomes a `Path`).
    /// `systemd:` binds nothing: see [`systemd_sockets`].
    pub fn bind(&self) -> Result<(StdListener, ListenAddress), AddressError> {
        match self {
            ListenAddress::Systemd => Err(error("systemd: takes sockets, it binds none")),
            ListenAddress::Path(path) => bind_path(path).map(|l| (l, self.clone())),
            ListenAddress::Abstract(name) => {
                let addr = SocketAddr::from_abstract_name(name)
                    .map_err(|e| error(format!("bad abstract socket name: {e}")))?;
                let listener = StdListener::bind_addr(&addr).map_err(|e| {
                    error(format!(
                        "cannot listen on abstract socket {}: {e}",
                        String::from_utf8_lossy(name)
                    ))
                })?;
                Ok((listener, self.clone()))
            }
            ListenAddress::Dir(dir) => {
                let path = dir.join(format!("dbus-{}", random_hex(8)));
                bind_path(&path).map(|l| (l, ListenAddress::Path(path)))
            }
        }
    }

    /// The socket file to remove on exit, if any.
    pub fn socket_file(&self) -> Option<&Path> {
        match self {
            ListenAddress::Path(path) => Some(path),
            _ => None,
        }
    }

    /// The address clients use, with the server's GUID.
    pub fn client_address(&self, guid: &str) -> String {
        match self {
            ListenAddress::Path(p) | ListenAddress::Dir(p) => {
                format!("unix:path={},guid={guid}", escape(p.as_os_str().as_bytes()))
            }
            ListenAddress::Abstract(name) => format!("unix:abstract={},guid={guid}", escape(name)),
            ListenAddress::Systemd => format!("systemd:guid={guid}"),
        }
    }
}

/// `systemd:`: the listening sockets systemd passed to this process (`LISTEN_FDS` of them from
/// fd 3, when `LISTEN_PID` is this process), each with the address it is bound to. The bus
/// does not remove their socket files: systemd owns them.
pub fn systemd_sockets() -> Result<Vec<(StdListener, ListenAddress)>, AddressError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (Some(pid), Some(count)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else {
        return Err(error(
            "systemd: needs the sockets of systemd's socket activation (LISTEN_PID and \
             LISTEN_FDS are not set)",
        ));
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Err(error(format!(
            "systemd: the passed sockets are for process {pid}, not this one"
        )));
    }
    let count: i32 = count
        .parse()
        .ok()
        .filter(|n| (1..=1024).contains(n))
        .ok_or_else(|| {
            error(format!(
                "systemd: LISTEN_FDS={count} is not a count of sockets"
            ))
        })?;
    (3..3 + count).map(passed_socket).collect()
}

/// One socket systemd passed: it must be a listening stream socket of the unix family.
fn passed_socket(fd: i32) -> Result<(StdListener, ListenAddress), AddressError> {
    use nix::fcntl::{F_SETFD, FdFlag, fcntl};
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: systemd hands this process fds 3 to 3 + LISTEN_FDS; nothing else here owns them.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let not_ours = |why: String| error(format!("systemd: fd {fd} {why}"));
    fcntl(&owned, F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| not_ours(format!("cannot be kept from services: {e}")))?;
    let stream = getsockopt(&owned, sockopt::SockType).map(|t| t == SockType::Stream);
    let listening = getsockopt(&owned, sockopt::AcceptConn);
    if !matches!((stream, listening), (Ok(true), Ok(true))) {
        return Err(not_ours("is not a listening stream socket".into()));
    }
    let listener = StdListener::from(owned);
    let local = listener
        .local_addr()
        .map_err(|e| not_ours(format!("is not a unix socket: {e}")))?;
    let address = match (local.as_pathname(), local.as_abstract_name()) {
        (Some(path), _) => ListenAddress::Path(path.to_owned()),
        (None, Some(name)) => ListenAddress::Abstract(name.to_owned()),
        (None, None) => return Err(not_ours("is an unnamed socket".into())),
    };
    Ok((listener, address))
}

fn runtime_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR")?);
    dir.is_dir().then_some(dir)
}

fn bind_path(path: &Path) -> Result<StdListener, AddressError> {
    if path.exists() {
        if StdStream::connect(path).is_ok() {
            return Err(error(format!(
                "a bus already listens at {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| {
            error(format!(
                "cannot remove stale socket {}: {e}",
                path.display()
            ))
        })?;
    }
    let listener = StdListener::bind(path)
        .map_err(|e| error(format!("cannot listen on {}: {e}", path.display())))?;
    // Anyone may reach the socket, as with dbus-daemon: authentication and the policy decide
    // who may use the bus.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| error(format!("cannot make {} reachable: {e}", path.display())))?;
    Ok(listener)
}

/// Random lowercase hex of `bytes` bytes, from the kernel's random pool.
pub fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)) {
        // Without /dev/urandom, time and pid still make the name unlikely to collide.
        tracing::warn!("cannot read /dev/urandom ({e}); using a weaker random source");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Escapes an address value: bytes outside `[-0-9A-Za-z_/.\*]` become `%xx`.
fn escape(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-_/.\\*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn unescape(value: &str) -> Result<Vec<u8>, AddressError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| error(format!("bad %-escape in address value {value:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_transport() {
        assert_eq!(
            ListenAddress::parse("unix:path=/tmp/a%20b").unwrap(),
            ListenAddress::Path("/tmp/a b".into())
        );
        assert_eq!(
            ListenAddress::parse("unix:abstract=foo").unwrap(),
            ListenAddress::Abstract(b"foo".to_vec())
        );
        assert_eq!(
            ListenAddress::parse("unix:tmpdir=/tmp").unwrap(),
            ListenAddress::Dir("/tmp".into())
        );
        assert_eq!(
            ListenAddress::parse("unix:dir=/var").unwrap(),
            ListenAddress::Dir("/var".into())
        );
        assert_eq!(
            ListenAddress::parse("unix:path=/x,guid=0123;unix:abstract=y").unwrap(),
            ListenAddress::Path("/x".into())
        );
        assert_eq!(
            ListenAddress::parse("systemd:").unwrap(),
            ListenAddress::Systemd
        );
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "tcp:host=localhost",
            "unix:",
            "unix:path=/a,abstract=b",
            "unix:path=%zz",
            "unix:foo=1",
            "unix:runtime=no",
            "systemd:x=1",
        ] {
            assert!(ListenAddress::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn client_address_escapes() {
        let a = ListenAddress::Path("/tmp/a b".into());
        assert_eq!(a.client_address("00ff"), "unix:path=/tmp/a%20b,guid=00ff");
    }

    #[test]
    fn refuses_a_live_bus_and_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus");
        let addr = ListenAddress::Path(path.clone());
        let (live, _) = addr.bind().unwrap();
        assert!(addr.bind().unwrap_err().0.contains("already listens"));
        drop(live);
        assert!(addr.bind().is_ok(), "stale socket file was not replaced");
    }
}
