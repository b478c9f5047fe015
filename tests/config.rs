//! broker's dbus-daemon-compatible configuration (`--config-file`), against the real binary: the
//! `<policy>` rules and their order, the `<limit>`s, refusing a malformed file at startup,
//! `ReloadConfig` and SIGHUP, and `--systemd-activation`. Each test starts its own broker. (The
//! timeout limits, `reply_timeout` and `service_start_timeout`, are tested in virtual time, in
//! `tests/in_process.rs`.)

mod common;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use common::{
    ALLOW_ALL, Broker, RawClient, bus_config as config, error_name, member_of, wait_within,
};
use zbus::Message;
use zbus::message::Type;

const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
const LIMITS_EXCEEDED: &str = "org.freedesktop.DBus.Error.LimitsExceeded";

/// A configuration whose default policy allows everything, then applies `rules`.
fn allow_all_then(rules: &str) -> String {
    config(&format!(
        "  <policy context=\"default\">{ALLOW_ALL}\n    {rules}\n  </policy>"
    ))
}

/// A client that owns `name` (as primary owner).
fn owner_of(broker: &Broker, name: &str) -> RawClient {
    let mut client = RawClient::connect(&broker.socket);
    let reply = client
        .driver_call("RequestName", &(name, 0u32))
        .unwrap_or_else(|e| panic!("RequestName {name}: {}", error_name(&e)));
    assert_eq!(reply.body().deserialize::<u32>().unwrap(), 1, "owns {name}");
    client
}

/// Sends a method call `interface.member` on `path` to `dest`; returns its serial.
fn send_call(
    client: &mut RawClient,
    dest: &str,
    path: &str,
    interface: &str,
    member: &str,
) -> NonZeroU32 {
    let serial = client.next_serial();
    let call = Message::method_call(path, member)
        .interface(interface)
        .destination(dest)
        .serial(serial)
        .build(&())
        .unwrap();
    client.send(&call);
    serial
}

/// Sends `org.example.Test.member` on `/org/example` to `dest`; returns its serial.
fn call(client: &mut RawClient, dest: &str, member: &str) -> NonZeroU32 {
    send_call(client, dest, "/org/example", "org.example.Test", member)
}

/// Sends a signal `interface.member`, to `dest` or broadcast; returns its serial.
fn send_signal(
    client: &mut RawClient,
    dest: Option<&str>,
    interface: &str,
    member: &str,
) -> NonZeroU32 {
    let serial = client.next_serial();
    let mut builder = Message::signal("/org/example", interface, member).serial(serial);
    if let Some(dest) = dest {
        builder = builder.destination(dest);
    }
    client.send(&builder.build(&()).unwrap());
    serial
}

/// The caller's call `serial` was refused with `AccessDenied`.
fn assert_denied(caller: &mut RawClient, serial: NonZeroU32, what: &str) {
    match caller.reply_to(serial) {
        Err(err) => assert_eq!(error_name(&err), ACCESS_DENIED, "{what}"),
        Ok(_) => panic!("{what}: expected AccessDenied, got a method return"),
    }
}

/// The next method call `receiver` gets, which must be `serial` from `caller`: anything refused
/// before it, from the same sender, would have come first.
fn assert_next_call_is(receiver: &mut RawClient, caller: &RawClient, serial: NonZeroU32) {
    let got = receiver.recv_until(|m| m.message_type() == Type::MethodCall);
    assert_eq!(
        got.header().sender().map(|s| s.to_string()),
        Some(caller.unique.clone()),
        "the call comes from the caller (member {})",
        member_of(&got)
    );
    assert_eq!(
        got.primary_header().serial_num(),
        serial,
        "the first call to arrive is the allowed one, not {}",
        member_of(&got)
    );
}

/// Answers `call` with an empty method return.
fn answer(callee: &mut RawClient, call: &Message) {
    let serial = callee.next_serial();
    let reply = Message::method_return(&call.header())
        .serial(serial)
        .build(&())
        .unwrap();
    callee.send(&reply);
}

/// The text of an error reply.
fn error_text(msg: &Message) -> String {
    msg.body().deserialize::<String>().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Send rules

#[test]
fn deny_send_destination_refuses_calls_to_the_owner_by_any_of_its_names() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny send_destination="org.example.Locked"/>"#,
    ));
    let mut locked = owner_of(&broker, "org.example.Locked");
    locked
        .driver_call("RequestName", &("org.example.AlsoLocked", 0u32))
        .unwrap();
    let mut open = owner_of(&broker, "org.example.Open");
    let mut caller = RawClient::connect(&broker.socket);

    let by_name = call(&mut caller, "org.example.Locked", "Do");
    assert_denied(&mut caller, by_name, "call to the denied name");
    // dbus-daemon: the rule is about the owner, so its other names are closed too.
    let by_other_name = call(&mut caller, "org.example.AlsoLocked", "Do");
    assert_denied(
        &mut caller,
        by_other_name,
        "call to another name of the owner",
    );
    let unique = locked.unique.clone();
    let by_unique = call(&mut caller, &unique, "Do");
    assert_denied(&mut caller, by_unique, "call to the owner's unique name");
    // A connection only queued for the name is an owner of it too.
    let mut queued = owner_of(&broker, "org.example.Queued");
    let reply = queued
        .driver_call("RequestName", &("org.example.Locked", 0u32))
        .unwrap();
    assert_eq!(
        reply.body().deserialize::<u32>().unwrap(),
        2,
        "in the queue"
    );
    let by_queued = call(&mut caller, "org.example.Queued", "Do");
    assert_denied(&mut caller, by_queued, "call to a queued owner");

    let allowed = call(&mut caller, "org.example.Open", "Do");
    assert_next_call_is(&mut open, &caller, allowed);
}

#[test]
fn a_send_rule_about_the_bus_driver_refuses_that_driver_method_but_never_hello() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="ListNames"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="Hello"/>"#,
    ));
    // Hello is let through before any policy applies, as in dbus-daemon.
    let mut client = RawClient::connect(&broker.socket);
    let err = client.driver_call("ListNames", &()).unwrap_err();
    assert_eq!(error_name(&err), ACCESS_DENIED);
    client.driver_call("GetId", &()).unwrap();
}

/// A call to `org.example.Target` as (path, interface, member).
type Call<'a> = (&'a str, &'a str, &'a str);

/// With `rules` after a default policy allowing everything: `denied` is refused with
/// `AccessDenied`, and `allowed` reaches the target as the first call it gets.
fn refuses_one_call_and_passes_another(rules: &str, denied: Call<'_>, allowed: Call<'_>) {
    let broker = Broker::start_with_config(&allow_all_then(rules));
    let mut target = owner_of(&broker, "org.example.Target");
    let mut caller = RawClient::connect(&broker.socket);
    let send = |caller: &mut RawClient, (path, interface, member): Call<'_>| {
        send_call(caller, "org.example.Target", path, interface, member)
    };
    let refused = send(&mut caller, denied);
    assert_denied(&mut caller, refused, &format!("{denied:?} with {rules}"));
    let passed = send(&mut caller, allowed);
    assert_next_call_is(&mut target, &caller, passed);
}

#[test]
fn deny_send_interface_refuses_that_interface_only() {
    refuses_one_call_and_passes_another(
        r#"<deny send_destination="org.example.Target" send_interface="org.example.Forbidden"/>"#,
        ("/org/example", "org.example.Forbidden", "Do"),
        ("/org/example", "org.example.Allowed", "Do"),
    );
}

#[test]
fn deny_send_member_refuses_that_method_of_the_interface_only() {
    refuses_one_call_and_passes_another(
        r#"<deny send_interface="org.example.Test" send_member="Shutdown"/>"#,
        ("/org/example", "org.example.Test", "Shutdown"),
        ("/org/example", "org.example.Test", "Status"),
    );
}

#[test]
fn deny_send_path_refuses_calls_on_that_object_only() {
    refuses_one_call_and_passes_another(
        r#"<deny send_destination="org.example.Target" send_path="/org/example/secret"/>"#,
        ("/org/example/secret", "org.example.Test", "Read"),
        ("/org/example/public", "org.example.Test", "Read"),
    );
}

#[test]
fn deny_send_type_signal_refuses_unicast_signals_but_not_method_calls() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny send_destination="org.example.Target" send_type="signal"/>"#,
    ));
    let mut target = owner_of(&broker, "org.example.Target");
    let mut caller = RawClient::connect(&broker.socket);

    let signal = send_signal(
        &mut caller,
        Some("org.example.Target"),
        "org.example.Test",
        "Ping",
    );
    // Like dbus-daemon, the bus answers even a refused signal.
    assert_denied(&mut caller, signal, "unicast signal of a denied type");
    let allowed = call(&mut caller, "org.example.Target", "Ping");
    let got = target.recv_until(|m| member_of(m) == "Ping");
    assert_eq!(
        got.message_type(),
        Type::MethodCall,
        "the signal never came"
    );
    assert_eq!(got.primary_header().serial_num(), allowed);
}

#[test]
fn deny_send_error_refuses_that_error_reply_only() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny send_type="error" send_error="org.example.Error.Secret" send_requested_reply="true"/>"#,
    ));
    let mut callee = owner_of(&broker, "org.example.Target");
    let mut caller = RawClient::connect(&broker.socket);

    let first = call(&mut caller, "org.example.Target", "Fail");
    let call_msg = callee.recv_until(|m| member_of(m) == "Fail");
    let serial = callee.next_serial();
    let secret = Message::error(&call_msg.header(), "org.example.Error.Secret")
        .serial(serial)
        .build(&("secret",))
        .unwrap();
    callee.send(&secret);
    assert_denied(&mut callee, serial, "the denied error reply");

    let second = call(&mut caller, "org.example.Target", "Fail");
    let call_msg = callee.recv_until(|m| member_of(m) == "Fail");
    let serial = callee.next_serial();
    let public = Message::error(&call_msg.header(), "org.example.Error.Public")
        .serial(serial)
        .build(&("public",))
        .unwrap();
    callee.send(&public);

    let reply = caller.recv_until(|m| {
        let to = m.header().reply_serial();
        to == Some(first) || to == Some(second)
    });
    assert_eq!(
        reply.header().reply_serial(),
        Some(second),
        "the denied error never reached the caller"
    );
    assert_eq!(error_name(&reply), "org.example.Error.Public");
}

#[test]
fn deny_send_broadcast_refuses_broadcast_signals_but_not_unicast_ones() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny send_broadcast="true" send_interface="org.example.Shout"/>"#,
    ));
    let mut listener = RawClient::connect(&broker.socket);
    listener
        .driver_call(
            "AddMatch",
            &("type='signal',interface='org.example.Shout'",),
        )
        .unwrap();
    let mut sender = RawClient::connect(&broker.socket);

    let broadcast = send_signal(&mut sender, None, "org.example.Shout", "Hello");
    assert_denied(&mut sender, broadcast, "broadcast signal");
    let unique = listener.unique.clone();
    let unicast = send_signal(&mut sender, Some(&unique), "org.example.Shout", "Hello");
    let got = listener.recv_until(|m| member_of(m) == "Hello");
    assert_eq!(
        got.primary_header().serial_num(),
        unicast,
        "only the unicast signal arrives"
    );
}

#[test]
fn send_destination_prefix_covers_the_name_and_the_names_below_it_only() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny send_destination_prefix="org.example.Private"/>"#,
    ));
    let _exact = owner_of(&broker, "org.example.Private");
    let _below = owner_of(&broker, "org.example.Private.Sub");
    let mut sibling = owner_of(&broker, "org.example.PrivateNot");
    let mut caller = RawClient::connect(&broker.socket);

    for name in ["org.example.Private", "org.example.Private.Sub"] {
        let denied = call(&mut caller, name, "Do");
        assert_denied(&mut caller, denied, name);
    }
    let allowed = call(&mut caller, "org.example.PrivateNot", "Do");
    assert_next_call_is(&mut sibling, &caller, allowed);
}

#[test]
fn the_last_matching_rule_wins() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny send_destination="org.example.First"/>
    <allow send_destination="org.example.First" send_interface="org.example.Open"/>
    <allow send_destination="org.example.Second" send_interface="org.example.Open"/>
    <deny send_destination="org.example.Second"/>"#,
    ));
    let mut first = owner_of(&broker, "org.example.First");
    let _second = owner_of(&broker, "org.example.Second");
    let mut caller = RawClient::connect(&broker.socket);
    let open = |caller: &mut RawClient, dest: &str| {
        send_call(caller, dest, "/org/example", "org.example.Open", "Do")
    };

    // First: the later allow reopens one interface.
    let closed = call(&mut caller, "org.example.First", "Do");
    assert_denied(&mut caller, closed, "First, other interface");
    let reopened = open(&mut caller, "org.example.First");
    assert_next_call_is(&mut first, &caller, reopened);
    // Second: the later deny closes everything, the earlier allow included.
    let closed_again = open(&mut caller, "org.example.Second");
    assert_denied(&mut caller, closed_again, "Second, allowed interface");
}

#[test]
fn a_mandatory_deny_beats_a_default_allow_whatever_the_file_order() {
    let broker = Broker::start_with_config(&config(&format!(
        r#"  <policy context="mandatory">
    <deny send_destination="org.example.Target" send_interface="org.example.Test" send_member="Reboot"/>
    <deny own="org.example.Reserved"/>
  </policy>
  <policy context="default">{ALLOW_ALL}
    <allow send_destination="org.example.Target" send_interface="org.example.Test" send_member="Reboot"/>
    <allow own="org.example.Reserved"/>
  </policy>"#
    )));
    let mut target = owner_of(&broker, "org.example.Target");
    let mut caller = RawClient::connect(&broker.socket);

    let denied = call(&mut caller, "org.example.Target", "Reboot");
    assert_denied(&mut caller, denied, "mandatory deny of a call");
    let err = caller
        .driver_call("RequestName", &("org.example.Reserved", 0u32))
        .unwrap_err();
    assert_eq!(error_name(&err), ACCESS_DENIED, "mandatory deny of a name");
    let allowed = call(&mut caller, "org.example.Target", "Status");
    assert_next_call_is(&mut target, &caller, allowed);
}

// ---------------------------------------------------------------------------------------------
// Own rules, and per-user and per-group policies (the tests run as root, uid and gid 0)

#[test]
fn deny_own_and_own_prefix_refuse_request_name_with_access_denied() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny own="org.example.NotYours"/>
    <deny own_prefix="org.example.Reserved"/>"#,
    ));
    let mut client = RawClient::connect(&broker.socket);
    for name in [
        "org.example.NotYours",
        "org.example.Reserved",
        "org.example.Reserved.Deep.Name",
    ] {
        let err = client
            .driver_call("RequestName", &(name, 0u32))
            .unwrap_err();
        assert_eq!(error_name(&err), ACCESS_DENIED, "RequestName {name}");
        assert!(
            error_text(&err).contains(name),
            "the error names {name}: {}",
            error_text(&err)
        );
    }
    for name in ["org.example.NotYours.Child", "org.example.ReservedNot"] {
        let reply = client
            .driver_call("RequestName", &(name, 0u32))
            .unwrap_or_else(|e| panic!("RequestName {name}: {}", error_name(&e)));
        assert_eq!(reply.body().deserialize::<u32>().unwrap(), 1, "{name}");
    }
}

/// Requests `name`; whether the bus let the client own it.
fn may_own(client: &mut RawClient, name: &str) -> bool {
    match client.driver_call("RequestName", &(name, 0u32)) {
        Ok(_) => true,
        Err(err) => {
            assert_eq!(error_name(&err), ACCESS_DENIED, "RequestName {name}");
            false
        }
    }
}

#[test]
fn a_user_policy_overrides_the_default_one_for_that_user_but_not_the_mandatory_one() {
    let broker = Broker::start_with_config(&config(&format!(
        r#"  <policy user="root">
    <allow own="org.example.RootOnly"/>
    <allow own="org.example.Never"/>
    <allow send_destination="org.example.Target" send_interface="org.example.Admin"/>
  </policy>
  <policy user="65534">
    <allow own="org.example.NobodyOnly"/>
  </policy>
  <policy context="default">{ALLOW_ALL}
    <deny own="org.example.RootOnly"/>
    <deny own="org.example.NobodyOnly"/>
    <deny send_destination="org.example.Target" send_interface="org.example.Admin"/>
  </policy>
  <policy context="mandatory">
    <deny own="org.example.Never"/>
  </policy>"#
    )));
    let mut target = owner_of(&broker, "org.example.Target");
    let mut client = RawClient::connect(&broker.socket);
    assert!(
        may_own(&mut client, "org.example.RootOnly"),
        "root's policy"
    );
    assert!(
        !may_own(&mut client, "org.example.NobodyOnly"),
        "another user's policy does not apply"
    );
    assert!(
        !may_own(&mut client, "org.example.Never"),
        "mandatory comes after the user's policy"
    );
    let allowed = send_call(
        &mut client,
        "org.example.Target",
        "/org/example",
        "org.example.Admin",
        "Do",
    );
    assert_next_call_is(&mut target, &client, allowed);
}

#[test]
fn a_group_policy_overrides_the_default_one_for_members_of_the_group_only() {
    let broker = Broker::start_with_config(&config(&format!(
        r#"  <policy group="root">
    <allow own="org.example.Wheel"/>
  </policy>
  <policy group="65534">
    <allow own="org.example.NoGroup"/>
  </policy>
  <policy context="default">{ALLOW_ALL}
    <deny own="org.example.Wheel"/>
    <deny own="org.example.NoGroup"/>
  </policy>"#
    )));
    let mut client = RawClient::connect(&broker.socket);
    assert!(may_own(&mut client, "org.example.Wheel"), "root's group");
    assert!(
        !may_own(&mut client, "org.example.NoGroup"),
        "a group the client is not in"
    );
}

#[test]
fn a_policy_for_an_unknown_user_is_dropped_and_the_bus_still_starts() {
    let broker = Broker::start_with_config(&config(&format!(
        r#"  <policy user="no-such-user-of-broker">
    <allow own="org.example.Theirs"/>
  </policy>
  <policy context="default">{ALLOW_ALL}
    <deny own="org.example.Theirs"/>
  </policy>"#
    )));
    let mut client = RawClient::connect(&broker.socket);
    assert!(!may_own(&mut client, "org.example.Theirs"));
    assert!(
        broker.log().contains("no-such-user-of-broker"),
        "the unknown user is reported"
    );
}

#[test]
fn a_user_policy_comes_after_the_group_policy() {
    let broker = Broker::start_with_config(&config(&format!(
        r#"  <policy user="root">
    <deny own="org.example.Contested"/>
  </policy>
  <policy group="root">
    <allow own="org.example.Contested"/>
  </policy>
  <policy context="default">{ALLOW_ALL}
  </policy>"#
    )));
    let mut client = RawClient::connect(&broker.socket);
    assert!(!may_own(&mut client, "org.example.Contested"));
}

// ---------------------------------------------------------------------------------------------
// Receive rules

#[test]
fn deny_receive_interface_keeps_the_call_from_the_receiver_and_tells_the_caller() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny receive_interface="org.example.Secret"/>"#,
    ));
    let mut target = owner_of(&broker, "org.example.Target");
    let mut caller = RawClient::connect(&broker.socket);

    let denied = send_call(
        &mut caller,
        "org.example.Target",
        "/org/example",
        "org.example.Secret",
        "Tell",
    );
    let err = caller.reply_to(denied).unwrap_err();
    assert_eq!(error_name(&err), ACCESS_DENIED);
    assert!(
        error_text(&err).contains("receive"),
        "a receive refusal: {}",
        error_text(&err)
    );
    let allowed = call(&mut caller, "org.example.Target", "Tell");
    assert_next_call_is(&mut target, &caller, allowed);
}

#[test]
fn deny_receive_member_keeps_that_method_from_the_receiver() {
    refuses_one_call_and_passes_another(
        r#"<deny receive_interface="org.example.Test" receive_member="Hidden"/>"#,
        ("/org/example", "org.example.Test", "Hidden"),
        ("/org/example", "org.example.Test", "Shown"),
    );
}

#[test]
fn deny_receive_sender_keeps_what_the_owner_of_that_name_sends_away() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny receive_sender="org.example.Noisy"/>"#,
    ));
    let mut target = owner_of(&broker, "org.example.Target");
    add_match(&mut target, "type='signal',interface='org.example.Test'").unwrap();
    let mut noisy = owner_of(&broker, "org.example.Noisy");
    let mut quiet = RawClient::connect(&broker.socket);

    let denied = call(&mut noisy, "org.example.Target", "Talk");
    assert_denied(&mut noisy, denied, "call from the denied sender");
    let noisy_signal = send_signal(&mut noisy, None, "org.example.Test", "Chatter");
    // The bus has handled the signal once a later call of the same sender is answered.
    noisy.driver_call("GetId", &()).unwrap();
    let allowed = call(&mut quiet, "org.example.Target", "Talk");
    assert_next_call_is(&mut target, &quiet, allowed);

    let quiet_unique = quiet.unique.clone();
    let signal = send_signal(&mut quiet, None, "org.example.Test", "Chatter");
    let got = target.recv_until(|m| member_of(m) == "Chatter");
    assert_eq!(
        got.header().sender().map(|s| s.to_string()),
        Some(quiet_unique),
        "the signal of the denied sender (serial {noisy_signal}) never arrived"
    );
    assert_eq!(got.primary_header().serial_num(), signal);
}

#[test]
fn deny_receive_type_signal_drops_signals_but_passes_calls() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny receive_type="signal" receive_interface="org.example.Chatter"/>"#,
    ));
    let mut listener = owner_of(&broker, "org.example.Listener");
    listener
        .driver_call(
            "AddMatch",
            &("type='signal',interface='org.example.Chatter'",),
        )
        .unwrap();
    let mut sender = RawClient::connect(&broker.socket);

    send_signal(&mut sender, None, "org.example.Chatter", "Tick");
    send_signal(
        &mut sender,
        Some("org.example.Listener"),
        "org.example.Chatter",
        "Tick",
    );
    let allowed = send_call(
        &mut sender,
        "org.example.Listener",
        "/org/example",
        "org.example.Chatter",
        "Tick",
    );
    let got = listener.recv_until(|m| member_of(m) == "Tick");
    assert_eq!(got.message_type(), Type::MethodCall, "no signal arrived");
    assert_eq!(got.primary_header().serial_num(), allowed);
}

#[test]
fn deny_eavesdrop_hides_only_the_eavesdropped_copies() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny eavesdrop="true" receive_interface="org.example.Private"/>"#,
    ));
    let mut target = owner_of(&broker, "org.example.Target");
    let mut spy = RawClient::connect(&broker.socket);
    spy.driver_call("AddMatch", &("eavesdrop='true',type='method_call'",))
        .unwrap();
    let mut caller = RawClient::connect(&broker.socket);

    let private = send_call(
        &mut caller,
        "org.example.Target",
        "/org/example",
        "org.example.Private",
        "Secret",
    );
    let public = send_call(
        &mut caller,
        "org.example.Target",
        "/org/example",
        "org.example.Public",
        "Greet",
    );
    // The addressed receiver gets both.
    assert_next_call_is(&mut target, &caller, private);
    assert_next_call_is(&mut target, &caller, public);
    // The eavesdropper sees the public one only.
    let seen = spy.recv_until(|m| matches!(member_of(m).as_str(), "Secret" | "Greet"));
    assert_eq!(member_of(&seen), "Greet", "the private call was hidden");
    assert_eq!(seen.primary_header().serial_num(), public);
}

// ---------------------------------------------------------------------------------------------
// Limits

/// A configuration that allows everything, with `<limit name="name">value</limit>`.
fn with_limit(name: &str, value: u32) -> String {
    config(&format!(
        "  <policy context=\"default\">{ALLOW_ALL}\n  </policy>\n  \
         <limit name=\"{name}\">{value}</limit>"
    ))
}

#[test]
fn max_names_per_connection_counts_the_unique_name_and_answers_limits_exceeded() {
    let broker = Broker::start_with_config(&with_limit("max_names_per_connection", 3));
    let mut client = RawClient::connect(&broker.socket);
    for name in ["org.example.One", "org.example.Two"] {
        client.driver_call("RequestName", &(name, 0u32)).unwrap();
    }
    let err = client
        .driver_call("RequestName", &("org.example.Three", 0u32))
        .unwrap_err();
    assert_eq!(error_name(&err), LIMITS_EXCEEDED);

    // Releasing one makes room again.
    client
        .driver_call("ReleaseName", &("org.example.One",))
        .unwrap();
    client
        .driver_call("RequestName", &("org.example.Three", 0u32))
        .unwrap();
}

#[test]
fn max_match_rules_per_connection_answers_limits_exceeded() {
    let broker = Broker::start_with_config(&with_limit("max_match_rules_per_connection", 2));
    let mut client = RawClient::connect(&broker.socket);
    add_match(&mut client, "type='signal',member='A'").unwrap();
    add_match(&mut client, "type='signal',member='B'").unwrap();
    let err = add_match(&mut client, "type='signal',member='C'").unwrap_err();
    assert_eq!(error_name(&err), LIMITS_EXCEEDED);

    client
        .driver_call("RemoveMatch", &("type='signal',member='A'",))
        .unwrap();
    add_match(&mut client, "type='signal',member='C'").unwrap();
    // Another connection has its own count.
    let mut other = RawClient::connect(&broker.socket);
    add_match(&mut other, "type='signal',member='A'").unwrap();
}

#[test]
fn max_replies_per_connection_refuses_a_call_beyond_the_pending_ones() {
    let broker = Broker::start_with_config(&with_limit("max_replies_per_connection", 2));
    let mut callee = owner_of(&broker, "org.example.Slow");
    let mut caller = RawClient::connect(&broker.socket);

    let first = call(&mut caller, "org.example.Slow", "One");
    call(&mut caller, "org.example.Slow", "Two");
    let third = call(&mut caller, "org.example.Slow", "Three");
    let err = caller.reply_to(third).unwrap_err();
    assert_eq!(error_name(&err), LIMITS_EXCEEDED);

    // Once one is answered, a new call goes through.
    let one = callee.recv_until(|m| member_of(m) == "One");
    answer(&mut callee, &one);
    caller.reply_to(first).unwrap();
    let four = call(&mut caller, "org.example.Slow", "Four");
    let got = callee.recv_until(|m| matches!(member_of(m).as_str(), "Three" | "Four"));
    assert_eq!(member_of(&got), "Four", "the refused call never arrived");
    answer(&mut callee, &got);
    caller.reply_to(four).unwrap();
}

/// Adds the match rule `rule` for `client`.
fn add_match(client: &mut RawClient, rule: &str) -> Result<Message, Message> {
    client.driver_call("AddMatch", &(rule,))
}

/// Sends `Hello` on an authenticated client; the reply or the error.
fn hello(client: &mut RawClient) -> Result<Message, Message> {
    client.driver_call("Hello", &())
}

/// With `limit` set to 2: a third connection's `Hello` is refused with `LimitsExceeded` and the
/// connection stays open (dbus-daemon leaves it "hanging there", and supports a retry); once
/// one of the first two has gone, its retried `Hello` succeeds.
fn a_third_connection_waits_for_a_free_slot(limit: &str) {
    let broker = Broker::start_with_config(&with_limit(limit, 2));
    let mut watcher = RawClient::connect(&broker.socket);
    add_match(&mut watcher, "type='signal',member='NameOwnerChanged'").unwrap();
    let second = RawClient::connect(&broker.socket);
    let mut third = RawClient::connect_unregistered(&broker.socket);
    let err = hello(&mut third).unwrap_err();
    assert_eq!(error_name(&err), LIMITS_EXCEEDED, "{limit}");

    let gone = second.unique.clone();
    drop(second);
    watcher.recv_until(|m| {
        member_of(m) == "NameOwnerChanged"
            && m.body()
                .deserialize::<(String, String, String)>()
                .is_ok_and(|(name, _, new)| name == gone && new.is_empty())
    });
    let reply = hello(&mut third).unwrap_or_else(|e| panic!("retried Hello: {}", error_name(&e)));
    assert!(
        reply
            .body()
            .deserialize::<String>()
            .unwrap()
            .starts_with(':'),
        "a unique name"
    );
}

#[test]
fn max_connections_per_user_refuses_hello_until_a_connection_of_the_user_leaves() {
    a_third_connection_waits_for_a_free_slot("max_connections_per_user");
}

#[test]
fn max_completed_connections_refuses_hello_until_a_connection_leaves() {
    a_third_connection_waits_for_a_free_slot("max_completed_connections");
}

/// A call of `Take` to `org.example.Target`, to be given its arguments.
fn take_call(serial: NonZeroU32) -> zbus::message::Builder<'static> {
    Message::method_call("/org/example", "Take")
        .interface("org.example.Test")
        .destination("org.example.Target")
        .serial(serial)
}

#[test]
fn a_message_over_max_message_size_disconnects_its_sender() {
    let broker = Broker::start_with_config(&with_limit("max_message_size", 4096));
    let mut target = owner_of(&broker, "org.example.Target");
    let mut sender = RawClient::connect(&broker.socket);

    let fits = vec![0u8; 2048];
    let serial = sender.next_serial();
    let small = take_call(serial).build(&(fits,)).unwrap();
    sender.send(&small);
    assert_next_call_is(&mut target, &sender, serial);

    let too_big = vec![0u8; 8192];
    let serial = sender.next_serial();
    let big = take_call(serial).build(&(too_big,)).unwrap();
    sender.send(&big);
    assert!(sender.closed_by_broker(), "the sender was disconnected");
    // The bus itself goes on.
    let mut other = RawClient::connect(&broker.socket);
    other.driver_call("GetId", &()).unwrap();
}

#[test]
fn a_message_with_more_fds_than_max_message_unix_fds_disconnects_its_sender() {
    let broker = Broker::start_with_config(&with_limit("max_message_unix_fds", 1));
    let mut target = owner_of(&broker, "org.example.Target");
    let mut sender = RawClient::connect(&broker.socket);
    let (a, b) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());

    let serial = sender.next_serial();
    let one = take_call(serial).build(&(zbus::Fd::from(&a),)).unwrap();
    sender.send_with_fds(one.data().bytes(), &[a.as_raw_fd()]);
    assert_next_call_is(&mut target, &sender, serial);

    let serial = sender.next_serial();
    let two = take_call(serial)
        .build(&(zbus::Fd::from(&a), zbus::Fd::from(&b)))
        .unwrap();
    sender.send_with_fds(two.data().bytes(), &[a.as_raw_fd(), b.as_raw_fd()]);
    assert!(sender.closed_by_broker(), "the sender was disconnected");
}

/// A `.service` file for `name`, started by `exec`, with `extra` lines.
fn service_file(name: &str, exec: &str, extra: &str) -> String {
    format!("[D-BUS Service]\nName={name}\nExec={exec}\n{extra}")
}

/// A configuration that allows everything, reads `services/`, and has `limits`.
fn with_services(limits: &str) -> String {
    config(&format!(
        "  <policy context=\"default\">{ALLOW_ALL}\n  </policy>\n  \
         <servicedir>services</servicedir>\n  {limits}"
    ))
}

#[test]
fn max_pending_service_starts_refuses_a_start_beyond_the_limit() {
    let first = service_file("org.example.First", "/bin/sleep 30", "");
    let second = service_file("org.example.Second", "/bin/sleep 30", "");
    let broker = Broker::start_with_config_files(
        &with_services(r#"<limit name="max_pending_service_starts">1</limit>"#),
        &[
            ("services/org.example.First.service", &first),
            ("services/org.example.Second.service", &second),
        ],
        &[],
    );
    let mut caller = RawClient::connect(&broker.socket);
    let waiting = call(&mut caller, "org.example.First", "Do");
    let refused = call(&mut caller, "org.example.Second", "Do");
    let reply = caller.recv_until(|m| {
        let to = m.header().reply_serial();
        to == Some(waiting) || to == Some(refused)
    });
    assert_eq!(
        reply.header().reply_serial(),
        Some(refused),
        "the second start is refused while the first waits"
    );
    assert_eq!(error_name(&reply), LIMITS_EXCEEDED);
    assert!(
        error_text(&reply).contains("pending activations"),
        "{}",
        error_text(&reply)
    );
}

/// Sends a method return for a call `to` never made; returns its serial.
fn send_unrequested_return(client: &mut RawClient, to: &str) -> NonZeroU32 {
    let call = Message::method_call("/", "Never")
        .serial(NonZeroU32::new(4242).unwrap())
        .sender(to)
        .build(&())
        .unwrap();
    let serial = client.next_serial();
    let reply = Message::method_return(&call.header())
        .serial(serial)
        .build(&())
        .unwrap();
    client.send(&reply);
    serial
}

/// Rules that allow sending and receiving requested replies only, and owning any name.
const REQUESTED_REPLIES_ONLY: &str = r#"
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>"#;

#[test]
fn an_allow_with_requested_reply_false_lets_an_unexpected_reply_through() {
    let broker = Broker::start_with_config(&config(&format!(
        r#"  <policy context="default">{REQUESTED_REPLIES_ONLY}
    <allow send_type="method_return" send_requested_reply="false"/>
    <allow receive_type="method_return" receive_requested_reply="false"/>
  </policy>"#
    )));
    let mut receiver = RawClient::connect(&broker.socket);
    let mut sender = RawClient::connect(&broker.socket);
    let to = receiver.unique.clone();
    let unexpected = send_unrequested_return(&mut sender, &to);
    let marker = send_signal(&mut sender, Some(&to), "org.example.Test", "Marker");
    let got = receiver.recv_until(|m| {
        let serial = m.primary_header().serial_num();
        m.header().sender().map(|s| s.to_string()) == Some(sender.unique.clone())
            && (serial == unexpected || serial == marker)
    });
    assert_eq!(
        got.message_type(),
        Type::MethodReturn,
        "the reply the policy allows arrives before the marker signal"
    );
}

#[test]
fn an_unexpected_reply_the_policy_does_not_allow_is_answered_with_access_denied() {
    let broker = Broker::start_with_config(&config(&format!(
        "  <policy context=\"default\">{REQUESTED_REPLIES_ONLY}\n  </policy>"
    )));
    let receiver = RawClient::connect(&broker.socket);
    let mut sender = RawClient::connect(&broker.socket);
    let unexpected = send_unrequested_return(&mut sender, &receiver.unique);
    let serial = sender.next_serial();
    let later = Message::method_call("/org/freedesktop/DBus", "GetId")
        .interface("org.freedesktop.DBus")
        .destination("org.freedesktop.DBus")
        .serial(serial)
        .build(&())
        .unwrap();
    sender.send(&later);
    let answer = sender.recv_until(|m| {
        let to = m.header().reply_serial();
        to == Some(unexpected) || to == Some(serial)
    });
    assert_eq!(
        answer.header().reply_serial(),
        Some(unexpected),
        "the refused reply is answered, before the later call"
    );
    assert_eq!(error_name(&answer), ACCESS_DENIED);
    let text = error_text(&answer);
    assert!(text.contains("requested_reply=\"0\""), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Included files and service directories

#[test]
fn a_policy_from_an_includedir_applies_and_a_broken_file_there_is_skipped() {
    let good = r#"<busconfig>
  <policy context="default">
    <deny own="org.example.FromIncludedir"/>
  </policy>
</busconfig>
"#;
    let broken = "<busconfig>\n  <policy context=\"default\">\n    <deny own=\"org.example.FromBroken\"/>\n  <frobnicate/>\n</busconfig>\n";
    let text = config(&format!(
        "  <policy context=\"default\">{ALLOW_ALL}\n  </policy>\n  <includedir>bus.d</includedir>"
    ));
    let broker = Broker::start_with_config_files(
        &text,
        &[
            ("bus.d/a-good.conf", good),
            ("bus.d/b-broken.conf", broken),
            ("bus.d/ignored.txt", broken),
        ],
        &[],
    );
    let mut client = RawClient::connect(&broker.socket);
    assert!(!may_own(&mut client, "org.example.FromIncludedir"));
    assert!(
        may_own(&mut client, "org.example.FromBroken"),
        "nothing of the broken file applies"
    );
    assert!(
        broker.log().contains("b-broken.conf"),
        "the broken file is named in the log"
    );
}

/// The names `ListActivatableNames` gives.
fn activatable(client: &mut RawClient) -> Vec<String> {
    client
        .driver_call("ListActivatableNames", &())
        .unwrap()
        .body()
        .deserialize::<Vec<String>>()
        .unwrap()
}

#[test]
fn reload_config_reads_a_new_servicedir() {
    let first = service_file("org.example.InFirst", "/bin/false", "");
    let second = service_file("org.example.InSecond", "/bin/false", "");
    let servicedir = |dir: &str| {
        config(&format!(
            "  <policy context=\"default\">{ALLOW_ALL}\n  </policy>\n  <servicedir>{dir}</servicedir>"
        ))
    };
    let broker = Broker::start_with_config_files(
        &servicedir("first"),
        &[
            ("first/org.example.InFirst.service", &first),
            ("second/org.example.InSecond.service", &second),
        ],
        &[],
    );
    let mut client = RawClient::connect(&broker.socket);
    client
        .driver_call(
            "AddMatch",
            &("type='signal',member='ActivatableServicesChanged'",),
        )
        .unwrap();
    let names = activatable(&mut client);
    assert!(
        names.contains(&"org.example.InFirst".to_owned()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"org.example.InSecond".to_owned()),
        "{names:?}"
    );

    std::fs::write(broker.config_file(), servicedir("second")).unwrap();
    let (reply, before) = client.driver_call_keeping("ReloadConfig", &());
    assert_eq!(
        reply.message_type(),
        Type::MethodReturn,
        "{}",
        error_text(&reply)
    );
    first_named(&mut client, before, "ActivatableServicesChanged");
    let names = activatable(&mut client);
    assert!(
        names.contains(&"org.example.InSecond".to_owned()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"org.example.InFirst".to_owned()),
        "{names:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed files, ReloadConfig and SIGHUP

/// Starts the broker on `config` (with `files` next to it); it must exit. Returns its exit
/// code, its stderr and the configuration file's path.
fn start_must_fail(config: &str, files: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = common::write_config_files(dir.path(), config, files);
    let log = dir.path().join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg(format!("--config-file={}", file.display()))
        .arg(format!(
            "--address=unix:path={}",
            dir.path().join("bus").display()
        ))
        .arg("--print-address")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_within(&mut child, Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "the broker started on a malformed file:\n{config}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let stderr = std::fs::read_to_string(&log).unwrap();
    (status.code(), stderr, file.display().to_string())
}

#[test]
fn a_malformed_config_file_stops_the_bus_at_startup_naming_the_file_the_line_and_the_reason() {
    let cases = [
        // (the body, from line 5 on; the line at fault; a word of the reason)
        ("  <frobnicate/>", 5, "frobnicate"),
        (
            "  <limit name=\"max_message_size\">lots</limit>",
            5,
            "integer",
        ),
        ("  <limit name=\"max_bananas\">3</limit>", 5, "max_bananas"),
        (
            "  <policy context=\"default\">\n    <allow send_member=\"Do\"/>\n  </policy>",
            6,
            "interface",
        ),
        (
            "  <policy context=\"sometimes\">\n  </policy>",
            5,
            "sometimes",
        ),
        // Not well-formed: </busconfig> on line 7 closes nothing that is open.
        (
            "  <policy context=\"default\">\n    <allow own=\"a.b\">",
            7,
            "allow",
        ),
    ];
    for (body, line, reason) in cases {
        let text = config(body);
        let (code, stderr, path) = start_must_fail(&text, &[]);
        assert_eq!(code, Some(1), "exit status for:\n{text}\nstderr: {stderr}");
        assert!(
            stderr.contains(&format!("{path}:{line}:")),
            "stderr names {path}:{line}: for\n{text}\nstderr: {stderr}"
        );
        assert!(
            stderr.contains(reason),
            "stderr gives the reason ({reason}) for\n{text}\nstderr: {stderr}"
        );
    }
}

#[test]
fn an_error_in_an_included_file_names_the_included_file() {
    let included = "<busconfig>\n  <policy context=\"default\">\n    <allow bogus=\"1\"/>\n  </policy>\n</busconfig>\n";
    let text = config(&format!(
        "  <policy context=\"default\">{ALLOW_ALL}\n  </policy>\n  <include>extra.conf</include>"
    ));
    let (code, stderr, path) = start_must_fail(&text, &[("extra.conf", included)]);
    assert_eq!(code, Some(1), "stderr: {stderr}");
    let extra = Path::new(&path).with_file_name("extra.conf");
    assert!(
        stderr.contains(&format!("{}:3:", extra.display())),
        "stderr names extra.conf:3: {stderr}"
    );
    assert!(stderr.contains("bogus"), "the reason: {stderr}");
}

/// A configuration that allows everything but owning `denied`.
fn denying_own(denied: &str) -> String {
    allow_all_then(&format!(r#"<deny own="{denied}"/>"#))
}

/// The line of [`broken_config`]'s mistake.
const BROKEN_LINE: u32 = 5;

/// A broken version of a configuration: an unknown element on line [`BROKEN_LINE`].
fn broken_config() -> String {
    config("  <frobnicate/>")
}

/// Calls `ReloadConfig`.
fn reload_config(client: &mut RawClient) -> Result<Message, Message> {
    client.driver_call("ReloadConfig", &())
}

#[test]
fn reload_config_with_a_broken_file_fails_and_keeps_the_old_policy() {
    let broker = Broker::start_with_config(&denying_own("org.example.Old"));
    let mut client = RawClient::connect(&broker.socket);
    assert!(!may_own(&mut client, "org.example.Old"));

    std::fs::write(broker.config_file(), broken_config()).unwrap();
    let err = reload_config(&mut client).unwrap_err();
    assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.Failed");
    let text = error_text(&err);
    let where_ = format!("{}:{BROKEN_LINE}:", broker.config_file().display());
    assert!(text.contains(&where_), "names {where_}: {text}");
    assert!(text.contains("frobnicate"), "the reason: {text}");

    assert!(
        !may_own(&mut client, "org.example.Old"),
        "the old policy still applies"
    );
    assert!(may_own(&mut client, "org.example.Other"));
    assert!(broker.log().contains("keeping the configuration"));
}

#[test]
fn reload_config_with_a_fixed_file_applies_the_new_policy() {
    let broker = Broker::start_with_config(&denying_own("org.example.Old"));
    let mut client = RawClient::connect(&broker.socket);
    assert!(!may_own(&mut client, "org.example.Old"));

    std::fs::write(broker.config_file(), broken_config()).unwrap();
    reload_config(&mut client).unwrap_err();
    std::fs::write(broker.config_file(), denying_own("org.example.New")).unwrap();
    reload_config(&mut client).unwrap_or_else(|e| panic!("ReloadConfig: {}", error_text(&e)));

    assert!(
        may_own(&mut client, "org.example.Old"),
        "the old deny is gone"
    );
    assert!(
        !may_own(&mut client, "org.example.New"),
        "the new deny applies"
    );
}

#[test]
fn reload_config_applies_new_limits() {
    let broker = Broker::start_with_config(&with_limit("max_match_rules_per_connection", 1));
    let mut client = RawClient::connect(&broker.socket);
    add_match(&mut client, "type='signal',member='A'").unwrap();
    let err = add_match(&mut client, "type='signal',member='B'").unwrap_err();
    assert_eq!(error_name(&err), LIMITS_EXCEEDED);

    std::fs::write(
        broker.config_file(),
        with_limit("max_match_rules_per_connection", 2),
    )
    .unwrap();
    reload_config(&mut client).unwrap();
    add_match(&mut client, "type='signal',member='B'").unwrap();
}

/// Sends SIGHUP to the broker.
fn sighup(broker: &Broker) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

#[test]
fn sighup_with_a_broken_file_keeps_the_old_policy_and_with_a_fixed_one_applies_the_new() {
    let broker = Broker::start_with_config(&denying_own("org.example.Old"));
    let mut client = RawClient::connect(&broker.socket);

    std::fs::write(broker.config_file(), broken_config()).unwrap();
    sighup(&broker);
    let log = broker.wait_for_log("keeping the configuration");
    let where_ = format!("{}:{BROKEN_LINE}:", broker.config_file().display());
    assert!(log.contains(&where_), "the log names {where_}:\n{log}");
    assert!(!may_own(&mut client, "org.example.Old"), "the old policy");

    std::fs::write(broker.config_file(), denying_own("org.example.New")).unwrap();
    sighup(&broker);
    broker.wait_for_log("configuration reloaded");
    assert!(
        may_own(&mut client, "org.example.Old"),
        "the old deny is gone"
    );
    assert!(
        !may_own(&mut client, "org.example.New"),
        "the new deny applies"
    );
}

// ---------------------------------------------------------------------------------------------
// --systemd-activation

const SYSTEMD: &str = "org.freedesktop.systemd1";
const ACTIVATOR: &str = "org.freedesktop.systemd1.Activator";

/// A broker with systemd activation, where `org.example.Activated` is started by systemd's
/// `activated.service`, and systemd itself has the activation file real systems ship.
fn systemd_broker() -> Broker {
    let activated = service_file(
        "org.example.Activated",
        "/bin/false",
        "SystemdService=activated.service\n",
    );
    let systemd = service_file(SYSTEMD, "/bin/false", "");
    Broker::start_with_config_files(
        &with_services(""),
        &[
            ("services/org.example.Activated.service", &activated),
            ("services/org.freedesktop.systemd1.service", &systemd),
        ],
        &["--systemd-activation"],
    )
}

/// A client that owns `org.freedesktop.systemd1` and listens to activation requests, as systemd
/// does.
fn fake_systemd(broker: &Broker) -> RawClient {
    let mut systemd = owner_of(broker, SYSTEMD);
    systemd
        .driver_call(
            "AddMatch",
            &("type='signal',interface='org.freedesktop.systemd1.Activator',member='ActivationRequest'",),
        )
        .unwrap();
    systemd
}

/// Requests `name` for `client`; returns the messages that came before the reply. Like
/// dbus-daemon, the bus hands over what waited for the name before it answers.
fn take_name(client: &mut RawClient, name: &str) -> Vec<Message> {
    let (reply, before) = client.driver_call_keeping("RequestName", &(name, 0u32));
    assert_eq!(
        reply.message_type(),
        Type::MethodReturn,
        "RequestName {name}: {}",
        error_name(&reply)
    );
    before
}

/// The first message named `member`: among `earlier` ones, else the next to come.
fn first_named(client: &mut RawClient, earlier: Vec<Message>, member: &str) -> Message {
    match earlier.into_iter().find(|m| member_of(m) == member) {
        Some(msg) => msg,
        None => client.recv_until(|m| member_of(m) == member),
    }
}

/// Waits for the bus's request to start a unit; checks its form and returns the unit.
fn activation_request(systemd: &mut RawClient) -> String {
    let request = systemd.recv_until(|m| member_of(m) == "ActivationRequest");
    check_activation_request(&request)
}

/// Checks the form of the bus's request to start a unit; returns the unit.
fn check_activation_request(request: &Message) -> String {
    let header = request.header();
    assert_eq!(request.message_type(), Type::Signal);
    assert_eq!(header.interface().map(|i| i.as_str()), Some(ACTIVATOR));
    assert_eq!(
        header.sender().map(|s| s.as_str()),
        Some("org.freedesktop.DBus")
    );
    assert_eq!(header.destination().map(|d| d.as_str()), Some(SYSTEMD));
    request.body().deserialize::<String>().unwrap()
}

/// `ActivationFailure(unit, error, text)`, sent to the driver.
fn send_activation_failure(client: &mut RawClient, unit: &str, error: &str) {
    let serial = client.next_serial();
    let failure = Message::signal("/org/freedesktop/systemd1", ACTIVATOR, "ActivationFailure")
        .destination("org.freedesktop.DBus")
        .serial(serial)
        .build(&(unit, error, "Unit activated.service not found."))
        .unwrap();
    client.send(&failure);
}

#[test]
fn systemd_activation_asks_systemd_for_the_unit_and_delivers_the_call_once_the_name_is_taken() {
    let broker = systemd_broker();
    let mut systemd = fake_systemd(&broker);
    let mut caller = RawClient::connect(&broker.socket);

    let held = call(&mut caller, "org.example.Activated", "Do");
    assert_eq!(activation_request(&mut systemd), "activated.service");

    // "systemd" starts the service: here it takes the name itself.
    let earlier = take_name(&mut systemd, "org.example.Activated");
    let got = first_named(&mut systemd, earlier, "Do");
    assert_eq!(got.primary_header().serial_num(), held);
    answer(&mut systemd, &got);
    caller.reply_to(held).unwrap();
}

#[test]
fn activation_failure_from_systemd_fails_the_waiting_callers_with_its_error() {
    let broker = systemd_broker();
    let mut systemd = fake_systemd(&broker);
    let mut caller = RawClient::connect(&broker.socket);
    let mut start_caller = RawClient::connect(&broker.socket);

    let held = call(&mut caller, "org.example.Activated", "Do");
    assert_eq!(activation_request(&mut systemd), "activated.service");
    let start = start_caller.next_serial();
    let start_call = Message::method_call("/org/freedesktop/DBus", "StartServiceByName")
        .interface("org.freedesktop.DBus")
        .destination("org.freedesktop.DBus")
        .serial(start)
        .build(&("org.example.Activated", 0u32))
        .unwrap();
    start_caller.send(&start_call);
    // Once the start call is in, no second request comes: make sure the bus has it.
    start_caller.driver_call("GetId", &()).unwrap();

    send_activation_failure(
        &mut systemd,
        "activated.service",
        "org.freedesktop.systemd1.NoSuchUnit",
    );
    let err = caller.reply_to(held).unwrap_err();
    assert_eq!(error_name(&err), "org.freedesktop.systemd1.NoSuchUnit");
    assert_eq!(error_text(&err), "Unit activated.service not found.");
    let err = start_caller.reply_to(start).unwrap_err();
    assert_eq!(error_name(&err), "org.freedesktop.systemd1.NoSuchUnit");
}

#[test]
fn activation_failure_from_anyone_but_systemd_is_ignored() {
    let broker = systemd_broker();
    let mut systemd = fake_systemd(&broker);
    let mut caller = RawClient::connect(&broker.socket);
    let mut impostor = RawClient::connect(&broker.socket);

    let held = call(&mut caller, "org.example.Activated", "Do");
    assert_eq!(activation_request(&mut systemd), "activated.service");
    send_activation_failure(&mut impostor, "activated.service", "org.example.Error.Fake");
    // The impostor's signal has been handled once its next call is answered.
    impostor.driver_call("GetId", &()).unwrap();

    let earlier = take_name(&mut systemd, "org.example.Activated");
    let got = first_named(&mut systemd, earlier, "Do");
    assert_eq!(got.primary_header().serial_num(), held);
    answer(&mut systemd, &got);
    caller
        .reply_to(held)
        .unwrap_or_else(|e| panic!("the call failed with {}", error_name(&e)));
}

#[test]
fn the_activation_request_waits_for_systemd_to_join_the_bus() {
    let broker = systemd_broker();
    let mut caller = RawClient::connect(&broker.socket);
    let held = call(&mut caller, "org.example.Activated", "Do");
    // The call is in once a later one is answered.
    caller.driver_call("GetId", &()).unwrap();

    let mut systemd = RawClient::connect(&broker.socket);
    let earlier = take_name(&mut systemd, SYSTEMD);
    let request = first_named(&mut systemd, earlier, "ActivationRequest");
    assert_eq!(check_activation_request(&request), "activated.service");
    let earlier = take_name(&mut systemd, "org.example.Activated");
    let got = first_named(&mut systemd, earlier, "Do");
    assert_eq!(got.primary_header().serial_num(), held);
}

/// A bus that offers `auth` (its `<auth>` lines) and lets everyone do everything.
fn with_auth(auth: &str) -> String {
    format!(
        "<busconfig>\n  <type>session</type>\n  <listen>unix:tmpdir=/tmp</listen>\n  {auth}\n  \
         <policy context=\"default\">{ALLOW_ALL}\n  </policy>\n  \
         <policy user=\"root\"><deny own=\"org.example.NotForRoot\"/></policy>\n</busconfig>\n"
    )
}

/// The server's answer to `line` as the first line of a handshake.
fn auth_answer(broker: &Broker, line: &str) -> String {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(&broker.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(format!("\0{line}\r\n").as_bytes())
        .unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut answer)
        .unwrap();
    answer.trim_end().to_owned()
}

#[test]
fn allow_anonymous_lets_a_client_in_without_an_identity_that_user_policies_do_not_cover() {
    let broker = Broker::start_with_config(&with_auth(
        "<auth>EXTERNAL</auth><auth>ANONYMOUS</auth><allow_anonymous/>",
    ));
    assert_eq!(auth_answer(&broker, "AUTH"), "REJECTED EXTERNAL ANONYMOUS");
    let mut anonymous = RawClient::connect_anonymous(&broker.socket);
    // The bus does not vouch for who it is: no uid to report, and root's policy is not its.
    let unique = anonymous.unique.clone();
    let err = anonymous
        .driver_call("GetConnectionUnixUser", &(unique.as_str(),))
        .unwrap_err();
    assert_eq!(error_name(&err), "org.freedesktop.DBus.Error.Failed");
    let reply = anonymous
        .driver_call("RequestName", &("org.example.NotForRoot", 0u32))
        .expect("the root policy does not apply to an anonymous client");
    assert_eq!(reply.body().deserialize::<u32>().unwrap(), 1);
    let mut root = RawClient::connect(&broker.socket);
    let err = root
        .driver_call("RequestName", &("org.example.NotForRoot", 0u32))
        .unwrap_err();
    assert_eq!(error_name(&err), ACCESS_DENIED);
}

#[test]
fn auth_restricts_the_mechanisms_and_libdbus_falls_back_to_anonymous() {
    let broker = Broker::start_with_config(&with_auth("<auth>ANONYMOUS</auth><allow_anonymous/>"));
    assert_eq!(
        auth_answer(&broker, "AUTH EXTERNAL 30"),
        "REJECTED ANONYMOUS",
        "EXTERNAL is not offered"
    );
    let (ok, out, err) = common::run_client(
        &broker,
        "dbus-send",
        &[
            "--session",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.GetId",
        ],
    );
    assert!(ok, "dbus-send failed: {err}");
    assert!(out.contains("string \""), "{out}");

    // Without <allow_anonymous/>, ANONYMOUS is not offered.
    let broker =
        Broker::start_with_config(&with_auth("<auth>EXTERNAL</auth><auth>ANONYMOUS</auth>"));
    assert_eq!(auth_answer(&broker, "AUTH ANONYMOUS"), "REJECTED EXTERNAL");
}

#[test]
fn a_configuration_that_leaves_no_mechanism_broker_has_is_refused_at_startup() {
    let (code, stderr, _) = start_must_fail(&with_auth("<auth>DBUS_COOKIE_SHA1</auth>"), &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("DBUS_COOKIE_SHA1"), "{stderr}");
}

#[test]
fn a_connections_first_refusal_is_logged_at_info_and_the_rest_at_debug() {
    let broker = Broker::start_with_config(&allow_all_then(
        r#"<deny send_interface="org.example.Forbidden"/>"#,
    ));
    let _target = owner_of(&broker, "org.example.Target");
    let mut caller = RawClient::connect(&broker.socket);
    for _ in 0..3 {
        let serial = send_call(
            &mut caller,
            "org.example.Target",
            "/org/example",
            "org.example.Forbidden",
            "Do",
        );
        assert_denied(&mut caller, serial, "a forbidden interface");
    }
    let log = broker.log();
    let refusals = |level: &str| {
        log.lines()
            .filter(|l| l.contains(level) && l.contains("Rejected send message"))
            .count()
    };
    assert_eq!(refusals(" INFO "), 1, "{log}");
    assert_eq!(refusals(" DEBUG "), 2, "{log}");
}

// ---------------------------------------------------------------------------------------------
// The environment of started services, by the bus's <type>

/// The name of the service that writes its environment to a file and exits 1.
const ENV_DUMP: &str = "org.example.EnvDump";

/// A bus whose configuration says `<type>bus_type</type>` (none: no `<type>` at all), with the
/// `ENV_DUMP` service, which writes its environment to `env` in the returned directory.
fn env_dump_bus(bus_type: Option<&str>) -> (Broker, tempfile::TempDir) {
    let scratch = tempfile::tempdir().unwrap();
    let script = scratch.path().join("dump-env.sh");
    std::fs::write(&script, "env -0 > \"$1\"\nexit 1\n").unwrap();
    let exec = format!(
        "/bin/sh {} {}",
        script.display(),
        scratch.path().join("env").display()
    );
    // A system bus starts only files with User= (as the reference): this test's own user,
    // which its spawner may run services as, root or not.
    let user = match bus_type {
        Some("system") => {
            let me = nix::unistd::User::from_uid(nix::unistd::getuid())
                .expect("look up this user")
                .expect("this user has a name");
            format!("User={}\n", me.name)
        }
        _ => String::new(),
    };
    let service = service_file(ENV_DUMP, &exec, &user);
    let broker = Broker::start_with_config_files(
        &config_of_type(bus_type),
        &[(&format!("services/{ENV_DUMP}.service"), &service)],
        &[],
    );
    (broker, scratch)
}

/// A configuration that allows everything, reads `services/`, and says `<type>bus_type</type>`.
fn config_of_type(bus_type: Option<&str>) -> String {
    let declared = bus_type.map_or(String::new(), |t| format!("<type>{t}</type>"));
    with_services("").replace("<type>session</type>", &declared)
}

/// Starts `ENV_DUMP` and returns the environment it was started with.
fn started_environment(broker: &Broker, scratch: &Path) -> HashMap<String, String> {
    let out = scratch.join("env");
    let _ = std::fs::remove_file(&out);
    let mut client = RawClient::connect(&broker.socket);
    let err = client
        .driver_call("StartServiceByName", &(ENV_DUMP, 0u32))
        .unwrap_err();
    assert_eq!(
        error_name(&err),
        "org.freedesktop.DBus.Error.Spawn.ChildExited",
        "{}",
        error_text(&err)
    );
    let text = std::fs::read(&out).expect("the service wrote its environment");
    text.split(|b| *b == 0)
        .filter_map(|entry| {
            let (k, v) = std::str::from_utf8(entry).ok()?.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Asserts that the bus left `key` as the broker inherited it (from this test process).
fn inherited(env: &HashMap<String, String>, key: &str) {
    assert_eq!(
        env.get(key),
        std::env::var(key).ok().as_ref(),
        "{key} was changed by the bus"
    );
}

#[test]
fn a_system_bus_starts_services_with_the_system_bus_environment_even_after_a_reload() {
    let (broker, scratch) = env_dump_bus(Some("system"));
    let address = broker.address.clone();
    assert!(address.contains(",guid="), "{address}");
    let check = |env: &HashMap<String, String>| {
        assert_eq!(env.get("DBUS_STARTER_BUS_TYPE"), Some(&"system".into()));
        assert_eq!(env.get("DBUS_STARTER_ADDRESS"), Some(&address));
        assert_eq!(env.get("DBUS_SYSTEM_BUS_ADDRESS"), Some(&address));
        // The reference's minimal environment: nothing of the bus's own.
        assert_eq!(env.get("DBUS_SESSION_BUS_ADDRESS"), None);
        assert_eq!(env.get("HOME"), None);
    };
    check(&started_environment(&broker, scratch.path()));

    // As with dbus-daemon, the type is read once: a reload that changes it changes nothing.
    std::fs::write(broker.config_file(), config_of_type(Some("session"))).unwrap();
    let mut client = RawClient::connect(&broker.socket);
    reload_config(&mut client).expect("ReloadConfig");
    check(&started_environment(&broker, scratch.path()));
}

#[test]
fn a_session_bus_starts_services_with_the_session_bus_environment() {
    let (broker, scratch) = env_dump_bus(Some("session"));
    let env = started_environment(&broker, scratch.path());
    let address = &broker.address;
    assert!(address.contains(",guid="), "{address}");
    assert_eq!(env.get("DBUS_STARTER_BUS_TYPE"), Some(&"session".into()));
    assert_eq!(env.get("DBUS_STARTER_ADDRESS"), Some(address));
    assert_eq!(env.get("DBUS_SESSION_BUS_ADDRESS"), Some(address));
    inherited(&env, "DBUS_SYSTEM_BUS_ADDRESS");
}

#[test]
fn a_bus_of_another_type_or_none_sets_only_the_starter_variables() {
    let (broker, scratch) = env_dump_bus(Some("custom"));
    let env = started_environment(&broker, scratch.path());
    assert_eq!(env.get("DBUS_STARTER_BUS_TYPE"), Some(&"custom".into()));
    assert_eq!(env.get("DBUS_STARTER_ADDRESS"), Some(&broker.address));
    inherited(&env, "DBUS_SESSION_BUS_ADDRESS");
    inherited(&env, "DBUS_SYSTEM_BUS_ADDRESS");

    let (broker, scratch) = env_dump_bus(None);
    let env = started_environment(&broker, scratch.path());
    assert_eq!(env.get("DBUS_STARTER_ADDRESS"), Some(&broker.address));
    inherited(&env, "DBUS_STARTER_BUS_TYPE");
    inherited(&env, "DBUS_SESSION_BUS_ADDRESS");
    inherited(&env, "DBUS_SYSTEM_BUS_ADDRESS");
}
