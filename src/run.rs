//! `broker run [OPTION]... [--] COMMAND [ARG]...`: a private session bus for the life of one
//! command, as `dbus-run-session` gives one, but one that leaves nothing behind.
//!
//! The bus listens on a fresh socket (in `$XDG_RUNTIME_DIR`, else `/tmp`; `--address` chooses
//! another), COMMAND runs with `DBUS_SESSION_BUS_ADDRESS` naming it, and when COMMAND ends the
//! bus stops as on SIGTERM, so every service it started or adopted is stopped too (see
//! [`crate::server::serve`]). broker then exits with COMMAND's status, or 128+N when COMMAND was
//! killed by signal N, as a shell reports it.
//!
//! COMMAND keeps broker's standard streams and process group, so a terminal's Ctrl-C and job
//! control reach it as if it ran alone. Its end arrives through the reaper, like every child's
//! (nothing else may wait for children). SIGINT and SIGTERM sent to broker go to COMMAND, and
//! the bus runs on until COMMAND ends.

use std::ffi::{c_int, c_void};
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::unistd::{Pid, pipe2, read};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::address::{ListenAddress, random_hex};
use crate::cli::{LogTarget, Options, UsageError};
use crate::daemon::PrintFds;
use crate::server::{self, BusSetup, SocketFile};
use crate::supervisor::{ExitKind, ProcessEvent};

/// The usage line, for the error of a `broker run` without COMMAND.
pub const USAGE: &str = "usage: broker run [OPTION]... [--] COMMAND [ARG]...";

/// broker's own status when the bus cannot start: COMMAND has not run.
const BUS_FAILED: u8 = 1;

/// Options that mean nothing for a bus that lives and dies with its command, refused rather
/// than ignored.
pub fn check_options(opts: &Options) -> Result<(), UsageError> {
    let refused = [
        (opts.system, "--system"),
        (opts.fork == Some(true), "--fork"),
        (opts.log_target == LogTarget::Syslog, "--syslog"),
        (opts.log_target == LogTarget::SyslogOnly, "--syslog-only"),
    ];
    match refused.iter().find(|(given, _)| *given) {
        Some((_, flag)) => Err(UsageError(format!(
            "{flag} cannot be used with broker run (it runs a private session bus in the foreground; --log-file keeps its log)"
        ))),
        None => Ok(()),
    }
}

/// Runs COMMAND beside a private bus and returns the status to exit with. It takes over SIGINT
/// and SIGTERM for the process (see [`StopSignals`]).
pub fn run(opts: Options, command: Vec<String>, prints: PrintFds) -> ExitCode {
    if let Err(e) = init_logging(opts.log_file.as_deref()) {
        return bus_failed(&e);
    }
    let config = match server::load_config(&opts) {
        Ok(config) => config,
        Err(e) => return bus_failed(&e),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let status = match runtime {
        Ok(runtime) => runtime.block_on(run_with_bus(opts, config, command, prints)),
        Err(e) => Err(format!("cannot start the runtime: {e}")),
    };
    match status {
        Ok(status) => ExitCode::from(status),
        Err(e) => bus_failed(&e),
    }
}

/// Says why the bus could not run.
fn bus_failed(why: &str) -> ExitCode {
    eprintln!("broker run: {why}");
    ExitCode::from(BUS_FAILED)
}

/// The bus's log: with `--log-file`, everything `BROKER_LOG` lets through (`info` by default)
/// goes to the file, and warnings and errors to stderr as well; without it only warnings and
/// errors go to stderr (or what `BROKER_LOG` asks for), so that COMMAND's terminal shows the
/// bus only when something is wrong.
fn init_logging(log_file: Option<&Path>) -> Result<(), String> {
    let from_env = |default: &str| {
        EnvFilter::try_from_env("BROKER_LOG").unwrap_or_else(|_| EnvFilter::new(default))
    };
    let file = log_file.map(open_log_file).transpose()?;
    let stderr_filter = match file {
        Some(_) => EnvFilter::new("warn"),
        None => from_env("warn"),
    };
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_filter(stderr_filter);
    let file_layer = file.map(|file| {
        tracing_subscriber::fmt::layer()
            .with_writer(Mutex::new(file))
            .with_ansi(false)
            .with_filter(from_env("info"))
    });
    tracing_subscriber::registry()
        .with(stderr_layer)
        .with(file_layer)
        .try_init()
        .map_err(|e| format!("cannot start logging: {e}"))
}

/// Opens `--log-file` for appending (a log kept across runs), creating it if needed.
fn open_log_file(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))
}

/// Binds a fresh address, serves the bus, runs COMMAND beside it, and once COMMAND has ended
/// stops the bus and returns COMMAND's status.
async fn run_with_bus(
    opts: Options,
    config: crate::config::Config,
    command: Vec<String>,
    prints: PrintFds,
) -> Result<u8, String> {
    server::raise_fd_limit();
    // Before COMMAND can learn broker's pid and signal it.
    let signals = StopSignals::install()?;
    server::mechanisms_of(&config)?;
    let guid = random_hex(16);
    let (listeners, _socket_files, address) = listen(&opts, &guid)?;
    prints.print(&address)?;
    let (exits_tx, exits) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let setup = BusSetup {
        opts,
        config,
        guid,
        address: address.clone(),
        notify_stopping: false,
        spawner_exe: None,
        system_spawner: None,
    };
    let shutdown = async move {
        // A dropped sender stops the bus too.
        let _ = stopped.await;
    };
    let reloads = server::watch_hangups()?;
    let mut bus = std::pin::pin!(server::serve_reporting_exits(
        setup,
        listeners,
        reloads,
        shutdown,
        Some(exits_tx)
    ));
    let mut command_run = std::pin::pin!(run_command(command, &address, exits, signals));
    // The bus is polled first: it starts (and its reaper with it) before COMMAND is spawned, and
    // a bus that cannot start returns before COMMAND runs at all.
    let status = tokio::select! {
        biased;
        served = &mut bus => {
            served?;
            return Err("the bus stopped before the command ended".into());
        }
        status = &mut command_run => status,
    };
    let _ = stop.send(());
    // COMMAND has run: its status stands even if the bus did not stop cleanly.
    if let Err(e) = bus.await {
        error!("the bus did not stop cleanly: {e}");
    }
    // The socket files go with `_socket_files`, now that nothing listens on them.
    Ok(status)
}

/// Binds `--address`, else a fresh socket (see [`private_socket_dir`]); returns the listener,
/// the socket file to remove when the bus has stopped, and the address clients are given.
fn listen(
    opts: &Options,
    guid: &str,
) -> Result<(Vec<UnixListener>, Vec<SocketFile>, String), String> {
    let wanted = match &opts.address {
        Some(text) => {
            ListenAddress::parse(text).map_err(|e| format!("cannot listen on {text}: {e}"))?
        }
        None => ListenAddress::Dir(private_socket_dir()),
    };
    let bound = server::bind_addresses(vec![wanted])?;
    let address = bound
        .first()
        .map(|(_, bound, _)| bound.client_address(guid))
        .ok_or("no address to listen on")?;
    debug!(%address, "listening");
    let (listeners, socket_files) = bound
        .into_iter()
        .map(|(listener, _, socket_file)| (listener, socket_file))
        .unzip();
    Ok((listeners, socket_files, address))
}

/// Where the private socket goes: `$XDG_RUNTIME_DIR` (the user's own, mode 0700) when it is a
/// directory, else `/tmp`, as the stock session configuration says.
fn private_socket_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Spawns COMMAND, passes it SIGINT and SIGTERM, and returns its exit status as broker's: its
/// own status, 128+N if signal N killed it, 127 when it was not found and 126 when it could
/// not be executed.
async fn run_command(
    command: Vec<String>,
    address: &str,
    mut exits: mpsc::UnboundedReceiver<ProcessEvent>,
    mut signals: StopSignals,
) -> u8 {
    let pid = match spawn_command(&command, address) {
        Ok(pid) => pid,
        Err(status) => return status,
    };
    loop {
        tokio::select! {
            // Before a signal: once COMMAND is reaped its pid may be reused.
            biased;
            exit = exits.recv() => match exit {
                Some(ProcessEvent { pid: ended, status }) if ended == pid => {
                    info!(pid, %status, "command ended; stopping the bus");
                    return exit_status(status);
                }
                Some(_) => {}
                None => {
                    error!(pid, "the bus's reaper stopped before the command ended");
                    return BUS_FAILED;
                }
            },
            received = signals.next() => pass_on(received, pid),
        }
    }
}

/// Starts COMMAND with broker's environment, standard streams and process group, and
/// `DBUS_SESSION_BUS_ADDRESS` naming the bus. A COMMAND that cannot start is said on stderr,
/// with the status a shell gives it.
fn spawn_command(command: &[String], address: &str) -> Result<u32, u8> {
    let Some((program, args)) = command.split_first() else {
        eprintln!("broker run: no COMMAND given\n{USAGE}");
        return Err(2);
    };
    match Command::new(program)
        .args(args)
        .env("DBUS_SESSION_BUS_ADDRESS", address)
        .spawn()
    {
        Ok(child) => {
            let pid = child.id();
            debug!(pid, argv = ?command, "command started");
            // Dropping a `Child` neither waits for nor kills it: the reaper collects it.
            drop(child);
            Ok(pid)
        }
        Err(e) => {
            eprintln!("broker run: cannot run {program}: {e}");
            Err(if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            })
        }
    }
}

/// The status to exit with for COMMAND's end, as a shell gives it.
fn exit_status(status: ExitKind) -> u8 {
    let code = match status {
        ExitKind::Exited(code) => code,
        ExitKind::Signaled(signal, _) => 128 + signal,
    };
    u8::try_from(code & 0xff).unwrap_or(u8::MAX)
}

/// Sends COMMAND a SIGINT or SIGTERM that was sent to broker. One that the kernel sent (a
/// terminal's Ctrl-C reaches the whole foreground process group, COMMAND with broker) has
/// reached COMMAND already: it is not sent twice.
fn pass_on(received: io::Result<(Signal, bool)>, pid: u32) {
    let (signal, from_kernel) = match received {
        Ok(received) => received,
        Err(e) => {
            warn!("cannot read the stop signals: {e}");
            return;
        }
    };
    if from_kernel {
        debug!(%signal, "from the terminal: the command has it too");
        return;
    }
    debug!(%signal, pid, "passing the signal on to the command");
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if let Err(e) = kill(Pid::from_raw(raw), signal) {
        warn!(pid, %signal, "cannot pass the signal on to the command: {e}");
    }
}

/// The write end of [`StopSignals`]' pipe, for the handler; -1 until it is open.
static STOP_SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// Set in a byte of the pipe when the kernel sent the signal (a terminal's Ctrl-C, say).
const FROM_KERNEL: u8 = 0x80;

/// SIGINT and SIGTERM, caught by a handler that writes one byte per signal to a pipe: the
/// signal's number, with [`FROM_KERNEL`] when the kernel sent it. A handler (not a blocked
/// mask and a signalfd) leaves COMMAND and the services with the default action: `exec` resets
/// caught signals, while a blocked mask would be inherited.
struct StopSignals(AsyncFd<OwnedFd>);

impl StopSignals {
    /// Opens the pipe and installs the handler. Call it once per process.
    fn install() -> Result<StopSignals, String> {
        let fail = |e: nix::Error| format!("cannot watch SIGINT and SIGTERM: {e}");
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(fail)?;
        // The handler writes to it for as long as the process lives.
        STOP_SIGNAL_PIPE.store(write_end.into_raw_fd(), Ordering::Release);
        let action = SigAction::new(
            SigHandler::SigAction(on_stop_signal),
            SaFlags::SA_SIGINFO | SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler is async-signal-safe: it reads an atomic and calls write(2).
            unsafe { sigaction(signal, &action) }.map_err(fail)?;
        }
        // SAFETY: the `AsyncFd` owns the descriptor: it stays open and the same for as long as
        // it is registered.
        unsafe { AsyncFd::register_with_interest(read_end, Interest::READABLE) }
            .map(StopSignals)
            .map_err(|e| format!("cannot watch SIGINT and SIGTERM: {e}"))
    }

    /// The next signal received, and whether the kernel sent it.
    async fn next(&mut self) -> io::Result<(Signal, bool)> {
        loop {
            let mut ready = self.0.readable().await?;
            let mut byte = [0u8];
            match ready.try_io(|fd| read(fd.get_ref(), &mut byte).map_err(io::Error::from)) {
                Ok(Ok(1)) => {
                    let number = i32::from(byte[0] & !FROM_KERNEL);
                    let signal = Signal::try_from(number).map_err(io::Error::from)?;
                    return Ok((signal, byte[0] & FROM_KERNEL != 0));
                }
                Ok(Ok(_)) => return Err(io::Error::other("the signal pipe closed")),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

/// Writes the signal's number to the pipe of [`StopSignals`], marked when the kernel sent it.
extern "C" fn on_stop_signal(signo: c_int, info: *mut libc::siginfo_t, _: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let from_kernel = !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL;
    let byte = (signo as u8 & !FROM_KERNEL) | if from_kernel { FROM_KERNEL } else { 0 };
    let fd = STOP_SIGNAL_PIPE.load(Ordering::Acquire);
    // SAFETY: write(2) is async-signal-safe; errno is saved and restored around it, so that the
    // interrupted code does not see it change. A full pipe drops the byte: signals coalesce.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(fd, (&raw const byte).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_the_commands_as_a_shell_gives_it() {
        assert_eq!(exit_status(ExitKind::Exited(0)), 0);
        assert_eq!(exit_status(ExitKind::Exited(3)), 3);
        assert_eq!(exit_status(ExitKind::Signaled(15, false)), 143);
        assert_eq!(exit_status(ExitKind::Signaled(9, true)), 137);
    }

    #[test]
    fn options_of_a_daemon_are_refused() {
        let parse = |args: &[&str]| Options::parse(args.iter().map(|s| s.to_string()));
        let ok = parse(&["run", "--activation-dir", "/a", "--", "true"]).unwrap();
        assert!(check_options(&ok).is_ok());
        for flag in ["--fork", "--system", "--syslog", "--syslog-only"] {
            let opts = parse(&["run", flag, "true"]).unwrap();
            let err = check_options(&opts).unwrap_err().0;
            assert!(err.starts_with(flag), "{flag}: {err}");
        }
    }
}
