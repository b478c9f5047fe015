//! What a bus configuration sets in the core — limits, policy, activation directories — and
//! `ReloadConfig`/SIGHUP, which read the configuration again and apply it, or keep the old one
//! when the file is bad.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::{Bus, Limits};
use crate::activation::files;
use crate::config::{Policy, SYSTEM_SERVICEDIRS};

/// The reloadable part of a configuration, as the core uses it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    pub policy: Policy,
    pub activation_dirs: Vec<PathBuf>,
    /// `service_start_timeout`
    pub start_timeout: Duration,
}

/// Reads the configuration again; the error names the file, the line and the reason.
pub type Reloader = Box<dyn Fn() -> Result<Settings, String>>;

impl Bus {
    /// Puts `settings` in force; returns whether the set of activatable names changed.
    pub fn apply_settings(&mut self, settings: Settings) -> bool {
        self.policy_open = settings.policy.allows_all_messages();
        self.policy = Some(settings.policy);
        self.limits = settings.limits;
        self.activation.policy.timeout = settings.start_timeout;
        warn_missing_dirs(&settings.activation_dirs);
        self.activation.set_dirs(settings.activation_dirs);
        self.activation.reload()
    }

    /// `ReloadConfig` and SIGHUP: reads the configuration file again. A bad file keeps the
    /// configuration in force, and the error says why.
    pub fn reload_config(&mut self) -> Result<(), String> {
        let settings = match &self.reloader {
            Some(reload) => reload().inspect_err(|e| warn!("keeping the configuration: {e}"))?,
            None => {
                self.reload_activation();
                return Ok(());
            }
        };
        info!("configuration reloaded");
        if self.apply_settings(settings) {
            self.activatable_services_changed();
        }
        Ok(())
    }
}

/// Warns, once per start or reload request, about each activation directory the user named
/// (`--activation-dir`, `<servicedir>`) that is not there: a typo would otherwise go unnoticed.
/// The standard directories are left out, since they often do not exist. The bus starts anyway,
/// and watches for the directory to appear.
fn warn_missing_dirs(dirs: &[PathBuf]) {
    let session = files::session_dirs(|key| std::env::var(key).ok());
    let standard = |dir: &Path| {
        session.iter().any(|s| s == dir) || SYSTEM_SERVICEDIRS.iter().any(|s| Path::new(s) == dir)
    };
    for dir in dirs.iter().filter(|dir| !standard(dir)) {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => warn!("activation directory {} is not a directory", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => warn!(
                "activation directory {} does not exist (it is watched, and read once it appears)",
                dir.display()
            ),
            Err(e) => warn!("cannot read activation directory {}: {e}", dir.display()),
        }
    }
}
