//! When the bus stops (SIGTERM or SIGINT), no process it started or adopted outlives it by more
//! than `--stop-grace-ms`: connections close first, so services that exit when their bus goes
//! do so on their own; what is left gets SIGTERM, then SIGKILL; the bus exits once none is left.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Broker, example_path};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The grace period the tests give the bus.
const GRACE: Duration = Duration::from_millis(1000);

/// A service that leaves processes behind: before it execs the daemonizing example (which
/// forks, calls `setsid`, forks again, and owns the name from there), it starts a helper that
/// double-forked into a session of its own and whose child double-forks a grandchild again, and
/// a process that ignores SIGTERM and keeps forking `sleep`. Each writes its pid to DIR.
const LEFTOVERS: &str = r#"#!/bin/sh
dir=$(dirname "$0")
echo $$ > "$dir/service.pid"
( setsid sh -c '
    echo $$ > "$1/helper.pid"
    ( sh -c "sleep 600 & echo \$! > \"$1/grandchild.pid\"" & )
    exec sleep 600
  ' sh "$dir" & )
sh -c 'trap "" TERM; echo $$ > "$1/stubborn.pid"; while :; do sleep 1; done' sh "$dir" &
exec "$1" --name org.broker.Test
"#;

/// Writes the activation file of `org.broker.Test`, running `script` with `program` as its
/// argument, into `dir`.
fn activatable(dir: &Path, script: &str, program: &Path) {
    let script_path = dir.join("service.sh");
    std::fs::write(&script_path, script).expect("write the service script");
    let file = format!(
        "[D-BUS Service]\nName=org.broker.Test\nExec=/bin/sh {} {}\n",
        script_path.display(),
        program.display()
    );
    std::fs::write(dir.join("org.broker.Test.service"), file).expect("write the service file");
}

/// Starts `org.broker.Test` with a call to its `Pid` method; returns the pid that answered.
async fn activate(bus: &Broker, interface: &str, path: &str) -> u32 {
    let connection = bus.zbus().await;
    let reply = connection
        .call_method(Some("org.broker.Test"), path, Some(interface), "Pid", &())
        .await
        .unwrap_or_else(|e| panic!("activation failed: {e}; log:\n{}", bus.log()));
    reply.body().deserialize().expect("a pid")
}

/// Reads the pid file `name` in `dir`, waiting a bounded time for the script to write it.
fn pid_file(dir: &Path, name: &str) -> u32 {
    let path = dir.join(name);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a process with this pid exists (zombies included).
fn exists(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None) != Err(Errno::ESRCH)
}

/// The processes whose process group or session is `id` (fields 5 and 6 of `/proc/PID/stat`).
fn in_group_or_session(id: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        let id = id.to_string();
        if fields.get(2) == Some(&id.as_str()) || fields.get(3) == Some(&id.as_str()) {
            found.push(pid);
        }
    }
    found
}

/// On a failed test, kills what the bus should have stopped, so that it does not outlive the
/// test: the pids given, and every process in a group or session they lead.
struct KillOnFailure(Vec<u32>);

impl Drop for KillOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let leaders = self.0.iter().copied();
        let all: Vec<u32> = leaders
            .clone()
            .chain(leaders.flat_map(in_group_or_session))
            .collect();
        for pid in all {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Waits until the bus has exited, at most `limit` after `since`; whether it did.
fn exited_by(bus: &mut Broker, since: Instant, limit: Duration) -> bool {
    while Instant::now() < since + limit {
        if !bus.is_running() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    !bus.is_running()
}

/// Starts the leftovers service, stops the bus with `signal`, and checks that every process of
/// the service is gone, and the bus too, within the grace period plus 1 s.
async fn leftovers_are_stopped_by(signal: Signal) {
    let dir = tempfile::tempdir().expect("tempdir");
    activatable(dir.path(), LEFTOVERS, &example_path("daemon_service"));
    let activation_dir = format!("--activation-dir={}", dir.path().display());
    let mut bus = Broker::start_with(&[&activation_dir, "--stop-grace-ms=1000"]);
    let daemon = activate(&bus, "org.broker.Daemon", "/org/broker/Daemon").await;
    let service = pid_file(dir.path(), "service.pid");
    let helper = pid_file(dir.path(), "helper.pid");
    let grandchild = pid_file(dir.path(), "grandchild.pid");
    let stubborn = pid_file(dir.path(), "stubborn.pid");
    let all = [daemon, helper, grandchild, stubborn];
    let _cleanup = KillOnFailure(vec![daemon, helper, grandchild, stubborn, service]);
    for pid in all {
        assert!(exists(pid), "pid {pid} should run before the stop");
    }
    let session = in_group_or_session(helper);
    assert!(
        session.contains(&helper) && session.contains(&grandchild),
        "the helper and its grandchild are in a session of the helper's: {session:?}"
    );

    let sent = Instant::now();
    kill(Pid::from_raw(bus.pid() as i32), signal).expect("signal the bus");
    let exited = exited_by(&mut bus, sent, GRACE + Duration::from_secs(1));
    let log = bus.log();
    assert!(
        exited,
        "the bus still runs {GRACE:?} + 1 s after {signal}; log:\n{log}"
    );
    let left: Vec<u32> = all.into_iter().filter(|&pid| exists(pid)).collect();
    assert!(left.is_empty(), "{left:?} outlived the bus; log:\n{log}");
    // The `sleep`s that the stubborn process and the helper forked, whichever pids they had.
    assert_eq!(in_group_or_session(service), [0u32; 0], "log:\n{log}");
    assert_eq!(in_group_or_session(helper), [0u32; 0], "log:\n{log}");
    assert!(
        log.contains("processes left behind by services: SIGTERM"),
        "{log}"
    );
    // Only the stubborn one (and its `sleep`) needed SIGKILL.
    assert!(
        log.contains("processes left behind by services: SIGKILL"),
        "{log}"
    );
}

#[tokio::test]
async fn after_sigterm_no_process_of_a_service_outlives_the_grace_period() {
    leftovers_are_stopped_by(Signal::SIGTERM).await;
}

#[tokio::test]
async fn sigint_stops_them_as_sigterm_does() {
    leftovers_are_stopped_by(Signal::SIGINT).await;
}

/// A service that exits when its connection closes is not signalled: the bus closes the
/// connections first and waits for it. The grace period is long here, so that a slow machine
/// gives the service time to see its bus go before SIGTERM would go out.
#[tokio::test]
async fn a_service_that_exits_with_its_connection_is_not_signalled() {
    let dir = tempfile::tempdir().expect("tempdir");
    activatable(
        dir.path(),
        "#!/bin/sh\necho $$ > \"$(dirname \"$0\")/service.pid\"\nexec \"$1\" --name org.broker.Test\n",
        &example_path("echo_service"),
    );
    let activation_dir = format!("--activation-dir={}", dir.path().display());
    let mut bus = Broker::start_with(&[&activation_dir, "--stop-grace-ms=8000"]);
    let connection = bus.zbus().await;
    let reply = connection
        .call_method(
            Some("org.broker.Test"),
            "/org/broker/Echo",
            Some("org.broker.Echo"),
            "Echo",
            &("hi",),
        )
        .await
        .unwrap_or_else(|e| panic!("activation failed: {e}; log:\n{}", bus.log()));
    assert_eq!(
        reply.body().deserialize::<String>().expect("a string"),
        "hi"
    );
    let service = pid_file(dir.path(), "service.pid");
    assert!(exists(service));

    let sent = Instant::now();
    kill(Pid::from_raw(bus.pid() as i32), Signal::SIGTERM).expect("signal the bus");
    // Well before SIGTERM would go out (half of the 8 s grace period).
    let exited = exited_by(&mut bus, sent, Duration::from_secs(4));
    let log = bus.log();
    assert!(exited, "the bus did not exit at once; log:\n{log}");
    assert!(!exists(service), "log:\n{log}");
    assert!(log.contains("the bus went away"), "{log}");
    assert!(
        log.contains(&format!("pid={service} status=exited with status 0")),
        "the service did not exit 0 on its own; log:\n{log}"
    );
    assert!(!log.contains("processes left behind"), "{log}");
    assert!(!log.contains("signalling a process left behind"), "{log}");
}

/// The example that leaves a child behind: once the service has quit, its helper (which
/// ignores SIGTERM) lives on as the bus's adopted child, until the bus stops and kills it.
#[tokio::test]
async fn the_helper_a_dead_service_left_behind_is_stopped_with_the_bus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = format!(
        "[D-BUS Service]\nName=org.broker.Leftover\nExec={} --ignore-term\n",
        example_path("leftover_service").display()
    );
    std::fs::write(dir.path().join("leftover.service"), file).expect("write the service file");
    let activation_dir = format!("--activation-dir={}", dir.path().display());
    let mut bus = Broker::start_with(&[&activation_dir, "--stop-grace-ms=1000"]);
    let connection = bus.zbus().await;
    let call = |method: &'static str| {
        connection.call_method(
            Some("org.broker.Leftover"),
            "/org/broker/Leftover",
            Some("org.broker.Leftover"),
            method,
            &(),
        )
    };
    let reply = call("HelperPid")
        .await
        .unwrap_or_else(|e| panic!("activation failed: {e}; log:\n{}", bus.log()));
    let helper: u32 = reply.body().deserialize().expect("a pid");
    let service: u32 = call("Pid")
        .await
        .expect("Pid")
        .body()
        .deserialize()
        .expect("a pid");
    let _cleanup = KillOnFailure(vec![helper, service]);
    call("Quit").await.expect("Quit");
    bus.wait_for_log(&format!("pid={service} status=exited with status 0"));
    let parent = std::fs::read_to_string(format!("/proc/{helper}/stat")).expect("helper runs");
    let parent = parent
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1));
    assert_eq!(
        parent,
        Some(bus.pid().to_string().as_str()),
        "adopted by the bus"
    );

    let sent = Instant::now();
    kill(Pid::from_raw(bus.pid() as i32), Signal::SIGTERM).expect("signal the bus");
    let exited = exited_by(&mut bus, sent, GRACE + Duration::from_secs(1));
    let log = bus.log();
    assert!(
        exited,
        "the bus still runs {GRACE:?} + 1 s after SIGTERM; log:\n{log}"
    );
    assert!(!exists(helper), "the helper outlived the bus; log:\n{log}");
    assert!(
        log.contains(&format!("pid={helper} status=killed by signal 9")),
        "the helper was not killed by the bus; log:\n{log}"
    );
}
