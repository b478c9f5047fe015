//! `org.broker.Supervisor1`: broker's own interface for watching and stopping the services it
//! starts. Anyone who may use the bus may read; only the bus's owner uid and root may stop a
//! service (the method table marks `StopService` privileged).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, info, warn};
use zbus::{Message, Variant as Value};

use super::messages;
use super::support::{Outcome, args};
use crate::activation::StartFailure;
use crate::activation::status::Snapshot;
use crate::bus::error::BusError;
use crate::bus::{Bus, PeerId};
use crate::supervisor::{self, OUTPUT_LINES};

/// One service's dictionary, as `ListServices` and `GetService` give it.
type ServiceDict = HashMap<&'static str, Value<'static>>;

/// `ListServices() -> aa{sv}`: every activatable name with its state.
pub(super) fn list_services(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let _: () = args(msg)?;
    let names: Vec<String> = bus.activation.names().map(str::to_owned).collect();
    let services: Vec<ServiceDict> = names.iter().map(|name| dict_of(bus, name)).collect();
    messages::reply(msg, &(services,))
}

/// `GetService(s name) -> a{sv}`.
pub(super) fn get_service(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let (name,): (String,) = args(msg)?;
    known(bus, &name)?;
    messages::reply(msg, &(dict_of(bus, &name),))
}

/// `GetOutput(s name, u lines) -> as`: the last `lines` lines of output, oldest first.
pub(super) fn get_output(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let (name, lines): (String, u32) = args(msg)?;
    known(bus, &name)?;
    let lines = usize::try_from(lines)
        .unwrap_or(usize::MAX)
        .min(OUTPUT_LINES);
    messages::reply(msg, &(bus.activation.output_of(&name, lines),))
}

/// `StopService(s name)`: SIGTERM to the service's process group and its main process, then
/// SIGKILL to what is left of them after the grace period. The connection goes when the
/// process dies, as for any exit, and the next request starts the service again.
pub(super) fn stop_service(bus: &mut Bus, from: PeerId, msg: &Message) -> Outcome {
    let (name,): (String,) = args(msg)?;
    known(bus, &name)?;
    let Some((main, group)) = bus.activation.status().stop_targets(&name) else {
        debug!(service = %name, "StopService: not running");
        return messages::reply(msg, &());
    };
    let by = bus.peers.get(&from).map_or(u32::MAX, |p| p.creds.uid);
    info!(service = %name, pid = main, uid = by, "stopping the service on request: SIGTERM");
    let targets = pids_of(main, group);
    signal_all(&targets, group, Signal::SIGTERM);
    let grace = bus.activation.stop_grace();
    tokio::task::spawn_local(kill_after(name, targets, group, grace));
    messages::reply(msg, &())
}

/// After `grace`, SIGKILL to each of `targets` still below the broker (so a pid reused by a
/// stranger meanwhile is left alone).
async fn kill_after(name: String, targets: Vec<u32>, group: u32, grace: Duration) {
    tokio::time::sleep(grace).await;
    let living: BTreeSet<u32> = match supervisor::descendants() {
        Ok(all) => all.iter().filter(|d| d.is_alive()).map(|d| d.pid).collect(),
        Err(e) => {
            warn!(service = %name, "cannot list the processes to kill: {e}");
            return;
        }
    };
    let left: Vec<u32> = targets.into_iter().filter(|p| living.contains(p)).collect();
    if left.is_empty() {
        return;
    }
    info!(service = %name, pids = ?left, "the stopped service did not end within the grace period: SIGKILL");
    let group = if living.contains(&group) { group } else { 0 };
    signal_all(&left, group, Signal::SIGKILL);
}

/// Sends `signal` to the process group `group` (0: none) and to each of `pids`.
fn signal_all(pids: &[u32], group: u32, signal: Signal) {
    if let Ok(group) = i32::try_from(group)
        && group > 0
    {
        let _ = kill(Pid::from_raw(-group), signal);
    }
    for pid in pids {
        if let Ok(pid) = i32::try_from(*pid)
            && pid > 0
            && let Err(e) = kill(Pid::from_raw(pid), signal)
        {
            debug!(pid, "cannot send {signal}: {e}");
        }
    }
}

/// `ServiceUnknown` unless `name` is activatable.
fn known(bus: &Bus, name: &str) -> Result<(), BusError> {
    if bus.activation.is_activatable(name) {
        return Ok(());
    }
    Err(StartFailure::unknown(name))
}

/// The dictionary of one service.
fn dict_of(bus: &Bus, name: &str) -> ServiceDict {
    let Snapshot {
        state,
        main_pid,
        started_at_us,
        starts,
        last_exit,
        last_failure,
    } = bus.activation.status().snapshot(name);
    let group = bus
        .activation
        .status()
        .stop_targets(name)
        .map_or(0, |t| t.1);
    let pids = if main_pid == 0 {
        Vec::new()
    } else {
        pids_of(main_pid, group)
    };
    let mut dict = ServiceDict::new();
    dict.insert("Name", Value::from(name.to_owned()));
    dict.insert("State", Value::from(state.as_str()));
    dict.insert("MainPID", Value::U32(main_pid));
    dict.insert("PIDs", Value::from(pids));
    dict.insert("StartedAt", Value::U64(started_at_us));
    dict.insert("Starts", Value::U32(starts));
    dict.insert("LastExit", Value::from(last_exit));
    dict.insert("LastFailure", Value::from(last_failure));
    dict
}

/// The living processes of a service found from `/proc`: its main process, the process its
/// start spawned (`group`, 0 if none), and their descendants, main process first.
fn pids_of(main: u32, group: u32) -> Vec<u32> {
    let all = match supervisor::descendants() {
        Ok(all) => all,
        Err(e) => {
            warn!("cannot list the services' processes: {e}");
            return vec![main];
        }
    };
    let mut found = vec![main];
    for d in all.iter().filter(|d| d.is_alive()) {
        let root = d.pid == group && group != 0;
        if !found.contains(&d.pid) && (root || found.contains(&d.parent)) {
            found.push(d.pid);
        }
    }
    found.retain(|pid| *pid == main || all.iter().any(|d| d.pid == *pid && d.is_alive()));
    found
}
