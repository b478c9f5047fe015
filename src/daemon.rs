//! Running as a daemon the way dbus-daemon does: leaving the foreground (`--fork`, `<fork/>`),
//! the pid file (`<pidfile>`, unless `--nopidfile`), the user the bus runs as (`<user>`), and the
//! descriptors that `--print-address` and `--print-pid` write to.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, umask};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Uid, User, fork, pipe2, setsid};
use tracing::{debug, info, warn};

use crate::cli::Options;

/// The descriptors of `--print-address=FD` and `--print-pid=FD`, checked and owned from
/// start-up. A number from the command line is only a number: had the bus merely remembered
/// it, a descriptor that was closed at start could be reused by the runtime, a listening socket
/// or the configuration file, and the address written there and that descriptor closed. So each
/// descriptor above 2 is checked open and taken before anything else opens one, written through,
/// and closed by dropping it (no service the bus starts inherits it). Standard input, output and
/// error are written to as the process's own streams and stay open.
pub struct PrintFds {
    /// The descriptors above 2, each once (`--print-address=3 --print-pid=3` is allowed, as
    /// dbus-daemon allows it: both lines go to it, and it is closed once).
    owned: Vec<(RawFd, OwnedFd)>,
    address: Option<RawFd>,
    pid: Option<RawFd>,
}

impl PrintFds {
    /// Takes the descriptors that `opts` names; call it first thing in `main`, before anything
    /// opens a descriptor. One that is not open is refused (`--print-address=7: fd 7 is not
    /// open`).
    pub fn claim(opts: &Options) -> Result<PrintFds, String> {
        let mut owned: Vec<(RawFd, OwnedFd)> = Vec::new();
        let named = [
            ("--print-address", opts.print_address),
            ("--print-pid", opts.print_pid),
        ];
        for (flag, fd) in named {
            let Some(fd) = fd.filter(|fd| *fd > 2) else {
                continue;
            };
            if !owned.iter().any(|(taken, _)| *taken == fd) {
                owned.push((fd, take_fd(flag, fd)?));
            }
        }
        Ok(PrintFds {
            owned,
            address: opts.print_address,
            pid: opts.print_pid,
        })
    }

    /// Writes the address, then the pid, each with a newline in one write, to the descriptors
    /// asked for; then closes those above 2.
    pub fn print(self, address: &str) -> Result<(), String> {
        let pid = std::process::id().to_string();
        for (fd, line) in [(self.address, address), (self.pid, pid.as_str())] {
            if let Some(fd) = fd {
                self.write_line(fd, line)?;
            }
        }
        Ok(())
    }

    /// Writes `line` and a newline to `fd` in one write.
    fn write_line(&self, fd: RawFd, line: &str) -> Result<(), String> {
        let stdin = std::io::stdin();
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let target = match fd {
            0 => stdin.as_fd(),
            1 => stdout.as_fd(),
            2 => stderr.as_fd(),
            _ => self
                .owned
                .iter()
                .find(|(taken, _)| *taken == fd)
                .map(|(_, owned)| owned.as_fd())
                .ok_or_else(|| format!("fd {fd} was not taken at start-up"))?,
        };
        write_line_to(target, fd, line)
    }
}

/// Checks that `fd` is open and takes it.
fn take_fd(flag: &str, fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only reads the descriptor's flags; any number is a valid argument, and
    // one that is not open fails with EBADF.
    if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } == -1 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(nix::libc::EBADF) => format!("{flag}={fd}: fd {fd} is not open"),
            _ => format!("{flag}={fd}: cannot check fd {fd}: {e}"),
        });
    }
    // SAFETY: the number was just checked open, and nothing else in the process owns it: it
    // was inherited, the process has opened nothing yet, and it is taken once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes `line` and a newline to `target` (descriptor number `fd`) in one write.
fn write_line_to(target: BorrowedFd<'_>, fd: RawFd, line: &str) -> Result<(), String> {
    let text = format!("{line}\n");
    let written = nix::unistd::write(target, text.as_bytes())
        .map_err(|e| format!("cannot write to fd {fd}: {e}"))?;
    if written != text.len() {
        return Err(format!("short write to fd {fd}"));
    }
    Ok(())
}

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
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::PermissionDenied && has_dropped_privileges() => {
                debug!(
                    "leaving the pid file {}: the bus's <user> may not remove it ({e}); the \
                     next start replaces it as stale",
                    self.0.display()
                );
            }
            Err(e) => warn!("cannot remove the pid file {}: {e}", self.0.display()),
        }
    }
}

/// Set once [`become_user`] has changed users.
static DROPPED_PRIVILEGES: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the bus has dropped from root to its `<user>`: files root made for it in root's
/// directories (`/run/dbus/pid`, `/run/dbus/system_bus_socket`) are then out of its reach at
/// exit, as for dbus-daemon, and are left for the next start to replace.
pub fn has_dropped_privileges() -> bool {
    DROPPED_PRIVILEGES.load(std::sync::atomic::Ordering::Relaxed)
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
    DROPPED_PRIVILEGES.store(true, std::sync::atomic::Ordering::Relaxed);
    info!(
        user = name,
        uid = user.uid.as_raw(),
        "running as the configured user"
    );
    Ok(())
}
