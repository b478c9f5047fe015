//! The `GetConnection*` methods of `org.freedesktop.DBus`: who is at the other end of a
//! connection, as the kernel told the bus.

use std::collections::HashMap;
use std::os::fd::AsFd;

use zbus::fdo;
use zbus::{Fd, Message, Variant as Value};

use super::messages;
use super::support::{Outcome, args, no_owner, valid_bus_name};
use crate::bus::{Bus, Conn, Credentials, DRIVER, PeerId};
use crate::supervisor::peer_pidfd;

pub(super) fn unix_user(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    with_creds(bus, msg, "UID", |c, _| {
        if c.anonymous {
            return Err(fdo::Error::Failed(
                "Could not determine UID: the connection authenticated anonymously".into(),
            )
            .into());
        }
        messages::reply(msg, &(c.uid,))
    })
}

pub(super) fn unix_process_id(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    with_creds(bus, msg, "PID", |c, _| messages::reply(msg, &(c.pid,)))
}

pub(super) fn selinux_security_context(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    with_creds(bus, msg, "security context", |c, _| {
        match &c.security_label {
            Some(label) => messages::reply(msg, &(label.as_slice(),)),
            None => Err(fdo::Error::SELinuxSecurityContextUnknown(
                "Could not determine security context: SELinux is not in use".into(),
            )
            .into()),
        }
    })
}

pub(super) fn adt_audit_session_data(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    with_creds(bus, msg, "audit session data", |_, _| {
        Err(fdo::Error::AdtAuditDataUnknown(
            "Could not determine audit session data: this bus does not support Solaris ADT".into(),
        )
        .into())
    })
}

pub(super) fn credentials(bus: &mut Bus, from: PeerId, msg: &Message) -> Outcome {
    let caller_takes_fds = bus.peers.get(&from).is_some_and(|p| p.unix_fds);
    with_creds(bus, msg, "credentials", |c, conn| {
        let mut dict: HashMap<&str, Value<'_>> = HashMap::new();
        if !c.anonymous {
            dict.insert("UnixUserID", Value::U32(c.uid));
            dict.insert("UnixGroupIDs", Value::from(c.gids.clone()));
        }
        dict.insert("ProcessID", Value::U32(c.pid));
        if let Some(label) = &c.security_label {
            dict.insert("LinuxSecurityLabel", Value::from(label.clone()));
        }
        // Asked of the kernel only now: a pidfd per connection would double the bus's fds.
        let pidfd = conn
            .filter(|_| caller_takes_fds)
            .and_then(|c| peer_pidfd(c.socket.as_fd()));
        if let Some(pidfd) = &pidfd {
            dict.insert("ProcessFD", Value::Fd(Fd::from(pidfd.as_fd())));
        }
        messages::reply(msg, &(dict,))
    })
}

/// Runs `f` on the credentials of the connection named by the call's one string argument.
/// (`f` also gets the connection, to ask the kernel for more; none for the bus itself.)
fn with_creds(
    bus: &Bus,
    msg: &Message,
    what: &str,
    f: impl FnOnce(&Credentials, Option<&Conn>) -> Outcome,
) -> Outcome {
    let (name,): (String,) = args(msg)?;
    valid_bus_name(&name)?;
    if name == DRIVER {
        return f(&own_credentials(), None);
    }
    let peer = bus.resolve(&name).and_then(|id| bus.peers.get(&id));
    match peer {
        Some(peer) => f(&peer.creds, Some(&peer.conn)),
        None => Err(no_owner(format!(
            "Could not get {what} of name '{name}': no such name"
        ))),
    }
}

/// The bus's own credentials, for questions about `org.freedesktop.DBus` itself.
fn own_credentials() -> Credentials {
    Credentials {
        uid: nix::unistd::getuid().as_raw(),
        pid: std::process::id(),
        gids: vec![nix::unistd::getgid().as_raw()],
        security_label: None,
        anonymous: false,
    }
}
