//! The bus served in the test's own process (`broker::server::serve`), on a listener the test
//! binds and with a shutdown the test triggers, on a current-thread runtime whose clock starts
//! paused: a timeout then passes in virtual time, as soon as the bus has nothing else to do,
//! instead of being waited for. Every timeout of the bus is tested here: `auth_timeout`,
//! `pending_fd_timeout`, `reply_timeout`, the start timeout (the bus's and an activation
//! file's own) and the start limit's interval.
//!
//! With the clock paused, tokio jumps to the next timer whenever the runtime would wait, even
//! for a socket. A client that must not be outrun by a timer therefore runs in `spawn_blocking`
//! (which holds the clock still while it runs); a test that waits for a timer awaits in the
//! runtime, and the jump is what it tests. Each test also checks that it took far less real
//! time than the timeout it waited for.
//!
//! The bus runs on the test's thread, so a subscriber set there for the test sees what the bus
//! logs (the services it started, why it closed a connection).

mod common;

use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use broker::address::random_hex;
use broker::cli::Options;
use broker::server::{self, BusSetup};
use common::{RawClient, error_name, member_of, open_config, within, write_config_files};
use serde::Serialize;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixListener;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;
use zbus::Message;
use zbus::zvariant::DynamicType;

/// The configured `auth_timeout`: long enough that a test which waited for it in real time
/// would be noticed.
const AUTH_TIMEOUT: Duration = Duration::from_secs(300);

/// How late after its deadline (in virtual time) a timeout may fire: the bus's own turns and
/// the clock's millisecond granularity, nothing like a real wait.
const SLACK: Duration = Duration::from_secs(1);

/// A process runs one bus at a time (it has one reaper), and tests run in parallel threads,
/// each on a runtime of its own. (tokio's lock: it is held across awaits.)
static ONE_BUS: Mutex<()> = Mutex::const_new(());

/// A bus to serve, not yet started: what `serve` takes, and the socket clients connect to.
struct TestBus {
    setup: BusSetup,
    listener: UnixListener,
    socket: PathBuf,
}

/// A bus to serve: its configuration file in `dir` (everything allowed, no service directories,
/// `auth_timeout` of `AUTH_TIMEOUT`, then `extra`), with `files` written beside it (paths
/// relative to `dir`), the command line `opts` (the configuration file added), and a listener
/// on `dir/bus`. Call within the runtime (the listener registers with it).
fn bus_in(dir: &Path, extra: &str, files: &[(&str, &str)], opts: Options) -> TestBus {
    let limits = format!(
        r#"<limit name="auth_timeout">{}</limit>{extra}"#,
        AUTH_TIMEOUT.as_millis()
    );
    let file = write_config_files(dir, &open_config(&limits), files);
    let opts = Options {
        config_file: Some(file),
        ..opts
    };
    let config = server::load_config(&opts).expect("the test's configuration");
    assert_eq!(config.limits.auth_timeout, AUTH_TIMEOUT);
    let socket = dir.join("bus");
    let listener = UnixListener::bind(&socket).expect("bind the bus's socket");
    let guid = random_hex(16);
    let setup = BusSetup {
        address: format!("unix:path={},guid={guid}", socket.display()),
        guid,
        opts,
        config,
        notify_stopping: false,
        spawner_exe: Some(env!("CARGO_BIN_EXE_broker").into()),
        system_spawner: None,
    };
    TestBus {
        setup,
        listener,
        socket,
    }
}

/// No reload requests: the sender is dropped at once.
fn no_reloads() -> mpsc::UnboundedReceiver<()> {
    mpsc::unbounded_channel().1
}

/// Serves `bus` while `clients` runs, then shuts it down and checks that `serve` ended without
/// an error. A bus that stops on its own first fails the test with what it returned.
async fn serve_while(bus: TestBus, clients: impl Future<Output = ()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let served = server::serve(bus.setup, vec![bus.listener], no_reloads(), async {
        let _ = stopped.await;
    });
    let mut served = std::pin::pin!(served);
    tokio::select! {
        early = &mut served => panic!("the bus stopped before the test ended: {early:?}"),
        () = clients => {}
    }
    let _ = stop.send(());
    within("serve to return after shutdown", served)
        .await
        .expect("serve ends without an error");
}

/// Runs `client` (blocking socket calls) on the blocking pool, where the paused clock stands
/// still until it returns.
async fn blocking<T: Send + 'static>(client: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(client)
        .await
        .expect("the client panicked")
}

/// Waits in the runtime, so that the paused clock jumps to the bus's next timer, until the bus
/// writes to `stream` or closes it. A bus that does neither within `limit` (of virtual time)
/// fails the test rather than hanging it.
async fn until_readable(stream: &UnixStream, limit: Duration, what: &str) {
    let watched = stream
        .try_clone()
        .expect("a second descriptor of the client's socket");
    // SAFETY: the `AsyncFd` owns `watched`, which keeps its descriptor open, on the same
    // socket, until the `AsyncFd` is dropped.
    let fd = unsafe { AsyncFd::register_with_interest(watched, Interest::READABLE) }
        .expect("watch the socket");
    let ready = tokio::time::timeout(limit, fd.readable())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {limit:?} of virtual time"));
    // Only the readiness is wanted; the socket is read (or peeked at) by the caller.
    drop(ready.expect("poll the client's socket"));
}

/// What a client's socket holds now, looked at without waiting and without reading it.
#[derive(Debug, PartialEq)]
enum Socket {
    /// The bus closed it.
    Closed,
    /// Open, nothing to read.
    Quiet,
    /// Open, with something to read.
    Unread,
}

fn socket_state(stream: &UnixStream) -> Socket {
    use nix::errno::Errno;
    use nix::sys::socket::{MsgFlags, recv};
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK;
    match recv(stream.as_raw_fd(), &mut byte, flags) {
        Ok(0) | Err(Errno::ECONNRESET) => Socket::Closed,
        Ok(_) => Socket::Unread,
        Err(Errno::EAGAIN) => Socket::Quiet,
        Err(e) => panic!("peek at the client's socket: {e}"),
    }
}

/// Fails the test if it took `timeout` or more of real time: it was to pass in virtual time.
fn assert_virtual(wall: std::time::Instant, timeout: Duration) {
    assert!(
        wall.elapsed() < timeout / 10,
        "the test took {:?} of real time for a timeout of {timeout:?}",
        wall.elapsed()
    );
}

/// Sends a method call `interface.member` on `path` to `dest` without waiting; returns its
/// serial.
fn send_call<B>(c: &mut RawClient, dest: &str, method: (&str, &str, &str), body: &B) -> NonZeroU32
where
    B: Serialize + DynamicType,
{
    let (path, interface, member) = method;
    let serial = c.next_serial();
    let call = Message::method_call(path, member)
        .interface(interface)
        .destination(dest)
        .serial(serial)
        .build(body)
        .expect("build the call");
    c.send(&call);
    serial
}

/// The text of an error reply.
fn error_text(msg: &Message) -> String {
    msg.body().deserialize::<String>().unwrap_or_default()
}

/// What the bus logs (debug and above) while a test runs: a subscriber on the test's thread,
/// where the bus runs, writing into memory.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl Log {
    /// Captures what is logged on this thread until the guard is dropped.
    fn capture() -> (Log, tracing::subscriber::DefaultGuard) {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        (log, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The pids the bus logged starting for `service`, in order.
    fn spawned(&self, service: &str) -> Vec<u32> {
        let needle = format!("service process started service={service} pid=");
        self.text()
            .lines()
            .filter_map(|line| line.split_once(&needle))
            .map(|(_, rest)| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits
                    .parse()
                    .unwrap_or_else(|_| panic!("no pid in {rest:?}"))
            })
            .collect()
    }

    /// Waits until the log contains `needle`: in real time (a process's end is real), on the
    /// blocking pool so that the bus runs meanwhile and the clock stands still; at most ten
    /// seconds.
    async fn wait_for(&self, needle: &str) -> String {
        let log = self.clone();
        let needle = needle.to_owned();
        blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let text = log.text();
                if text.contains(&needle) {
                    return text;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the log never said {needle:?}:\n{text}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .await
    }
}

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Milliseconds, as the configuration and the command line take them.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).expect("a timeout in milliseconds fits in u64")
}

// ---------------------------------------------------------------------------------------------
// Serving.

#[tokio::test]
async fn serve_returns_once_shutdown_resolves_and_closes_what_it_served() {
    let _one = ONE_BUS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_in(dir.path(), "", &[], Options::default());
    let socket = bus.socket.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = server::serve(bus.setup, vec![bus.listener], no_reloads(), async {
        let _ = stopped.await;
    });
    let client = async {
        let at = socket.clone();
        let mut client = blocking(move || RawClient::connect(&at)).await;
        let client = blocking(move || {
            client.driver_call("GetId", &()).expect("the bus answers");
            client
        })
        .await;
        let _ = stop.send(());
        client
    };
    let (served, mut client) = within("serve to return after shutdown", async {
        tokio::join!(served, client)
    })
    .await;
    served.expect("serve ends without an error");
    // Nothing listens any more, and the client's connection is closed.
    let refused = UnixStream::connect(&socket).expect_err("a connection to a bus that has stopped");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        blocking(move || client.closed_by_broker()).await,
        "the client's connection stays open"
    );
}

// ---------------------------------------------------------------------------------------------
// Connections: auth_timeout, pending_fd_timeout.

/// A connection that does not say `Hello` within `auth_timeout` is closed: one that sends
/// nothing at all, and one that authenticates but never says `Hello`. The one that said `Hello`
/// first, older than both, is kept, well past the timeout.
#[tokio::test(start_paused = true)]
async fn auth_timeout_passes_in_virtual_time() {
    let _one = ONE_BUS.lock().await;
    let wall = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_in(dir.path(), "", &[], Options::default());
    let socket = bus.socket.clone();
    serve_while(bus, async {
        let start = Instant::now();
        let (mut joined, silent, authenticated) = blocking(move || {
            let joined = RawClient::connect(&socket);
            let silent = UnixStream::connect(&socket).expect("connect");
            let authenticated = RawClient::authenticate(&socket, false);
            (joined, silent, authenticated)
        })
        .await;
        // Each is closed once `auth_timeout` has passed, and not long after. A bus that never
        // closed one fails the test at twice that, not hangs it.
        let incomplete = [
            ("the silent connection", &silent),
            ("the connection without Hello", &authenticated.stream),
        ];
        for (what, stream) in incomplete {
            until_readable(stream, AUTH_TIMEOUT * 2, what).await;
            let waited = start.elapsed();
            assert!(
                waited >= AUTH_TIMEOUT && waited < AUTH_TIMEOUT + SLACK,
                "{what} was closed after {waited:?} of virtual time"
            );
            assert_eq!(
                socket_state(stream),
                Socket::Closed,
                "the bus wrote to {what}"
            );
        }
        // The client that said Hello in time stays, well past the timeout.
        tokio::time::sleep(AUTH_TIMEOUT * 2).await;
        assert!(start.elapsed() >= AUTH_TIMEOUT * 3);
        blocking(move || joined.driver_call("GetId", &()).map(|_| ()))
            .await
            .expect("a connection that said Hello stays");
    })
    .await;
    assert_virtual(wall, AUTH_TIMEOUT);
}

/// `pending_fd_timeout`: a client that sent fds with the start of a message, and never the
/// rest, is disconnected once the timeout has passed, with a warning that says why. The same
/// half message without fds is not cut off by this limit.
#[tokio::test(start_paused = true)]
async fn a_message_left_half_sent_with_fds_is_disconnected_after_pending_fd_timeout() {
    const PENDING_FD_TIMEOUT: Duration = Duration::from_secs(120);
    // The start of a method call that declares 64 KiB of body and header fields, then nothing.
    const PARTIAL: [u8; 17] = [
        b'l', 1, 0, 1, 0xff, 0xff, 0, 0, 1, 2, 3, 4, 0xff, 0xff, 0, 0, 42,
    ];
    let _one = ONE_BUS.lock().await;
    let wall = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let limit = format!(
        r#"<limit name="pending_fd_timeout">{}</limit>"#,
        millis(PENDING_FD_TIMEOUT)
    );
    let bus = bus_in(dir.path(), &limit, &[], Options::default());
    let socket = bus.socket.clone();
    let (log, _logging) = Log::capture();
    serve_while(bus, async {
        let start = Instant::now();
        let (with_fds, without_fds, _file) = blocking(move || {
            let mut with_fds = RawClient::connect(&socket);
            let file = tempfile::tempfile().expect("a file to send");
            with_fds.send_with_fds(&PARTIAL, &[file.as_raw_fd()]);
            let mut without_fds = RawClient::connect(&socket);
            std::io::Write::write_all(&mut without_fds.stream, &PARTIAL).expect("send");
            (with_fds, without_fds, file)
        })
        .await;
        until_readable(
            &with_fds.stream,
            PENDING_FD_TIMEOUT * 2,
            "the client with fds",
        )
        .await;
        let waited = start.elapsed();
        assert!(
            waited >= PENDING_FD_TIMEOUT && waited < PENDING_FD_TIMEOUT + SLACK,
            "closed after {waited:?} of virtual time"
        );
        assert_eq!(socket_state(&with_fds.stream), Socket::Closed);
        let said = format!(
            "Unix fds have been pending for too long (pending_fd_timeout={} ms)",
            millis(PENDING_FD_TIMEOUT)
        );
        assert!(log.text().contains(&said), "{}", log.text());

        // Without fds, the same half message is not cut off by this limit.
        tokio::time::sleep(PENDING_FD_TIMEOUT * 2).await;
        assert_eq!(
            socket_state(&without_fds.stream),
            Socket::Quiet,
            "a half-sent message without fds was cut off"
        );
    })
    .await;
    assert_virtual(wall, PENDING_FD_TIMEOUT);
}

// ---------------------------------------------------------------------------------------------
// Calls: reply_timeout.

/// `reply_timeout`: a call that its callee never answers gets `NoReply` from the bus once the
/// timeout has passed, not at once; a call that was answered is not touched.
#[tokio::test(start_paused = true)]
async fn reply_timeout_answers_an_unanswered_call_with_no_reply() {
    const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
    const SLOW: &str = "org.example.Slow";
    let _one = ONE_BUS.lock().await;
    let wall = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let limit = format!(
        r#"<limit name="reply_timeout">{}</limit>"#,
        millis(REPLY_TIMEOUT)
    );
    let bus = bus_in(dir.path(), &limit, &[], Options::default());
    let socket = bus.socket.clone();
    serve_while(bus, async {
        let (mut caller, mut callee) = blocking(move || {
            let mut callee = RawClient::connect(&socket);
            let owned = callee
                .driver_call("RequestName", &(SLOW, 0u32))
                .unwrap_or_else(|e| panic!("RequestName {SLOW}: {}", error_name(&e)));
            assert_eq!(
                owned.body().deserialize::<u32>().expect("reply"),
                1,
                "owns {SLOW}"
            );
            let mut caller = RawClient::connect(&socket);
            // An answered call is not touched.
            let quick = send_call(
                &mut caller,
                SLOW,
                ("/org/example", "org.example.Test", "Quick"),
                &(),
            );
            let got = callee.recv_until(|m| member_of(m) == "Quick");
            let serial = callee.next_serial();
            let answer = Message::method_return(&got.header())
                .serial(serial)
                .build(&())
                .expect("build the answer");
            callee.send(&answer);
            caller.reply_to(quick).expect("the answered call's reply");
            (caller, callee)
        })
        .await;
        let start = Instant::now();
        let (mut caller, ignored) = blocking(move || {
            let ignored = send_call(
                &mut caller,
                SLOW,
                ("/org/example", "org.example.Test", "Ignored"),
                &(),
            );
            callee.recv_until(|m| member_of(m) == "Ignored");
            // The callee stays, and never answers.
            std::mem::forget(callee);
            (caller, ignored)
        })
        .await;
        until_readable(&caller.stream, REPLY_TIMEOUT * 2, "the caller").await;
        let waited = start.elapsed();
        assert!(
            waited >= REPLY_TIMEOUT && waited < REPLY_TIMEOUT + SLACK,
            "NoReply came after {waited:?} of virtual time"
        );
        let err = blocking(move || caller.reply_to(ignored))
            .await
            .expect_err("the unanswered call got a reply");
        assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.NoReply");
        assert_eq!(
            err.header().sender().map(|s| s.to_string()).as_deref(),
            Some("org.freedesktop.DBus")
        );
    })
    .await;
    assert_virtual(wall, REPLY_TIMEOUT);
}

// ---------------------------------------------------------------------------------------------
// Activation: the start timeout and the start limit's interval.

/// The bus-wide start timeout of the activation tests (`--start-timeout-ms`): far longer than
/// what a test waits for, so that a start that failed before it did not wait for it.
const BUS_START_TIMEOUT: Duration = Duration::from_secs(3600);

const TIMED_OUT: &str = "org.freedesktop.DBus.Error.TimedOut";

/// The command line of a bus with `dir/activation` as its activation directory and a start
/// timeout of `BUS_START_TIMEOUT`.
fn activation_opts(dir: &Path) -> Options {
    Options {
        activation_dirs: vec![dir.join("activation")],
        start_timeout_ms: Some(millis(BUS_START_TIMEOUT)),
        ..Options::default()
    }
}

/// A TOML activation file for `name` running `exec`, with `extra` lines.
fn toml_text(name: &str, exec: &[&str], extra: &str) -> String {
    let quoted: Vec<String> = exec.iter().map(|arg| format!("{arg:?}")).collect();
    format!("name = {name:?}\nexec = [{}]\n{extra}\n", quoted.join(", "))
}

/// After a start that timed out: the bus stopped what it had started (SIGTERM to its process
/// group), so the one process it started for `service` ended by a signal and is gone.
async fn assert_start_stopped(log: &Log, service: &str) {
    let spawned = log.spawned(service);
    let [pid] = spawned[..] else {
        panic!("not one start of {service}: {spawned:?}");
    };
    log.wait_for(&format!("pid={pid} status=killed by signal"))
        .await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
    assert_eq!(
        nix::sys::signal::kill(pid, None),
        Err(nix::errno::Errno::ESRCH),
        "process {pid} is still there"
    );
}

/// A service that never takes its name fails its start with `TimedOut` after the timeout of its
/// own activation file (`start_timeout_ms`), not the bus's, and what was left of the start is
/// stopped.
#[tokio::test(start_paused = true)]
async fn a_service_that_never_takes_its_name_times_out_after_its_own_start_timeout() {
    const FILE_START_TIMEOUT: Duration = Duration::from_secs(60);
    const NAME: &str = "org.test.fail.Timeout";
    let _one = ONE_BUS.lock().await;
    let wall = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let own_timeout = format!("start_timeout_ms = {}", millis(FILE_START_TIMEOUT));
    let file = toml_text(NAME, &["/bin/sleep", "600"], &own_timeout);
    let files = [("activation/timeout.toml", file.as_str())];
    let bus = bus_in(dir.path(), "", &files, activation_opts(dir.path()));
    let socket = bus.socket.clone();
    let (log, _logging) = Log::capture();
    serve_while(bus, async {
        let start = Instant::now();
        let (mut c, serial) = blocking(move || {
            let mut c = RawClient::connect(&socket);
            let driver = "org.freedesktop.DBus";
            let method = ("/org/freedesktop/DBus", driver, "StartServiceByName");
            let serial = send_call(&mut c, driver, method, &(NAME, 0u32));
            (c, serial)
        })
        .await;
        until_readable(&c.stream, BUS_START_TIMEOUT * 2, "the caller of the start").await;
        let took = start.elapsed();
        let err = blocking(move || c.reply_to(serial))
            .await
            .expect_err("a start that timed out succeeded");
        assert_eq!(error_name(&err), TIMED_OUT, "{}", error_text(&err));
        assert!(took >= FILE_START_TIMEOUT, "{took:?}");
        assert!(
            took < FILE_START_TIMEOUT + SLACK,
            "the file's timeout was not used: {took:?}"
        );
        // What was left of the start is stopped.
        assert_start_stopped(&log, NAME).await;
    })
    .await;
    assert_virtual(wall, FILE_START_TIMEOUT);
}

/// The configuration's `service_start_timeout` fails a start (here one that a call triggers)
/// that never takes its name with `TimedOut`, once it has passed and not at once.
#[tokio::test(start_paused = true)]
async fn service_start_timeout_fails_a_start_that_never_takes_its_name() {
    const SERVICE_START_TIMEOUT: Duration = Duration::from_secs(90);
    const NAME: &str = "org.example.Sleepy";
    let _one = ONE_BUS.lock().await;
    let wall = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"<servicedir>services</servicedir>
  <limit name="service_start_timeout">{}</limit>"#,
        millis(SERVICE_START_TIMEOUT)
    );
    let service = format!("[D-BUS Service]\nName={NAME}\nExec=/bin/sleep 600\n");
    let files = [("services/org.example.Sleepy.service", service.as_str())];
    let bus = bus_in(dir.path(), &config, &files, Options::default());
    let socket = bus.socket.clone();
    let (log, _logging) = Log::capture();
    serve_while(bus, async {
        let start = Instant::now();
        let (mut caller, serial) = blocking(move || {
            let mut caller = RawClient::connect(&socket);
            let method = ("/org/example", "org.example.Test", "Wake");
            let serial = send_call(&mut caller, NAME, method, &());
            (caller, serial)
        })
        .await;
        until_readable(&caller.stream, SERVICE_START_TIMEOUT * 2, "the caller").await;
        let took = start.elapsed();
        let err = blocking(move || caller.reply_to(serial))
            .await
            .expect_err("a start that timed out succeeded");
        assert_eq!(error_name(&err), TIMED_OUT, "{}", error_text(&err));
        assert!(
            took >= SERVICE_START_TIMEOUT && took < SERVICE_START_TIMEOUT + SLACK,
            "the start failed after {took:?} of virtual time: {}",
            error_text(&err)
        );
        assert_start_stopped(&log, NAME).await;
    })
    .await;
    assert_virtual(wall, SERVICE_START_TIMEOUT);
}

/// `StartServiceByName(name)`: the error name of a start that failed.
fn failed_start(c: &mut RawClient, name: &str) -> String {
    let err = c
        .driver_call("StartServiceByName", &(name, 0u32))
        .expect_err("a failing service started");
    error_name(&err)
}

/// The start-limit guard (`--start-limit-burst`, `--start-limit-interval-ms`): after as many
/// failed starts as the burst, further starts are refused at once, without a spawn, until the
/// first failure is older than the interval; then the service is started again.
#[tokio::test(start_paused = true)]
async fn a_service_failing_repeatedly_is_refused_until_the_interval_has_passed() {
    const START_LIMIT_INTERVAL: Duration = Duration::from_secs(600);
    const NAME: &str = "org.test.fail.Limit";
    const CHILD_EXITED: &str = "org.freedesktop.DBus.Error.Spawn.ChildExited";
    const REFUSED: &str = "org.freedesktop.DBus.Error.Spawn.Failed";
    let _one = ONE_BUS.lock().await;
    let wall = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let file = toml_text(NAME, &["/bin/sh", "-c", "exit 3"], "");
    let files = [("activation/limit.toml", file.as_str())];
    let opts = Options {
        start_limit_burst: Some(3),
        start_limit_interval_ms: Some(millis(START_LIMIT_INTERVAL)),
        ..activation_opts(dir.path())
    };
    let bus = bus_in(dir.path(), "", &files, opts);
    let socket = bus.socket.clone();
    let (log, _logging) = Log::capture();
    serve_while(bus, async {
        let began = Instant::now();
        let (mut c, failures) = blocking(move || {
            let mut c = RawClient::connect(&socket);
            let failures: Vec<String> = (0..4).map(|_| failed_start(&mut c, NAME)).collect();
            (c, failures)
        })
        .await;
        assert_eq!(
            failures,
            [CHILD_EXITED, CHILD_EXITED, CHILD_EXITED, REFUSED]
        );
        assert!(
            began.elapsed() < SLACK,
            "refused after {:?}",
            began.elapsed()
        );
        assert_eq!(log.spawned(NAME).len(), 3, "a refused start spawned");

        // Refused (without a spawn) until the first failure is older than the interval.
        tokio::time::sleep_until(began + START_LIMIT_INTERVAL - SLACK).await;
        let deadline = began + START_LIMIT_INTERVAL + Duration::from_secs(10);
        let mut refused_late = 0;
        loop {
            let (back, error) = blocking(move || {
                let error = failed_start(&mut c, NAME);
                (c, error)
            })
            .await;
            c = back;
            match error.as_str() {
                REFUSED => {
                    refused_late += 1;
                    assert_eq!(log.spawned(NAME).len(), 3, "a refused start spawned");
                }
                CHILD_EXITED => break,
                other => panic!("unexpected {other}"),
            }
            assert!(Instant::now() < deadline, "never allowed to start again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            refused_late > 0,
            "allowed again before the interval had passed"
        );
        assert!(
            began.elapsed() >= START_LIMIT_INTERVAL,
            "started again after {:?}",
            began.elapsed()
        );
        assert_eq!(log.spawned(NAME).len(), 4);
    })
    .await;
    assert_virtual(wall, START_LIMIT_INTERVAL);
}
