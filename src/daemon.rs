//! Running as a daemon the way dbus-daemon does: leaving the foreground (`--fork`, `<fork/>`),
//! the pid file (`<pidfile>`, unless `--nopidfile`), and the user the bus runs as (`<user>`).

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, umask};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Uid, User, fork, pipe2, setsid};
use tracing::{debug, info, warn};

/// The daemon's promise to the process that started it: written once the bus listens and has
/// printed its address, so that `broker --fork` returns only when the bus can be used.
pub struct Readiness(OwnedFd);

impl Readiness {
    /// Tells the waiting parent that the bus is up; it exits 0.
    pub fn signal(self) {
        if let Err(e) = nix::unistd::write(self.0.as_fd(), b"1") {
            warn!("cannot tell the starting process that the bus is up: {e}");
        }
    }
}

/// Forks; the parent waits until the child is ready, then exits 0 (or with the child's status
/// when it fails first), so errors of the start still reach the caller. The child leaves the
/// session of its caller and, unless `keep_umask`, takes the umask 022.
///
/// Must run before any thread or runtime exists.
pub fn fork_to_background(keep_umask: bool) -> Result<Readiness, String> {
    let (read_end, write_end) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("cannot create a pipe to fork: {e}"))?;
    // SAFETY: called from `main`'s thread before the runtime or any other thread starts, so the
    // child inherits no lock held by another thread.
    match unsafe { fork() }.map_err(|e| format!("cannot fork: {e}"))? {
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut ready = [0u8; 1];
            let got = nix::unistd::read(read_end.as_fd(), &mut ready).unwrap_or(0);
            if got == 1 {
                std::process::exit(0);
            }
            // The child ended before it was ready; it said why on standard error.
            let code = match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) if code != 0 => code,
                _ => 1,
            };
            std::process::exit(code);
        }
        ForkResult::Child => {
            drop(read_end);
            setsid().map_err(|e| format!("cannot start a new session: {e}"))?;
            if !keep_umask {
                umask(Mode::from_bits_truncate(0o022));
            }
            Ok(Readiness(write_end))
        }
    }
}

/// After a fork, once the address is printed: standard input and output go to /dev/null, and
/// standard error too unless `DBUS_DEBUG_OUTPUT` is set (as with dbus-daemon).
pub fn detach_stdio() {
    let keep_stderr = std::env::var_os("DBUS_DEBUG_OUTPUT").is_some_and(|v| !v.is_empty());
    let null = match OpenOptions::new().read(true).write(true).open("/dev/null") {
        Ok(null) => OwnedFd::from(null),
        Err(e) => {
            warn!("cannot open /dev/null: {e}");
            return;
        }
    };
    let mut result = nix::unistd::dup2_stdin(&null).and(nix::unistd::dup2_stdout(&null));
    if !keep_stderr {
        result = result.and(nix::unistd::dup2_stderr(&null));
    }
    if let Err(e) = result {
        warn!("cannot point the standard streams at /dev/null: {e}");
    }
}

/// The pid file: written when the bus starts, removed when it stops.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes this process's pid to `path`. A file naming a process that still runs is
    /// refused, as dbus-daemon refuses it: another bus may be running. One left behind by a
    /// bus that has gone (it may not have been allowed to remove it) is replaced.
    pub fn create(path: &Path) -> Result<PidFile, String> {
        if let Some(pid) = running_pid_in(path) {
            return Err(format!(
                "the pid file {} names process {pid}, which is running; if the message bus is \
                 not running, remove the file",
                path.display()
            ));
        }
        match std::fs::remove_file(path) {
            Ok(()) => info!(path = %path.display(), "replacing a stale pid file"),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "cannot remove the stale pid file {}: {e}",
                    path.display()
                ));
            }
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map_err(|e| format!("cannot create the pid file {}: {e}", path.display()))?;
        writeln!(file, "{}", std::process::id())
            .map_err(|e| format!("cannot write the pid file {}: {e}", path.display()))?;
        debug!(path = %path.display(), "pid file written");
        Ok(PidFile(path.to_owned()))
    }
}

/// The pid in the file at `path`, if the file names a process that runs. A file that cannot be
/// read as a pid counts as naming one: it is not the bus's to remove.
fn running_pid_in(path: &Path) -> Option<String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        Err(_) => return Some("(unreadable)".into()),
    };
    let text = text.trim().to_owned();
    let pid = match text.parse::<i32>() {
        Ok(pid) if pid > 0 => pid,
        _ => return Some(format!("{text:?} (not a pid)")),
    };
    // Signal 0 checks that the process exists; EPERM means it exists under another user.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Err(nix::errno::Errno::ESRCH) => None,
        _ => Some(text),
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            warn!("cannot remove the pid file {}: {e}", self.0.display());
        }
    }
}

/// `<user>`: a bus started as root continues as `name` (its groups, then its uid), once it
/// listens. A bus that is not root can only be that user already; otherwise it says so and
/// runs on as itself.
pub fn become_user(name: &str) -> Result<(), String> {
    let user = User::from_name(name)
        .map_err(|e| format!("cannot look up the user {name}: {e}"))?
        .ok_or_else(|| format!("the configuration names the user {name}, who does not exist"))?;
    let me = Uid::current();
    if me == user.uid {
        return Ok(());
    }
    if !me.is_root() {
        warn!(
            user = name,
            "not running as root: cannot change to the configured user"
        );
        return Ok(());
    }
    let cname = std::ffi::CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
    nix::unistd::initgroups(&cname, user.gid)
        .map_err(|e| format!("cannot set the groups of {name}: {e}"))?;
    nix::unistd::setgid(user.gid)
        .map_err(|e| format!("cannot change to the group of {name}: {e}"))?;
    nix::unistd::setuid(user.uid).map_err(|e| format!("cannot change to the user {name}: {e}"))?;
    info!(
        user = name,
        uid = user.uid.as_raw(),
        "running as the configured user"
    );
    Ok(())
}
