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

/// The example that leaves a child behind, with `X-Broker-Leftovers=keep`: once the service
/// has quit, its helper (which ignores SIGTERM) lives on, adopted by the keeper of its start,
/// until the bus stops and kills it.
#[tokio::test]
async fn the_helper_a_dead_service_left_behind_is_stopped_with_the_bus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = format!(
        "[D-BUS Service]\nName=org.broker.Leftover\nExec={} --ignore-term\nX-Broker-Leftovers=keep\n",
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
    // Adopted by the keeper of the start (the service's parent), below the spawner, below the bus.
    let lineage = common::ancestors(helper);
    assert_eq!(lineage.get(2), Some(&bus.pid()), "{lineage:?}");
    assert_eq!(
        common::parent_pid(service),
        None,
        "the service itself is gone"
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

// ---------------------------------------------------------------------------
// The owner's death: each start runs under a keeper that knows every process of it, and what
// the name's owner leaves behind when it dies is stopped, unless the file keeps it.

/// How `org.broker.Test`'s file says what becomes of its leftovers.
#[derive(Clone, Copy, Debug)]
enum Policy {
    /// A `.service` file without the key: they are stopped.
    Default,
    /// `X-Broker-Leftovers=keep` in a `.service` file.
    KeepService,
    /// `leftovers = "keep"` in a TOML file.
    KeepToml,
}

/// Writes `org.broker.Test`'s file (in the format `policy` asks for) running `script` with
/// `program` as its argument.
fn activatable_with(dir: &Path, script: &str, program: &Path, policy: Policy) {
    let script_path = dir.join("service.sh");
    std::fs::write(&script_path, script).expect("write the service script");
    let (file, text) = match policy {
        Policy::Default | Policy::KeepService => (
            "org.broker.Test.service",
            format!(
                "[D-BUS Service]\nName=org.broker.Test\nExec=/bin/sh {} {}\n{}",
                script_path.display(),
                program.display(),
                if matches!(policy, Policy::KeepService) {
                    "X-Broker-Leftovers=keep\n"
                } else {
                    ""
                }
            ),
        ),
        Policy::KeepToml => (
            "test.toml",
            format!(
                "name = \"org.broker.Test\"\nexec = [\"/bin/sh\", \"{}\", \"{}\"]\nleftovers = \"keep\"\n",
                script_path.display(),
                program.display()
            ),
        ),
    };
    std::fs::write(dir.join(file), text).expect("write the service file");
}

/// `org.broker.Supervisor1.GetService("org.broker.Test")`: its `PIDs` and `KeeperPID`.
async fn processes_and_keeper(bus: &Broker) -> (Vec<u32>, u32) {
    let connection = bus.zbus().await;
    let reply = connection
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.broker.Supervisor1"),
            "GetService",
            &("org.broker.Test",),
        )
        .await
        .expect("GetService");
    let dict: std::collections::HashMap<String, zbus::OwnedVariant> =
        reply.body().deserialize().expect("a{sv}");
    let pids = Vec::<u32>::try_from(dict["PIDs"].try_clone().expect("clone")).expect("au");
    let keeper = u32::try_from(&dict["KeeperPID"]).expect("u");
    (pids, keeper)
}

/// The leftovers service's processes, from the pid files its script writes: the daemon that
/// owns the name, the helper in a session of its own, the helper's grandchild, the process that
/// ignores SIGTERM; and the pid of the script itself (whose group the stubborn one's `sleep`s
/// share).
struct Leftovers {
    daemon: u32,
    others: [u32; 3],
    script: u32,
}

async fn start_leftovers(bus: &Broker, dir: &Path) -> Leftovers {
    let daemon = activate(bus, "org.broker.Daemon", "/org/broker/Daemon").await;
    let others = ["helper.pid", "grandchild.pid", "stubborn.pid"].map(|f| pid_file(dir, f));
    Leftovers {
        daemon,
        others,
        script: pid_file(dir, "service.pid"),
    }
}

impl Leftovers {
    fn cleanup(&self) -> KillOnFailure {
        let mut all = vec![self.daemon, self.script];
        all.extend(self.others);
        KillOnFailure(all)
    }
}

/// Polls until none of `pids` exists, at most `limit`; the ones still there.
fn gone_within(pids: &[u32], limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| exists(p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_bus_for(dir: &Path) -> Broker {
    let activation_dir = format!("--activation-dir={}", dir.display());
    Broker::start_with(&[&activation_dir, "--stop-grace-ms=1000"])
}

#[tokio::test]
async fn get_service_lists_every_process_of_a_double_forked_service_under_its_keeper() {
    let dir = tempfile::tempdir().expect("tempdir");
    activatable(dir.path(), LEFTOVERS, &example_path("daemon_service"));
    let bus = start_bus_for(dir.path());
    let service = start_leftovers(&bus, dir.path()).await;
    let _cleanup = service.cleanup();
    let (pids, keeper) = processes_and_keeper(&bus).await;
    assert_eq!(pids.first(), Some(&service.daemon), "main first: {pids:?}");
    for pid in std::iter::once(service.daemon).chain(service.others) {
        assert!(pids.contains(&pid), "{pid} missing from {pids:?}");
        let lineage = common::ancestors(pid);
        let at = lineage.iter().position(|&p| p == keeper);
        assert!(
            at.is_some(),
            "{pid}'s ancestry {lineage:?} misses the keeper {keeper}"
        );
    }
    assert!(
        !pids.contains(&keeper),
        "the keeper is not the service's: {pids:?}"
    );
    let lineage = common::ancestors(keeper);
    assert!(
        lineage.contains(&bus.pid()),
        "keeper's ancestry {lineage:?}"
    );
    // Everything listed is below the keeper; nothing else is.
    for pid in &pids {
        assert!(
            common::ancestors(*pid).contains(&keeper),
            "{pid} is not the service's"
        );
    }
}

/// SIGKILL to the name's owner: the rest of the service, including a process that ignores
/// SIGTERM, is gone within the grace period plus 1 s, and the bus runs on.
#[tokio::test]
async fn the_owners_death_stops_everything_the_service_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    activatable_with(
        dir.path(),
        LEFTOVERS,
        &example_path("daemon_service"),
        Policy::Default,
    );
    let mut bus = start_bus_for(dir.path());
    let service = start_leftovers(&bus, dir.path()).await;
    let _cleanup = service.cleanup();
    let (_, keeper) = processes_and_keeper(&bus).await;
    kill(Pid::from_raw(service.daemon as i32), Signal::SIGKILL).expect("kill the owner");
    let left = gone_within(&service.others, GRACE + Duration::from_secs(1));
    let log = bus.log();
    assert!(left.is_empty(), "{left:?} outlived the owner; log:\n{log}");
    // The keeper exits once nothing is left below it, the `sleep`s forked meanwhile included.
    assert_eq!(
        gone_within(&[keeper], Duration::from_secs(2)),
        [0u32; 0],
        "log:\n{log}"
    );
    assert_eq!(
        in_group_or_session(service.others[0]),
        [0u32; 0],
        "log:\n{log}"
    );
    assert_eq!(in_group_or_session(keeper), [0u32; 0], "log:\n{log}");
    // The stubborn one needed SIGKILL (its keeper's report may arrive a moment after).
    let stubborn = service.others[2];
    bus.wait_for_log(&format!("pid={stubborn} status=killed by signal 9"));
    assert!(bus.is_running(), "log:\n{log}");
}

/// With the leftovers kept, the rest of the service outlives its owner by more than the grace
/// period, the next request starts the service again, and the bus's SIGTERM still stops it all.
async fn kept_leftovers(policy: Policy) {
    let dir = tempfile::tempdir().expect("tempdir");
    activatable_with(
        dir.path(),
        LEFTOVERS,
        &example_path("daemon_service"),
        policy,
    );
    let mut bus = start_bus_for(dir.path());
    let first = start_leftovers(&bus, dir.path()).await;
    let _cleanup = first.cleanup();
    kill(Pid::from_raw(first.daemon as i32), Signal::SIGKILL).expect("kill the owner");
    bus.wait_for_log(&format!("pid={} status=killed by signal 9", first.daemon));
    // The behaviour is a bound in time: still there after the grace period and a second more.
    std::thread::sleep(GRACE + Duration::from_secs(1));
    let log = bus.log();
    for pid in first.others {
        assert!(exists(pid), "{pid} was stopped ({policy:?}); log:\n{log}");
    }
    for file in [
        "service.pid",
        "helper.pid",
        "grandchild.pid",
        "stubborn.pid",
    ] {
        std::fs::remove_file(dir.path().join(file)).expect("remove a pid file");
    }
    let second = start_leftovers(&bus, dir.path()).await;
    let _cleanup_second = second.cleanup();
    assert_ne!(second.daemon, first.daemon, "started again");

    let sent = Instant::now();
    kill(Pid::from_raw(bus.pid() as i32), Signal::SIGTERM).expect("signal the bus");
    let exited = exited_by(&mut bus, sent, GRACE + Duration::from_secs(1));
    let log = bus.log();
    assert!(exited, "the bus still runs; log:\n{log}");
    let all: Vec<u32> = first
        .others
        .into_iter()
        .chain(second.others)
        .chain([second.daemon])
        .collect();
    assert_eq!(gone_within(&all, Duration::ZERO), [0u32; 0], "log:\n{log}");
}

#[tokio::test]
async fn leftovers_kept_by_a_service_file_outlive_the_owner_but_not_the_bus() {
    kept_leftovers(Policy::KeepService).await;
}

#[tokio::test]
async fn leftovers_kept_by_a_toml_file_outlive_the_owner_but_not_the_bus() {
    kept_leftovers(Policy::KeepToml).await;
}

/// A helper that forks without pause (and ignores SIGTERM, as do its children) is stopped
/// entirely after the owner's death: the keeper chases new children until none is left.
#[tokio::test]
async fn a_helper_that_keeps_forking_is_stopped_entirely() {
    const FORKER: &str = r#"#!/bin/sh
dir=$(dirname "$0")
echo $$ > "$dir/service.pid"
sh -c 'trap "" TERM; echo $$ > "$1/forker.pid"; while :; do sleep 0.05 & done' sh "$dir" &
exec "$1" --name org.broker.Test
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    activatable_with(
        dir.path(),
        FORKER,
        &example_path("daemon_service"),
        Policy::Default,
    );
    let mut bus = start_bus_for(dir.path());
    let daemon = activate(&bus, "org.broker.Daemon", "/org/broker/Daemon").await;
    let forker = pid_file(dir.path(), "forker.pid");
    let script = pid_file(dir.path(), "service.pid");
    let _cleanup = KillOnFailure(vec![daemon, forker, script]);
    let (_, keeper) = processes_and_keeper(&bus).await;
    // Let it fork for a while first.
    std::thread::sleep(Duration::from_millis(200));
    kill(Pid::from_raw(daemon as i32), Signal::SIGKILL).expect("kill the owner");
    let limit = GRACE + Duration::from_secs(1);
    let left = gone_within(&[forker, keeper], limit);
    let log = bus.log();
    assert!(left.is_empty(), "{left:?} still there; log:\n{log}");
    // Nothing of the service's process group is left (its processes share the keeper's).
    assert_eq!(in_group_or_session(keeper), [0u32; 0], "log:\n{log}");
    assert!(bus.is_running(), "log:\n{log}");
}
