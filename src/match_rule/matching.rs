//! Matching messages against parsed rules, as the specification's "Match Rules" section words
//! it: the header fields, then the arguments, read straight from the body's wire bytes.

use zbus::Message;
use zbus::ObjectPath;
use zbus::names::{BusName, UniqueName};

use super::{ArgKind, ArgMatch, MatchRule, PathMatch, is_unique};
use crate::wire::raw::{Arg, Args};

/// The header fields of one message that rules look at.
pub struct Fields<'m> {
    msg: &'m Message,
    sender: Option<&'m str>,
    interface: Option<&'m str>,
    member: Option<&'m str>,
    path: Option<&'m str>,
    destination: Option<&'m str>,
}

impl<'m> Fields<'m> {
    pub fn of(msg: &'m Message, header: &'m zbus::message::Header<'m>) -> Fields<'m> {
        Fields {
            msg,
            sender: header.sender().map(UniqueName::as_str),
            interface: header.interface().map(|i| i.as_str()),
            member: header.member().map(|m| m.as_str()),
            path: header.path().map(ObjectPath::as_str),
            destination: header.destination().map(BusName::as_str),
        }
    }

    pub fn destination(&self) -> Option<&'m str> {
        self.destination
    }
}

/// What a match needs to know about the bus's names, borrowed from the bus for one call.
pub struct MatchContext<'a> {
    /// Unique name of the current primary owner of a well-known name, if any (for
    /// `sender='well.known.Name'` and `destination='well.known.Name'` rules).
    pub owner_of: &'a dyn Fn(&str) -> Option<&'a str>,
    /// Unique name of the connection the message is addressed to, when the DESTINATION is a
    /// well-known name (dbus-daemon also matches `destination=':1.5'` then).
    pub destination_unique: Option<&'a str>,
}

impl MatchRule {
    /// Whether `msg` matches. `msg` is a message whose SENDER field the bus has already set.
    /// `eavesdrop` plays no part: whether a unicast message may go to this rule's owner is the
    /// bus's decision.
    pub fn matches(&self, msg: &Message, ctx: &MatchContext<'_>) -> bool {
        self.matches_fields(&Fields::of(msg, &msg.header()), ctx)
    }

    /// As `matches`, with the header fields read once for all the rules a message is tried on.
    pub fn matches_fields(&self, fields: &Fields<'_>, ctx: &MatchContext<'_>) -> bool {
        if self
            .msg_type
            .is_some_and(|t| t != fields.msg.message_type())
        {
            return false;
        }
        field_matches(&self.member, fields.member)
            && field_matches(&self.interface, fields.interface)
            && self.sender_matches(fields.sender, ctx)
            && self.path_matches(fields.path)
            && self.destination_matches(fields.destination, ctx)
            && self.args_match(fields.msg)
    }

    /// SENDER is a unique name (or the bus's own name): equal to the rule's, or the primary
    /// owner of the rule's well-known name.
    fn sender_matches(&self, sender: Option<&str>, ctx: &MatchContext<'_>) -> bool {
        let Some(want) = self.sender.as_deref() else {
            return true;
        };
        let Some(sender) = sender else {
            return false;
        };
        want == sender || (!is_unique(want) && (ctx.owner_of)(want) == Some(sender))
    }

    fn path_matches(&self, path: Option<&str>) -> bool {
        match (&self.path, path) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(PathMatch::Exact(want)), Some(path)) => want == path,
            (Some(PathMatch::Namespace(ns)), Some(path)) => in_path_namespace(path, ns),
        }
    }

    /// As dbus-daemon: the rule's name must be the DESTINATION itself, or be owned by the
    /// connection the message is addressed to (its unique name, or the owner of a well-known
    /// DESTINATION as `ctx.destination_unique` says).
    fn destination_matches(&self, destination: Option<&str>, ctx: &MatchContext<'_>) -> bool {
        let Some(want) = self.destination.as_deref() else {
            return true;
        };
        let Some(destination) = destination else {
            return false;
        };
        if want == destination {
            return true;
        }
        let recipient = if is_unique(destination) {
            Some(destination)
        } else {
            ctx.destination_unique
        };
        match recipient {
            None => false,
            Some(recipient) if is_unique(want) => want == recipient,
            Some(recipient) => (ctx.owner_of)(want) == Some(recipient),
        }
    }

    /// Walks the body only if the rule has argument conditions, and only as far as the last.
    fn args_match(&self, msg: &Message) -> bool {
        if self.args.is_empty() {
            return true;
        }
        let Some(mut args) = Args::of_message(msg.data().bytes()) else {
            return false;
        };
        let mut position = 0usize;
        for want in &self.args {
            let index = usize::from(want.index);
            let Some(arg) = args.nth(index.saturating_sub(position)) else {
                return false;
            };
            position = index + 1;
            if !want.accepts(arg) {
                return false;
            }
        }
        true
    }
}

impl ArgMatch {
    fn accepts(&self, arg: Arg<'_>) -> bool {
        match (self.kind, arg) {
            (ArgKind::Str, Arg::Str(s)) => s == self.value,
            (ArgKind::Path, Arg::Str(s) | Arg::ObjectPath(s)) => path_arg_matches(&self.value, s),
            (ArgKind::Namespace, Arg::Str(s)) => in_name_namespace(s, &self.value),
            _ => false,
        }
    }
}

fn field_matches(want: &Option<String>, have: Option<&str>) -> bool {
    want.as_deref().is_none_or(|want| have == Some(want))
}

/// "The object path is either the given value, or that value followed by one or more path
/// components": '/' takes in every path.
fn in_path_namespace(path: &str, namespace: &str) -> bool {
    namespace == "/"
        || path
            .strip_prefix(namespace)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// "If the argument is exactly equal to the string given in the match rule then the rule is
/// satisfied. Additionally, there is also a match when either the string given in the match
/// rule or the appropriate message argument ends with '/' and is a prefix of the other."
fn path_arg_matches(rule: &str, arg: &str) -> bool {
    rule == arg
        || (rule.ends_with('/') && arg.starts_with(rule))
        || (arg.ends_with('/') && rule.starts_with(arg))
}

/// The name is the namespace itself or inside it: the namespace followed by a '.'.
fn in_name_namespace(name: &str, namespace: &str) -> bool {
    name.strip_prefix(namespace)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}
