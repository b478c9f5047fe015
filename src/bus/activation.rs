//! How the bus core drives activation: holding messages for a name until its service owns it,
//! reacting to process exits and timeouts, and dropping a service's connection when the
//! process that owns its name dies.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tracing::{debug, info, warn};
use zbus::Message;
use zbus::message::Type;

use super::{Bus, PeerId, driver_signal};
use crate::activation::{StartFailure, Waiter};
use crate::supervisor::{self, ExitKind, ProcessEvent};

/// What happens outside the message flow that the bus core must react to.
#[derive(Debug)]
pub enum CoreEvent {
    /// The reaper collected a process.
    Exited(ProcessEvent),
    /// A start has run out of time (`generation` tells which start).
    StartTimedOut { name: String, generation: u64 },
    /// The process that owns the names of this connection has exited.
    OwnerExited { peer: PeerId },
    /// The activation files should be read again.
    Reload(&'static str),
    /// `reply_timeout` has passed for the call `serial` that `caller` made to `callee`.
    ReplyTimedOut {
        caller: PeerId,
        serial: u32,
        callee: PeerId,
    },
}

/// How much the messages held for one starting service may take, so that a client cannot make
/// the bus hold without bound what it sends to a service that is slow to start.
const MAX_HELD_BYTES: usize = 16 << 20;

impl Bus {
    /// Makes `waiter` wait for `name`'s service, starting it unless a start is in progress.
    pub fn activate(&mut self, name: &str, waiter: Waiter) {
        self.count_held(&waiter, true);
        if let Some(pending) = self.activation.pending.get_mut(name) {
            let size = waiter.message().data().len();
            if pending.held_bytes + size > MAX_HELD_BYTES {
                let failure = StartFailure {
                    error: "org.freedesktop.DBus.Error.LimitsExceeded".into(),
                    text: format!("Too many messages are waiting for {name} to start"),
                };
                self.fail_waiters(vec![waiter], &failure);
                return;
            }
            pending.held_bytes += size;
            pending.waiters.push(waiter);
            return;
        }
        if self.activation.pending.len() >= self.limits.max_pending_service_starts {
            let failure = StartFailure {
                error: "org.freedesktop.DBus.Error.LimitsExceeded".into(),
                text: "The maximum number of pending activations has been reached".into(),
            };
            if crate::log_limit::START_REFUSED.allow() {
                warn!(service = name, "start refused: {}", failure.text);
            }
            self.fail_waiters(vec![waiter], &failure);
            return;
        }
        if self.started_by_systemd(name) {
            self.activate_via_systemd(name, waiter);
            return;
        }
        match self.activation.start(name) {
            Ok(pending) => {
                pending.held_bytes = waiter.message().data().len();
                pending.waiters.push(waiter);
                let (generation, pid) = (pending.generation, pending.pid);
                let timeout = pending
                    .service
                    .start_timeout
                    .unwrap_or(self.activation.policy.timeout);
                info!(service = name, pid, "activating");
                self.arm_start_timer(name, generation, timeout);
            }
            Err(failure) => self.fail_waiters(vec![waiter], &failure),
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

    pub(super) fn arm_start_timer(&self, name: &str, generation: u64, timeout: Duration) {
        let events = self.events.clone();
        let name = name.to_owned();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(timeout).await;
            // The bus may be gone at shutdown; nothing is left to time out then.
            let _ = events.send(CoreEvent::StartTimedOut { name, generation });
        });
    }

    /// A name got a new primary owner: if a start was waiting for it, it is complete.
    pub(super) fn name_owned(&mut self, name: &str, owner: PeerId) {
        let Some(pending) = self.activation.pending.remove(name) else {
            return;
        };
        info!(service = name, owner = %self.unique_name(owner).unwrap_or("?"), "service took its name");
        self.watch_owner(owner);
        for waiter in pending.waiters {
            self.count_held(&waiter, false);
            match waiter {
                Waiter::Deliver { from, msg } => {
                    if self.peers.contains_key(&from) {
                        self.unicast(from, msg, name, false);
                    }
                }
                Waiter::Start { from, call } => self.reply_start(from, &call, 1),
                Waiter::FromDriver { msg } => {
                    self.deliver(owner, &msg);
                }
            }
        }
    }

    /// Answers `StartServiceByName` with `result` (1: started, 2: already running).
    pub(crate) fn reply_start(&mut self, to: PeerId, call: &Message, result: u32) {
        match crate::driver::reply(call, &(result,)) {
            Ok(reply) => self.send_from_driver(to, &reply),
            Err(f) => warn!("cannot build StartServiceByName reply: {}", f.text),
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

    /// Reacts to an event from outside the message flow.
    pub fn handle_event(&mut self, event: CoreEvent) {
        match event {
            CoreEvent::Exited(exit) => self.process_exited(exit),
            CoreEvent::StartTimedOut { name, generation } => {
                self.start_timed_out(&name, generation)
            }
            CoreEvent::OwnerExited { peer } => self.owner_exited(peer),
            CoreEvent::Reload(why) => {
                info!("reloading activation files: {why}");
                self.reload_activation();
            }
            CoreEvent::ReplyTimedOut {
                caller,
                serial,
                callee,
            } => self.send_no_reply(caller, serial, callee, super::NO_REPLY_TIMEOUT),
        }
    }

    /// Reads the activation files again and says so if the set of names changed.
    pub fn reload_activation(&mut self) {
        if !self.activation.reload() {
            return;
        }
        match driver_signal("ActivatableServicesChanged", None, &()) {
            Ok(signal) => self.broadcast(&signal),
            Err(e) => warn!("cannot build ActivatableServicesChanged: {e}"),
        }
    }

    fn process_exited(&mut self, exit: ProcessEvent) {
        let started = self
            .activation
            .pending
            .iter()
            .find(|(_, p)| p.pid == exit.pid)
            .map(|(n, _)| n.clone());
        if let Some(name) = started {
            match exit.status {
                // It may have daemonized; its daemon still has time to take the name.
                ExitKind::Exited(0) => {
                    if let Some(p) = self.activation.pending.get_mut(&name) {
                        p.daemonized = true;
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
        self.check_daemonized_starts();
    }

    /// Fails each daemonized start none of whose processes is left. The processes of a service
    /// are all descendants of the broker (it is their subreaper), so whatever is left of them
    /// shows up among the broker's direct children.
    fn check_daemonized_starts(&mut self) {
        let daemonized: Vec<String> = self
            .activation
            .pending
            .iter()
            .filter(|(_, p)| p.daemonized)
            .map(|(n, _)| n.clone())
            .collect();
        if daemonized.is_empty() {
            return;
        }
        let children = match supervisor::children() {
            Ok(children) => children,
            Err(e) => {
                warn!("cannot list child processes: {e}");
                return;
            }
        };
        let accounted_for = |pid: &u32| {
            self.activation
                .pending
                .values()
                .any(|p| !p.daemonized && p.pid == *pid)
                || self
                    .peers
                    .values()
                    .any(|p| p.service_owner && p.creds.pid == *pid)
        };
        if children.iter().any(|pid| !accounted_for(pid)) {
            return;
        }
        for name in daemonized {
            self.fail_start(&name, StartFailure::daemon_died(&name));
        }
    }

    fn start_timed_out(&mut self, name: &str, generation: u64) {
        let Some(pending) = self
            .activation
            .pending
            .get(name)
            .filter(|p| p.generation == generation)
        else {
            return;
        };
        let timeout = self.activation.timeout_of(pending);
        stop_start(pending);
        self.fail_start(name, StartFailure::timed_out(name, timeout));
    }

    /// At shutdown: stops the starts still in progress. Running services end on their own when
    /// their connection closes; a service still starting has none yet.
    pub fn stop_pending_starts(&mut self) {
        for (name, pending) in &self.activation.pending {
            info!(service = %name, pid = pending.pid, "stopping a start in progress");
            stop_start(pending);
        }
    }

    pub(super) fn fail_start(&mut self, name: &str, failure: StartFailure) {
        let Some(pending) = self.activation.pending.remove(name) else {
            return;
        };
        warn!(service = name, "start failed: {}", failure.text);
        self.activation.note_failure(name);
        self.fail_waiters(pending.waiters, &failure);
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
                Type::MethodCall => self.reply_error(from, &msg, &failure.error, &failure.text),
                // dbus-daemon tells the sender of a held signal too, whatever its flags say.
                Type::Signal => match super::driver_error(&msg, &failure.error, &failure.text) {
                    Ok(error) => self.send_from_driver(from, &error),
                    Err(e) => warn!("cannot build {}: {e}", failure.error),
                },
                Type::MethodReturn | Type::Error => {}
            }
        }
    }

    fn owner_exited(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        info!(peer = %p.unique, pid = p.creds.pid, "the process that owned this connection's names exited; dropping the connection");
        self.disconnect(peer);
    }
}

/// SIGTERM to what is left of a start: the service runs in a process group of its own (pid 0:
/// systemd started it, not us).
fn stop_start(pending: &crate::activation::Pending) {
    if pending.pid != 0 {
        let group = nix::unistd::Pid::from_raw(-(pending.pid as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
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
