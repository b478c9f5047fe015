//! The configuration as the rest of the bus reads it: what a `busconfig` file and its includes
//! say ([`Config`]), the limits ([`Limits`]), and why a file was refused ([`ConfigError`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::policy::Policy;

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

/// dbus-daemon's standard system service directories.
pub const SYSTEM_SERVICEDIRS: [&str; 3] = [
    "/usr/local/share/dbus-1/system-services",
    "/usr/share/dbus-1/system-services",
    "/lib/dbus-1/system-services",
];
