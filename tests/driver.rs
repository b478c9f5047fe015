//! The driver's method table against the real `broker`: each method `Introspect` lists is
//! served, the introspection data is dbus-daemon-shaped and unchanged, and the path rules
//! of dbus-daemon (interfaces and methods only at the canonical path) hold.

mod common;

use common::{Broker, RawClient, error_name};
use zbus::Message;

const DRIVER: &str = "org.freedesktop.DBus";
const DRIVER_PATH: &str = "/org/freedesktop/DBus";

/// Calls `interface.member` (no interface: `None`) at `path` on the driver with `body`; returns
/// the error name and its text, or `None` for a method return.
fn call<B>(
    client: &mut RawClient,
    path: &str,
    interface: Option<&str>,
    member: &str,
    body: &B,
) -> Option<(String, String)>
where
    B: serde::Serialize + zbus::DynamicType,
{
    let serial = client.next_serial();
    let mut builder = Message::method_call(path, member)
        .destination(DRIVER)
        .serial(serial);
    if let Some(interface) = interface {
        builder = builder.interface(interface);
    }
    client.send(&builder.build(body).expect("build call"));
    match client.reply_to(serial) {
        Ok(_) => None,
        Err(e) => {
            let text = e.body().deserialize::<String>().unwrap_or_default();
            Some((error_name(&e), text))
        }
    }
}

/// (interface, method) for each method in the introspection data, in its order.
fn introspected_methods(xml: &str) -> Vec<(String, String)> {
    let attr = |line: &str, tag: &str| {
        let rest = line.trim_start().strip_prefix(tag)?;
        rest.split('"').nth(1).map(str::to_owned)
    };
    let mut interface = String::new();
    let mut methods = Vec::new();
    for line in xml.lines() {
        if let Some(name) = attr(line, "<interface name=") {
            interface = name;
        } else if let Some(name) = attr(line, "<method name=") {
            methods.push((interface.clone(), name));
        }
    }
    methods
}

#[test]
fn the_introspection_data_is_unchanged() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("--introspect")
        .output()
        .expect("run broker --introspect");
    assert!(out.status.success(), "broker --introspect failed");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        include_str!("data/driver_introspect.xml")
    );
}

#[test]
fn every_introspected_method_is_served() {
    let broker = Broker::start();
    let mut client = RawClient::connect(&broker.socket);
    let serial = client.next_serial();
    let introspect = Message::method_call(DRIVER_PATH, "Introspect")
        .interface("org.freedesktop.DBus.Introspectable")
        .destination(DRIVER)
        .serial(serial)
        .build(&())
        .expect("build Introspect");
    client.send(&introspect);
    let reply = client.reply_to(serial).expect("Introspect");
    let xml: String = reply.body().deserialize().expect("XML");
    let methods = introspected_methods(&xml);
    assert_eq!(methods.len(), 33, "{methods:?}");
    for (interface, method) in &methods {
        // The wrong arguments on purpose: no call changes anything, yet each reaches its method
        // (the caller is root, so the privileged ones too).
        let outcome = call(&mut client, DRIVER_PATH, Some(interface), method, &(7u8,));
        if let Some((name, text)) = outcome {
            assert!(
                !name.ends_with(".UnknownMethod") && !name.ends_with(".UnknownInterface"),
                "{interface}.{method}: {name}: {text}"
            );
        }
        let missing = format!("{method}Not");
        let (name, text) = call(&mut client, DRIVER_PATH, Some(interface), &missing, &())
            .expect("an unknown method fails");
        assert_eq!(name, "org.freedesktop.DBus.Error.UnknownMethod");
        assert_eq!(
            text,
            format!("{DRIVER} does not understand message {interface}.{missing}")
        );
    }
}

#[test]
fn some_interfaces_and_methods_exist_only_at_the_drivers_path() {
    let broker = Broker::start();
    let mut client = RawClient::connect(&broker.socket);
    for interface in [
        "org.freedesktop.DBus.Properties",
        "org.freedesktop.DBus.Monitoring",
        "org.freedesktop.DBus.Debug.Stats",
    ] {
        let (name, text) = call(&mut client, "/", Some(interface), "GetAll", &(DRIVER,))
            .expect("refused away from the driver's path");
        assert_eq!(name, "org.freedesktop.DBus.Error.UnknownInterface");
        assert_eq!(
            text,
            format!("{DRIVER} does not understand interface {interface} at path /")
        );
    }
    let env = std::collections::HashMap::from([("BROKER_TEST", "1")]);
    let (name, text) = call(
        &mut client,
        "/",
        None,
        "UpdateActivationEnvironment",
        &(&env,),
    )
    .expect("refused away from the driver's path");
    assert_eq!(name, "org.freedesktop.DBus.Error.AccessDenied");
    assert_eq!(
        text,
        "Method 'UpdateActivationEnvironment' is only available at the canonical object path \
         '/org/freedesktop/DBus'"
    );
    let at_driver = call(
        &mut client,
        DRIVER_PATH,
        None,
        "UpdateActivationEnvironment",
        &(&env,),
    );
    assert_eq!(at_driver, None);
    // The other interfaces answer anywhere; a call without an interface is for the driver's.
    let anywhere = call(
        &mut client,
        "/org/example",
        Some("org.freedesktop.DBus.Peer"),
        "Ping",
        &(),
    );
    assert_eq!(anywhere, None);
    assert_eq!(call(&mut client, "/", None, "GetId", &()), None);
    let (name, text) = call(&mut client, "/", None, "Ping", &()).expect("Ping is the Peer's");
    assert_eq!(name, "org.freedesktop.DBus.Error.UnknownMethod");
    assert_eq!(
        text,
        "org.freedesktop.DBus does not understand message org.freedesktop.DBus.Ping"
    );
    let (name, text) = call(&mut client, "/", Some("org.example.Nothing"), "Ping", &())
        .expect("an unknown interface fails");
    assert_eq!(name, "org.freedesktop.DBus.Error.UnknownInterface");
    assert_eq!(
        text,
        "org.freedesktop.DBus does not understand interface org.example.Nothing"
    );
}
