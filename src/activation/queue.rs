//! The activation queue: the starts in progress, and who waits for each one (messages to
//! deliver, `StartServiceByName` calls to answer) until its service owns the name, the start
//! fails, or its time runs out.

use std::collections::HashMap;
use std::time::Duration;

use tracing::info;
use zbus::{Message, fdo};

use super::files::ServiceFile;
use crate::bus::error::BusError;
use crate::connection::PeerId;

/// Someone waiting for a service to own its name.
pub enum Waiter {
    /// A message to deliver to the new owner.
    Deliver { from: PeerId, msg: Message },
    /// A `StartServiceByName` call to answer.
    Start { from: PeerId, call: Message },
    /// A message of the driver itself to systemd, held until systemd is on the bus; monitors
    /// have seen it already.
    FromDriver { msg: Message },
}

impl Waiter {
    /// The held message or call.
    pub fn message(&self) -> &Message {
        match self {
            Waiter::Deliver { msg, .. } => msg,
            Waiter::Start { call, .. } => call,
            Waiter::FromDriver { msg } => msg,
        }
    }
}

/// How much the messages held for one starting service may take, so that a client cannot make
/// the bus hold without bound what it sends to a service that is slow to start.
const MAX_HELD_BYTES: usize = 16 << 20;

/// A start in progress.
struct Pending {
    service: ServiceFile,
    /// The process that was spawned (0: systemd's, not ours).
    pid: u32,
    /// Tells this start's timer from that of an earlier start of the same name.
    generation: u64,
    /// The spawned process exited 0 before the name was taken: it may have daemonized.
    daemonized: bool,
    waiters: Vec<Waiter>,
    /// The size of the messages in `waiters`.
    held_bytes: usize,
    /// How long the service may take to own its name.
    timeout: Duration,
}

impl Pending {
    fn hold(&mut self, waiter: Waiter) {
        self.held_bytes += waiter.message().data().len();
        self.waiters.push(waiter);
    }
}

/// A start that has begun: what its timer needs.
pub struct Started {
    pub pid: u32,
    pub generation: u64,
    /// How long the service may take to own its name.
    pub timeout: Duration,
}

/// The starts in progress, by name.
#[derive(Default)]
pub struct StartQueue {
    pending: HashMap<String, Pending>,
    /// Tells a start's timer from that of an earlier start of the same name.
    next_generation: u64,
}

impl StartQueue {
    /// Files a start of `name` by process `pid` (0: someone else's process) as pending.
    pub fn record(
        &mut self,
        name: &str,
        service: ServiceFile,
        pid: u32,
        timeout: Duration,
        waiter: Waiter,
    ) -> Started {
        let generation = self.next_generation;
        self.next_generation += 1;
        let mut pending = Pending {
            service,
            pid,
            generation,
            daemonized: false,
            waiters: Vec::new(),
            held_bytes: 0,
            timeout,
        };
        pending.hold(waiter);
        self.pending.insert(name.to_owned(), pending);
        Started {
            pid,
            generation,
            timeout,
        }
    }

    /// Makes `waiter` wait for the start of `name` in progress, unless what waits for it
    /// already takes `MAX_HELD_BYTES`; then the waiter comes back with the reason.
    pub fn wait_for(&mut self, name: &str, waiter: Waiter) -> Result<(), (Waiter, BusError)> {
        let Some(pending) = self.pending.get_mut(name) else {
            let text = format!("No start of {name} is in progress");
            return Err((waiter, fdo::Error::Failed(text).into()));
        };
        if pending.held_bytes + waiter.message().data().len() > MAX_HELD_BYTES {
            let text = format!("Too many messages are waiting for {name} to start");
            let failure = fdo::Error::LimitsExceeded(text).into();
            return Err((waiter, failure));
        }
        pending.hold(waiter);
        Ok(())
    }

    /// Whether a start of `name` is in progress.
    pub fn is_starting(&self, name: &str) -> bool {
        self.pending.contains_key(name)
    }

    /// How many starts are in progress.
    pub fn starts_in_progress(&self) -> usize {
        self.pending.len()
    }

    /// The start of `name` is over, one way or the other: what waited for it.
    pub fn finish(&mut self, name: &str) -> Option<Vec<Waiter>> {
        self.pending.remove(name).map(|p| p.waiters)
    }

    /// The start whose spawned process is `pid`.
    pub fn started_by(&self, pid: u32) -> Option<String> {
        self.pending
            .iter()
            .find(|(_, p)| p.pid == pid)
            .map(|(name, _)| name.clone())
    }

    /// The spawned process of `name`'s start exited 0 before the name was taken: a daemon it
    /// left behind may still take it.
    pub fn mark_daemonized(&mut self, name: &str) {
        if let Some(p) = self.pending.get_mut(name) {
            p.daemonized = true;
        }
    }

    /// The starts whose spawned process daemonized.
    pub fn daemonized_starts(&self) -> Vec<String> {
        self.pending
            .iter()
            .filter(|(_, p)| p.daemonized)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether `pid` is the spawned process of a start that has not daemonized.
    pub fn is_starting_process(&self, pid: u32) -> bool {
        self.pending.values().any(|p| !p.daemonized && p.pid == pid)
    }

    /// The start of `name` if `generation` is still the one in progress: how long it had.
    /// The caller stops what is left of it (through its keeper).
    pub fn stop_timed_out(&self, name: &str, generation: u64) -> Option<Duration> {
        let pending = self
            .pending
            .get(name)
            .filter(|p| p.generation == generation)?;
        Some(pending.timeout)
    }

    /// At shutdown: names the starts still in progress, which the caller stops (through their
    /// keepers).
    pub fn stop_all(&self) -> Vec<String> {
        for (name, pending) in &self.pending {
            info!(service = %name, pid = pending.pid, "stopping a start in progress");
        }
        self.pending.keys().cloned().collect()
    }

    /// The starts that systemd performs for `unit`.
    pub fn starts_of_unit(&self, unit: &str) -> Vec<String> {
        self.pending
            .iter()
            .filter(|(_, p)| p.service.systemd_service.as_deref() == Some(unit))
            .map(|(name, _)| name.clone())
            .collect()
    }
}
