use std::collections::HashSet;

use super::*;

#[test]
fn each_method_is_in_the_table_once() {
    let mut seen = HashSet::new();
    for interface in INTERFACES {
        for method in interface.methods {
            assert!(
                seen.insert((interface.name, method.name)),
                "{}.{} twice",
                interface.name,
                method.name
            );
        }
    }
    assert_eq!(seen.len(), 33);
}

#[test]
fn the_list_of_interface_names_is_the_tables() {
    let in_table: Vec<&str> = INTERFACES.iter().map(|i| i.name).collect();
    assert_eq!(in_table, support::INTERFACE_NAMES);
}

#[test]
fn a_call_without_an_interface_is_for_the_drivers_own() {
    let method = find_method(None, "GetId", "/").ok().map(|m| m.name);
    assert_eq!(method, Some("GetId"));
    let ping = find_method(None, "Ping", DRIVER_PATH).err();
    assert_eq!(
        ping.as_ref().map(|e| e.name().to_string()),
        Some("org.freedesktop.DBus.Error.UnknownMethod".to_string())
    );
}

#[test]
fn a_wrong_path_is_told_before_a_wrong_member() {
    let e = find_method(Some(STATS_IFACE), "NoSuchMethod", "/").err();
    assert_eq!(
        e.map(|e| (e.name().to_string(), e.text().to_owned())),
        Some((
            "org.freedesktop.DBus.Error.UnknownInterface".to_string(),
            format!("{DRIVER} does not understand interface {STATS_IFACE} at path /")
        ))
    );
}

#[test]
fn an_over_long_rule_exceeds_limits_and_any_other_bad_rule_is_invalid() {
    let long = format!("arg0='{}'", "x".repeat(2048));
    let bad_rules = [
        (long.as_str(), "org.freedesktop.DBus.Error.LimitsExceeded"),
        (
            "type='bogus'",
            "org.freedesktop.DBus.Error.MatchRuleInvalid",
        ),
    ];
    for (rule, expected) in bad_rules {
        let error = crate::match_rule::MatchRule::parse(rule)
            .err()
            .map(dbus::rule_error);
        assert_eq!(
            error.map(|e| e.name().to_string()),
            Some(expected.to_string())
        );
    }
}
