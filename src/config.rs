//! dbus-daemon's `busconfig` XML configuration files, read into a plain
//! model that the rest of the bus consumes.
//!
//! The reading follows dbus-daemon 1.14 (`bus/config-parser.c`) in what it
//! accepts and refuses: unknown elements, unknown attributes, bad values,
//! unknown limit names and circular includes are errors, reported with the
//! file, the line and the reason; an unknown user or group only drops the
//! policy or rule that names it, with a warning. A file of an `<includedir>`
//! that fails to load is skipped with a warning, as dbus-daemon does, so one
//! package's broken policy does not stop the bus.
//!
//! SELinux and AppArmor are never enabled here: `<selinux>`, `<apparmor>`
//! and the `<include if_selinux_enabled="yes">` /
//! `<include selinux_root_relative="yes">` files are checked and ignored.

pub mod policy;

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roxmltree::{Document, Node, ParsingOptions};
use tracing::{debug, warn};
use zbus::message::Type;

pub use policy::{MessageFacts, MessageRule, NameMatch, Party, Policy, Rule, RuleKind, Verdict};

/// Where the stock session configuration lives.
pub const SESSION_CONF: &str = "/usr/share/dbus-1/session.conf";
/// Where the stock system configuration lives.
pub const SYSTEM_CONF: &str = "/usr/share/dbus-1/system.conf";

/// Everything a configuration file (with its includes) says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `<type>`: the last one wins (`session`, `system`, or another name).
    pub bus_type: Option<String>,
    /// `<user>`: the user to run as, by name or number; the last one wins.
    pub user: Option<String>,
    /// `<fork/>`
    pub fork: bool,
    /// `<keep_umask/>`
    pub keep_umask: bool,
    /// `<syslog/>`
    pub syslog: bool,
    /// `<allow_anonymous/>`
    pub allow_anonymous: bool,
    /// `<pidfile>`: the last one wins.
    pub pidfile: Option<PathBuf>,
    /// `<listen>` addresses, in file order.
    pub listen: Vec<String>,
    /// `<auth>` mechanisms; empty means all known mechanisms.
    pub auth: Vec<String>,
    /// Service directories from `<servicedir>` and the
    /// `<standard_*_servicedirs/>` elements, in order, first one wins, no
    /// duplicates.
    pub servicedirs: Vec<PathBuf>,
    /// `<servicehelper>`: the setuid helper of a system bus.
    pub servicehelper: Option<PathBuf>,
    pub limits: Limits,
    pub policy: Policy,
}

/// dbus-daemon's resource limits, with its built-in defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_incoming_bytes: u32,
    pub max_incoming_unix_fds: u32,
    pub max_outgoing_bytes: u32,
    pub max_outgoing_unix_fds: u32,
    pub max_message_size: u32,
    pub max_message_unix_fds: u32,
    /// `service_start_timeout`
    pub service_start_timeout: Duration,
    pub auth_timeout: Duration,
    pub pending_fd_timeout: Duration,
    /// `None`: method calls never time out (dbus-daemon's default).
    pub reply_timeout: Option<Duration>,
    pub max_completed_connections: u32,
    pub max_incomplete_connections: u32,
    pub max_connections_per_user: u32,
    pub max_pending_service_starts: u32,
    pub max_names_per_connection: u32,
    pub max_match_rules_per_connection: u32,
    pub max_replies_per_connection: u32,
    pub max_containers: u32,
    pub max_containers_per_user: u32,
    pub max_container_metadata_bytes: u32,
    pub max_connections_per_container: u32,
}

impl Default for Limits {
    /// The values dbus-daemon uses when the configuration says nothing
    /// (they are listed in the stock system.conf).
    fn default() -> Self {
        const MIB: u32 = 1024 * 1024;
        Self {
            max_incoming_bytes: 127 * MIB,
            max_incoming_unix_fds: 64,
            max_outgoing_bytes: 127 * MIB,
            max_outgoing_unix_fds: 64,
            max_message_size: 32 * MIB,
            max_message_unix_fds: 16,
            service_start_timeout: Duration::from_millis(25_000),
            auth_timeout: Duration::from_millis(5_000),
            pending_fd_timeout: Duration::from_millis(150_000),
            reply_timeout: None,
            max_completed_connections: 2048,
            max_incomplete_connections: 64,
            max_connections_per_user: 256,
            max_pending_service_starts: 512,
            max_names_per_connection: 512,
            max_match_rules_per_connection: 512,
            max_replies_per_connection: 128,
            max_containers: 512,
            max_containers_per_user: 16,
            max_container_metadata_bytes: 4096,
            max_connections_per_container: 8,
        }
    }
}

impl Limits {
    /// Sets the limit called `name` (a dbus-daemon limit name) to `value`;
    /// false when there is no such limit.
    pub fn set(&mut self, name: &str, value: u32) -> bool {
        let millis = Duration::from_millis(u64::from(value));
        match name {
            "max_incoming_bytes" => self.max_incoming_bytes = value,
            "max_incoming_unix_fds" => self.max_incoming_unix_fds = value,
            "max_outgoing_bytes" => self.max_outgoing_bytes = value,
            "max_outgoing_unix_fds" => self.max_outgoing_unix_fds = value,
            "max_message_size" => self.max_message_size = value,
            "max_message_unix_fds" => self.max_message_unix_fds = value,
            "service_start_timeout" => self.service_start_timeout = millis,
            "auth_timeout" => self.auth_timeout = millis,
            "pending_fd_timeout" => self.pending_fd_timeout = millis,
            "reply_timeout" => self.reply_timeout = Some(millis),
            "max_completed_connections" => self.max_completed_connections = value,
            "max_incomplete_connections" => self.max_incomplete_connections = value,
            "max_connections_per_user" => self.max_connections_per_user = value,
            "max_pending_service_starts" => self.max_pending_service_starts = value,
            "max_names_per_connection" => self.max_names_per_connection = value,
            "max_match_rules_per_connection" => self.max_match_rules_per_connection = value,
            "max_replies_per_connection" => self.max_replies_per_connection = value,
            "max_containers" => self.max_containers = value,
            "max_containers_per_user" => self.max_containers_per_user = value,
            "max_container_metadata_bytes" => self.max_container_metadata_bytes = value,
            "max_connections_per_container" => self.max_connections_per_container = value,
            _ => return false,
        }
        true
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault (an included file when the problem is inside it).
    pub path: PathBuf,
    /// 1-based line of the problem, when there is one to name.
    pub line: Option<u32>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads the configuration file at `path` and everything it includes.
/// Like dbus-daemon, refuses a configuration without any `<listen>`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let mut loader = Loader::default();
    loader.load_file(path)?;
    with_listen(loader, path)
}

/// Parses `text` as the configuration file `path` would be read by [`load`] (the file need not
/// exist; includes resolve against its directory). The fuzzing harness (tests/fuzz.rs) feeds it
/// mutated files this way, without writing each one to disk.
pub fn load_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut loader = Loader::default();
    loader.load_text(text, path)?;
    with_listen(loader, path)
}

/// The configuration `loader` read from `path`, if it says where to listen.
fn with_listen(loader: Loader, path: &Path) -> Result<Config, ConfigError> {
    if loader.config.listen.is_empty() {
        return Err(ConfigError {
            path: path.to_owned(),
            line: None,
            message: "Configuration file needs one or more <listen> elements giving addresses"
                .into(),
        });
    }
    Ok(loader.config)
}

/// What the stock session configuration gives: [`SESSION_CONF`] when it
/// exists and loads, else a built-in copy of it (read the same way, so its
/// `/etc/dbus-1` includes still apply).
pub fn session_default() -> Config {
    let path = Path::new(SESSION_CONF);
    if path.exists() {
        match load(path) {
            Ok(config) => return config,
            Err(err) => warn!("{err}; using the built-in session configuration"),
        }
    }
    let mut loader = Loader::default();
    match loader.load_text(BUILTIN_SESSION_CONF, path) {
        Ok(()) => loader.config,
        Err(err) => {
            // Only a broken file in /etc/dbus-1 can get here.
            warn!("{err}; using built-in limits and no policy");
            Config::default()
        }
    }
}

/// dbus 1.14's `session.conf`, for machines that do not have it.
const BUILTIN_SESSION_CONF: &str = r#"<busconfig>
  <type>session</type>
  <keep_umask/>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <standard_session_servicedirs />
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  <include ignore_missing="yes">/etc/dbus-1/session.conf</include>
  <includedir>session.d</includedir>
  <includedir>/etc/dbus-1/session.d</includedir>
  <include ignore_missing="yes">/etc/dbus-1/session-local.conf</include>
  <include if_selinux_enabled="yes" selinux_root_relative="yes">contexts/dbus_contexts</include>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_incoming_unix_fds">250000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_outgoing_unix_fds">250000000</limit>
  <limit name="max_message_size">1000000000</limit>
  <limit name="service_start_timeout">120000</limit>
  <limit name="auth_timeout">240000</limit>
  <limit name="pending_fd_timeout">150000</limit>
  <limit name="max_completed_connections">100000</limit>
  <limit name="max_incomplete_connections">10000</limit>
  <limit name="max_connections_per_user">100000</limit>
  <limit name="max_pending_service_starts">10000</limit>
  <limit name="max_names_per_connection">50000</limit>
  <limit name="max_match_rules_per_connection">50000</limit>
  <limit name="max_replies_per_connection">50000</limit>
</busconfig>
"#;

/// dbus-daemon's standard system service directories.
pub const SYSTEM_SERVICEDIRS: [&str; 3] = [
    "/usr/local/share/dbus-1/system-services",
    "/usr/share/dbus-1/system-services",
    "/lib/dbus-1/system-services",
];

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
struct Loader {
    config: Config,
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
    fn load_file(&mut self, path: &Path) -> Result<(), ConfigError> {
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
    fn load_text(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Where Debian's dbus-tests keeps the reference implementation's
    /// configuration test files.
    const REFERENCE_DATA: &str = "/usr/lib/dbus-1.0/installed-tests/dbus/data";

    /// Writes `files` (name, contents) into a fresh directory and loads the
    /// first one.
    fn load_files(files: &[(&str, &str)]) -> (tempfile::TempDir, Result<Config, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            let path = dir.path().join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }
        let result = load(&dir.path().join(files[0].0));
        (dir, result)
    }

    /// Loads a copy of one of Debian's stock files (dbus 1.14, kept in `tests/data`) with its
    /// `/etc/dbus-1` includes pointed at an empty directory, so that what other packages
    /// installed on this host (NetworkManager's `system.d` file, say) changes nothing.
    fn stock(name: &str) -> Config {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name);
        let text = fs::read_to_string(&path).unwrap();
        stock_text(&text, name)
    }

    /// Loads `text` as the file `name` of an empty directory, with an empty `etc` beside it
    /// in place of `/etc/dbus-1`.
    fn stock_text(text: &str, name: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let etc = format!("{}/etc/", dir.path().display());
        let copy = dir.path().join(name);
        fs::write(&copy, text.replace("/etc/dbus-1/", &etc)).unwrap();
        load(&copy).unwrap()
    }

    /// Loads a configuration whose `<busconfig>` holds `body` after a listen address.
    fn parse(body: &str) -> Result<Config, ConfigError> {
        let text =
            format!("<busconfig>\n<listen>unix:tmpdir=/tmp</listen>\n{body}\n</busconfig>\n");
        load_files(&[("bus.conf", &text)]).1
    }

    fn rules_of(body: &str) -> Vec<Rule> {
        let config = parse(&format!("<policy context=\"default\">{body}</policy>")).unwrap();
        config.policy.default
    }

    fn error_of(body: &str) -> ConfigError {
        parse(body).unwrap_err()
    }

    fn send_rule(rule: &Rule) -> &MessageRule {
        match &rule.kind {
            RuleKind::Send(send) => send,
            other => panic!("not a send rule: {other:?}"),
        }
    }

    #[test]
    fn stock_session_conf_is_read_as_dbus_daemon_reads_it() {
        let config = stock("session.conf");
        assert_eq!(config.bus_type.as_deref(), Some("session"));
        assert_eq!(config.listen, ["unix:tmpdir=/tmp"]);
        assert_eq!(config.auth, ["EXTERNAL"]);
        assert!(config.keep_umask && !config.fork && !config.syslog);
        let session_dirs = crate::activation::files::session_dirs(|k| std::env::var(k).ok());
        assert_eq!(config.servicedirs, session_dirs);
        assert_eq!(
            config.limits.service_start_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(config.limits.auth_timeout, Duration::from_secs(240));
        assert_eq!(config.limits.max_names_per_connection, 50_000);
        assert_eq!(config.limits.max_message_size, 1_000_000_000);
        // Not overridden by session.conf: the built-in default stays.
        assert_eq!(config.limits.max_message_unix_fds, 16);
        assert_eq!(config.limits.reply_timeout, None);
        assert_eq!(config.policy.default.len(), 3);
        assert!(config.policy.check_own("org.example.Anything", 1000, &[]));
    }

    #[test]
    fn the_builtin_session_configuration_equals_the_stock_file() {
        assert_eq!(
            stock_text(BUILTIN_SESSION_CONF, "session.conf"),
            stock("session.conf")
        );
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
    fn every_valid_reference_file_loads_and_every_invalid_one_is_refused() {
        for dir in ["valid-config-files", "valid-config-files-system"] {
            for path in conf_files(&Path::new(REFERENCE_DATA).join(dir)) {
                if let Err(err) = load(&path) {
                    panic!("{} should load: {err}", path.display());
                }
            }
        }
        for path in conf_files(&Path::new(REFERENCE_DATA).join("invalid-config-files")) {
            assert!(load(&path).is_err(), "{} should be refused", path.display());
        }
    }

    fn conf_files(dir: &Path) -> Vec<PathBuf> {
        let entries = fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        let mut files: Vec<PathBuf> = entries
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "conf"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no files in {}", dir.display());
        files
    }

    #[test]
    fn reference_configuration_details_are_kept() {
        let config =
            load(&Path::new(REFERENCE_DATA).join("valid-config-files/basic.conf")).unwrap();
        assert_eq!(config.user.as_deref(), Some("mybususer"));
        // basic.d/basic.conf repeats the same elements.
        let listen = ["unix:path=/foo/bar", "tcp:port=1234"];
        assert_eq!(config.listen, [listen, listen].concat());
        assert_eq!(config.servicedirs, [PathBuf::from("/usr/share/foo")]);
        assert_eq!(config.limits.max_message_size, 300);
        assert_eq!(config.limits.max_completed_connections, 50);
        let entities =
            load(&Path::new(REFERENCE_DATA).join("valid-config-files/entities.conf")).unwrap();
        assert_eq!(
            entities.listen[..2],
            ["unix:path=/foo/<bar>", "tcp:port=1234"]
        );
        // Entities decoded: basic.&#100; is basic.d, whose servicedir comes first.
        assert_eq!(
            entities.servicedirs,
            [PathBuf::from("/usr/share/foo"), "/usr/&share/foo".into()]
        );
        assert_eq!(entities.policy.default, config.policy.default);
    }

    #[test]
    fn includes_are_relative_to_the_including_file_and_apply_in_place() {
        let (_dir, config) = load_files(&[
            (
                "main.conf",
                r#"<busconfig>
                  <listen>unix:path=/first</listen>
                  <limit name="max_names_per_connection">10</limit>
                  <include>sub/extra.conf</include>
                  <include ignore_missing="yes">sub/missing.conf</include>
                  <include if_selinux_enabled="yes" selinux_root_relative="yes">contexts/dbus_contexts</include>
                  <listen>unix:path=/last</listen>
                </busconfig>"#,
            ),
            (
                "sub/extra.conf",
                r#"<busconfig>
                  <listen>unix:path=/included</listen>
                  <servicedir>services</servicedir>
                  <limit name="max_names_per_connection">20</limit>
                </busconfig>"#,
            ),
        ]);
        let config = config.unwrap();
        assert_eq!(
            config.listen,
            ["unix:path=/first", "unix:path=/included", "unix:path=/last"]
        );
        assert_eq!(config.limits.max_names_per_connection, 20);
        assert!(config.servicedirs[0].ends_with("sub/services"));
        assert!(config.servicedirs[0].is_absolute());
    }

    #[test]
    fn a_missing_include_is_an_error_at_the_include() {
        let (_dir, result) = load_files(&[(
            "main.conf",
            "<busconfig>\n<listen>unix:path=/a</listen>\n<include>nope.conf</include>\n</busconfig>",
        )]);
        let err = result.unwrap_err();
        assert!(err.path.ends_with("main.conf"));
        assert_eq!(err.line, Some(3));
        assert!(err.message.starts_with("Failed to open"), "{err}");
    }

    #[test]
    fn an_error_inside_an_included_file_names_that_file_and_line() {
        let (_dir, result) = load_files(&[
            (
                "main.conf",
                "<busconfig><listen>unix:path=/a</listen><include>b.conf</include></busconfig>",
            ),
            ("b.conf", "<busconfig>\n\n<bees/>\n</busconfig>"),
        ]);
        let err = result.unwrap_err();
        assert!(err.path.ends_with("b.conf"), "{err}");
        assert_eq!(err.line, Some(3));
        assert_eq!(
            err.message,
            "Element <bees> not allowed inside <busconfig> in configuration file"
        );
    }

    #[test]
    fn circular_includes_are_refused() {
        let (_dir, result) = load_files(&[
            (
                "a.conf",
                "<busconfig><listen>unix:path=/a</listen><include>b.conf</include></busconfig>",
            ),
            ("b.conf", "<busconfig><include>a.conf</include></busconfig>"),
        ]);
        let err = result.unwrap_err();
        assert!(
            err.message.starts_with("Circular inclusion of file"),
            "{err}"
        );
        let (_dir, result) = load_files(&[(
            "self.conf",
            "<busconfig><listen>unix:path=/a</listen><include>self.conf</include></busconfig>",
        )]);
        assert!(
            result
                .unwrap_err()
                .message
                .starts_with("Circular inclusion")
        );
    }

    #[test]
    fn includedir_reads_conf_files_in_name_order_and_skips_broken_ones() {
        let (_dir, config) = load_files(&[
            (
                "main.conf",
                r#"<busconfig>
                  <listen>unix:path=/main</listen>
                  <includedir>conf.d</includedir>
                  <includedir>missing.d</includedir>
                </busconfig>"#,
            ),
            (
                "conf.d/20-b.conf",
                "<busconfig><listen>unix:path=/b</listen></busconfig>",
            ),
            (
                "conf.d/10-a.conf",
                "<busconfig><listen>unix:path=/a</listen></busconfig>",
            ),
            (
                "conf.d/30-c.txt",
                "<busconfig><listen>unix:path=/c</listen></busconfig>",
            ),
            (
                "conf.d/15-broken.conf",
                "<busconfig><listen>unix:path=/broken</listen><bees/></busconfig>",
            ),
        ]);
        assert_eq!(
            config.unwrap().listen,
            ["unix:path=/main", "unix:path=/a", "unix:path=/b"]
        );
    }

    #[test]
    fn limits_start_from_the_reference_defaults_and_take_overrides() {
        assert_eq!(parse("").unwrap().limits, Limits::default());
        let config = parse(
            r#"<limit name="reply_timeout">100</limit>
               <limit name="pending_fd_timeout"> 500 </limit>
               <limit name="max_incoming_bytes">1</limit>
               <limit name="max_containers">3</limit>
               <limit name="max_replies_per_connection">2147483647</limit>
               <limit name="max_match_rules_per_connection">+0</limit>"#,
        )
        .unwrap();
        let limits = config.limits;
        assert_eq!(limits.reply_timeout, Some(Duration::from_millis(100)));
        assert_eq!(limits.pending_fd_timeout, Duration::from_millis(500));
        assert_eq!(limits.max_incoming_bytes, 1);
        assert_eq!(limits.max_containers, 3);
        assert_eq!(limits.max_replies_per_connection, 2_147_483_647);
        assert_eq!(limits.max_match_rules_per_connection, 0);
        assert_eq!(limits.max_outgoing_bytes, 127 * 1024 * 1024);
    }

    #[test]
    fn every_reference_limit_name_is_known() {
        let names = [
            "max_incoming_bytes",
            "max_incoming_unix_fds",
            "max_outgoing_bytes",
            "max_outgoing_unix_fds",
            "max_message_size",
            "max_message_unix_fds",
            "service_start_timeout",
            "auth_timeout",
            "pending_fd_timeout",
            "reply_timeout",
            "max_completed_connections",
            "max_incomplete_connections",
            "max_connections_per_user",
            "max_pending_service_starts",
            "max_names_per_connection",
            "max_match_rules_per_connection",
            "max_replies_per_connection",
            "max_containers",
            "max_containers_per_user",
            "max_container_metadata_bytes",
            "max_connections_per_container",
        ];
        for name in names {
            let mut limits = Limits::default();
            assert!(limits.set(name, 7), "{name}");
            assert_ne!(limits, Limits::default(), "{name} changed nothing");
        }
        assert!(!Limits::default().set("max_bees", 1));
    }

    /// Refusals, with dbus-daemon 1.14's own messages (checked against it).
    #[test]
    fn bad_configurations_are_refused_with_the_reference_reasons() {
        let cases = [
            (
                "<bees/>",
                "Element <bees> not allowed inside <busconfig> in configuration file",
            ),
            (
                "<listen carefully=\"yes\">tcp:port=1</listen>",
                "Attribute \"carefully\" is invalid on <listen> element in this context",
            ),
            (
                "<limit wildebeest=\"gnu\">5</limit>",
                "Attribute \"wildebeest\" is invalid on <limit> element in this context",
            ),
            (
                "<limit>5</limit>",
                "<limit> element must have a \"name\" attribute",
            ),
            (
                "<limit name=\"max_bees\">5</limit>",
                "There is no limit called \"max_bees\"",
            ),
            (
                "<limit name=\"max_names_per_connection\">bees</limit>",
                "<limit name=\"max_names_per_connection\"> element has invalid value (could not parse as integer)",
            ),
            (
                "<limit name=\"max_names_per_connection\">-1</limit>",
                "<limit name=\"max_names_per_connection\"> must be a positive number",
            ),
            (
                "<limit name=\"max_names_per_connection\">3123123123</limit>",
                "<limit name=\"max_names_per_connection\"> value is too large",
            ),
            (
                "<limit name=\"max_names_per_connection\"></limit>",
                "XML element <limit> was expected to have content inside it",
            ),
            (
                "<type>x<b/></type>",
                "Element <b> is not allowed in this context",
            ),
            (
                "<fork>x</fork>",
                "No text content expected inside XML element fork in configuration file",
            ),
            (
                "<fork foo=\"1\"/>",
                "Attribute \"foo\" is invalid on <fork> element in this context",
            ),
            (
                "junk",
                "No text content expected inside XML element busconfig in configuration file",
            ),
            (
                "<include selinux_root_relative=\"jomoma\">blah</include>",
                "selinux_root_relative attribute must have value \"yes\" or \"no\"",
            ),
            (
                "<include if_selinux_enabled=\"moo\">blah</include>",
                "if_selinux_enabled attribute must have value \"yes\" or \"no\"",
            ),
            (
                "<apparmor enforcement_style=\"Judge Dredd\"/>",
                "Attribute \"enforcement_style\" is invalid on <apparmor> element in this context",
            ),
            (
                "<apparmor mode=\"plaintive\"/>",
                "Mode attribute on <apparmor> must have value \"required\", \"enabled\" or \"disabled\", not \"plaintive\"",
            ),
            (
                "<selinux><bees/></selinux>",
                "Element <bees> not allowed inside <selinux> in configuration file",
            ),
            (
                "<selinux><associate own=\"a\"/></selinux>",
                "Element <associate> must have attributes own=\"<servicename>\" and context=\"<selinux context>\"",
            ),
            (
                "<policy/>",
                "<policy> element must have exactly one of (context|user|group|at_console) attributes",
            ),
            (
                "<policy user=\"root\" at_console=\"true\"/>",
                "<policy> element must have exactly one of (context|user|group|at_console) attributes",
            ),
            (
                "<policy hat=\"top\"/>",
                "Attribute \"hat\" is invalid on <policy> element in this context",
            ),
            (
                "<policy context=\"apropos of nothing\"/>",
                "context attribute on <policy> must have the value \"default\" or \"mandatory\", not \"apropos of nothing\"",
            ),
            (
                "<policy at_console=\"somewhere\"/>",
                "Unknown value \"somewhere\" for at_console in message bus configuration file",
            ),
            (
                "<policy context=\"default\"><bees/></policy>",
                "Element <bees> not allowed inside <policy> in configuration file",
            ),
            (
                "<policy context=\"default\">text</policy>",
                "No text content expected inside XML element policy in configuration file",
            ),
            (
                "<policy context=\"default\"><allow/></policy>",
                "Element <allow> must have one or more attributes",
            ),
            (
                "<policy context=\"default\"><allow min_fds=\"1\" log=\"true\"/></policy>",
                "Element <allow> must have one or more attributes",
            ),
            (
                "<policy context=\"default\"><allow species=\"stoat\"/></policy>",
                "Attribute \"species\" is invalid on <allow> element in this context",
            ),
            (
                "<policy context=\"default\"><allow own=\"*\"><deny own=\"x\"/></allow></policy>",
                "Element <deny> is not allowed in this context",
            ),
            (
                "<policy context=\"default\"><deny send_member=\"Reboot\"/></policy>",
                "On element <deny>, if you specify a member you must specify an interface or a path. Keep in mind that not all messages have an interface field.",
            ),
            (
                "<policy context=\"default\"><allow receive_member=\"x\"/></policy>",
                "On element <allow>, if you specify a member you must specify an interface or a path. Keep in mind that not all messages have an interface field.",
            ),
            (
                "<policy context=\"default\"><allow receive_type=\"signal\" send_destination=\"a\"/></policy>",
                "Invalid combination of attributes on element <allow>: send and receive attributes cannot be combined",
            ),
            (
                "<policy context=\"default\"><allow user=\"*\" own=\"a\"/></policy>",
                "Invalid combination of attributes on element <allow>: own, own_prefix, user, group and the message-related attributes cannot be combined",
            ),
            (
                "<policy context=\"default\"><allow own=\"a\" own_prefix=\"b\"/></policy>",
                "Invalid combination of attributes on element <allow>: own, own_prefix, user, group and the message-related attributes cannot be combined",
            ),
            (
                "<policy context=\"default\"><allow own=\"a\" eavesdrop=\"true\"/></policy>",
                "Invalid combination of attributes on element <allow>: own, own_prefix, user, group and the message-related attributes cannot be combined",
            ),
            (
                "<policy context=\"default\"><allow send_destination=\"a\" send_destination_prefix=\"a\"/></policy>",
                "Invalid combination of attributes on element <allow>: send_destination cannot be combined with send_destination_prefix",
            ),
            (
                "<policy context=\"default\"><allow send_error=\"e\" send_interface=\"i\"/></policy>",
                "Invalid combination of attributes on element <allow>: send_error cannot be combined with send_member or send_interface",
            ),
            (
                "<policy context=\"default\"><allow send_broadcast=\"true\" send_destination=\"com.example.Bees\"/></policy>",
                "Rule with send_broadcast=\"true\" and send_destination=\"com.example.Bees\" cannot match anything",
            ),
            (
                "<policy context=\"default\"><allow send_type=\"bogus\"/></policy>",
                "Bad message type \"bogus\"",
            ),
            (
                "<policy context=\"default\"><allow send_type=\"error\" send_requested_reply=\"maybe\"/></policy>",
                "Bad value \"maybe\" for send_requested_reply attribute, must be true or false",
            ),
            (
                "<policy context=\"default\"><allow send_type=\"*\" min_fds=\"-1\"/></policy>",
                "Bad value \"-1\" for min_fds attribute, must be an integer in range 0 to 33554432 inclusive",
            ),
            (
                "<policy user=\"root\"><allow user=\"*\"/></policy>",
                "<allow> rule cannot be per-user because it has bus-global semantics",
            ),
            (
                "<policy group=\"root\"><deny group=\"*\"/></policy>",
                "<deny> rule cannot be per-group because it has bus-global semantics",
            ),
        ];
        for (body, message) in cases {
            let err = error_of(body);
            assert_eq!(err.message, message, "for {body}");
            assert_eq!(err.line, Some(3), "for {body}");
        }
    }

    #[test]
    fn malformed_xml_is_refused_with_its_line() {
        let err = error_of("<user>mybususer</foo>");
        assert_eq!(err.line, Some(3));
        assert!(err.path.ends_with("bus.conf"));
        let (_dir, result) = load_files(&[(
            "t.conf",
            "<busconfig>\n<listen>a:b</listen>\n<include ignore_missing=\"y",
        )]);
        assert_eq!(result.unwrap_err().line, Some(3));
        let err =
            error_of("<limit name=\"max_incoming_bytes\" name=\"max_incoming_bytes\">5000</limit>");
        assert_eq!(err.line, Some(3));
        let (_dir, result) = load_files(&[("t.conf", "<notbus><listen>a:b</listen></notbus>")]);
        assert_eq!(
            result.unwrap_err().message,
            "Unknown element <notbus> at root of configuration file"
        );
        let (_dir, result) = load_files(&[("t.conf", "<busconfig/>")]);
        let err = result.unwrap_err();
        assert_eq!(
            (err.line, err.message.as_str()),
            (
                None,
                "Configuration file needs one or more <listen> elements giving addresses"
            )
        );
    }

    #[test]
    fn ignored_elements_are_accepted() {
        let config = parse(
            r#"<apparmor mode="enabled"/>
               <selinux><associate own="org.example.A" context="a_t"/></selinux>
               <standard_system_servicedirs/>
               <allow_anonymous/>
               <policy at_console="true"><allow own="*"/></policy>
               <policy user="no-such-user-xyzzy"><allow own="*"/></policy>
               <policy context="default"><allow user="no-such-user-xyzzy"/></policy>"#,
        )
        .unwrap();
        assert!(config.allow_anonymous);
        assert_eq!(config.policy, Policy::default());
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
