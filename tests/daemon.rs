//! Running as dbus-daemon runs: `--fork`, the pid file, `<user>`, and the system log; and as
//! one's real session bus: readiness notification (`NOTIFY_SOCKET`), the systemd user units of
//! `systemd/`, and the recipes without systemd (`dbus-run-session`, a login script).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Broker, RawClient, open_config, tool, wait_within};

/// The value of `field` (`Uid`, `PPid`, …) in /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

fn stop(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
}

/// Waits until `path` exists or is gone (`exists`), for up to five seconds.
fn wait_for_path(path: &Path, exists: bool) -> bool {
    for _ in 0..100 {
        if path.exists() == exists {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn fork_returns_once_the_bus_listens_and_the_daemon_runs_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bus");
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("--session")
        .arg("--fork")
        .arg(format!("--address=unix:path={}", socket.display()))
        .args(["--print-address", "--print-pid"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run broker --fork");
    assert!(
        out.status.success(),
        "broker --fork exited {:?}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let address = lines.next().expect("the address");
    assert!(address.starts_with(&format!("unix:path={}", socket.display())));
    let pid: u32 = lines.next().expect("the pid").parse().expect("a pid");

    // The daemon, not the process that started it: in a session of its own, in /.
    assert_ne!(
        proc_status(pid, "PPid"),
        std::process::id().to_string(),
        "the daemon is not the process the test started"
    );
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32))).unwrap();
    assert_eq!(sid.as_raw() as u32, pid);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/")
    );
    let mut client = RawClient::connect(&socket);
    client
        .driver_call("GetId", &())
        .expect("the daemon answers");
    stop(pid);
    assert!(wait_for_path(&socket, false), "the daemon did not stop");
}

#[test]
fn fork_reports_a_failed_start_with_the_daemons_status() {
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "--session",
            "--fork",
            "--address=unix:path=/nonexistent/dir/bus",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run broker --fork");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot listen on /nonexistent/dir/bus"),
        "stderr: {stderr}"
    );
}

#[test]
fn the_pid_file_holds_the_pid_while_the_bus_runs_and_an_existing_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("bus.pid");
    let text = open_config(&format!("<pidfile>{}</pidfile>", pid_file.display()));
    let mut broker = Broker::start_with_config(&text);
    let written = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(written.trim(), broker.pid().to_string());

    // A second bus on the same configuration (another socket) finds the file and stops.
    let other = tempfile::tempdir().unwrap();
    let conf = other.path().join("bus.conf");
    std::fs::write(&conf, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg(format!("--config-file={}", conf.display()))
        .arg(format!(
            "--address=unix:path={}",
            other.path().join("bus").display()
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("which is running"));

    // --nopidfile: the file is neither needed nor written.
    let mut second = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg(format!("--config-file={}", conf.display()))
        .arg(format!(
            "--address=unix:path={}",
            other.path().join("bus").display()
        ))
        .args(["--nopidfile", "--print-address"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let stdout = second.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert!(line.starts_with("unix:path="), "{line:?}");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        broker.pid().to_string()
    );
    stop(second.id());
    second.wait().unwrap();

    broker.stop();
    assert!(!pid_file.exists(), "the pid file outlived the bus");
}

#[test]
fn a_pid_file_left_by_a_bus_that_has_gone_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("bus.pid");
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    std::fs::write(&pid_file, format!("{dead}\n")).unwrap();
    let broker = Broker::start_with_config(&open_config(&format!(
        "<pidfile>{}</pidfile>",
        pid_file.display()
    )));
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        broker.pid().to_string()
    );
    assert!(broker.log().contains("replacing a stale pid file"));
}

#[test]
fn a_bus_started_as_root_runs_as_the_configured_user() {
    if !nix::unistd::Uid::current().is_root() {
        // Only root can change user; any other uid tests the refusal instead.
        let broker = Broker::start_with_config(&open_config("<user>nobody</user>"));
        assert!(
            broker
                .log()
                .contains("cannot change to the configured user")
        );
        return;
    }
    let broker = Broker::start_with_config(&open_config("<user>nobody</user>"));
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let uid = nobody.uid.as_raw().to_string();
    let status = proc_status(broker.pid(), "Uid");
    assert!(
        status.split_whitespace().all(|u| u == uid),
        "uids {status}, want {uid}"
    );
    assert_eq!(
        proc_status(broker.pid(), "Groups"),
        nobody.gid.as_raw().to_string(),
        "root's groups are dropped"
    );
    // Root may still connect, as to any bus.
    let mut client = RawClient::connect(&broker.socket);
    client.driver_call("GetId", &()).expect("GetId");
}

#[test]
fn syslog_only_sends_log_lines_to_the_system_log_and_not_to_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let log_socket = dir.path().join("log");
    let syslog = UnixDatagram::bind(&log_socket).unwrap();
    syslog
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let path = log_socket.to_str().unwrap();
    let broker = Broker::start_with_env(&["--syslog-only"], &[("BROKER_SYSLOG_SOCKET", path)]);
    let mut buf = [0u8; 4096];
    let entry = loop {
        let n = syslog.recv(&mut buf).expect("a syslog datagram");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.contains("listening") {
            break text;
        }
    };
    // `<PRI>broker[PID]: `, PRI being facility daemon (3) and the line's severity.
    let (pri, rest) = entry
        .strip_prefix('<')
        .and_then(|e| e.split_once('>'))
        .unwrap_or_else(|| panic!("no <PRI> in {entry:?}"));
    let pri: u8 = pri.parse().expect("a numeric priority");
    assert_eq!(pri >> 3, 3, "not facility daemon: {entry:?}");
    let severity = match rest {
        _ if rest.contains(" INFO ") => 6,
        _ if rest.contains(" DEBUG ") => 7,
        _ => panic!("no level in {entry:?}"),
    };
    assert_eq!(pri & 7, severity, "{entry:?}");
    let prefix = format!("broker[{}]: ", broker.pid());
    assert!(rest.starts_with(&prefix), "{entry:?}");
    assert!(
        !broker.log().contains("listening"),
        "stderr got the line too"
    );
}

#[test]
fn syslog_without_a_system_log_falls_back_to_stderr() {
    let broker = Broker::start_with_env(
        &["--syslog"],
        &[("BROKER_SYSLOG_SOCKET", "/nonexistent/log")],
    );
    let log = broker.wait_for_log("listening");
    assert!(log.contains("cannot reach the system log at /nonexistent/log"));
}

#[test]
fn address_systemd_serves_on_the_socket_systemd_passes_and_leaves_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bus");
    let mut activator = Command::new("systemd-socket-activate")
        .arg(format!("--listen={}", socket.display()))
        .arg(env!("CARGO_BIN_EXE_broker"))
        .args(["--session", "--address=systemd:", "--print-address"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    assert!(
        wait_for_path(&socket, true),
        "no socket from systemd-socket-activate"
    );
    // The first connection makes the activator start the bus with the socket.
    let mut client = RawClient::connect(&socket);
    client.driver_call("GetId", &()).expect("the bus answers");
    let mut line = String::new();
    let stdout = activator.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert!(
        line.starts_with(&format!("unix:path={},guid=", socket.display())),
        "printed {line:?}"
    );
    stop(activator.id());
    activator.wait().unwrap();
    assert!(
        socket.exists(),
        "the bus removed a socket file that systemd owns"
    );
}

#[test]
fn address_systemd_without_passed_sockets_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--session", "--address=systemd:"])
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LISTEN_FDS"));
}

// Readiness notification.

/// A datagram socket standing in for systemd's notification socket.
struct Manager {
    socket: UnixDatagram,
    /// What `NOTIFY_SOCKET` says: a path, or `@` and an abstract name.
    address: String,
    _dir: tempfile::TempDir,
}

impl Manager {
    fn at_path() -> Manager {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notification socket");
        Manager::listening(socket, path.display().to_string(), dir)
    }

    fn at_abstract_name() -> Manager {
        use std::os::linux::net::SocketAddrExt;
        let dir = tempfile::tempdir().unwrap();
        // The temporary directory's name makes the abstract name unique on the host.
        let name = format!("broker-test-notify-{}", dir.path().display());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the abstract socket");
        Manager::listening(socket, format!("@{name}"), dir)
    }

    fn listening(socket: UnixDatagram, address: String, dir: tempfile::TempDir) -> Manager {
        use nix::sys::socket::{setsockopt, sockopt::PassCred};
        // As systemd does: the kernel attaches each sender's pid.
        setsockopt(&socket, PassCred, &true).expect("SO_PASSCRED");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Manager {
            socket,
            address,
            _dir: dir,
        }
    }

    /// The next notification and the pid that sent it; fails the test after ten seconds.
    fn next(&self) -> (String, u32) {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg};
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!(UnixCredentials);
        let (len, pid) = {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .unwrap_or_else(|e| panic!("no notification within ten seconds: {e}"));
            let pid = msg
                .cmsgs()
                .expect("control messages")
                .find_map(|c| match c {
                    ControlMessageOwned::ScmCredentials(creds) => Some(creds.pid() as u32),
                    _ => None,
                });
            (msg.bytes, pid.expect("the sender's credentials"))
        };
        (String::from_utf8_lossy(&buf[..len]).into_owned(), pid)
    }
}

/// The value of `key` in a notification's `KEY=value` lines.
fn field<'a>(state: &'a str, key: &str) -> Option<&'a str> {
    state
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

/// A daemon the test started by way of another process: stopped if the test ends first.
struct Daemon(Option<u32>);

impl Daemon {
    fn stop(&mut self) {
        if let Some(pid) = self.0.take() {
            stop(pid);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn the_bus_tells_notify_socket_ready_once_it_serves_and_stopping_when_it_stops() {
    let manager = Manager::at_path();
    let mut broker = Broker::start_with_env(&[], &[("NOTIFY_SOCKET", &manager.address)]);
    let (ready, sender) = manager.next();
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    // The manager started this very process: it knows the pid.
    assert_eq!(field(&ready, "MAINPID"), None, "{ready:?}");
    let status = format!("Serving on {}", broker.client_address());
    assert_eq!(field(&ready, "STATUS"), Some(status.as_str()), "{ready:?}");
    assert_eq!(sender, broker.pid(), "sent by another process than the bus");
    let mut client = RawClient::connect(&broker.socket);
    client.driver_call("GetId", &()).expect("the bus answers");

    assert!(broker.stop().success());
    // The next datagram, not a second READY=1.
    let (stopping, sender) = manager.next();
    assert_eq!(field(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    assert_eq!(sender, broker.pid());
}

#[test]
fn with_fork_the_daemon_notifies_an_abstract_socket_before_its_parent_returns() {
    let manager = Manager::at_abstract_name();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bus");
    let parent = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--session", "--fork", "--print-pid"])
        .arg(format!("--address=unix:path={}", socket.display()))
        .env("NOTIFY_SOCKET", &manager.address)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start broker --fork");
    let parent_pid = parent.id();
    let (ready, sender) = manager.next();
    // READY=1 means that the bus serves: a client is answered at once.
    let mut client = RawClient::connect(&socket);
    client.driver_call("GetId", &()).expect("the bus answers");

    let out = parent.wait_with_output().expect("wait for broker --fork");
    let printed = String::from_utf8_lossy(&out.stdout);
    let pid: u32 = printed.trim().parse().expect("the daemon's pid");
    let mut daemon = Daemon(Some(pid));
    assert!(
        out.status.success(),
        "broker --fork exited {:?}",
        out.status
    );
    assert_ne!(pid, parent_pid, "--fork did not fork");
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(field(&ready, "MAINPID"), Some(printed.trim()), "{ready:?}");
    assert_eq!(
        sender, pid,
        "not sent by the daemon (the parent is {parent_pid})"
    );

    daemon.stop();
    let (stopping, sender) = manager.next();
    assert_eq!(field(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    assert_eq!(sender, pid);
}

#[test]
fn a_notify_socket_that_cannot_be_reached_is_a_warning_and_the_bus_serves() {
    let broker = Broker::start_with_env(&[], &[("NOTIFY_SOCKET", "/nonexistent/notify")]);
    let log = broker.wait_for_log("cannot tell the service manager READY=1");
    assert!(log.contains("at /nonexistent/notify"), "{log}");
    let mut client = RawClient::connect(&broker.socket);
    client.driver_call("GetId", &()).expect("the bus answers");
}

// The systemd user units of systemd/.

/// Copies the units of `systemd/` to `dir`, with ExecStart naming the built broker instead of
/// `cargo install`'s; returns their paths.
fn units_for_test(dir: &Path) -> [PathBuf; 2] {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    std::fs::create_dir_all(dir).unwrap();
    let service =
        std::fs::read_to_string(source.join("broker.service")).expect("systemd/broker.service");
    let installed = "ExecStart=%h/.cargo/bin/broker ";
    assert!(
        service.contains(installed),
        "broker.service does not say {installed:?}"
    );
    let built = format!("ExecStart={} ", env!("CARGO_BIN_EXE_broker"));
    let units = [dir.join("broker.service"), dir.join("broker.socket")];
    std::fs::write(&units[0], service.replace(installed, &built)).unwrap();
    std::fs::copy(source.join("broker.socket"), &units[1]).expect("systemd/broker.socket");
    units
}

/// `systemd-analyze --user verify` of `units`, with a home and runtime directory of the test's
/// own (the user manager's specifiers need them; no user manager runs).
fn verify_units(home: &Path, units: &[PathBuf]) -> Output {
    let runtime = home.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    tool("systemd-analyze")
        .args(["--user", "verify", "--man=no"])
        .args(units)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .expect("run systemd-analyze")
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_test(&dir.path().join("units"));
    let out = verify_units(dir.path(), &units);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A key systemd cannot parse is only a warning, and the status stays 0.
    assert!(
        out.status.success() && stderr.is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}",
        out.status
    );

    // The check has teeth: the same units with a missing binary fail it.
    let broken = units_for_test(&dir.path().join("broken"));
    let text = std::fs::read_to_string(&broken[0]).unwrap();
    let text = text.replace(env!("CARGO_BIN_EXE_broker"), "/nonexistent/broker");
    std::fs::write(&broken[0], text).unwrap();
    let out = verify_units(dir.path(), &broken);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a missing binary passed: {stderr}");
    assert!(stderr.contains("/nonexistent/broker"), "{stderr}");
}

#[test]
fn enabling_the_units_makes_them_dbus_socket_and_dbus_service_and_disabling_undoes_it() {
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("etc/systemd/user");
    units_for_test(&units);
    let systemctl = |verb: &str| {
        let out = tool("systemctl")
            .arg(format!("--root={}", root.path().display()))
            .args(["--global", verb, "broker.socket", "broker.service"])
            .output()
            .expect("run systemctl (package systemd)");
        assert!(
            out.status.success(),
            "systemctl {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let link = |name: &str| std::fs::read_link(units.join(name)).ok();
    let unit = |name: &str| Some(PathBuf::from("/etc/systemd/user").join(name));

    systemctl("enable");
    assert_eq!(link("dbus.service"), unit("broker.service"));
    assert_eq!(link("dbus.socket"), unit("broker.socket"));
    assert_eq!(
        link("sockets.target.wants/broker.socket"),
        unit("broker.socket")
    );
    systemctl("disable");
    for name in [
        "dbus.service",
        "dbus.socket",
        "sockets.target.wants/broker.socket",
    ] {
        assert_eq!(link(name), None, "{name} is still there");
    }
}

// Without systemd: dbus-run-session, and a login script.

/// A script for the session's command: the pid of the session bus (what the bus says of its own
/// driver) and the program that pid runs.
const WHICH_BUS: &str = r#"set -e
reply=$(dbus-send --session --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus.GetConnectionUnixProcessID string:org.freedesktop.DBus)
pid=${reply##* }
echo "$pid"
readlink "/proc/$pid/exe""#;

/// The login-script recipe of the README: one bus per user at `$XDG_RUNTIME_DIR/bus`, started by
/// the first login and used by the later ones.
const LOGIN_SCRIPT: &str = r#"if [ -z "$DBUS_SESSION_BUS_ADDRESS" ] && [ -n "$XDG_RUNTIME_DIR" ]; then
    # Starts the bus unless one already answers there (broker then says so and exits).
    broker --session --fork --syslog --address=unix:runtime=yes 2>/dev/null
    export DBUS_SESSION_BUS_ADDRESS="unix:path=$XDG_RUNTIME_DIR/bus"
fi"#;

/// `sh -c script` as a login without systemd runs it: with `broker` on PATH, `runtime` as
/// `XDG_RUNTIME_DIR`, and no session bus yet. `dir` holds the PATH entry.
fn login_shell(dir: &Path, runtime: &Path, script: &str) -> Command {
    let bin = dir.join("bin");
    if !bin.join("broker").exists() {
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_broker"), bin.join("broker")).unwrap();
    }
    let system_path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&system_path)))
            .unwrap();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script])
        .env("PATH", path)
        .env("XDG_RUNTIME_DIR", runtime)
        .env("BROKER_SYSLOG_SOCKET", dir.join("no-syslog"))
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    cmd
}

/// A fresh runtime directory (mode 0700, as logind makes it) under `dir`.
fn runtime_dir(dir: &Path) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let runtime = dir.join("run");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&runtime)
        .unwrap();
    runtime
}

/// Runs `cmd` with its output in files (a daemon that kept a pipe open would not hold the test),
/// failing the test when it has not exited within thirty seconds.
fn run_within_30s(mut cmd: Command) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child: Child = cmd
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let status = wait_within(&mut child, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{cmd:?} did not finish within 30 s"));
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

/// The (pid, program) that `WHICH_BUS` printed, after checking that the script succeeded.
fn bus_of(out: &Output) -> (u32, PathBuf) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exited {:?}; stdout: {stdout}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let pid = lines.next().and_then(|l| l.parse().ok()).expect("a pid");
    (pid, PathBuf::from(lines.next().expect("the bus's program")))
}

fn the_built_broker() -> PathBuf {
    std::fs::canonicalize(env!("CARGO_BIN_EXE_broker")).unwrap()
}

/// Waits up to five seconds for process `pid` to end (a zombie has ended).
fn ended(pid: u32) -> bool {
    for _ in 0..100 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat)
                if stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, s)| s.starts_with('Z')) =>
            {
                return true;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    false
}

#[test]
fn dbus_run_session_runs_a_command_on_broker_and_stops_it_after() {
    tool("dbus-run-session");
    tool("dbus-send");
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_dir(dir.path());
    // The .xinitrc line of the README, with a script in place of the window manager.
    let mut login = login_shell(
        dir.path(),
        &runtime,
        r#"exec dbus-run-session --dbus-daemon=broker -- sh -c "$WHICH_BUS""#,
    );
    login.env("WHICH_BUS", WHICH_BUS);
    let (pid, program) = bus_of(&run_within_30s(login));
    assert_eq!(
        program,
        the_built_broker(),
        "the session's bus is not broker"
    );
    assert!(ended(pid), "the bus outlived its session");
}

#[test]
fn dbus_run_session_beside_a_running_session_bus_leaves_that_bus_alone() {
    tool("dbus-run-session");
    tool("dbus-send");
    // A desktop's bus at $XDG_RUNTIME_DIR/bus: the broker's directory plays the runtime directory.
    let desktop = Broker::start();
    let mut desktop_client = RawClient::connect(&desktop.socket);
    let dir = tempfile::tempdir().unwrap();
    let mut login = login_shell(
        dir.path(),
        desktop.dir.path(),
        r#"dbus-run-session --dbus-daemon=broker -- sh -c "$WHICH_BUS""#,
    );
    login.env("WHICH_BUS", WHICH_BUS);
    let (pid, program) = bus_of(&run_within_30s(login));
    assert_eq!(program, the_built_broker());
    assert_ne!(pid, desktop.pid(), "the session used the desktop's bus");
    assert!(ended(pid), "the bus outlived its session");
    desktop_client
        .driver_call("GetId", &())
        .expect("the desktop's bus still answers");
    assert!(desktop.socket.exists(), "the desktop's socket was removed");
}

#[test]
fn the_login_script_starts_one_bus_that_later_logins_share() {
    tool("dbus-send");
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_dir(dir.path());
    let script = format!("{LOGIN_SCRIPT}\n{WHICH_BUS}");
    // Returning at all shows that --fork left the login to go on.
    let (pid, program) = bus_of(&run_within_30s(login_shell(dir.path(), &runtime, &script)));
    let mut bus = Daemon(Some(pid));
    assert_eq!(program, the_built_broker());
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32))).unwrap();
    assert_eq!(
        sid.as_raw() as u32,
        pid,
        "the bus is not in a session of its own"
    );

    let (again, _) = bus_of(&run_within_30s(login_shell(dir.path(), &runtime, &script)));
    assert_eq!(
        again, pid,
        "a second login did not use the first login's bus"
    );

    bus.stop();
    assert!(ended(pid), "the bus did not stop");
    assert!(
        wait_for_path(&runtime.join("bus"), false),
        "the socket outlived the bus"
    );
}
