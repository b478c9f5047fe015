//! Every message the bus sends in its own name, `org.freedesktop.DBus`: method returns, errors
//! and signals of the driver, and its requests to systemd. They are built here only, so that
//! the driver's sender, path and interface are written once.

use std::num::NonZeroU32;

use zbus::fdo;
use zbus::message::Flags;
use zbus::{DynamicType, Message};

use crate::bus::error::BusError;

/// The bus driver's own name.
pub const DRIVER: &str = "org.freedesktop.DBus";
pub const DRIVER_PATH: &str = "/org/freedesktop/DBus";
/// systemd's interface for starting units on the bus's request.
pub const ACTIVATOR: &str = "org.freedesktop.systemd1.Activator";

/// A method return from the driver to the caller of `call`.
pub fn reply<B>(call: &Message, body: &B) -> Result<Message, BusError>
where
    B: serde::Serialize + DynamicType,
{
    let header = call.header();
    let mut builder = Message::method_return(&header).sender(DRIVER);
    if let Some(sender) = header.sender() {
        builder = builder.destination(sender.as_str());
    }
    builder
        .build(body)
        .map_err(|e| fdo::Error::Failed(e.to_string()).into())
}

/// An error from the driver in reply to `call`.
pub fn error(call: &Message, error: &BusError) -> zbus::Result<Message> {
    let header = call.header();
    let mut builder = Message::error(&header, error.name()).sender(DRIVER);
    if let Some(sender) = header.sender() {
        builder = builder.destination(sender.as_str());
    }
    builder.build(&(error.text(),))
}

/// `NoReply` to the call `serial` of the peer `to`, which the bus ends itself (the callee left,
/// or the reply timed out) and so no longer has at hand.
pub fn no_reply(serial: u32, to: &str, text: &str) -> zbus::Result<Message> {
    let call = Message::method_call("/", "x")
        .serial(NonZeroU32::new(serial).ok_or(zbus::Error::InvalidSerial)?)
        .sender(to)
        .build(&())?;
    error(&call, &fdo::Error::NoReply(text.to_owned()).into())
}

/// A signal of `org.freedesktop.DBus`; `to` makes it unicast.
pub fn signal<B>(member: &str, to: Option<&str>, body: &B) -> zbus::Result<Message>
where
    B: serde::Serialize + DynamicType,
{
    let mut builder = Message::signal(DRIVER_PATH, DRIVER, member).sender(DRIVER);
    if let Some(to) = to {
        builder = builder.destination(to);
    }
    builder.build(body)
}

/// `NameOwnerChanged`, to everyone who listens.
pub fn name_owner_changed(name: &str, old: &str, new: &str) -> zbus::Result<Message> {
    signal("NameOwnerChanged", None, &(name, old, new))
}

/// `ActivatableServicesChanged`: the set of activatable names changed.
pub fn activatable_services_changed() -> zbus::Result<Message> {
    signal("ActivatableServicesChanged", None, &())
}

/// The interface of broker's own supervisor, served by the driver.
pub const SUPERVISOR: &str = "org.broker.Supervisor1";

/// `org.broker.Supervisor1.ServiceStateChanged`: `name`'s service is now in `state`.
pub fn service_state_changed(name: &str, state: &str) -> zbus::Result<Message> {
    Message::signal(DRIVER_PATH, SUPERVISOR, "ServiceStateChanged")
        .sender(DRIVER)
        .build(&(name, state))
}

/// systemd's `ActivationRequest`: asks systemd (`to`) to start `unit`.
pub fn activation_request(to: &str, unit: &str) -> zbus::Result<Message> {
    Message::signal(DRIVER_PATH, ACTIVATOR, "ActivationRequest")
        .sender(DRIVER)
        .destination(to)
        .build(&(unit,))
}

/// systemd's `SetEnvironment`, without a reply: passes `UpdateActivationEnvironment` on to
/// systemd (`to`), which starts the services.
pub fn set_environment(to: &str, assignments: &[String]) -> zbus::Result<Message> {
    Message::method_call("/org/freedesktop/systemd1", "SetEnvironment")
        .interface("org.freedesktop.systemd1.Manager")
        .destination(to)
        .sender(DRIVER)
        .with_flags(Flags::NO_REPLY_EXPECTED)
        .build(&(assignments,))
}
