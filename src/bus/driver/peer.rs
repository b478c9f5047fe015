//! `org.freedesktop.DBus.Peer`, which every D-Bus object answers.

use zbus::Message;

use super::messages;
use super::support::Outcome;
use crate::bus::{Bus, PeerId};

pub(super) fn ping(_bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    messages::reply(msg, &())
}

pub(super) fn get_machine_id(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    messages::reply(msg, &(bus.machine_id.as_str(),))
}
