//! Parsing a rule's text, with the whole grammar of the specification and dbus-daemon's
//! leniencies (see the module above).

use zbus::ObjectPath;
use zbus::message::Type;
use zbus::names::{BusName, InterfaceName, MemberName, UniqueName};

use super::{
    ArgKind, ArgMatch, MAX_ARG_INDEX, MAX_NAME_LEN, MAX_RULE_LEN, MatchRule, MatchRuleError,
    PathMatch, is_unique,
};

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
