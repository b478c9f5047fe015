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
//!
//! `model.rs` holds the model ([`Config`], [`Limits`], [`ConfigError`]);
//! `parser.rs` reads the XML into it; `policy.rs` holds the `<policy>` rules
//! and decides what they allow; this file has the entry points.

mod model;
mod parser;
pub mod policy;

use std::path::Path;

use tracing::warn;

pub use model::{Config, ConfigError, Limits, SESSION_CONF, SYSTEM_CONF, SYSTEM_SERVICEDIRS};
use parser::Loader;
pub use policy::{MessageFacts, MessageRule, NameMatch, Party, Policy, Rule, RuleKind, Verdict};

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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;
    use std::time::Duration;

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
    pub(super) fn stock(name: &str) -> Config {
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
    pub(super) fn parse(body: &str) -> Result<Config, ConfigError> {
        let text =
            format!("<busconfig>\n<listen>unix:tmpdir=/tmp</listen>\n{body}\n</busconfig>\n");
        load_files(&[("bus.conf", &text)]).1
    }

    fn error_of(body: &str) -> ConfigError {
        parse(body).unwrap_err()
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
}
