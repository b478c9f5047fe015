//! The real broker driven by zbus clients: every driver method, the name queue and its signals,
//! match-rule edge cases, fd passing and callers left waiting by a peer that leaves.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use common::{Broker, fdo_error_name, list_names, within, zbus_error_name};
use futures_util::StreamExt;
use zbus::fdo::{DBusProxy, ReleaseNameReply, RequestNameFlags, RequestNameReply};
use zbus::names::{BusName, WellKnownName};
use zbus::{Connection, Message, MessageStream};

const DRIVER: &str = "org.freedesktop.DBus";
const DRIVER_PATH: &str = "/org/freedesktop/DBus";

/// A zbus connection and its driver proxy.
async fn client(broker: &Broker) -> (Connection, DBusProxy<'static>) {
    let conn = broker.zbus().await;
    let proxy = DBusProxy::new(&conn).await.expect("driver proxy");
    (conn, proxy)
}

fn unique(conn: &Connection) -> String {
    conn.unique_name().expect("zbus said Hello").to_string()
}

fn wk(name: &str) -> WellKnownName<'_> {
    WellKnownName::try_from(name).expect("valid well-known name")
}

fn bus_name(name: &str) -> BusName<'_> {
    BusName::try_from(name).expect("valid bus name")
}

/// Calls a driver method with a body of any signature and returns the D-Bus error name, or
/// "ok" when it succeeded.
async fn driver_outcome<B>(conn: &Connection, interface: &str, member: &str, body: &B) -> String
where
    B: serde::Serialize + zbus::DynamicType,
{
    match conn
        .call_method(Some(DRIVER), DRIVER_PATH, Some(interface), member, body)
        .await
    {
        Ok(_) => "ok".to_owned(),
        Err(e) => zbus_error_name(&e),
    }
}

async fn queue(proxy: &DBusProxy<'_>, name: &str) -> Vec<String> {
    let owners = proxy
        .list_queued_owners(wk(name))
        .await
        .expect("ListQueuedOwners");
    owners.iter().map(|o| o.to_string()).collect()
}

/// The next NameOwnerChanged for any name, as (name, old owner, new owner).
async fn next_owner_change(
    stream: &mut zbus::fdo::NameOwnerChangedStream,
) -> (String, String, String) {
    let signal = within("NameOwnerChanged", stream.next())
        .await
        .expect("signal stream ended");
    let args = signal.args().expect("NameOwnerChanged args");
    let owner = |o: &zbus::Optional<zbus::names::UniqueName<'_>>| {
        o.as_ref().map(|n| n.to_string()).unwrap_or_default()
    };
    (
        args.name().to_string(),
        owner(args.old_owner()),
        owner(args.new_owner()),
    )
}

async fn next_name_acquired(stream: &mut zbus::fdo::NameAcquiredStream) -> String {
    let signal = within("NameAcquired", stream.next())
        .await
        .expect("signal stream ended");
    signal.args().expect("NameAcquired args").name().to_string()
}

async fn next_name_lost(stream: &mut zbus::fdo::NameLostStream) -> String {
    let signal = within("NameLost", stream.next())
        .await
        .expect("signal stream ended");
    signal.args().expect("NameLost args").name().to_string()
}

/// Waits for the NameOwnerChanged of `name`, skipping those of other names (the unique names of
/// clients that come and go).
async fn owner_change_of(
    stream: &mut zbus::fdo::NameOwnerChangedStream,
    name: &str,
) -> (String, String) {
    loop {
        let (changed, old, new) = next_owner_change(stream).await;
        if changed == name {
            return (old, new);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_name_flags_queue_and_name_signals() {
    let broker = Broker::start();
    let (a, pa) = client(&broker).await;
    let (b, pb) = client(&broker).await;
    let (c, pc) = client(&broker).await;
    let (_observer, po) = client(&broker).await;
    let (ua, ub, uc) = (unique(&a), unique(&b), unique(&c));
    let name = "org.example.Queue";
    let mut changes = po
        .receive_name_owner_changed()
        .await
        .expect("NameOwnerChanged stream");
    let mut a_lost = pa.receive_name_lost().await.expect("NameLost stream");
    let mut a_acquired = pa
        .receive_name_acquired()
        .await
        .expect("NameAcquired stream");
    let mut c_acquired = pc
        .receive_name_acquired()
        .await
        .expect("NameAcquired stream");

    let reply = pa
        .request_name(wk(name), RequestNameFlags::ALLOW_REPLACEMENT)
        .await
        .expect("RequestName");
    assert_eq!(reply, RequestNameReply::PrimaryOwner);
    assert_eq!(
        owner_change_of(&mut changes, name).await,
        (String::new(), ua.clone())
    );
    // zbus's own stream may first show the unique name the bus confirmed at Hello.
    while next_name_acquired(&mut a_acquired).await != name {}
    let again = pa
        .request_name(wk(name), RequestNameFlags::ALLOW_REPLACEMENT)
        .await
        .expect("RequestName");
    assert_eq!(again, RequestNameReply::AlreadyOwner);

    let queued = pb
        .request_name(wk(name), RequestNameFlags::empty())
        .await
        .expect("RequestName");
    assert_eq!(queued, RequestNameReply::InQueue);
    let refused = pc
        .request_name(wk(name), RequestNameFlags::DO_NOT_QUEUE)
        .await
        .expect("RequestName");
    assert_eq!(refused, RequestNameReply::Exists);
    assert_eq!(queue(&po, name).await, [ua.clone(), ub.clone()]);

    // A allowed replacement: C takes over and A, which may queue, waits right behind C.
    let replaced = pc
        .request_name(wk(name), RequestNameFlags::REPLACE_EXISTING)
        .await
        .expect("RequestName");
    assert_eq!(replaced, RequestNameReply::PrimaryOwner);
    assert_eq!(next_name_lost(&mut a_lost).await, name);
    assert_eq!(
        owner_change_of(&mut changes, name).await,
        (ua.clone(), uc.clone())
    );
    while next_name_acquired(&mut c_acquired).await != name {}
    assert_eq!(queue(&po, name).await, [uc.clone(), ua.clone(), ub.clone()]);
    assert_eq!(
        po.get_name_owner(bus_name(name))
            .await
            .expect("GetNameOwner")
            .to_string(),
        uc
    );

    // C did not allow replacement: A stays queued; B, which will not queue, leaves the queue.
    let kept = pa
        .request_name(wk(name), RequestNameFlags::REPLACE_EXISTING)
        .await
        .expect("RequestName");
    assert_eq!(kept, RequestNameReply::InQueue);
    let flags = RequestNameFlags::REPLACE_EXISTING | RequestNameFlags::DO_NOT_QUEUE;
    let gone = pb.request_name(wk(name), flags).await.expect("RequestName");
    assert_eq!(gone, RequestNameReply::Exists);
    assert_eq!(queue(&po, name).await, [uc.clone(), ua.clone()]);

    assert_eq!(
        pb.release_name(wk(name)).await.expect("ReleaseName"),
        ReleaseNameReply::NotOwner
    );
    assert_eq!(
        pc.release_name(wk(name)).await.expect("ReleaseName"),
        ReleaseNameReply::Released
    );
    assert_eq!(
        owner_change_of(&mut changes, name).await,
        (uc.clone(), ua.clone())
    );
    while next_name_acquired(&mut a_acquired).await != name {}
    assert_eq!(queue(&po, name).await, [ua.as_str()]);

    // The owner leaves: the name passes to the next in the queue, then disappears.
    pb.request_name(wk(name), RequestNameFlags::empty())
        .await
        .expect("RequestName");
    a.close().await.expect("close A");
    assert_eq!(
        owner_change_of(&mut changes, name).await,
        (ua.clone(), ub.clone())
    );
    assert_eq!(
        pb.release_name(wk(name)).await.expect("ReleaseName"),
        ReleaseNameReply::Released
    );
    assert_eq!(
        owner_change_of(&mut changes, name).await,
        (ub.clone(), String::new())
    );
    assert!(
        !po.name_has_owner(bus_name(name))
            .await
            .expect("NameHasOwner")
    );
    let no_owner = po
        .get_name_owner(bus_name(name))
        .await
        .expect_err("GetNameOwner of a free name");
    assert_eq!(
        fdo_error_name(&no_owner),
        "org.freedesktop.DBus.Error.NameHasNoOwner"
    );
    let no_queue = po
        .list_queued_owners(wk(name))
        .await
        .expect_err("ListQueuedOwners of a free name");
    assert_eq!(
        fdo_error_name(&no_queue),
        "org.freedesktop.DBus.Error.NameHasNoOwner"
    );
    let unknown = pb
        .release_name(wk("org.example.Nobody"))
        .await
        .expect("ReleaseName");
    assert_eq!(unknown, ReleaseNameReply::NonExistent);
}

/// dbus-daemon puts a requester that asked for REPLACE_EXISTING but could not replace the owner
/// right behind the owner, ahead of those already queued (checked against dbus-daemon 1.14.10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_that_cannot_replace_queues_right_behind_the_owner() {
    let broker = Broker::start();
    let (a, pa) = client(&broker).await;
    let (b, pb) = client(&broker).await;
    let (c, pc) = client(&broker).await;
    let name = "org.example.Behind";
    pa.request_name(wk(name), RequestNameFlags::empty())
        .await
        .expect("RequestName");
    pb.request_name(wk(name), RequestNameFlags::empty())
        .await
        .expect("RequestName");
    let reply = pc
        .request_name(wk(name), RequestNameFlags::REPLACE_EXISTING)
        .await
        .expect("RequestName");
    assert_eq!(reply, RequestNameReply::InQueue);
    assert_eq!(
        queue(&pa, name).await,
        [unique(&a), unique(&c), unique(&b)],
        "dbus-daemon 1.14 gives this order"
    );
    // One already waiting moves up the same way when it asks again with REPLACE_EXISTING.
    let (d, pd) = client(&broker).await;
    pd.request_name(wk(name), RequestNameFlags::empty())
        .await
        .expect("RequestName");
    pd.request_name(wk(name), RequestNameFlags::REPLACE_EXISTING)
        .await
        .expect("RequestName");
    assert_eq!(
        queue(&pa, name).await,
        [unique(&a), unique(&d), unique(&c), unique(&b)],
        "dbus-daemon 1.14 gives this order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_queries_ids_and_credentials() {
    let broker = Broker::start();
    let (me, proxy) = client(&broker).await;
    let my_name = unique(&me);
    assert!(my_name.starts_with(":1."), "unique name {my_name}");
    me.request_name("org.example.Queries")
        .await
        .expect("RequestName");

    let names = list_names(&proxy).await;
    for expected in [DRIVER, my_name.as_str(), "org.example.Queries"] {
        assert!(
            names.iter().any(|n| n == expected),
            "ListNames {names:?} lacks {expected}"
        );
    }
    let activatable = proxy
        .list_activatable_names()
        .await
        .expect("ListActivatableNames");
    assert!(
        activatable.iter().any(|n| n.as_str() == DRIVER),
        "{activatable:?}"
    );
    assert!(
        proxy
            .name_has_owner(bus_name(DRIVER))
            .await
            .expect("NameHasOwner")
    );
    assert!(
        proxy
            .name_has_owner(bus_name(&my_name))
            .await
            .expect("NameHasOwner")
    );
    assert!(
        !proxy
            .name_has_owner(bus_name(":1.9999"))
            .await
            .expect("NameHasOwner")
    );
    let owner = proxy
        .get_name_owner(bus_name("org.example.Queries"))
        .await
        .expect("GetNameOwner");
    assert_eq!(owner.as_str(), my_name);
    assert_eq!(
        proxy
            .get_name_owner(bus_name(DRIVER))
            .await
            .expect("GetNameOwner")
            .as_str(),
        DRIVER
    );
    assert_eq!(
        proxy
            .list_queued_owners(wk("org.example.Queries"))
            .await
            .expect("ListQueuedOwners"),
        [owner]
    );

    let guid = broker
        .address
        .rsplit_once("guid=")
        .expect("printed address has a guid")
        .1;
    assert_eq!(proxy.get_id().await.expect("GetId").to_string(), guid);

    let uid = nix::unistd::getuid().as_raw();
    let by_well_known = bus_name("org.example.Queries");
    assert_eq!(
        proxy
            .get_connection_unix_user(by_well_known.clone())
            .await
            .expect("GetConnectionUnixUser"),
        uid
    );
    let pid = proxy
        .get_connection_unix_process_id(by_well_known)
        .await
        .expect("GetConnectionUnixProcessID");
    assert_eq!(pid, std::process::id());
    let creds = proxy
        .get_connection_credentials(bus_name(&my_name))
        .await
        .expect("GetConnectionCredentials");
    assert_eq!(creds.unix_user_id(), Some(uid));
    assert_eq!(creds.process_id(), Some(std::process::id()));
    let pidfd = creds
        .process_fd()
        .expect("ProcessFD for a client that negotiated fd passing");
    assert_eq!(pidfd_pid(pidfd.as_fd()), std::process::id());
    let missing = proxy
        .get_connection_unix_user(bus_name(":1.9999"))
        .await
        .expect_err("credentials of nobody");
    assert_eq!(
        fdo_error_name(&missing),
        "org.freedesktop.DBus.Error.NameHasNoOwner"
    );
}

/// The pid a pidfd refers to, as the kernel shows it in fdinfo.
fn pidfd_pid(fd: std::os::fd::BorrowedFd<'_>) -> u32 {
    use std::os::fd::AsRawFd;
    let info =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).expect("fdinfo");
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .unwrap_or_else(|| panic!("not a pidfd: {info}"));
    line.trim().parse().expect("pid in fdinfo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_introspection_and_properties() {
    let broker = Broker::start();
    let (me, proxy) = client(&broker).await;
    let peer = zbus::fdo::PeerProxy::builder(&me)
        .destination(DRIVER)
        .path(DRIVER_PATH)
        .build()
        .await
        .expect("peer proxy");
    peer.ping().await.expect("Ping");
    let machine_id = peer.get_machine_id().await.expect("GetMachineId");
    assert!(
        machine_id.len() == 32 && machine_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "machine id {machine_id:?}"
    );

    let introspectable = zbus::fdo::IntrospectableProxy::builder(&me)
        .destination(DRIVER)
        .path(DRIVER_PATH)
        .build()
        .await
        .expect("introspectable proxy");
    let xml = introspectable.introspect().await.expect("Introspect");
    for expected in [
        DRIVER,
        "org.freedesktop.DBus.Peer",
        "org.freedesktop.DBus.Introspectable",
        "org.freedesktop.DBus.Properties",
        "org.freedesktop.DBus.Monitoring",
    ] {
        assert!(
            xml.contains(&format!("<interface name=\"{expected}\">")),
            "Introspect lacks {expected}: {xml}"
        );
    }

    assert!(
        proxy
            .features()
            .await
            .expect("Features")
            .iter()
            .all(|f| !f.is_empty())
    );
    let optional = proxy.interfaces().await.expect("Interfaces");
    assert!(
        optional
            .iter()
            .any(|i| i.as_str() == "org.freedesktop.DBus.Monitoring"),
        "{optional:?}"
    );
    let all = me
        .call_method(
            Some(DRIVER),
            DRIVER_PATH,
            Some("org.freedesktop.DBus.Properties"),
            "GetAll",
            &(DRIVER,),
        )
        .await
        .expect("GetAll");
    let all: HashMap<String, zbus::OwnedVariant> = all.body().deserialize().expect("a{sv}");
    assert!(
        all.contains_key("Features") && all.contains_key("Interfaces"),
        "GetAll gave {all:?}"
    );
    let set = driver_outcome(
        &me,
        "org.freedesktop.DBus.Properties",
        "Set",
        &(DRIVER, "Features", zbus::Variant::from(vec!["x"])),
    )
    .await;
    assert_eq!(set, "org.freedesktop.DBus.Error.PropertyReadOnly");
    let unknown = driver_outcome(
        &me,
        "org.freedesktop.DBus.Properties",
        "Get",
        &(DRIVER, "Nope"),
    )
    .await;
    assert_eq!(unknown, "org.freedesktop.DBus.Error.UnknownProperty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_errors_are_the_standard_ones() {
    let broker = Broker::start();
    let (me, proxy) = client(&broker).await;
    let me_name = unique(&me);
    let selinux = proxy
        .get_connection_selinux_security_context(bus_name(&me_name))
        .await
        .expect_err("no SELinux here");
    assert_eq!(
        fdo_error_name(&selinux),
        "org.freedesktop.DBus.Error.SELinuxSecurityContextUnknown"
    );
    let adt = proxy
        .get_adt_audit_session_data(bus_name(&me_name))
        .await
        .expect_err("no ADT here");
    assert_eq!(
        fdo_error_name(&adt),
        "org.freedesktop.DBus.Error.AdtAuditDataUnknown"
    );
    let start = proxy
        .start_service_by_name(wk("org.example.NotInstalled"), 0)
        .await
        .expect_err("nothing to start");
    assert_eq!(
        fdo_error_name(&start),
        "org.freedesktop.DBus.Error.ServiceUnknown"
    );

    let cases: [(&str, &str, &str); 3] = [
        (
            DRIVER,
            "NoSuchMethod",
            "org.freedesktop.DBus.Error.UnknownMethod",
        ),
        (
            "org.example.NoSuchInterface",
            "Anything",
            "org.freedesktop.DBus.Error.UnknownInterface",
        ),
        (
            "org.freedesktop.DBus.Peer",
            "NoSuchMethod",
            "org.freedesktop.DBus.Error.UnknownMethod",
        ),
    ];
    for (interface, member, expected) in cases {
        assert_eq!(
            driver_outcome(&me, interface, member, &()).await,
            expected,
            "{interface}.{member}"
        );
    }
    let wrong = [
        (
            "GetNameOwner",
            driver_outcome(&me, DRIVER, "GetNameOwner", &(42u32,)).await,
        ),
        (
            "RequestName",
            driver_outcome(&me, DRIVER, "RequestName", &("org.example.X",)).await,
        ),
    ];
    for (member, outcome) in wrong {
        assert_eq!(
            outcome, "org.freedesktop.DBus.Error.InvalidArgs",
            "{member} with a wrong signature"
        );
    }
}

/// Signals the listener saw on the test interface, up to and including the marker.
async fn seen_until_marker(stream: &mut MessageStream) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let msg = within("the marker signal", stream.next())
            .await
            .expect("stream ended")
            .expect("message");
        let header = msg.header();
        if msg.message_type() != zbus::message::Type::Signal
            || header.interface().map(|i| i.as_str()) != Some(TEST_IFACE)
        {
            continue;
        }
        let member = header.member().map(|m| m.to_string()).unwrap_or_default();
        if member == "Marker" {
            return seen;
        }
        seen.push(member);
    }
}

const TEST_IFACE: &str = "org.example.Match";

/// Emits a signal on the test interface at `path` with two string arguments.
async fn emit(
    conn: &Connection,
    destination: Option<&str>,
    path: &str,
    member: &str,
    args: (&str, &str),
) {
    conn.emit_signal(destination, path, TEST_IFACE, member, &args)
        .await
        .expect("emit signal");
}

/// Makes sure the bus has routed everything `conn` sent before: the driver answers in order.
async fn sync(conn: &Connection) {
    conn.call_method(
        Some(DRIVER),
        DRIVER_PATH,
        Some("org.freedesktop.DBus.Peer"),
        "Ping",
        &(),
    )
    .await
    .expect("Ping");
}

async fn add_match(conn: &Connection, rule: &str) {
    let outcome = driver_outcome(conn, DRIVER, "AddMatch", &(rule,)).await;
    assert_eq!(outcome, "ok", "AddMatch {rule}");
}

async fn remove_match(conn: &Connection, rule: &str) {
    let outcome = driver_outcome(conn, DRIVER, "RemoveMatch", &(rule,)).await;
    assert_eq!(outcome, "ok", "RemoveMatch {rule}");
}

/// Three connections: a listener that only adds rules, an emitter that owns a well-known name,
/// and another sender.
struct MatchBench {
    listener: Connection,
    stream: MessageStream,
    emitter: Connection,
    other: Connection,
}

impl MatchBench {
    async fn new(broker: &Broker) -> MatchBench {
        let listener = broker.zbus().await;
        let stream = MessageStream::from(&listener);
        let emitter = broker.zbus().await;
        emitter
            .request_name("org.example.Emitter")
            .await
            .expect("RequestName");
        let other = broker.zbus().await;
        add_match(
            &listener,
            &format!("type='signal',interface='{TEST_IFACE}',member='Marker'"),
        )
        .await;
        MatchBench {
            listener,
            stream,
            emitter,
            other,
        }
    }

    /// With `rule` added, the members of the emitter's signals (member, path, arg0, arg1) the
    /// listener receives; the rule is removed again after.
    async fn seen_with(&mut self, rule: &str, signals: &[(&str, &str, &str, &str)]) -> Vec<String> {
        add_match(&self.listener, rule).await;
        for (member, path, arg0, arg1) in signals {
            emit(&self.emitter, None, path, member, (arg0, arg1)).await;
        }
        emit(&self.emitter, None, "/", "Marker", ("", "")).await;
        let seen = seen_until_marker(&mut self.stream).await;
        remove_match(&self.listener, rule).await;
        seen
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_rules_on_arguments_and_paths() {
    let broker = Broker::start();
    let mut bench = MatchBench::new(&broker).await;
    let namespace = [
        ("Same", "/", "com.example.foo", ""),
        ("Child", "/", "com.example.foo.bar", ""),
        ("Prefix", "/", "com.example.foobar", ""),
        ("Parent", "/", "com.example", ""),
    ];
    assert_eq!(
        bench
            .seen_with("arg0namespace='com.example.foo'", &namespace)
            .await,
        ["Same", "Child"]
    );

    // The specification's own examples for argNpath.
    let arg_path = [
        ("Root", "/", "", "/"),
        ("Aa", "/", "", "/aa/"),
        ("Same", "/", "", "/aa/bb/"),
        ("ChildDir", "/", "", "/aa/bb/cc/"),
        ("Child", "/", "", "/aa/bb/cc"),
        ("Partial", "/", "", "/aa/b"),
        ("Short", "/", "", "/aa"),
        ("NoSlash", "/", "", "/aa/bb"),
    ];
    assert_eq!(
        bench.seen_with("arg1path='/aa/bb/'", &arg_path).await,
        ["Root", "Aa", "Same", "ChildDir", "Child"]
    );

    let paths = [
        ("Same", "/org/ex", "", ""),
        ("Below", "/org/ex/sub/deeper", "", ""),
        ("Prefix", "/org/example", "", ""),
        ("Above", "/org", "", ""),
    ];
    assert_eq!(
        bench.seen_with("path_namespace='/org/ex'", &paths).await,
        ["Same", "Below"]
    );
    assert_eq!(
        bench.seen_with("path_namespace='/'", &paths).await,
        ["Same", "Below", "Prefix", "Above"]
    );
    let exact = [
        ("Yes", "/", "x", "y"),
        ("No", "/", "x", "z"),
        ("Neither", "/", "y", "y"),
    ];
    assert_eq!(
        bench
            .seen_with("arg0='x',arg1='y',member='Yes'", &exact)
            .await,
        ["Yes"]
    );
    let exact_no_member = [("Yes", "/", "x", "y"), ("No", "/", "x", "z")];
    assert_eq!(
        bench.seen_with("arg0='x',arg1='y'", &exact_no_member).await,
        ["Yes"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_path_arguments_match_arg_path_rules() {
    let broker = Broker::start();
    let mut bench = MatchBench::new(&broker).await;
    add_match(
        &bench.listener,
        &format!("interface='{TEST_IFACE}',arg0path='/a/'"),
    )
    .await;
    for (member, path) in [("Below", "/a/b"), ("Beside", "/ab")] {
        let arg = zbus::ObjectPath::try_from(path).expect("object path");
        bench
            .emitter
            .emit_signal(None::<&str>, "/", TEST_IFACE, member, &(arg,))
            .await
            .expect("emit");
    }
    emit(&bench.emitter, None, "/", "Marker", ("", "")).await;
    assert_eq!(seen_until_marker(&mut bench.stream).await, ["Below"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_rules_on_senders_destinations_and_eavesdropping() {
    let broker = Broker::start();
    let mut bench = MatchBench::new(&broker).await;
    let other_name = unique(&bench.other);

    // sender= by well-known name matches the signals of the name's owner only.
    let rule = format!("interface='{TEST_IFACE}',sender='org.example.Emitter'");
    add_match(&bench.listener, &rule).await;
    emit(&bench.other, None, "/", "FromOther", ("", "")).await;
    sync(&bench.other).await;
    emit(&bench.emitter, None, "/", "FromOwner", ("", "")).await;
    emit(&bench.emitter, None, "/", "Marker", ("", "")).await;
    assert_eq!(seen_until_marker(&mut bench.stream).await, ["FromOwner"]);
    remove_match(&bench.listener, &rule).await;

    // A signal for someone else reaches the listener only when it asks to eavesdrop.
    let plain = format!("interface='{TEST_IFACE}'");
    add_match(&bench.listener, &plain).await;
    emit(&bench.emitter, Some(&other_name), "/", "Unicast", ("", "")).await;
    emit(&bench.emitter, None, "/", "Marker", ("", "")).await;
    assert_eq!(
        seen_until_marker(&mut bench.stream).await,
        Vec::<String>::new()
    );
    remove_match(&bench.listener, &plain).await;
    let eavesdrop = format!("interface='{TEST_IFACE}',eavesdrop=true,destination='{other_name}'");
    add_match(&bench.listener, &eavesdrop).await;
    emit(&bench.emitter, Some(&other_name), "/", "Unicast", ("", "")).await;
    emit(&bench.emitter, None, "/", "Marker", ("", "")).await;
    assert_eq!(seen_until_marker(&mut bench.stream).await, ["Unicast"]);
    remove_match(&bench.listener, &eavesdrop).await;

    // Removed rules stop matching.
    emit(&bench.emitter, None, "/", "AfterRemoval", ("", "")).await;
    emit(&bench.emitter, None, "/", "Marker", ("", "")).await;
    assert_eq!(
        seen_until_marker(&mut bench.stream).await,
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_and_missing_match_rules_get_their_errors() {
    let broker = Broker::start();
    let me = broker.zbus().await;
    let invalid = [
        "type='nonsense'",
        "arg64='x'",
        "foo='bar'",
        "path='not/a/path'",
        "member='unterminated",
        "path='/a',path_namespace='/b'",
        "path_namespace='/a/'",
        "eavesdrop='maybe'",
        "arg0namespace='a..b'",
        "arg1namespace='com.example'",
        "sender='bad..name'",
        "interface='nodot'",
        "type='signal',type='signal'",
        ",type='signal'",
    ];
    for rule in invalid {
        assert_eq!(
            driver_outcome(&me, DRIVER, "AddMatch", &(rule,)).await,
            "org.freedesktop.DBus.Error.MatchRuleInvalid",
            "AddMatch {rule:?}"
        );
    }
    let valid = [
        "",
        "type='signal',",
        "arg63='x'",
        "arg0='it'\\''s'",
        "arg2path=''",
        "eavesdrop='true'",
        "member=x",
    ];
    for rule in valid {
        assert_eq!(
            driver_outcome(&me, DRIVER, "AddMatch", &(rule,)).await,
            "ok",
            "AddMatch {rule:?}"
        );
    }
    let not_found = "org.freedesktop.DBus.Error.MatchRuleNotFound";
    assert_eq!(
        driver_outcome(&me, DRIVER, "RemoveMatch", &("member='neverAdded'",)).await,
        not_found
    );
    add_match(&me, "member='x',type='signal'").await;
    // The same rule written in another order is the same rule; it goes once.
    remove_match(&me, "type='signal',member='x'").await;
    assert_eq!(
        driver_outcome(&me, DRIVER, "RemoveMatch", &("type='signal',member='x'",)).await,
        not_found
    );
    assert_eq!(
        driver_outcome(&me, DRIVER, "RemoveMatch", &("foo='bar'",)).await,
        "org.freedesktop.DBus.Error.MatchRuleInvalid"
    );
}

/// A service that exchanges pipe ends with its callers.
struct Pipes;

#[zbus::interface(name = "org.example.Pipes")]
impl Pipes {
    /// Writes `text` into the pipe end it is given.
    fn write_into(&self, fd: zbus::OwnedFd, text: String) -> zbus::fdo::Result<u32> {
        let mut file = std::fs::File::from(OwnedFd::from(fd));
        file.write_all(text.as_bytes())
            .map_err(|e| zbus::fdo::Error::IOError(e.to_string()))?;
        Ok(text.len() as u32)
    }

    /// Returns the read end of a fresh pipe that holds `text`.
    fn read_end_holding(&self, text: String) -> zbus::fdo::Result<zbus::OwnedFd> {
        let (read, write) =
            nix::unistd::pipe().map_err(|e| zbus::fdo::Error::IOError(e.to_string()))?;
        std::fs::File::from(write)
            .write_all(text.as_bytes())
            .map_err(|e| zbus::fdo::Error::IOError(e.to_string()))?;
        Ok(zbus::OwnedFd::from(read))
    }
}

fn read_to_end(fd: OwnedFd) -> String {
    let mut text = String::new();
    std::fs::File::from(fd)
        .read_to_string(&mut text)
        .expect("read pipe");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_ends_pass_between_zbus_clients() {
    let broker = Broker::start();
    let service = zbus::connection::Builder::address(broker.client_address().as_str())
        .serve_at("/org/example/Pipes", Pipes)
        .build()
        .await
        .expect("service connects");
    let service_name = unique(&service);
    let caller = broker.zbus().await;

    let (read, write) = nix::unistd::pipe().expect("pipe");
    let body = (zbus::Fd::from(write.as_fd()), "through the bus");
    let reply = caller
        .call_method(
            Some(service_name.as_str()),
            "/org/example/Pipes",
            Some("org.example.Pipes"),
            "WriteInto",
            &body,
        )
        .await
        .expect("WriteInto");
    assert_eq!(reply.body().deserialize::<u32>().expect("u32"), 15);
    drop(write);
    assert_eq!(read_to_end(read), "through the bus");

    let reply = caller
        .call_method(
            Some(service_name.as_str()),
            "/org/example/Pipes",
            Some("org.example.Pipes"),
            "ReadEndHolding",
            &("and back",),
        )
        .await
        .expect("ReadEndHolding");
    let fd: zbus::OwnedFd = reply.body().deserialize().expect("an fd");
    assert_eq!(read_to_end(OwnedFd::from(fd)), "and back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_get_no_reply_when_the_callee_leaves_with_calls_pending() {
    let broker = Broker::start();
    let callee = broker.zbus().await;
    let mut incoming = MessageStream::from(&callee);
    let callee_name = unique(&callee);
    let caller = broker.zbus().await;
    let call = |member: &'static str| {
        let caller = caller.clone();
        let dest = callee_name.clone();
        tokio::spawn(async move {
            caller
                .call_method(
                    Some(dest.as_str()),
                    "/",
                    Some("org.example.Slow"),
                    member,
                    &(),
                )
                .await
        })
    };
    let pending = [call("First"), call("Second")];
    let mut received = 0;
    while received < 2 {
        let msg: Message = within("the calls to arrive", incoming.next())
            .await
            .expect("stream")
            .expect("message");
        if msg.message_type() == zbus::message::Type::MethodCall
            && msg.header().interface().map(|i| i.as_str()) == Some("org.example.Slow")
        {
            received += 1;
        }
    }
    drop(incoming);
    callee.close().await.expect("close callee");
    for task in pending {
        let outcome = within("NoReply", task).await.expect("caller task");
        let err = outcome.expect_err("the callee left without answering");
        assert_eq!(zbus_error_name(&err), "org.freedesktop.DBus.Error.NoReply");
    }
}
