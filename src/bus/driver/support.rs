//! What the driver's handlers share: the type of their outcome, the driver's interface names,
//! and the errors and argument checks that answer a bad call as dbus-daemon does.

use zbus::names::BusName;
use zbus::{Message, Type as ZType, fdo};

use super::messages::{DRIVER, SUPERVISOR};
use crate::bus::error::BusError;

/// What a handler that returns its reply gives back: the reply, or the error to answer with.
pub(super) type Outcome = Result<Message, BusError>;

pub(super) const PEER_IFACE: &str = "org.freedesktop.DBus.Peer";
pub(super) const INTROSPECTABLE_IFACE: &str = "org.freedesktop.DBus.Introspectable";
pub(super) const PROPERTIES_IFACE: &str = "org.freedesktop.DBus.Properties";
pub(super) const MONITORING_IFACE: &str = "org.freedesktop.DBus.Monitoring";
pub(super) const STATS_IFACE: &str = "org.freedesktop.DBus.Debug.Stats";

/// Every interface of the driver, in the order of the method table (a test checks that they
/// agree).
pub(super) const INTERFACE_NAMES: [&str; 7] = [
    DRIVER,
    PROPERTIES_IFACE,
    INTROSPECTABLE_IFACE,
    MONITORING_IFACE,
    STATS_IFACE,
    PEER_IFACE,
    SUPERVISOR,
];

pub(super) fn unknown_method(interface: &str, member: &str) -> BusError {
    fdo::Error::UnknownMethod(format!(
        "{DRIVER} does not understand message {interface}.{member}"
    ))
    .into()
}

pub(super) fn unknown_interface(interface: &str) -> BusError {
    fdo::Error::UnknownInterface(format!(
        "{DRIVER} does not understand interface {interface}"
    ))
    .into()
}

pub(super) fn invalid_args(text: String) -> BusError {
    fdo::Error::InvalidArgs(text).into()
}

pub(super) fn no_owner(text: String) -> BusError {
    fdo::Error::NameHasNoOwner(text).into()
}

/// The call's arguments, or `InvalidArgs` when its signature is not the method's.
pub(super) fn args<T>(msg: &Message) -> Result<T, BusError>
where
    T: serde::de::DeserializeOwned + ZType,
{
    let body = msg.body();
    let signature = body.signature().to_string();
    let expected = T::SIGNATURE.to_string();
    body.deserialize::<T>().map_err(|_| {
        invalid_args(format!(
            "Call to {} has wrong args ({signature}, expected {})",
            msg.header().member().map(|m| m.as_str()).unwrap_or(""),
            expected.trim_start_matches('(').trim_end_matches(')')
        ))
    })
}

pub(super) fn valid_bus_name(name: &str) -> Result<(), BusError> {
    BusName::try_from(name)
        .map(|_| ())
        .map_err(|_| invalid_args(format!("'{name}' is not a valid bus name")))
}
