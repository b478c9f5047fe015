//! What the integration tests share: a real `broker` process on a temporary socket, and a raw
//! client that speaks the protocol byte by byte, for what well-behaved libraries never send.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zbus::Message;
use zbus::wire::Endian;
use zbus::wire::serialized::{Context, Data};

/// The built example `name`, next to the test binary
/// (`target/debug/deps/<test>-…` → `target/debug/examples/NAME`).
pub fn example_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --examples` (plain `cargo test` builds it)",
        path.display()
    );
    path
}

/// A running broker, stopped with SIGTERM when dropped.
pub struct Broker {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The address the broker printed, with its guid.
    pub address: String,
    log: PathBuf,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// Starts `broker --session` on a socket in a fresh directory, with extra arguments.
    pub fn start_with(extra: &[&str]) -> Broker {
        Broker::start_with_env(extra, &[])
    }

    /// Like `start_with`, with `env` added to the broker's environment.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        Broker::launch(dir, Some("--session"), extra, env)
    }

    /// Starts the broker on the configuration file `config` (its `<listen>` is overridden by a
    /// socket of the test's).
    pub fn start_with_config(config: &str) -> Broker {
        Broker::start_with_config_files(config, &[], &[])
    }

    fn launch(
        dir: tempfile::TempDir,
        kind: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Broker {
        let socket = dir.path().join("bus");
        let log = dir.path().join("broker.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(kind)
            .arg(format!("--address=unix:path={}", socket.display()))
            .arg("--print-address")
            .args(extra)
            .env(
                "BROKER_LOG",
                std::env::var("TEST_BROKER_LOG").unwrap_or("debug".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start broker");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read address");
        assert!(
            line.starts_with("unix:path="),
            "broker printed {line:?}; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Broker {
            child,
            dir,
            socket,
            address: line.trim().to_owned(),
            log,
        }
    }

    /// The address for clients, without the guid.
    pub fn client_address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// A zbus client connection.
    pub async fn zbus(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.client_address().as_str())
            .build()
            .await
            .expect("zbus connects")
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().expect("wait broker")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.is_running() {
            self.stop();
        }
    }
}

/// A client on a plain socket that authenticates and frames messages itself.
pub struct RawClient {
    pub stream: UnixStream,
    buf: Vec<u8>,
    /// File descriptors received and not yet handed out with a message.
    fds: Vec<std::os::fd::OwnedFd>,
    pub unique: String,
    serial: u32,
}

impl RawClient {
    /// Connects and authenticates (negotiating fd passing), without `Hello`.
    pub fn connect_unregistered(socket: &Path) -> RawClient {
        RawClient::authenticate(socket, true)
    }

    /// Connects and authenticates, with or without fd passing, without `Hello`.
    pub fn authenticate(socket: &Path, unix_fds: bool) -> RawClient {
        let uid = nix::unistd::getuid().as_raw().to_string();
        let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
        RawClient::authenticate_with(socket, &format!("AUTH EXTERNAL {hex}"), unix_fds)
    }

    /// Connects, authenticates anonymously (`<allow_anonymous/>`) and says `Hello`.
    pub fn connect_anonymous(socket: &Path) -> RawClient {
        RawClient::register(RawClient::authenticate_with(socket, "AUTH ANONYMOUS", true))
    }

    /// Connects and authenticates with the `auth` line, without `Hello`.
    pub fn authenticate_with(socket: &Path, auth: &str, unix_fds: bool) -> RawClient {
        let mut stream = UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let negotiate = if unix_fds {
            "NEGOTIATE_UNIX_FD\r\n"
        } else {
            ""
        };
        stream
            .write_all(format!("\0{auth}\r\n{negotiate}BEGIN\r\n").as_bytes())
            .expect("auth");
        let mut client = RawClient {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
            unique: String::new(),
            serial: 1,
        };
        let ok = client.read_line();
        assert!(ok.starts_with("OK "), "auth reply {ok:?}");
        if unix_fds {
            let agree = client.read_line();
            assert_eq!(agree, "AGREE_UNIX_FD");
        }
        client
    }

    /// Connects, authenticates (negotiating fd passing) and says `Hello`.
    pub fn connect(socket: &Path) -> RawClient {
        RawClient::register(RawClient::connect_unregistered(socket))
    }

    /// Says `Hello` on an authenticated client.
    pub fn register(mut client: RawClient) -> RawClient {
        let hello = client.driver_call("Hello", &()).expect("Hello");
        client.unique = hello.body().deserialize::<String>().expect("unique name");
        // NameAcquired for the unique name follows the reply.
        let acquired = client.recv_until(|m| member_of(m) == "NameAcquired");
        assert_eq!(
            acquired.body().deserialize::<String>().unwrap(),
            client.unique
        );
        client
    }

    fn read_line(&mut self) -> String {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return String::from_utf8_lossy(&line[..pos]).into_owned();
            }
            self.fill();
        }
    }

    fn fill(&mut self) {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
        let mut chunk = [0u8; 65536];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
        let msg = recvmsg::<()>(
            self.stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("read from broker");
        let n = msg.bytes;
        for c in msg.cmsgs().expect("cmsgs") {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: fresh descriptors from the kernel.
                self.fds.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        assert!(n > 0, "broker closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    pub fn next_serial(&mut self) -> std::num::NonZeroU32 {
        self.serial += 1;
        std::num::NonZeroU32::new(self.serial).expect("nonzero")
    }

    pub fn send(&mut self, msg: &Message) {
        self.stream.write_all(msg.data().bytes()).expect("send");
    }

    /// Sends `bytes` in one `sendmsg` with `fds` attached.
    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[std::os::fd::RawFd]) {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::os::fd::AsRawFd;
        let iov = [std::io::IoSlice::new(bytes)];
        let sent = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(sent, bytes.len(), "short sendmsg");
    }

    /// Reads one message.
    pub fn recv(&mut self) -> Message {
        loop {
            if self.buf.len() >= 16 {
                let u32_at = |b: &[u8], at: usize| {
                    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
                };
                let total = (16 + u32_at(&self.buf, 12)).next_multiple_of(8) + u32_at(&self.buf, 4);
                if self.buf.len() >= total {
                    let bytes: Vec<u8> = self.buf.drain(..total).collect();
                    let data = Data::new_fds(
                        bytes,
                        Context::new(Endian::Little, 0),
                        std::mem::take(&mut self.fds),
                    );
                    // SAFETY: the broker validated this message; the test trusts its bus.
                    return unsafe { Message::from_bytes(data) }
                        .expect("valid message from broker");
                }
            }
            self.fill();
        }
    }

    /// Reads messages until one satisfies `pred`, dropping the others.
    pub fn recv_until(&mut self, pred: impl Fn(&Message) -> bool) -> Message {
        loop {
            let msg = self.recv();
            if pred(&msg) {
                return msg;
            }
        }
    }

    /// Calls a driver method and returns its reply (`Err` holds an error reply).
    pub fn driver_call<B>(&mut self, member: &str, body: &B) -> Result<Message, Message>
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        let (reply, _before) = self.driver_call_keeping(member, body);
        match reply.message_type() {
            zbus::message::Type::Error => Err(reply),
            _ => Ok(reply),
        }
    }

    /// Calls a driver method; returns its reply (or error) and the messages that came before
    /// it (what the call made the bus send first, such as messages held for a name).
    pub fn driver_call_keeping<B>(&mut self, member: &str, body: &B) -> (Message, Vec<Message>)
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        let serial = self.next_serial();
        let call = Message::method_call("/org/freedesktop/DBus", member)
            .interface("org.freedesktop.DBus")
            .destination("org.freedesktop.DBus")
            .serial(serial)
            .build(body)
            .expect("build call");
        self.send(&call);
        let mut before = Vec::new();
        loop {
            let msg = self.recv();
            if msg.header().reply_serial() == Some(serial) {
                return (msg, before);
            }
            before.push(msg);
        }
    }

    /// Waits for the reply to `serial`.
    pub fn reply_to(&mut self, serial: std::num::NonZeroU32) -> Result<Message, Message> {
        let reply = self.recv_until(|m| m.header().reply_serial() == Some(serial));
        match reply.message_type() {
            zbus::message::Type::Error => Err(reply),
            _ => Ok(reply),
        }
    }

    /// Whether the broker has closed this connection (EOF within the timeout).
    pub fn closed_by_broker(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

pub fn member_of(msg: &Message) -> String {
    msg.header()
        .member()
        .map(|m| m.to_string())
        .unwrap_or_default()
}

pub fn error_name(msg: &Message) -> String {
    msg.header()
        .error_name()
        .map(|m| m.to_string())
        .unwrap_or_default()
}

/// Runs a command line client with the bus as the session bus; returns (success, stdout, stderr).
pub fn run_client(broker: &Broker, program: &str, args: &[&str]) -> (bool, String, String) {
    run_client_at(&broker.client_address(), program, args)
}

/// Waits at most `limit` for `child` to exit; one still running then is killed, and `None` is
/// returned.
pub fn wait_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The Debian package that brings each outside program the tests run (`tests/run` installs them).
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("dbus-send", "dbus-bin"),
    ("dbus-monitor", "dbus-bin"),
    ("gdbus", "libglib2.0-bin"),
    ("busctl", "systemd"),
    ("systemd-socket-activate", "systemd"),
    ("systemd-analyze", "systemd"),
    ("systemctl", "systemd"),
    ("dbus-daemon", "dbus-daemon"),
    ("dbus-run-session", "dbus-daemon"),
    ("setpriv", "util-linux"),
    ("/usr/bin/python3", "python3-dbus python3-gi"),
];

/// A command for an outside program, checked to exist first: a missing one fails the test
/// with the package to install, not just "No such file or directory".
pub fn tool(program: &str) -> Command {
    let found = if program.contains('/') {
        Path::new(program).is_file()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
    };
    if !found {
        let package = TOOL_PACKAGES
            .iter()
            .find(|(name, _)| *name == program)
            .map_or("the package that has it", |(_, package)| package);
        panic!("{program} is not installed: apt-get install {package} (tests/run installs it)");
    }
    Command::new(program)
}

/// Runs a command line client with `address` as the session bus; returns (success, stdout, stderr).
pub fn run_client_at(address: &str, program: &str, args: &[&str]) -> (bool, String, String) {
    let out = tool(program)
        .args(args)
        .env("DBUS_SESSION_BUS_ADDRESS", address)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The D-Bus error name a zbus call failed with, or a description of a failure that is not one.
pub fn zbus_error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(e) => fdo_error_name(e),
        other => format!("(not a D-Bus error reply: {other})"),
    }
}

/// The D-Bus error name of a failed `zbus::fdo` proxy call.
pub fn fdo_error_name(e: &zbus::fdo::Error) -> String {
    use zbus::DBusError;
    match e {
        zbus::fdo::Error::ZBus(inner) => zbus_error_name(inner),
        other => other.name().to_string(),
    }
}

/// Awaits `fut`, failing the test with `what` if it takes more than ten seconds: a lost message
/// must fail the test, not hang it.
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The names the bus lists, sorted.
pub async fn list_names(proxy: &zbus::fdo::DBusProxy<'_>) -> Vec<String> {
    let listed = proxy.list_names().await.expect("ListNames");
    let mut names: Vec<String> = listed.iter().map(|n| n.to_string()).collect();
    names.sort();
    names
}

impl Broker {
    /// Like `start_with_config`, with `files` (paths relative to the configuration file's
    /// directory, and their contents) written first, so that the configuration can name them
    /// (`<servicedir>services</servicedir>`, `<include>`), and with `extra` arguments.
    pub fn start_with_config_files(config: &str, files: &[(&str, &str)], extra: &[&str]) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write_config_files(dir.path(), config, files);
        let arg = format!("--config-file={}", file.display());
        let mut args = vec![arg.as_str()];
        args.extend_from_slice(extra);
        Broker::launch(dir, None, &args, &[])
    }

    /// The configuration file of a broker started with `start_with_config*`.
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("bus.conf")
    }
}

/// Writes `config` as `dir/bus.conf` and each of `files` under `dir`; returns the configuration
/// file's path.
pub fn write_config_files(dir: &Path, config: &str, files: &[(&str, &str)]) -> PathBuf {
    for (name, text) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("directory for a config file");
        }
        std::fs::write(&path, text).expect("write a file next to the config");
    }
    let file = dir.join("bus.conf");
    std::fs::write(&file, config).expect("config file");
    file
}

/// What the stock session configuration allows: sending, receiving, eavesdropping, owning.
pub const ALLOW_ALL: &str = r#"
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>"#;

/// A configuration file: the stock session header, then `body`.
pub fn bus_config(body: &str) -> String {
    format!(
        "<busconfig>\n  <type>session</type>\n  <listen>unix:tmpdir=/tmp</listen>\n  \
         <auth>EXTERNAL</auth>\n{body}\n</busconfig>\n"
    )
}

/// A configuration that allows everything, with `extra` (limits, directories…) after the policy.
pub fn open_config(extra: &str) -> String {
    bus_config(&format!(
        "  <policy context=\"default\">{ALLOW_ALL}\n  </policy>\n  {extra}"
    ))
}

/// The parent of `pid` from `/proc/PID/stat`; `None` once it is gone.
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// The ancestors of `pid`, its parent first, up to init (or as far as they still exist).
/// A service of the bus descends from it through the spawner and the service's keeper.
pub fn ancestors(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut at = pid;
    while let Some(parent) = parent_pid(at).filter(|&p| p > 1 && !found.contains(&p)) {
        found.push(parent);
        at = parent;
    }
    found
}

/// Runs `test` with a started supervisor (its reaper, and a spawner of the built `broker`
/// through which services start, as the bus starts them) on a current-thread runtime, as a
/// child subreaper. The spawner is collected afterwards, so a later test's reaper never sees it.
pub fn with_supervisor<F, Fut>(test: F)
where
    F: FnOnce(
        broker::supervisor::Supervisor,
        tokio::sync::mpsc::UnboundedReceiver<broker::supervisor::ProcessEvent>,
    ) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    broker::supervisor::become_subreaper().expect("become a subreaper");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let spawner = local.block_on(&runtime, async {
        let (mut supervisor, events) =
            broker::supervisor::Supervisor::start().expect("start the supervisor");
        let _gone = supervisor
            .start_spawner(Path::new(env!("CARGO_BIN_EXE_broker")))
            .expect("start the spawner");
        let spawner = supervisor.spawner_pid();
        test(supervisor, events).await;
        spawner
    });
    // The keepers' sockets close with the tasks, the spawner's channel with the supervisor:
    // the spawner ends.
    drop(local);
    drop(runtime);
    if let Some(pid) = spawner.and_then(|pid| i32::try_from(pid).ok()) {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }
}
