//! The example services of `examples/` on a real bus, and the activation
//! files of `activation.d/` that start them.
//!
//! The services run against a `dbus-daemon` and are started the way the
//! broker starts them: by its `Supervisor`, with this test process as the
//! child subreaper and the one reaper of every child. One reaper may run per
//! process, so the bus tests hold `SERIAL`.
//!
//! The examples must be built: plain `cargo test` builds them, but
//! `cargo test --test examples` alone does not (run `cargo build --examples`
//! first).

mod common;

use common::{example_path, tool};
use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use broker::activation::files;
use broker::supervisor::{ExitKind, ProcessEvent, SpawnSpec, Supervisor, descendants};
use futures_util::StreamExt;
use nix::sys::signal::Signal;
use nix::sys::wait::waitpid;
use nix::unistd::{Pid, getsid};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;
use zbus::fdo::{DBusProxy, NameOwnerChangedStream};
use zbus::zvariant::DynamicType;

static SERIAL: Mutex<()> = Mutex::new(());

/// Guards against hangs only; no test depends on how fast anything is.
const PATIENCE: Duration = Duration::from_secs(20);

/// Each example, the name it owns by default and the object it serves
/// (whose path and interface are both derived from the name).
const ECHO: (&str, &str) = ("echo_service", "org.broker.Echo");
const DAEMON: (&str, &str) = ("daemon_service", "org.broker.Daemon");
const CRASH: (&str, &str) = ("crash_service", "org.broker.Crash");
const LEFTOVER: (&str, &str) = ("leftover_service", "org.broker.Leftover");

/// A `dbus-daemon` on a socket in a fresh directory, killed and reaped when
/// dropped unless a test stopped it.
struct Bus {
    daemon: Child,
    stopped: bool,
    address: String,
    _dir: tempfile::TempDir,
}

impl Bus {
    fn start() -> Bus {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut daemon = tool("dbus-daemon")
            .arg("--config-file=/usr/share/dbus-1/session.conf")
            .arg("--nofork")
            .arg("--print-address=1")
            .arg(format!(
                "--address=unix:path={}",
                dir.path().join("bus").display()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon");
        let mut line = String::new();
        let stdout = daemon.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the address");
        assert!(line.starts_with("unix:"), "dbus-daemon printed {line:?}");
        Bus {
            daemon,
            stopped: false,
            address: line.trim().to_owned(),
            _dir: dir,
        }
    }

    /// Kills the daemon; the reaper collects it.
    fn stop(&mut self) {
        self.daemon.kill().expect("kill dbus-daemon");
        self.stopped = true;
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        // Nothing else runs on this thread while this does, so the reaper
        // cannot take the status first.
        if !self.stopped {
            let _ = self.daemon.kill();
            let pid = Pid::from_raw(i32::try_from(self.daemon.id()).expect("pid"));
            let _ = waitpid(pid, None);
        }
    }
}

/// What a bus test works with.
struct Harness {
    bus: Bus,
    supervisor: Supervisor,
    events: UnboundedReceiver<ProcessEvent>,
    /// Processes that ended, by pid, as the reaper reported them.
    ended: HashMap<u32, ExitKind>,
    client: zbus::Connection,
    dbus: DBusProxy<'static>,
}

/// Runs `test` with a `dbus-daemon`, a started supervisor and a client
/// connection, on a current-thread runtime.
fn with_bus<F, Fut>(test: F)
where
    F: FnOnce(Harness) -> Fut,
    Fut: Future<Output = ()>,
{
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    common::with_supervisor(|supervisor, events| async move {
        let bus = Bus::start();
        let client = zbus::connection::Builder::address(bus.address.as_str())
            .build()
            .await
            .expect("connect to dbus-daemon");
        let dbus = DBusProxy::new(&client).await.expect("bus proxy");
        let harness = Harness {
            bus,
            supervisor,
            events,
            ended: HashMap::new(),
            client,
            dbus,
        };
        timeout(PATIENCE, test(harness))
            .await
            .expect("test finished");
    });
}

impl Harness {
    /// Starts example `name` with `args`, with the environment the broker
    /// gives the services it starts, and returns its pid.
    fn spawn(&self, name: &str, args: &[&str]) -> u32 {
        let mut argv = vec![example_path(name).display().to_string()];
        argv.extend(args.iter().map(|arg| arg.to_string()));
        let env = [
            ("DBUS_SESSION_BUS_ADDRESS", self.bus.address.as_str()),
            ("DBUS_STARTER_ADDRESS", self.bus.address.as_str()),
            ("DBUS_STARTER_BUS_TYPE", "session"),
        ];
        let spec = SpawnSpec {
            argv,
            env: env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
            working_directory: None,
        };
        self.supervisor
            .spawn(name, &spec)
            .expect("spawn the example")
    }

    /// `NameOwnerChanged` for `name`; subscribe before starting its owner.
    async fn watch(&self, name: &str) -> NameOwnerChangedStream {
        self.dbus
            .receive_name_owner_changed_with_args(&[(0, name)])
            .await
            .expect("subscribe to NameOwnerChanged")
    }

    /// How `pid` ended, waiting for the reaper if it has not yet said.
    async fn end_of(&mut self, pid: u32) -> ExitKind {
        while !self.ended.contains_key(&pid) {
            let event = self.events.recv().await.expect("reaper alive");
            self.ended.insert(event.pid, event.status);
        }
        self.ended[&pid]
    }

    /// Calls `method` on the object that the example owning `name` serves
    /// (interface `iface`, at the path made from it).
    async fn call<B, R>(&self, name: &str, iface: &str, method: &str, body: &B) -> zbus::Result<R>
    where
        B: Serialize + DynamicType,
        R: DeserializeOwned + zbus::zvariant::Type,
    {
        let path = format!("/{}", iface.replace('.', "/"));
        let reply = self
            .client
            .call_method(Some(name), path.as_str(), Some(iface), method, body)
            .await?;
        reply.body().deserialize()
    }
}

/// The new owner in the next `NameOwnerChanged` of `stream` ("" if none).
async fn next_owner(stream: &mut NameOwnerChangedStream) -> String {
    let signal = stream.next().await.expect("NameOwnerChanged stream open");
    let args = signal.args().expect("NameOwnerChanged arguments");
    args.new_owner()
        .as_ref()
        .map(|owner| owner.to_string())
        .unwrap_or_default()
}

#[test]
fn echo_service_echoes_reports_its_pid_and_quits() {
    with_bus(|mut h| async move {
        let (example, name) = ECHO;
        let mut owners = h.watch(name).await;
        let pid = h.spawn(example, &[]);
        assert!(next_owner(&mut owners).await.starts_with(':'));

        let text = "hello, broker";
        let echoed: String = h.call(name, name, "Echo", &(text,)).await.expect("Echo");
        assert_eq!(echoed, text);
        let reported: u32 = h.call(name, name, "Pid", &()).await.expect("Pid");
        assert_eq!(reported, pid);
        let owner_pid = h
            .dbus
            .get_connection_unix_process_id(name.try_into().expect("name"));
        assert_eq!(owner_pid.await.expect("owner pid"), pid);

        let () = h.call(name, name, "Quit", &()).await.expect("Quit replies");
        assert_eq!(next_owner(&mut owners).await, "");
        assert_eq!(h.end_of(pid).await, ExitKind::Exited(0));
    });
}

#[test]
fn echo_service_takes_the_name_given_and_exits_when_the_bus_goes_away() {
    with_bus(|mut h| async move {
        let name = "org.broker.test.SecondEcho";
        let mut owners = h.watch(name).await;
        let pid = h.spawn(ECHO.0, &["--name", name]);
        assert!(next_owner(&mut owners).await.starts_with(':'));
        let echoed: String = h.call(name, ECHO.1, "Echo", &("x",)).await.expect("Echo");
        assert_eq!(echoed, "x");

        h.bus.stop();
        assert_eq!(h.end_of(pid).await, ExitKind::Exited(0));
    });
}

#[test]
fn daemon_service_daemonizes_then_takes_its_name_as_our_adopted_child() {
    with_bus(|mut h| {
        async move {
            let (example, name) = DAEMON;
            let mut owners = h.watch(name).await;
            let launcher = h.spawn(example, &[]);
            assert!(next_owner(&mut owners).await.starts_with(':'));
            assert_eq!(h.end_of(launcher).await, ExitKind::Exited(0));

            let daemon: u32 = h.call(name, name, "Pid", &()).await.expect("Pid");
            assert_ne!(daemon, launcher);
            let owner_pid = h
                .dbus
                .get_connection_unix_process_id(name.try_into().expect("name"));
            assert_eq!(owner_pid.await.expect("owner pid"), daemon);
            let parent: u32 = h.call(name, name, "Ppid", &()).await.expect("Ppid");
            assert_eq!(
                h.supervisor.keepers_of(example),
                [parent],
                "the start's keeper, a subreaper, adopted the daemon"
            );
            assert!(
                descendants()
                    .expect("descendants")
                    .iter()
                    .any(|d| d.pid == daemon && d.parent == parent),
                "the daemon is a descendant of this process"
            );

            // The middle process led the daemon's new session, and exited 0.
            let daemon_pid = Pid::from_raw(i32::try_from(daemon).expect("pid"));
            let middle = getsid(Some(daemon_pid))
                .expect("getsid")
                .as_raw()
                .unsigned_abs();
            assert!(middle != launcher && middle != daemon, "session {middle}");
            assert_eq!(h.end_of(middle).await, ExitKind::Exited(0));

            let () = h.call(name, name, "Quit", &()).await.expect("Quit replies");
            assert_eq!(next_owner(&mut owners).await, "");
            assert_eq!(h.end_of(daemon).await, ExitKind::Exited(0));
        }
    });
}

#[test]
fn daemon_service_can_die_after_daemonizing_without_taking_its_name() {
    with_bus(|mut h| {
        async move {
            let (example, name) = DAEMON;
            let launcher = h.spawn(example, &["--die-before-name"]);
            // The launcher, the middle process and the daemon.
            while h.ended.len() < 3 {
                let event = h.events.recv().await.expect("reaper alive");
                h.ended.insert(event.pid, event.status);
            }
            assert_eq!(h.ended.remove(&launcher), Some(ExitKind::Exited(0)));
            // The middle process exits 0, the daemon 1.
            let mut others: Vec<i32> = h
                .ended
                .values()
                .map(|status| match status {
                    ExitKind::Exited(code) => *code,
                    other => panic!("a process of daemon_service {other}"),
                })
                .collect();
            others.sort_unstable();
            assert_eq!(others, [0, 1]);
            let owned = h.dbus.name_has_owner(name.try_into().expect("name"));
            assert!(!owned.await.expect("NameHasOwner"));
        }
    });
}

#[test]
fn daemon_service_exit_code_ends_the_started_process_at_once() {
    with_bus(|mut h| async move {
        let launcher = h.spawn(DAEMON.0, &["--exit-code", "7"]);
        assert_eq!(h.end_of(launcher).await, ExitKind::Exited(7));
    });
}

#[test]
fn crash_service_crash_aborts_it_and_frees_its_name() {
    with_bus(|mut h| async move {
        let (example, name) = CRASH;
        let mut owners = h.watch(name).await;
        let pid = h.spawn(example, &[]);
        assert!(next_owner(&mut owners).await.starts_with(':'));
        let echoed: String = h
            .call(name, name, "Echo", &("still here",))
            .await
            .expect("Echo");
        assert_eq!(echoed, "still here");
        let reported: u32 = h.call(name, name, "Pid", &()).await.expect("Pid");
        assert_eq!(reported, pid);

        let crash: zbus::Result<()> = h.call(name, name, "Crash", &()).await;
        assert!(crash.is_err(), "Crash replied: {crash:?}");
        assert_eq!(next_owner(&mut owners).await, "");
        let ExitKind::Signaled(signal, _) = h.end_of(pid).await else {
            panic!("crash_service did not die by a signal");
        };
        assert_eq!(signal, Signal::SIGABRT as i32);
    });
}

/// `path` with `.` and `..` resolved lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[test]
fn activation_files_load_cleanly_and_start_the_examples() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = manifest.join("activation.d");
    let toml_files = std::fs::read_dir(&dir)
        .expect("activation.d")
        .filter(|entry| {
            let entry = entry.as_ref().expect("directory entry");
            entry.path().extension().is_some_and(|ext| ext == "toml")
        })
        .count();

    let loaded = files::load(std::slice::from_ref(&dir));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.services.len(), toml_files);
    assert_eq!(loaded.services.len(), 4);
    for (example, name) in [ECHO, DAEMON, CRASH, LEFTOVER] {
        let service = loaded
            .services
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let [program] = service.exec.as_slice() else {
            panic!("{name}: exec {:?} has arguments", service.exec);
        };
        let expected = manifest.join("target/debug/examples").join(example);
        assert_eq!(normalize(Path::new(program)), expected, "{name}");
        let source = manifest.join("examples").join(example).with_extension("rs");
        assert!(source.is_file(), "{name}: no {}", source.display());
        assert_eq!(service.environment, []);
        assert_eq!(service.working_directory, None);
        assert_eq!(service.start_timeout, None);
    }
}
