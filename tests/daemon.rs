//! Running as dbus-daemon runs: `--fork`, the pid file, `<user>`, and the system log.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Broker, RawClient, open_config};

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
    let prefix = format!("<30>broker[{}]: ", broker.pid());
    assert!(entry.starts_with(&prefix), "{entry:?}");
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
