//! D-Bus match rules, as `AddMatch` and `RemoveMatch` take them: parsing with the whole grammar
//! and matching of messages, as the specification's "Match Rules" section words them.
//!
//! Where the specification is silent, this follows dbus-daemon (1.14), so that clients written
//! against it keep working: whitespace is allowed before a key and around the key's end, a value
//! is taken as written (a space after `=` is part of it), a comma may end the rule, `eavesdrop`
//! may be given more than once (tools append it to rules that may already have it), and
//! `destination` may be any bus name, which matches when the recipient owns it.
//!
//! The rule model is here; `parse` reads a rule's text, `matching` tries messages on it.

mod matching;
mod parse;
#[cfg(test)]
mod tests;

pub use matching::{Fields, MatchContext};

use std::fmt;

use zbus::message::Type;

/// The longest rule dbus-daemon accepts (`DBUS_MAXIMUM_MATCH_RULE_LENGTH`); longer ones are
/// refused with `LimitsExceeded` rather than `MatchRuleInvalid`.
pub const MAX_RULE_LEN: usize = 1024;

/// "Only argument indexes from 0 to 63 should be accepted."
pub const MAX_ARG_INDEX: u8 = 63;

/// The longest bus name, and so the longest name namespace.
const MAX_NAME_LEN: usize = 255;

/// A parsed match rule. Two rules are equal when they parse to the same conditions, whatever
/// their spelling (quoting, order of keys, `eavesdrop='false'` or none), as `RemoveMatch` needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct MatchRule {
    msg_type: Option<Type>,
    sender: Option<String>,
    interface: Option<String>,
    member: Option<String>,
    path: Option<PathMatch>,
    destination: Option<String>,
    /// Sorted by index, at most one per index.
    args: Vec<ArgMatch>,
    eavesdrop: bool,
}

/// The rule in the grammar it was parsed from, in a canonical order, as `GetAllMatchRules`
/// reports it; parsing the text gives the same rule back.
impl fmt::Display for MatchRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quote = |v: &str| format!("'{}'", v.replace('\'', "'\\''"));
        let mut clauses = Vec::new();
        if let Some(t) = self.msg_type {
            let name = match t {
                Type::MethodCall => "method_call",
                Type::MethodReturn => "method_return",
                Type::Error => "error",
                Type::Signal => "signal",
            };
            clauses.push(format!("type={}", quote(name)));
        }
        let named = [
            ("sender", &self.sender),
            ("interface", &self.interface),
            ("member", &self.member),
            ("destination", &self.destination),
        ];
        for (key, value) in named {
            if let Some(v) = value {
                clauses.push(format!("{key}={}", quote(v)));
            }
        }
        match &self.path {
            Some(PathMatch::Exact(p)) => clauses.push(format!("path={}", quote(p))),
            Some(PathMatch::Namespace(p)) => clauses.push(format!("path_namespace={}", quote(p))),
            None => {}
        }
        for arg in &self.args {
            let suffix = match arg.kind {
                ArgKind::Str => "",
                ArgKind::Path => "path",
                ArgKind::Namespace => "namespace",
            };
            clauses.push(format!("arg{}{suffix}={}", arg.index, quote(&arg.value)));
        }
        if self.eavesdrop {
            clauses.push("eavesdrop='true'".to_owned());
        }
        f.write_str(&clauses.join(","))
    }
}

/// `path` and `path_namespace` exclude each other, so one slot holds either.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PathMatch {
    Exact(String),
    Namespace(String),
}

/// How an `argN…` key compares the Nth argument with its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ArgKind {
    /// `argN`: a STRING equal to the value.
    Str,
    /// `argNpath`: a STRING or OBJECT_PATH, equal or a '/'-ended prefix either way.
    Path,
    /// `arg0namespace`: a STRING that is the value or starts with the value and a '.'.
    Namespace,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ArgMatch {
    index: u8,
    kind: ArgKind,
    value: String,
}

/// Why a rule was refused. Its text is meant for the error reply to `AddMatch`/`RemoveMatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchRuleError {
    reason: String,
    too_long: bool,
}

impl MatchRuleError {
    fn invalid(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            too_long: false,
        }
    }

    /// The rule is over [`MAX_RULE_LEN`] bytes: the driver answers `LimitsExceeded` for it (as
    /// dbus-daemon does), and `MatchRuleInvalid` for any other refusal.
    pub fn too_long(&self) -> bool {
        self.too_long
    }
}

impl fmt::Display for MatchRuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for MatchRuleError {}

impl MatchRule {
    /// The message type the rule asks for, if any.
    pub fn msg_type(&self) -> Option<Type> {
        self.msg_type
    }

    /// The sender (unique or well-known name) the rule asks for, if any.
    pub fn sender(&self) -> Option<&str> {
        self.sender.as_deref()
    }

    /// The interface the rule asks for, if any.
    pub fn interface(&self) -> Option<&str> {
        self.interface.as_deref()
    }

    /// The member the rule asks for, if any.
    pub fn member(&self) -> Option<&str> {
        self.member.as_deref()
    }

    /// The exact object path the rule asks for (`path=`), if any.
    pub fn path(&self) -> Option<&str> {
        match &self.path {
            Some(PathMatch::Exact(path)) => Some(path),
            _ => None,
        }
    }

    /// The object path namespace the rule asks for (`path_namespace=`), if any.
    pub fn path_namespace(&self) -> Option<&str> {
        match &self.path {
            Some(PathMatch::Namespace(path)) => Some(path),
            _ => None,
        }
    }

    /// The destination (bus name) the rule asks for, if any.
    pub fn destination(&self) -> Option<&str> {
        self.destination.as_deref()
    }

    /// Whether the rule asks to see unicast messages for others too (`eavesdrop='true'`).
    pub fn eavesdrop(&self) -> bool {
        self.eavesdrop
    }
}

fn is_unique(name: &str) -> bool {
    name.starts_with(':')
}
