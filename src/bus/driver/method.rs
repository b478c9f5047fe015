//! How the driver's table describes a method and an interface: the signatures shown in the
//! introspection data, the handler, and who may call it where.

use zbus::Message;

use super::support::Outcome;
use crate::bus::error::BusError;
use crate::bus::{Bus, PeerId};

/// How a method's handler answers.
#[derive(Clone, Copy)]
pub(super) enum Handler {
    /// Returns the reply, which goes out unless the caller asked for none.
    Returns(fn(&mut Bus, PeerId, &Message) -> Outcome),
    /// Sends its reply itself, because something must follow it: the signals of `Hello`, the
    /// change of a connection into a monitor, or the start of a service.
    RepliesItself(fn(&mut Bus, PeerId, &Message) -> Result<(), BusError>),
}

/// One method of the driver.
pub(super) struct Method {
    pub(super) name: &'static str,
    /// The complete types of its arguments and of its reply, for the introspection data (each
    /// handler checks its own arguments, with the message dbus-daemon gives).
    pub(super) args_in: &'static [&'static str],
    pub(super) args_out: &'static [&'static str],
    pub(super) handler: Handler,
    /// For the bus's own user and root only: the methods that reconfigure the bus.
    pub(super) privileged: bool,
    /// Served only at the driver's own path, as dbus-daemon does.
    pub(super) canonical_path_only: bool,
}

impl Method {
    const fn new(
        name: &'static str,
        args_in: &'static [&'static str],
        args_out: &'static [&'static str],
        handler: Handler,
    ) -> Method {
        Method {
            name,
            args_in,
            args_out,
            handler,
            privileged: false,
            canonical_path_only: false,
        }
    }

    pub(super) const fn returns(
        name: &'static str,
        args_in: &'static [&'static str],
        args_out: &'static [&'static str],
        handler: fn(&mut Bus, PeerId, &Message) -> Outcome,
    ) -> Method {
        Method::new(name, args_in, args_out, Handler::Returns(handler))
    }

    pub(super) const fn replies_itself(
        name: &'static str,
        args_in: &'static [&'static str],
        args_out: &'static [&'static str],
        handler: fn(&mut Bus, PeerId, &Message) -> Result<(), BusError>,
    ) -> Method {
        Method::new(name, args_in, args_out, Handler::RepliesItself(handler))
    }

    pub(super) const fn privileged(self) -> Method {
        Method {
            privileged: true,
            ..self
        }
    }

    pub(super) const fn canonical_path_only(self) -> Method {
        Method {
            canonical_path_only: true,
            ..self
        }
    }
}

/// One interface of the driver.
pub(super) struct Interface {
    pub(super) name: &'static str,
    pub(super) methods: &'static [Method],
    /// The interface exists only at the driver's own path, as in dbus-daemon.
    pub(super) canonical_path_only: bool,
    /// Its properties and signals, as introspection data: the driver emits them, nobody
    /// calls them.
    pub(super) emits: &'static str,
}
