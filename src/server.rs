//! The running bus. `run` is the `broker` command's part: it binds the addresses, tells them,
//! leaves the foreground when asked, and turns SIGTERM and SIGINT into a shutdown and SIGHUP
//! into a reload. `serve` is the bus itself, on listeners and a shutdown that its caller gives
//! it: it accepts connections on one thread until the shutdown resolves.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use tokio::sync::Notify;
use tokio::sync::mpsc::{self, UnboundedSender};

use std::path::PathBuf;

use crate::activation::{Activation, StartPolicy, StarterBus, watch};
use crate::address::{self, ListenAddress, random_hex};
use crate::auth::{AuthPolicy, Mechanisms};
use crate::bus::events::CoreEvent;
use crate::bus::settings::Settings;
use crate::bus::{Bus, Limits};
use crate::cli::Options;
use crate::config::{self, Config};
use crate::daemon::PrintFds;
use crate::peer_task::{self, Shared};
use crate::supervisor::{self, ProcessEvent, Supervisor};
use crate::wire::{FrameLimits, MAX_MESSAGE_SIZE};
use crate::{daemon, log_limit, logging, notify};

/// Runs the bus until a signal stops it. Reads the configuration, directs the log, and forks
/// when asked to, all before the runtime starts. `prints` holds the descriptors of
/// `--print-address` and `--print-pid`, taken at start-up.
pub fn run(mut opts: Options, prints: PrintFds) -> Result<(), String> {
    let config = load_config(&opts)?;
    logging::direct(opts.log_target, config.syslog);
    let readiness = if opts.fork.unwrap_or(config.fork) {
        Some(leave_foreground(&mut opts, config.keep_umask)?)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(start(opts, config, readiness, prints))
}

/// `--fork`: forks, and leaves the working directory (paths the bus reads later are made
/// absolute first).
fn leave_foreground(opts: &mut Options, keep_umask: bool) -> Result<daemon::Readiness, String> {
    let absolute = |path: &PathBuf| {
        std::path::absolute(path).map_err(|e| format!("cannot resolve {}: {e}", path.display()))
    };
    if let Some(file) = &opts.config_file {
        opts.config_file = Some(absolute(file)?);
    }
    opts.activation_dirs = opts
        .activation_dirs
        .iter()
        .map(absolute)
        .collect::<Result<_, _>>()?;
    let readiness = daemon::fork_to_background(keep_umask)?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot change to /: {e}"))?;
    Ok(readiness)
}

/// What `broker` does around the bus: binds the listening sockets, writes the pid file, tells
/// the address (`--print-address`, the service manager, a waiting `--fork` parent), serves until
/// SIGTERM or SIGINT, and removes its socket files and pid file after.
async fn start(
    opts: Options,
    config: Config,
    readiness: Option<daemon::Readiness>,
    prints: PrintFds,
) -> Result<(), String> {
    raise_fd_limit();
    // Before the address is printed: whoever reads it may signal the bus at once.
    let (shutdown, reloads) = watch_signals()?;
    // A configuration the bus cannot use is refused before anything is bound or printed.
    mechanisms_of(&config)?;
    let bound = bind_all(&opts, &config)?;
    let _pid_file = match (&config.pidfile, opts.nopidfile) {
        (Some(path), false) => Some(daemon::PidFile::create(path)?),
        _ => None,
    };
    let guid = random_hex(16);
    let address = bound
        .first()
        .map(|(_, bound, _)| bound.client_address(&guid))
        .ok_or("the configuration gives no address to listen on")?;
    // Before the drop to <user>: the system spawner keeps root to start services as theirs.
    let system_spawner = start_system_spawner(&opts, &config, &address)?;
    if let Some(user) = &config.user {
        daemon::become_user(user)?;
    }
    announce(&opts, &address, prints, readiness)?;
    let mut listeners = Vec::new();
    let mut socket_files = Vec::new();
    for (listener, bound, socket_file) in bound {
        debug!(address = %bound.client_address(""), "accepting");
        listeners.push(listener);
        socket_files.push(socket_file);
    }
    let setup = BusSetup {
        opts,
        config,
        guid,
        address,
        notify_stopping: true,
        spawner_exe: None,
        system_spawner,
    };
    let served = serve(setup, listeners, reloads, shutdown).await;
    // Removes the socket files, now that nothing listens on them.
    drop(socket_files);
    served
}

/// On a system bus (`<type>system</type>`), starts the spawner in system mode, as whoever runs
/// the bus (root, normally), with what it may ever use: the service directories as read now
/// (`--activation-dir`s, then the `<servicedir>`s; a reload does not change them), the bus's
/// address for the services, and the grace. `None` on any other bus.
fn start_system_spawner(
    opts: &Options,
    config: &Config,
    address: &str,
) -> Result<Option<supervisor::SystemSpawner>, String> {
    if config.bus_type.as_deref() != Some("system") {
        return Ok(None);
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find broker's own executable for its spawner: {e}"))?;
    let mut dirs = opts.activation_dirs.clone();
    dirs.extend(config.servicedirs.iter().cloned());
    let system = supervisor::spawner::SystemConfig {
        dirs,
        starter: StarterBus {
            address: address.to_owned(),
            bus_type: config.bus_type.clone(),
        },
        grace: opts
            .stop_grace_ms
            .map_or(supervisor::DEFAULT_STOP_GRACE, Duration::from_millis),
    };
    let spawner = supervisor::SystemSpawner::start(&exe, &system)
        .map_err(|e| format!("cannot start the system spawner: {e}"))?;
    // Quiet at start, as every working bus (tests start one per test).
    debug!(
        uid = nix::unistd::geteuid().as_raw(),
        dirs = ?system.dirs,
        "system bus: services start as their file's User=, through the spawner"
    );
    Ok(Some(spawner))
}

/// Tells where the bus listens: `--print-address` and `--print-pid`, the service manager, and a
/// waiting `--fork` parent; then a forked daemon lets go of its standard streams.
fn announce(
    opts: &Options,
    address: &str,
    prints: PrintFds,
    readiness: Option<daemon::Readiness>,
) -> Result<(), String> {
    // Like dbus-daemon, a bus that works says nothing on stderr (test harnesses start one per
    // test). Only an address that broker chose itself and did not print is told here.
    let chosen_and_untold =
        opts.print_address.is_none() && opts.address.is_none() && opts.config_file.is_none();
    if chosen_and_untold {
        info!(%address, "listening");
    } else {
        debug!(%address, "listening");
    }
    prints.print(address)?;
    // Before a forking parent exits, so that the manager learns the daemon's pid first.
    notify::ready(&address_without_guid(address), readiness.is_some());
    if let Some(readiness) = readiness {
        readiness.signal();
        daemon::detach_stdio();
    }
    Ok(())
}

/// SIGTERM and SIGINT become the bus's shutdown, each SIGHUP a reload request. The handlers are
/// installed at once (the default action of each signal ends the process).
fn watch_signals() -> Result<(impl Future<Output = ()>, mpsc::UnboundedReceiver<()>), String> {
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch SIGINT: {e}"))?;
    let reloads = watch_hangups()?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => debug!("SIGTERM: shutting down"),
            _ = int.recv() => debug!("SIGINT: shutting down"),
        }
    };
    Ok((shutdown, reloads))
}

/// Each SIGHUP becomes a reload request: the configuration is read again.
pub(crate) fn watch_hangups() -> Result<mpsc::UnboundedReceiver<()>, String> {
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    let (reload, reloads) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if reload.send(()).is_err() {
                return;
            }
        }
    });
    Ok(reloads)
}

/// What a bus serves with, besides its listening sockets.
pub struct BusSetup {
    /// The command line: activation directories and start limits, and where a reload reads the
    /// configuration again ([`load_config`]).
    pub opts: Options,
    /// The configuration read for `opts`.
    pub config: Config,
    /// The bus's id (32 hex digits): `GetId` returns it, the authentication tells it, and the
    /// address carries it.
    pub guid: String,
    /// The address clients are told, with `guid=`; started services are given it.
    pub address: String,
    /// Whether the service manager of `NOTIFY_SOCKET` is told `STOPPING=1` when the bus stops:
    /// `broker` is the service the manager started; a bus in a test's process is not.
    pub notify_stopping: bool,
    /// The `broker` binary, exec'd as the spawner that starts every service under a keeper
    /// of its own; `None`: this process's own executable. A bus inside a test binary names
    /// the real `broker` here.
    pub spawner_exe: Option<PathBuf>,
    /// A system bus's spawner, started before the bus dropped its privileges; `None`: the bus
    /// starts a session-mode spawner of its own (`spawner_exe`).
    pub system_spawner: Option<supervisor::SystemSpawner>,
}

/// The bus itself: serves `setup` on `listeners` until `shutdown` resolves, and reads the
/// configuration again for each message on `reloads` (SIGHUP's, for `broker`). Taking both from
/// the caller (as mini-redis's `server::run(listener, shutdown)` does) lets a test run the bus
/// in its own process, on a listener it bound, with tokio's clock paused.
///
/// The bus runs on the calling thread. Its tasks (connections, timers, the reaper) run in a
/// task set of its own, dropped when `serve` returns. Once shutdown resolves, the service
/// manager is told, the listening sockets close, the services' pending starts are stopped,
/// every connection is closed, and every process the bus started or adopted is stopped within
/// `--stop-grace-ms` (see [`supervisor::stop_all`]); `serve` returns once none is left. The
/// process may run one bus at a time (one reaper collects its children).
pub async fn serve(
    setup: BusSetup,
    listeners: Vec<UnixListener>,
    reloads: mpsc::UnboundedReceiver<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    serve_reporting_exits(setup, listeners, reloads, shutdown, None).await
}

/// [`serve`], also telling `exits` of each process the reaper collects: `broker run` learns
/// so how its command ended, since the reaper alone may wait for children.
pub async fn serve_reporting_exits(
    setup: BusSetup,
    listeners: Vec<UnixListener>,
    reloads: mpsc::UnboundedReceiver<()>,
    shutdown: impl Future<Output = ()>,
    exits: Option<UnboundedSender<ProcessEvent>>,
) -> Result<(), String> {
    let tasks = tokio::task::LocalSet::new();
    tasks
        .run_until(serve_in_task_set(
            setup, listeners, reloads, shutdown, exits,
        ))
        .await
}

/// `serve`, within the bus's task set.
async fn serve_in_task_set(
    setup: BusSetup,
    listeners: Vec<UnixListener>,
    mut reloads: mpsc::UnboundedReceiver<()>,
    shutdown: impl Future<Output = ()>,
    exits: Option<UnboundedSender<ProcessEvent>>,
) -> Result<(), String> {
    let notify_stopping = setup.notify_stopping;
    let stop_grace = setup
        .opts
        .stop_grace_ms
        .map_or(supervisor::DEFAULT_STOP_GRACE, Duration::from_millis);
    let (shared, mut event_rx) = start_bus(setup, exits)?;
    let flusher = shared.clone();
    tokio::task::spawn_local(async move { flusher.flush_forever().await });
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|listener| tokio::task::spawn_local(accept_loop(shared.clone(), listener)))
        .collect();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            Some(event) = event_rx.recv() => handle_event(&shared, event),
            // A caller that sends none may have dropped its sender: the branch is then off.
            Some(()) = reloads.recv() => reload(&shared),
            () = &mut shutdown => break,
        }
    }
    if notify_stopping {
        notify::stopping();
    }
    stop(&shared, accepting, stop_grace).await;
    Ok(())
}

/// The bus's stop, once its shutdown has resolved: no new connections, the starts in progress
/// stopped, every connection closed (so that services see the bus go and may exit on their
/// own), then every process the bus started or adopted stopped within `grace` (SIGTERM, then
/// SIGKILL; see [`supervisor::stop_all`]). Runs inside the bus's task set, so that the reaper
/// collects the processes meanwhile.
async fn stop(shared: &Shared, accepting: Vec<tokio::task::JoinHandle<()>>, grace: Duration) {
    for task in accepting {
        // The task's listener is dropped with it: connecting is refused from now on.
        task.abort();
    }
    let closed = {
        let mut bus = shared.bus.borrow_mut();
        bus.stop_pending_starts();
        // Connections still in their handshake close as when newer ones push them out.
        while bus.evict_incomplete().is_some() {}
        let closed = bus.shut_down_connections();
        bus.close_system_spawner();
        closed
    };
    debug!(connections = closed, "connections closed");
    supervisor::stop_all(grace).await;
    // The services' last words and their keepers' last reports are still in the pipes.
    supervisor::drain_readers(Duration::from_secs(1)).await;
}

/// The core and what every connection task shares, with activation started; and the channel
/// on which the core's events arrive (process exits, timeouts, directory changes).
fn start_bus(
    setup: BusSetup,
    exits: Option<UnboundedSender<ProcessEvent>>,
) -> Result<(Rc<Shared>, mpsc::UnboundedReceiver<CoreEvent>), String> {
    let BusSetup {
        opts,
        config,
        guid,
        address,
        spawner_exe,
        system_spawner,
        ..
    } = setup;
    let mechanisms = mechanisms_of(&config)?;
    let (events, event_rx) = mpsc::unbounded_channel();
    let settings = settings_of(&config, &opts);
    // Services are told the address as printed, guid and all, and the bus type of the
    // configuration read at start, as dbus-daemon tells them.
    let starter = StarterBus {
        address,
        bus_type: config.bus_type.clone(),
    };
    let activation = start_activation(
        &opts,
        &settings,
        starter,
        events.clone(),
        exits,
        (spawner_exe, system_spawner),
    )?;
    let mut bus = Bus::new(guid.clone(), settings.limits.clone(), activation, events);
    bus.apply_settings(settings);
    let reload_opts = opts.clone();
    bus.set_reloader(Box::new(move || {
        load_config(&reload_opts).map(|config| settings_of(&config, &reload_opts))
    }));
    let shared = Rc::new(Shared {
        bus: RefCell::new(bus),
        auth: AuthPolicy {
            guid,
            owner_uid: nix::unistd::getuid().as_raw(),
            timeout: config.limits.auth_timeout,
            max_line: 16 * 1024,
            mechanisms,
        },
        scratch: RefCell::new(Vec::new()),
        flush_wake: Notify::new(),
    });
    Ok((shared, event_rx))
}

/// The configuration: `--config-file`, the stock system one for `--system`, else the stock
/// session one. A malformed file is refused with its path, line and reason.
pub fn load_config(opts: &Options) -> Result<Config, String> {
    let path = match (&opts.config_file, opts.system) {
        (Some(path), _) => path.clone(),
        (None, true) => PathBuf::from(config::SYSTEM_CONF),
        (None, false) => return Ok(guarded(config::session_default())),
    };
    config::load(&path).map_err(|e| e.to_string())
}

/// The authentication mechanisms the configuration allows.
pub(crate) fn mechanisms_of(config: &Config) -> Result<Mechanisms, String> {
    Mechanisms::configured(&config.auth, config.allow_anonymous)
        .map_err(|e| format!("cannot use the configuration: {e}"))
}

/// The stock session configuration, with broker's own tighter guards: the session file's
/// "essentially infinite" limits would let one stuck client hold a gigabyte, and its 240 s
/// `auth_timeout` would let silent connections hold their fds for minutes. A configuration file
/// given with `--config-file` is applied as written.
///
/// `max_incomplete_connections` is kept as configured (10,000): a full count no longer refuses
/// the newest connection but closes the oldest of the uid that holds the most, so a flood can
/// only push out its own uid's connections, and a lower cap would only make a client of the
/// flooding uid more likely to be pushed out before it says `Hello`.
fn guarded(mut config: Config) -> Config {
    let limits = &mut config.limits;
    let max_outgoing = u32::try_from(Limits::default().max_outgoing_bytes).unwrap_or(u32::MAX);
    limits.max_outgoing_bytes = limits.max_outgoing_bytes.min(max_outgoing);
    limits.auth_timeout = limits.auth_timeout.min(Duration::from_secs(30));
    config
}

/// What the core takes from a configuration.
fn settings_of(config: &Config, opts: &Options) -> Settings {
    let limits = &config.limits;
    let max_outgoing_bytes = limits.max_outgoing_bytes as usize;
    let mut activation_dirs = opts.activation_dirs.clone();
    activation_dirs.extend(config.servicedirs.iter().cloned());
    let start_timeout = match opts.start_timeout_ms {
        Some(ms) => Duration::from_millis(ms),
        None => limits.service_start_timeout,
    };
    Settings {
        limits: Limits {
            max_outgoing_bytes,
            max_names_per_connection: limits.max_names_per_connection as usize,
            max_match_rules_per_connection: limits.max_match_rules_per_connection as usize,
            max_replies_per_connection: limits.max_replies_per_connection as usize,
            reply_timeout: limits.reply_timeout,
            max_connections_per_user: limits.max_connections_per_user as usize,
            max_completed_connections: limits.max_completed_connections as usize,
            max_pending_service_starts: limits.max_pending_service_starts as usize,
            frame: FrameLimits {
                max_message_size: (limits.max_message_size as usize).min(MAX_MESSAGE_SIZE),
                max_fds: limits.max_message_unix_fds as usize,
            },
            auth_timeout: limits.auth_timeout,
            max_incomplete_connections: limits.max_incomplete_connections as usize,
            max_incoming_bytes: limits.max_incoming_bytes as usize,
            max_incoming_unix_fds: limits.max_incoming_unix_fds as usize,
            max_outgoing_unix_fds: limits.max_outgoing_unix_fds as usize,
            pending_fd_timeout: limits.pending_fd_timeout,
        },
        policy: config.policy.clone(),
        activation_dirs,
        start_timeout,
    }
}

/// Binds `--address`, or every `<listen>` of the configuration.
fn bind_all(
    opts: &Options,
    config: &Config,
) -> Result<Vec<(UnixListener, ListenAddress, SocketFile)>, String> {
    let parse = |text: &String| {
        ListenAddress::parse(text).map_err(|e| format!("cannot listen on {text}: {e}"))
    };
    let addresses = match &opts.address {
        Some(a) => vec![parse(a)?],
        // The stock session configuration says unix:tmpdir=/tmp; a session bus of our own
        // prefers $XDG_RUNTIME_DIR/bus, where clients look first.
        None if opts.config_file.is_none() && !opts.system => {
            vec![ListenAddress::session_default()]
        }
        None => config.listen.iter().map(parse).collect::<Result<_, _>>()?,
    };
    bind_addresses(addresses)
}

/// Binds each address (`systemd:`: takes systemd's sockets) for tokio, each with the socket
/// file to remove when the bus stops.
pub(crate) fn bind_addresses(
    addresses: Vec<ListenAddress>,
) -> Result<Vec<(UnixListener, ListenAddress, SocketFile)>, String> {
    let mut bound_all = Vec::new();
    for wanted in addresses {
        let bound_here = match wanted {
            // systemd owns the socket files of the sockets it passes: none is removed on exit.
            ListenAddress::Systemd => address::systemd_sockets()
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(listener, bound)| (listener, bound, SocketFile(None)))
                .collect(),
            other => {
                let (listener, bound) = other.bind().map_err(|e| e.to_string())?;
                let socket_file = SocketFile(bound.socket_file().map(Into::into));
                vec![(listener, bound, socket_file)]
            }
        };
        for (std_listener, bound, socket_file) in bound_here {
            std_listener
                .set_nonblocking(true)
                .map_err(|e| format!("cannot make the listening socket non-blocking: {e}"))?;
            let listener = UnixListener::from_std(std_listener)
                .map_err(|e| format!("cannot register the listening socket: {e}"))?;
            bound_all.push((listener, bound, socket_file));
        }
    }
    Ok(bound_all)
}

/// Accepts connections on one listening socket for as long as the bus runs.
async fn accept_loop(shared: Rc<Shared>, listener: UnixListener) {
    // Accepted sockets are registered for reading only, once (see `socket::Listener`).
    let listener = match crate::socket::Listener::new(listener) {
        Ok(listener) => listener,
        Err(e) => return warn!("cannot register a listening socket, not accepting on it: {e}"),
    };
    loop {
        match listener.accept().await {
            Ok(stream) => {
                if let Some(admitted) = peer_task::admit(&shared, stream) {
                    tokio::task::spawn_local(peer_task::serve(shared.clone(), admitted));
                }
            }
            Err(e) => accept_failed(&shared, &e).await,
        }
    }
}

/// After a failed `accept`. Out of file descriptors, the bus closes the oldest incomplete
/// connection of the uid that holds the most, so that a flood of silent connections cannot keep
/// new clients out (the next `accept` takes the freed descriptor); otherwise it backs off
/// instead of spinning.
async fn accept_failed(shared: &Shared, e: &std::io::Error) {
    let out_of_fds = matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE)
    );
    let evicted = if out_of_fds {
        shared.bus.borrow_mut().evict_incomplete()
    } else {
        None
    };
    if log_limit::ACCEPT_FAILED.allow() {
        match &evicted {
            Some(victim) => warn!(
                "accept failed: {e}; closing the oldest incomplete connection of uid {}",
                victim.uid
            ),
            None => warn!("accept failed: {e}"),
        }
    }
    if evicted.is_some() {
        // The closed connection's task runs first and frees its descriptor.
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGHUP: reads the configuration again (a bad file keeps the old one, with a warning).
fn reload(shared: &Shared) {
    // A bad file is already logged by reload_config; the old configuration stays.
    let _ = shared.bus.borrow_mut().reload_config();
    shared.schedule_flush();
}

/// Makes the broker the subreaper of what it starts, starts the reaper, and loads the activation
/// files: those of `--activation-dir`, then the standard session directories.
fn start_activation(
    opts: &Options,
    settings: &Settings,
    starter: StarterBus,
    events: UnboundedSender<CoreEvent>,
    exits: Option<UnboundedSender<ProcessEvent>>,
    (spawner_exe, system_spawner): (Option<PathBuf>, Option<supervisor::SystemSpawner>),
) -> Result<Activation, String> {
    supervisor::become_subreaper().map_err(|e| format!("cannot become a child subreaper: {e}"))?;
    let (mut supervisor, mut reaped) =
        Supervisor::start().map_err(|e| format!("cannot start the reaper: {e}"))?;
    let mut gone = match system_spawner {
        Some(spawner) => supervisor.adopt_spawner(spawner),
        None => {
            let exe = match spawner_exe {
                Some(exe) => exe,
                None => std::env::current_exe().map_err(|e| {
                    format!("cannot find broker's own executable for its spawner: {e}")
                })?,
            };
            supervisor
                .start_spawner(&exe)
                .map_err(|e| format!("cannot start the spawner: {e}"))?
        }
    };
    let tell_gone = events.clone();
    tokio::task::spawn_local(async move {
        while let Some(instance) = gone.recv().await {
            if tell_gone.send(CoreEvent::InstanceGone(instance)).is_err() {
                return;
            }
        }
    });
    let forward = events.clone();
    tokio::task::spawn_local(async move {
        while let Some(exit) = reaped.recv().await {
            if let Some(tell) = &exits {
                // A caller that stopped listening does not stop the bus.
                let _ = tell.send(exit);
            }
            if forward.send(CoreEvent::Exited(exit)).is_err() {
                return;
            }
        }
    });
    let dirs = settings.activation_dirs.clone();
    create_transient_dir(&dirs);
    let mut policy = StartPolicy {
        timeout: settings.start_timeout,
        ..StartPolicy::default()
    };
    if let Some(n) = opts.start_limit_burst {
        policy.limit_burst = n as usize;
    }
    if let Some(ms) = opts.start_limit_interval_ms {
        policy.limit_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = opts.stop_grace_ms {
        policy.stop_grace = Duration::from_millis(ms);
    }
    let mut activation = Activation::new(dirs, policy, Some(supervisor), starter);
    activation.systemd = opts.systemd_activation;
    watch::watch_dirs(activation.dirs_updates(), move |why| {
        events.send(CoreEvent::Reload(why)).is_ok()
    });
    Ok(activation)
}

/// Like dbus-daemon, creates `$XDG_RUNTIME_DIR/dbus-1/services` when it is one of the
/// activation directories, so that programs can drop transient `.service` files there (the
/// directory watch picks them up).
fn create_transient_dir(dirs: &[PathBuf]) {
    use std::os::unix::fs::DirBuilderExt;
    let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) else {
        return;
    };
    let transient = PathBuf::from(runtime).join("dbus-1/services");
    if !dirs.contains(&transient) || transient.is_dir() {
        return;
    }
    let created = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&transient);
    if let Err(e) = created {
        warn!("cannot create {}: {e}", transient.display());
    }
}

/// Each connection takes a file descriptor: like dbus-daemon, take all the kernel allows.
pub(crate) fn raise_fd_limit() {
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

/// The address without its `guid=`.
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

/// Removes the socket file when the bus stops.
pub(crate) struct SocketFile(Option<std::path::PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let Some(path) = &self.0 else {
            return;
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::PermissionDenied
                    && daemon::has_dropped_privileges() =>
            {
                debug!(
                    "leaving socket file {}: the bus's <user> may not remove it ({e}); the \
                     next start replaces it",
                    path.display()
                );
            }
            Err(e) => warn!("cannot remove socket file {}: {e}", path.display()),
        }
    }
}
