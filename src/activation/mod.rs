//! Activation: the files that declare activatable names, the services being started, and the
//! rules a start obeys (its environment, its timeout, the guard against restart loops).

pub mod files;
mod queue;
pub mod status;
pub mod watch;

pub use queue::{StartQueue, Started, Waiter};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};
use zbus::fdo;

use crate::bus::error::BusError;
use crate::supervisor::{ExitKind, SpawnError, SpawnSpec, Supervisor};
use files::ServiceFile;
use status::ServiceStatus;

/// Variables of the broker's own environment that describe the broker's own service manager
/// context and must not leak into the services it starts.
const DROPPED_VARIABLES: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "JOURNAL_STREAM",
    "INVOCATION_ID",
];

/// What a started service is told about the bus that starts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StarterBus {
    /// The bus's address with its `guid=`, as dbus-daemon gives it.
    pub address: String,
    /// The configuration's `<type>` at start (`session`, `system`, another name, or none). Like
    /// dbus-daemon's, it is read once: a reload that changes it takes effect at the next start.
    pub bus_type: Option<String>,
}

impl StarterBus {
    /// The variables dbus-daemon sets for its services: `DBUS_STARTER_ADDRESS` always;
    /// `DBUS_STARTER_BUS_TYPE` when the bus has a type; and for a session or system bus, the
    /// variable where clients look for that bus, so that a service connecting to "the session
    /// bus" or "the system bus" reaches the bus that started it.
    pub fn variables(&self) -> Vec<(&'static str, &str)> {
        let mut vars = vec![("DBUS_STARTER_ADDRESS", self.address.as_str())];
        if let Some(bus_type) = &self.bus_type {
            vars.push(("DBUS_STARTER_BUS_TYPE", bus_type));
            match bus_type.as_str() {
                "session" => vars.push(("DBUS_SESSION_BUS_ADDRESS", &self.address)),
                "system" => vars.push(("DBUS_SYSTEM_BUS_ADDRESS", &self.address)),
                _ => {}
            }
        }
        vars
    }
}

/// How starts are timed and limited.
#[derive(Debug, Clone)]
pub struct StartPolicy {
    /// How long a service may take to own its name (a file's `start_timeout_ms` overrides it).
    pub timeout: Duration,
    /// After this many failed starts within `limit_interval`, further starts fail at once.
    pub limit_burst: usize,
    pub limit_interval: Duration,
    /// How long a service stopped by `StopService` has after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
}

impl Default for StartPolicy {
    fn default() -> Self {
        StartPolicy {
            timeout: Duration::from_secs(25),
            limit_burst: 5,
            limit_interval: Duration::from_secs(10),
            stop_grace: crate::supervisor::DEFAULT_STOP_GRACE,
        }
    }
}

/// Why a start failed: the error each caller waiting for it gets.
pub type StartFailure = BusError;

/// The ways a start fails, with dbus-daemon's errors.
impl StartFailure {
    /// No activation file provides `name`.
    pub fn unknown(name: &str) -> StartFailure {
        fdo::Error::ServiceUnknown(format!(
            "The name {name} was not provided by any .service files"
        ))
        .into()
    }

    /// The spawn failed: a system spawner's refusal as it named it, else `Spawn.ExecFailed`.
    pub fn exec(name: &str, e: &SpawnError) -> StartFailure {
        if let Some(refused) = &e.refused {
            return refused.clone();
        }
        fdo::Error::SpawnExecFailed(format!("Failed to start {name}: {e}")).into()
    }

    /// The spawned process ended before the name was taken.
    pub fn exited(name: &str, status: ExitKind) -> StartFailure {
        let error = match status {
            ExitKind::Exited(code) => {
                fdo::Error::SpawnChildExited(format!("Process {name} exited with status {code}"))
            }
            ExitKind::Signaled(signal, _) => {
                fdo::Error::SpawnChildSignaled(format!("Process {name} received signal {signal}"))
            }
        };
        error.into()
    }

    pub fn daemon_died(name: &str) -> StartFailure {
        fdo::Error::SpawnChildExited(format!(
            "Process {name} exited with status 0, and no process it left behind took the name"
        ))
        .into()
    }

    pub fn timed_out(name: &str, after: Duration) -> StartFailure {
        fdo::Error::TimedOut(format!(
            "Activation of {name} timed out after {} ms",
            after.as_millis()
        ))
        .into()
    }

    fn start_limit(name: &str, policy: &StartPolicy) -> StartFailure {
        fdo::Error::SpawnFailed(format!(
            "{name} failed to start {} times within {} ms; not starting it again until that interval has passed",
            policy.limit_burst,
            policy.limit_interval.as_millis()
        ))
        .into()
    }
}

/// All activation state of the bus.
pub struct Activation {
    dirs: Vec<PathBuf>,
    /// Tells the directory watcher where the files are read from, as reloads change it.
    dirs_updates: tokio::sync::watch::Sender<Vec<PathBuf>>,
    services: BTreeMap<String, ServiceFile>,
    failures: HashMap<String, VecDeque<Instant>>,
    /// Variables set by `UpdateActivationEnvironment`.
    env_updates: BTreeMap<String, String>,
    pub policy: StartPolicy,
    supervisor: Option<Supervisor>,
    /// Where services are told the bus is.
    starter: StarterBus,
    /// `--systemd-activation`: services with `SystemdService=` are started by systemd.
    pub systemd: bool,
    /// What the supervisor interface reports of each service.
    status: ServiceStatus,
}

impl Activation {
    /// Activation over `dirs`, starting services through `supervisor` (none: nothing can start).
    /// Nothing is read until the first [`Activation::reload`].
    pub fn new(
        dirs: Vec<PathBuf>,
        policy: StartPolicy,
        supervisor: Option<Supervisor>,
        starter: StarterBus,
    ) -> Activation {
        Activation {
            dirs_updates: tokio::sync::watch::Sender::new(dirs.clone()),
            dirs,
            services: BTreeMap::new(),
            failures: HashMap::new(),
            env_updates: BTreeMap::new(),
            policy,
            supervisor,
            starter,
            systemd: false,
            status: ServiceStatus::default(),
        }
    }

    /// Changes where activation files are read from (the next [`Activation::reload`] reads them).
    pub fn set_dirs(&mut self, dirs: Vec<PathBuf>) {
        if dirs != self.dirs {
            self.dirs_updates.send_replace(dirs.clone());
        }
        self.dirs = dirs;
    }

    /// The activation directories, now and after each change (for the directory watcher).
    pub fn dirs_updates(&self) -> tokio::sync::watch::Receiver<Vec<PathBuf>> {
        self.dirs_updates.subscribe()
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Reads the activation directories again. Returns whether the set of names changed.
    /// Starts in progress keep the definition they started with.
    pub fn reload(&mut self) -> bool {
        let loaded = files::load(&self.dirs);
        for warning in &loaded.warnings {
            warn!("skipping activation file {warning}");
        }
        let changed = !loaded.services.keys().eq(self.services.keys());
        debug!(services = loaded.services.len(), dirs = ?self.dirs, "activation files loaded");
        self.services = loaded.services;
        changed
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    pub fn is_activatable(&self, name: &str) -> bool {
        self.services.contains_key(name)
    }

    pub fn update_environment(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        self.env_updates.extend(vars);
    }

    /// Spawns the service of `name`, within the start limit: the definition it started with,
    /// and its pid.
    pub fn spawn(&mut self, name: &str) -> Result<(ServiceFile, u32), StartFailure> {
        let Some(service) = self.services.get(name).cloned() else {
            return Err(StartFailure::unknown(name));
        };
        if self.over_start_limit(name) {
            if crate::log_limit::START_REFUSED.allow() {
                warn!(
                    service = name,
                    "start refused: it failed too often recently"
                );
            }
            return Err(StartFailure::start_limit(name, &self.policy));
        }
        let Some(supervisor) = &self.supervisor else {
            return Err(fdo::Error::SpawnFailed("this bus cannot start services".into()).into());
        };
        if supervisor.starts_by_name() && service.user.is_none() {
            // As dbus-daemon: refused before the privileged side is asked at all.
            return Err(fdo::Error::SpawnFileInvalid(format!(
                "Cannot do system-bus activation with no user: {} has no User=",
                service.source.display()
            ))
            .into());
        }
        let spec = SpawnSpec {
            argv: service.exec.clone(),
            env: self.environment(&service),
            working_directory: service.working_directory.clone(),
        };
        let pid = match supervisor.spawn_with_grace(name, &spec, self.policy.stop_grace) {
            Ok(pid) => pid,
            Err(e) => {
                warn!(service = name, "cannot start: {e}");
                self.note_failure(name);
                return Err(StartFailure::exec(name, &e));
            }
        };
        Ok((service, pid))
    }

    /// At the bus's stop: lets a system spawner stop its services itself (see
    /// [`Supervisor::close_spawner`]); a session spawner is left to the bus's own stop.
    pub fn close_system_spawner(&self) {
        if let Some(supervisor) = self.supervisor.as_ref().filter(|s| s.starts_by_name()) {
            supervisor.close_spawner();
        }
    }

    /// Asks the keepers of `name`'s instances to stop every process of theirs (SIGTERM, then
    /// SIGKILL after the stop grace); how many instances were asked.
    pub fn stop_instances(&self, name: &str) -> usize {
        self.supervisor.as_ref().map_or(0, |s| s.stop(name))
    }

    /// Stops `name`'s instances after its owner died or its start failed, unless its file
    /// says `leftovers = "keep"`.
    pub fn stop_leftovers(&self, name: &str) {
        let keep = self
            .services
            .get(name)
            .is_some_and(|s| s.leftovers == files::Leftovers::Keep);
        if keep {
            debug!(
                service = name,
                "leaving its processes running: leftovers = keep"
            );
            return;
        }
        let asked = self.stop_instances(name);
        if asked > 0 {
            info!(
                service = name,
                instances = asked,
                "stopping the processes the service left behind"
            );
        }
    }

    /// The living processes of `name`'s instances, `main` first; just `main` where services
    /// do not run under keepers.
    pub fn processes_of(&self, name: &str, main: u32) -> Vec<u32> {
        self.supervisor
            .as_ref()
            .and_then(|s| s.processes_of(name, main))
            .unwrap_or_else(|| if main == 0 { Vec::new() } else { vec![main] })
    }

    /// The keeper of `name`'s newest live instance; 0 if none.
    pub fn keeper_of(&self, name: &str) -> u32 {
        self.supervisor
            .as_ref()
            .and_then(|s| s.keepers_of(name).last().copied())
            .unwrap_or(0)
    }

    /// Whether anything is left of the start whose main process was `main` (`None`: unknown,
    /// services do not run under keepers).
    pub fn instance_is_live(&self, main: u32) -> Option<bool> {
        self.supervisor
            .as_ref()
            .and_then(|s| s.instance_is_live(main))
    }

    /// What is known of each service's state.
    pub fn status(&self) -> &ServiceStatus {
        &self.status
    }

    pub fn status_mut(&mut self) -> &mut ServiceStatus {
        &mut self.status
    }

    /// How long a stopped service has after SIGTERM before SIGKILL.
    pub fn stop_grace(&self) -> Duration {
        self.policy.stop_grace
    }

    /// The last `lines` lines of `name`'s output, oldest first (none on a bus that cannot
    /// start services).
    pub fn output_of(&self, name: &str, lines: usize) -> Vec<String> {
        self.supervisor
            .as_ref()
            .map_or_else(Vec::new, |s| s.output_of(name, lines))
    }

    /// How long `service` may take to own its name: its file's timeout, or the bus's.
    pub fn timeout_of(&self, service: &ServiceFile) -> Duration {
        service.start_timeout.unwrap_or(self.policy.timeout)
    }

    /// The systemd unit that starts `name`, when systemd activation is on and its file names one.
    pub fn systemd_unit(&self, name: &str) -> Option<&str> {
        self.services
            .get(name)
            .filter(|_| self.systemd)
            .and_then(|s| s.systemd_service.as_deref())
    }

    /// The definition of `name`, for a start that someone else performs (systemd).
    pub fn service(&self, name: &str) -> Result<ServiceFile, StartFailure> {
        self.services
            .get(name)
            .cloned()
            .ok_or_else(|| StartFailure::unknown(name))
    }

    /// Records a failed start, for the start-limit guard.
    pub fn note_failure(&mut self, name: &str) {
        self.failures
            .entry(name.to_owned())
            .or_default()
            .push_back(Instant::now());
    }

    fn over_start_limit(&mut self, name: &str) -> bool {
        let Some(times) = self.failures.get_mut(name) else {
            return false;
        };
        let now = Instant::now();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.limit_interval)
        {
            times.pop_front();
        }
        times.len() >= self.policy.limit_burst
    }

    /// The environment of a started service: the broker's own, minus its service manager's
    /// variables, plus `UpdateActivationEnvironment`, plus the file's, plus where the bus is
    /// (which, as with dbus-daemon, no update overrides).
    fn environment(&self, service: &ServiceFile) -> Vec<(OsString, OsString)> {
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
            .filter(|(k, _)| !DROPPED_VARIABLES.iter().any(|d| k == d))
            .collect();
        let added = self
            .env_updates
            .iter()
            .chain(service.environment.iter().map(|(k, v)| (k, v)));
        env.extend(added.map(|(k, v)| (k.into(), v.into())));
        env.extend(
            self.starter
                .variables()
                .into_iter()
                .map(|(k, v)| (k.into(), v.into())),
        );
        env.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::StarterBus;

    fn variables(bus_type: Option<&str>) -> Vec<(&'static str, String)> {
        let starter = StarterBus {
            address: "unix:path=/b,guid=00ff".into(),
            bus_type: bus_type.map(Into::into),
        };
        starter
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.to_owned()))
            .collect()
    }

    #[test]
    fn each_bus_type_sets_what_dbus_daemon_sets() {
        let address = || "unix:path=/b,guid=00ff".to_owned();
        assert_eq!(
            variables(Some("session")),
            [
                ("DBUS_STARTER_ADDRESS", address()),
                ("DBUS_STARTER_BUS_TYPE", "session".into()),
                ("DBUS_SESSION_BUS_ADDRESS", address()),
            ]
        );
        assert_eq!(
            variables(Some("system")),
            [
                ("DBUS_STARTER_ADDRESS", address()),
                ("DBUS_STARTER_BUS_TYPE", "system".into()),
                ("DBUS_SYSTEM_BUS_ADDRESS", address()),
            ]
        );
        assert_eq!(
            variables(Some("custom")),
            [
                ("DBUS_STARTER_ADDRESS", address()),
                ("DBUS_STARTER_BUS_TYPE", "custom".into()),
            ]
        );
        assert_eq!(variables(None), [("DBUS_STARTER_ADDRESS", address())]);
    }
}
