//! What a bus configuration sets in the core — limits, policy, activation directories — and
//! `ReloadConfig`/SIGHUP, which read the configuration again and apply it, or keep the old one
//! when the file is bad.

use std::path::PathBuf;
use std::time::Duration;

use tracing::{info, warn};

use super::{Bus, Limits, driver_signal};
use crate::config::Policy;

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
            match driver_signal("ActivatableServicesChanged", None, &()) {
                Ok(signal) => self.broadcast(&signal),
                Err(e) => warn!("cannot build ActivatableServicesChanged: {e}"),
            }
        }
        Ok(())
    }
}
