//! `org.freedesktop.DBus.Properties`: the driver's two read-only properties, `Features` and
//! `Interfaces`, both on `org.freedesktop.DBus`.

use std::collections::HashMap;

use zbus::fdo;
use zbus::{Message, OwnedVariant, Variant as Value};

use super::messages;
use super::support::{
    INTERFACE_NAMES, MONITORING_IFACE, Outcome, STATS_IFACE, args, unknown_interface,
};
use crate::bus::{Bus, DRIVER, PeerId};

pub(super) fn get(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let (interface, property): (String, String) = args(msg)?;
    if interface != DRIVER {
        return Err(unknown_interface(&interface));
    }
    match property.as_str() {
        "Features" => messages::reply(msg, &(Value::from(features(bus)),)),
        "Interfaces" => messages::reply(msg, &(Value::from(optional_interfaces()),)),
        _ => Err(unknown_property(&interface, &property)),
    }
}

pub(super) fn get_all(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let (name,): (String,) = args(msg)?;
    let mut all: HashMap<&str, Value<'_>> = HashMap::new();
    if name == DRIVER {
        all.insert("Features", Value::from(features(bus)));
        all.insert("Interfaces", Value::from(optional_interfaces()));
    } else if !INTERFACE_NAMES.contains(&name.as_str()) {
        // The other interfaces of the driver have no properties.
        return Err(unknown_interface(&name));
    }
    messages::reply(msg, &(all,))
}

pub(super) fn set(_bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let (interface, property, _value): (String, String, OwnedVariant) = args(msg)?;
    if interface != DRIVER {
        return Err(unknown_interface(&interface));
    }
    if !matches!(property.as_str(), "Features" | "Interfaces") {
        return Err(unknown_property(&interface, &property));
    }
    Err(
        fdo::Error::PropertyReadOnly(format!("Property {property} of {interface} is read-only"))
            .into(),
    )
}

fn unknown_property(interface: &str, property: &str) -> crate::bus::error::BusError {
    fdo::Error::UnknownProperty(format!("Interface {interface} has no property {property}")).into()
}

/// What this bus does of dbus-daemon's optional behaviours: it drops unknown header fields
/// (`header_filter`), and starts services through systemd when asked to.
fn features(bus: &Bus) -> Vec<&'static str> {
    let mut features = vec!["HeaderFiltering"];
    if bus.activation.systemd {
        features.push("SystemdActivation");
    }
    features
}

/// The driver's interfaces that dbus-daemon lists as optional.
fn optional_interfaces() -> Vec<&'static str> {
    vec![MONITORING_IFACE, STATS_IFACE]
}
