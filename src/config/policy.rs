//! The `<policy>` rules of a bus configuration, and their evaluation with
//! dbus-daemon's semantics (`bus/policy.c`).
//!
//! A connection's rules are, in this order: every `context="default"`
//! policy, the policies of each group the connection's user is in, the
//! policies of that user, the `at_console="false"` policies (nobody is "at
//! the console" here: that needs pam_console, which Debian never had), and
//! every `context="mandatory"` policy. Policies of one kind keep their file
//! order. The last matching rule decides; when none matches, the answer is
//! "no".

use std::collections::BTreeMap;

use zbus::message::Type;

/// The most file descriptors a message can carry (dbus-daemon's
/// `DBUS_MAXIMUM_MESSAGE_UNIX_FDS`), the default `max_fds` of a rule.
pub const MAX_MESSAGE_UNIX_FDS: u32 = 1 << 25;

/// Every `<policy>` of a configuration, sorted by whom it applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Rules of `context="default"` policies, in file order.
    pub(super) default: Vec<Rule>,
    /// Rules of `group="..."` policies, by group id, in file order.
    pub(super) groups: BTreeMap<u32, Vec<Rule>>,
    /// Rules of `user="..."` policies, by user id, in file order.
    pub(super) users: BTreeMap<u32, Vec<Rule>>,
    /// Rules of `at_console="false"` policies, which apply to everyone.
    pub(super) not_at_console: Vec<Rule>,
    /// Rules of `context="mandatory"` policies, in file order.
    pub(super) mandatory: Vec<Rule>,
}

/// One `<allow>` or `<deny>` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `true` for `<allow>`, `false` for `<deny>`.
    pub allow: bool,
    /// `log="true"`: a message this rule decides should be logged.
    pub log: bool,
    pub kind: RuleKind,
}

/// What a rule is about; each kind is checked at a different moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleKind {
    /// `send_*` attributes: checked when a connection sends a message.
    Send(MessageRule),
    /// `receive_*` attributes, or `eavesdrop` alone: checked for each
    /// connection a message is delivered to.
    Receive(MessageRule),
    /// `own` or `own_prefix`: checked on `RequestName`.
    Own(NameMatch),
    /// `user`: checked when a connection is established. `None` is `"*"`.
    User(Option<u32>),
    /// `group`: checked when a connection is established. `None` is `"*"`.
    Group(Option<u32>),
}

/// A bus name pattern of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameMatch {
    /// The attribute was absent or `"*"`.
    Any,
    /// Exactly this name.
    Exact(String),
    /// This name or any name below it: `a.b` matches `a.b` and `a.b.c`, not `a.bc`.
    Prefix(String),
}

/// The message attributes of a send or receive rule. `None` and
/// [`NameMatch::Any`] stand for an absent attribute or `"*"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRule {
    pub message_type: Option<Type>,
    pub path: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    pub error: Option<String>,
    /// `send_destination`/`send_destination_prefix` of a send rule,
    /// `receive_sender` of a receive rule.
    pub peer: NameMatch,
    /// `send_broadcast`: `Some(true)` matches only messages without a
    /// destination, `Some(false)` only messages with one.
    pub broadcast: Option<bool>,
    pub eavesdrop: bool,
    /// `*_requested_reply`, with its default applied (`true` for `<allow>`,
    /// `false` for `<deny>`).
    pub requested_reply: bool,
    pub min_fds: u32,
    pub max_fds: u32,
}

/// What the policy looks at in one message.
#[derive(Debug, Clone, Copy)]
pub struct MessageFacts<'a> {
    pub message_type: Type,
    pub path: Option<&'a str>,
    pub interface: Option<&'a str>,
    pub member: Option<&'a str>,
    pub error_name: Option<&'a str>,
    pub destination: Option<&'a str>,
    pub sender: Option<&'a str>,
    /// The message carries a `REPLY_SERIAL`.
    pub is_reply: bool,
    /// It is a reply that the bus expects (a call asked for it and has not
    /// been answered yet).
    pub requested_reply: bool,
    pub unix_fds: u32,
}

/// The connection at the other end of a transfer.
#[derive(Debug, Clone, Copy)]
pub enum Party<'a> {
    /// The bus itself (`org.freedesktop.DBus`), or no connection yet (a
    /// broadcast before its recipients are known): a rule's name is then
    /// compared with the message's destination or sender field.
    Bus,
    /// A client connection, with its unique name and every well-known name
    /// it owns or is queued for.
    Peer(&'a [String]),
}

/// The outcome of a send or receive check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The deciding rule asked for the message to be logged.
    pub log: bool,
    /// How many rules matched (dbus-daemon reports it when it denies).
    pub matched_rules: u32,
}

impl Policy {
    /// May a connection of user `uid`, in groups `gids`, own `name`?
    pub fn check_own(&self, name: &str, uid: u32, gids: &[u32]) -> bool {
        self.rules_for(uid, gids)
            .fold(false, |allowed, rule| match &rule.kind {
                RuleKind::Own(pattern) if pattern.matches(name) => rule.allow,
                _ => allowed,
            })
    }

    /// May a connection of user `uid`, in groups `gids`, connect at all?
    /// Only the default and mandatory policies count; without a matching
    /// `user`/`group` rule, only the user the bus runs as (`bus_uid`) may.
    pub fn check_connect(&self, uid: u32, gids: &[u32], bus_uid: u32) -> bool {
        let rules = self.default.iter().chain(&self.mandatory);
        rules.fold(uid == bus_uid, |allowed, rule| match rule.kind {
            RuleKind::User(who) if who.is_none_or(|who| who == uid) => rule.allow,
            RuleKind::Group(which) if which.is_none_or(|gid| gids.contains(&gid)) => rule.allow,
            _ => allowed,
        })
    }

    /// May the connection of user `uid`, in groups `gids`, send `message` to
    /// `receiver`? dbus-daemon checks a broadcast once with
    /// [`Party::Bus`] as the receiver, then again for each recipient.
    pub fn check_send(
        &self,
        uid: u32,
        gids: &[u32],
        message: &MessageFacts<'_>,
        receiver: Party<'_>,
    ) -> Verdict {
        self.decide(uid, gids, |rule| match &rule.kind {
            RuleKind::Send(send) => send.matches_send(rule.allow, message, receiver),
            _ => false,
        })
    }

    /// May the connection of user `uid`, in groups `gids`, receive `message`
    /// from `sender`? `eavesdropping` is true when the message is addressed
    /// to someone else and reaches this connection only through a match rule.
    pub fn check_receive(
        &self,
        uid: u32,
        gids: &[u32],
        message: &MessageFacts<'_>,
        sender: Party<'_>,
        eavesdropping: bool,
    ) -> Verdict {
        self.decide(uid, gids, |rule| match &rule.kind {
            RuleKind::Receive(receive) => {
                receive.matches_receive(rule.allow, message, sender, eavesdropping)
            }
            _ => false,
        })
    }

    /// Whether every message may be sent and received, eavesdropping included, whoever sends
    /// it: no `<deny>` about messages anywhere, and catch-all `<allow>`s of both kinds in the
    /// default context (as the stock session configuration has). The bus then skips the
    /// per-message checks.
    pub fn allows_all_messages(&self) -> bool {
        let everything = |rule: &MessageRule| {
            rule.message_type.is_none()
                && rule.path.is_none()
                && rule.interface.is_none()
                && rule.member.is_none()
                && rule.error.is_none()
                && rule.peer == NameMatch::Any
                && rule.broadcast.is_none()
                && rule.eavesdrop
                && rule.min_fds == 0
                && rule.max_fds >= MAX_MESSAGE_UNIX_FDS
        };
        let no_message_deny = self.rules_for_anyone().all(|rule| {
            rule.allow || !matches!(rule.kind, RuleKind::Send(_) | RuleKind::Receive(_))
        });
        let allows = |send: bool| {
            self.default.iter().any(|rule| match &rule.kind {
                RuleKind::Send(m) if send => rule.allow && everything(m),
                RuleKind::Receive(m) if !send => rule.allow && everything(m),
                _ => false,
            })
        };
        no_message_deny && allows(true) && allows(false)
    }

    /// Every rule of every context.
    fn rules_for_anyone(&self) -> impl Iterator<Item = &Rule> {
        self.default
            .iter()
            .chain(self.groups.values().flatten())
            .chain(self.users.values().flatten())
            .chain(&self.not_at_console)
            .chain(&self.mandatory)
    }

    /// Applies the connection's rules in order; the last one that `applies`
    /// wins.
    fn decide(&self, uid: u32, gids: &[u32], applies: impl Fn(&Rule) -> bool) -> Verdict {
        let initial = Verdict {
            allowed: false,
            log: false,
            matched_rules: 0,
        };
        self.rules_for(uid, gids)
            .filter(|rule| applies(rule))
            .fold(initial, |verdict, rule| Verdict {
                allowed: rule.allow,
                log: rule.log,
                matched_rules: verdict.matched_rules + 1,
            })
    }

    /// The rules that apply to a connection, in dbus-daemon's order.
    fn rules_for<'a>(&'a self, uid: u32, gids: &'a [u32]) -> impl Iterator<Item = &'a Rule> {
        let groups = self
            .groups
            .iter()
            .filter(move |(gid, _)| gids.contains(gid))
            .flat_map(|(_, rules)| rules);
        let user = self.users.get(&uid).into_iter().flatten();
        self.default
            .iter()
            .chain(groups)
            .chain(user)
            .chain(&self.not_at_console)
            .chain(&self.mandatory)
    }
}

impl NameMatch {
    /// Does `name` match this pattern?
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => name == exact,
            Self::Prefix(prefix) => name
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.')),
        }
    }

    /// Does the pattern match the party? A client matches through any of
    /// its names; the bus through the name written in the message.
    fn matches_party(&self, party: Party<'_>, name_in_message: Option<&str>) -> bool {
        match (self, party) {
            (Self::Any, _) => true,
            (_, Party::Bus) => name_in_message.is_some_and(|name| self.matches(name)),
            (_, Party::Peer(names)) => names.iter().any(|name| self.matches(name)),
        }
    }
}

impl MessageRule {
    /// Does this rule of an `<allow>` (`allow`) or `<deny>` match sending
    /// `message` to `receiver`?
    fn matches_send(&self, allow: bool, message: &MessageFacts<'_>, receiver: Party<'_>) -> bool {
        self.matches_reply_state(allow, message)
            && self.matches_fields(allow, message)
            && self.matches_broadcast(message)
            && self.peer.matches_party(receiver, message.destination)
    }

    /// Does this rule of an `<allow>` (`allow`) or `<deny>` match `message`
    /// reaching its receiver from `sender`?
    fn matches_receive(
        &self,
        allow: bool,
        message: &MessageFacts<'_>,
        sender: Party<'_>,
        eavesdropping: bool,
    ) -> bool {
        // An <allow> lets an eavesdropper through only with eavesdrop="true";
        // a <deny eavesdrop="true"> stops eavesdroppers only.
        let eavesdrop_matches = if allow {
            self.eavesdrop || !eavesdropping
        } else {
            !self.eavesdrop || eavesdropping
        };
        eavesdrop_matches
            && self.matches_reply_state(allow, message)
            && self.matches_fields(allow, message)
            && self.peer.matches_party(sender, message.sender)
    }

    /// For replies: an `<allow>` with `requested_reply="true"` (its default)
    /// passes only expected replies, unless it also says `eavesdrop="true"`;
    /// a `<deny>` with `requested_reply="false"` (its default) stops only
    /// unexpected ones.
    fn matches_reply_state(&self, allow: bool, message: &MessageFacts<'_>) -> bool {
        if !message.is_reply {
            return true;
        }
        if allow {
            message.requested_reply || !self.requested_reply || self.eavesdrop
        } else {
            !message.requested_reply || self.requested_reply
        }
    }

    /// Type, path, interface, member, error name and fd count. As in
    /// dbus-daemon, a message without the path, member or error field
    /// matches a rule naming one; a message without an interface matches a
    /// `<deny>` naming one but never an `<allow>`.
    fn matches_fields(&self, allow: bool, message: &MessageFacts<'_>) -> bool {
        let field = |rule: &Option<String>, value: Option<&str>| match (rule, value) {
            (Some(rule), Some(value)) => rule == value,
            _ => true,
        };
        let interface = match (&self.interface, message.interface) {
            (None, _) => true,
            (Some(_), None) => !allow,
            (Some(rule), Some(value)) => rule == value,
        };
        self.message_type
            .is_none_or(|kind| kind == message.message_type)
            && field(&self.path, message.path)
            && interface
            && field(&self.member, message.member)
            && field(&self.error, message.error_name)
            && (self.min_fds..=self.max_fds).contains(&message.unix_fds)
    }

    fn matches_broadcast(&self, message: &MessageFacts<'_>) -> bool {
        self.broadcast
            .is_none_or(|broadcast| broadcast == message.destination.is_none())
    }
}

/// Rules read from XML through the configuration's own loader (the `parse` and `stock` helpers
/// of the configuration's tests), as the bus reads them, and what the policy then decides.
#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::policy;
    use crate::config::tests::{parse, stock};
    use crate::config::{Limits, SYSTEM_SERVICEDIRS};

    fn rules_of(body: &str) -> Vec<Rule> {
        let config = parse(&format!("<policy context=\"default\">{body}</policy>")).unwrap();
        config.policy.default
    }

    fn send_rule(rule: &Rule) -> &MessageRule {
        match &rule.kind {
            RuleKind::Send(send) => send,
            other => panic!("not a send rule: {other:?}"),
        }
    }

    #[test]
    fn each_rule_attribute_is_read() {
        let rules = rules_of(
            r#"<allow send_interface="org.example.I" send_member="M" send_destination="org.example.D"
                      send_path="/p" send_type="method_call" send_requested_reply="false"
                      send_broadcast="false" eavesdrop="true" min_fds="1" max_fds="2" log="true"/>
               <deny send_error="org.example.Error" send_destination_prefix="org.example"/>
               <allow receive_interface="org.example.I" receive_member="M" receive_sender="org.example.S"
                      receive_path="*" receive_type="signal" receive_requested_reply="true"/>
               <deny receive_error="*"/>
               <deny eavesdrop="true"/>
               <allow own="org.example.Own"/>
               <deny own="*"/>
               <allow own_prefix="org.example"/>
               <allow user="root"/>
               <deny user="*"/>
               <allow group="0"/>
               <deny group="*"/>"#,
        );
        let expected_send = MessageRule {
            message_type: Some(Type::MethodCall),
            path: Some("/p".into()),
            interface: Some("org.example.I".into()),
            member: Some("M".into()),
            error: None,
            peer: NameMatch::Exact("org.example.D".into()),
            broadcast: Some(false),
            eavesdrop: true,
            requested_reply: false,
            min_fds: 1,
            max_fds: 2,
        };
        assert_eq!(
            rules[0],
            Rule {
                allow: true,
                log: true,
                kind: RuleKind::Send(expected_send)
            }
        );
        let deny_error = send_rule(&rules[1]);
        assert_eq!(deny_error.error.as_deref(), Some("org.example.Error"));
        assert_eq!(deny_error.peer, NameMatch::Prefix("org.example".into()));
        assert!(!deny_error.requested_reply && !rules[1].allow && !rules[1].log);
        assert_eq!(deny_error.max_fds, policy::MAX_MESSAGE_UNIX_FDS);
        let RuleKind::Receive(receive) = &rules[2].kind else {
            panic!("{:?}", rules[2])
        };
        assert_eq!(receive.message_type, Some(Type::Signal));
        assert_eq!(receive.peer, NameMatch::Exact("org.example.S".into()));
        assert_eq!(receive.path, None);
        assert!(receive.requested_reply && !receive.eavesdrop);
        let RuleKind::Receive(any_error) = &rules[3].kind else {
            panic!("{:?}", rules[3])
        };
        assert_eq!(any_error.error, None);
        let RuleKind::Receive(eavesdrop) = &rules[4].kind else {
            panic!("{:?}", rules[4])
        };
        assert!(eavesdrop.eavesdrop);
        let kinds: Vec<&RuleKind> = rules[5..].iter().map(|rule| &rule.kind).collect();
        assert_eq!(
            kinds,
            [
                &RuleKind::Own(NameMatch::Exact("org.example.Own".into())),
                &RuleKind::Own(NameMatch::Any),
                &RuleKind::Own(NameMatch::Prefix("org.example".into())),
                &RuleKind::User(Some(0)),
                &RuleKind::User(None),
                &RuleKind::Group(Some(0)),
                &RuleKind::Group(None),
            ]
        );
    }

    #[test]
    fn policies_are_sorted_by_whom_they_apply_to() {
        let config = parse(
            r#"<policy context="mandatory"><deny own="m"/></policy>
               <policy user="0"><allow own="u1"/></policy>
               <policy context="default"><allow own="d"/></policy>
               <policy group="root"><allow own="g"/></policy>
               <policy user="root"><allow own="u2"/></policy>
               <policy at_console="false"><allow own="c"/></policy>"#,
        )
        .unwrap();
        let own = |rules: &[Rule]| -> Vec<String> {
            rules
                .iter()
                .map(|rule| match &rule.kind {
                    RuleKind::Own(NameMatch::Exact(name)) => name.clone(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let policy = &config.policy;
        assert_eq!(own(&policy.default), ["d"]);
        assert_eq!(own(&policy.mandatory), ["m"]);
        assert_eq!(own(&policy.not_at_console), ["c"]);
        assert_eq!(policy.users.keys().copied().collect::<Vec<_>>(), [0]);
        assert_eq!(own(&policy.users[&0]), ["u1", "u2"]);
        assert_eq!(own(&policy.groups[&0]), ["g"]);
    }

    fn facts(message_type: Type) -> MessageFacts<'static> {
        MessageFacts {
            message_type,
            path: Some("/org/example"),
            interface: None,
            member: None,
            error_name: None,
            destination: None,
            sender: Some(":1.1"),
            is_reply: false,
            requested_reply: false,
            unix_fds: 0,
        }
    }

    fn call(
        destination: Option<&'static str>,
        interface: Option<&'static str>,
        member: &'static str,
    ) -> MessageFacts<'static> {
        MessageFacts {
            destination,
            interface,
            member: Some(member),
            ..facts(Type::MethodCall)
        }
    }

    fn signal(destination: Option<&'static str>) -> MessageFacts<'static> {
        MessageFacts {
            destination,
            interface: Some("org.example.Signals"),
            member: Some("Changed"),
            ..facts(Type::Signal)
        }
    }

    fn reply(requested: bool) -> MessageFacts<'static> {
        MessageFacts {
            destination: Some(":1.2"),
            is_reply: true,
            requested_reply: requested,
            ..facts(Type::MethodReturn)
        }
    }

    fn policy_of(body: &str) -> Policy {
        parse(body).unwrap().policy
    }

    fn can_send(policy: &Policy, message: &MessageFacts<'_>, receiver_names: &[&str]) -> bool {
        let names: Vec<String> = receiver_names.iter().map(|name| name.to_string()).collect();
        policy
            .check_send(1000, &[100], message, Party::Peer(&names))
            .allowed
    }

    #[test]
    fn stock_system_conf_gives_the_system_bus_policy() {
        let config = stock("system.conf");
        assert_eq!(config.bus_type.as_deref(), Some("system"));
        assert_eq!(config.user.as_deref(), Some("messagebus"));
        assert!(config.fork && config.syslog);
        assert_eq!(config.pidfile, Some(PathBuf::from("/run/dbus/pid")));
        assert_eq!(config.listen, ["unix:path=/run/dbus/system_bus_socket"]);
        assert_eq!(
            config.servicehelper,
            Some(PathBuf::from("/usr/lib/dbus-1.0/dbus-daemon-launch-helper"))
        );
        assert_eq!(config.servicedirs, SYSTEM_SERVICEDIRS.map(PathBuf::from));
        assert_eq!(config.limits, Limits::default());
        // Root's three rules, and no system.d file adds more.
        assert_eq!(config.policy.users.get(&0).map_or(0, Vec::len), 3);

        let policy = &config.policy;
        assert!(policy.check_connect(1000, &[], 0));
        assert!(!policy.check_own("org.example.Service", 1000, &[]));
        let hello = call(
            Some("org.freedesktop.DBus"),
            Some("org.freedesktop.DBus"),
            "Hello",
        );
        assert!(policy.check_send(1000, &[], &hello, Party::Bus).allowed);
        let uae = call(
            Some("org.freedesktop.DBus"),
            Some("org.freedesktop.DBus"),
            "UpdateActivationEnvironment",
        );
        assert!(!policy.check_send(1000, &[], &uae, Party::Bus).allowed);
        let monitor = call(
            Some("org.freedesktop.DBus"),
            Some("org.freedesktop.DBus.Monitoring"),
            "BecomeMonitor",
        );
        assert!(!policy.check_send(1000, &[], &monitor, Party::Bus).allowed);
        assert!(policy.check_send(0, &[], &monitor, Party::Bus).allowed);
        let names = [":1.7".to_owned()];
        let to_peer = call(Some(":1.7"), Some("org.example.Iface"), "Do");
        assert!(
            !policy
                .check_send(1000, &[], &to_peer, Party::Peer(&names))
                .allowed
        );
        assert!(
            policy
                .check_send(1000, &[], &signal(None), Party::Bus)
                .allowed
        );
    }

    #[test]
    fn no_matching_rule_means_no() {
        let policy = policy_of("");
        assert!(!policy.check_own("org.example.A", 0, &[]));
        assert!(!can_send(&policy, &signal(None), &[":1.2"]));
        let verdict = policy.check_receive(0, &[], &signal(None), Party::Bus, false);
        assert_eq!(
            verdict,
            Verdict {
                allowed: false,
                log: false,
                matched_rules: 0
            }
        );
    }

    #[test]
    fn the_last_matching_rule_wins_and_is_counted() {
        let policy = policy_of(
            r#"<policy context="default">
                 <allow send_destination="*"/>
                 <deny send_interface="org.example.Signals" log="true"/>
                 <allow send_interface="org.example.Other"/>
               </policy>"#,
        );
        let verdict = policy.check_send(1000, &[], &signal(None), Party::Bus);
        assert_eq!(
            verdict,
            Verdict {
                allowed: false,
                log: true,
                matched_rules: 2
            }
        );
        let policy = policy_of(
            r#"<policy context="default">
                 <deny send_interface="org.example.Signals"/>
                 <allow send_destination="*"/>
               </policy>"#,
        );
        assert!(can_send(&policy, &signal(None), &[]));
    }

    #[test]
    fn rules_apply_default_then_group_then_user_then_mandatory() {
        let policy = policy_of(
            r#"<policy context="mandatory"><deny own="org.example.Mandatory"/></policy>
               <policy user="1000"><allow own="org.example.Mandatory"/><allow own="org.example.User"/></policy>
               <policy group="100"><deny own="org.example.User"/><allow own="org.example.Group"/></policy>
               <policy context="default"><deny own="org.example.Group"/><allow own="org.example.Default"/></policy>"#,
        );
        assert!(policy.check_own("org.example.Default", 1000, &[100]));
        assert!(policy.check_own("org.example.Group", 1000, &[100]));
        assert!(!policy.check_own("org.example.Group", 1000, &[101]));
        assert!(policy.check_own("org.example.User", 1000, &[100]));
        assert!(!policy.check_own("org.example.User", 1001, &[100]));
        assert!(!policy.check_own("org.example.Mandatory", 1000, &[100]));
    }

    #[test]
    fn own_prefix_matches_whole_name_elements() {
        let policy = policy_of(r#"<policy context="default"><allow own_prefix="a.b"/></policy>"#);
        for (name, allowed) in [
            ("a.b", true),
            ("a.b.c", true),
            ("a.b.c.d", true),
            ("a.bc", false),
            ("a.c", false),
        ] {
            assert_eq!(policy.check_own(name, 1, &[]), allowed, "{name}");
        }
    }

    #[test]
    fn connecting_defaults_to_the_bus_user_only() {
        let policy = policy_of("");
        assert!(policy.check_connect(1000, &[], 1000));
        assert!(!policy.check_connect(1001, &[], 1000));
        let policy = policy_of(
            r#"<policy context="default"><allow group="100"/><deny user="1002"/></policy>
               <policy context="mandatory"><deny user="1003"/></policy>"#,
        );
        assert!(policy.check_connect(1001, &[100], 1000));
        assert!(!policy.check_connect(1002, &[100], 1000));
        assert!(!policy.check_connect(1003, &[100], 1000));
        assert!(!policy.check_connect(1004, &[101], 1000));
    }

    #[test]
    fn send_destination_means_any_name_of_the_receiver() {
        let policy = policy_of(
            r#"<policy context="default">
                 <allow send_destination="*"/>
                 <deny send_destination="org.example.A"/>
               </policy>"#,
        );
        let to_b = call(Some("org.example.B"), Some("org.example.I"), "M");
        assert!(can_send(&policy, &to_b, &[":1.2", "org.example.B"]));
        // The receiver also owns (or queues for) org.example.A: denied.
        assert!(!can_send(
            &policy,
            &to_b,
            &[":1.2", "org.example.B", "org.example.A"]
        ));
        // To the bus itself the destination field is what counts.
        let to_a = call(Some("org.example.A"), None, "M");
        assert!(!policy.check_send(1000, &[], &to_a, Party::Bus).allowed);
        assert!(policy.check_send(1000, &[], &to_b, Party::Bus).allowed);
    }

    #[test]
    fn send_destination_prefix_covers_the_names_below_it() {
        let policy = policy_of(
            r#"<policy context="default">
                 <allow send_destination="*"/>
                 <deny send_destination_prefix="com.example.SendPrefixDenied"/>
                 <allow send_destination_prefix="com.example.SendPrefixDenied.SendPrefixAllowed"/>
               </policy>"#,
        );
        let message = call(Some(":1.2"), Some("org.example.I"), "M");
        let allowed = |names: &[&str]| can_send(&policy, &message, names);
        assert!(!allowed(&[":1.2", "com.example.SendPrefixDenied"]));
        assert!(!allowed(&[":1.2", "com.example.SendPrefixDenied.internal"]));
        assert!(allowed(&[":1.2", "com.example.SendPrefixDeniedNot"]));
        assert!(allowed(&[
            ":1.2",
            "com.example.SendPrefixDenied.SendPrefixAllowed.x"
        ]));
    }

    #[test]
    fn a_missing_interface_escapes_allow_rules_but_not_deny_rules() {
        let allow = policy_of(
            r#"<policy context="default"><allow send_interface="org.example.I"/></policy>"#,
        );
        let deny = policy_of(
            r#"<policy context="default"><allow send_destination="*"/><deny send_interface="org.example.I"/></policy>"#,
        );
        let without = call(Some(":1.2"), None, "M");
        let with = call(Some(":1.2"), Some("org.example.I"), "M");
        assert!(!can_send(&allow, &without, &[":1.2"]));
        assert!(can_send(&allow, &with, &[":1.2"]));
        assert!(!can_send(&deny, &without, &[":1.2"]));
        assert!(!can_send(&deny, &with, &[":1.2"]));
        let other = call(Some(":1.2"), Some("org.example.Other"), "M");
        assert!(can_send(&deny, &other, &[":1.2"]));
    }

    #[test]
    fn message_fields_type_and_fd_counts_narrow_a_rule() {
        let policy = policy_of(
            r#"<policy context="default">
                 <allow send_destination="*"/>
                 <deny send_path="/test/DenySendMax2" max_fds="2"/>
                 <deny send_path="/test/DenySendMin4" min_fds="4"/>
                 <deny send_type="signal" send_interface="org.example.Signals" send_member="Changed"/>
                 <deny send_type="error" send_error="org.example.Bad"/>
               </policy>"#,
        );
        let at = |path: &'static str, unix_fds: u32| MessageFacts {
            path: Some(path),
            unix_fds,
            ..call(Some(":1.2"), Some("org.example.I"), "M")
        };
        assert!(!can_send(&policy, &at("/test/DenySendMax2", 2), &[":1.2"]));
        assert!(can_send(&policy, &at("/test/DenySendMax2", 3), &[":1.2"]));
        assert!(can_send(&policy, &at("/test/DenySendMin4", 3), &[":1.2"]));
        assert!(!can_send(&policy, &at("/test/DenySendMin4", 4), &[":1.2"]));
        assert!(!can_send(&policy, &signal(None), &[]));
        let other_member = MessageFacts {
            member: Some("Other"),
            ..signal(None)
        };
        assert!(can_send(&policy, &other_member, &[]));
        let error = |name| MessageFacts {
            error_name: Some(name),
            ..facts(Type::Error)
        };
        assert!(!can_send(&policy, &error("org.example.Bad"), &[]));
        assert!(can_send(&policy, &error("org.example.Fine"), &[]));
    }

    #[test]
    fn send_broadcast_tells_broadcasts_from_unicasts() {
        let policy = policy_of(
            r#"<policy context="default">
                 <allow send_destination="*"/>
                 <deny send_interface="org.example.Signals" send_broadcast="true"/>
               </policy>"#,
        );
        assert!(!can_send(&policy, &signal(None), &[]));
        assert!(can_send(&policy, &signal(Some(":1.2")), &[":1.2"]));
        let policy = policy_of(
            r#"<policy context="default">
                 <allow send_destination="*"/>
                 <deny send_interface="org.example.Signals" send_broadcast="false"/>
               </policy>"#,
        );
        assert!(can_send(&policy, &signal(None), &[]));
        assert!(!can_send(&policy, &signal(Some(":1.2")), &[":1.2"]));
    }

    #[test]
    fn requested_reply_decides_which_replies_a_rule_covers() {
        // The system bus: only expected replies may be sent.
        let system = policy_of(
            r#"<policy context="default">
                 <deny send_type="method_call"/>
                 <allow send_requested_reply="true" send_type="method_return"/>
               </policy>"#,
        );
        assert!(can_send(&system, &reply(true), &[":1.2"]));
        assert!(!can_send(&system, &reply(false), &[":1.2"]));
        // The session bus: eavesdrop="true" lets unexpected replies through.
        let session = policy_of(
            r#"<policy context="default"><allow send_destination="*" eavesdrop="true"/></policy>"#,
        );
        assert!(can_send(&session, &reply(false), &[":1.2"]));
        let strict =
            policy_of(r#"<policy context="default"><allow send_destination="*"/></policy>"#);
        assert!(!can_send(&strict, &reply(false), &[":1.2"]));
        // A <deny> stops only unexpected replies unless it says requested_reply="true".
        let deny = |requested_reply: &str| {
            policy_of(&format!(
                r#"<policy context="default">
                     <allow send_destination="*" send_requested_reply="false"/>
                     <deny send_type="method_return" {requested_reply}/>
                   </policy>"#
            ))
        };
        assert!(can_send(&deny(""), &reply(true), &[":1.2"]));
        assert!(!can_send(&deny(""), &reply(false), &[":1.2"]));
        assert!(!can_send(
            &deny(r#"send_requested_reply="true""#),
            &reply(true),
            &[":1.2"]
        ));
        // Not a reply: requested_reply does not matter.
        assert!(can_send(&deny(""), &signal(None), &[]));
    }

    #[test]
    fn receive_rules_check_sender_and_eavesdropping() {
        let policy = policy_of(
            r#"<policy context="default">
                 <allow receive_sender="*"/>
                 <deny receive_sender="org.example.Noisy"/>
                 <deny receive_interface="org.freedesktop.DBus" receive_member="NameAcquired"/>
               </policy>"#,
        );
        let receive = |message: &MessageFacts<'_>, sender: &[&str], eavesdropping: bool| {
            let names: Vec<String> = sender.iter().map(|name| name.to_string()).collect();
            policy
                .check_receive(1000, &[], message, Party::Peer(&names), eavesdropping)
                .allowed
        };
        assert!(receive(&signal(None), &[":1.1"], false));
        assert!(!receive(
            &signal(None),
            &[":1.1", "org.example.Noisy"],
            false
        ));
        // Without eavesdrop="true", an <allow> does not cover eavesdroppers.
        let unicast = call(Some(":1.2"), Some("org.example.I"), "M");
        assert!(!receive(&unicast, &[":1.1"], true));
        let acquired = MessageFacts {
            interface: Some("org.freedesktop.DBus"),
            member: Some("NameAcquired"),
            sender: Some("org.freedesktop.DBus"),
            ..signal(Some(":1.2"))
        };
        assert!(
            !policy
                .check_receive(1000, &[], &acquired, Party::Bus, false)
                .allowed
        );

        let eavesdropping = policy_of(
            r#"<policy context="default">
                 <allow eavesdrop="true"/>
                 <deny receive_interface="org.example.I" eavesdrop="true"/>
               </policy>"#,
        );
        let check = |eavesdrop| {
            eavesdropping
                .check_receive(1000, &[], &unicast, Party::Bus, eavesdrop)
                .allowed
        };
        // The <deny eavesdrop="true"> stops eavesdroppers only.
        assert!(check(false));
        assert!(!check(true));
        let other = call(Some(":1.2"), Some("org.example.Other"), "M");
        assert!(
            eavesdropping
                .check_receive(1000, &[], &other, Party::Bus, true)
                .allowed
        );
    }

    #[test]
    fn receive_sender_of_bus_messages_is_the_sender_field() {
        let policy = policy_of(
            r#"<policy context="default"><allow receive_sender="org.freedesktop.DBus"/></policy>"#,
        );
        let from_bus = MessageFacts {
            sender: Some("org.freedesktop.DBus"),
            ..signal(Some(":1.2"))
        };
        assert!(
            policy
                .check_receive(1000, &[], &from_bus, Party::Bus, false)
                .allowed
        );
        let names = [":1.3".to_owned()];
        let from_peer = MessageFacts {
            sender: Some(":1.3"),
            ..signal(Some(":1.2"))
        };
        assert!(
            !policy
                .check_receive(1000, &[], &from_peer, Party::Peer(&names), false)
                .allowed
        );
    }

    #[test]
    fn only_a_policy_without_message_restrictions_is_open() {
        assert!(stock("session.conf").policy.allows_all_messages());
        let open = r#"<policy context="default">
                        <allow send_destination="*" eavesdrop="true"/>
                        <allow eavesdrop="true"/>
                        <allow own="*"/>
                      </policy>"#;
        assert!(policy_of(open).allows_all_messages());
        let denied = open.replace("<allow own", "<deny send_interface=\"a.B\"/><allow own");
        assert!(!policy_of(&denied).allows_all_messages());
        // Without eavesdrop="true", eavesdroppers must be checked.
        let no_eavesdrop = r#"<policy context="default"><allow send_destination="*"/><allow receive_sender="*"/></policy>"#;
        assert!(!policy_of(no_eavesdrop).allows_all_messages());
        assert!(!Policy::default().allows_all_messages());
    }
}
