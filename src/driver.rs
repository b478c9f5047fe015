//! The bus driver: the methods of `org.freedesktop.DBus` and its companion interfaces, served by
//! the bus itself at `/org/freedesktop/DBus`.

use std::collections::HashMap;
use std::os::fd::AsFd;

use tracing::{debug, info};
use zbus::Message;
use zbus::message::Type;
use zbus::names::{BusName, WellKnownName};
use zbus::{DynamicType, Fd, Type as ZType, Variant as Value};

use crate::activation::Waiter;
use crate::bus::names::RequestReply;
use crate::bus::{Bus, DRIVER, DRIVER_PATH, PeerId, expects_reply};
use crate::match_rule::{MatchRule, MatchRuleError};
use crate::supervisor::peer_pidfd;

/// A driver method's failure: a D-Bus error name and its message.
pub struct Fail {
    pub name: &'static str,
    pub text: String,
}

fn fail(name: &'static str, text: impl Into<String>) -> Fail {
    Fail {
        name,
        text: text.into(),
    }
}

fn invalid_args(text: impl Into<String>) -> Fail {
    fail("org.freedesktop.DBus.Error.InvalidArgs", text)
}

fn no_owner(text: impl Into<String>) -> Fail {
    fail("org.freedesktop.DBus.Error.NameHasNoOwner", text)
}

type Outcome = Result<Message, Fail>;

const PEER_IFACE: &str = "org.freedesktop.DBus.Peer";
const INTROSPECTABLE_IFACE: &str = "org.freedesktop.DBus.Introspectable";
const PROPERTIES_IFACE: &str = "org.freedesktop.DBus.Properties";
const MONITORING_IFACE: &str = "org.freedesktop.DBus.Monitoring";
const STATS_IFACE: &str = "org.freedesktop.DBus.Debug.Stats";

impl Bus {
    /// Handles a message addressed to `org.freedesktop.DBus`.
    pub fn driver_call(&mut self, from: PeerId, msg: &Message) {
        if msg.message_type() == Type::Signal {
            self.driver_signal_received(from, msg);
        }
        if msg.message_type() != Type::MethodCall {
            return;
        }
        let header = msg.header();
        let interface = header.interface().map(|i| i.as_str().to_owned());
        let member = header
            .member()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default();
        drop(header);
        debug!(from, member = %member, "driver call");
        if member == "Hello" && interface.as_deref().is_none_or(|i| i == DRIVER) {
            self.hello(from, msg);
            return;
        }
        if let Err(f) = self.check_path_and_privilege(from, msg, interface.as_deref(), &member) {
            self.reply_error(from, msg, f.name, &f.text);
            return;
        }
        // These reply themselves: after a change of state, or once a service has started.
        let replied_itself = match (interface.as_deref(), member.as_str()) {
            (Some(MONITORING_IFACE), "BecomeMonitor") => Some(self.become_monitor(from, msg)),
            (None | Some(DRIVER), "StartServiceByName") => {
                Some(self.start_service_by_name(from, msg))
            }
            _ => None,
        };
        let outcome = match replied_itself {
            Some(Ok(())) => return,
            Some(Err(f)) => Err(f),
            None => self.driver_method(from, msg, interface.as_deref(), &member),
        };
        match outcome {
            Ok(reply) if expects_reply(msg) => self.send_from_driver(from, &reply),
            Ok(_) => {}
            Err(f) => self.reply_error(from, msg, f.name, &f.text),
        }
    }

    /// As in dbus-daemon: the `Properties` and `Monitoring` interfaces exist only at the
    /// driver's own path, `UpdateActivationEnvironment` works only there, and those two
    /// reconfiguring methods are for the bus's own user (and root) only.
    fn check_path_and_privilege(
        &self,
        from: PeerId,
        msg: &Message,
        interface: Option<&str>,
        member: &str,
    ) -> Result<(), Fail> {
        let header = msg.header();
        let path = header.path().map_or("/", |p| p.as_str());
        let canonical = path == DRIVER_PATH;
        let privileged = match interface {
            Some(PROPERTIES_IFACE | MONITORING_IFACE | STATS_IFACE) if !canonical => {
                return Err(fail(
                    "org.freedesktop.DBus.Error.UnknownInterface",
                    format!(
                        "{DRIVER} does not understand interface {} at path {path}",
                        interface.unwrap_or_default()
                    ),
                ));
            }
            Some(MONITORING_IFACE) => member == "BecomeMonitor",
            None | Some(DRIVER) if member == "UpdateActivationEnvironment" => {
                if !canonical {
                    return Err(fail(
                        "org.freedesktop.DBus.Error.AccessDenied",
                        format!(
                            "Method '{member}' is only available at the canonical object path '{DRIVER_PATH}'"
                        ),
                    ));
                }
                true
            }
            _ => false,
        };
        let uid = self.peers.get(&from).map_or(u32::MAX, |p| p.creds.uid);
        if privileged && uid != self.owner_uid && uid != 0 {
            return Err(fail(
                "org.freedesktop.DBus.Error.AccessDenied",
                format!(
                    "The caller does not have sufficient privileges to call {member}: uid {uid} \
                     is neither root nor the bus's uid {}",
                    self.owner_uid
                ),
            ));
        }
        Ok(())
    }

    fn driver_method(
        &mut self,
        from: PeerId,
        msg: &Message,
        interface: Option<&str>,
        member: &str,
    ) -> Outcome {
        match (interface, member) {
            (Some(PEER_IFACE), "Ping") => reply(msg, &()),
            (Some(PEER_IFACE), "GetMachineId") => reply(msg, &(self.machine_id.as_str(),)),
            (Some(INTROSPECTABLE_IFACE), "Introspect") => {
                let header = msg.header();
                let path = header.path().map_or("/", |p| p.as_str());
                reply(msg, &(introspect(path),))
            }
            (Some(PROPERTIES_IFACE), _) => self.properties(msg, member),
            (Some(STATS_IFACE), _) => self.stats(msg, member),
            (None | Some(DRIVER), _) => self.bus_method(from, msg, member),
            (Some(other), _) if !KNOWN_INTERFACES.contains(&other) => Err(fail(
                "org.freedesktop.DBus.Error.UnknownInterface",
                format!("org.freedesktop.DBus does not understand interface {other}"),
            )),
            (Some(other), _) => Err(unknown_method(other, member)),
        }
    }

    fn bus_method(&mut self, from: PeerId, msg: &Message, member: &str) -> Outcome {
        match member {
            "RequestName" => self.request_name(from, msg),
            "ReleaseName" => self.release_name(from, msg),
            "ListQueuedOwners" => self.list_queued_owners(msg),
            "ListNames" => reply(msg, &(self.list_names(),)),
            "ListActivatableNames" => {
                let names: Vec<&str> = std::iter::once(DRIVER)
                    .chain(self.activation.names())
                    .collect();
                reply(msg, &(names,))
            }
            "NameHasOwner" => {
                let (name,): (String,) = args(msg)?;
                reply(msg, &(name == DRIVER || self.resolve(&name).is_some(),))
            }
            "GetNameOwner" => self.get_name_owner(msg),
            "UpdateActivationEnvironment" => self.update_activation_environment(msg),
            "ReloadConfig" => match self.reload_config() {
                Ok(()) => reply(msg, &()),
                Err(e) => Err(fail("org.freedesktop.DBus.Error.Failed", e)),
            },
            "AddMatch" => self.add_match(from, msg),
            "RemoveMatch" => self.remove_match(from, msg),
            "GetId" => reply(msg, &(self.guid.as_str(),)),
            "GetConnectionUnixUser" => self.with_creds(msg, "UID", |c, _| {
                if c.anonymous {
                    return Err(fail(
                        "org.freedesktop.DBus.Error.Failed",
                        "Could not determine UID: the connection authenticated anonymously",
                    ));
                }
                reply(msg, &(c.uid,))
            }),
            "GetConnectionUnixProcessID" => {
                self.with_creds(msg, "PID", |c, _| reply(msg, &(c.pid,)))
            }
            "GetConnectionCredentials" => self.connection_credentials(from, msg),
            "GetConnectionSELinuxSecurityContext" => {
                self.with_creds(msg, "security context", |c, _| match &c.security_label {
                    Some(label) => reply(msg, &(label.as_slice(),)),
                    None => Err(fail(
                        "org.freedesktop.DBus.Error.SELinuxSecurityContextUnknown",
                        "Could not determine security context: SELinux is not in use",
                    )),
                })
            }
            "GetAdtAuditSessionData" => self.with_creds(msg, "audit session data", |_, _| {
                Err(fail(
                    "org.freedesktop.DBus.Error.AdtAuditDataUnknown",
                    "Could not determine audit session data: this bus does not support Solaris ADT",
                ))
            }),
            _ => Err(unknown_method(DRIVER, member)),
        }
    }

    /// `Hello`: the reply, then `NameOwnerChanged`, then `NameAcquired`, as dbus-daemon orders them.
    fn hello(&mut self, from: PeerId, msg: &Message) {
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        if peer.registered {
            self.reply_error(
                from,
                msg,
                "org.freedesktop.DBus.Error.Failed",
                "Already handled an Hello message",
            );
            return;
        }
        let uid = peer.creds.uid;
        if let Err(text) = self.complete_connection(from, uid) {
            if crate::log_limit::HELLO_REFUSED.allow() {
                tracing::warn!(uid, "refusing Hello: {text}");
            }
            self.reply_error(
                from,
                msg,
                "org.freedesktop.DBus.Error.LimitsExceeded",
                &text,
            );
            return;
        }
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        peer.registered = true;
        let unique = peer.unique.clone();
        debug!(peer = %unique, pid = peer.creds.pid, uid = peer.creds.uid, "client registered");
        match reply(msg, &(unique.as_str(),)) {
            Ok(r) => self.send_from_driver(from, &r),
            Err(f) => tracing::warn!("cannot build Hello reply: {}", f.text),
        }
        self.broadcast_owner_changed(&unique, "", &unique);
        match crate::bus::driver_signal("NameAcquired", Some(&unique), &(unique.as_str(),)) {
            Ok(signal) => self.send_from_driver(from, &signal),
            Err(e) => tracing::warn!("cannot build NameAcquired: {e}"),
        }
    }

    fn request_name(&mut self, from: PeerId, msg: &Message) -> Outcome {
        let (name, flags): (String, u32) = args(msg)?;
        let name = ownable_name(&name)?;
        if !self.may_own(from, name) {
            let unique = self.unique_name(from).unwrap_or_default();
            return Err(fail(
                "org.freedesktop.DBus.Error.AccessDenied",
                format!(
                    "Connection \"{unique}\" is not allowed to own the service \"{name}\" due to security policies in the configuration file"
                ),
            ));
        }
        // As in dbus-daemon: after the policy, and the unique name counts as one.
        if self.names.count_for(from) + 1 >= self.limits.max_names_per_connection {
            return Err(fail(
                "org.freedesktop.DBus.Error.LimitsExceeded",
                "The maximum number of names per connection has been reached",
            ));
        }
        let (result, events) = self.names.request(name, from, flags);
        if result == RequestReply::PrimaryOwner {
            debug!(name, from, "name acquired");
        }
        // dbus-daemon sends the signals of a change before the reply that reports it.
        self.announce(events);
        reply(msg, &(result as u32,))
    }

    fn release_name(&mut self, from: PeerId, msg: &Message) -> Outcome {
        let (name,): (String,) = args(msg)?;
        let name = ownable_name(&name)?;
        let (result, events) = self.names.release(name, from);
        self.announce(events);
        reply(msg, &(result as u32,))
    }

    fn list_queued_owners(&self, msg: &Message) -> Outcome {
        let (name,): (String,) = args(msg)?;
        valid_bus_name(&name)?;
        if name == DRIVER {
            return reply(msg, &(vec![DRIVER],));
        }
        if name.starts_with(':') {
            return match self.resolve(&name) {
                Some(_) => reply(msg, &(vec![name.as_str()],)),
                None => Err(no_owner(format!(
                    "Could not get owners of name '{name}': no such name"
                ))),
            };
        }
        let queue = self.names.queue(&name).ok_or_else(|| {
            no_owner(format!(
                "Could not get owners of name '{name}': no such name"
            ))
        })?;
        let owners: Vec<&str> = queue
            .iter()
            .filter_map(|&id| self.unique_name(id))
            .collect();
        reply(msg, &(owners,))
    }

    fn list_names(&self) -> Vec<&str> {
        let mut names = vec![DRIVER];
        names.extend(
            self.peers
                .values()
                .filter(|p| p.registered && !p.monitor)
                .map(|p| p.unique.as_str()),
        );
        names.extend(self.names.names());
        names
    }

    fn get_name_owner(&self, msg: &Message) -> Outcome {
        // An invalid name has no owner either, as dbus-daemon answers.
        let (name,): (String,) = args(msg)?;
        if name == DRIVER {
            return reply(msg, &(DRIVER,));
        }
        match self.resolve(&name).and_then(|id| self.unique_name(id)) {
            Some(owner) => reply(msg, &(owner,)),
            None => Err(no_owner(format!(
                "Could not get owner of name '{name}': no such name"
            ))),
        }
    }

    /// `StartServiceByName`: 2 at once for an owned name, else 1 once the service owns it.
    fn start_service_by_name(&mut self, from: PeerId, msg: &Message) -> Result<(), Fail> {
        let (name, _flags): (String, u32) = args(msg)?;
        valid_bus_name(&name)?;
        // Only well-known names are started; the driver and unique names are not services.
        let well_known = name != DRIVER && !name.starts_with(':');
        if well_known && self.resolve(&name).is_some() {
            self.reply_start(from, msg, 2);
            return Ok(());
        }
        if !well_known || !self.activation.is_activatable(&name) {
            return Err(fail(
                "org.freedesktop.DBus.Error.ServiceUnknown",
                format!("The name {name} was not provided by any .service files"),
            ));
        }
        self.activate(
            &name,
            Waiter::Start {
                from,
                call: msg.clone(),
            },
        );
        Ok(())
    }

    /// `UpdateActivationEnvironment` (the caller's privilege is checked before).
    fn update_activation_environment(&mut self, msg: &Message) -> Outcome {
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
        self.forward_environment(&vars);
        self.activation.update_environment(vars);
        reply(msg, &())
    }

    fn add_match(&mut self, from: PeerId, msg: &Message) -> Outcome {
        let (text,): (String,) = args(msg)?;
        let rule = MatchRule::parse(&text).map_err(rule_error)?;
        let count = self.peers.get(&from).map_or(0, |p| p.rules.len());
        if count >= self.limits.max_match_rules_per_connection {
            return Err(fail(
                "org.freedesktop.DBus.Error.LimitsExceeded",
                "The maximum number of match rules per connection has been reached",
            ));
        }
        self.add_rule(from, rule);
        reply(msg, &())
    }

    fn remove_match(&mut self, from: PeerId, msg: &Message) -> Outcome {
        let (text,): (String,) = args(msg)?;
        let rule = MatchRule::parse(&text).map_err(rule_error)?;
        if !self.remove_rule(from, &rule) {
            return Err(fail(
                "org.freedesktop.DBus.Error.MatchRuleNotFound",
                "The given match rule wasn't found and can't be removed",
            ));
        }
        reply(msg, &())
    }

    /// Runs `f` on the credentials of the connection named by the call's one string argument.
    /// (`f` also gets the connection, to ask the kernel for more; none for the bus itself.)
    fn with_creds(
        &self,
        msg: &Message,
        what: &str,
        f: impl FnOnce(&crate::bus::Credentials, Option<&crate::bus::Conn>) -> Outcome,
    ) -> Outcome {
        let (name,): (String,) = args(msg)?;
        valid_bus_name(&name)?;
        if name == DRIVER {
            return f(&own_credentials(), None);
        }
        let id = self.resolve(&name).ok_or_else(|| {
            no_owner(format!(
                "Could not get {what} of name '{name}': no such name"
            ))
        })?;
        match self.peers.get(&id) {
            Some(peer) => f(&peer.creds, Some(&peer.conn)),
            None => Err(no_owner(format!(
                "Could not get {what} of name '{name}': no such name"
            ))),
        }
    }

    fn connection_credentials(&self, from: PeerId, msg: &Message) -> Outcome {
        let caller_takes_fds = self.peers.get(&from).is_some_and(|p| p.unix_fds);
        self.with_creds(msg, "credentials", |c, conn| {
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
            reply(msg, &(dict,))
        })
    }

    fn properties(&self, msg: &Message, member: &str) -> Outcome {
        match member {
            "Get" => {
                let (interface, property): (String, String) = args(msg)?;
                if interface != DRIVER {
                    return Err(unknown_interface(&interface));
                }
                match property.as_str() {
                    "Features" => reply(msg, &(Value::from(features(self.activation.systemd)),)),
                    "Interfaces" => reply(msg, &(Value::from(optional_interfaces()),)),
                    _ => Err(fail(
                        "org.freedesktop.DBus.Error.UnknownProperty",
                        format!("Interface {interface} has no property {property}"),
                    )),
                }
            }
            "GetAll" => {
                let (interface,): (String,) = args(msg)?;
                let mut all: HashMap<&str, Value<'_>> = HashMap::new();
                if interface == DRIVER {
                    all.insert("Features", Value::from(features(self.activation.systemd)));
                    all.insert("Interfaces", Value::from(optional_interfaces()));
                } else if !KNOWN_INTERFACES.contains(&interface.as_str()) {
                    // The other interfaces of the driver have no properties.
                    return Err(unknown_interface(&interface));
                }
                reply(msg, &(all,))
            }
            "Set" => {
                let (interface, property, _value): (String, String, zbus::OwnedVariant) =
                    args(msg)?;
                if interface != DRIVER {
                    return Err(unknown_interface(&interface));
                }
                if !matches!(property.as_str(), "Features" | "Interfaces") {
                    return Err(fail(
                        "org.freedesktop.DBus.Error.UnknownProperty",
                        format!("Interface {interface} has no property {property}"),
                    ));
                }
                Err(fail(
                    "org.freedesktop.DBus.Error.PropertyReadOnly",
                    format!("Property {property} of {interface} is read-only"),
                ))
            }
            _ => Err(unknown_method(PROPERTIES_IFACE, member)),
        }
    }

    /// `org.freedesktop.DBus.Debug.Stats`: counts of what the bus holds now.
    fn stats(&self, msg: &Message, member: &str) -> Outcome {
        let registered = || self.peers.values().filter(|p| p.registered);
        match member {
            "GetStats" => {
                let _: () = args(msg)?;
                let mut stats: HashMap<&str, Value<'_>> = HashMap::new();
                stats.insert("ActiveConnections", Value::U32(registered().count() as u32));
                let incomplete = self.peers.values().filter(|p| !p.registered).count();
                stats.insert("IncompleteConnections", Value::U32(incomplete as u32));
                let rules: usize = self.peers.values().map(|p| p.rules.len()).sum();
                stats.insert("MatchRules", Value::U32(rules as u32));
                stats.insert("BusNames", Value::U32(self.names.names().count() as u32));
                reply(msg, &(stats,))
            }
            "GetConnectionStats" => {
                let (name,): (String,) = args(msg)?;
                let id = self.resolve(&name).ok_or_else(|| {
                    no_owner(format!(
                        "Could not get statistics of name '{name}': no such name"
                    ))
                })?;
                let peer = self
                    .peers
                    .get(&id)
                    .ok_or_else(|| invalid_args("unknown connection"))?;
                let mut stats: HashMap<&str, Value<'_>> = HashMap::new();
                stats.insert("UniqueName", Value::from(peer.unique.as_str()));
                stats.insert("MatchRules", Value::U32(peer.rules.len() as u32));
                stats.insert("BusNames", Value::U32(self.names.count_for(id) as u32));
                let queued = peer.conn.outbox.borrow().queued_bytes();
                stats.insert(
                    "OutgoingBytes",
                    Value::U32(queued.min(u32::MAX as usize) as u32),
                );
                reply(msg, &(stats,))
            }
            "GetAllMatchRules" => {
                let _: () = args(msg)?;
                let all: HashMap<&str, Vec<String>> = registered()
                    .map(|p| {
                        (
                            p.unique.as_str(),
                            p.rules.iter().map(|r| r.to_string()).collect(),
                        )
                    })
                    .collect();
                reply(msg, &(all,))
            }
            _ => Err(unknown_method(STATS_IFACE, member)),
        }
    }

    /// `BecomeMonitor`: the reply goes out first, then the connection turns into a monitor.
    fn become_monitor(&mut self, from: PeerId, msg: &Message) -> Result<(), Fail> {
        let (texts, flags): (Vec<String>, u32) = args(msg)?;
        if flags != 0 {
            return Err(invalid_args("BecomeMonitor: flags must be 0"));
        }
        let rules = texts
            .iter()
            .map(|t| MatchRule::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(rule_error)?;
        let done = reply(msg, &())?;
        self.send_from_driver(from, &done);
        if let Some(peer) = self.peers.get(&from)
            && crate::log_limit::NEW_MONITOR.allow()
        {
            info!(peer = %peer.unique, "connection became a monitor");
        }
        self.make_monitor(from, rules);
        Ok(())
    }
}

const KNOWN_INTERFACES: &[&str] = &[
    DRIVER,
    PEER_IFACE,
    INTROSPECTABLE_IFACE,
    PROPERTIES_IFACE,
    MONITORING_IFACE,
    STATS_IFACE,
];

/// What this bus does of dbus-daemon's optional behaviours: it drops unknown header fields
/// (`header_filter`), and starts services through systemd when asked to.
fn features(systemd_activation: bool) -> Vec<&'static str> {
    let mut features = vec!["HeaderFiltering"];
    if systemd_activation {
        features.push("SystemdActivation");
    }
    features
}

fn optional_interfaces() -> Vec<&'static str> {
    vec![MONITORING_IFACE, STATS_IFACE]
}

/// `MatchRuleInvalid`, or `LimitsExceeded` for an over-long rule.
fn rule_error(e: MatchRuleError) -> Fail {
    fail(e.error_name(), e.to_string())
}

fn unknown_method(interface: &str, member: &str) -> Fail {
    fail(
        "org.freedesktop.DBus.Error.UnknownMethod",
        format!("{DRIVER} does not understand message {interface}.{member}"),
    )
}

fn unknown_interface(interface: &str) -> Fail {
    fail(
        "org.freedesktop.DBus.Error.UnknownInterface",
        format!("{DRIVER} does not understand interface {interface}"),
    )
}

/// The call's arguments, or `InvalidArgs` when its signature is not the method's.
fn args<T>(msg: &Message) -> Result<T, Fail>
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

/// A method return from the driver to the caller.
pub(crate) fn reply<B>(call: &Message, body: &B) -> Outcome
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
        .map_err(|e| fail("org.freedesktop.DBus.Error.Failed", e.to_string()))
}

fn valid_bus_name(name: &str) -> Result<(), Fail> {
    BusName::try_from(name)
        .map(|_| ())
        .map_err(|_| invalid_args(format!("'{name}' is not a valid bus name")))
}

/// A name a client may own: a valid well-known name other than the driver's.
fn ownable_name(name: &str) -> Result<&str, Fail> {
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

/// The bus's own credentials, for questions about `org.freedesktop.DBus` itself.
fn own_credentials() -> crate::bus::Credentials {
    crate::bus::Credentials {
        uid: nix::unistd::getuid().as_raw(),
        pid: std::process::id(),
        gids: vec![nix::unistd::getgid().as_raw()],
        security_label: None,
        anonymous: false,
    }
}

/// The introspection data for a path: the driver's interfaces at its own path and at `/`, and the
/// nodes that lead to it. `broker --introspect` prints it for the driver's path.
pub fn introspect(path: &str) -> String {
    let mut xml = String::from(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n\
         \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
    );
    if path == DRIVER_PATH || path == "/" {
        xml.push_str(DRIVER_INTERFACES_XML);
    }
    let below = if path == "/" {
        DRIVER_PATH.strip_prefix('/')
    } else {
        DRIVER_PATH
            .strip_prefix(path)
            .and_then(|r| r.strip_prefix('/'))
    };
    if let Some(child) = below
        .and_then(|rest| rest.split('/').next())
        .filter(|c| !c.is_empty())
    {
        xml.push_str(&format!("  <node name=\"{child}\"/>\n"));
    }
    xml.push_str("</node>\n");
    xml
}

const DRIVER_INTERFACES_XML: &str = r#"  <interface name="org.freedesktop.DBus">
    <method name="Hello"><arg direction="out" type="s"/></method>
    <method name="RequestName"><arg direction="in" type="s"/><arg direction="in" type="u"/><arg direction="out" type="u"/></method>
    <method name="ReleaseName"><arg direction="in" type="s"/><arg direction="out" type="u"/></method>
    <method name="StartServiceByName"><arg direction="in" type="s"/><arg direction="in" type="u"/><arg direction="out" type="u"/></method>
    <method name="UpdateActivationEnvironment"><arg direction="in" type="a{ss}"/></method>
    <method name="NameHasOwner"><arg direction="in" type="s"/><arg direction="out" type="b"/></method>
    <method name="ListNames"><arg direction="out" type="as"/></method>
    <method name="ListActivatableNames"><arg direction="out" type="as"/></method>
    <method name="AddMatch"><arg direction="in" type="s"/></method>
    <method name="RemoveMatch"><arg direction="in" type="s"/></method>
    <method name="GetNameOwner"><arg direction="in" type="s"/><arg direction="out" type="s"/></method>
    <method name="ListQueuedOwners"><arg direction="in" type="s"/><arg direction="out" type="as"/></method>
    <method name="GetConnectionUnixUser"><arg direction="in" type="s"/><arg direction="out" type="u"/></method>
    <method name="GetConnectionUnixProcessID"><arg direction="in" type="s"/><arg direction="out" type="u"/></method>
    <method name="GetAdtAuditSessionData"><arg direction="in" type="s"/><arg direction="out" type="ay"/></method>
    <method name="GetConnectionSELinuxSecurityContext"><arg direction="in" type="s"/><arg direction="out" type="ay"/></method>
    <method name="ReloadConfig"/>
    <method name="GetId"><arg direction="out" type="s"/></method>
    <method name="GetConnectionCredentials"><arg direction="in" type="s"/><arg direction="out" type="a{sv}"/></method>
    <property name="Features" type="as" access="read"/>
    <property name="Interfaces" type="as" access="read"/>
    <signal name="NameOwnerChanged"><arg type="s"/><arg type="s"/><arg type="s"/></signal>
    <signal name="NameLost"><arg type="s"/></signal>
    <signal name="NameAcquired"><arg type="s"/></signal>
    <signal name="ActivatableServicesChanged"/>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get"><arg direction="in" type="s"/><arg direction="in" type="s"/><arg direction="out" type="v"/></method>
    <method name="GetAll"><arg direction="in" type="s"/><arg direction="out" type="a{sv}"/></method>
    <method name="Set"><arg direction="in" type="s"/><arg direction="in" type="s"/><arg direction="in" type="v"/></method>
    <signal name="PropertiesChanged"><arg type="s" name="interface_name"/><arg type="a{sv}" name="changed_properties"/><arg type="as" name="invalidated_properties"/></signal>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect"><arg direction="out" type="s"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Monitoring">
    <method name="BecomeMonitor"><arg direction="in" type="as"/><arg direction="in" type="u"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Debug.Stats">
    <method name="GetStats"><arg direction="out" type="a{sv}"/></method>
    <method name="GetConnectionStats"><arg direction="in" type="s"/><arg direction="out" type="a{sv}"/></method>
    <method name="GetAllMatchRules"><arg direction="out" type="a{sas}"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="GetMachineId"><arg direction="out" type="s"/></method>
    <method name="Ping"/>
  </interface>
"#;
