//! `broker run [OPTION]... [--] COMMAND [ARG]...` against the real binary: COMMAND sees a
//! private bus, can activate a service on it, broker exits with COMMAND's status, passes SIGTERM
//! and SIGINT on to it, stops the bus and its services when it ends, and says nothing on stderr
//! when all goes well.
//!
//! Each run gets a fresh `XDG_RUNTIME_DIR` (where the bus's socket goes) and empty
//! `XDG_DATA_HOME`/`XDG_DATA_DIRS`, so that no service of the host's is activatable.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{example_path, tool, wait_within};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long any one run may take; a run that takes longer is killed and the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// `sh -c` code that asks the bus its id with dbus-send.
const GET_ID: &str = "dbus-send --session --print-reply --dest=org.freedesktop.DBus \
                      /org/freedesktop/DBus org.freedesktop.DBus.GetId";

/// One `broker run` in a directory of its own: its runtime directory, its output files and
/// whatever a test puts there.
struct Run {
    dir: tempfile::TempDir,
}

/// How a run ended.
struct Ended {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn new() -> Run {
        // dbus-send must be there, or every test here fails for the wrong reason.
        drop(tool("dbus-send"));
        let run = Run {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for sub in ["runtime", "data", "out"] {
            std::fs::create_dir(run.path(sub)).expect("create a directory of the run");
        }
        run
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `broker run ARGS`, with the run's directories and output files.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_broker"));
        command.arg("run").args(args);
        self.in_the_run(&mut command);
        command
    }

    /// Gives `command` the run's directories and output files.
    fn in_the_run(&self, command: &mut Command) {
        command
            .env_remove("BROKER_LOG")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env("NO_COLOR", "1")
            .env("XDG_RUNTIME_DIR", self.path("runtime"))
            .env("XDG_DATA_HOME", self.path("data"))
            .env("XDG_DATA_DIRS", self.path("data"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.path("out/stdout")).expect("stdout file"))
            .stderr(std::fs::File::create(self.path("out/stderr")).expect("stderr file"));
    }

    fn start(&self, args: &[&str]) -> Child {
        self.command(args).spawn().expect("start broker run")
    }

    /// Waits for `child` (at most [`RUN_LIMIT`]) and reads what it wrote.
    fn finish(&self, mut child: Child) -> Ended {
        let status = wait_within(&mut child, RUN_LIMIT).expect("broker run ends in time");
        let read = |name| std::fs::read_to_string(self.path(name)).unwrap_or_default();
        Ended {
            status,
            stdout: read("out/stdout"),
            stderr: read("out/stderr"),
        }
    }

    /// `broker run ARGS` to its end.
    fn run(&self, args: &[&str]) -> Ended {
        self.finish(self.start(args))
    }

    /// The files left in the runtime directory, where the bus's socket was (besides
    /// `dbus-1/`, the directory for transient service files that a session bus creates).
    fn runtime_files(&self) -> Vec<String> {
        std::fs::read_dir(self.path("runtime"))
            .expect("read the runtime directory")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| name != "dbus-1")
            .collect()
    }
}

impl Ended {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The run's output, for assertion messages.
    fn describe(&self) -> String {
        format!(
            "status {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// The string of the first `string "..."` line of dbus-send's output.
fn reply_string(output: &str) -> Option<&str> {
    output.lines().find_map(|line| {
        line.trim()
            .strip_prefix("string \"")
            .and_then(|rest| rest.strip_suffix('"'))
    })
}

/// Waits until `path` exists.
fn wait_for_file(path: &Path, run: &Run, child: &mut Child) {
    let deadline = Instant::now() + RUN_LIMIT;
    while !path.exists() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "broker run ended ({status:?}) before {} appeared; stderr: {}",
                path.display(),
                std::fs::read_to_string(run.path("out/stderr")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` still exists (a zombie counts).
fn exists(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None) != Err(Errno::ESRCH)
}

#[test]
fn the_command_sees_a_private_bus_that_goes_when_it_ends() {
    let run = Run::new();
    let script = format!("echo \"$DBUS_SESSION_BUS_ADDRESS\"; {GET_ID}");
    let ended = run.run(&["--", "sh", "-c", &script]);
    assert_eq!(ended.code(), Some(0), "{}", ended.describe());
    let address = ended.stdout.lines().next().unwrap_or_default();
    let runtime = run.path("runtime");
    assert!(
        address.starts_with(&format!("unix:path={}/", runtime.display())),
        "the bus is not on a fresh socket in XDG_RUNTIME_DIR: {address:?}"
    );
    let guid = address.split("guid=").nth(1).unwrap_or_default();
    assert_eq!(guid.len(), 32, "no guid in {address:?}");
    assert_eq!(
        reply_string(&ended.stdout),
        Some(guid),
        "GetId does not answer the address's guid: {}",
        ended.describe()
    );
    assert_eq!(
        ended.stderr, "",
        "a run that works writes nothing on stderr"
    );
    assert_eq!(
        run.runtime_files(),
        Vec::<String>::new(),
        "the socket is left behind"
    );
}

#[test]
fn the_command_activates_a_service_and_the_service_goes_with_the_bus() {
    let run = Run::new();
    let services = run.path("services");
    std::fs::create_dir(&services).expect("activation dir");
    let echo = example_path("echo_service");
    std::fs::write(
        services.join("echo.toml"),
        format!(
            "name = \"org.broker.Echo\"\nexec = [{:?}]\n",
            echo.display().to_string()
        ),
    )
    .expect("write the activation file");
    let script = "dbus-send --session --print-reply --dest=org.broker.Echo /org/broker/Echo \
                  org.broker.Echo.Echo string:hello-from-run && \
                  dbus-send --session --print-reply --dest=org.freedesktop.DBus \
                  /org/freedesktop/DBus org.freedesktop.DBus.GetConnectionUnixProcessID \
                  string:org.broker.Echo && \
                  { sleep 600 & echo \"left behind: $!\"; }";
    let ended = run.run(&[
        "--activation-dir",
        services.to_str().expect("UTF-8 path"),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(ended.code(), Some(0), "{}", ended.describe());
    assert_eq!(
        reply_string(&ended.stdout),
        Some("hello-from-run"),
        "{}",
        ended.describe()
    );
    let pid: i32 = ended
        .stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("uint32 "))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid of the service: {}", ended.describe()));
    let left_behind: i32 = ended
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("left behind: "))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid of the background process: {}", ended.describe()));
    // broker stops and reaps the service, and the process the command left behind (adopted
    // as subreaper), before it exits: both pids are gone at once.
    assert!(!exists(pid), "the service (pid {pid}) outlived broker run");
    assert!(
        !exists(left_behind),
        "the command's background process (pid {left_behind}) outlived broker run"
    );
    assert_eq!(
        ended.stderr, "",
        "a run that works writes nothing on stderr"
    );
}

#[test]
fn broker_run_exits_with_the_commands_status() {
    let run = Run::new();
    let ended = run.run(&["--", "sh", "-c", "exit 3"]);
    assert_eq!(ended.code(), Some(3), "{}", ended.describe());
    let ended = run.run(&["sh", "-c", "kill -TERM $$"]);
    assert_eq!(
        ended.code(),
        Some(143),
        "killed by SIGTERM: {}",
        ended.describe()
    );
    let ended = run.run(&["sh", "-c", "kill -KILL $$"]);
    assert_eq!(
        ended.code(),
        Some(137),
        "killed by SIGKILL: {}",
        ended.describe()
    );
    assert_eq!(
        run.runtime_files(),
        Vec::<String>::new(),
        "a socket is left behind"
    );
}

/// SIGTERM or SIGINT sent to broker goes to COMMAND, while the bus serves on: COMMAND's trap
/// still reaches the bus, and broker exits with the status the trap chose.
#[test]
fn sigterm_and_sigint_reach_the_command_first() {
    for (signal, name) in [(Signal::SIGTERM, "TERM"), (Signal::SIGINT, "INT")] {
        let run = Run::new();
        let ready = run.path("ready");
        let marker = run.path("marker");
        let script = format!(
            "trap '{GET_ID} > {marker}; exit 5' {name}; : > {ready}; \
             while :; do sleep 0.05; done",
            marker = marker.display(),
            ready = ready.display(),
        );
        let mut child = run.start(&["--", "sh", "-c", &script]);
        wait_for_file(&ready, &run, &mut child);
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        kill(pid, signal).expect("signal broker run");
        let ended = run.finish(child);
        assert_eq!(ended.code(), Some(5), "SIG{name}: {}", ended.describe());
        let answer = std::fs::read_to_string(&marker).unwrap_or_default();
        assert!(
            reply_string(&answer).is_some_and(|id| id.len() == 32),
            "SIG{name}: the command's trap did not reach the bus: {answer:?}; {}",
            ended.describe()
        );
        assert_eq!(ended.stderr, "", "SIG{name}: nothing on stderr");
    }
}

#[test]
fn a_command_that_cannot_run_is_said_and_the_bus_stops() {
    let run = Run::new();
    let missing = run.path("no-such-program");
    let ended = run.run(&["--", missing.to_str().expect("UTF-8 path")]);
    assert_eq!(ended.code(), Some(127), "{}", ended.describe());
    assert!(
        ended.stderr.contains("cannot run") && ended.stderr.contains("no-such-program"),
        "{}",
        ended.describe()
    );
    let not_executable = run.path("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\n").expect("write a file");
    let ended = run.run(&[not_executable.to_str().expect("UTF-8 path")]);
    assert_eq!(ended.code(), Some(126), "{}", ended.describe());
    assert_eq!(
        run.runtime_files(),
        Vec::<String>::new(),
        "the socket is left behind"
    );
}

#[test]
fn without_a_command_or_a_bus_broker_run_fails_and_says_why() {
    let run = Run::new();
    for args in [
        &[][..],
        &["--"][..],
        &["--activation-dir", "/nonexistent"][..],
    ] {
        let ended = run.run(args);
        assert_eq!(ended.code(), Some(2), "{args:?}: {}", ended.describe());
        assert!(
            ended.stderr.contains("no COMMAND") && ended.stderr.contains("broker run"),
            "{args:?}: {}",
            ended.describe()
        );
    }
    let ran = run.path("ran");
    let touch = format!(": > {}", ran.display());
    let ended = run.run(&["--config-file", "/nonexistent/bus.conf", "sh", "-c", &touch]);
    assert_eq!(ended.code(), Some(1), "{}", ended.describe());
    assert!(
        ended.stderr.contains("/nonexistent/bus.conf"),
        "{}",
        ended.describe()
    );
    assert!(!ran.exists(), "the command ran without a bus");
    let ended = run.run(&["--fork", "true"]);
    assert_eq!(ended.code(), Some(1), "{}", ended.describe());
    assert!(ended.stderr.contains("--fork"), "{}", ended.describe());
}

#[test]
fn the_log_file_keeps_the_log_and_stderr_stays_quiet() {
    let run = Run::new();
    let log = run.path("bus.log");
    let ended = run.run(&[
        "--log-file",
        log.to_str().expect("UTF-8 path"),
        "sh",
        "-c",
        "exit 4",
    ]);
    assert_eq!(ended.code(), Some(4), "{}", ended.describe());
    assert_eq!(ended.stderr, "", "nothing on stderr with --log-file");
    let text = std::fs::read_to_string(&log).expect("the log file is written");
    assert!(
        text.contains("command ended") && text.contains("exited with status 4"),
        "the log does not tell the command's end:\n{text}"
    );
}

#[test]
fn help_tells_of_broker_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["run", "--help"])
        .output()
        .expect("run broker run --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("broker run [OPTION]... [--] COMMAND") && text.contains("--log-file"),
        "{text}"
    );
}

/// The `.xinitrc` line of the README, as written, with a script in place of the window manager:
/// the session's bus is broker, in the very process that the login shell `exec`ed, with `broker`
/// found on `PATH`.
#[test]
fn the_readme_xinitrc_line_gives_the_session_a_bus_of_its_own() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let line = readme
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("exec broker run "))
        .expect("the README's .xinitrc line");
    let (start, _window_manager) = line.split_once(" -- ").expect("COMMAND after --");
    let session = format!(r#"{start} -- sh -c "$WHICH_BUS""#);
    // The pid of the session bus, as its driver tells it, and the program that pid runs.
    let which_bus = "reply=$(dbus-send --session --print-reply --dest=org.freedesktop.DBus \
                     /org/freedesktop/DBus org.freedesktop.DBus.GetConnectionUnixProcessID \
                     string:org.freedesktop.DBus) && pid=${reply##* } && echo \"$pid\" && \
                     readlink \"/proc/$pid/exe\"";
    let run = Run::new();
    let bin = run.path("bin");
    std::fs::create_dir(&bin).expect("bin directory");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_broker"), bin.join("broker"))
        .expect("broker on PATH");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
        .expect("PATH");
    let mut shell = Command::new("sh");
    run.in_the_run(&mut shell);
    let child = shell
        .args(["-c", &session])
        .env("PATH", path)
        .env("WHICH_BUS", which_bus)
        .spawn()
        .expect("start the login shell");
    let shell_pid = child.id();
    let ended = run.finish(child);
    assert_eq!(ended.code(), Some(0), "{session}: {}", ended.describe());
    let mut lines = ended.stdout.lines();
    let bus_pid: u32 = lines
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("a pid");
    assert_eq!(
        bus_pid, shell_pid,
        "the bus is not the process the shell exec'ed"
    );
    let program = std::fs::canonicalize(env!("CARGO_BIN_EXE_broker")).expect("broker's path");
    assert_eq!(
        lines.next().map(PathBuf::from),
        Some(program),
        "the bus is not broker"
    );
    assert_eq!(ended.stderr, "", "nothing on stderr");
}

/// A Ctrl-C typed at the terminal reaches COMMAND (in broker's process group) from the terminal
/// itself: broker does not send it a second one, and the bus serves on. A SIGTERM sent to broker
/// afterwards is passed on. Two SIGINTs so close together would merge in COMMAND, so what
/// broker passed on is read from its debug log. The terminal is a pseudo-terminal that
/// Debian's python3 opens.
#[test]
fn a_terminal_ctrl_c_reaches_the_command_once() {
    let run = Run::new();
    let signals = run.path("signals");
    let script = format!(
        "trap 'echo INT >> {log}' INT; trap 'echo TERM >> {log}; exit 7' TERM; echo ready; \
         while :; do sleep 0.05; done",
        log = signals.display()
    );
    let python = r#"
import os, pty, signal, sys, time
broker, log, script, bus_log = sys.argv[1:5]
pid, fd = pty.fork()
if pid == 0:
    os.execv(broker, ["broker", "run", "--log-file", bus_log, "--", "sh", "-c", script])
def within(what, done):
    deadline = time.monotonic() + 30
    while not done():
        if time.monotonic() > deadline:
            sys.exit("timed out waiting for " + what)
        time.sleep(0.01)
seen = b""
def ready():
    global seen
    seen += os.read(fd, 1024)
    return b"ready" in seen
within("the command to start", ready)
os.write(fd, b"\x03")
within("the SIGINT", lambda: os.path.exists(log))
os.kill(pid, signal.SIGTERM)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"#;
    let mut python3 = tool("/usr/bin/python3");
    run.in_the_run(&mut python3);
    let bus_log = run.path("bus.log");
    let child = python3
        .args(["-c", python, env!("CARGO_BIN_EXE_broker")])
        .arg(&signals)
        .arg(&script)
        .arg(&bus_log)
        .env("BROKER_LOG", "broker::run=debug")
        .spawn()
        .expect("start python3");
    let ended = run.finish(child);
    assert_eq!(ended.code(), Some(0), "{}", ended.describe());
    assert_eq!(
        ended.stdout.trim(),
        "7",
        "broker run's status: {}",
        ended.describe()
    );
    let log = std::fs::read_to_string(&signals).unwrap_or_default();
    assert_eq!(log, "INT\nTERM\n", "the signals the command got, in order");
    let bus_log = std::fs::read_to_string(&bus_log).expect("the bus's log");
    let passed_on: Vec<&str> = bus_log
        .lines()
        .filter(|line| line.contains("passing the signal on"))
        .collect();
    assert!(
        passed_on.len() == 1 && passed_on[0].contains("SIGTERM"),
        "broker passed on more than the SIGTERM:\n{bus_log}"
    );
    assert!(
        bus_log.contains("SIGINT") && bus_log.contains("from the terminal"),
        "broker did not see the terminal's SIGINT:\n{bus_log}"
    );
}
