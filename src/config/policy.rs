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
    pub default: Vec<Rule>,
    /// Rules of `group="..."` policies, by group id, in file order.
    pub groups: BTreeMap<u32, Vec<Rule>>,
    /// Rules of `user="..."` policies, by user id, in file order.
    pub users: BTreeMap<u32, Vec<Rule>>,
    /// Rules of `at_console="false"` policies, which apply to everyone.
    pub not_at_console: Vec<Rule>,
    /// Rules of `context="mandatory"` policies, in file order.
    pub mandatory: Vec<Rule>,
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
