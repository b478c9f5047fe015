//! The system bus (issue 12): a service starts as the `User=` of its file, with the reference's
//! minimal environment, stays a descendant of broker and stops with it, while the bus itself
//! runs as its `<user>` without privilege. Runs as root (it switches users for real); any other
//! uid fails these tests rather than skipping them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{ALLOW_ALL, Broker, example_path, within, zbus_error_name};
use nix::unistd::{Gid, Uid, User};

/// The bus's `--stop-grace-ms`.
const GRACE: Duration = Duration::from_secs(1);

/// The bus's `<user>`. Not the services' `User=`: a service that merely inherited the bus's
/// uid must fail the tests. Both accounts are in every Debian system (base-passwd).
const BUS_USER: &str = "daemon";
const SERVICE_USER: &str = "nobody";

/// A system bus started as root with `<user>daemon</user>`, and its service directory.
struct SystemBus {
    broker: Broker,
    /// Holds the service files and the service's binary; readable by everyone.
    services: tempfile::TempDir,
}

/// The account `name`, which Debian always has.
fn user(name: &str) -> User {
    User::from_name(name)
        .unwrap_or_else(|e| panic!("look up {name}: {e}"))
        .unwrap_or_else(|| panic!("Debian has a user {name}"))
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Writes the service directory: the example service copied where every user can run it (the
/// build tree may be out of their reach), `org.broker.SystemEcho.service` with
/// `User=nobody`, `org.broker.RootEcho.service` with `User=root`,
/// `org.broker.NoUser.service` without `User=`, and `org.broker.Leaving.service` (`User=nobody`)
/// whose service leaves a helper behind. All are written before the bus starts, so no test waits
/// for the directory watch.
fn service_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o755);
    let program = dir.path().join("echo_service");
    std::fs::copy(example_path("echo_service"), &program).expect("copy the service");
    chmod(&program, 0o755);
    let program = program.display();
    let files = [
        (
            "org.broker.SystemEcho.service",
            format!(
                "[D-BUS Service]\nName=org.broker.SystemEcho\nExec={program} --name org.broker.SystemEcho\nUser={SERVICE_USER}\n"
            ),
        ),
        (
            "org.broker.RootEcho.service",
            format!(
                "[D-BUS Service]\nName=org.broker.RootEcho\nExec={program} --name org.broker.RootEcho\nUser=root\n"
            ),
        ),
        (
            "org.broker.NoUser.service",
            format!(
                "[D-BUS Service]\nName=org.broker.NoUser\nExec={program} --name org.broker.NoUser\n"
            ),
        ),
        // A helper that outlives the owner: `sh` starts it, then becomes the service.
        (
            "org.broker.Leaving.service",
            format!(
                "[D-BUS Service]\nName=org.broker.Leaving\nExec=/bin/sh -c '/bin/sleep 1000 & exec {program} --name org.broker.Leaving'\nUser={SERVICE_USER}\n"
            ),
        ),
    ];
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write a service file");
        chmod(&path, 0o644);
    }
    dir
}

fn start_system_bus() -> SystemBus {
    assert!(
        Uid::effective().is_root(),
        "the system bus tests must run as root: they check real changes of user"
    );
    let services = service_dir();
    let config = format!(
        "<busconfig>\n  <type>system</type>\n  <user>{BUS_USER}</user>\n  \
         <listen>unix:tmpdir=/tmp</listen>\n  <auth>EXTERNAL</auth>\n  \
         <policy context=\"default\">\n    <allow user=\"*\"/>{ALLOW_ALL}\n  </policy>\n  \
         <servicedir>{}</servicedir>\n</busconfig>\n",
        services.path().display()
    );
    let grace = format!("--stop-grace-ms={}", GRACE.as_millis());
    let broker = Broker::start_with_config_files(&config, &[], &[&grace]);
    // The socket is in the broker's private directory: a service as nobody must reach it.
    chmod(broker.dir.path(), 0o755);
    SystemBus { broker, services }
}

/// The value of `field` in /proc/PID/status.
fn proc_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The numbers of a status line (`Uid:`, `Gid:`, `Groups:`), sorted.
fn numbers(pid: u32, field: &str) -> Vec<u32> {
    let mut numbers: Vec<u32> = proc_field(pid, field)
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect();
    numbers.sort();
    numbers
}

/// The parent of `pid`, from /proc.
fn parent_of(pid: u32) -> u32 {
    proc_field(pid, "PPid").parse().expect("a pid")
}

/// Whether `pid` runs (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

async fn call_echo(connection: &zbus::Connection, name: &str) -> zbus::Result<String> {
    let proxy = zbus::Proxy::new(connection, name, "/org/broker/Echo", "org.broker.Echo").await?;
    proxy.call("Echo", &("hi",)).await
}

#[tokio::test]
async fn a_system_service_runs_as_its_user_with_the_minimal_environment() {
    let mut bus = start_system_bus();
    let connection = bus.broker.zbus().await;
    let echoed = within(
        "the activated call",
        call_echo(&connection, "org.broker.SystemEcho"),
    )
    .await;
    assert_eq!(
        echoed.expect("org.broker.SystemEcho starts and answers"),
        "hi"
    );
    let dbus = zbus::fdo::DBusProxy::new(&connection).await.unwrap();
    let name = zbus::names::BusName::try_from("org.broker.SystemEcho").unwrap();
    let pid = dbus
        .get_connection_unix_process_id(name)
        .await
        .expect("its pid");

    let nobody = user(SERVICE_USER);
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    assert_eq!(
        numbers(pid, "Uid"),
        [uid; 4],
        "real, effective, saved, fs uid"
    );
    assert_eq!(
        numbers(pid, "Gid"),
        [gid; 4],
        "real, effective, saved, fs gid"
    );
    let mut groups: Vec<u32> = nix::unistd::getgrouplist(c"nobody", Gid::from_raw(gid))
        .expect("nobody's groups")
        .iter()
        .map(|g| g.as_raw())
        .collect();
    groups.sort();
    assert_eq!(
        numbers(pid, "Groups"),
        groups,
        "nobody's groups, none of root's"
    );

    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("its environment");
    let mut environ: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    environ.sort();
    let address = &bus.broker.address;
    let mut want = vec![
        format!("DBUS_STARTER_ADDRESS={address}"),
        "DBUS_STARTER_BUS_TYPE=system".to_owned(),
        format!("DBUS_SYSTEM_BUS_ADDRESS={address}"),
    ];
    want.sort();
    assert_eq!(
        environ, want,
        "exactly where the bus is, nothing of the bus's environment"
    );

    let bus_pid = bus.broker.pid();
    let mut ancestor = pid;
    while ancestor != bus_pid && ancestor > 1 {
        ancestor = parent_of(ancestor);
    }
    assert_eq!(
        ancestor, bus_pid,
        "the service {pid} is a descendant of the bus"
    );

    let bus_uid = user(BUS_USER).uid.as_raw();
    assert_eq!(
        numbers(bus_pid, "Uid"),
        [bus_uid; 4],
        "the bus runs as its <user>"
    );
    assert_eq!(
        proc_field(bus_pid, "CapEff"),
        "0000000000000000",
        "the bus holds no capability"
    );

    let stopped = Instant::now();
    bus.broker.stop();
    let deadline = stopped + GRACE + Duration::from_secs(1);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the service {pid} outlived the bus by more than the grace period + 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_system_service_file_without_user_is_refused() {
    let bus = start_system_bus();
    let connection = bus.broker.zbus().await;
    let refused = within(
        "the refused call",
        call_echo(&connection, "org.broker.NoUser"),
    )
    .await;
    let e = refused.expect_err("a file without User= must not start");
    assert_eq!(
        zbus_error_name(&e),
        "org.freedesktop.DBus.Error.Spawn.FileInvalid",
        "{e}"
    );
    let file: PathBuf = bus.services.path().join("org.broker.NoUser.service");
    assert!(
        e.to_string().contains(&file.display().to_string()),
        "names the file: {e}"
    );
}

#[tokio::test]
async fn a_system_service_with_user_root_runs_as_root_under_an_unprivileged_bus() {
    let bus = start_system_bus();
    let connection = bus.broker.zbus().await;
    let echoed = within(
        "the activated call",
        call_echo(&connection, "org.broker.RootEcho"),
    )
    .await;
    assert_eq!(
        echoed.expect("org.broker.RootEcho starts and answers"),
        "hi"
    );
    let dbus = zbus::fdo::DBusProxy::new(&connection).await.unwrap();
    let name = zbus::names::BusName::try_from("org.broker.RootEcho").unwrap();
    let pid = dbus
        .get_connection_unix_process_id(name)
        .await
        .expect("its pid");
    assert_eq!(
        numbers(pid, "Uid"),
        [0; 4],
        "User=root, as UPower's and polkit's files say"
    );
    assert_eq!(numbers(pid, "Gid"), [0; 4]);
    let bus_uid = user(BUS_USER).uid.as_raw();
    assert_eq!(
        numbers(bus.broker.pid(), "Uid"),
        [bus_uid; 4],
        "while the bus is not root"
    );
}

/// The children of `pid` (processes whose parent it is), from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(child) = entry
            .expect("a /proc entry")
            .file_name()
            .to_string_lossy()
            .parse()
        else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{child}/status")).is_ok_and(|status| {
            status
                .lines()
                .any(|l| l.strip_prefix("PPid:").map(str::trim) == Some(&pid.to_string()))
        }) {
            found.push(child);
        }
    }
    found
}

#[tokio::test]
async fn a_system_service_whose_owner_is_killed_has_its_leftovers_stopped() {
    let bus = start_system_bus();
    let connection = bus.broker.zbus().await;
    let echoed = within(
        "the activated call",
        call_echo(&connection, "org.broker.Leaving"),
    )
    .await;
    assert_eq!(echoed.expect("org.broker.Leaving starts and answers"), "hi");
    let dbus = zbus::fdo::DBusProxy::new(&connection).await.unwrap();
    let name = zbus::names::BusName::try_from("org.broker.Leaving").unwrap();
    let owner = dbus
        .get_connection_unix_process_id(name)
        .await
        .expect("its pid");
    let helpers = children_of(owner);
    let [helper] = helpers[..] else {
        panic!("one helper below the owner {owner}, found {helpers:?}");
    };
    let nobody = user(SERVICE_USER).uid.as_raw();
    assert_eq!(
        numbers(helper, "Uid"),
        [nobody; 4],
        "the helper runs as nobody"
    );
    let keeper = parent_of(owner);
    assert_eq!(
        numbers(keeper, "Uid"),
        [0; 4],
        "the keeper stays root, to signal every process of the service"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(owner).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the owner");
    let killed = Instant::now();
    let deadline = killed + GRACE + Duration::from_secs(1);
    while alive(helper) {
        assert!(
            Instant::now() < deadline,
            "the helper {helper} outlived its owner by more than the grace period + 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    while alive(keeper) {
        assert!(
            Instant::now() < deadline,
            "the keeper {keeper} did not exit with the last process of its service"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(alive(bus.broker.pid()), "the bus runs on");
}
