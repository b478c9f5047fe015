//! The supervisor with real processes: spawning, reaping (including
//! daemons re-parented to us as subreaper), output capture and pidfds.
//!
//! One reaper may run per process and this test process becomes a
//! subreaper, so every test here holds `SERIAL` and runs its own
//! current-thread runtime.

mod common;

use std::future::Future;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use broker::supervisor::{
    ExitKind, ProcessEvent, SpawnSpec, Supervisor, descendants, peer_pidfd, wait_exit,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getpgid};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;

static SERIAL: Mutex<()> = Mutex::new(());

/// A pidfd for `pid` (`pidfd_open`, Linux 5.3+): it keeps naming that one process even after its
/// pid number is reused.
fn pidfd_open(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Guards against hangs only; no test depends on how fast anything is.
const PATIENCE: Duration = Duration::from_secs(20);

/// Runs `test` with a started supervisor on a current-thread runtime.
fn with_supervisor<F, Fut>(test: F)
where
    F: FnOnce(Supervisor, UnboundedReceiver<ProcessEvent>) -> Fut,
    Fut: Future<Output = ()>,
{
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    captured_logs();
    common::with_supervisor(test);
}

fn sh(script: &str) -> SpawnSpec {
    SpawnSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..SpawnSpec::default()
    }
}

/// The status of `pid`, skipping events for other processes.
async fn end_of(events: &mut UnboundedReceiver<ProcessEvent>, pid: u32) -> ExitKind {
    let wait = async {
        loop {
            let event = events.recv().await.expect("reaper alive");
            if event.pid == pid {
                return event.status;
            }
        }
    };
    timeout(PATIENCE, wait).await.expect("process ended")
}

#[test]
fn exit_status_is_reported_for_the_spawned_pid() {
    with_supervisor(|supervisor, mut events| async move {
        let pid = supervisor
            .spawn("org.example.Exit", &sh("exit 3"))
            .expect("spawn");
        assert_eq!(end_of(&mut events, pid).await, ExitKind::Exited(3));
    });
}

#[test]
fn death_by_signal_is_reported() {
    with_supervisor(|supervisor, mut events| async move {
        let pid = supervisor
            .spawn("org.example.Kill", &sh("kill -9 $$"))
            .expect("spawn");
        let status = end_of(&mut events, pid).await;
        assert_eq!(status, ExitKind::Signaled(9, false));
        assert_eq!(status.to_string(), "killed by signal 9 (SIGKILL)");
    });
}

#[test]
fn exec_failure_carries_the_os_error() {
    with_supervisor(|supervisor, _events| async move {
        let spec = SpawnSpec {
            argv: vec!["/nonexistent/program".into()],
            ..SpawnSpec::default()
        };
        let err = supervisor
            .spawn("org.example.Missing", &spec)
            .expect_err("must fail");
        assert_eq!(err.source.raw_os_error(), Some(nix::libc::ENOENT));
        assert_eq!(err.program, "/nonexistent/program");

        let err = supervisor
            .spawn("org.example.Empty", &SpawnSpec::default())
            .expect_err("empty argv");
        assert_eq!(err.source.kind(), io::ErrorKind::InvalidInput);
    });
}

#[test]
fn program_without_slash_is_not_searched_in_path() {
    with_supervisor(|supervisor, _events| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = SpawnSpec {
            argv: vec!["sh".into(), "-c".into(), "exit 0".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            working_directory: Some(dir.path().to_owned()),
        };
        let err = supervisor
            .spawn("org.example.Path", &spec)
            .expect_err("no PATH search");
        assert_eq!(err.source.raw_os_error(), Some(nix::libc::ENOENT));
    });
}

#[test]
fn environment_and_working_directory_are_exactly_as_given() {
    with_supervisor(|supervisor, mut events| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let real_dir = dir.path().canonicalize().expect("canonical tempdir");
        let script = format!(
            r#"test "$FOO" = "bar baz" && test -z "${{HOME+set}}" && test "$(pwd -P)" = '{}'"#,
            real_dir.display()
        );
        let spec = SpawnSpec {
            env: vec![("FOO".into(), "bar baz".into())],
            working_directory: Some(dir.path().to_owned()),
            ..sh(&script)
        };
        let pid = supervisor.spawn("org.example.Env", &spec).expect("spawn");
        assert_eq!(end_of(&mut events, pid).await, ExitKind::Exited(0));
    });
}

#[test]
fn long_running_service_has_its_keepers_group_and_a_pidfd_that_sees_its_end() {
    with_supervisor(|supervisor, mut events| async move {
        let spec = SpawnSpec {
            argv: vec!["/bin/sleep".into(), "300".into()],
            ..SpawnSpec::default()
        };
        let pid = supervisor.spawn("org.example.Sleep", &spec).expect("spawn");
        let raw_pid = Pid::from_raw(i32::try_from(pid).expect("pid fits"));
        let [keeper] = supervisor.keepers_of("org.example.Sleep")[..] else {
            panic!("one keeper for the start");
        };
        let keeper = Pid::from_raw(i32::try_from(keeper).expect("pid fits"));
        assert_eq!(
            getpgid(Some(raw_pid)).expect("getpgid"),
            keeper,
            "a group of its own, its keeper's, not this process's"
        );
        assert_ne!(getpgid(None).expect("getpgid"), keeper);

        let pidfd = pidfd_open(pid).expect("pidfd_open");
        assert!(
            timeout(Duration::from_millis(50), wait_exit(&pidfd))
                .await
                .is_err(),
            "wait_exit resolved while the process was alive"
        );
        kill(raw_pid, Signal::SIGKILL).expect("kill");
        timeout(PATIENCE, wait_exit(&pidfd))
            .await
            .expect("wait_exit resolved")
            .expect("wait_exit");
        assert_eq!(end_of(&mut events, pid).await, ExitKind::Signaled(9, false));
    });
}

#[test]
fn double_forked_daemon_is_its_keepers_child_and_is_reaped() {
    with_supervisor(|supervisor, mut events| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let go = dir.path().join("go");
        // The daemon waits for our signal file, then exits 7.
        let daemon = format!(
            "while [ ! -e '{}' ]; do sleep 0.02; done; exit 7",
            go.display()
        );
        let script = format!(r#"(setsid /bin/sh -c "{daemon}" &) ; exit 0"#);
        let pid = supervisor
            .spawn("org.example.Daemon", &sh(&script))
            .expect("spawn");
        let [keeper] = supervisor.keepers_of("org.example.Daemon")[..] else {
            panic!("one keeper for the start");
        };
        assert_eq!(end_of(&mut events, pid).await, ExitKind::Exited(0));

        let daemon_pid = only_child(keeper).await;
        assert_ne!(daemon_pid, pid);
        std::fs::write(&go, "").expect("signal the daemon");
        assert_eq!(end_of(&mut events, daemon_pid).await, ExitKind::Exited(7));
        assert!(
            !descendants()
                .expect("descendants")
                .iter()
                .any(|d| d.pid == daemon_pid)
        );
    });
}

/// The children of `parent` not yet reaped, zombies included.
fn children(parent: u32) -> std::io::Result<Vec<u32>> {
    Ok(descendants()?
        .into_iter()
        .filter(|d| d.parent == parent)
        .map(|d| d.pid)
        .collect())
}

/// The one child of `keeper` once the daemon has been re-parented to it; the
/// intermediate shell may still be exiting, so wait for a single live one.
async fn only_child(keeper: u32) -> u32 {
    let wait = async {
        loop {
            if let [pid] = children(keeper).expect("children")[..] {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    timeout(PATIENCE, wait)
        .await
        .expect("the daemon became the keeper's child")
}

/// The log of the whole test binary. A global subscriber, installed before
/// any test spawns: a thread-local one (`set_default`) misses events whose
/// callsites other test threads already cached as uninteresting.
fn captured_logs() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first global subscriber");
        captured
    })
}

/// A `tracing` writer that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The first captured log line containing both `tag` and `needle`,
    /// once it appears.
    async fn line_with(&self, tag: &str, needle: &str) -> String {
        let wait = async {
            loop {
                if let Some(line) = self
                    .text()
                    .lines()
                    .find(|line| line.contains(tag) && line.contains(needle))
                {
                    return line.to_owned();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let found = timeout(PATIENCE, wait).await;
        found.unwrap_or_else(|_| panic!("no {needle:?} for {tag:?} in:\n{}", self.text()))
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut bytes = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn output_lines_and_process_ends_are_logged_with_the_service_name() {
    with_supervisor(|supervisor, mut events| async move {
        // Written so that the argv (which is logged too) holds none of the lines.
        let script = "o=out e=err; echo \"hello $o\"; echo \"hello $e\" >&2; printf '%020000d\\n' 7; printf 'no%snewline' ' '; exit 4";
        let pid = supervisor
            .spawn("org.example.Talk", &sh(script))
            .expect("spawn");
        assert_eq!(end_of(&mut events, pid).await, ExitKind::Exited(4));

        let captured = captured_logs();
        let tag = format!("service=org.example.Talk pid={pid}");
        for (text, stream) in [
            ("hello out", "stdout"),
            ("hello err", "stderr"),
            ("no newline", "stdout"),
        ] {
            let line = captured.line_with(&tag, text).await;
            assert!(line.contains(&format!("stream=\"{stream}\"")), "{line}");
        }
        // A 20000-byte line is logged in pieces of at most 16 KiB.
        let piece = captured.line_with(&tag, &"0".repeat(16 * 1024)).await;
        assert!(!piece.contains(&"0".repeat(16 * 1024 + 1)), "{piece}");
        captured.line_with(&tag, "service process started").await;
        captured.line_with(&tag, "exited with status 4").await;
    });
}

#[test]
fn second_reaper_is_refused_while_one_runs() {
    with_supervisor(|_supervisor, _events| async move {
        let err = Supervisor::start().err().expect("second reaper refused");
        assert!(err.to_string().contains("already running"), "{err}");
    });
}

#[test]
fn peer_pidfd_names_the_connecting_process() {
    let (ours, _theirs) = UnixStream::pair().expect("socketpair");
    let pidfd = peer_pidfd(ours.as_fd()).expect("SO_PEERPIDFD (Linux 6.5+)");
    let fdinfo = std::fs::read_to_string(
        Path::new("/proc/self/fdinfo").join(std::os::fd::AsRawFd::as_raw_fd(&pidfd).to_string()),
    )
    .expect("fdinfo");
    let pid_line = format!("Pid:\t{}", std::process::id());
    assert!(fdinfo.lines().any(|line| line == pid_line), "{fdinfo}");
}
