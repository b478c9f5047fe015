//! `org.freedesktop.DBus.Debug.Stats`: counts of what the bus holds now.

use std::collections::HashMap;

use zbus::{Message, Variant as Value};

use super::messages;
use super::support::{Outcome, args, invalid_args, no_owner};
use crate::bus::{Bus, Peer, PeerId};

pub(super) fn get_stats(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let _: () = args(msg)?;
    let mut stats: HashMap<&str, Value<'_>> = HashMap::new();
    let active = registered(bus).count();
    stats.insert("ActiveConnections", Value::U32(active as u32));
    let incomplete = bus.peers.values().filter(|p| !p.registered).count();
    stats.insert("IncompleteConnections", Value::U32(incomplete as u32));
    let rules: usize = bus.peers.values().map(|p| p.rules.len()).sum();
    stats.insert("MatchRules", Value::U32(rules as u32));
    stats.insert("BusNames", Value::U32(bus.names.names().count() as u32));
    messages::reply(msg, &(stats,))
}

pub(super) fn get_connection_stats(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let (name,): (String,) = args(msg)?;
    let id = bus.resolve(&name).ok_or_else(|| {
        no_owner(format!(
            "Could not get statistics of name '{name}': no such name"
        ))
    })?;
    let peer = bus
        .peers
        .get(&id)
        .ok_or_else(|| invalid_args("unknown connection".into()))?;
    let mut stats: HashMap<&str, Value<'_>> = HashMap::new();
    stats.insert("UniqueName", Value::from(peer.unique.as_str()));
    stats.insert("MatchRules", Value::U32(peer.rules.len() as u32));
    stats.insert("BusNames", Value::U32(bus.names.count_for(id) as u32));
    let queued = peer.conn.outbox.borrow().queued_bytes();
    stats.insert(
        "OutgoingBytes",
        Value::U32(queued.min(u32::MAX as usize) as u32),
    );
    messages::reply(msg, &(stats,))
}

pub(super) fn get_all_match_rules(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let _: () = args(msg)?;
    let all: HashMap<&str, Vec<String>> = registered(bus)
        .map(|p| {
            (
                p.unique.as_str(),
                p.rules.iter().map(|r| r.to_string()).collect(),
            )
        })
        .collect();
    messages::reply(msg, &(all,))
}

fn registered(bus: &Bus) -> impl Iterator<Item = &Peer> {
    bus.peers.values().filter(|p| p.registered)
}
