//! `org.freedesktop.DBus`: `Hello`, the names, starting services, match rules, and the bus's
//! identity and configuration (the `GetConnection*` methods are in `credentials.rs`).

use std::collections::HashMap;

use tracing::debug;
use zbus::Message;
use zbus::fdo::{self, RequestNameFlags, RequestNameReply, StartServiceReply};
use zbus::names::WellKnownName;

use super::messages;
use super::support::{Outcome, args, invalid_args, no_owner, valid_bus_name};
use crate::activation::Waiter;
use crate::bus::error::BusError;
use crate::bus::{Bus, DRIVER, PeerId};
use crate::match_rule::MatchRule;

/// `Hello`: the reply, then `NameOwnerChanged`, then `NameAcquired`, as dbus-daemon orders them.
pub(super) fn hello(bus: &mut Bus, from: PeerId, msg: &Message) -> Result<(), BusError> {
    let Some(peer) = bus.peers.get_mut(&from) else {
        return Ok(());
    };
    if peer.registered {
        return Err(fdo::Error::Failed("Already handled an Hello message".into()).into());
    }
    let uid = peer.creds.uid;
    if let Err(e) = bus.complete_connection(from, uid) {
        if crate::log_limit::HELLO_REFUSED.allow() {
            tracing::warn!(uid, "refusing Hello: {e}");
        }
        return Err(e);
    }
    let Some(peer) = bus.peers.get_mut(&from) else {
        return Ok(());
    };
    peer.registered = true;
    let unique = peer.unique.clone();
    debug!(peer = %unique, pid = peer.creds.pid, uid = peer.creds.uid, "client registered");
    match messages::reply(msg, &(unique.as_str(),)) {
        Ok(r) => bus.send_from_driver(from, &r),
        Err(e) => tracing::warn!("cannot build Hello reply: {e}"),
    }
    bus.broadcast_owner_changed(&unique, "", &unique);
    match messages::signal("NameAcquired", Some(&unique), &(unique.as_str(),)) {
        Ok(signal) => bus.send_from_driver(from, &signal),
        Err(e) => tracing::warn!("cannot build NameAcquired: {e}"),
    }
    Ok(())
}

pub(super) fn request_name(bus: &mut Bus, from: PeerId, msg: &Message) -> Outcome {
    let (name, flags): (String, u32) = args(msg)?;
    let name = ownable_name(&name)?;
    if !bus.may_own(from, name) {
        let unique = bus.unique_name(from).unwrap_or_default();
        return Err(fdo::Error::AccessDenied(format!(
            "Connection \"{unique}\" is not allowed to own the service \"{name}\" due to security policies in the configuration file"
        ))
        .into());
    }
    // As in dbus-daemon: after the policy, and the unique name counts as one.
    if bus.names.count_for(from) + 1 >= bus.limits.max_names_per_connection {
        return Err(fdo::Error::LimitsExceeded(
            "The maximum number of names per connection has been reached".into(),
        )
        .into());
    }
    let flags = RequestNameFlags::from_bits_retain(flags);
    let (result, events) = bus.names.request(name, from, flags);
    if result == RequestNameReply::PrimaryOwner {
        debug!(name, from, "name acquired");
    }
    // dbus-daemon sends the signals of a change before the reply that reports it.
    bus.announce(events);
    messages::reply(msg, &(result,))
}

pub(super) fn release_name(bus: &mut Bus, from: PeerId, msg: &Message) -> Outcome {
    let (name,): (String,) = args(msg)?;
    let name = ownable_name(&name)?;
    let (result, events) = bus.names.release(name, from);
    bus.announce(events);
    messages::reply(msg, &(result,))
}

/// `StartServiceByName`: `AlreadyRunning` at once for an owned name, else `Success` once the
/// service owns it.
pub(super) fn start_service_by_name(
    bus: &mut Bus,
    from: PeerId,
    msg: &Message,
) -> Result<(), BusError> {
    let (name, _flags): (String, u32) = args(msg)?;
    valid_bus_name(&name)?;
    // Only well-known names are started; the driver and unique names are not services.
    let well_known = name != DRIVER && !name.starts_with(':');
    if well_known && bus.resolve(&name).is_some() {
        bus.reply_start(from, msg, StartServiceReply::AlreadyRunning);
        return Ok(());
    }
    if !well_known || !bus.activation.is_activatable(&name) {
        return Err(fdo::Error::ServiceUnknown(format!(
            "The name {name} was not provided by any .service files"
        ))
        .into());
    }
    let waiter = Waiter::Start {
        from,
        call: msg.clone(),
    };
    bus.activate(&name, waiter);
    Ok(())
}

/// `UpdateActivationEnvironment` (the caller's privilege is checked before).
pub(super) fn update_activation_environment(
    bus: &mut Bus,
    _from: PeerId,
    msg: &Message,
) -> Outcome {
    let (vars,): (HashMap<String, String>,) = args(msg)?;
    if let Some(bad) = vars
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(invalid_args(format!(
            "{bad:?} is not a valid environment variable name"
        )));
    }
    let mut vars: Vec<(String, String)> = vars.into_iter().collect();
    vars.sort();
    bus.forward_environment(&vars);
    bus.activation.update_environment(vars);
    messages::reply(msg, &())
}

pub(super) fn name_has_owner(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let (name,): (String,) = args(msg)?;
    messages::reply(msg, &(name == DRIVER || bus.resolve(&name).is_some(),))
}

/// The driver, every registered connection but the monitors, and every well-known name.
pub(super) fn list_names(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let mut names = vec![DRIVER];
    names.extend(
        bus.peers
            .values()
            .filter(|p| p.registered && !p.monitor)
            .map(|p| p.unique.as_str()),
    );
    names.extend(bus.names.names());
    messages::reply(msg, &(names,))
}

pub(super) fn list_activatable_names(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let names: Vec<&str> = std::iter::once(DRIVER)
        .chain(bus.activation.names())
        .collect();
    messages::reply(msg, &(names,))
}

pub(super) fn add_match(bus: &mut Bus, from: PeerId, msg: &Message) -> Outcome {
    let (text,): (String,) = args(msg)?;
    let rule = MatchRule::parse(&text).map_err(rule_error)?;
    let count = bus.peers.get(&from).map_or(0, |p| p.rules.len());
    if count >= bus.limits.max_match_rules_per_connection {
        return Err(fdo::Error::LimitsExceeded(
            "The maximum number of match rules per connection has been reached".into(),
        )
        .into());
    }
    bus.add_rule(from, rule);
    messages::reply(msg, &())
}

pub(super) fn remove_match(bus: &mut Bus, from: PeerId, msg: &Message) -> Outcome {
    let (text,): (String,) = args(msg)?;
    let rule = MatchRule::parse(&text).map_err(rule_error)?;
    if !bus.remove_rule(from, &rule) {
        return Err(fdo::Error::MatchRuleNotFound(
            "The given match rule wasn't found and can't be removed".into(),
        )
        .into());
    }
    messages::reply(msg, &())
}

pub(super) fn get_name_owner(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    // An invalid name has no owner either, as dbus-daemon answers.
    let (name,): (String,) = args(msg)?;
    if name == DRIVER {
        return messages::reply(msg, &(DRIVER,));
    }
    match bus.resolve(&name).and_then(|id| bus.unique_name(id)) {
        Some(owner) => messages::reply(msg, &(owner,)),
        None => Err(no_owner(format!(
            "Could not get owner of name '{name}': no such name"
        ))),
    }
}

pub(super) fn list_queued_owners(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let (name,): (String,) = args(msg)?;
    valid_bus_name(&name)?;
    let no_such_name = || {
        no_owner(format!(
            "Could not get owners of name '{name}': no such name"
        ))
    };
    if name == DRIVER {
        return messages::reply(msg, &(vec![DRIVER],));
    }
    if name.starts_with(':') {
        return match bus.resolve(&name) {
            Some(_) => messages::reply(msg, &(vec![name.as_str()],)),
            None => Err(no_such_name()),
        };
    }
    let queue = bus.names.queue(&name).ok_or_else(no_such_name)?;
    let owners: Vec<&str> = queue.iter().filter_map(|&id| bus.unique_name(id)).collect();
    messages::reply(msg, &(owners,))
}

/// `ReloadConfig`: a bad file fails the call with the reason, and keeps the configuration.
pub(super) fn reload_config(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    match bus.reload_config() {
        Ok(()) => messages::reply(msg, &()),
        Err(e) => Err(fdo::Error::Failed(e).into()),
    }
}

pub(super) fn get_id(bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    messages::reply(msg, &(bus.guid.as_str(),))
}

/// A rule the parser refused: `LimitsExceeded` for an over-long one (as dbus-daemon answers),
/// `MatchRuleInvalid` for any other.
pub(super) fn rule_error(e: crate::match_rule::MatchRuleError) -> BusError {
    let text = e.to_string();
    if e.too_long() {
        fdo::Error::LimitsExceeded(text).into()
    } else {
        fdo::Error::MatchRuleInvalid(text).into()
    }
}

/// A name a client may own: a valid well-known name other than the driver's.
fn ownable_name(name: &str) -> Result<&str, BusError> {
    if name.starts_with(':') {
        return Err(invalid_args(format!(
            "Cannot acquire a service starting with ':' such as \"{name}\""
        )));
    }
    WellKnownName::try_from(name)
        .map_err(|_| invalid_args(format!("Requested bus name \"{name}\" is not valid")))?;
    if name == DRIVER {
        return Err(invalid_args(format!(
            "Connection is not allowed to own the service \"{DRIVER}\" because it is reserved for D-Bus' use only"
        )));
    }
    Ok(name)
}

impl Bus {
    /// Tells everyone who listens that the set of activatable names changed (after a reload of
    /// the activation files or of the configuration).
    pub(in crate::bus) fn activatable_services_changed(&mut self) {
        match messages::activatable_services_changed() {
            Ok(signal) => self.broadcast(&signal),
            Err(e) => tracing::warn!("cannot build ActivatableServicesChanged: {e}"),
        }
    }
}
