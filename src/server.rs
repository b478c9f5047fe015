//! The running bus: it binds the address, tells it, accepts connections on one thread, and shuts
//! down cleanly on SIGTERM or SIGINT.

use std::cell::{Cell, RefCell};
use std::os::fd::{BorrowedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use tokio::sync::Notify;
use tokio::sync::mpsc::{self, UnboundedSender};

use crate::activation::{Activation, StartPolicy, files, watch};
use crate::address::{ListenAddress, random_hex};
use crate::auth::AuthPolicy;
use crate::bus::activation::CoreEvent;
use crate::bus::{Bus, Limits};
use crate::cli::Options;
use crate::connection::{self, Shared};
use crate::supervisor::{self, Supervisor};
use crate::wire::{FrameLimits, MAX_MESSAGE_SIZE};

/// Runs the bus until a signal stops it.
pub fn run(opts: Options) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(opts))
}

async fn serve(opts: Options) -> Result<(), String> {
    raise_fd_limit();
    // Before the address is printed: whoever reads it may signal the bus at once.
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch SIGINT: {e}"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    let wanted = match &opts.address {
        Some(a) => ListenAddress::parse(a).map_err(|e| e.to_string())?,
        None => ListenAddress::session_default(),
    };
    let (std_listener, bound) = wanted.bind().map_err(|e| e.to_string())?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make the listening socket non-blocking: {e}"))?;
    let listener = UnixListener::from_std(std_listener)
        .map_err(|e| format!("cannot register the listening socket: {e}"))?;
    let _cleanup = SocketFile(bound.socket_file().map(Into::into));

    let guid = random_hex(16);
    let address = bound.client_address(&guid);
    info!(%address, "listening");
    if let Some(fd) = opts.print_address {
        print_to_fd(fd, &address)?;
    }
    if let Some(fd) = opts.print_pid {
        print_to_fd(fd, &std::process::id().to_string())?;
    }

    let (events, mut event_rx) = mpsc::unbounded_channel();
    let activation = start_activation(&opts, address_without_guid(&address), events.clone())?;
    let shared = Rc::new(Shared {
        bus: RefCell::new(Bus::new(
            guid.clone(),
            Limits::default(),
            activation,
            events,
        )),
        auth: AuthPolicy {
            guid,
            owner_uid: nix::unistd::getuid().as_raw(),
            timeout: Duration::from_secs(30),
            max_line: 16 * 1024,
        },
        frame_limits: FrameLimits {
            max_message_size: MAX_MESSAGE_SIZE,
            max_fds: 253,
        },
        scratch: RefCell::new(Vec::new()),
        incomplete: Cell::new(0),
        flush_wake: Notify::new(),
    });
    let flusher = shared.clone();
    tokio::task::spawn_local(async move { flusher.flush_forever().await });

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::task::spawn_local(connection::serve(shared.clone(), stream));
                }
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(event) = event_rx.recv() => handle_event(&shared, event),
            _ = hup.recv() => handle_event(&shared, CoreEvent::Reload("SIGHUP")),
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }
    Ok(())
}

/// Makes the broker the subreaper of what it starts, starts the reaper, and loads the activation
/// files: those of `--activation-dir`, then the standard session directories.
fn start_activation(
    opts: &Options,
    address: String,
    events: UnboundedSender<CoreEvent>,
) -> Result<Activation, String> {
    supervisor::become_subreaper().map_err(|e| format!("cannot become a child subreaper: {e}"))?;
    let (supervisor, mut exits) =
        Supervisor::start().map_err(|e| format!("cannot start the reaper: {e}"))?;
    let forward = events.clone();
    tokio::task::spawn_local(async move {
        while let Some(exit) = exits.recv().await {
            if forward.send(CoreEvent::Exited(exit)).is_err() {
                return;
            }
        }
    });
    let mut dirs = opts.activation_dirs.clone();
    dirs.extend(files::session_dirs(|k| std::env::var(k).ok()));
    tokio::task::spawn_local(watch::watch_dirs(dirs.clone(), events));
    let mut policy = StartPolicy::default();
    if let Some(ms) = opts.start_timeout_ms {
        policy.timeout = Duration::from_millis(ms);
    }
    if let Some(n) = opts.start_limit_burst {
        policy.limit_burst = n as usize;
    }
    if let Some(ms) = opts.start_limit_interval_ms {
        policy.limit_interval = Duration::from_millis(ms);
    }
    Ok(Activation::new(dirs, policy, Some(supervisor), address))
}

/// Each connection takes a file descriptor: like dbus-daemon, take all the kernel allows.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => warn!("cannot read the open-file limit: {e}"),
    }
}

/// The address without its `guid=`, as services are given it.
fn address_without_guid(address: &str) -> String {
    address
        .split(',')
        .filter(|kv| !kv.starts_with("guid="))
        .collect::<Vec<_>>()
        .join(",")
}

fn handle_event(shared: &Shared, event: CoreEvent) {
    shared.bus.borrow_mut().handle_event(event);
    shared.schedule_flush();
}

/// Writes `line` and a newline to `fd` in one write; an fd other than stdout and stderr is then
/// closed, so that no child inherits it.
fn print_to_fd(fd: RawFd, line: &str) -> Result<(), String> {
    let text = format!("{line}\n");
    // SAFETY: the fd was handed to us on the command line; it stays open for this call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let written = nix::unistd::write(borrowed, text.as_bytes())
        .map_err(|e| format!("cannot write to fd {fd}: {e}"))?;
    if written != text.len() {
        return Err(format!("short write to fd {fd}"));
    }
    if fd > 2 {
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// Removes the socket file when the bus stops.
struct SocketFile(Option<std::path::PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0
            && let Err(e) = std::fs::remove_file(path)
        {
            warn!("cannot remove socket file {}: {e}", path.display());
        }
    }
}
