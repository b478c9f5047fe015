//! D-Bus match rules, as `AddMatch` and `RemoveMatch` take them: parsing with the whole grammar
//! and matching of messages, as the specification's "Match Rules" section words them.
//!
//! Where the specification is silent, this follows dbus-daemon (1.14), so that clients written
//! against it keep working: whitespace is allowed before a key and around the key's end, a value
//! is taken as written (a space after `=` is part of it), a comma may end the rule, `eavesdrop`
//! may be given more than once (tools append it to rules that may already have it), and
//! `destination` may be any bus name, which matches when the recipient owns it.

use std::fmt;

use zbus::Message;
use zbus::ObjectPath;
use zbus::message::Type;
use zbus::names::{BusName, InterfaceName, MemberName, UniqueName};

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

    /// The D-Bus error name to reply with: `LimitsExceeded` for a rule over [`MAX_RULE_LEN`]
    /// bytes (as dbus-daemon does), `MatchRuleInvalid` for everything else.
    pub fn error_name(&self) -> &'static str {
        if self.too_long {
            "org.freedesktop.DBus.Error.LimitsExceeded"
        } else {
            "org.freedesktop.DBus.Error.MatchRuleInvalid"
        }
    }
}

impl fmt::Display for MatchRuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for MatchRuleError {}

/// What a match needs to know about the bus's names, borrowed from the bus for one call.
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

pub struct MatchContext<'a> {
    /// Unique name of the current primary owner of a well-known name, if any (for
    /// `sender='well.known.Name'` and `destination='well.known.Name'` rules).
    pub owner_of: &'a dyn Fn(&str) -> Option<&'a str>,
    /// Unique name of the connection the message is addressed to, when the DESTINATION is a
    /// well-known name (dbus-daemon also matches `destination=':1.5'` then).
    pub destination_unique: Option<&'a str>,
}

impl MatchRule {
    /// Parses the text of a rule, as given to `AddMatch`. The empty rule matches everything.
    pub fn parse(text: &str) -> Result<MatchRule, MatchRuleError> {
        if text.len() > MAX_RULE_LEN {
            return Err(MatchRuleError {
                reason: format!(
                    "match rule is {} bytes long, the maximum is {MAX_RULE_LEN}",
                    text.len()
                ),
                too_long: true,
            });
        }
        let mut rule = MatchRule::default();
        let mut rest = text;
        while let Some((key, value, after)) = next_clause(rest)? {
            rule.apply(key, value)?;
            rest = after;
        }
        Ok(rule)
    }

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

    /// Records one `key=value` clause, checking the value and that the key is new.
    fn apply(&mut self, key: &str, value: String) -> Result<(), MatchRuleError> {
        match key {
            "type" => set_once(&mut self.msg_type, key, parse_type(&value)?),
            "sender" => set_once(&mut self.sender, key, checked(key, value, is_bus_name)?),
            "interface" => set_once(&mut self.interface, key, checked(key, value, is_interface)?),
            "member" => set_once(&mut self.member, key, checked(key, value, is_member)?),
            "path" => self.set_path(PathMatch::Exact(checked(key, value, is_object_path)?)),
            "path_namespace" => {
                self.set_path(PathMatch::Namespace(checked(key, value, is_object_path)?))
            }
            "destination" => set_once(
                &mut self.destination,
                key,
                checked(key, value, is_bus_name)?,
            ),
            "eavesdrop" => {
                self.eavesdrop = parse_bool(key, &value)?;
                Ok(())
            }
            "arg0namespace" => {
                let value = checked(key, value, is_name_namespace)?;
                self.add_arg(0, ArgKind::Namespace, value)
            }
            _ => match key.strip_prefix("arg") {
                Some(suffix) => {
                    let (index, kind) = parse_arg_key(key, suffix)?;
                    self.add_arg(index, kind, value)
                }
                None => Err(MatchRuleError::invalid(format!(
                    "unknown key '{key}' in match rule"
                ))),
            },
        }
    }

    fn set_path(&mut self, path: PathMatch) -> Result<(), MatchRuleError> {
        if self.path.is_some() {
            return Err(MatchRuleError::invalid(
                "path or path_namespace given more than once in match rule (they may not be combined)",
            ));
        }
        self.path = Some(path);
        Ok(())
    }

    /// Adds an argument condition; dbus-daemon refuses a second one on the same argument, even
    /// of another kind (`arg1` with `arg1path`, `arg0` with `arg0namespace`).
    fn add_arg(&mut self, index: u8, kind: ArgKind, value: String) -> Result<(), MatchRuleError> {
        match self.args.binary_search_by_key(&index, |arg| arg.index) {
            Ok(_) => Err(MatchRuleError::invalid(format!(
                "argument {index} is matched more than once in match rule"
            ))),
            Err(at) => {
                self.args.insert(at, ArgMatch { index, kind, value });
                Ok(())
            }
        }
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
        let Some(mut args) = body::Args::of_message(msg.data().bytes()) else {
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
    fn accepts(&self, arg: body::Arg<'_>) -> bool {
        use body::Arg;
        match (self.kind, arg) {
            (ArgKind::Str, Arg::Str(s)) => s == self.value,
            (ArgKind::Path, Arg::Str(s) | Arg::ObjectPath(s)) => path_arg_matches(&self.value, s),
            (ArgKind::Namespace, Arg::Str(s)) => in_name_namespace(s, &self.value),
            _ => false,
        }
    }
}

/// Splits off the first `key=value` clause of `text`: the key, the unquoted value and what
/// follows the comma that ends it. `None` once only whitespace is left (so "" and a trailing
/// comma are fine). As in dbus-daemon, whitespace may come before the key and between the key
/// and `=`, but everything after `=` belongs to the value.
fn next_clause(text: &str) -> Result<Option<(&str, String, &str)>, MatchRuleError> {
    let text = text.trim_start_matches(is_space);
    if text.is_empty() {
        return Ok(None);
    }
    let key_end = text
        .find(|c: char| c == '=' || is_space(c))
        .unwrap_or(text.len());
    let (key, after_key) = text.split_at(key_end);
    if key.is_empty() {
        return Err(MatchRuleError::invalid(
            "match rule has a clause with an empty key",
        ));
    }
    let Some(value_text) = after_key.trim_start_matches(is_space).strip_prefix('=') else {
        return Err(MatchRuleError::invalid(format!(
            "key '{key}' in match rule is not followed by '='"
        )));
    };
    let (value, after) = unquote(value_text).ok_or_else(|| {
        MatchRuleError::invalid(format!(
            "unbalanced quotation marks in the value of key '{key}' in match rule"
        ))
    })?;
    Ok(Some((key, value, after)))
}

/// Reads a value up to the first comma outside quotes (or the end), and returns it with what
/// follows that comma; `None` if a quote is left open. Within single quotes a backslash is
/// itself and an apostrophe ends the quotes; outside them `\'` is an apostrophe and any other
/// backslash is itself (so a comma after it still ends the value).
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut quoted = false;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match (quoted, c) {
            (true, '\'') => quoted = false,
            (false, '\'') => quoted = true,
            (false, ',') => return Some((value, text.get(at + 1..)?)),
            (false, '\\') if chars.next_if(|&(_, next)| next == '\'').is_some() => value.push('\''),
            (_, c) => value.push(c),
        }
    }
    (!quoted).then_some((value, ""))
}

/// dbus-daemon's whitespace between clauses.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

fn set_once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), MatchRuleError> {
    if slot.is_some() {
        return Err(MatchRuleError::invalid(format!(
            "key '{key}' given more than once in match rule"
        )));
    }
    *slot = Some(value);
    Ok(())
}

/// Passes `value` through if `valid` accepts it.
fn checked(
    key: &str,
    value: String,
    valid: fn(&str) -> Result<(), &'static str>,
) -> Result<String, MatchRuleError> {
    match valid(&value) {
        Ok(()) => Ok(value),
        Err(what) => Err(MatchRuleError::invalid(format!(
            "'{value}' is not a valid {what} for key '{key}' in match rule"
        ))),
    }
}

fn is_bus_name(value: &str) -> Result<(), &'static str> {
    BusName::try_from(value).map(drop).map_err(|_| "bus name")
}

fn is_interface(value: &str) -> Result<(), &'static str> {
    InterfaceName::try_from(value)
        .map(drop)
        .map_err(|_| "interface name")
}

fn is_member(value: &str) -> Result<(), &'static str> {
    MemberName::try_from(value)
        .map(drop)
        .map_err(|_| "member name")
}

fn is_object_path(value: &str) -> Result<(), &'static str> {
    ObjectPath::try_from(value)
        .map(drop)
        .map_err(|_| "object path")
}

/// "Like a bus name, except that the string is not required to contain a '.'": a unique name,
/// or dot-separated elements of `[A-Za-z0-9_-]` not starting with a digit.
fn is_name_namespace(value: &str) -> Result<(), &'static str> {
    const WHAT: &str = "bus name namespace";
    if is_unique(value) {
        return UniqueName::try_from(value).map(drop).map_err(|_| WHAT);
    }
    let element_ok = |element: &str| {
        element.bytes().enumerate().all(|(at, b)| {
            b.is_ascii_alphabetic() || b == b'_' || b == b'-' || (at > 0 && b.is_ascii_digit())
        }) && !element.is_empty()
    };
    if value.len() <= MAX_NAME_LEN && value.split('.').all(element_ok) {
        Ok(())
    } else {
        Err(WHAT)
    }
}

fn is_unique(name: &str) -> bool {
    name.starts_with(':')
}

fn parse_type(value: &str) -> Result<Type, MatchRuleError> {
    match value {
        "signal" => Ok(Type::Signal),
        "method_call" => Ok(Type::MethodCall),
        "method_return" => Ok(Type::MethodReturn),
        "error" => Ok(Type::Error),
        _ => Err(MatchRuleError::invalid(format!(
            "'{value}' is not a message type (signal, method_call, method_return or error) in match rule"
        ))),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, MatchRuleError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(MatchRuleError::invalid(format!(
            "{key}='{value}' is invalid in match rule, it should be 'true' or 'false'"
        ))),
    }
}

/// Parses what follows "arg" in an `argN` or `argNpath` key (`arg0namespace` is handled
/// before). Leading zeros are accepted, as dbus-daemon's `strtoul` does.
fn parse_arg_key(key: &str, suffix: &str) -> Result<(u8, ArgKind), MatchRuleError> {
    let digits_end = suffix
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(suffix.len());
    let (digits, rest) = suffix.split_at(digits_end);
    if digits.is_empty() {
        return Err(MatchRuleError::invalid(format!(
            "key '{key}' in match rule starts with 'arg' but has no argument number"
        )));
    }
    let kind = match rest {
        "" => ArgKind::Str,
        "path" => ArgKind::Path,
        _ => {
            return Err(MatchRuleError::invalid(format!(
                "key '{key}' in match rule has junk after its argument number; only argNpath and arg0namespace are valid"
            )));
        }
    };
    let index = digits
        .parse::<u32>()
        .ok()
        .and_then(|n| u8::try_from(n).ok())
        .filter(|&n| n <= MAX_ARG_INDEX)
        .ok_or_else(|| {
            MatchRuleError::invalid(format!(
                "key '{key}' in match rule has an argument number above the maximum of {MAX_ARG_INDEX}"
            ))
        })?;
    Ok((index, kind))
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

/// Reads the top-level arguments of a message straight from its wire bytes, by its signature,
/// without deserializing anything: match rules only look at strings and object paths, and most
/// bodies are never looked at. Any malformed byte ends the walk (no match) rather than panic.
mod body {
    /// A top-level argument, as far as match rules care.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Arg<'b> {
        Str(&'b str),
        ObjectPath(&'b str),
        Other,
    }

    /// The header field code of the body's SIGNATURE.
    const SIGNATURE_FIELD: u8 = 8;
    /// Containers (structures and variants) nested deeper than the specification allows end the
    /// walk, so that no body can exhaust the stack.
    const MAX_DEPTH: usize = 64;
    /// The fixed part of the header: endianness, type, flags, version, body length, serial.
    const PRIMARY_HEADER_LEN: usize = 12;

    /// The top-level arguments of a message, in order.
    pub(super) struct Args<'b> {
        wire: Wire<'b>,
        sig: &'b [u8],
        pos: usize,
    }

    impl<'b> Args<'b> {
        /// The arguments of the message whose whole wire form is `message`.
        pub(super) fn of_message(message: &'b [u8]) -> Option<Self> {
            let big = match message.first()? {
                b'l' => false,
                b'B' => true,
                _ => return None,
            };
            let wire = Wire {
                bytes: message,
                big,
            };
            let body_len = wire.usize_at(4)?;
            let fields_start = PRIMARY_HEADER_LEN + 4;
            let fields_end = fields_start.checked_add(wire.usize_at(PRIMARY_HEADER_LEN)?)?;
            let sig = wire.body_signature(fields_start, fields_end)?;
            // The body starts 8-aligned, so offsets within it align as in the message.
            let body_start = align(fields_end, 8)?;
            let bytes = message.get(body_start..body_start.checked_add(body_len)?)?;
            Some(Args {
                wire: Wire { bytes, big },
                sig,
                pos: 0,
            })
        }
    }

    impl<'b> Iterator for Args<'b> {
        type Item = Arg<'b>;

        fn next(&mut self) -> Option<Arg<'b>> {
            let step = self.wire.skip(self.sig, self.pos, 0);
            let arg = match self.sig.first() {
                Some(b's') => self.wire.str_at(self.pos).map(Arg::Str),
                Some(b'o') => self.wire.str_at(self.pos).map(Arg::ObjectPath),
                _ => Some(Arg::Other),
            };
            match (step, arg) {
                (Some((sig, pos)), Some(arg)) => {
                    (self.sig, self.pos) = (sig, pos);
                    Some(arg)
                }
                _ => {
                    self.sig = &[];
                    None
                }
            }
        }
    }

    /// Bytes of a message, or of its body, in one byte order.
    #[derive(Clone, Copy)]
    struct Wire<'b> {
        bytes: &'b [u8],
        big: bool,
    }

    impl<'b> Wire<'b> {
        fn usize_at(self, pos: usize) -> Option<usize> {
            let raw: [u8; 4] = self.bytes.get(pos..pos.checked_add(4)?)?.try_into().ok()?;
            let n = if self.big {
                u32::from_be_bytes(raw)
            } else {
                u32::from_le_bytes(raw)
            };
            usize::try_from(n).ok()
        }

        /// Finds the SIGNATURE field among the header fields (an `a(yv)`) at `pos..end`;
        /// a message without one has an empty body.
        fn body_signature(self, mut pos: usize, end: usize) -> Option<&'b [u8]> {
            let mut sig: &[u8] = &[];
            while pos < end {
                pos = align(pos, 8)?;
                let code = *self.bytes.get(pos)?;
                let (value_sig, value_pos) = self.signature_at(pos.checked_add(1)?)?;
                if code == SIGNATURE_FIELD && value_sig == b"g" {
                    sig = self.signature_at(value_pos)?.0;
                }
                pos = self.skip_single(value_sig, value_pos, 0)?;
            }
            Some(sig)
        }

        /// The UTF-8 text of the STRING or OBJECT_PATH at `pos`.
        fn str_at(self, pos: usize) -> Option<&'b str> {
            std::str::from_utf8(self.string_at(pos)?.0).ok()
        }

        /// The bytes of the STRING or OBJECT_PATH at `pos`, and the offset after its 0.
        fn string_at(self, pos: usize) -> Option<(&'b [u8], usize)> {
            let len_pos = align(pos, 4)?;
            let start = len_pos.checked_add(4)?;
            self.terminated(start, self.usize_at(len_pos)?)
        }

        /// The SIGNATURE at `pos` (one length byte), and the offset after its 0.
        fn signature_at(self, pos: usize) -> Option<(&'b [u8], usize)> {
            let len = usize::from(*self.bytes.get(pos)?);
            self.terminated(pos.checked_add(1)?, len)
        }

        /// `len` bytes at `start` that a 0 byte follows.
        fn terminated(self, start: usize, len: usize) -> Option<(&'b [u8], usize)> {
            let end = start.checked_add(len)?;
            let text = self.bytes.get(start..end)?;
            (*self.bytes.get(end)? == 0).then_some((text, end + 1))
        }

        /// Skips the value of `sig`, which must be one complete type, at `pos`.
        fn skip_single(self, sig: &[u8], pos: usize, depth: usize) -> Option<usize> {
            match self.skip(sig, pos, depth)? {
                ([], end) => Some(end),
                _ => None,
            }
        }

        /// Skips the value of the complete type that starts `sig`, found at `pos`: the rest of
        /// the signature and the offset after the value.
        fn skip(self, sig: &[u8], pos: usize, depth: usize) -> Option<(&[u8], usize)> {
            let (&code, rest) = sig.split_first()?;
            if depth > MAX_DEPTH {
                return None;
            }
            let end = match code {
                b'a' => return self.skip_array(rest, pos),
                b'(' => return self.skip_fields(rest, b')', pos, depth),
                b'{' => return self.skip_fields(rest, b'}', pos, depth),
                b's' | b'o' => self.string_at(pos)?.1,
                b'g' => self.signature_at(pos)?.1,
                b'v' => {
                    let (inner, value_pos) = self.signature_at(pos)?;
                    self.skip_single(inner, value_pos, depth + 1)?
                }
                _ => {
                    let size = alignment(code)?;
                    align(pos, size)?.checked_add(size)?
                }
            };
            (end <= self.bytes.len()).then_some((rest, end))
        }

        /// Skips an array whole, by its length, without looking at its elements.
        fn skip_array(self, element: &[u8], pos: usize) -> Option<(&[u8], usize)> {
            let len_pos = align(pos, 4)?;
            let len = self.usize_at(len_pos)?;
            let first = align(len_pos.checked_add(4)?, alignment(*element.first()?)?)?;
            let end = first.checked_add(len)?;
            let rest = element.get(single_type_len(element)?..)?;
            (end <= self.bytes.len()).then_some((rest, end))
        }

        /// Skips the fields of a structure or dict entry, up to its `close` character.
        fn skip_fields(
            self,
            mut sig: &[u8],
            close: u8,
            pos: usize,
            depth: usize,
        ) -> Option<(&[u8], usize)> {
            let mut pos = align(pos, 8)?;
            loop {
                match sig.split_first()? {
                    (&c, rest) if c == close => return Some((rest, pos)),
                    _ => (sig, pos) = self.skip(sig, pos, depth + 1)?,
                }
            }
        }
    }

    /// The alignment of the type whose signature starts with `code` (for the fixed-size basic
    /// types, also their size).
    fn alignment(code: u8) -> Option<usize> {
        match code {
            b'y' | b'g' | b'v' => Some(1),
            b'n' | b'q' => Some(2),
            b'b' | b'i' | b'u' | b'h' | b's' | b'o' | b'a' => Some(4),
            b'x' | b't' | b'd' | b'(' | b'{' => Some(8),
            _ => None,
        }
    }

    /// The length of the complete type that starts `sig`.
    fn single_type_len(sig: &[u8]) -> Option<usize> {
        let mut depth = 0usize;
        for (at, &code) in sig.iter().enumerate() {
            match code {
                b'a' => continue,
                b'(' | b'{' => depth += 1,
                b')' | b'}' => depth = depth.checked_sub(1)?,
                _ => {
                    alignment(code)?;
                }
            }
            if depth == 0 {
                return Some(at + 1);
            }
        }
        None
    }

    fn align(pos: usize, to: usize) -> Option<usize> {
        pos.checked_next_multiple_of(to)
    }

    #[cfg(test)]
    mod tests {
        use super::{Arg, Args};
        use std::collections::HashMap;
        use zbus::message::Message;
        use zbus::wire::Endian;
        use zbus::{ObjectPath, Signature, Variant};

        type TestResult = Result<(), Box<dyn std::error::Error>>;

        fn args_of(msg: &Message) -> Vec<Arg<'_>> {
            Args::of_message(msg.data().bytes())
                .map(|args| args.collect())
                .unwrap_or_default()
        }

        fn signal(endian: Endian) -> zbus::message::Builder<'static> {
            Message::signal("/a/b", "com.example.Iface", "Changed").endian(endian)
        }

        /// A message with `sig` for its body signature and `body` for its body, little-endian,
        /// built by hand so that tests can give it bodies zbus would refuse to build.
        fn raw_message(sig: &[u8], body: &[u8]) -> Vec<u8> {
            let sig_len = u8::try_from(sig.len()).unwrap_or(u8::MAX);
            let field_len = 4 + 1 + sig.len() + 1;
            let mut msg = vec![b'l', 4, 0, 1];
            msg.extend((body.len() as u32).to_le_bytes());
            msg.extend(1u32.to_le_bytes());
            msg.extend((field_len as u32).to_le_bytes());
            msg.extend([8, 1, b'g', 0, sig_len]);
            msg.extend(sig);
            msg.push(0);
            msg.resize(msg.len().next_multiple_of(8), 0);
            msg.extend(body);
            msg
        }

        #[test]
        fn walks_every_kind_of_value_both_endiannesses() -> TestResult {
            for endian in [Endian::Little, Endian::Big] {
                let dict = HashMap::from([("k", Variant::from(7u64))]);
                let body = (
                    1u8,
                    vec![(1i32, "x")],
                    Variant::from(3u16),
                    "target",
                    (true, 2.5f64, -3i16),
                    dict,
                    ObjectPath::try_from("/obj/path")?,
                    Signature::try_from("a{sv}").map_err(zbus::Error::from)?,
                    Variant::Variant(Box::new(Variant::from("deep"))),
                    u64::MAX,
                    "last",
                );
                let msg = signal(endian).build(&body)?;
                let other = Arg::Other;
                assert_eq!(
                    args_of(&msg),
                    [
                        other,
                        other,
                        other,
                        Arg::Str("target"),
                        other,
                        other,
                        Arg::ObjectPath("/obj/path"),
                        other,
                        other,
                        other,
                        Arg::Str("last"),
                    ],
                    "{endian:?}"
                );
            }
            Ok(())
        }

        #[test]
        fn empty_body_has_no_arguments() -> TestResult {
            let msg = signal(Endian::Big).build(&())?;
            assert_eq!(args_of(&msg), []);
            Ok(())
        }

        #[test]
        fn empty_arrays_still_skip_their_padding() -> TestResult {
            // An empty array of 8-aligned elements has padding after its length.
            let body = (Vec::<(u64, u8)>::new(), "after", Vec::<u8>::new(), "end");
            let msg = signal(Endian::Little).build(&body)?;
            assert_eq!(
                args_of(&msg),
                [Arg::Other, Arg::Str("after"), Arg::Other, Arg::Str("end")]
            );
            Ok(())
        }

        #[test]
        fn hand_built_message_reads_like_a_built_one() {
            let mut body = 3u32.to_le_bytes().to_vec();
            body.extend(b"abc\0");
            assert_eq!(
                Args::of_message(&raw_message(b"s", &body)).map(|a| a.collect::<Vec<_>>()),
                Some(vec![Arg::Str("abc")])
            );
        }

        #[test]
        fn variants_nested_beyond_the_limit_end_the_walk() {
            let mut body = Vec::new();
            for _ in 0..10_000 {
                body.extend([1, b'v', 0]);
            }
            body.extend([1, b'y', 0, 5]);
            let msg = raw_message(b"vs", &body);
            let args = Args::of_message(&msg).map(|a| a.collect::<Vec<_>>());
            assert_eq!(args, Some(vec![]));
        }

        #[test]
        fn strings_must_be_utf8_and_terminated() {
            let mut body = 2u32.to_le_bytes().to_vec();
            body.extend([0xff, 0xfe, 0]);
            let bad_utf8 = raw_message(b"s", &body);
            let unterminated = raw_message(b"s", &[2, 0, 0, 0, b'a', b'b', b'c']);
            for msg in [bad_utf8, unterminated] {
                let args = Args::of_message(&msg).map(|a| a.collect::<Vec<_>>());
                assert_eq!(args, Some(vec![]));
            }
        }

        /// Every single-byte corruption and every truncation of a real message is survived.
        #[test]
        fn never_panics_on_corrupt_bytes() -> TestResult {
            let body = (
                vec![(1i32, "x")],
                Variant::from((3u16, "in")),
                "target",
                ObjectPath::try_from("/p")?,
            );
            let msg = signal(Endian::Big).build(&body)?;
            let bytes = msg.data().bytes().to_vec();
            let mut walked = 0;
            for at in 0..bytes.len() {
                for value in [0u8, 1, 0x7f, 0xff, b'a', b'(', b')', b'v', b'{', b's'] {
                    let mut corrupt = bytes.clone();
                    corrupt[at] = value;
                    walked += Args::of_message(&corrupt).map_or(0, |a| a.count());
                }
                walked += Args::of_message(&bytes[..at]).map_or(0, |a| a.count());
            }
            assert!(walked > 0);
            assert_eq!(args_of(&msg).len(), 4);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
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
        assert_eq!(
            err.error_name(),
            "org.freedesktop.DBus.Error.MatchRuleInvalid"
        );
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
        assert_eq!(
            err.error_name(),
            "org.freedesktop.DBus.Error.LimitsExceeded"
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
}
