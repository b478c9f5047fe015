//! How the bus core drives activation: holding messages for a name until its service owns it,
//! reacting to process exits and timeouts, and dropping a service's connection when the
//! process that owns its name dies.

use std::os::fd::{AsFd, OwnedFd};

use tracing::{debug, info, warn};
use zbus::Message;
use zbus::fdo::{self, StartServiceReply};
use zbus::message::Type;

use super::driver::messages;
use super::events::CoreEvent;
use super::{Bus, PeerId};
use crate::activation::{StartFailure, Started, Waiter};
use crate::supervisor::{self, ExitKind, InstanceGone, ProcessEvent};

impl Bus {
    /// Makes `waiter` wait for `name`'s service, starting it unless a start is in progress.
    pub fn activate(&mut self, name: &str, waiter: Waiter) {
        self.count_held(&waiter, true);
        if self.starts.is_starting(name) {
            if let Err((waiter, failure)) = self.starts.wait_for(name, waiter) {
                self.fail_waiters(vec![waiter], &failure);
            }
            return;
        }
        if self.starts.starts_in_progress() >= self.limits.max_pending_service_starts {
            let text = "The maximum number of pending activations has been reached";
            if crate::log_limit::START_REFUSED.allow() {
                warn!(service = name, "start refused: {text}");
            }
            let failure = fdo::Error::LimitsExceeded(text.into()).into();
            self.fail_waiters(vec![waiter], &failure);
            return;
        }
        if self.started_by_systemd(name) {
            self.activate_via_systemd(name, waiter);
            return;
        }
        match self.activation.spawn(name) {
            Ok((service, pid)) => {
                info!(service = name, pid, "activating");
                if self.activation.status_mut().starting(name, pid) {
                    self.service_state_changed(name);
                }
                let timeout = self.activation.timeout_of(&service);
                let started = self.starts.record(name, service, pid, timeout, waiter);
                self.arm_start_timer(name, &started);
            }
            Err(failure) => {
                if self.activation.is_activatable(name)
                    && self.activation.status_mut().failed(name, failure.text())
                {
                    self.service_state_changed(name);
                }
                self.fail_waiters(vec![waiter], &failure)
            }
        }
    }

    /// Tells everyone who listens that `name`'s service has a new state
    /// (`org.broker.Supervisor1.ServiceStateChanged`); with no listener, nothing is sent.
    pub(super) fn service_state_changed(&mut self, name: &str) {
        let state = self.activation.status().snapshot(name).state;
        debug!(
            service = name,
            state = state.as_str(),
            "service state changed"
        );
        match messages::service_state_changed(name, state.as_str()) {
            Ok(msg) if self.has_listener(&msg) => self.broadcast(&msg),
            Ok(_) => {}
            Err(e) => warn!("cannot build ServiceStateChanged: {e}"),
        }
    }

    /// Counts a message the bus starts or stops holding for a service against its sender's
    /// `max_incoming_bytes` and `max_incoming_unix_fds`, as dbus-daemon counts a sender's
    /// messages until they are delivered. When the sender drops back under the limits, its
    /// task, which stopped reading from it, is woken.
    fn count_held(&mut self, waiter: &Waiter, held: bool) {
        let Waiter::Deliver { from, msg } = waiter else {
            return;
        };
        let (max_bytes, max_fds) = (
            self.limits.max_incoming_bytes,
            self.limits.max_incoming_unix_fds,
        );
        let Some(peer) = self.peers.get_mut(from) else {
            return;
        };
        let (bytes, fds) = (msg.data().len(), msg.data().fds().len());
        let (held_bytes, held_fds) = &mut peer.held;
        if held {
            *held_bytes += bytes;
            *held_fds += fds;
        } else {
            *held_bytes = held_bytes.saturating_sub(bytes);
            *held_fds = held_fds.saturating_sub(fds);
        }
        let full = *held_bytes >= max_bytes || *held_fds >= max_fds;
        let was_full = peer.conn.paused.replace(full);
        if full && !was_full {
            debug!(
                peer = %peer.unique,
                "pausing reads: its messages held for starting services reached \
                 max_incoming_bytes or max_incoming_unix_fds"
            );
        }
        if was_full && !full {
            peer.conn.wake.notify_one();
        }
    }

    /// After the start's timeout, the core hears of it (and ignores it if the start is over).
    pub(super) fn arm_start_timer(&self, name: &str, started: &Started) {
        let events = self.events.clone();
        let name = name.to_owned();
        let (generation, timeout) = (started.generation, started.timeout);
        tokio::task::spawn_local(async move {
            tokio::time::sleep(timeout).await;
            // The bus may be gone at shutdown; nothing is left to time out then.
            let _ = events.send(CoreEvent::StartTimedOut { name, generation });
        });
    }

    /// A name got a new primary owner: if a start was waiting for it, it is complete.
    pub(super) fn name_owned(&mut self, name: &str, owner: PeerId) {
        let Some(waiters) = self.starts.finish(name) else {
            return;
        };
        info!(service = name, owner = %self.unique_name(owner).unwrap_or("?"), "service took its name");
        let pid = self.peers.get(&owner).map_or(0, |p| p.creds.pid);
        if self.activation.status_mut().running(name, pid) {
            self.service_state_changed(name);
        }
        self.watch_owner(owner);
        for waiter in waiters {
            self.count_held(&waiter, false);
            match waiter {
                Waiter::Deliver { from, msg } => {
                    if self.peers.contains_key(&from) {
                        self.unicast(from, msg, name, false);
                    }
                }
                Waiter::Start { from, call } => {
                    self.reply_start(from, &call, StartServiceReply::Success)
                }
                Waiter::FromDriver { msg } => {
                    self.deliver(owner, &msg);
                }
            }
        }
    }

    /// Answers `StartServiceByName` with `result`.
    pub(crate) fn reply_start(&mut self, to: PeerId, call: &Message, result: StartServiceReply) {
        match messages::reply(call, &(result,)) {
            Ok(reply) => self.send_from_driver(to, &reply),
            Err(e) => warn!("cannot build StartServiceByName reply: {e}"),
        }
    }

    /// Watches the process behind a service's connection, so that its death ends the connection
    /// even while another process holds the socket open.
    fn watch_owner(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.service_owner {
            return;
        }
        p.service_owner = true;
        // Without a pidfd (kernels before 6.5), the reaper's report of the exit does the same.
        let Some(pidfd) = supervisor::peer_pidfd(p.conn.socket.as_fd()) else {
            return;
        };
        let events = self.events.clone();
        tokio::task::spawn_local(watch_pidfd(pidfd, peer, events));
    }

    /// Reads the activation files again and says so if the set of names changed.
    pub fn reload_activation(&mut self) {
        if !self.activation.reload() {
            return;
        }
        self.activatable_services_changed();
    }

    pub(super) fn process_exited(&mut self, exit: ProcessEvent) {
        let ended = self
            .activation
            .status_mut()
            .process_exited(exit.pid, exit.status);
        for name in ended {
            // The process that owned the name died: what it left behind goes too.
            self.service_state_changed(&name);
            self.activation.stop_leftovers(&name);
        }
        if let Some(name) = self.starts.started_by(exit.pid) {
            match exit.status {
                // It may have daemonized; its daemon still has time to take the name, unless
                // its keeper already said nothing of the start is left.
                ExitKind::Exited(0) => {
                    self.starts.mark_daemonized(&name);
                    if self.activation.instance_is_live(exit.pid) == Some(false) {
                        self.fail_start(&name, StartFailure::daemon_died(&name));
                    }
                }
                status => self.fail_start(&name, StartFailure::exited(&name, status)),
            }
        }
        let owner = self
            .peers
            .iter()
            .find(|(_, p)| p.service_owner && p.creds.pid == exit.pid)
            .map(|(&id, _)| id);
        if let Some(peer) = owner {
            self.owner_exited(peer);
        }
    }

    /// At the bus's stop, before the services are stopped: a system spawner, which the bus
    /// may not signal, is told to stop its services itself.
    pub fn close_system_spawner(&self) {
        self.activation.close_system_spawner();
    }

    /// Every process of one start has ended: a start still waiting for a daemon it left
    /// behind fails.
    pub(super) fn instance_gone(&mut self, gone: &InstanceGone) {
        if self.starts.started_by(gone.main).as_deref() != Some(gone.service.as_str()) {
            return;
        }
        if self.starts.daemonized_starts().contains(&gone.service) {
            self.fail_start(&gone.service, StartFailure::daemon_died(&gone.service));
        }
    }

    pub(super) fn start_timed_out(&mut self, name: &str, generation: u64) {
        if let Some(timeout) = self.starts.stop_timed_out(name, generation) {
            // A start that timed out is stopped whatever its leftovers policy says.
            self.activation.stop_instances(name);
            self.fail_start(name, StartFailure::timed_out(name, timeout));
        }
    }

    /// At shutdown: stops the starts still in progress. Running services end on their own when
    /// their connection closes; a service still starting has none yet.
    pub fn stop_pending_starts(&mut self) {
        for name in self.starts.stop_all() {
            self.activation.stop_instances(&name);
        }
    }

    pub(super) fn fail_start(&mut self, name: &str, failure: StartFailure) {
        let Some(waiters) = self.starts.finish(name) else {
            return;
        };
        warn!(service = name, "start failed: {failure}");
        // A failed start leaves nothing behind (unless its file keeps leftovers).
        self.activation.stop_leftovers(name);
        self.activation.note_failure(name);
        if self.activation.status_mut().failed(name, failure.text()) {
            self.service_state_changed(name);
        }
        self.fail_waiters(waiters, &failure);
    }

    pub(super) fn fail_waiters(&mut self, waiters: Vec<Waiter>, failure: &StartFailure) {
        for waiter in waiters {
            self.count_held(&waiter, false);
            let (from, msg) = match waiter {
                Waiter::Deliver { from, msg } => (from, msg),
                Waiter::Start { from, call } => (from, call),
                Waiter::FromDriver { .. } => continue,
            };
            match msg.message_type() {
                Type::MethodCall => self.reply_error(from, &msg, failure.clone()),
                // dbus-daemon tells the sender of a held signal too, whatever its flags say.
                Type::Signal => match messages::error(&msg, failure) {
                    Ok(error) => self.send_from_driver(from, &error),
                    Err(e) => warn!("cannot build {}: {e}", failure.name()),
                },
                Type::MethodReturn | Type::Error => {}
            }
        }
    }

    pub(super) fn owner_exited(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let pid = p.creds.pid;
        info!(peer = %p.unique, pid, "the process that owned this connection's names exited; dropping the connection");
        self.disconnect(peer);
        for name in self.activation.status_mut().owner_gone(pid) {
            self.service_state_changed(&name);
            self.activation.stop_leftovers(&name);
        }
    }
}

async fn watch_pidfd(
    pidfd: OwnedFd,
    peer: PeerId,
    events: tokio::sync::mpsc::UnboundedSender<CoreEvent>,
) {
    match supervisor::wait_exit(&pidfd).await {
        Ok(()) => {
            let _ = events.send(CoreEvent::OwnerExited { peer });
        }
        Err(e) => warn!("cannot watch the process of {peer}: {e}"),
    }
}
