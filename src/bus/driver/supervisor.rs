//! `org.broker.Supervisor1`: broker's own interface for watching and stopping the services it
//! starts. Anyone who may use the bus may read; only the bus's owner uid and root may stop a
//! service (the method table marks `StopService` privileged).

use std::collections::HashMap;

use tracing::{debug, info};
use zbus::{Message, Variant as Value};

use super::messages;
use super::support::{Outcome, args};
use crate::activation::StartFailure;
use crate::activation::status::Snapshot;
use crate::bus::error::BusError;
use crate::bus::{Bus, PeerId};
use crate::supervisor::OUTPUT_LINES;

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

/// `StopService(s name)`: the keeper of each of the service's instances sends SIGTERM to every
/// process of it, and SIGKILL to what is left after the grace period. The connection goes when
/// the process dies, as for any exit, and the next request starts the service again.
pub(super) fn stop_service(bus: &mut Bus, from: PeerId, msg: &Message) -> Outcome {
    let (name,): (String,) = args(msg)?;
    known(bus, &name)?;
    let by = bus.peers.get(&from).map_or(u32::MAX, |p| p.creds.uid);
    let asked = bus.activation.stop_instances(&name);
    if asked == 0 {
        debug!(service = %name, "StopService: not running");
    } else {
        info!(service = %name, instances = asked, uid = by, "stopping the service on request");
    }
    messages::reply(msg, &())
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
    let pids = bus.activation.processes_of(name, main_pid);
    let keeper = bus.activation.keeper_of(name);
    let mut dict = ServiceDict::new();
    dict.insert("Name", Value::from(name.to_owned()));
    dict.insert("State", Value::from(state.as_str()));
    dict.insert("MainPID", Value::U32(main_pid));
    dict.insert("PIDs", Value::from(pids));
    dict.insert("KeeperPID", Value::U32(keeper));
    dict.insert("StartedAt", Value::U64(started_at_us));
    dict.insert("Starts", Value::U32(starts));
    dict.insert("LastExit", Value::from(last_exit));
    dict.insert("LastFailure", Value::from(last_failure));
    dict
}
