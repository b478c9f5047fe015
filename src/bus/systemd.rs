//! systemd-style activation (`--systemd-activation`), as dbus-daemon does it: a name whose
//! activation file has `SystemdService=` is started by asking systemd, through the
//! `org.freedesktop.systemd1.Activator` `ActivationRequest` signal; systemd answers a failure
//! with `ActivationFailure`. Until systemd is on the bus, the request waits for it.

use tracing::{info, warn};
use zbus::Message;
use zbus::message::Flags;

use super::{Bus, DRIVER, DRIVER_PATH, PeerId};
use crate::activation::{StartFailure, Waiter};

/// systemd's name on the bus.
pub const SYSTEMD: &str = "org.freedesktop.systemd1";
const ACTIVATOR: &str = "org.freedesktop.systemd1.Activator";

impl Bus {
    /// Whether systemd starts `name` (or `name` is systemd itself, which nobody starts: the bus
    /// waits for it to connect).
    pub(super) fn started_by_systemd(&self, name: &str) -> bool {
        self.activation.systemd && (name == SYSTEMD || self.activation.systemd_unit(name).is_some())
    }

    /// Makes `waiter` wait for `name`, and asks systemd to start its unit.
    pub(super) fn activate_via_systemd(&mut self, name: &str, waiter: Waiter) {
        let unit = self.activation.systemd_unit(name).map(str::to_owned);
        match self.activation.start_elsewhere(name) {
            Ok(pending) => {
                pending.waiters.push(waiter);
                let generation = pending.generation;
                let own_timeout = pending.service.start_timeout;
                let timeout = own_timeout.unwrap_or(self.activation.policy.timeout);
                self.arm_start_timer(name, generation, timeout);
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
        let request = Message::signal(DRIVER_PATH, ACTIVATOR, "ActivationRequest")
            .sender(DRIVER)
            .destination(SYSTEMD)
            .build(&(unit.as_str(),));
        match request {
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
        let call = Message::method_call("/org/freedesktop/systemd1", "SetEnvironment")
            .interface("org.freedesktop.systemd1.Manager")
            .destination(destination.as_str())
            .sender(DRIVER)
            .with_flags(Flags::NO_REPLY_EXPECTED)
            .build(&(assignments,));
        match call {
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
        if zbus::names::ErrorName::try_from(error.as_str()).is_err() {
            warn!(
                unit,
                "ignoring an ActivationFailure with the invalid error name {error:?}"
            );
            return;
        }
        // systemd names the unit; every start waiting for that unit fails.
        let names: Vec<String> = self
            .activation
            .pending
            .iter()
            .filter(|(_, p)| p.service.systemd_service.as_deref() == Some(unit.as_str()))
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let failure = StartFailure {
                error: error.clone().into(),
                text: text.clone(),
            };
            self.fail_start(&name, failure);
        }
    }
}
