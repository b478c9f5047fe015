//! System bus services, run as the user their file names (`User=`).
//!
//! On a system bus the bus itself runs as an unprivileged `<user>`, so it cannot start a service
//! as another account. dbus-daemon hands that to its setuid `dbus-daemon-launch-helper`, which
//! is given only a bus name, reads that name's file itself and runs the service as the file's
//! `User=`. This module is the same job for broker's spawner in system mode, in two steps:
//!
//! - [`resolve`] (before any fork): the name's `<name>.service` file in the system service
//!   directories, its `User=` looked up with its groups, and the minimal environment. It refuses
//!   what the helper refuses, with the helper's error names, so a bus that may ask only for a
//!   name cannot make the privileged side run a program or a user no service file names.
//! - [`ServiceUser::switch_to`] (in the forked child, just before exec): groups, gid, uid, in
//!   that order, and a check that root cannot be regained.

use std::ffi::{CString, OsString};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{Gid, Uid, User};
use tracing::debug;
use zbus::fdo;
use zbus::names::WellKnownName;

use crate::activation::StarterBus;
use crate::activation::files::{self, ServiceFile};
use crate::bus::error::BusError;

/// The largest service file read, as the activation loader's limit (dbus-daemon's too).
const MAX_FILE_SIZE: u64 = 128 * 1024;

/// The account a system service runs as: the `User=` of its file, resolved while the
/// privileged side may still allocate, so that switching to it needs system calls only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUser {
    pub name: String,
    pub uid: Uid,
    /// The primary group, from the user's passwd entry.
    pub gid: Gid,
    /// Every group of the user, as `initgroups` would set them (the primary one included).
    pub groups: Vec<Gid>,
}

impl ServiceUser {
    /// Looks `name` up in the system's user database, with its supplementary groups.
    pub fn lookup(name: &str) -> Result<ServiceUser, String> {
        let user = User::from_name(name)
            .map_err(|e| format!("cannot look up user '{name}': {e}"))?
            .ok_or_else(|| format!("cannot find user '{name}'"))?;
        let cname = CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|e| format!("cannot read the groups of user '{name}': {e}"))?;
        Ok(ServiceUser {
            name: name.to_owned(),
            uid: user.uid,
            gid: user.gid,
            groups,
        })
    }

    /// Becomes this user for good: supplementary groups, then real/effective/saved gid, then
    /// real/effective/saved uid (the order in which each step still has the privilege it needs),
    /// as dbus-daemon-launch-helper's `initgroups`, `setgid`, `setuid`. For a user other than
    /// root it then checks that `setuid(0)` fails, so a service can never get root back.
    ///
    /// Meant for a single-threaded child between fork and exec: it makes system calls only and
    /// allocates nothing, so its error is a plain value.
    pub fn switch_to(&self) -> Result<(), SwitchError> {
        let failed = |step| move |errno| SwitchError::Failed { step, errno };
        nix::unistd::setgroups(&self.groups).map_err(failed(SwitchStep::Groups))?;
        nix::unistd::setresgid(self.gid, self.gid, self.gid).map_err(failed(SwitchStep::Gid))?;
        nix::unistd::setresuid(self.uid, self.uid, self.uid).map_err(failed(SwitchStep::Uid))?;
        if !self.uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(SwitchError::RootRegained);
        }
        Ok(())
    }
}

/// Which step of [`ServiceUser::switch_to`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchStep {
    Groups,
    Gid,
    Uid,
}

/// Why [`ServiceUser::switch_to`] failed. `Copy` and allocation-free, so a forked child can
/// hand it back (for instance as the step and the errno through a pipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchError {
    /// A system call failed.
    Failed { step: SwitchStep, errno: Errno },
    /// After the switch, `setuid(0)` succeeded: the process could still become root.
    RootRegained,
}

impl fmt::Display for SwitchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchError::Failed { step, errno } => {
                let call = match step {
                    SwitchStep::Groups => "setgroups",
                    SwitchStep::Gid => "setresgid",
                    SwitchStep::Uid => "setresuid",
                };
                write!(f, "cannot switch to the service's user: {call}: {errno}")
            }
            SwitchError::RootRegained => {
                f.write_str("after switching user, the process could still become root")
            }
        }
    }
}

impl std::error::Error for SwitchError {}

impl From<SwitchError> for io::Error {
    fn from(e: SwitchError) -> io::Error {
        match e {
            SwitchError::Failed { errno, .. } => io::Error::new(io::Error::from(errno).kind(), e),
            SwitchError::RootRegained => io::Error::new(io::ErrorKind::PermissionDenied, e),
        }
    }
}

/// A system service ready to start: everything taken from its file and the user database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemService {
    /// The bus name it provides (the file's `Name=`, equal to the name asked for).
    pub name: String,
    /// The file's `Exec=`, split, executed without a PATH search.
    pub argv: Vec<String>,
    pub user: ServiceUser,
    /// The complete environment: only where the bus is, nothing of the bus's own.
    pub env: Vec<(OsString, OsString)>,
    /// The file it was read from.
    pub source: PathBuf,
}

/// Finds and checks the service that provides `name`, as dbus-daemon-launch-helper does: the
/// first `<name>.service` in `dirs` (in order), whose `Name=` must be `name` and which must
/// have a `User=` that exists. The environment is the bus's starter variables alone
/// ([`StarterBus::variables`] of the system bus's `starter`): dbus-daemon's helper clears the
/// environment and sets `DBUS_STARTER_ADDRESS` (always the compiled-in
/// `unix:path=/run/dbus/system_bus_socket`) and `DBUS_STARTER_BUS_TYPE=system` only. Here the
/// address is the bus's own, and `DBUS_SYSTEM_BUS_ADDRESS` names it too, so that a service
/// that connects to "the system bus" (polkitd and upowerd do, through GDBus) reaches the bus
/// that started it even when that bus listens somewhere else.
///
/// Refusals carry the reference's error names: `Spawn.ServiceNotValid` (not a well-known
/// name), `Spawn.ServiceNotFound` (no such file), `Spawn.FileInvalid` (unreadable or broken
/// file, another `Name=`, no `User=`, a TOML file), `Spawn.FailedToSetup` (unknown user).
pub fn resolve(
    dirs: &[PathBuf],
    name: &str,
    starter: &StarterBus,
) -> Result<SystemService, BusError> {
    // The name becomes part of a path: only a valid well-known name (no '/', no empty
    // element, so no "..") may get that far.
    if WellKnownName::try_from(name).is_err() {
        return Err(fdo::Error::SpawnServiceNotValid(format!(
            "bus name '{name}' is not a valid bus name"
        ))
        .into());
    }
    let (path, text) = find_file(dirs, name)?.ok_or_else(|| not_found(dirs, name))?;
    let file = files::parse_text(&path, &text)
        .map_err(|w| file_invalid(format!("invalid service file {w}")))?;
    if file.name != name {
        return Err(file_invalid(format!(
            "{} provides {}, not {name}: a system service file must be named after the name it provides",
            path.display(),
            file.name
        )));
    }
    let user = user_of(&file)?;
    let env = starter
        .variables()
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    debug!(service = name, file = %path.display(), user = %user.name, "system service resolved");
    Ok(SystemService {
        name: file.name,
        argv: file.exec,
        user,
        env,
        source: path,
    })
}

/// The `User=` of `file`, looked up.
fn user_of(file: &ServiceFile) -> Result<ServiceUser, BusError> {
    let Some(user) = &file.user else {
        return Err(file_invalid(format!(
            "Cannot do system-bus activation with no user: {} has no User=",
            file.source.display()
        )));
    };
    ServiceUser::lookup(user).map_err(|e| {
        fdo::Error::SpawnFailedToSetup(format!("{e}, the User= of {}", file.source.display()))
            .into()
    })
}

/// The text of the first `<name>.service` in `dirs`; `None` if no directory has one.
fn find_file(dirs: &[PathBuf], name: &str) -> Result<Option<(PathBuf, String)>, BusError> {
    for dir in dirs {
        let path = dir.join(format!("{name}.service"));
        match read_capped(&path) {
            Ok(text) => return Ok(Some((path, text))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(file_invalid(format!("cannot read {}: {e}", path.display())));
            }
        }
    }
    Ok(None)
}

fn read_capped(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_SIZE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(io::Error::other(format!(
            "larger than {MAX_FILE_SIZE} bytes"
        )));
    }
    Ok(text)
}

/// The refusal for a name without a `<name>.service` file; when another activation file
/// provides the name, it says which and why that file cannot be used on a system bus.
fn not_found(dirs: &[PathBuf], name: &str) -> BusError {
    let loaded = files::load(dirs);
    let Some(other) = loaded.services.get(name) else {
        let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return fdo::Error::SpawnServiceNotFound(format!(
            "The name {name} was not provided by any .service files in {}",
            dirs.join(", ")
        ))
        .into();
    };
    if other.source.extension().is_some_and(|ext| ext == "toml") {
        return file_invalid(format!(
            "{name} is provided by {}, a TOML activation file, which has no User=: a system bus \
             starts only .service files with User=",
            other.source.display()
        ));
    }
    fdo::Error::SpawnServiceNotFound(format!(
        "{name} is provided by {}, but a system service file must be named {name}.service",
        other.source.display()
    ))
    .into()
}

fn file_invalid(message: String) -> BusError {
    fdo::Error::SpawnFileInvalid(message).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::libc;

    const ADDRESS: &str = "unix:path=/run/broker-test/bus,guid=00ff";

    fn starter() -> StarterBus {
        StarterBus {
            address: ADDRESS.into(),
            bus_type: Some("system".into()),
        }
    }

    /// A service directory holding `files` (name, contents).
    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write a service file");
        }
        dir
    }

    fn service(name: &str, exec: &str, user: Option<&str>) -> String {
        let user = user.map(|u| format!("User={u}\n")).unwrap_or_default();
        format!("[D-BUS Service]\nName={name}\nExec={exec}\n{user}")
    }

    fn refusal(dirs: &[&Path], name: &str) -> BusError {
        let dirs: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
        match resolve(&dirs, name, &starter()) {
            Ok(s) => panic!("{name} resolved to {s:?}"),
            Err(e) => e,
        }
    }

    /// nobody's uid and gid, read from /etc/passwd itself rather than through nix.
    fn nobody_from_passwd() -> (u32, u32) {
        let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
        let line = passwd
            .lines()
            .find(|l| l.starts_with("nobody:"))
            .expect("a nobody entry in /etc/passwd");
        let fields: Vec<&str> = line.split(':').collect();
        (fields[2].parse().unwrap(), fields[3].parse().unwrap())
    }

    fn nobody_groups() -> Vec<Gid> {
        let (_, gid) = nobody_from_passwd();
        nix::unistd::getgrouplist(c"nobody", Gid::from_raw(gid)).expect("getgrouplist")
    }

    #[test]
    fn a_good_file_gives_its_program_its_user_and_only_where_the_bus_is() {
        let dir = dir_with(&[(
            "org.example.Good.service",
            &service(
                "org.example.Good",
                "/usr/bin/good --flag 'two words'",
                Some("nobody"),
            ),
        )]);
        let resolved = resolve(&[dir.path().into()], "org.example.Good", &starter()).unwrap();
        let (uid, gid) = nobody_from_passwd();
        assert_eq!(resolved.name, "org.example.Good");
        assert_eq!(resolved.argv, ["/usr/bin/good", "--flag", "two words"]);
        assert_eq!(resolved.source, dir.path().join("org.example.Good.service"));
        assert_eq!(resolved.user.name, "nobody");
        assert_eq!(resolved.user.uid.as_raw(), uid);
        assert_eq!(resolved.user.gid.as_raw(), gid);
        assert_eq!(resolved.user.groups, nobody_groups());
        assert!(resolved.user.groups.contains(&Gid::from_raw(gid)));
        let env: Vec<(OsString, OsString)> = [
            ("DBUS_STARTER_ADDRESS", ADDRESS),
            ("DBUS_STARTER_BUS_TYPE", "system"),
            ("DBUS_SYSTEM_BUS_ADDRESS", ADDRESS),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        assert_eq!(resolved.env, env);
    }

    #[test]
    fn the_first_directory_with_the_file_wins() {
        let first = dir_with(&[(
            "org.example.Two.service",
            &service("org.example.Two", "/bin/a", Some("nobody")),
        )]);
        let second = dir_with(&[(
            "org.example.Two.service",
            &service("org.example.Two", "/bin/b", Some("root")),
        )]);
        let missing = first.path().join("no-such-dir");
        let dirs = [missing, first.path().into(), second.path().into()];
        let resolved = resolve(&dirs, "org.example.Two", &starter()).unwrap();
        assert_eq!(resolved.argv, ["/bin/a"]);
        assert_eq!(resolved.user.name, "nobody");
    }

    #[test]
    fn a_name_no_file_provides_is_not_found() {
        let dir = dir_with(&[(
            "org.example.Other.service",
            &service("org.example.Other", "/bin/x", Some("nobody")),
        )]);
        let e = refusal(&[dir.path()], "org.example.Missing");
        assert_eq!(e.name(), "org.freedesktop.DBus.Error.Spawn.ServiceNotFound");
        assert!(e.text().contains("org.example.Missing"), "{e}");
        assert!(e.text().contains(&dir.path().display().to_string()), "{e}");
    }

    #[test]
    fn a_file_not_named_after_its_name_is_not_found_and_named() {
        let dir = dir_with(&[(
            "wrong.service",
            &service("org.example.Odd", "/bin/x", Some("nobody")),
        )]);
        let e = refusal(&[dir.path()], "org.example.Odd");
        assert_eq!(e.name(), "org.freedesktop.DBus.Error.Spawn.ServiceNotFound");
        assert!(e.text().contains("wrong.service"), "{e}");
        assert!(
            e.text().contains("must be named org.example.Odd.service"),
            "{e}"
        );
    }

    #[test]
    fn a_file_whose_name_differs_is_invalid() {
        let dir = dir_with(&[(
            "org.example.A.service",
            &service("org.example.B", "/bin/x", Some("nobody")),
        )]);
        let e = refusal(&[dir.path()], "org.example.A");
        assert_eq!(e.name(), "org.freedesktop.DBus.Error.Spawn.FileInvalid");
        assert!(
            e.text()
                .contains("org.example.A.service provides org.example.B"),
            "{e}"
        );
    }

    #[test]
    fn a_file_without_user_is_invalid_and_named() {
        let dir = dir_with(&[(
            "org.example.NoUser.service",
            &service("org.example.NoUser", "/bin/x", None),
        )]);
        let e = refusal(&[dir.path()], "org.example.NoUser");
        assert_eq!(e.name(), "org.freedesktop.DBus.Error.Spawn.FileInvalid");
        let file = dir.path().join("org.example.NoUser.service");
        assert!(
            e.text()
                .contains(&format!("{} has no User=", file.display())),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_user_cannot_be_set_up() {
        let user = "broker-test-no-such-user";
        assert_eq!(User::from_name(user).unwrap(), None, "{user} exists here");
        let dir = dir_with(&[(
            "org.example.Ghost.service",
            &service("org.example.Ghost", "/bin/x", Some(user)),
        )]);
        let e = refusal(&[dir.path()], "org.example.Ghost");
        assert_eq!(e.name(), "org.freedesktop.DBus.Error.Spawn.FailedToSetup");
        assert!(
            e.text().contains(&format!("cannot find user '{user}'")),
            "{e}"
        );
        assert!(e.text().contains("org.example.Ghost.service"), "{e}");
    }

    #[test]
    fn a_toml_file_is_refused_for_having_no_user() {
        let toml = "name = \"org.example.Toml\"\nexec = [\"/bin/x\"]\n";
        let dir = dir_with(&[("toml.toml", toml)]);
        let e = refusal(&[dir.path()], "org.example.Toml");
        assert_eq!(e.name(), "org.freedesktop.DBus.Error.Spawn.FileInvalid");
        assert!(
            e.text()
                .contains("toml.toml, a TOML activation file, which has no User="),
            "{e}"
        );
    }

    #[test]
    fn a_broken_file_is_invalid_with_the_loader_message() {
        let dir = dir_with(&[(
            "org.example.Broken.service",
            "[D-BUS Service]\nName=org.example.Broken\n",
        )]);
        let e = refusal(&[dir.path()], "org.example.Broken");
        assert_eq!(e.name(), "org.freedesktop.DBus.Error.Spawn.FileInvalid");
        assert!(e.text().contains("org.example.Broken.service"), "{e}");
    }

    #[test]
    fn a_name_that_is_not_a_well_known_name_never_reaches_the_disk() {
        let dir = dir_with(&[]);
        // `../x` would otherwise name a file outside the directory.
        for name in ["../etc/x", ":1.5", "a/b.c", "noDots", ""] {
            let e = refusal(&[dir.path()], name);
            assert_eq!(
                e.name(),
                "org.freedesktop.DBus.Error.Spawn.ServiceNotValid",
                "{name}"
            );
        }
    }

    /// `Uid:`, `Gid:`, `Groups:`, `CapEff:` lines of /proc/self/status of a child that switched
    /// to nobody, read in the child and sent back through a pipe.
    #[test]
    fn a_child_that_switches_to_nobody_has_its_ids_and_groups_and_no_way_back() {
        assert!(
            Uid::effective().is_root(),
            "this test must run as root: it checks a real switch of user"
        );
        let user = ServiceUser::lookup("nobody").unwrap();
        let (read, write) = nix::unistd::pipe().unwrap();
        // SAFETY: the child makes only async-signal-safe calls (the system calls of
        // `switch_to`, open, read, write, _exit), with everything allocated before the fork.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => report_status(&user, &write),
            nix::unistd::ForkResult::Parent { child } => {
                drop(write);
                let mut text = String::new();
                std::fs::File::from(read).read_to_string(&mut text).unwrap();
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "{text}"
                );
                let (uid, gid) = nobody_from_passwd();
                let field = |key: &str| -> Vec<u64> {
                    let line = text
                        .lines()
                        .find_map(|l| l.strip_prefix(key))
                        .unwrap_or_else(|| panic!("no {key} in {text}"));
                    line.split_whitespace()
                        .map(|n| {
                            u64::from_str_radix(n, if key.starts_with("Cap") { 16 } else { 10 })
                                .unwrap()
                        })
                        .collect()
                };
                assert_eq!(
                    field("Uid:"),
                    [uid as u64; 4],
                    "real, effective, saved, fs uid"
                );
                assert_eq!(
                    field("Gid:"),
                    [gid as u64; 4],
                    "real, effective, saved, fs gid"
                );
                let mut groups: Vec<u64> =
                    nobody_groups().iter().map(|g| g.as_raw() as u64).collect();
                groups.sort();
                let mut got = field("Groups:");
                got.sort();
                assert_eq!(got, groups);
                assert_eq!(field("CapEff:"), [0], "no capability left");
                assert_eq!(field("CapPrm:"), [0], "no capability left");
            }
        }
    }

    /// The child's side: switch, copy /proc/self/status into the pipe, exit 0 (1 on failure).
    fn report_status(user: &ServiceUser, out: &OwnedFd) -> ! {
        let code = match user.switch_to() {
            Ok(()) => copy_status(out.as_raw_fd()),
            Err(_) => 1,
        };
        // SAFETY: _exit ends the forked child without running the parent's destructors.
        unsafe { libc::_exit(code) }
    }

    fn copy_status(out: i32) -> i32 {
        let mut buf = [0u8; 8192];
        // SAFETY: plain system calls on a NUL-terminated path and a buffer of our own.
        unsafe {
            let fd = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY);
            if fd < 0 {
                return 2;
            }
            loop {
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    return if n == 0 { 0 } else { 3 };
                }
                if libc::write(out, buf.as_ptr().cast(), n as usize) != n {
                    return 4;
                }
            }
        }
    }
}
