//! The match-rule tests: parsing, then matching.

use super::*;
use std::collections::HashMap;
use zbus::Message;
use zbus::message::Builder;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn parse(text: &str) -> MatchRule {
    match MatchRule::parse(text) {
        Ok(rule) => rule,
        Err(e) => panic!("{text:?} should parse: {e}"),
    }
}

fn parse_err(text: &str) -> MatchRuleError {
    match MatchRule::parse(text) {
        Ok(rule) => panic!("{text:?} should be refused, parsed as {rule:?}"),
        Err(e) => e,
    }
}

fn assert_refused(text: &str, reason: &str) {
    let err = parse_err(text);
    assert!(
        err.to_string().contains(reason),
        "{text:?}: {err} lacks {reason:?}"
    );
    assert!(!err.too_long(), "{text:?} is refused as too long");
}

fn args(rule: &MatchRule) -> Vec<(u8, ArgKind, &str)> {
    rule.args
        .iter()
        .map(|a| (a.index, a.kind, a.value.as_str()))
        .collect()
}

fn no_owner(_: &str) -> Option<&'static str> {
    None
}

const NO_NAMES: MatchContext<'static> = MatchContext {
    owner_of: &no_owner,
    destination_unique: None,
};

fn matches(rule: &str, msg: &Message) -> bool {
    parse(rule).matches(msg, &NO_NAMES)
}

fn signal() -> Builder<'static> {
    Message::signal("/a/b", "com.example.Iface", "Changed").sender(":1.5")
}

fn signal_with<B>(body: &B) -> zbus::Result<Message>
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    signal().build(body)
}

// --- parsing ---

#[test]
fn empty_and_blank_rules_match_everything() -> TestResult {
    let msg = signal().build(&())?;
    for text in ["", "   ", " \t\r\n"] {
        assert_eq!(parse(text), MatchRule::default());
        assert!(parse(text).matches(&msg, &NO_NAMES));
    }
    Ok(())
}

#[test]
fn every_key_is_parsed() {
    let rule = parse(
        "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',\
         member='Foo',path='/bar/foo',destination=':452345.34',arg2='bar',arg3path='/x/',\
         arg0namespace='com.example',eavesdrop='true'",
    );
    assert_eq!(rule.msg_type(), Some(Type::Signal));
    assert_eq!(rule.sender(), Some("org.freedesktop.DBus"));
    assert_eq!(rule.interface(), Some("org.freedesktop.DBus"));
    assert_eq!(rule.member(), Some("Foo"));
    assert_eq!(rule.path(), Some("/bar/foo"));
    assert_eq!(rule.path_namespace(), None);
    assert_eq!(rule.destination(), Some(":452345.34"));
    assert!(rule.eavesdrop());
    assert_eq!(
        args(&rule),
        [
            (0, ArgKind::Namespace, "com.example"),
            (2, ArgKind::Str, "bar"),
            (3, ArgKind::Path, "/x/"),
        ]
    );
    let ns = parse("path_namespace='/com/example'");
    assert_eq!(ns.path_namespace(), Some("/com/example"));
    assert_eq!(ns.path(), None);
}

#[test]
fn every_message_type() {
    for (text, t) in [
        ("signal", Type::Signal),
        ("method_call", Type::MethodCall),
        ("method_return", Type::MethodReturn),
        ("error", Type::Error),
    ] {
        assert_eq!(parse(&format!("type='{text}'")).msg_type(), Some(t));
        assert_eq!(parse(&format!("type={text}")).msg_type(), Some(t));
    }
}

#[test]
fn spec_quoting_examples() {
    let quoted = parse(r"arg0=''\''',arg1='\',arg2=',',arg3='\\'");
    let bare = parse(r"arg0=\',arg1=\,arg2=',',arg3=\\");
    let want = [
        (0, ArgKind::Str, "'"),
        (1, ArgKind::Str, "\\"),
        (2, ArgKind::Str, ","),
        (3, ArgKind::Str, "\\\\"),
    ];
    assert_eq!(args(&quoted), want);
    assert_eq!(args(&bare), want);
    assert_eq!(quoted, bare);
}

#[test]
fn quoting_edge_cases() {
    let cases = [
        ("arg0=''", ""),
        ("arg0=", ""),
        ("arg0='a'b'c'", "abc"),
        ("arg0=a'b,c'd", "ab,cd"),
        ("arg0=a b", "a b"),
        ("arg0= x", " x"),
        (r"arg0='it'\''s'", "it's"),
        (r"arg0=\\'x", "\\'x"),
        (r"arg0=a\b", "a\\b"),
        (r"arg0='\'", "\\"),
        ("arg0='='", "="),
        ("arg0==", "="),
        ("arg0=é'ü'", "éü"),
    ];
    for (text, value) in cases {
        assert_eq!(args(&parse(text)), [(0, ArgKind::Str, value)], "{text}");
    }
}

#[test]
fn whitespace_between_clauses_and_trailing_comma() {
    let want = parse("type='signal',member='Foo'");
    for text in [
        "  type='signal',  member='Foo'",
        "type='signal',\tmember='Foo'",
        "type ='signal',member\t='Foo'",
        "type='signal',member='Foo',",
        "type='signal',member='Foo', ",
    ] {
        assert_eq!(parse(text), want, "{text}");
    }
    // After '=' everything is value, as in dbus-daemon: a space before a comma too.
    assert_refused("type='signal' ,member='Foo'", "not a message type");
    assert_refused("type= 'signal'", "not a message type");
    assert_refused("member='Foo' ", "'Foo ' is not a valid member name");
}

#[test]
fn leading_zeros_in_arg_numbers() {
    assert_eq!(parse("arg01='x'"), parse("arg1='x'"));
    assert_eq!(args(&parse("arg063path='/'")), [(63, ArgKind::Path, "/")]);
}

#[test]
fn eavesdrop_may_repeat_and_the_last_wins() {
    assert!(parse("eavesdrop='false',eavesdrop='true'").eavesdrop());
    assert!(!parse("eavesdrop='true',eavesdrop='false'").eavesdrop());
    assert!(!parse("eavesdrop=false").eavesdrop());
}

#[test]
fn invalid_syntax() {
    assert_refused("type", "not followed by '='");
    assert_refused("type 'signal'", "not followed by '='");
    assert_refused("ty pe='signal'", "not followed by '='");
    assert_refused("='signal'", "empty key");
    assert_refused(" ='x'", "empty key");
    assert_refused("type='signal", "unbalanced quotation marks");
    assert_refused("arg0='a''", "unbalanced quotation marks");
    assert_refused(r"arg0='\''", "unbalanced quotation marks");
    assert_refused("type='signal',,member='Foo'", "unknown key ',member'");
    assert_refused(",", "key ',' in match rule is not followed by '='");
    assert_refused("foo='bar'", "unknown key 'foo'");
    assert_refused("Type='signal'", "unknown key 'Type'");
}

#[test]
fn invalid_values() {
    assert_refused("type='Signal'", "not a message type");
    assert_refused("type=''", "not a message type");
    assert_refused("sender='foo'", "not a valid bus name for key 'sender'");
    assert_refused("sender=':'", "not a valid bus name");
    assert_refused("sender='org..foo'", "not a valid bus name");
    assert_refused("interface='foo'", "not a valid interface name");
    assert_refused("interface='org.foo-bar'", "not a valid interface name");
    assert_refused("member='Foo.Bar'", "not a valid member name");
    assert_refused("member='1Foo'", "not a valid member name");
    assert_refused("member=''", "not a valid member name");
    assert_refused("path='foo'", "not a valid object path for key 'path'");
    assert_refused("path='/foo/'", "not a valid object path");
    assert_refused("path_namespace='/a//b'", "not a valid object path");
    assert_refused(
        "destination='x'",
        "not a valid bus name for key 'destination'",
    );
    assert_refused("eavesdrop='yes'", "should be 'true' or 'false'");
    assert_refused("eavesdrop='TRUE'", "should be 'true' or 'false'");
}

#[test]
fn invalid_arg_keys() {
    assert_refused("arg='x'", "no argument number");
    assert_refused("argpath='x'", "no argument number");
    assert_refused("argx='x'", "no argument number");
    assert_refused("arg64='x'", "above the maximum of 63");
    assert_refused("arg99999999999999999999='x'", "above the maximum of 63");
    assert_refused("arg1foo='x'", "junk after its argument number");
    assert_refused("arg1namespace='x'", "junk after its argument number");
    assert_refused("arg00namespace='x'", "junk after its argument number");
    assert_refused("arg1Path='x'", "junk after its argument number");
    assert_refused("arg-1='x'", "no argument number");
}

#[test]
fn invalid_name_namespaces() {
    for bad in [
        "",
        "com..example",
        "com.example.",
        ".com",
        "1com",
        "com.1x",
        "a b",
        ":",
    ] {
        assert_refused(
            &format!("arg0namespace='{bad}'"),
            "not a valid bus name namespace",
        );
    }
    let long = "a".repeat(MAX_NAME_LEN + 1);
    assert_refused(&format!("arg0namespace={long}"), "bus name namespace");
    let longest = "a".repeat(MAX_NAME_LEN);
    for good in ["com", "com.example", "_a-b.c9", ":1.5", &longest] {
        let rule = parse(&format!("arg0namespace='{good}'"));
        assert_eq!(args(&rule), [(0, ArgKind::Namespace, good)]);
    }
}

#[test]
fn duplicate_keys_are_refused() {
    for key in [
        "type='signal'",
        "sender=':1.1'",
        "interface='a.b'",
        "member='M'",
    ] {
        assert_refused(&format!("{key},{key}"), "given more than once");
    }
    assert_refused(
        "destination=':1.1',destination=':1.2'",
        "given more than once",
    );
    assert_refused("path='/a',path='/a'", "more than once");
    assert_refused("path='/a',path_namespace='/a'", "may not be combined");
    assert_refused("path_namespace='/a',path='/b'", "may not be combined");
    assert_refused("path_namespace='/',path_namespace='/'", "more than once");
    assert_refused("arg1='a',arg1='b'", "argument 1 is matched more than once");
    assert_refused(
        "arg1='a',arg1path='/'",
        "argument 1 is matched more than once",
    );
    assert_refused(
        "arg0namespace='a',arg0='a'",
        "argument 0 is matched more than once",
    );
    assert_refused(
        "arg0='a',arg0namespace='a'",
        "argument 0 is matched more than once",
    );
    assert_refused("arg1='a',arg01='b'", "argument 1 is matched more than once");
}

#[test]
fn overlong_rules_exceed_limits() {
    let rule = format!("arg0='{}'", "x".repeat(MAX_RULE_LEN));
    let err = parse_err(&rule);
    assert!(
        err.too_long(),
        "an over-long rule is not refused as too long"
    );
    assert!(err.to_string().contains("maximum is 1024"), "{err}");
    let longest = format!("arg0='{}'", "x".repeat(MAX_RULE_LEN - 7));
    assert_eq!(longest.len(), MAX_RULE_LEN);
    assert!(MatchRule::parse(&longest).is_ok());
}

#[test]
fn equality_is_of_the_parsed_rule() {
    let base = parse("type='signal',member='Foo',arg0='x',arg2path='/a/'");
    for same in [
        "member='Foo',type='signal',arg2path='/a/',arg0='x'",
        "type=signal,member=Foo,arg0=x,arg2path=/a/",
        "type='signal',member='Foo',arg0='x',arg2path='/a/',eavesdrop='false'",
        " type='signal', member='F''oo', arg0='x', arg2path='/a/',",
    ] {
        assert_eq!(parse(same), base, "{same}");
    }
    for different in [
        "type='signal',member='Foo',arg0='x',arg2='/a/'",
        "type='signal',member='Foo',arg0='x',arg2path='/a/',eavesdrop='true'",
        "type='signal',member='Foo',arg0='x'",
        "type='method_call',member='Foo',arg0='x',arg2path='/a/'",
        "type='signal',member='Foo',arg0='x',arg3path='/a/'",
    ] {
        assert_ne!(parse(different), base, "{different}");
    }
    assert_ne!(parse("path='/a'"), parse("path_namespace='/a'"));
    assert_ne!(parse("arg0='a'"), parse("arg0namespace='a'"));
}

// --- matching ---

#[test]
fn type_clause() -> TestResult {
    let call = Message::method_call("/a", "Do").sender(":1.5").build(&())?;
    let header = call.header();
    let reply = Message::method_return(&header).sender(":1.6").build(&())?;
    let error = Message::error(&header, "org.example.Error.Failed")
        .sender(":1.6")
        .build(&())?;
    let sig = signal().build(&())?;
    let all = [
        ("method_call", &call),
        ("method_return", &reply),
        ("error", &error),
        ("signal", &sig),
    ];
    for (want, _) in all {
        for (is, msg) in all {
            let rule = format!("type='{want}'");
            assert_eq!(matches(&rule, msg), want == is, "{rule} on {is}");
        }
    }
    Ok(())
}

#[test]
fn sender_clause_by_unique_and_well_known_name() -> TestResult {
    let msg = signal().build(&())?;
    let owners = HashMap::from([("com.example.Owned", ":1.5"), ("com.example.Other", ":1.9")]);
    let owner_of = |name: &str| owners.get(name).copied();
    let ctx = MatchContext {
        owner_of: &owner_of,
        destination_unique: None,
    };
    assert!(parse("sender=':1.5'").matches(&msg, &ctx));
    assert!(!parse("sender=':1.6'").matches(&msg, &ctx));
    assert!(parse("sender='com.example.Owned'").matches(&msg, &ctx));
    assert!(!parse("sender='com.example.Other'").matches(&msg, &ctx));
    assert!(!parse("sender='com.example.Unowned'").matches(&msg, &ctx));
    assert!(!parse("sender='com.example.Owned'").matches(&msg, &NO_NAMES));
    Ok(())
}

#[test]
fn sender_clause_for_the_bus_itself() -> TestResult {
    let from_bus = Message::signal("/org/freedesktop/DBus", "org.freedesktop.DBus", "X")
        .sender("org.freedesktop.DBus")
        .build(&())?;
    assert!(matches("sender='org.freedesktop.DBus'", &from_bus));
    assert!(!matches("sender=':1.5'", &from_bus));
    assert!(!matches(
        "sender='org.freedesktop.DBus'",
        &signal().build(&())?
    ));
    let anonymous = Message::signal("/a", "a.b", "C").build(&())?;
    assert!(!matches("sender=':1.5'", &anonymous));
    assert!(matches("member='C'", &anonymous));
    Ok(())
}

#[test]
fn interface_and_member_clauses() -> TestResult {
    let msg = signal().build(&())?;
    assert!(matches("interface='com.example.Iface'", &msg));
    assert!(!matches("interface='com.example.Other'", &msg));
    assert!(matches("member='Changed'", &msg));
    assert!(!matches("member='changed'", &msg));
    // "If a message omits the interface header, it must not match any rule that specifies
    // this key."
    let bare_call = Message::method_call("/a", "Changed")
        .sender(":1.5")
        .build(&())?;
    assert!(!matches("interface='com.example.Iface'", &bare_call));
    assert!(matches("member='Changed'", &bare_call));
    Ok(())
}

#[test]
fn path_clause() -> TestResult {
    let msg = signal().build(&())?;
    assert!(matches("path='/a/b'", &msg));
    assert!(!matches("path='/a'", &msg));
    assert!(!matches("path='/a/b/c'", &msg));
    Ok(())
}

#[test]
fn path_namespace_clause() -> TestResult {
    let cases = [
        ("/", "/", true),
        ("/", "/a", true),
        ("/", "/a/b/c", true),
        ("/a/b", "/a/b", true),
        ("/a/b", "/a/b/c", true),
        ("/a/b", "/a/b/c/d", true),
        ("/a/b", "/a/bc", false),
        ("/a/b", "/a", false),
        ("/a/b", "/", false),
        ("/com/example/foo", "/com/example/foo/bar", true),
        ("/com/example/foo", "/com/example/foobar", false),
    ];
    for (namespace, path, want) in cases {
        let msg = Message::signal(path, "a.b", "C")
            .sender(":1.5")
            .build(&())?;
        let rule = format!("path_namespace='{namespace}'");
        assert_eq!(matches(&rule, &msg), want, "{rule} on {path}");
    }
    Ok(())
}

#[test]
fn destination_clause() -> TestResult {
    let to_unique = signal().destination(":1.7").build(&())?;
    let to_name = signal().destination("com.example.Svc").build(&())?;
    let broadcast = signal().build(&())?;
    assert!(matches("destination=':1.7'", &to_unique));
    assert!(!matches("destination=':1.8'", &to_unique));
    assert!(!matches("destination=':1.7'", &broadcast));
    assert!(matches("destination='com.example.Svc'", &to_name));
    // A well-known DESTINATION matches the unique name of its owner, if the bus says.
    assert!(!matches("destination=':1.7'", &to_name));
    let owner_of = |name: &str| (name == "com.example.Svc").then_some(":1.7");
    let ctx = MatchContext {
        owner_of: &owner_of,
        destination_unique: Some(":1.7"),
    };
    assert!(parse("destination=':1.7'").matches(&to_name, &ctx));
    assert!(!parse("destination=':1.8'").matches(&to_name, &ctx));
    // A well-known rule destination matches messages to its owner, by any name.
    assert!(parse("destination='com.example.Svc'").matches(&to_unique, &ctx));
    assert!(!parse("destination='com.example.Nobody'").matches(&to_unique, &ctx));
    assert!(!parse("destination='com.example.Svc'").matches(&broadcast, &ctx));
    Ok(())
}

#[test]
fn arg_clause_needs_an_equal_string() -> TestResult {
    let msg = signal_with(&("zero", 1u32, "two", zbus::ObjectPath::try_from("/three")?))?;
    assert!(matches("arg0='zero'", &msg));
    assert!(matches("arg0=zero,arg2=two", &msg));
    assert!(matches("arg2='two',arg0='zero'", &msg));
    assert!(!matches("arg0='zer'", &msg));
    assert!(!matches("arg0='zero '", &msg));
    assert!(!matches("arg0='zero',arg2='three'", &msg));
    assert!(!matches("arg1='1'", &msg));
    // Only STRING arguments match argN, not OBJECT_PATH ones.
    assert!(!matches("arg3='/three'", &msg));
    assert!(!matches("arg4=''", &msg));
    assert!(!matches("arg63=''", &msg));
    assert!(!matches("arg0=''", &signal().build(&())?));
    Ok(())
}

#[test]
fn arg_clause_reads_big_endian_bodies() -> TestResult {
    let msg = signal()
        .endian(zbus::wire::Endian::Big)
        .build(&(vec![1u64], "needle"))?;
    assert!(matches("arg1='needle'", &msg));
    assert!(!matches("arg1='needles'", &msg));
    Ok(())
}

#[test]
fn arg_path_spec_examples() -> TestResult {
    let cases = [
        ("/", true),
        ("/aa/", true),
        ("/aa/bb/", true),
        ("/aa/bb/cc/", true),
        ("/aa/bb/cc", true),
        ("/aa/b", false),
        ("/aa", false),
        ("/aa/bb", false),
    ];
    for (arg, want) in cases {
        let as_string = signal_with(&(arg,))?;
        assert_eq!(matches("arg0path='/aa/bb/'", &as_string), want, "{arg}");
        // Object paths cannot end in '/' unless they are "/", so only some are buildable.
        if let Ok(path) = zbus::ObjectPath::try_from(arg) {
            let as_path = signal_with(&(path,))?;
            assert_eq!(matches("arg0path='/aa/bb/'", &as_path), want, "{arg}");
        }
    }
    Ok(())
}

#[test]
fn arg_path_dconf_example_and_edges() -> TestResult {
    let rule = "arg0path='/ca/example/foo/'";
    assert!(matches(rule, &signal_with(&("/ca/example/foo/bar",))?));
    assert!(matches(rule, &signal_with(&("/ca/example/",))?));
    assert!(!matches(rule, &signal_with(&("/ca/example/foobar",))?));
    // Without a trailing '/' in the rule, only equality or an argument prefix with '/'.
    assert!(matches("arg1path='/a/b'", &signal_with(&(0u8, "/a/b"))?));
    assert!(matches("arg1path='/a/b'", &signal_with(&(0u8, "/a/"))?));
    assert!(!matches("arg1path='/a/b'", &signal_with(&(0u8, "/a/b/c"))?));
    assert!(matches("arg0path=''", &signal_with(&("",))?));
    assert!(!matches("arg0path='/'", &signal_with(&("",))?));
    assert!(!matches("arg0path='/'", &signal_with(&(1u32,))?));
    Ok(())
}

#[test]
fn arg0namespace_clause() -> TestResult {
    let rule = "member='Changed',arg0namespace='com.example.backend1'";
    let cases = [
        ("com.example.backend1", true),
        ("com.example.backend1.foo", true),
        ("com.example.backend1.foo.bar", true),
        ("com.example.backend10", false),
        ("com.example.backend", false),
        ("com.example", false),
        ("org.example.backend1", false),
    ];
    for (arg, want) in cases {
        assert_eq!(matches(rule, &signal_with(&(arg, ""))?), want, "{arg}");
    }
    assert!(matches("arg0namespace='com'", &signal_with(&("com.x",))?));
    assert!(!matches("arg0namespace='com'", &signal_with(&("comx",))?));
    let path = zbus::ObjectPath::try_from("/com")?;
    assert!(!matches("arg0namespace='com'", &signal_with(&(path,))?));
    Ok(())
}

#[test]
fn eavesdrop_does_not_change_matching() -> TestResult {
    let unicast = signal().destination(":1.7").build(&())?;
    let broadcast = signal().build(&())?;
    for rule in ["", "eavesdrop='true'", "eavesdrop='false'"] {
        assert!(matches(rule, &unicast), "{rule}");
        assert!(matches(rule, &broadcast), "{rule}");
    }
    Ok(())
}

#[test]
fn every_clause_must_hold() -> TestResult {
    let msg = signal_with(&("com.example.A", "/x/y"))?;
    let full = "type='signal',sender=':1.5',interface='com.example.Iface',member='Changed',\
                path_namespace='/a',arg0namespace='com.example',arg1path='/x/'";
    assert!(matches(full, &msg));
    for (from, to) in [
        ("'signal'", "'error'"),
        ("':1.5'", "':1.6'"),
        ("Iface", "Other"),
        ("Changed", "Other"),
        ("'/a'", "'/b'"),
        ("com.example'", "com.other'"),
        ("'/x/'", "'/z/'"),
    ] {
        let broken = full.replacen(from, to, 1);
        assert_ne!(broken, full);
        assert!(!matches(&broken, &msg), "{broken}");
    }
    Ok(())
}

#[test]
fn a_rule_written_out_parses_back_to_itself() {
    for text in [
        "",
        "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged'",
        "path_namespace='/a/b',arg0namespace='com.example',arg2path='/x/',eavesdrop='true'",
        "type='method_call',destination=':1.5',path='/p',arg1='it''s'",
        r"arg0=\',arg3='\\'",
    ] {
        let rule = MatchRule::parse(text).unwrap();
        let written = rule.to_string();
        assert_eq!(
            MatchRule::parse(&written).unwrap(),
            rule,
            "{text} wrote {written}"
        );
    }
}
