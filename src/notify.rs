//! Readiness notification for a service manager (systemd's `Type=notify`): when `NOTIFY_SOCKET`
//! names a socket, the bus sends it `READY=1` once it serves and `STOPPING=1` when it begins to
//! stop, so that units ordered after the bus start only when it answers.
//!
//! The protocol is one datagram of newline-separated `KEY=value` lines to the `AF_UNIX` socket
//! that `NOTIFY_SOCKET` names: a path, or an abstract name written with a leading `@`. It takes
//! a dozen lines of std, so no libsystemd (or crate) is linked for it. A failure to notify is
//! logged and the bus runs on: a bus that serves is more use than one that refuses to start
//! because its supervisor cannot be told.
//!
//! Notifications come from the process that serves: after `--fork`, the daemon, not the parent
//! the manager started. So that the manager can follow, the daemon's `READY=1` carries
//! `MAINPID=` (systemd accepts it from a process other than the main one only with
//! `NotifyAccess=all`), and is sent before the parent exits. Without a fork it is left out, as
//! dbus-daemon leaves it out: the manager knows the pid, and a broker that merely inherited
//! `NOTIFY_SOCKET` from some other service must not claim to be that service's main process.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::{debug, warn};

/// The environment variable a service manager sets to the socket it listens on.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// How long a send may block on a manager that does not read its socket: the bus must not hang
/// at start or stop because of it.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Tells the manager that the bus serves at `address` (once it listens and has printed it);
/// `forked`: the bus left the process the manager started (`--fork`), so it names its own pid.
pub fn ready(address: &str, forked: bool) {
    let main_pid = if forked {
        format!("MAINPID={}\n", std::process::id())
    } else {
        String::new()
    };
    notify(&format!("READY=1\n{main_pid}STATUS=Serving on {address}"));
}

/// Tells the manager that the bus has begun to stop (SIGTERM or SIGINT).
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=Stopping");
}

/// Sends `state` to the socket of `NOTIFY_SOCKET`, if it is set; a failure is a warning.
fn notify(state: &str) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET).filter(|t| !t.is_empty()) else {
        return;
    };
    let first_line = state.lines().next().unwrap_or_default();
    match send(&target, state) {
        Ok(()) => debug!(socket = %target.display(), "told the service manager {first_line}"),
        Err(e) => warn!(
            "cannot tell the service manager {first_line} at {}: {e}",
            target.display()
        ),
    }
}

/// Sends `state` in one datagram to the socket `target` names (`/path` or `@abstract`).
pub fn send(target: &OsStr, state: &str) -> io::Result<()> {
    let addr = socket_addr(target)?;
    let socket = UnixDatagram::unbound()?;
    socket.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = socket.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::other(format!(
            "short send: {sent} of {} bytes",
            state.len()
        )));
    }
    Ok(())
}

/// The address `NOTIFY_SOCKET` names: an absolute path, or an abstract name after `@`.
/// systemd's other forms (`vsock:`) are not `AF_UNIX` and are refused.
fn socket_addr(target: &OsStr) -> io::Result<SocketAddr> {
    let bytes = target.as_bytes();
    match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        Some(b'/') => SocketAddr::from_pathname(target),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@name)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_and_an_abstract_name_are_understood_and_a_relative_path_is_not() {
        use std::os::linux::net::SocketAddrExt;
        let path = socket_addr(OsStr::new("/run/user/1000/systemd/notify")).unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/user/1000/systemd/notify"))
        );
        let abstract_name = socket_addr(OsStr::new("@/org/freedesktop/systemd1/notify")).unwrap();
        assert_eq!(
            abstract_name.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify"[..])
        );
        assert!(socket_addr(OsStr::new("notify")).is_err());
        assert!(socket_addr(OsStr::new("vsock:2:1234")).is_err());
    }

    #[test]
    fn the_state_arrives_as_one_datagram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let err = send(OsStr::new("/nonexistent/notify"), "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
