//! The bus driver: the methods of `org.freedesktop.DBus` and its companion interfaces, served by
//! the bus itself at `/org/freedesktop/DBus`.
//!
//! One table, [`INTERFACES`], lists every method once: its signatures, its handler, and who may
//! call it where. Dispatch, the path and privilege checks and the introspection data all read
//! it, so they cannot disagree. The handlers live beside this file, one file per interface
//! (`credentials.rs` holds the `GetConnection*` methods of `org.freedesktop.DBus`).

mod credentials;
mod dbus;
mod introspect;
pub mod messages;
mod method;
mod monitoring;
mod peer;
mod properties;
mod stats;
mod supervisor;
mod support;

use tracing::debug;
use zbus::Message;
use zbus::fdo;
use zbus::message::Type;

use super::error::BusError;
use super::router::expects_reply;
use super::{Bus, DRIVER, DRIVER_PATH, PeerId};
use method::{Handler, Interface, Method};
use support::{
    INTROSPECTABLE_IFACE, MONITORING_IFACE, Outcome, PEER_IFACE, PROPERTIES_IFACE, STATS_IFACE,
    unknown_interface, unknown_method,
};

/// Every method of the driver, in the order of its introspection data.
const INTERFACES: &[Interface] = &[
    Interface {
        name: DRIVER,
        methods: &[
            Method::replies_itself("Hello", &[], &["s"], dbus::hello),
            Method::returns("RequestName", &["s", "u"], &["u"], dbus::request_name),
            Method::returns("ReleaseName", &["s"], &["u"], dbus::release_name),
            Method::replies_itself(
                "StartServiceByName",
                &["s", "u"],
                &["u"],
                dbus::start_service_by_name,
            ),
            Method::returns(
                "UpdateActivationEnvironment",
                &["a{ss}"],
                &[],
                dbus::update_activation_environment,
            )
            .privileged()
            .canonical_path_only(),
            Method::returns("NameHasOwner", &["s"], &["b"], dbus::name_has_owner),
            Method::returns("ListNames", &[], &["as"], dbus::list_names),
            Method::returns(
                "ListActivatableNames",
                &[],
                &["as"],
                dbus::list_activatable_names,
            ),
            Method::returns("AddMatch", &["s"], &[], dbus::add_match),
            Method::returns("RemoveMatch", &["s"], &[], dbus::remove_match),
            Method::returns("GetNameOwner", &["s"], &["s"], dbus::get_name_owner),
            Method::returns(
                "ListQueuedOwners",
                &["s"],
                &["as"],
                dbus::list_queued_owners,
            ),
            Method::returns(
                "GetConnectionUnixUser",
                &["s"],
                &["u"],
                credentials::unix_user,
            ),
            Method::returns(
                "GetConnectionUnixProcessID",
                &["s"],
                &["u"],
                credentials::unix_process_id,
            ),
            Method::returns(
                "GetAdtAuditSessionData",
                &["s"],
                &["ay"],
                credentials::adt_audit_session_data,
            ),
            Method::returns(
                "GetConnectionSELinuxSecurityContext",
                &["s"],
                &["ay"],
                credentials::selinux_security_context,
            ),
            Method::returns("ReloadConfig", &[], &[], dbus::reload_config),
            Method::returns("GetId", &[], &["s"], dbus::get_id),
            Method::returns(
                "GetConnectionCredentials",
                &["s"],
                &["a{sv}"],
                credentials::credentials,
            ),
        ],
        canonical_path_only: false,
        emits: r#"    <property name="Features" type="as" access="read"/>
    <property name="Interfaces" type="as" access="read"/>
    <signal name="NameOwnerChanged"><arg type="s"/><arg type="s"/><arg type="s"/></signal>
    <signal name="NameLost"><arg type="s"/></signal>
    <signal name="NameAcquired"><arg type="s"/></signal>
    <signal name="ActivatableServicesChanged"/>
"#,
    },
    Interface {
        name: PROPERTIES_IFACE,
        methods: &[
            Method::returns("Get", &["s", "s"], &["v"], properties::get),
            Method::returns("GetAll", &["s"], &["a{sv}"], properties::get_all),
            Method::returns("Set", &["s", "s", "v"], &[], properties::set),
        ],
        canonical_path_only: true,
        emits: r#"    <signal name="PropertiesChanged"><arg type="s" name="interface_name"/><arg type="a{sv}" name="changed_properties"/><arg type="as" name="invalidated_properties"/></signal>
"#,
    },
    Interface {
        name: INTROSPECTABLE_IFACE,
        methods: &[Method::returns("Introspect", &[], &["s"], introspect_call)],
        canonical_path_only: false,
        emits: "",
    },
    Interface {
        name: MONITORING_IFACE,
        methods: &[Method::replies_itself(
            "BecomeMonitor",
            &["as", "u"],
            &[],
            monitoring::become_monitor,
        )
        .privileged()],
        canonical_path_only: true,
        emits: "",
    },
    Interface {
        name: STATS_IFACE,
        methods: &[
            Method::returns("GetStats", &[], &["a{sv}"], stats::get_stats),
            Method::returns(
                "GetConnectionStats",
                &["s"],
                &["a{sv}"],
                stats::get_connection_stats,
            ),
            Method::returns(
                "GetAllMatchRules",
                &[],
                &["a{sas}"],
                stats::get_all_match_rules,
            ),
        ],
        canonical_path_only: true,
        emits: "",
    },
    Interface {
        name: PEER_IFACE,
        methods: &[
            Method::returns("GetMachineId", &[], &["s"], peer::get_machine_id),
            Method::returns("Ping", &[], &[], peer::ping),
        ],
        canonical_path_only: false,
        emits: "",
    },
    Interface {
        name: messages::SUPERVISOR,
        methods: &[
            Method::returns("ListServices", &[], &["aa{sv}"], supervisor::list_services),
            Method::returns("GetService", &["s"], &["a{sv}"], supervisor::get_service),
            Method::returns("StopService", &["s"], &[], supervisor::stop_service).privileged(),
            Method::returns("GetOutput", &["s", "u"], &["as"], supervisor::get_output),
        ],
        canonical_path_only: true,
        emits: r#"    <signal name="ServiceStateChanged"><arg type="s" name="name"/><arg type="s" name="state"/></signal>
"#,
    },
];

/// The introspection data for a path, written from the table; `broker --introspect` prints it
/// for the driver's path.
pub fn introspect(path: &str) -> String {
    introspect::render(INTERFACES, path)
}

/// `org.freedesktop.DBus.Introspectable.Introspect`.
fn introspect_call(_bus: &mut Bus, _from: PeerId, msg: &Message) -> Outcome {
    let header = msg.header();
    let path = header.path().map_or("/", |p| p.as_str());
    messages::reply(msg, &(introspect(path),))
}

/// The driver's interface of this name.
fn interface(name: &str) -> Option<&'static Interface> {
    INTERFACES.iter().find(|i| i.name == name)
}

impl Bus {
    /// Handles a message addressed to `org.freedesktop.DBus`.
    pub fn driver_call(&mut self, from: PeerId, msg: &Message) {
        if msg.message_type() == Type::Signal {
            self.driver_signal_received(from, msg);
        }
        if msg.message_type() != Type::MethodCall {
            return;
        }
        let method = {
            let header = msg.header();
            let member = header.member().map_or("", |m| m.as_str());
            debug!(from, member, "driver call");
            let interface = header.interface().map(|i| i.as_str());
            let path = header.path().map_or("/", |p| p.as_str());
            find_method(interface, member, path).and_then(|m| self.check_privilege(from, m))
        };
        match method {
            Ok(method) => self.run_driver_method(method, from, msg),
            Err(e) => self.reply_error(from, msg, e),
        }
    }

    /// Runs a method's handler, and answers with what it returns unless it replied itself.
    fn run_driver_method(&mut self, method: &Method, from: PeerId, msg: &Message) {
        match method.handler {
            Handler::Returns(handler) => match handler(self, from, msg) {
                Ok(reply) if expects_reply(msg) => self.send_from_driver(from, &reply),
                Ok(_) => {}
                Err(e) => self.reply_error(from, msg, e),
            },
            Handler::RepliesItself(handler) => {
                if let Err(e) = handler(self, from, msg) {
                    self.reply_error(from, msg, e);
                }
            }
        }
    }

    /// A privileged method is for the bus's own user and root only, as in dbus-daemon.
    fn check_privilege(
        &self,
        from: PeerId,
        method: &'static Method,
    ) -> Result<&'static Method, BusError> {
        let uid = self.peers.get(&from).map_or(u32::MAX, |p| p.creds.uid);
        if method.privileged && uid != self.owner_uid && uid != 0 {
            return Err(fdo::Error::AccessDenied(format!(
                "The caller does not have sufficient privileges to call {}: uid {uid} \
                 is neither root nor the bus's uid {}",
                method.name, self.owner_uid
            ))
            .into());
        }
        Ok(method)
    }
}

/// The method a call names, if it may be called at `path`. A call without an interface is for
/// `org.freedesktop.DBus`.
fn find_method(
    interface: Option<&str>,
    member: &str,
    path: &str,
) -> Result<&'static Method, BusError> {
    let name = interface.unwrap_or(DRIVER);
    let Some(iface) = self::interface(name) else {
        return Err(unknown_interface(name));
    };
    let canonical = path == DRIVER_PATH;
    if iface.canonical_path_only && !canonical {
        return Err(fdo::Error::UnknownInterface(format!(
            "{DRIVER} does not understand interface {name} at path {path}"
        ))
        .into());
    }
    let method = iface
        .methods
        .iter()
        .find(|m| m.name == member)
        .ok_or_else(|| unknown_method(name, member))?;
    if method.canonical_path_only && !canonical {
        return Err(fdo::Error::AccessDenied(format!(
            "Method '{member}' is only available at the canonical object path '{DRIVER_PATH}'"
        ))
        .into());
    }
    Ok(method)
}

#[cfg(test)]
mod tests;
