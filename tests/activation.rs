//! On-demand activation with real processes and the real binary: the activation files, starts
//! triggered by calls and by `StartServiceByName`, the ways a start fails, the started service's
//! environment, the broker as subreaper, what happens when a service's process dies, and
//! reloading. (The start timeouts and the start-limit guard are tested in virtual time, in
//! `tests/in_process.rs`.)
//!
//! The services are the examples of `examples/` (run `cargo build --examples` first; plain
//! `cargo test` builds them), `/bin/sh` one-liners, and one `python3` service. Each test runs its
//! own broker, with the standard session directories pointed at empty ones.

mod common;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{Broker, RawClient, error_name, member_of, run_client};
use serde::Serialize;
use zbus::Message;
use zbus::message::Flags;
use zbus::zvariant::DynamicType;

const ECHO_PATH: &str = "/org/broker/Echo";
const ECHO_IFACE: &str = "org.broker.Echo";

/// The global start timeout of the brokers whose starts must fail fast: far longer than any
/// prompt failure takes, so one that arrives well before it did not wait for it.
const LONG_START_TIMEOUT: &str = "--start-timeout-ms=20000";
/// "Well before the start timeout": half of it.
const WELL_BEFORE_TIMEOUT: Duration = Duration::from_secs(10);

/// A shell script (argument 1: a file) that waits until the file exists, then runs the rest of
/// its arguments in its place, or exits 0 if there are none. It holds a start in progress for
/// as long as a test needs, and gives up once the test's directory is gone, so that no test
/// leaves it behind.
const GATE_SCRIPT: &str = r#"while [ ! -e "$1" ]; do [ -d "${1%/*}" ] || exit 1; sleep 0.02; done; shift; [ $# -eq 0 ] || exec "$@""#;

// ---------------------------------------------------------------------------
// Setting up a broker with activation files.

/// The built example `name`, as a path string for activation files.
fn example(name: &str) -> String {
    common::example_path(name).display().to_string()
}

/// A fresh directory with an activation directory in it, filled before the broker starts.
struct Files {
    root: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let files = Files {
            root: tempfile::tempdir().expect("tempdir"),
        };
        std::fs::create_dir(files.dir()).expect("activation dir");
        files
    }

    /// The activation directory the broker is always given.
    fn dir(&self) -> PathBuf {
        self.root.path().join("activation")
    }

    /// Another path under the root (not created).
    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Writes `file` in the activation directory.
    fn write(&self, file: &str, text: &str) {
        write_file(&self.dir().join(file), text);
    }

    /// Writes a TOML activation file for `name` running `exec`, with `extra` lines.
    fn toml(&self, file: &str, name: &str, exec: &[&str], extra: &str) {
        self.write(file, &toml_text(name, exec, extra));
    }

    /// An activation file for `echo_service` owning `name`.
    fn echo(&self, file: &str, name: &str) {
        self.toml(file, name, &[&example("echo_service"), "--name", name], "");
    }

    /// Starts the broker on the activation directory, with more arguments and environment.
    fn start_with(self, extra: &[&str], env: &[(&str, &str)]) -> Bus {
        let empty = |sub: &str| {
            let dir = self.path(sub);
            std::fs::create_dir_all(&dir).expect("empty dir");
            dir.display().to_string()
        };
        let (runtime, data_home, data_dirs) = (empty("runtime"), empty("home"), empty("data"));
        let mut env_all: Vec<(&str, &str)> = vec![
            ("XDG_RUNTIME_DIR", &runtime),
            ("XDG_DATA_HOME", &data_home),
            ("XDG_DATA_DIRS", &data_dirs),
        ];
        env_all.extend_from_slice(env);
        let dir = self.dir().display().to_string();
        let mut args = vec!["--activation-dir", dir.as_str()];
        args.extend_from_slice(extra);
        let broker = Broker::start_with_env(&args, &env_all);
        Bus {
            broker,
            files: self,
        }
    }

    fn start(self) -> Bus {
        self.start_with(&[], &[])
    }
}

fn toml_text(name: &str, exec: &[&str], extra: &str) -> String {
    let quoted: Vec<String> = exec.iter().map(|arg| format!("{arg:?}")).collect();
    format!("name = {name:?}\nexec = [{}]\n{extra}\n", quoted.join(", "))
}

fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A running broker and its files.
struct Bus {
    broker: Broker,
    files: Files,
}

impl Bus {
    fn client(&self) -> RawClient {
        RawClient::connect(&self.broker.socket)
    }

    /// The pids the broker logged spawning for `name`, in order.
    fn spawned(&self, name: &str) -> Vec<u32> {
        let needle = format!("service process started service={name} pid=");
        self.broker
            .log()
            .lines()
            .filter_map(|line| line.split_once(&needle))
            .map(|(_, rest)| leading_number(rest))
            .collect()
    }

    /// Waits until the broker logs that `pid` ended with `status` (its log's wording).
    fn wait_for_end(&self, pid: u32, status: &str) -> String {
        self.broker
            .wait_for_log(&format!("pid={pid} status={status}"))
    }
}

fn leading_number(text: &str) -> u32 {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number at {text:?}"))
}

// ---------------------------------------------------------------------------
// Talking to the bus and the services.

/// Sends a method call to `dest` without waiting; returns its serial.
fn send_call<B>(
    c: &mut RawClient,
    dest: &str,
    (path, iface, member): (&str, &str, &str),
    body: &B,
    flags: Flags,
) -> NonZeroU32
where
    B: Serialize + DynamicType,
{
    let serial = c.next_serial();
    let call = Message::method_call(path, member)
        .interface(iface)
        .destination(dest)
        .with_flags(flags)
        .serial(serial)
        .build(body)
        .expect("build call");
    c.send(&call);
    serial
}

/// Sends a call to the bus driver without waiting; returns its serial.
fn send_driver_call<B>(c: &mut RawClient, member: &str, body: &B) -> NonZeroU32
where
    B: Serialize + DynamicType,
{
    let driver = "org.freedesktop.DBus";
    let method = ("/org/freedesktop/DBus", driver, member);
    send_call(c, driver, method, body, Flags::empty())
}

/// Calls `member` of the echo interface on `dest`.
fn call_echo_iface<B>(
    c: &mut RawClient,
    dest: &str,
    member: &str,
    body: &B,
) -> Result<Message, Message>
where
    B: Serialize + DynamicType,
{
    let serial = send_call(
        c,
        dest,
        (ECHO_PATH, ECHO_IFACE, member),
        body,
        Flags::empty(),
    );
    c.reply_to(serial)
}

/// `Echo(text)` on `dest`; `Err` holds "error name: text".
fn echo(c: &mut RawClient, dest: &str, text: &str) -> Result<String, String> {
    call_echo_iface(c, dest, "Echo", &(text,))
        .map(|reply| reply.body().deserialize().expect("Echo reply"))
        .map_err(|e| describe_error(&e))
}

/// The pid a service reports through `Pid()` on `path`/`iface`.
fn service_pid(c: &mut RawClient, dest: &str, path: &str, iface: &str) -> u32 {
    let serial = send_call(c, dest, (path, iface, "Pid"), &(), Flags::empty());
    let reply = c
        .reply_to(serial)
        .unwrap_or_else(|e| panic!("Pid of {dest}: {}", describe_error(&e)));
    reply.body().deserialize().expect("Pid reply")
}

fn echo_pid(c: &mut RawClient, dest: &str) -> u32 {
    service_pid(c, dest, ECHO_PATH, ECHO_IFACE)
}

fn describe_error(msg: &Message) -> String {
    format!("{}: {}", error_name(msg), error_text(msg))
}

fn error_text(msg: &Message) -> String {
    msg.body().deserialize::<String>().unwrap_or_default()
}

/// `StartServiceByName(name, 0)`: its result, or the error.
fn start_service(c: &mut RawClient, name: &str) -> Result<u32, Message> {
    c.driver_call("StartServiceByName", &(name, 0u32))
        .map(|reply| {
            reply
                .body()
                .deserialize()
                .expect("StartServiceByName reply")
        })
}

fn list_activatable(c: &mut RawClient) -> Vec<String> {
    let reply = c
        .driver_call("ListActivatableNames", &())
        .expect("ListActivatableNames");
    reply.body().deserialize().expect("names")
}

/// A round trip to the driver: the broker has handled everything `c` sent before.
fn sync(c: &mut RawClient) {
    c.driver_call("GetId", &()).expect("GetId");
}

fn add_match(c: &mut RawClient, rule: &str) {
    c.driver_call("AddMatch", &(rule,)).expect("AddMatch");
}

/// Subscribes `c` to the `NameOwnerChanged` signals of `name`.
fn watch_owner(c: &mut RawClient, name: &str) {
    add_match(
        c,
        &format!(
            "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{name}'"
        ),
    );
}

/// Waits for the next `NameOwnerChanged` of `name` and returns its new owner ("" if none).
fn next_owner(c: &mut RawClient, name: &str) -> String {
    let signal = c.recv_until(|m| {
        member_of(m) == "NameOwnerChanged"
            && m.body()
                .deserialize::<(String, String, String)>()
                .is_ok_and(|(n, _, _)| n == name)
    });
    let (_, _, new_owner): (String, String, String) =
        signal.body().deserialize().expect("NameOwnerChanged args");
    new_owner
}

/// Subscribes `c` to `ActivatableServicesChanged`.
fn watch_activatable(c: &mut RawClient) {
    add_match(
        c,
        "type='signal',sender='org.freedesktop.DBus',member='ActivatableServicesChanged'",
    );
}

fn wait_activatable_changed(c: &mut RawClient) {
    c.recv_until(|m| member_of(m) == "ActivatableServicesChanged");
}

/// Polls `ListActivatableNames` until it includes `name`, failing after ten seconds.
fn wait_listed(c: &mut RawClient, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !list_activatable(c).iter().any(|n| n == name) {
        assert!(Instant::now() < deadline, "{name} never became activatable");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = stat.rsplit_once(')').expect("comm").1;
    after_comm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ppid")
}

fn kill(pid: u32, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, signal).expect("kill");
}

fn names_with_prefix(names: &[String], prefix: &str) -> Vec<String> {
    let mut ours: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with(prefix))
        .cloned()
        .collect();
    ours.sort();
    ours
}

// ---------------------------------------------------------------------------
// Activation files.

#[test]
fn activatable_names_come_from_toml_and_service_files_and_broken_files_are_skipped() {
    let files = Files::new();
    let echo_bin = example("echo_service");
    files.echo("a.toml", "org.test.list.Toml");
    files.write(
        "b.service",
        &format!(
            // `\s` is the desktop-entry escape of a space; the quotes are the shell's.
            "[D-BUS Service]\nName=org.test.list.Service\nExec={echo_bin}\\s--name 'org.test.list.Service'\n"
        ),
    );
    // Each broken in one way; the line of the problem, where one can be named.
    let broken = [
        (
            "syntax.toml",
            "name = \"org.test.list.Syntax\"\nexec = [\n",
            Some(2),
            "unclosed",
        ),
        (
            "missing.toml",
            "name = \"org.test.list.Missing\"\n",
            None,
            "exec",
        ),
        (
            "unknown.toml",
            "name = \"org.test.list.Unknown\"\nexec = [\"/bin/true\"]\ncolour = \"red\"\n",
            Some(3),
            "colour",
        ),
        (
            "quoting.service",
            "[D-BUS Service]\nName=org.test.list.Quoting\nExec=/bin/echo \"unterminated\n",
            Some(3),
            "quote",
        ),
    ];
    for (file, text, _, _) in &broken {
        files.write(file, text);
    }
    // A second directory: its definition of a name already defined loses; its own name loads.
    let second = files.path("second");
    std::fs::create_dir(&second).expect("second dir");
    write_file(
        &second.join("a.toml"),
        &toml_text(
            "org.test.list.Toml",
            &["/nonexistent/second-definition"],
            "",
        ),
    );
    write_file(
        &second.join("c.toml"),
        &toml_text(
            "org.test.list.Second",
            &[&echo_bin, "--name", "org.test.list.Second"],
            "",
        ),
    );
    let second_arg = format!("--activation-dir={}", second.display());
    let bus = files.start_with(&[&second_arg], &[]);
    let mut c = bus.client();

    let names = list_activatable(&mut c);
    assert!(
        names.iter().any(|n| n == "org.freedesktop.DBus"),
        "{names:?}"
    );
    assert_eq!(
        names_with_prefix(&names, "org.test.list."),
        [
            "org.test.list.Second",
            "org.test.list.Service",
            "org.test.list.Toml"
        ]
    );

    let log = bus.broker.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&*bus.files.root.path().to_string_lossy()))
        .collect();
    assert_eq!(warnings.len(), broken.len(), "{warnings:#?}");
    for (file, _, line, problem) in &broken {
        let path = bus.files.dir().join(file).display().to_string();
        let about: Vec<&&str> = warnings.iter().filter(|w| w.contains(&path)).collect();
        assert_eq!(about.len(), 1, "one warning for {file}: {warnings:#?}");
        let warning = about[0];
        if let Some(line) = line {
            assert!(warning.contains(&format!("{path}:{line}:")), "{warning}");
        }
        assert!(warning.to_lowercase().contains(problem), "{warning}");
    }

    // Each loaded name starts; the first definition of a name is the one used.
    for name in [
        "org.test.list.Toml",
        "org.test.list.Service",
        "org.test.list.Second",
    ] {
        let started = start_service(&mut c, name);
        assert_eq!(started.map_err(|e| describe_error(&e)), Ok(1), "{name}");
        assert_eq!(echo(&mut c, name, name), Ok(name.to_owned()));
    }
}

// ---------------------------------------------------------------------------
// Starting.

#[test]
fn start_service_by_name_replies_1_once_owned_then_2_and_logs_the_service_output() {
    let files = Files::new();
    let name = "org.test.start.Echo";
    files.echo("echo.toml", name);
    let bus = files.start();
    let mut c = bus.client();

    assert_eq!(
        start_service(&mut c, name).map_err(|e| describe_error(&e)),
        Ok(1)
    );
    // Already owned when the reply came.
    let owned = c
        .driver_call("NameHasOwner", &(name,))
        .expect("NameHasOwner");
    assert!(owned.body().deserialize::<bool>().expect("bool"));
    assert_eq!(
        start_service(&mut c, name).map_err(|e| describe_error(&e)),
        Ok(2)
    );

    // The owner is the process the broker spawned, once.
    let spawned = bus.spawned(name);
    assert_eq!(spawned.len(), 1, "{spawned:?}");
    let reported = echo_pid(&mut c, name);
    assert_eq!(reported, spawned[0]);
    let owner_pid = c
        .driver_call("GetConnectionUnixProcessID", &(name,))
        .expect("owner pid");
    assert_eq!(
        owner_pid.body().deserialize::<u32>().expect("u32"),
        reported
    );

    // What the service printed is in the broker's log, tagged with the service name.
    let log = bus
        .broker
        .wait_for_log(&format!("echo_service: owns {name}"));
    let line = log
        .lines()
        .find(|l| l.contains(&format!("echo_service: owns {name}")))
        .expect("line");
    assert!(line.contains(&format!("service={name}")), "{line}");
    assert!(line.contains("stdout"), "{line}");
}

#[test]
fn a_call_starts_the_service_and_gets_its_reply_unless_no_auto_start() {
    let files = Files::new();
    let name = "org.test.auto.Echo";
    files.echo("echo.toml", name);
    let bus = files.start();
    let mut c = bus.client();

    let serial = send_call(
        &mut c,
        name,
        (ECHO_PATH, ECHO_IFACE, "Echo"),
        &("not started",),
        Flags::NO_AUTO_START,
    );
    let refused = c.reply_to(serial).expect_err("NO_AUTO_START call answered");
    assert_eq!(
        error_name(&refused),
        "org.freedesktop.DBus.Error.NameHasNoOwner"
    );
    assert_eq!(bus.spawned(name), []);

    let (ok, out, err) = run_client(
        &bus.broker,
        "dbus-send",
        &[
            "--print-reply",
            &format!("--dest={name}"),
            ECHO_PATH,
            "org.broker.Echo.Echo",
            "string:hello from dbus-send",
        ],
    );
    assert!(ok, "dbus-send failed: {err}");
    assert!(out.contains("hello from dbus-send"), "{out}");
    assert_eq!(bus.spawned(name).len(), 1);
}

#[test]
fn messages_queued_while_starting_reach_the_new_owner_in_order() {
    let files = Files::new();
    let name = "org.test.order.Queue";
    let gate = files.path("gate");
    // The started process never takes the name: the test's own connection does.
    let gate_arg = gate.display().to_string();
    files.toml(
        "queue.toml",
        name,
        &["/bin/sh", "-c", GATE_SCRIPT, "gate", &gate_arg],
        "",
    );
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let mut a = bus.client();
    let mut b = bus.client();

    // Interleaved from two senders; each batch handled by the broker before the next is sent.
    let mut sent = Vec::new();
    for (range, use_a) in [(0..5, true), (5..10, false), (10..15, true)] {
        let client = if use_a { &mut a } else { &mut b };
        for i in range {
            let serial = send_call(
                client,
                name,
                (ECHO_PATH, ECHO_IFACE, "Echo"),
                &(format!("message {i}"),),
                Flags::empty(),
            );
            sent.push((client.unique.clone(), serial, format!("message {i}")));
        }
        sync(client);
    }
    assert_eq!(bus.spawned(name).len(), 1);

    let mut owner = bus.client();
    let serial = send_driver_call(&mut owner, "RequestName", &(name, 0u32));
    // The held calls may come before or after the reply to RequestName.
    let mut received = Vec::new();
    let mut replied = false;
    while !replied || received.len() < sent.len() {
        let msg = owner.recv();
        if msg.header().reply_serial() == Some(serial) {
            assert_eq!(msg.body().deserialize::<u32>().expect("u32"), 1);
            replied = true;
        } else if member_of(&msg) == "Echo" {
            received.push(msg);
        }
    }
    let got: Vec<(String, NonZeroU32, String)> = received
        .iter()
        .map(|m| {
            let header = m.header();
            let sender = header.sender().expect("sender").to_string();
            (
                sender,
                header.primary().serial_num(),
                m.body().deserialize().expect("s"),
            )
        })
        .collect();
    assert_eq!(got, sent);

    // Answered by the owner, each caller gets its replies.
    for call in &received {
        let text: String = call.body().deserialize().expect("s");
        let reply = Message::method_return(&call.header())
            .serial(owner.next_serial())
            .build(&(text,))
            .expect("reply");
        owner.send(&reply);
    }
    for (sender, serial, text) in sent {
        let client = if sender == a.unique { &mut a } else { &mut b };
        let reply = client.reply_to(serial).expect("reply");
        assert_eq!(reply.body().deserialize::<String>().expect("s"), text);
    }
    write_file(&gate, "");
}

#[test]
fn many_racing_callers_cause_one_spawn() {
    const CALLERS: usize = 20;
    let files = Files::new();
    let name = "org.test.race.Echo";
    files.echo("echo.toml", name);
    let bus = files.start();

    let barrier = Arc::new(Barrier::new(CALLERS));
    let threads: Vec<_> = (0..CALLERS)
        .map(|i| {
            let mut c = bus.client();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                // Every fourth caller asks the driver; the others call the service.
                if i % 4 == 0 {
                    let result = start_service(&mut c, name);
                    let result = result.map_err(|e| describe_error(&e)).expect("started");
                    assert!(result == 1 || result == 2, "StartServiceByName {result}");
                }
                echo_pid(&mut c, name)
            })
        })
        .collect();
    let pids: Vec<u32> = threads
        .into_iter()
        .map(|t| t.join().expect("caller thread"))
        .collect();

    let spawned = bus.spawned(name);
    assert_eq!(spawned.len(), 1, "{spawned:?}");
    assert!(
        pids.iter().all(|&pid| pid == spawned[0]),
        "{pids:?} vs {spawned:?}"
    );
}

// ---------------------------------------------------------------------------
// Failed starts.

/// Starts `name` with a method call, then again with `StartServiceByName`; returns the error the
/// call got (the other must get the same) and how long the call took.
fn failed_start(bus: &Bus, name: &str) -> (String, String, Duration) {
    let mut caller = bus.client();
    let mut starter = bus.client();
    let began = Instant::now();
    let serial = send_call(
        &mut caller,
        name,
        (ECHO_PATH, ECHO_IFACE, "Echo"),
        &("x",),
        Flags::empty(),
    );
    let by_call = caller.reply_to(serial).expect_err("the call succeeded");
    let took = began.elapsed();
    let by_start = start_service(&mut starter, name).expect_err("StartServiceByName succeeded");
    assert_eq!(error_name(&by_start), error_name(&by_call));
    (error_name(&by_call), error_text(&by_call), took)
}

#[test]
fn a_missing_program_fails_at_once_with_exec_failed_and_the_os_error() {
    let files = Files::new();
    let name = "org.test.fail.Missing";
    files.toml("missing.toml", name, &["/nonexistent/dir/program"], "");
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let (error, text, took) = failed_start(&bus, name);
    assert_eq!(error, "org.freedesktop.DBus.Error.Spawn.ExecFailed");
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(took < WELL_BEFORE_TIMEOUT, "{took:?}");
}

#[test]
fn a_service_exiting_before_taking_its_name_fails_every_waiting_caller_with_child_exited() {
    let files = Files::new();
    let name = "org.test.fail.Exit";
    let gate = files.path("gate");
    let (gate_arg, daemon) = (gate.display().to_string(), example("daemon_service"));
    files.toml(
        "exit.toml",
        name,
        &[
            "/bin/sh",
            "-c",
            GATE_SCRIPT,
            "gate",
            &gate_arg,
            &daemon,
            "--exit-code",
            "3",
        ],
        "",
    );
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);

    // Three callers wait on one start: two calls and a StartServiceByName.
    let mut a = bus.client();
    let mut b = bus.client();
    let echo_call = (ECHO_PATH, ECHO_IFACE, "Echo");
    let first = send_call(&mut a, name, echo_call, &("1",), Flags::empty());
    let second = send_call(&mut a, name, echo_call, &("2",), Flags::empty());
    sync(&mut a);
    let start = send_driver_call(&mut b, "StartServiceByName", &(name, 0u32));
    sync(&mut b);

    let opened = Instant::now();
    write_file(&gate, "");
    for (use_a, serial) in [(true, first), (true, second), (false, start)] {
        let client = if use_a { &mut a } else { &mut b };
        let err = client
            .reply_to(serial)
            .expect_err("a start that failed succeeded");
        assert_eq!(
            error_name(&err),
            "org.freedesktop.DBus.Error.Spawn.ChildExited"
        );
        assert!(
            error_text(&err).contains("exited with status 3"),
            "{}",
            error_text(&err)
        );
    }
    assert!(
        opened.elapsed() < WELL_BEFORE_TIMEOUT,
        "{:?}",
        opened.elapsed()
    );
    assert_eq!(bus.spawned(name).len(), 1);
}

#[test]
fn a_service_killed_by_a_signal_before_taking_its_name_fails_with_child_signaled() {
    let files = Files::new();
    let name = "org.test.fail.Signal";
    files.toml("signal.toml", name, &["/bin/sh", "-c", "kill -9 $$"], "");
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let (error, text, took) = failed_start(&bus, name);
    assert_eq!(error, "org.freedesktop.DBus.Error.Spawn.ChildSignaled");
    assert!(text.contains('9'), "{text}");
    assert!(took < WELL_BEFORE_TIMEOUT, "{took:?}");
}

#[test]
fn a_daemonized_service_whose_daemon_dies_before_taking_its_name_fails_fast() {
    let files = Files::new();
    let name = "org.test.fail.Daemon";
    files.toml(
        "daemon.toml",
        name,
        &[
            &example("daemon_service"),
            "--die-before-name",
            "--name",
            name,
        ],
        "",
    );
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let (error, text, took) = failed_start(&bus, name);
    assert_eq!(
        error, "org.freedesktop.DBus.Error.Spawn.ChildExited",
        "{text}"
    );
    assert!(took < WELL_BEFORE_TIMEOUT, "{took:?}");
}

// ---------------------------------------------------------------------------
// The started process.

/// The environment of a live process, from `/proc/PID/environ`.
fn environment_of(pid: u32) -> HashMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    raw.split(|&b| b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (k, v) = entry.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

#[test]
fn the_service_environment_has_the_updates_the_file_and_the_bus_but_not_the_service_manager() {
    let files = Files::new();
    let name = "org.test.env.Echo";
    std::fs::create_dir(files.dir().join("work")).expect("work dir");
    files.toml(
        "env.toml",
        name,
        &[&example("echo_service"), "--name", name],
        "working_directory = \"work\"\nenvironment = { FROM_FILE = \"file\", SET_TWICE = \"file\" }",
    );
    let dropped = [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "JOURNAL_STREAM",
        "INVOCATION_ID",
    ];
    let mut env: Vec<(&str, &str)> = dropped.iter().map(|k| (*k, "from-the-broker")).collect();
    env.extend([("KEPT", "broker"), ("UPDATED", "broker")]);
    let bus = files.start_with(&[], &env);
    let mut c = bus.client();

    let updates: HashMap<&str, &str> = HashMap::from([
        ("UPDATED", "update"),
        ("NEW", "update"),
        ("SET_TWICE", "update"),
    ]);
    c.driver_call("UpdateActivationEnvironment", &(updates,))
        .expect("UpdateActivationEnvironment");
    let pid = echo_pid(&mut c, name);
    let env = environment_of(pid);
    let var = |k: &str| env.get(k).map(String::as_str);

    assert_eq!(var("KEPT"), Some("broker"));
    assert_eq!(var("UPDATED"), Some("update"));
    assert_eq!(var("NEW"), Some("update"));
    assert_eq!(var("FROM_FILE"), Some("file"));
    assert_eq!(
        var("SET_TWICE"),
        Some("file"),
        "the file's environment comes last"
    );
    // The address the bus printed, with its guid=, as dbus-daemon gives it.
    let address = &bus.broker.address;
    assert_eq!(var("DBUS_STARTER_ADDRESS"), Some(address.as_str()));
    assert_eq!(var("DBUS_SESSION_BUS_ADDRESS"), Some(address.as_str()));
    assert_eq!(var("DBUS_STARTER_BUS_TYPE"), Some("session"));
    for k in dropped {
        assert_eq!(var(k), None, "{k} leaked into the service");
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
    let work = bus.files.dir().join("work").canonicalize().expect("work");
    assert_eq!(cwd, work);
}

#[test]
fn a_daemonized_service_is_the_brokers_child_and_reaped_by_it() {
    let files = Files::new();
    let name = "org.test.reaper.Daemon";
    files.toml(
        "daemon.toml",
        name,
        &[&example("daemon_service"), "--name", name],
        "",
    );
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let mut c = bus.client();
    let mut watcher = bus.client();
    watch_owner(&mut watcher, name);

    assert_eq!(
        start_service(&mut c, name).map_err(|e| describe_error(&e)),
        Ok(1)
    );
    assert!(next_owner(&mut watcher, name).starts_with(':'));
    let daemon = service_pid(&mut c, name, "/org/broker/Daemon", "org.broker.Daemon");
    let [launcher] = bus.spawned(name)[..] else {
        panic!("not one spawn: {:?}", bus.spawned(name));
    };
    assert_ne!(daemon, launcher, "the service did not daemonize");
    let serial = send_call(
        &mut c,
        name,
        ("/org/broker/Daemon", "org.broker.Daemon", "Ppid"),
        &(),
        Flags::empty(),
    );
    let ppid: u32 = c
        .reply_to(serial)
        .expect("Ppid")
        .body()
        .deserialize()
        .expect("u32");
    // Adopted by the keeper of its start (a subreaper), which runs under the bus's spawner.
    assert_eq!(parent_of(daemon), ppid);
    assert_eq!(
        common::ancestors(ppid).get(1),
        Some(&bus.broker.pid()),
        "keeper -> spawner -> bus"
    );
    let owner_pid = c
        .driver_call("GetConnectionUnixProcessID", &(name,))
        .expect("owner pid");
    assert_eq!(owner_pid.body().deserialize::<u32>().expect("u32"), daemon);
    bus.wait_for_end(launcher, "exited with status 0");

    // Its death frees the name, and the broker reaps it: no zombie is left.
    kill(daemon, nix::sys::signal::Signal::SIGKILL);
    assert_eq!(next_owner(&mut watcher, name), "");
    bus.wait_for_end(daemon, "killed by signal 9");
}

/// A shell script (arguments: a count, then a program) that hands itself down through that many
/// processes, each forking the next and exiting 0, the last one running the program in its place:
/// a service that daemonizes many times over.
const FORK_CHAIN_SCRIPT: &str = r#"hop() { if [ "$1" -eq 0 ]; then shift; exec "$@"; fi; n=$(($1 - 1)); shift; ( hop "$n" "$@" ) & exit 0; }; hop "$@""#;

#[test]
fn a_service_that_forks_through_many_processes_before_taking_its_name_starts() {
    let files = Files::new();
    let name = "org.test.reaper.Chain";
    let echo_bin = example("echo_service");
    files.toml(
        "chain.toml",
        name,
        &[
            "/bin/sh",
            "-c",
            FORK_CHAIN_SCRIPT,
            "chain",
            "40",
            &echo_bin,
            "--name",
            name,
        ],
        "",
    );
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let mut c = bus.client();
    // Each process of the chain ends, adopted by the broker, while the next one is alive.
    assert_eq!(
        start_service(&mut c, name).map_err(|e| describe_error(&e)),
        Ok(1)
    );
    let pid = echo_pid(&mut c, name);
    let keeper = parent_of(pid);
    assert_eq!(
        common::ancestors(keeper).get(1),
        Some(&bus.broker.pid()),
        "keeper -> spawner -> bus"
    );
}

#[test]
fn kill_9_of_the_owner_frees_the_name_within_a_second_and_the_next_call_starts_it_again() {
    let files = Files::new();
    let name = "org.test.kill.Echo";
    files.echo("echo.toml", name);
    let bus = files.start();
    let mut c = bus.client();
    let mut watcher = bus.client();
    watch_owner(&mut watcher, name);

    let first = echo_pid(&mut c, name);
    assert!(next_owner(&mut watcher, name).starts_with(':'));
    let killed = Instant::now();
    kill(first, nix::sys::signal::Signal::SIGKILL);
    assert_eq!(next_owner(&mut watcher, name), "");
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "the name went away after {:?}",
        killed.elapsed()
    );

    let second = echo_pid(&mut c, name);
    assert_ne!(second, first);
    assert_eq!(bus.spawned(name), [first, second]);
}

/// A service whose process takes its name, forks a child that inherits its bus socket, then
/// kills itself. The child reads the socket until the bus closes it.
const INHERITING_SERVICE: &str = r#"
import os, select, signal, sys
import dbus
bus = dbus.bus.BusConnection(os.environ["DBUS_STARTER_ADDRESS"])
bus.request_name(sys.argv[1], dbus.bus.NAME_FLAG_DO_NOT_QUEUE)
fd = bus.get_unix_fd()
if os.fork() == 0:
    print(f"inheritor {os.getpid()} holds the socket", flush=True)
    while True:
        ready, _, _ = select.select([fd], [], [], 20)
        if not ready:
            print("inheritor timed out", flush=True)
            os._exit(1)
        if not os.read(fd, 65536):
            break
    print("inheritor saw the bus close the connection", flush=True)
    os._exit(0)
os.kill(os.getpid(), signal.SIGKILL)
"#;

#[test]
fn the_name_is_dropped_when_its_owner_dies_even_if_a_child_still_holds_the_socket() {
    let python = "/usr/bin/python3";
    assert!(
        Path::new(python).is_file(),
        "{python} (with python3-dbus) is needed"
    );
    let files = Files::new();
    let name = "org.test.inherit.Python";
    let script = files.path("inherit.py");
    write_file(&script, INHERITING_SERVICE);
    let script_arg = script.display().to_string();
    // The inheritor is kept alive after the owner's death, to see the bus close the connection.
    files.toml(
        "inherit.toml",
        name,
        &[python, &script_arg, name],
        "leftovers = \"keep\"\n",
    );
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let mut c = bus.client();
    let mut watcher = bus.client();
    watch_owner(&mut watcher, name);

    assert_eq!(
        start_service(&mut c, name).map_err(|e| describe_error(&e)),
        Ok(1)
    );
    assert!(next_owner(&mut watcher, name).starts_with(':'));
    assert_eq!(next_owner(&mut watcher, name), "");
    let [owner] = bus.spawned(name)[..] else {
        panic!("not one spawn: {:?}", bus.spawned(name));
    };
    bus.wait_for_end(owner, "killed by signal 9");
    let log = bus.broker.wait_for_log("holds the socket");
    assert!(!log.contains("inheritor timed out"));
    bus.broker
        .wait_for_log("inheritor saw the bus close the connection");
}

#[test]
fn a_crashed_service_loses_its_name_and_the_next_call_starts_it_again() {
    let files = Files::new();
    let name = "org.test.crash.Crash";
    files.toml(
        "crash.toml",
        name,
        &[&example("crash_service"), "--name", name],
        "",
    );
    let bus = files.start();
    let (path, iface) = ("/org/broker/Crash", "org.broker.Crash");
    let mut c = bus.client();
    let mut watcher = bus.client();
    watch_owner(&mut watcher, name);

    let first = service_pid(&mut c, name, path, iface);
    assert!(next_owner(&mut watcher, name).starts_with(':'));
    let serial = send_call(&mut c, name, (path, iface, "Crash"), &(), Flags::empty());
    let crashed = c.reply_to(serial).expect_err("Crash replied");
    assert!(!error_name(&crashed).is_empty());
    assert_eq!(next_owner(&mut watcher, name), "");
    bus.wait_for_end(first, "killed by signal 6");
    // Its stderr is logged too, tagged with the service.
    let log = bus.broker.wait_for_log("crash_service: aborting as asked");
    let line = log
        .lines()
        .find(|l| l.contains("crash_service: aborting as asked"))
        .expect("line");
    assert!(
        line.contains(&format!("service={name}")) && line.contains("stderr"),
        "{line}"
    );

    let serial = send_call(
        &mut c,
        name,
        (path, iface, "Echo"),
        &("again",),
        Flags::empty(),
    );
    let reply = c
        .reply_to(serial)
        .map_err(|e| describe_error(&e))
        .expect("Echo");
    assert_eq!(reply.body().deserialize::<String>().expect("s"), "again");
    let second = service_pid(&mut c, name, path, iface);
    assert_ne!(second, first);
    assert_eq!(bus.spawned(name), [first, second]);
}

// ---------------------------------------------------------------------------
// Reloading.

#[test]
fn a_file_added_to_a_watched_directory_becomes_activatable() {
    let files = Files::new();
    let bus = files.start();
    let mut c = bus.client();
    let mut watcher = bus.client();
    watch_activatable(&mut watcher);
    let name = "org.test.reload.Added";
    assert!(!list_activatable(&mut c).iter().any(|n| n == name));

    // Written aside, then renamed in: the broker never sees half a file.
    let aside = bus.files.dir().join("added.toml.part");
    write_file(
        &aside,
        &toml_text(name, &[&example("echo_service"), "--name", name], ""),
    );
    std::fs::rename(&aside, bus.files.dir().join("added.toml")).expect("rename");

    wait_listed(&mut c, name);
    wait_activatable_changed(&mut watcher);
    assert_eq!(echo(&mut c, name, "new"), Ok("new".to_owned()));
}

/// What the broker logs when its directory watch asks for a reload.
const WATCH_RELOAD: &str = "reloading activation files: an activation directory changed";

#[test]
fn reload_config_and_sighup_reread_the_files() {
    // Each file is a hard link to one outside the activation directory, rewritten through that
    // other name: inotify reports the change to the outside directory only, so that only a
    // reload request can find it.
    let files = Files::new();
    let outside = files.path("outside");
    std::fs::create_dir(&outside).expect("outside dir");
    let echo_bin = example("echo_service");
    let before = "org.test.reload.Before";
    for file in ["a.toml", "b.toml"] {
        let linked = outside.join(file);
        write_file(
            &linked,
            &toml_text(before, &[&echo_bin, "--name", before], ""),
        );
        std::fs::hard_link(&linked, files.dir().join(file)).expect("hard link");
    }
    let bus = files.start();
    let mut c = bus.client();
    let mut watcher = bus.client();
    watch_activatable(&mut watcher);
    assert!(list_activatable(&mut c).iter().any(|n| n == before));

    let by_reload = "org.test.reload.ByReloadConfig";
    write_file(
        &outside.join("a.toml"),
        &toml_text(by_reload, &[&echo_bin, "--name", by_reload], ""),
    );
    c.driver_call("ReloadConfig", &()).expect("ReloadConfig");
    assert!(list_activatable(&mut c).iter().any(|n| n == by_reload));
    wait_activatable_changed(&mut watcher);

    let by_hup = "org.test.reload.BySighup";
    write_file(
        &outside.join("b.toml"),
        &toml_text(by_hup, &[&echo_bin, "--name", by_hup], ""),
    );
    kill(bus.broker.pid(), nix::sys::signal::Signal::SIGHUP);
    wait_listed(&mut c, by_hup);
    wait_activatable_changed(&mut watcher);

    assert!(!list_activatable(&mut c).iter().any(|n| n == before));
    for name in [by_reload, by_hup] {
        assert_eq!(echo(&mut c, name, name), Ok(name.to_owned()));
    }
    let log = bus.broker.log();
    assert!(
        !log.contains(WATCH_RELOAD),
        "the directory watch saw the rewrites, so this test proves nothing:\n{log}"
    );
}

/// The lines of `log` that warn about the activation directory `dir`.
fn missing_dir_warnings(log: &str, dir: &Path) -> usize {
    let needle = format!("activation directory {} does not exist", dir.display());
    log.lines()
        .filter(|line| line.contains("WARN") && line.contains(&needle))
        .count()
}

/// Waits until the broker has warned `count` times that `dir` does not exist.
fn wait_for_missing_dir_warnings(bus: &Bus, dir: &Path, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = bus.broker.log();
        let seen = missing_dir_warnings(&log, dir);
        if seen == count {
            return;
        }
        assert!(
            seen < count && Instant::now() < deadline,
            "expected {count} warnings about {}, saw {seen}:\n{log}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_missing_activation_dir_is_warned_about_at_start_and_at_each_reload_request() {
    let files = Files::new();
    let missing = files.path("nonexistent/services");
    let missing_arg = format!("--activation-dir={}", missing.display());
    let name = "org.test.missing.Echo";
    files.echo("echo.toml", name);
    let bus = files.start_with(&[&missing_arg], &[]);
    let mut c = bus.client();

    // It starts and serves; one warning names the directory, none the standard directories
    // (XDG_DATA_HOME's and XDG_DATA_DIRS's dbus-1/services do not exist here either).
    assert_eq!(echo(&mut c, name, "served"), Ok("served".to_owned()));
    let log = bus.broker.log();
    assert_eq!(missing_dir_warnings(&log, &missing), 1, "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && l.contains("dbus-1/services")),
        "a standard directory was warned about:\n{log}"
    );

    // A reload by the directory watch does not repeat it.
    let added = "org.test.missing.Added";
    bus.files.echo("added.toml", added);
    wait_listed(&mut c, added);
    bus.broker.wait_for_log(WATCH_RELOAD);
    assert_eq!(missing_dir_warnings(&bus.broker.log(), &missing), 1);

    // Each reload request does.
    kill(bus.broker.pid(), nix::sys::signal::Signal::SIGHUP);
    wait_for_missing_dir_warnings(&bus, &missing, 2);
    c.driver_call("ReloadConfig", &()).expect("ReloadConfig");
    assert_eq!(missing_dir_warnings(&bus.broker.log(), &missing), 3);
    assert_eq!(echo(&mut c, added, "still"), Ok("still".to_owned()));
}

#[test]
fn a_service_directory_created_after_start_is_watched_and_its_files_picked_up() {
    let files = Files::new();
    let root = files.path("late");
    std::fs::create_dir(&root).expect("root");
    let late = root.join("a/b/services");
    let late_arg = format!("--activation-dir={}", late.display());
    let bus = files.start_with(&[&late_arg], &[]);
    let mut c = bus.client();
    let mut watcher = bus.client();
    watch_activatable(&mut watcher);
    let name = "org.test.late.Echo";
    assert!(!list_activatable(&mut c).iter().any(|n| n == name));

    // Three levels at once, and the file right after: the watch must move down through all of
    // them, and read what was written before it reached the last one.
    std::fs::create_dir_all(&late).expect("mkdir -p");
    write_file(
        &late.join("late.toml"),
        &toml_text(name, &[&example("echo_service"), "--name", name], ""),
    );

    wait_listed(&mut c, name);
    wait_activatable_changed(&mut watcher);
    assert_eq!(echo(&mut c, name, "late"), Ok("late".to_owned()));
    assert_eq!(bus.spawned(name).len(), 1);
}

/// Polls `ListActivatableNames` until it no longer includes `name`, failing after ten seconds.
fn wait_unlisted(c: &mut RawClient, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while list_activatable(c).iter().any(|n| n == name) {
        assert!(Instant::now() < deadline, "{name} stayed activatable");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_watched_directory_removed_and_created_again_still_gets_its_files_picked_up() {
    let files = Files::new();
    let first = "org.test.recreated.First";
    files.echo("first.toml", first);
    let bus = files.start();
    let mut c = bus.client();
    let dir = bus.files.dir();
    assert!(list_activatable(&mut c).iter().any(|n| n == first));

    // Removed: its names go; created again: its new files come.
    std::fs::remove_dir_all(&dir).expect("remove the directory");
    wait_unlisted(&mut c, first);
    std::fs::create_dir(&dir).expect("create it again");
    let second = "org.test.recreated.Second";
    bus.files.echo("second.toml", second);
    wait_listed(&mut c, second);
    assert_eq!(echo(&mut c, second, "again"), Ok("again".to_owned()));

    // Removed and created again at once, before the broker can look.
    std::fs::remove_dir_all(&dir).expect("remove the directory");
    std::fs::create_dir(&dir).expect("create it again");
    let third = "org.test.recreated.Third";
    bus.files.echo("third.toml", third);
    wait_listed(&mut c, third);
    wait_unlisted(&mut c, second);
    assert_eq!(echo(&mut c, third, "at once"), Ok("at once".to_owned()));

    // Moved away and created again: the moved directory is no longer read.
    std::fs::rename(&dir, bus.files.path("moved")).expect("move the directory away");
    std::fs::create_dir(&dir).expect("create it again");
    let fourth = "org.test.recreated.Fourth";
    bus.files.echo("fourth.toml", fourth);
    wait_listed(&mut c, fourth);
    wait_unlisted(&mut c, third);
}

#[test]
fn the_watch_follows_the_service_directories_of_a_reloaded_configuration() {
    // Relative service directories are taken from the configuration file's directory.
    let config_with = |servicedirs: &[&str]| {
        let elements: Vec<String> = servicedirs
            .iter()
            .map(|dir| format!("<servicedir>{dir}</servicedir>"))
            .collect();
        common::open_config(&elements.concat())
    };
    let broker = Broker::start_with_config_files(&config_with(&["one"]), &[("one/keep", "")], &[]);
    let (one, two) = (broker.dir.path().join("one"), broker.dir.path().join("two"));
    std::fs::create_dir(&two).expect("two");
    let config = broker.config_file();
    let mut c = RawClient::connect(&broker.socket);
    let echo_bin = example("echo_service");

    std::fs::write(&config, config_with(&["two", "absent"])).expect("rewrite the configuration");
    c.driver_call("ReloadConfig", &()).expect("ReloadConfig");
    // A `<servicedir>` that is not there is named as `--activation-dir` is.
    let absent = broker.dir.path().join("absent");
    let log = broker.log();
    assert_eq!(missing_dir_warnings(&log, &absent), 1, "{log}");
    // Written after the reload read the new directory: only its watch can find it.
    let name = "org.test.followed.Echo";
    write_file(
        &two.join("echo.toml"),
        &toml_text(name, &[&echo_bin, "--name", name], ""),
    );
    wait_listed(&mut c, name);
    assert_eq!(echo(&mut c, name, "followed"), Ok("followed".to_owned()));

    // The old directory is no longer read, watched or not.
    let old = "org.test.followed.Old";
    write_file(
        &one.join("old.toml"),
        &toml_text(old, &[&echo_bin, "--name", old], ""),
    );
    c.driver_call("ReloadConfig", &()).expect("ReloadConfig");
    assert!(!list_activatable(&mut c).iter().any(|n| n == old));
}

#[test]
fn removing_the_file_of_a_running_or_starting_service_does_not_disturb_it() {
    let files = Files::new();
    let running = "org.test.reload.Running";
    let starting = "org.test.reload.Starting";
    let gate = files.path("gate");
    let (gate_arg, echo_bin) = (gate.display().to_string(), example("echo_service"));
    files.echo("running.toml", running);
    files.toml(
        "starting.toml",
        starting,
        &[
            "/bin/sh",
            "-c",
            GATE_SCRIPT,
            "gate",
            &gate_arg,
            &echo_bin,
            "--name",
            starting,
        ],
        "",
    );
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let mut c = bus.client();
    let mut waiting = bus.client();
    let mut watcher = bus.client();
    watch_activatable(&mut watcher);

    let pid = echo_pid(&mut c, running);
    let held = send_call(
        &mut waiting,
        starting,
        (ECHO_PATH, ECHO_IFACE, "Echo"),
        &("held",),
        Flags::empty(),
    );
    sync(&mut waiting);

    for file in ["running.toml", "starting.toml"] {
        std::fs::remove_file(bus.files.dir().join(file)).expect("remove");
    }
    c.driver_call("ReloadConfig", &()).expect("ReloadConfig");
    let names = list_activatable(&mut c);
    assert!(
        !names.iter().any(|n| n == running || n == starting),
        "{names:?}"
    );
    wait_activatable_changed(&mut watcher);

    // The running service still answers, as the same process.
    assert_eq!(echo(&mut c, running, "still"), Ok("still".to_owned()));
    assert_eq!(echo_pid(&mut c, running), pid);
    // The start in progress completes, and the held call is delivered.
    write_file(&gate, "");
    let reply = waiting
        .reply_to(held)
        .map_err(|e| describe_error(&e))
        .expect("held call answered");
    assert_eq!(reply.body().deserialize::<String>().expect("s"), "held");
    assert_eq!(bus.spawned(starting).len(), 1);
}

#[test]
fn messages_held_for_a_starting_service_are_bounded() {
    let files = Files::new();
    let name = "org.test.fail.Slow";
    files.toml("slow.toml", name, &["/bin/sleep", "30"], "");
    let bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let mut c = bus.client();
    let payload = vec![0u8; 1 << 20];
    let serials: Vec<NonZeroU32> = (0..20)
        .map(|_| {
            send_call(
                &mut c,
                name,
                ("/", "org.test.Slow", "Take"),
                &(payload.as_slice(),),
                Flags::empty(),
            )
        })
        .collect();
    // 16 MiB are held; the calls beyond are refused at once rather than kept.
    let err = c.reply_to(serials[19]).expect_err("the 20th MiB was held");
    assert_eq!(
        error_name(&err),
        "org.freedesktop.DBus.Error.LimitsExceeded"
    );
    assert_eq!(bus.spawned(name).len(), 1);
}

#[test]
fn stopping_the_bus_stops_the_starts_still_in_progress() {
    let files = Files::new();
    let name = "org.test.stop.Slow";
    files.toml("slow.toml", name, &["/bin/sleep", "30"], "");
    let mut bus = files.start_with(&[LONG_START_TIMEOUT], &[]);
    let mut c = bus.client();
    send_driver_call(&mut c, "StartServiceByName", &(name, 0u32));
    let pid = loop {
        if let [pid] = bus.spawned(name)[..] {
            break pid;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    bus.broker.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    // Gone, or a zombie that init is about to reap.
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
        assert!(
            Instant::now() < deadline,
            "the start in progress outlived the bus"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
