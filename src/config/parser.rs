//! The `busconfig` XML reader: a [`Loader`] reads a file, and in place the
//! files it includes, into a [`Config`], with dbus-daemon's checks and its
//! error messages (see the module documentation of [`super`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node, ParsingOptions};
use tracing::{debug, warn};
use zbus::message::Type;

use super::model::{Config, ConfigError, SYSTEM_SERVICEDIRS};
use super::policy::{self, MessageRule, NameMatch, Rule, RuleKind};

/// Attributes a rule may carry.
const RULE_ATTRIBUTES: [&str; 24] = [
    "send_interface",
    "send_member",
    "send_error",
    "send_destination",
    "send_destination_prefix",
    "send_path",
    "send_type",
    "send_requested_reply",
    "send_broadcast",
    "receive_interface",
    "receive_member",
    "receive_error",
    "receive_sender",
    "receive_path",
    "receive_type",
    "receive_requested_reply",
    "eavesdrop",
    "own",
    "own_prefix",
    "user",
    "group",
    "log",
    "min_fds",
    "max_fds",
];

/// Builds one [`Config`] from a file and, in place, the files it includes:
/// an include takes effect at the point where it appears.
#[derive(Default)]
pub(super) struct Loader {
    pub(super) config: Config,
    /// The files being read, outermost first: including one again is a loop.
    open_files: Vec<PathBuf>,
}

/// One parsed file, to attach file and line to errors.
struct Source<'a, 'input> {
    path: &'a Path,
    doc: &'a Document<'input>,
}

/// Whom a `<policy>` applies to. `Nobody`: `at_console="true"`, or an
/// unknown user or group.
enum Scope {
    Default,
    Mandatory,
    Group(u32),
    User(u32),
    NotAtConsole,
    Nobody,
}

impl Loader {
    pub(super) fn load_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let fail = |message: String| ConfigError {
            path: path.to_owned(),
            line: None,
            message,
        };
        let canonical = fs::canonicalize(path)
            .map_err(|err| fail(format!("Failed to open \"{}\": {err}", path.display())))?;
        self.read_canonical(path, canonical).map_err(fail)?
    }

    /// Reads `path` (known as `canonical`) unless that would be a loop.
    /// The outer error is about reaching the file, the inner one about its
    /// contents.
    fn read_canonical(
        &mut self,
        path: &Path,
        canonical: PathBuf,
    ) -> Result<Result<(), ConfigError>, String> {
        if self.open_files.contains(&canonical) {
            return Err(format!("Circular inclusion of file '{}'", path.display()));
        }
        if !canonical.is_file() {
            return Err(format!("\"{}\" is not a regular file", path.display()));
        }
        let text = fs::read_to_string(&canonical)
            .map_err(|err| format!("Failed to read \"{}\": {err}", path.display()))?;
        self.open_files.push(canonical);
        let result = self.load_text(&text, path);
        self.open_files.pop();
        Ok(result)
    }

    /// Parses `text`, the contents of `path`, into the configuration.
    pub(super) fn load_text(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let options = ParsingOptions {
            allow_dtd: true,
            ..ParsingOptions::default()
        };
        let doc = Document::parse_with_options(text, options).map_err(|err| {
            // roxmltree places a truncated file's error at its start; the
            // problem is at its end.
            let line = match err {
                roxmltree::Error::UnexpectedEndOfStream => text.lines().count().max(1),
                _ => err.pos().row as usize,
            };
            ConfigError {
                path: path.to_owned(),
                line: Some(u32::try_from(line).unwrap_or(u32::MAX)),
                message: err.to_string(),
            }
        })?;
        let src = Source { path, doc: &doc };
        let root = doc.root_element();
        if root.tag_name().name() != "busconfig" {
            let message = format!(
                "Unknown element <{}> at root of configuration file",
                root.tag_name().name()
            );
            return Err(src.error(root, message));
        }
        src.check_attributes(root, &[])?;
        for child in root.children() {
            self.top_level(&src, child)?;
        }
        Ok(())
    }

    /// One child of `<busconfig>`.
    fn top_level(&mut self, src: &Source<'_, '_>, node: Node<'_, '_>) -> Result<(), ConfigError> {
        if !node.is_element() {
            return src.no_text(node, "busconfig");
        }
        let config = &mut self.config;
        match node.tag_name().name() {
            "type" => config.bus_type = Some(src.plain_text(node)?),
            "user" => config.user = Some(src.plain_text(node)?),
            "listen" => config.listen.push(src.plain_text(node)?),
            "auth" => config.auth.push(src.plain_text(node)?),
            "pidfile" => config.pidfile = Some(src.plain_text(node)?.into()),
            "servicehelper" => config.servicehelper = Some(src.plain_text(node)?.into()),
            "servicedir" => {
                let dir = src.resolve(&src.plain_text(node)?);
                self.add_servicedirs([dir]);
            }
            "fork" => config.fork = src.flag(node)?,
            "keep_umask" => config.keep_umask = src.flag(node)?,
            "syslog" => config.syslog = src.flag(node)?,
            "allow_anonymous" => config.allow_anonymous = src.flag(node)?,
            "standard_session_servicedirs" => {
                src.flag(node)?;
                let dirs = crate::activation::files::session_dirs(|k| std::env::var(k).ok());
                self.add_servicedirs(dirs);
            }
            "standard_system_servicedirs" => {
                src.flag(node)?;
                self.add_servicedirs(SYSTEM_SERVICEDIRS.map(PathBuf::from));
            }
            "include" => self.include(src, node)?,
            "includedir" => self.include_dir(src, node)?,
            "limit" => self.limit(src, node)?,
            "policy" => self.policy(src, node)?,
            "selinux" => selinux(src, node)?,
            "apparmor" => apparmor(src, node)?,
            other => {
                let message = format!(
                    "Element <{other}> not allowed inside <busconfig> in configuration file"
                );
                return Err(src.error(node, message));
            }
        }
        Ok(())
    }

    fn add_servicedirs(&mut self, dirs: impl IntoIterator<Item = PathBuf>) {
        for dir in dirs {
            if !self.config.servicedirs.contains(&dir) {
                self.config.servicedirs.push(dir);
            }
        }
    }

    /// `<include>`: a file relative to the including file's directory.
    fn include(&mut self, src: &Source<'_, '_>, node: Node<'_, '_>) -> Result<(), ConfigError> {
        src.check_attributes(
            node,
            &[
                "ignore_missing",
                "if_selinux_enabled",
                "selinux_root_relative",
            ],
        )?;
        let ignore_missing = src.yes_no(node, "ignore_missing")?;
        let if_selinux = src.yes_no(node, "if_selinux_enabled")?;
        let selinux_relative = src.yes_no(node, "selinux_root_relative")?;
        let path = src.resolve(&src.text(node)?);
        if if_selinux || selinux_relative {
            debug!(
                "{}: SELinux is not enabled, not including {}",
                src.path.display(),
                path.display()
            );
            return Ok(());
        }
        if ignore_missing && !path.exists() {
            debug!(
                "{}: optional {} is missing",
                src.path.display(),
                path.display()
            );
            return Ok(());
        }
        self.include_file(src, node, &path)
    }

    /// Reads an included file; a problem reaching it is reported at the
    /// `<include>`, a problem inside it in that file.
    fn include_file(
        &mut self,
        src: &Source<'_, '_>,
        node: Node<'_, '_>,
        path: &Path,
    ) -> Result<(), ConfigError> {
        let canonical = fs::canonicalize(path).map_err(|err| {
            src.error(
                node,
                format!("Failed to open \"{}\": {err}", path.display()),
            )
        })?;
        self.read_canonical(path, canonical)
            .map_err(|message| src.error(node, message))?
    }

    /// `<includedir>`: every `*.conf` file of a directory, in name order. A
    /// missing directory is fine; a file that fails is skipped with a
    /// warning and leaves no trace, as in dbus-daemon.
    fn include_dir(&mut self, src: &Source<'_, '_>, node: Node<'_, '_>) -> Result<(), ConfigError> {
        let dir = src.resolve(&src.plain_text(node)?);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => {
                return Err(src.error(node, format!("Failed to read \"{}\": {err}", dir.display())));
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "conf"))
            .collect();
        files.sort();
        for file in files {
            let before = self.config.clone();
            if let Err(err) = self.include_file(src, node, &file) {
                warn!(
                    "Encountered error '{err}' while parsing '{}'",
                    file.display()
                );
                self.config = before;
            }
        }
        Ok(())
    }

    /// `<limit name="...">N</limit>`
    fn limit(&mut self, src: &Source<'_, '_>, node: Node<'_, '_>) -> Result<(), ConfigError> {
        src.check_attributes(node, &["name"])?;
        let Some(name) = node.attribute("name") else {
            return Err(src.error(node, "<limit> element must have a \"name\" attribute"));
        };
        let text = src.text(node)?;
        let value = parse_limit(&text)
            .map_err(|reason| src.error(node, format!("<limit name=\"{name}\"> {reason}")))?;
        if !self.config.limits.set(name, value) {
            return Err(src.error(node, format!("There is no limit called \"{name}\"")));
        }
        Ok(())
    }

    /// `<policy>` and its rules.
    fn policy(&mut self, src: &Source<'_, '_>, node: Node<'_, '_>) -> Result<(), ConfigError> {
        let scope = policy_scope(src, node)?;
        let per = match scope {
            Scope::User(_) => Some("per-user"),
            Scope::Group(_) => Some("per-group"),
            _ => None,
        };
        let mut rules = Vec::new();
        for child in node.children() {
            if !child.is_element() {
                src.no_text(child, "policy")?;
                continue;
            }
            let allow = match child.tag_name().name() {
                "allow" => true,
                "deny" => false,
                other => {
                    let message = format!(
                        "Element <{other}> not allowed inside <policy> in configuration file"
                    );
                    return Err(src.error(child, message));
                }
            };
            rules.extend(parse_rule(src, child, allow, per)?);
        }
        let policy = &mut self.config.policy;
        match scope {
            Scope::Default => policy.default.extend(rules),
            Scope::Mandatory => policy.mandatory.extend(rules),
            Scope::Group(gid) => policy.groups.entry(gid).or_default().extend(rules),
            Scope::User(uid) => policy.users.entry(uid).or_default().extend(rules),
            Scope::NotAtConsole => policy.not_at_console.extend(rules),
            Scope::Nobody => {}
        }
        Ok(())
    }
}

/// Reads the one attribute of `<policy>` that says whom it applies to.
fn policy_scope(src: &Source<'_, '_>, node: Node<'_, '_>) -> Result<Scope, ConfigError> {
    src.check_attributes(node, &["context", "user", "group", "at_console"])?;
    let mut attributes = node.attributes();
    let (Some(attribute), None) = (attributes.next(), attributes.next()) else {
        let message =
            "<policy> element must have exactly one of (context|user|group|at_console) attributes";
        return Err(src.error(node, message));
    };
    let value = attribute.value();
    let scope = match attribute.name() {
        "context" => match value {
            "default" => Scope::Default,
            "mandatory" => Scope::Mandatory,
            _ => {
                let message = format!(
                    "context attribute on <policy> must have the value \"default\" or \"mandatory\", not \"{value}\""
                );
                return Err(src.error(node, message));
            }
        },
        "at_console" => match value {
            "true" => Scope::Nobody,
            "false" => Scope::NotAtConsole,
            _ => {
                let message = format!(
                    "Unknown value \"{value}\" for at_console in message bus configuration file"
                );
                return Err(src.error(node, message));
            }
        },
        "user" => lookup_user(value).map_or_else(
            || {
                src.unknown(
                    "username",
                    value,
                    "in message bus configuration file",
                    Scope::Nobody,
                )
            },
            Scope::User,
        ),
        _ => lookup_group(value).map_or_else(
            || {
                src.unknown(
                    "group",
                    value,
                    "in message bus configuration file",
                    Scope::Nobody,
                )
            },
            Scope::Group,
        ),
    };
    Ok(scope)
}

/// One `<allow>` or `<deny>`; `None` when it names an unknown user or group.
/// `per` is `Some("per-user")` or `Some("per-group")` in a user's or a
/// group's policy, where `user` and `group` rules, which decide whether a
/// connection may exist at all, make no sense.
fn parse_rule(
    src: &Source<'_, '_>,
    node: Node<'_, '_>,
    allow: bool,
    per: Option<&str>,
) -> Result<Option<Rule>, ConfigError> {
    src.check_attributes(node, &RULE_ATTRIBUTES)?;
    src.empty(node)?;
    check_rule_combination(src, node)?;
    let log = node.attribute("log") == Some("true");
    let element = node.tag_name().name();
    let has = |name: &str| node.attribute(name).is_some();
    let kind = if has_any(node, "send_") {
        RuleKind::Send(message_rule(src, node, "send", allow)?)
    } else if has_any(node, "receive_") || has("eavesdrop") {
        RuleKind::Receive(message_rule(src, node, "receive", allow)?)
    } else if let Some(name) = node.attribute("own") {
        RuleKind::Own(if name == "*" {
            NameMatch::Any
        } else {
            NameMatch::Exact(name.into())
        })
    } else if let Some(prefix) = node.attribute("own_prefix") {
        RuleKind::Own(NameMatch::Prefix(prefix.into()))
    } else {
        if let Some(per) = per {
            let message =
                format!("<{element}> rule cannot be {per} because it has bus-global semantics");
            return Err(src.error(node, message));
        }
        let context = format!("on element <{element}>");
        match (node.attribute("user"), node.attribute("group")) {
            (Some("*"), _) => RuleKind::User(None),
            (Some(user), _) => match lookup_user(user) {
                Some(uid) => RuleKind::User(Some(uid)),
                None => return Ok(src.unknown("username", user, &context, None)),
            },
            (None, Some("*")) => RuleKind::Group(None),
            (None, group) => match lookup_group(group.unwrap_or_default()) {
                Some(gid) => RuleKind::Group(Some(gid)),
                None => return Ok(src.unknown("group", group.unwrap_or_default(), &context, None)),
            },
        }
    };
    Ok(Some(Rule { allow, log, kind }))
}

/// Does the rule carry any attribute starting with `prefix`?
fn has_any(node: Node<'_, '_>, prefix: &str) -> bool {
    node.attributes()
        .any(|attribute| attribute.name().starts_with(prefix))
}

/// Refuses the attribute combinations dbus-daemon refuses.
fn check_rule_combination(src: &Source<'_, '_>, node: Node<'_, '_>) -> Result<(), ConfigError> {
    let element = node.tag_name().name();
    let has = |name: &str| node.attribute(name).is_some();
    let send = has_any(node, "send_");
    let receive = has_any(node, "receive_");
    let selectors = ["eavesdrop", "own", "own_prefix", "user", "group"];
    if !send && !receive && !selectors.iter().any(|name| has(name)) {
        return Err(src.error(
            node,
            format!("Element <{element}> must have one or more attributes"),
        ));
    }
    let member_alone = |kind: &str| {
        has(&format!("{kind}_member"))
            && !has(&format!("{kind}_interface"))
            && !has(&format!("{kind}_path"))
    };
    if member_alone("send") || member_alone("receive") {
        let message = format!(
            "On element <{element}>, if you specify a member you must specify an interface or a path. Keep in mind that not all messages have an interface field."
        );
        return Err(src.error(node, message));
    }
    let combination = |what: &str| {
        src.error(
            node,
            format!("Invalid combination of attributes on element <{element}>: {what}"),
        )
    };
    if send && receive {
        return Err(combination(
            "send and receive attributes cannot be combined",
        ));
    }
    let message_related = send || receive || has("eavesdrop") || has("min_fds") || has("max_fds");
    let kinds = [
        message_related,
        has("own"),
        has("own_prefix"),
        has("user"),
        has("group"),
    ];
    if kinds.iter().filter(|&&present| present).count() > 1 {
        return Err(combination(
            "own, own_prefix, user, group and the message-related attributes cannot be combined",
        ));
    }
    if has("send_destination") && has("send_destination_prefix") {
        return Err(combination(
            "send_destination cannot be combined with send_destination_prefix",
        ));
    }
    for kind in ["send", "receive"] {
        if has(&format!("{kind}_error"))
            && (has(&format!("{kind}_member")) || has(&format!("{kind}_interface")))
        {
            return Err(combination(&format!(
                "{kind}_error cannot be combined with {kind}_member or {kind}_interface"
            )));
        }
    }
    Ok(())
}

/// The `send_*` (`kind` = "send") or `receive_*` attributes of a rule.
fn message_rule(
    src: &Source<'_, '_>,
    node: Node<'_, '_>,
    kind: &str,
    allow: bool,
) -> Result<MessageRule, ConfigError> {
    let attribute = |name: &str| node.attribute(format!("{kind}_{name}").as_str());
    let pattern = |name: &str| {
        attribute(name)
            .filter(|value| *value != "*")
            .map(String::from)
    };
    let peer = match (
        pattern("destination"),
        pattern("destination_prefix"),
        pattern("sender"),
    ) {
        (Some(name), _, _) | (_, _, Some(name)) => NameMatch::Exact(name),
        (_, Some(prefix), _) => NameMatch::Prefix(prefix),
        _ => NameMatch::Any,
    };
    let broadcast = src.true_false(node, "send_broadcast")?;
    if let (Some(true), NameMatch::Exact(name)) = (broadcast, &peer) {
        let message = format!(
            "Rule with send_broadcast=\"true\" and send_destination=\"{name}\" cannot match anything"
        );
        return Err(src.error(node, message));
    }
    let message_type = match attribute("type") {
        None | Some("*") => None,
        Some(name) => Some(
            message_type(name)
                .ok_or_else(|| src.error(node, format!("Bad message type \"{name}\"")))?,
        ),
    };
    Ok(MessageRule {
        message_type,
        path: pattern("path"),
        interface: pattern("interface"),
        member: pattern("member"),
        error: pattern("error"),
        peer,
        broadcast,
        eavesdrop: src.true_false(node, "eavesdrop")?.unwrap_or(false),
        requested_reply: src
            .true_false(node, &format!("{kind}_requested_reply"))?
            .unwrap_or(allow),
        min_fds: src.fd_count(node, "min_fds")?.unwrap_or(0),
        max_fds: src
            .fd_count(node, "max_fds")?
            .unwrap_or(policy::MAX_MESSAGE_UNIX_FDS),
    })
}

fn message_type(name: &str) -> Option<Type> {
    match name {
        "method_call" => Some(Type::MethodCall),
        "method_return" => Some(Type::MethodReturn),
        "signal" => Some(Type::Signal),
        "error" => Some(Type::Error),
        _ => None,
    }
}

/// `<selinux>` may hold only `<associate own=".." context=".."/>`, which is
/// checked and ignored.
fn selinux(src: &Source<'_, '_>, node: Node<'_, '_>) -> Result<(), ConfigError> {
    src.check_attributes(node, &[])?;
    for child in node.children() {
        if !child.is_element() {
            src.no_text(child, "selinux")?;
            continue;
        }
        if child.tag_name().name() != "associate" {
            let message = format!(
                "Element <{}> not allowed inside <selinux> in configuration file",
                child.tag_name().name()
            );
            return Err(src.error(child, message));
        }
        src.check_attributes(child, &["own", "context"])?;
        src.empty(child)?;
        let (Some(own), Some(context)) = (child.attribute("own"), child.attribute("context"))
        else {
            let message = "Element <associate> must have attributes own=\"<servicename>\" and context=\"<selinux context>\"";
            return Err(src.error(child, message));
        };
        debug!(
            "{}: SELinux is not enabled, ignoring the context {context} of {own}",
            src.path.display()
        );
    }
    Ok(())
}

/// `<apparmor mode=".."/>`: checked and ignored.
fn apparmor(src: &Source<'_, '_>, node: Node<'_, '_>) -> Result<(), ConfigError> {
    src.check_attributes(node, &["mode"])?;
    src.empty(node)?;
    match node.attribute("mode") {
        None | Some("required" | "enabled" | "disabled") => {
            debug!(
                "{}: AppArmor mediation is not supported, ignoring <apparmor>",
                src.path.display()
            );
            Ok(())
        }
        Some(mode) => {
            let message = format!(
                "Mode attribute on <apparmor> must have value \"required\", \"enabled\" or \"disabled\", not \"{mode}\""
            );
            Err(src.error(node, message))
        }
    }
}

/// A limit's value: a decimal integer from 0 to `i32::MAX`, as dbus-daemon
/// stores limits in an `int`.
fn parse_limit(text: &str) -> Result<u32, &'static str> {
    let digits = text.strip_prefix('+').unwrap_or(text);
    let (negative, digits) = match digits.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, digits),
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err("element has invalid value (could not parse as integer)");
    }
    if negative && digits.bytes().any(|byte| byte != b'0') {
        return Err("must be a positive number");
    }
    digits
        .parse::<u32>()
        .ok()
        .filter(|value| i32::try_from(*value).is_ok())
        .ok_or("value is too large")
}

/// A user id from a number or a user name.
fn lookup_user(name: &str) -> Option<u32> {
    name.parse().ok().or_else(|| {
        let user = nix::unistd::User::from_name(name).ok().flatten()?;
        Some(user.uid.as_raw())
    })
}

/// A group id from a number or a group name.
fn lookup_group(name: &str) -> Option<u32> {
    name.parse().ok().or_else(|| {
        let group = nix::unistd::Group::from_name(name).ok().flatten()?;
        Some(group.gid.as_raw())
    })
}

impl Source<'_, '_> {
    fn error(&self, node: Node<'_, '_>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            line: Some(self.doc.text_pos_at(node.range().start).row),
            message: message.into(),
        }
    }

    /// Warns about an unknown user or group and returns `fallback`.
    fn unknown<T>(&self, what: &str, name: &str, context: &str, fallback: T) -> T {
        warn!(
            "{}: Unknown {what} \"{name}\" {context}",
            self.path.display()
        );
        fallback
    }

    /// `path` as written, or relative to the directory of this file.
    fn resolve(&self, path: &str) -> PathBuf {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        dir.join(path)
    }

    fn check_attributes(&self, node: Node<'_, '_>, allowed: &[&str]) -> Result<(), ConfigError> {
        match node
            .attributes()
            .find(|attribute| !allowed.contains(&attribute.name()))
        {
            Some(attribute) => Err(self.error(
                node,
                format!(
                    "Attribute \"{}\" is invalid on <{}> element in this context",
                    attribute.name(),
                    node.tag_name().name()
                ),
            )),
            None => Ok(()),
        }
    }

    /// A non-element child of `parent`: only whitespace text and comments
    /// are allowed. The error names the line where the text starts.
    fn no_text(&self, node: Node<'_, '_>, parent: &str) -> Result<(), ConfigError> {
        let Some(text) = node
            .text()
            .filter(|text| node.is_text() && !text.trim().is_empty())
        else {
            return Ok(());
        };
        let start = node.range().start + (text.len() - text.trim_start().len());
        Err(ConfigError {
            path: self.path.to_owned(),
            line: Some(self.doc.text_pos_at(start).row),
            message: format!(
                "No text content expected inside XML element {parent} in configuration file"
            ),
        })
    }

    /// An element without attributes or content (`<fork/>` and the like);
    /// returns true, the value of the flag it sets.
    fn flag(&self, node: Node<'_, '_>) -> Result<bool, ConfigError> {
        self.check_attributes(node, &[])?;
        self.empty(node)?;
        Ok(true)
    }

    /// An element without content.
    fn empty(&self, node: Node<'_, '_>) -> Result<(), ConfigError> {
        let name = node.tag_name().name();
        for child in node.children() {
            if child.is_element() {
                return Err(self.not_in_context(child));
            }
            self.no_text(child, name)?;
        }
        Ok(())
    }

    /// The text of an element without attributes; see [`Self::text`].
    fn plain_text(&self, node: Node<'_, '_>) -> Result<String, ConfigError> {
        self.check_attributes(node, &[])?;
        self.text(node)
    }

    /// The text of an element that must hold text and no elements, trimmed.
    fn text(&self, node: Node<'_, '_>) -> Result<String, ConfigError> {
        let name = node.tag_name().name();
        let mut text = String::new();
        for child in node.children() {
            if child.is_element() {
                return Err(self.not_in_context(child));
            }
            text.extend(child.text().filter(|_| child.is_text()));
        }
        match text.trim() {
            "" => Err(self.error(
                node,
                format!("XML element <{name}> was expected to have content inside it"),
            )),
            trimmed => Ok(trimmed.to_owned()),
        }
    }

    fn not_in_context(&self, node: Node<'_, '_>) -> ConfigError {
        self.error(
            node,
            format!(
                "Element <{}> is not allowed in this context",
                node.tag_name().name()
            ),
        )
    }

    /// An optional `yes`/`no` attribute, `no` when absent.
    fn yes_no(&self, node: Node<'_, '_>, name: &str) -> Result<bool, ConfigError> {
        match node.attribute(name) {
            None | Some("no") => Ok(false),
            Some("yes") => Ok(true),
            Some(_) => Err(self.error(
                node,
                format!("{name} attribute must have value \"yes\" or \"no\""),
            )),
        }
    }

    /// An optional `true`/`false` attribute.
    fn true_false(&self, node: Node<'_, '_>, name: &str) -> Result<Option<bool>, ConfigError> {
        match node.attribute(name) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(value) => Err(self.error(
                node,
                format!("Bad value \"{value}\" for {name} attribute, must be true or false"),
            )),
        }
    }

    /// An optional `min_fds`/`max_fds` attribute.
    fn fd_count(&self, node: Node<'_, '_>, name: &str) -> Result<Option<u32>, ConfigError> {
        let Some(value) = node.attribute(name) else {
            return Ok(None);
        };
        match value.parse::<u32>() {
            Ok(count) if count <= policy::MAX_MESSAGE_UNIX_FDS => Ok(Some(count)),
            _ => Err(self.error(
                node,
                format!(
                    "Bad value \"{value}\" for {name} attribute, must be an integer in range 0 to {} inclusive",
                    policy::MAX_MESSAGE_UNIX_FDS
                ),
            )),
        }
    }
}
