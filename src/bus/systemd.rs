//! systemd-style activation (`--systemd-activation`), as dbus-daemon does it: a name whose
//! activation file has `SystemdService=` is started by asking systemd, through the
//! `org.freedesktop.systemd1.Activator` `ActivationRequest` signal; systemd answers a failure
//! with `ActivationFailure`. Until systemd is on the bus, the request waits for it.

use tracing::{info, warn};
use zbus::Message;

use super::driver::messages::{self, ACTIVATOR};
use super::{Bus, PeerId};
use crate::activation::{StartFailure, Waiter};

/// systemd's name on the bus.
pub const SYSTEMD: &str = "org.freedesktop.systemd1";

impl Bus {
    /// Whether systemd starts `name` (or `name` is systemd itself, which nobody starts: the bus
    /// waits for it to connect).
    pub(super) fn started_by_systemd(&self, name: &str) -> bool {
        self.activation.systemd && (name == SYSTEMD || self.activation.systemd_unit(name).is_some())
    }

    /// Makes `waiter` wait for `name`, and asks systemd to start its unit.
    pub(super) fn activate_via_systemd(&mut self, name: &str, waiter: Waiter) {
        let unit = self.activation.systemd_unit(name).map(str::to_owned);
        // Someone else's process: pid 0.
        match self.activation.service(name) {
            Ok(service) => {
                let timeout = self.activation.timeout_of(&service);
                let started = self.starts.record(name, service, 0, timeout, waiter);
                self.arm_start_timer(name, &started);
            }
            Err(failure) => {
                self.fail_waiters(vec![waiter], &failure);
                return;
            }
        }
        let Some(unit) = unit else {
            return;
        };
        info!(service = name, unit, "asking systemd to start the service");
        match messages::activation_request(SYSTEMD, &unit) {
            Ok(request) => self.send_to_systemd(request),
            Err(e) => warn!("cannot build ActivationRequest: {e}"),
        }
    }

    /// `UpdateActivationEnvironment` under systemd activation: systemd starts the services, so
    /// it is told too (`SetEnvironment`, no reply wanted), as dbus-daemon does: addressed to
    /// systemd's unique name, or to its well-known name while it is not on the bus yet.
    pub(crate) fn forward_environment(&mut self, vars: &[(String, String)]) {
        if !self.activation.systemd {
            return;
        }
        let destination = self
            .resolve(SYSTEMD)
            .and_then(|id| self.unique_name(id))
            .unwrap_or(SYSTEMD)
            .to_owned();
        let assignments: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        match messages::set_environment(&destination, &assignments) {
            Ok(call) => self.send_to_systemd(call),
            Err(e) => warn!("cannot build SetEnvironment for systemd: {e}"),
        }
    }

    /// Sends a message of the driver to systemd, or shows it to the monitors and holds it until
    /// systemd is on the bus.
    fn send_to_systemd(&mut self, msg: Message) {
        match self.resolve(SYSTEMD) {
            Some(systemd) => self.send_from_driver(systemd, &msg),
            None => {
                self.copy_to_watchers(&msg, None);
                self.activate(SYSTEMD, Waiter::FromDriver { msg });
            }
        }
    }

    /// A signal to the driver: systemd's `ActivationFailure(name, error, message)` fails the
    /// start of `name` with systemd's error. Only systemd may send it.
    pub(crate) fn driver_signal_received(&mut self, from: PeerId, msg: &Message) {
        let header = msg.header();
        let is_failure = header.interface().map(|i| i.as_str()) == Some(ACTIVATOR)
            && header.member().map(|m| m.as_str()) == Some("ActivationFailure");
        drop(header);
        if !is_failure {
            return;
        }
        if self.names.owner(SYSTEMD) != Some(from) {
            warn!(
                peer = self.unique_name(from).unwrap_or_default(),
                "ignoring ActivationFailure: the sender is not systemd"
            );
            return;
        }
        let Ok((unit, error, text)) = msg.body().deserialize::<(String, String, String)>() else {
            warn!("ignoring an ActivationFailure signal with the wrong arguments");
            return;
        };
        let Ok(error) = zbus::names::OwnedErrorName::try_from(error.as_str()) else {
            warn!(
                unit,
                "ignoring an ActivationFailure with the invalid error name {error:?}"
            );
            return;
        };
        // systemd names the unit; every start waiting for that unit fails.
        for name in self.starts.starts_of_unit(&unit) {
            let failure = StartFailure::foreign(error.clone(), text.clone());
            self.fail_start(&name, failure);
        }
    }
}
