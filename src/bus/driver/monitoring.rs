//! `org.freedesktop.DBus.Monitoring`: `BecomeMonitor` turns a connection into a monitor.

use tracing::info;
use zbus::Message;

use super::dbus::rule_error;
use super::messages;
use super::support::{args, invalid_args};
use crate::bus::error::BusError;
use crate::bus::{Bus, PeerId};
use crate::match_rule::MatchRule;

/// `BecomeMonitor`: the reply goes out first, then the connection turns into a monitor.
pub(super) fn become_monitor(bus: &mut Bus, from: PeerId, msg: &Message) -> Result<(), BusError> {
    let (texts, flags): (Vec<String>, u32) = args(msg)?;
    if flags != 0 {
        return Err(invalid_args("BecomeMonitor: flags must be 0".into()));
    }
    let rules = texts
        .iter()
        .map(|t| MatchRule::parse(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(rule_error)?;
    let done = messages::reply(msg, &())?;
    bus.send_from_driver(from, &done);
    if let Some(peer) = bus.peers.get(&from)
        && crate::log_limit::NEW_MONITOR.allow()
    {
        info!(peer = %peer.unique, "connection became a monitor");
    }
    bus.make_monitor(from, rules);
    Ok(())
}
