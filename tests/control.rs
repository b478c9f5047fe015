//! broker's supervisor interface (`org.broker.Supervisor1`) and its command-line clients
//! (`broker status | stop | logs`), against the real binary and real service processes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{ALLOW_ALL, Broker, bus_config, example_path, within};
use futures_util::StreamExt;

/// How long any one thing the tests wait for may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// The grace period between SIGTERM and SIGKILL that the tests' buses use.
const GRACE_MS: u64 = 1000;

/// A bus that reads only the test's activation files (none of the host's), lets every uid
/// connect, and has these services:
/// - `org.broker.Echo`: `echo_service`;
/// - `org.test.Stubborn`: `echo_service` under the name `org.test.Stubborn`, ignoring SIGTERM;
/// - `org.test.Fails`: prints three lines and exits 3 without taking its name.
fn start_bus() -> Broker {
    let echo = example_path("echo_service").display().to_string();
    let files = [
        (
            "services/echo.toml",
            format!("name = \"org.broker.Echo\"\nexec = [\"{echo}\"]\n"),
        ),
        (
            "services/stubborn.toml",
            format!(
                "name = \"org.test.Stubborn\"\nexec = [\"/bin/sh\", \"-c\", \
                 \"trap '' TERM; exec {echo} --name org.test.Stubborn\"]\n"
            ),
        ),
        (
            "services/fails.toml",
            "name = \"org.test.Fails\"\nexec = [\"/bin/sh\", \"-c\", \
             \"echo first; echo second; echo third >&2; exit 3\"]\n"
                .to_owned(),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
    let config = bus_config(&format!(
        "  <policy context=\"default\">\n    <allow user=\"*\"/>{ALLOW_ALL}\n  </policy>\n  \
         <servicedir>services</servicedir>"
    ));
    let grace = format!("--stop-grace-ms={GRACE_MS}");
    Broker::start_with_config_files(&config, &files, &[&grace])
}

/// Runs `broker ARGS --address=<the bus>`: whether it succeeded, its stdout and stderr.
fn client(bus: &Broker, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(args)
        .arg(format!("--address={}", bus.client_address()))
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .expect("run the broker client");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `broker status` line of `name`, split into its columns.
fn status_line(bus: &Broker, name: &str) -> Vec<String> {
    let (ok, out, err) = client(bus, &["status"]);
    assert!(ok, "broker status failed: {err}");
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("broker status does not list {name}:\n{out}"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// Polls `check` until it holds, failing the test after [`DEADLINE`].
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` still exists (a zombie counts as gone).
fn process_exists(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Calls `Echo` on `name` (which activates it) and returns the pid of its owner.
async fn activate(conn: &zbus::Connection, name: &str) -> u32 {
    let reply = within(
        "the activated service's reply",
        conn.call_method(
            Some(name),
            "/org/broker/Echo",
            Some("org.broker.Echo"),
            "Echo",
            &("hi",),
        ),
    )
    .await
    .expect("Echo through activation");
    let echoed: String = reply.body().deserialize().expect("Echo's reply");
    assert_eq!(echoed, "hi");
    let dbus = zbus::fdo::DBusProxy::new(conn).await.expect("driver proxy");
    let bus_name = zbus::names::BusName::try_from(name).expect("a valid name");
    dbus.get_connection_unix_process_id(bus_name)
        .await
        .expect("the owner's pid")
}

/// Asks the bus to start `org.test.Fails`, which fails.
async fn start_failing(conn: &zbus::Connection) {
    let dbus = zbus::fdo::DBusProxy::new(conn).await.expect("driver proxy");
    let name = zbus::names::WellKnownName::try_from("org.test.Fails").expect("a valid name");
    let result = within("the failed start", dbus.start_service_by_name(name, 0)).await;
    let error = result.expect_err("org.test.Fails exits 3 before taking its name");
    assert_eq!(
        common::fdo_error_name(&error),
        "org.freedesktop.DBus.Error.Spawn.ChildExited"
    );
}

#[tokio::test]
async fn status_shows_inactive_running_and_failed_services() {
    let bus = start_bus();
    for name in ["org.broker.Echo", "org.test.Fails", "org.test.Stubborn"] {
        assert_eq!(status_line(&bus, name), [name, "inactive", "-"]);
    }
    let (_, header, _) = client(&bus, &["status"]);
    assert!(header.starts_with("NAME"), "no header line:\n{header}");
    let conn = bus.zbus().await;
    let pid = activate(&conn, "org.broker.Echo").await;
    start_failing(&conn).await;
    assert_eq!(
        status_line(&bus, "org.broker.Echo"),
        ["org.broker.Echo", "running", &pid.to_string()]
    );
    assert_eq!(
        status_line(&bus, "org.test.Fails"),
        ["org.test.Fails", "failed", "-"]
    );

    let (ok, out, err) = client(&bus, &["status", "org.test.Fails"]);
    assert!(ok, "status org.test.Fails: {err}");
    assert!(out.contains("Last exit: exited with status 3"), "{out}");
    assert!(
        out.contains("Last failure: Process org.test.Fails exited with status 3"),
        "{out}"
    );
}

#[tokio::test]
async fn status_name_shows_the_processes_and_the_last_output() {
    let bus = start_bus();
    let conn = bus.zbus().await;
    let pid = activate(&conn, "org.broker.Echo").await;
    let mut out = String::new();
    eventually("status shows the service's output", || {
        let (ok, text, err) = client(&bus, &["status", "org.broker.Echo"]);
        assert!(ok, "status org.broker.Echo: {err}");
        out = text;
        out.contains("owns org.broker.Echo")
    });
    assert!(out.starts_with("org.broker.Echo - running\n"), "{out}");
    assert!(out.contains(&format!("Main PID: {pid}\n")), "{out}");
    assert!(out.contains("Starts: 1\n"), "{out}");
    let process = format!("{pid} {}", example_path("echo_service").display());
    assert!(
        out.contains(&process),
        "no process line {process:?}:\n{out}"
    );
}

#[tokio::test]
async fn status_json_has_every_field() {
    let bus = start_bus();
    let conn = bus.zbus().await;
    let pid = activate(&conn, "org.broker.Echo").await;
    let (ok, out, err) = client(&bus, &["status", "--json"]);
    assert!(ok, "status --json: {err}");
    let out = out.trim();
    assert!(out.starts_with("[{") && out.ends_with("}]"), "{out}");
    let echo = format!(
        "{{\"name\":\"org.broker.Echo\",\"state\":\"running\",\"main_pid\":{pid},\"pids\":[{pid}],"
    );
    assert!(out.contains(&echo), "no {echo} in {out}");
    assert!(
        out.contains("\"starts\":1,\"last_exit\":\"\",\"last_failure\":\"\"}"),
        "{out}"
    );
    let inactive = "{\"name\":\"org.test.Fails\",\"state\":\"inactive\",\"main_pid\":0,\"pids\":[],\
                    \"started_at_us\":0,\"starts\":0,\"last_exit\":\"\",\"last_failure\":\"\"}";
    assert!(out.contains(inactive), "no {inactive} in {out}");
}

#[tokio::test]
async fn unknown_names_and_buses_are_errors() {
    let bus = start_bus();
    for args in [
        &["status", "org.test.Nope"][..],
        &["stop", "org.test.Nope"],
        &["logs", "org.test.Nope"],
    ] {
        let (ok, out, err) = client(&bus, args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert_eq!(err, "broker: no service org.test.Nope\n", "{args:?}");
    }
    let gone = bus.dir.path().join("no-bus-here");
    let address = format!("unix:path={}", gone.display());
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["status", "--address", &address])
        .output()
        .expect("run the broker client");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("broker: cannot reach the bus at {address}: ")),
        "{err}"
    );
}

#[tokio::test]
async fn stop_ends_the_service_and_the_next_call_starts_it_again() {
    let bus = start_bus();
    let conn = bus.zbus().await;
    let pid = activate(&conn, "org.broker.Echo").await;
    let (ok, _, err) = client(&bus, &["stop", "org.broker.Echo"]);
    assert!(ok, "stop: {err}");
    eventually("the stopped service's process is gone", || {
        !process_exists(pid)
    });
    eventually("the stopped service is inactive", || {
        status_line(&bus, "org.broker.Echo") == ["org.broker.Echo", "inactive", "-"]
    });
    let again = activate(&conn, "org.broker.Echo").await;
    assert_ne!(again, pid, "the service was not started again");
    let (_, out, _) = client(&bus, &["status", "org.broker.Echo"]);
    assert!(out.contains("Starts: 2\n"), "{out}");
}

#[tokio::test]
async fn stop_kills_a_service_that_ignores_sigterm_after_the_grace_period() {
    let bus = start_bus();
    let conn = bus.zbus().await;
    let pid = activate(&conn, "org.test.Stubborn").await;
    let stopped = Instant::now();
    let (ok, _, err) = client(&bus, &["stop", "org.test.Stubborn"]);
    assert!(ok, "stop: {err}");
    eventually("the stubborn service's process is gone", || {
        !process_exists(pid)
    });
    assert!(
        stopped.elapsed() >= Duration::from_millis(GRACE_MS),
        "it was gone before the grace period was over, so SIGTERM was not ignored"
    );
    eventually("its last exit is SIGKILL", || {
        let (_, out, _) = client(&bus, &["status", "org.test.Stubborn"]);
        out.contains("Last exit: killed by signal 9 (SIGKILL)")
    });
}

#[tokio::test]
async fn stop_from_another_uid_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        nix::unistd::Uid::current().is_root(),
        "this test runs the client as nobody (setpriv), which only root can: run the tests as root"
    );
    let bus = start_bus();
    let conn = bus.zbus().await;
    let pid = activate(&conn, "org.broker.Echo").await;
    // The test's directory is root's (0700): nobody must reach the socket in it.
    std::fs::set_permissions(bus.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("open the test directory");
    let out = common::tool("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_broker"))
        .args([
            "stop",
            "org.broker.Echo",
            "--address",
            &bus.client_address(),
        ])
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stop as nobody: {err}");
    assert!(
        err.starts_with("broker: org.freedesktop.DBus.Error.AccessDenied: "),
        "{err}"
    );
    // Reading is for everyone.
    let status = common::tool("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_broker"))
        .args(["status", "--address", &bus.client_address()])
        .output()
        .expect("run setpriv");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(process_exists(pid), "the refused stop stopped the service");
    assert_eq!(
        status_line(&bus, "org.broker.Echo"),
        ["org.broker.Echo", "running", &pid.to_string()]
    );
}

#[tokio::test]
async fn logs_shows_the_last_lines_of_output() {
    let bus = start_bus();
    let conn = bus.zbus().await;
    start_failing(&conn).await;
    let mut out = String::new();
    eventually("logs shows the service's last line", || {
        let (ok, text, err) = client(&bus, &["logs", "org.test.Fails", "-n", "2"]);
        assert!(ok, "logs: {err}");
        out = text;
        out.contains("third")
    });
    assert_eq!(out, "second\nthird\n");
    let (_, all, _) = client(&bus, &["logs", "org.test.Fails"]);
    assert_eq!(all, "first\nsecond\nthird\n");
}

#[tokio::test]
async fn service_state_changed_is_emitted_for_each_change() {
    let bus = start_bus();
    let conn = bus.zbus().await;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.broker.Supervisor1")
        .member("ServiceStateChanged")
        .build()
        .expect("a valid rule");
    let mut signals = zbus::MessageStream::for_match_rule(rule, &conn, None)
        .await
        .expect("subscribe");
    activate(&conn, "org.broker.Echo").await;
    let (ok, _, err) = client(&bus, &["stop", "org.broker.Echo"]);
    assert!(ok, "stop: {err}");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let msg = within("ServiceStateChanged", signals.next())
            .await
            .expect("the stream goes on")
            .expect("a signal");
        let header = msg.header();
        assert_eq!(
            header.path().map(|p| p.as_str()),
            Some("/org/freedesktop/DBus")
        );
        assert_eq!(
            header.sender().map(|s| s.as_str()),
            Some("org.freedesktop.DBus")
        );
        let (name, state): (String, String) = msg.body().deserialize().expect("(ss)");
        seen.push(format!("{name} {state}"));
    }
    assert_eq!(
        seen,
        [
            "org.broker.Echo starting",
            "org.broker.Echo running",
            "org.broker.Echo inactive"
        ]
    );
}
