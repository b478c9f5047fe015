//! The real broker driven by the command-line clients every machine has: `dbus-send`,
//! `dbus-monitor`, `gdbus`, `busctl` and the system python's `dbus` module.

mod common;

use std::io::Read;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

use common::{Broker, list_names, run_client, run_client_at, tool};
use zbus::Connection;
use zbus::fdo::DBusProxy;

/// The python that has the `dbus` module; the first one on PATH may not.
const PYTHON: &str = "/usr/bin/python3";

/// Runs a client without blocking the runtime that serves the zbus objects it may call.
async fn run(broker: &Broker, program: &str, args: &[&str]) -> (bool, String, String) {
    let address = broker.client_address();
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_client_at(&address, &program, &args)
    })
    .await
    .expect("client thread")
}

/// Runs a client that must succeed; returns its stdout.
async fn run_ok(broker: &Broker, program: &str, args: &[&str]) -> String {
    let (ok, out, err) = run(broker, program, args).await;
    assert!(ok, "{program} {args:?} failed:\n{out}{err}");
    out
}

/// Runs a client that must fail; returns its stderr.
fn run_err(broker: &Broker, program: &str, args: &[&str]) -> String {
    let (ok, out, err) = run_client(broker, program, args);
    assert!(
        !ok,
        "{program} {args:?} succeeded but should not have:\n{out}"
    );
    err
}

fn dbus_send_driver(method: &str, args: &[&str]) -> Vec<String> {
    let mut all = vec![
        "--session".to_owned(),
        "--print-reply".to_owned(),
        "--dest=org.freedesktop.DBus".to_owned(),
    ];
    all.push("/org/freedesktop/DBus".to_owned());
    all.push(format!("org.freedesktop.DBus.{method}"));
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all
}

fn gdbus_driver(method: &str, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = [
        "call",
        "--session",
        "--dest",
        "org.freedesktop.DBus",
        "--object-path",
        "/org/freedesktop/DBus",
        "--method",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    all.push(method.to_owned());
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Asserts a client succeeded and printed `needle`; returns its stdout.
fn assert_printed((ok, out, err): (bool, String, String), needle: &str, what: &str) -> String {
    assert!(
        ok && out.contains(needle),
        "{what}: expected {needle:?} in\n{out}{err}"
    );
    out
}

#[test]
fn dbus_send_gdbus_and_busctl_call_the_driver() {
    let broker = Broker::start();
    let address = format!("--address={}", broker.client_address());
    let guid = broker
        .address
        .rsplit_once("guid=")
        .expect("guid in address")
        .1;
    let uid = nix::unistd::getuid().as_raw();
    let send = |method: &str, args: &[&str]| {
        run_client(&broker, "dbus-send", &strs(&dbus_send_driver(method, args)))
    };
    let gdbus = |method: &str, args: &[&str]| {
        run_client(&broker, "gdbus", &strs(&gdbus_driver(method, args)))
    };
    let busctl =
        |args: &[&str]| run_client(&broker, "busctl", &[&[address.as_str()], args].concat());
    let driver = ["org.freedesktop.DBus", "/org/freedesktop/DBus"];

    assert_printed(send("GetId", &[]), &format!("string \"{guid}\""), "GetId");
    assert_printed(
        send("ListNames", &[]),
        "string \"org.freedesktop.DBus\"",
        "ListNames",
    );
    let by_name = ["string:org.freedesktop.DBus"];
    assert_printed(
        send("GetConnectionUnixUser", &by_name),
        &format!("uint32 {uid}"),
        "GetConnectionUnixUser",
    );
    let listed = gdbus("org.freedesktop.DBus.ListActivatableNames", &[]);
    assert_printed(listed, "'org.freedesktop.DBus'", "ListActivatableNames");
    let has = gdbus(
        "org.freedesktop.DBus.NameHasOwner",
        &["org.freedesktop.DBus"],
    );
    assert_printed(has, "(true,)", "NameHasOwner");
    let interfaces = gdbus(
        "org.freedesktop.DBus.Properties.Get",
        &["org.freedesktop.DBus", "Interfaces"],
    );
    assert_printed(
        interfaces,
        "'org.freedesktop.DBus.Monitoring'",
        "Get Interfaces",
    );

    let machine = busctl(
        &[
            &["call"],
            &driver[..],
            &["org.freedesktop.DBus.Peer", "GetMachineId"],
        ]
        .concat(),
    );
    let out = assert_printed(machine, "s \"", "GetMachineId");
    let id = out
        .trim()
        .strip_prefix("s \"")
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or_default();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "GetMachineId: {out}"
    );
    let ping = busctl(
        &[
            &["call"],
            &driver[..],
            &["org.freedesktop.DBus.Peer", "Ping"],
        ]
        .concat(),
    );
    assert_eq!(
        assert_printed(ping, "", "Ping").trim(),
        "",
        "Ping has no reply body"
    );
    let property = busctl(
        &[
            &["get-property"],
            &driver[..],
            &["org.freedesktop.DBus", "Interfaces"],
        ]
        .concat(),
    );
    assert_printed(
        property,
        "\"org.freedesktop.DBus.Monitoring\"",
        "get-property Interfaces",
    );
}

#[test]
fn command_line_clients_see_the_drivers_errors() {
    let broker = Broker::start();
    let send_err = |method: &str, args: &[&str]| {
        run_err(&broker, "dbus-send", &strs(&dbus_send_driver(method, args)))
    };
    let gdbus_err =
        |method: &str, args: &[&str]| run_err(&broker, "gdbus", &strs(&gdbus_driver(method, args)));

    let cases = [
        (
            send_err("NoSuchMethod", &[]),
            "org.freedesktop.DBus.Error.UnknownMethod",
        ),
        (
            send_err("GetNameOwner", &["uint32:7"]),
            "org.freedesktop.DBus.Error.InvalidArgs",
        ),
        (
            send_err("GetNameOwner", &["string:org.example.Nobody"]),
            "org.freedesktop.DBus.Error.NameHasNoOwner",
        ),
        (
            send_err(
                "StartServiceByName",
                &["string:org.example.NotInstalled", "uint32:0"],
            ),
            "org.freedesktop.DBus.Error.ServiceUnknown",
        ),
        (
            gdbus_err("org.example.NoSuchInterface.Method", &[]),
            "org.freedesktop.DBus.Error.UnknownInterface",
        ),
        (
            gdbus_err(
                "org.freedesktop.DBus.Properties.Set",
                &["org.freedesktop.DBus", "Features", "<@as []>"],
            ),
            "org.freedesktop.DBus.Error.PropertyReadOnly",
        ),
        (
            gdbus_err(
                "org.freedesktop.DBus.GetConnectionSELinuxSecurityContext",
                &["org.freedesktop.DBus"],
            ),
            "org.freedesktop.DBus.Error.SELinuxSecurityContextUnknown",
        ),
        (
            gdbus_err(
                "org.freedesktop.DBus.GetAdtAuditSessionData",
                &["org.freedesktop.DBus"],
            ),
            "org.freedesktop.DBus.Error.AdtAuditDataUnknown",
        ),
    ];
    for (stderr, expected) in cases {
        assert!(
            stderr.contains(expected),
            "expected {expected}, got {stderr}"
        );
    }
}

const PYTHON_NAMES: &str = r#"
import dbus, os
def connect():
    return dbus.bus.BusConnection(os.environ["DBUS_SESSION_BUS_ADDRESS"])
a, b, c = connect(), connect(), connect()
who = {a.get_unique_name(): "a", b.get_unique_name(): "b", c.get_unique_name(): "c"}
name = "org.example.Python"
def driver(method, sig, *args):
    return b.call_blocking("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", method, sig, args)
def show(label, reply):
    print(label, int(reply), [who[str(o)] for o in driver("ListQueuedOwners", "s", name)])
show("a allow-replacement", a.request_name(name, dbus.bus.NAME_FLAG_ALLOW_REPLACEMENT))
show("a again", a.request_name(name, dbus.bus.NAME_FLAG_ALLOW_REPLACEMENT))
show("b queues", b.request_name(name, 0))
show("c do-not-queue", c.request_name(name, dbus.bus.NAME_FLAG_DO_NOT_QUEUE))
show("c replaces", c.request_name(name, dbus.bus.NAME_FLAG_REPLACE_EXISTING))
show("a cannot replace", a.request_name(name, dbus.bus.NAME_FLAG_REPLACE_EXISTING))
show("b leaves the queue", b.request_name(name, dbus.bus.NAME_FLAG_REPLACE_EXISTING | dbus.bus.NAME_FLAG_DO_NOT_QUEUE))
show("b not owner", b.release_name(name))
show("c releases", c.release_name(name))
print("release unknown", int(c.release_name("org.example.Nobody")))
me = b.get_unique_name()
print("pid is mine", int(driver("GetConnectionUnixProcessID", "s", me)) == os.getpid())
print("uid is mine", int(driver("GetConnectionUnixUser", "s", me)) == os.getuid())
creds = driver("GetConnectionCredentials", "s", me)
print("credentials", int(creds["UnixUserID"]) == os.getuid(), int(creds["ProcessID"]) == os.getpid())
print("has owner", bool(driver("NameHasOwner", "s", name)), bool(driver("NameHasOwner", "s", me)))
"#;

#[test]
fn python_dbus_owns_names_and_reads_its_credentials() {
    let broker = Broker::start();
    let (ok, out, err) = run_client(&broker, PYTHON, &["-c", PYTHON_NAMES]);
    assert!(ok, "python failed:\n{out}{err}");
    let expected = "\
a allow-replacement 1 ['a']
a again 4 ['a']
b queues 2 ['a', 'b']
c do-not-queue 3 ['a', 'b']
c replaces 1 ['c', 'a', 'b']
a cannot replace 2 ['c', 'a', 'b']
b leaves the queue 3 ['c', 'a']
b not owner 3 ['c', 'a']
c releases 1 ['a']
release unknown 2
pid is mine True
uid is mine True
credentials True True
has owner True True
";
    assert_eq!(out, expected);
}

/// What the command-line clients call: replies computed from the arguments, and an error.
struct Echo;

/// An error of the service's own, so each client has to show its name as it came.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.example.Echo.Error")]
enum EchoError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Refused(String),
}

#[zbus::interface(name = "org.example.Echo")]
impl Echo {
    fn concat(&self, text: String, times: u8) -> String {
        text.repeat(usize::from(times))
    }

    fn refuse(&self) -> Result<(), EchoError> {
        Err(EchoError::Refused("refused on purpose".to_owned()))
    }
}

const SERVICE: &str = "org.example.Clients";
const OBJECT: &str = "/org/example/Echo";

/// A zbus connection that owns `name` and serves `Echo`.
async fn echo_service(broker: &Broker, name: &str) -> Connection {
    zbus::connection::Builder::address(broker.client_address().as_str())
        .serve_at(OBJECT, Echo)
        .name(name.to_owned())
        .build()
        .await
        .expect("service connects")
}

const PYTHON_CALL: &str = r#"
import dbus, os
bus = dbus.bus.BusConnection(os.environ["DBUS_SESSION_BUS_ADDRESS"])
echo = dbus.Interface(bus.get_object("org.example.Clients", "/org/example/Echo"), "org.example.Echo")
print(echo.Concat("py", dbus.Byte(2)))
try:
    echo.Refuse()
except dbus.DBusException as e:
    print(e.get_dbus_name(), e.get_dbus_message())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_call_a_zbus_service_and_get_its_replies() {
    let broker = Broker::start();
    let _service = echo_service(&broker, SERVICE).await;
    let address = format!("--address={}", broker.client_address());
    let gdbus = [
        "call",
        "--session",
        "--dest",
        SERVICE,
        "--object-path",
        OBJECT,
        "--method",
    ];

    let out = run_ok(
        &broker,
        "gdbus",
        &[&gdbus[..], &["org.example.Echo.Concat", "ab", "3"]].concat(),
    )
    .await;
    assert_eq!(out.trim(), "('ababab',)");
    let out = run_ok(
        &broker,
        "busctl",
        &[
            &address,
            "call",
            SERVICE,
            OBJECT,
            "org.example.Echo",
            "Concat",
            "sy",
            "bus",
            "2",
        ],
    )
    .await;
    assert_eq!(out.trim(), "s \"busbus\"");
    let send = [
        "--session",
        "--print-reply",
        &format!("--dest={SERVICE}"),
        OBJECT,
    ];
    let out = run_ok(
        &broker,
        "dbus-send",
        &[
            &send[..],
            &["org.example.Echo.Concat", "string:x", "byte:4"],
        ]
        .concat(),
    )
    .await;
    assert!(out.contains("string \"xxxx\""), "dbus-send: {out}");
    let out = run_ok(&broker, PYTHON, &["-c", PYTHON_CALL]).await;
    assert_eq!(
        out,
        "pypy\norg.example.Echo.Error.Refused refused on purpose\n"
    );

    // The service's own error reaches each client by name (busctl shows only its message).
    let busctl = [
        address.as_str(),
        "call",
        SERVICE,
        OBJECT,
        "org.example.Echo",
        "Refuse",
    ];
    let refusals = [
        (
            "dbus-send",
            [&send[..], &["org.example.Echo.Refuse"]].concat(),
            "Error org.example.Echo.Error.Refused: refused on purpose",
        ),
        (
            "gdbus",
            [&gdbus[..], &["org.example.Echo.Refuse"]].concat(),
            "org.example.Echo.Error.Refused: refused on purpose",
        ),
        ("busctl", busctl.to_vec(), "refused on purpose"),
    ];
    for (program, args, expected) in refusals {
        let (ok, _, err) = run(&broker, program, &args).await;
        assert!(!ok && err.contains(expected), "{program}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busctl_lists_names_and_introspects_the_driver() {
    let broker = Broker::start();
    let _service = echo_service(&broker, "org.example.Listed").await;
    let address = format!("--address={}", broker.client_address());

    let list = run_ok(&broker, "busctl", &[&address, "list", "--no-pager"]).await;
    let line = list
        .lines()
        .find(|l| l.starts_with("org.example.Listed "))
        .unwrap_or_else(|| panic!("busctl list: {list}"));
    let pid = line.split_whitespace().nth(1).unwrap_or_default();
    assert_eq!(
        pid,
        std::process::id().to_string(),
        "busctl list line {line:?}"
    );
    assert!(
        list.lines().any(|l| l.starts_with("org.freedesktop.DBus ")),
        "busctl list: {list}"
    );

    let tree = run_ok(
        &broker,
        "busctl",
        &[&address, "tree", "--no-pager", "org.freedesktop.DBus"],
    )
    .await;
    assert!(
        tree.lines()
            .any(|l| l.trim_start_matches(['└', '─', '├', '│', ' ']) == "/org/freedesktop/DBus"),
        "busctl tree: {tree}"
    );

    let methods = run_ok(
        &broker,
        "busctl",
        &[
            &address,
            "introspect",
            "--no-pager",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
        ],
    )
    .await;
    let row = |name: &str| {
        methods
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
    };
    assert_eq!(
        row(".RequestName"),
        Some(vec![".RequestName", "method", "su", "u", "-"]),
        "{methods}"
    );
    assert_eq!(
        row(".NameOwnerChanged"),
        Some(vec![".NameOwnerChanged", "signal", "sss", "-", "-"]),
        "{methods}"
    );
    assert!(
        row(".Features").is_some_and(|r| r.get(1..3) == Some(&["property", "as"][..])),
        "{methods}"
    );
    assert!(
        row("org.freedesktop.DBus.Monitoring").is_some(),
        "{methods}"
    );

    let service = run_ok(
        &broker,
        "busctl",
        &[
            &address,
            "introspect",
            "--no-pager",
            "org.example.Listed",
            OBJECT,
        ],
    )
    .await;
    assert!(
        service
            .lines()
            .any(|l| l.starts_with(".Concat ") && l.contains(" sy ")),
        "{service}"
    );
}

/// A long-running client (a monitor) whose output is collected as it comes.
struct Background {
    child: Child,
    output: Arc<Mutex<String>>,
    more: Arc<tokio::sync::Notify>,
}

impl Background {
    fn spawn(broker: &Broker, program: &str, args: &[&str]) -> Background {
        let mut child = tool(program)
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", broker.client_address())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let more = Arc::new(tokio::sync::Notify::new());
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout"));
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr"));
        for mut pipe in [stdout, stderr] {
            let (output, more) = (output.clone(), more.clone());
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    output
                        .lock()
                        .expect("output lock")
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                    more.notify_waiters();
                }
            });
        }
        Background {
            child,
            output,
            more,
        }
    }

    fn output(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }

    /// Waits until the output satisfies `seen`, and returns it.
    async fn wait_for(&self, what: &str, seen: impl Fn(&str) -> bool) -> String {
        let wait = async {
            loop {
                let more = self.more.notified();
                let output = self.output();
                if seen(&output) {
                    return output;
                }
                more.await;
            }
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), wait).await {
            Ok(output) => output,
            Err(_) => panic!("never saw {what}; output so far:\n{}", self.output()),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether some line holds every part of `first` and the line after it every part of `second`.
fn has_lines(output: &str, first: &[&str], second: &[&str]) -> bool {
    let lines: Vec<&str> = output.lines().collect();
    lines
        .windows(2)
        .any(|w| first.iter().all(|p| w[0].contains(p)) && second.iter().all(|p| w[1].contains(p)))
}

/// A caller's `Concat` call to `dest` and the serials of the call and of its reply.
async fn call_concat(caller: &Connection, dest: &str) -> (u32, u32) {
    let reply = caller
        .call_method(
            Some(dest),
            OBJECT,
            Some("org.example.Echo"),
            "Concat",
            &("m", 1u8),
        )
        .await
        .expect("Concat");
    let call_serial = reply.header().reply_serial().expect("reply serial").get();
    (call_serial, reply.primary_header().serial_num().get())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbus_monitor_sees_name_signals_calls_and_replies() {
    let broker = Broker::start();
    let caller = broker.zbus().await;
    let proxy = DBusProxy::new(&caller).await.expect("driver proxy");
    let monitor = Background::spawn(&broker, "dbus-monitor", &["--session"]);
    // Once a monitor, dbus-monitor is told it lost its unique name.
    let out = monitor
        .wait_for("the monitor's NameLost", |o| {
            o.lines().any(|l| l.contains("member=NameLost"))
        })
        .await;
    let lost = out
        .lines()
        .find(|l| l.contains("member=NameLost"))
        .unwrap_or_default();
    let me = lost
        .split_whitespace()
        .find_map(|w| w.strip_prefix("destination="))
        .expect("NameLost has a destination");
    assert!(me.starts_with(":1."), "{lost}");
    assert!(
        !list_names(&proxy).await.iter().any(|n| n == me),
        "the monitor {me} is still listed"
    );

    let name = "org.example.Watched";
    let service = echo_service(&broker, name).await;
    let service_name = service.unique_name().expect("unique name").to_string();
    let name_arg = format!("string \"{name}\"");
    monitor
        .wait_for("NameOwnerChanged and NameAcquired", |o| {
            has_lines(
                o,
                &["sender=org.freedesktop.DBus", "member=NameOwnerChanged"],
                &[&name_arg],
            ) && has_lines(
                o,
                &[
                    &format!("destination={service_name} "),
                    "member=NameAcquired",
                ],
                &[&name_arg],
            )
        })
        .await;

    let caller_name = caller.unique_name().expect("unique name").to_string();
    let (call, reply) = call_concat(&caller, name).await;
    let call_line = format!(
        "sender={caller_name} -> destination={name} serial={call} path={OBJECT}; interface=org.example.Echo; member=Concat"
    );
    let reply_line = format!(
        "sender={service_name} -> destination={caller_name} serial={reply} reply_serial={call}"
    );
    monitor
        .wait_for("the call and its reply", |o| {
            has_lines(o, &["method call", &call_line], &["string \"m\""])
                && has_lines(o, &["method return", &reply_line], &["string \"m\""])
        })
        .await;

    service.release_name(name).await.expect("ReleaseName");
    monitor
        .wait_for("NameLost", |o| {
            has_lines(
                o,
                &[&format!("destination={service_name} "), "member=NameLost"],
                &[&name_arg],
            )
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busctl_monitor_of_a_name_sees_its_call_and_reply_only() {
    let broker = Broker::start();
    let service = echo_service(&broker, SERVICE).await;
    let caller = broker.zbus().await;
    let proxy = DBusProxy::new(&caller).await.expect("driver proxy");
    let before = list_names(&proxy).await;
    let address = format!("--address={}", broker.client_address());
    // Watching one well-known name: rules with sender= and destination= that name.
    let monitor = Background::spawn(&broker, "busctl", &[&address, "monitor", SERVICE]);
    monitor
        .wait_for("busctl monitoring", |o| {
            o.contains("Monitoring bus message stream.")
        })
        .await;
    assert_eq!(
        list_names(&proxy).await,
        before,
        "the monitor's unique name must not be listed"
    );

    let (call, reply) = call_concat(&caller, SERVICE).await;
    let caller_name = caller.unique_name().expect("unique name").to_string();
    let service_name = service.unique_name().expect("unique name").to_string();
    let call_header = format!(
        "Sender={caller_name}  Destination={SERVICE}  Path={OBJECT}  Interface=org.example.Echo  Member=Concat"
    );
    let reply_header = format!("Sender={service_name}  Destination={caller_name}");
    let out = monitor
        .wait_for("the call and its reply", |o| {
            has_lines(
                o,
                &["Type=method_call", &format!("Cookie={call} ")],
                &[&call_header],
            ) && has_lines(
                o,
                &[
                    "Type=method_return",
                    &format!("Cookie={reply} "),
                    &format!("ReplyCookie={call} "),
                ],
                &[&reply_header],
            )
        })
        .await;
    // The caller's ListNames went to the driver before the call: no rule of the monitor matched it.
    assert!(!out.contains("Member=ListNames"), "{out}");
}
