//! The command line, in dbus-daemon's spelling: `--flag=value` and `--flag value` both work.

use std::fmt;
use std::path::PathBuf;

/// Where log lines go (`--syslog`, `--nosyslog`, `--syslog-only`); see `logging`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// Neither flag: what the configuration's `<syslog/>` says.
    #[default]
    Config,
    Stderr,
    Syslog,
    SyslogOnly,
}

/// What the command line asks for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Options {
    pub session: bool,
    pub system: bool,
    /// `--config-file`: the busconfig file to read instead of the stock one.
    pub config_file: Option<PathBuf>,
    pub address: Option<String>,
    /// Print the address to this fd (1 when no fd is given).
    pub print_address: Option<i32>,
    pub print_pid: Option<i32>,
    /// `--fork` (true) or `--nofork` (false); neither: the configuration's `<fork/>`.
    pub fork: Option<bool>,
    /// `--nopidfile`: do not write the configuration's `<pidfile>`.
    pub nopidfile: bool,
    /// `--systemd-activation`: services with `SystemdService=` are started through systemd.
    pub systemd_activation: bool,
    pub log_target: LogTarget,
    /// `--introspect`: print the driver's introspection data and exit.
    pub introspect: bool,
    pub activation_dirs: Vec<PathBuf>,
    /// Default start timeout of a service, in milliseconds.
    pub start_timeout_ms: Option<u64>,
    /// The start-limit guard: this many failed starts ...
    pub start_limit_burst: Option<u64>,
    /// ... within this many milliseconds.
    pub start_limit_interval_ms: Option<u64>,
    /// `--stop-grace-ms`: when the bus stops, how long the processes it started or adopted
    /// have before SIGKILL (default [`crate::supervisor::DEFAULT_STOP_GRACE`]).
    pub stop_grace_ms: Option<u64>,
    pub version: bool,
    pub help: bool,
    /// `--log-file`: where `broker run` writes the bus's log (else only warnings, to stderr).
    pub log_file: Option<PathBuf>,
    /// `broker run [OPTION]... [--] COMMAND [ARG]...`: COMMAND and its arguments, empty when
    /// none was given; `None` for the bus alone.
    pub run: Option<Vec<String>>,
    /// `broker status | stop | logs ...`: a client of a running bus, not a bus.
    pub control: Option<ControlCommand>,
}

/// What `broker status`, `broker stop` and `broker logs` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    Status,
    Stop,
    Logs,
}

/// A command of the supervisor's command-line client (see `control`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlCommand {
    pub action: ControlAction,
    /// The service; `broker status` without it lists them all.
    pub name: Option<String>,
    /// `--address`; else `$DBUS_SESSION_BUS_ADDRESS` (or the system bus's with `--system`).
    pub address: Option<String>,
    pub system: bool,
    /// `status --json`.
    pub json: bool,
    /// `logs -n N` (default 50).
    pub lines: u32,
    /// `logs -f`.
    pub follow: bool,
}

/// The usage of the client commands, for `--help` and their errors.
pub const CONTROL_USAGE: &str = concat!(
    "       broker status [--json] [NAME] [--address=ADDRESS | --system]\n",
    "       broker stop NAME [--address=ADDRESS | --system]\n",
    "       broker logs NAME [-n N] [-f] [--address=ADDRESS | --system]\n",
);

impl ControlCommand {
    /// Parses what follows `status`, `stop` or `logs`.
    fn parse(
        action: ControlAction,
        args: impl Iterator<Item = String>,
    ) -> Result<Self, UsageError> {
        let mut cmd = ControlCommand {
            action,
            name: None,
            address: None,
            system: false,
            json: false,
            lines: 50,
            follow: false,
        };
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| UsageError(format!("{flag} needs a value")))
            };
            match (flag.as_str(), action) {
                ("--address", _) => cmd.address = Some(value()?),
                ("--system", _) => cmd.system = true,
                ("--json", ControlAction::Status) => cmd.json = true,
                ("-n" | "--lines", ControlAction::Logs) => {
                    let n = value()?;
                    cmd.lines = n.parse().map_err(|_| {
                        UsageError(format!("-n: {n:?} is not a whole number of lines"))
                    })?;
                }
                ("-f" | "--follow", ControlAction::Logs) => cmd.follow = true,
                (other, _) if other.starts_with('-') => {
                    return Err(UsageError(format!("unknown option {other}")));
                }
                (name, _) if cmd.name.is_none() => cmd.name = Some(name.to_owned()),
                (extra, _) => return Err(UsageError(format!("unexpected argument {extra}"))),
            }
        }
        if cmd.name.is_none() && action != ControlAction::Status {
            return Err(UsageError(format!(
                "no service NAME given\nusage:\n{CONTROL_USAGE}"
            )));
        }
        if cmd.system && cmd.address.is_some() {
            return Err(UsageError(
                "only one of --address and --system may be given".into(),
            ));
        }
        Ok(cmd)
    }
}

/// A command line that cannot be used; the text is a one-line reason.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every option, as `--help` lists it: the spelling and one line on what it does.
#[rustfmt::skip]
pub const OPTIONS: &[(&str, &str)] = &[
    ("--session", "run a session bus (the default): stock session configuration, $XDG_RUNTIME_DIR/bus"),
    ("--system", "run the system bus, reading /usr/share/dbus-1/system.conf"),
    ("--config-file=FILE", "read this dbus-daemon configuration file instead"),
    ("--address=ADDRESS", "listen on ADDRESS (unix:path=, unix:tmpdir=, unix:dir=, unix:abstract=, unix:runtime=yes, systemd:)"),
    ("--print-address[=FD]", "write the address the bus listens on to FD (default 1, standard output)"),
    ("--print-pid[=FD]", "write the bus's process id to FD (default 1)"),
    ("--fork", "run in the background once listening"),
    ("--nofork", "stay in the foreground, whatever the configuration says"),
    ("--nopidfile", "write no pid file, whatever the configuration says"),
    ("--systemd-activation", "start services whose file has SystemdService= through systemd"),
    ("--nosyslog", "log to standard error only"),
    ("--syslog", "log to the system log and standard error"),
    ("--syslog-only", "log to the system log only"),
    ("--introspect", "print the bus driver's introspection XML and exit"),
    ("--activation-dir=DIR", "also read activation files (*.toml, *.service) from DIR; repeatable"),
    ("--start-timeout-ms=MS", "how long a started service may take to own its name"),
    ("--start-limit-burst=N", "after N failed starts of a service within the interval, fail at once"),
    ("--start-limit-interval-ms=MS", "the interval of --start-limit-burst (default 10000)"),
    ("--stop-grace-ms=MS", "at stop, how long services' processes have before SIGKILL (default 5000)"),
    ("--log-file=FILE", "broker run: write the bus's log to FILE (without it, only warnings and errors, to standard error)"),
    ("--version", "print the version and exit"),
    ("--help", "print this help and exit"),
];

/// The text of `--help`: a usage line, then every option on a line of its own.
pub fn help() -> String {
    let width = OPTIONS
        .iter()
        .map(|(flag, _)| flag.len())
        .max()
        .unwrap_or(0);
    let mut text = String::from(
        "usage: broker [OPTION]...\n       broker run [OPTION]... [--] COMMAND [ARG]...\n",
    );
    text.push_str(CONTROL_USAGE);
    text.push_str(
        "A D-Bus message bus that starts services on demand and keeps them as its children.\n\
         broker run starts a private session bus, runs COMMAND with DBUS_SESSION_BUS_ADDRESS set\n\
         to it, stops the bus and every service when COMMAND exits, and exits with COMMAND's status.\n\
         broker status, stop and logs show, stop and read the services of a running bus.\n\n",
    );
    for (flag, what) in OPTIONS {
        text.push_str(&format!("  {flag:width$}  {what}\n"));
    }
    text.push_str(
        "\nEnvironment: BROKER_LOG (a tracing filter: warn, info, debug, trace). See broker(1).\n",
    );
    text
}

impl Options {
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options, UsageError> {
        let mut opts = Options::default();
        let mut args = args.into_iter().peekable();
        let action = args.peek().and_then(|first| match first.as_str() {
            "status" => Some(ControlAction::Status),
            "stop" => Some(ControlAction::Stop),
            "logs" => Some(ControlAction::Logs),
            _ => None,
        });
        if let Some(action) = action {
            args.next();
            opts.control = Some(ControlCommand::parse(action, args)?);
            return Ok(opts);
        }
        if args.next_if(|first| first == "run").is_some() {
            opts.run = Some(Vec::new());
        }
        while let Some(arg) = args.next() {
            // `broker run`: the first argument that is not an option, or all after `--`, is
            // COMMAND; what follows it is COMMAND's, options or not.
            if let Some(command) = &mut opts.run
                && (arg == "--" || !arg.starts_with('-'))
            {
                command.extend((arg != "--").then_some(arg));
                command.extend(args.by_ref());
                break;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let takes_no_value = !matches!(
                flag.as_str(),
                "--address"
                    | "--config-file"
                    | "--activation-dir"
                    | "--start-timeout-ms"
                    | "--start-limit-burst"
                    | "--start-limit-interval-ms"
                    | "--stop-grace-ms"
                    | "--print-address"
                    | "--print-pid"
                    | "--log-file"
            );
            if takes_no_value && inline.is_some() {
                return Err(UsageError(format!("{flag} takes no value")));
            }
            let mut value = |name: &str| -> Result<String, UsageError> {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| UsageError(format!("{name} needs a value")))
            };
            match flag.as_str() {
                "--session" => opts.session = true,
                "--system" => opts.system = true,
                "--config-file" => {
                    let file = value(&flag)?;
                    if opts.config_file.is_some() {
                        return Err(UsageError("--config-file given twice".into()));
                    }
                    opts.config_file = Some(PathBuf::from(file));
                }
                "--address" => opts.address = Some(value("--address")?),
                "--activation-dir" => opts
                    .activation_dirs
                    .push(PathBuf::from(value("--activation-dir")?)),
                "--start-timeout-ms" => {
                    opts.start_timeout_ms = Some(number(&flag, &value(&flag)?)?)
                }
                "--start-limit-burst" => {
                    opts.start_limit_burst = Some(number(&flag, &value(&flag)?)?)
                }
                "--start-limit-interval-ms" => {
                    opts.start_limit_interval_ms = Some(number(&flag, &value(&flag)?)?)
                }
                "--stop-grace-ms" => opts.stop_grace_ms = Some(number(&flag, &value(&flag)?)?),
                "--print-address" | "--print-pid" => {
                    // The fd is optional; a following argument is taken only if it is a number.
                    let fd = match inline {
                        Some(v) => parse_fd(&flag, &v)?,
                        None => match args.peek().and_then(|next| next.parse::<i32>().ok()) {
                            Some(fd) => {
                                args.next();
                                check_fd(&flag, fd)?
                            }
                            None => 1,
                        },
                    };
                    if flag == "--print-address" {
                        opts.print_address = Some(fd);
                    } else {
                        opts.print_pid = Some(fd);
                    }
                }
                "--nofork" => opts.fork = Some(false),
                "--fork" => opts.fork = Some(true),
                "--nopidfile" => opts.nopidfile = true,
                "--systemd-activation" => opts.systemd_activation = true,
                "--nosyslog" => opts.log_target = LogTarget::Stderr,
                "--syslog" => opts.log_target = LogTarget::Syslog,
                "--syslog-only" => opts.log_target = LogTarget::SyslogOnly,
                "--introspect" => opts.introspect = true,
                "--log-file" => opts.log_file = Some(PathBuf::from(value(&flag)?)),
                "--version" => opts.version = true,
                "--help" | "-h" => opts.help = true,
                other => return Err(UsageError(format!("unknown option {other}"))),
            }
        }
        if [opts.session, opts.system, opts.config_file.is_some()]
            .iter()
            .filter(|b| **b)
            .count()
            > 1
        {
            return Err(UsageError(
                "only one of --session, --system and --config-file may be given".into(),
            ));
        }
        Ok(opts)
    }
}

/// A positive whole number.
fn number(flag: &str, value: &str) -> Result<u64, UsageError> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| UsageError(format!("{flag}: {value:?} is not a positive whole number")))
}

fn parse_fd(flag: &str, value: &str) -> Result<i32, UsageError> {
    let fd = value
        .parse::<i32>()
        .map_err(|_| UsageError(format!("{flag}: {value:?} is not a file descriptor number")))?;
    check_fd(flag, fd)
}

fn check_fd(flag: &str, fd: i32) -> Result<i32, UsageError> {
    if fd < 0 {
        return Err(UsageError(format!(
            "{flag}: {fd} is not a file descriptor number"
        )));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, UsageError> {
        Options::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn every_option_that_help_lists_is_accepted() {
        for (spelling, _) in OPTIONS {
            let flag = spelling.split(['=', '[']).next().unwrap();
            let arg = if spelling.contains("=") && !spelling.contains("[=") {
                format!("{flag}=1")
            } else {
                flag.to_owned()
            };
            assert!(parse(&[&arg]).is_ok(), "{arg} is refused");
        }
        assert!(parse(&["-h"]).unwrap().help);
    }

    #[test]
    fn both_value_forms_work() {
        let a = parse(&["--session", "--address=unix:path=/x", "--print-address=5"]).unwrap();
        let b = parse(&[
            "--session",
            "--address",
            "unix:path=/x",
            "--print-address",
            "5",
        ])
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.print_address, Some(5));
        assert_eq!(a.address.as_deref(), Some("unix:path=/x"));
    }

    #[test]
    fn print_flags_default_to_stdout() {
        let o = parse(&["--print-address", "--print-pid", "--session"]).unwrap();
        assert_eq!((o.print_address, o.print_pid), (Some(1), Some(1)));
        assert!(o.session);
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            parse(&["--frobnicate"]).unwrap_err().0,
            "unknown option --frobnicate"
        );
        assert!(parse(&["--address"]).is_err());
        assert!(parse(&["--print-address=x"]).is_err());
        assert!(parse(&["--print-pid=-3"]).is_err());
    }

    #[test]
    fn start_settings_are_positive_numbers() {
        let o = parse(&[
            "--start-timeout-ms=500",
            "--start-limit-burst",
            "3",
            "--start-limit-interval-ms=100",
        ])
        .unwrap();
        assert_eq!(
            (
                o.start_timeout_ms,
                o.start_limit_burst,
                o.start_limit_interval_ms
            ),
            (Some(500), Some(3), Some(100))
        );
        assert!(parse(&["--start-timeout-ms=0"]).is_err());
        assert!(parse(&["--start-limit-burst=x"]).is_err());
    }

    #[test]
    fn stop_grace_is_a_positive_number_of_ms() {
        assert_eq!(
            parse(&["--stop-grace-ms=1500"]).unwrap().stop_grace_ms,
            Some(1500)
        );
        assert_eq!(
            parse(&["--stop-grace-ms", "7"]).unwrap().stop_grace_ms,
            Some(7)
        );
        assert_eq!(parse(&[]).unwrap().stop_grace_ms, None);
        assert!(parse(&["--stop-grace-ms=soon"]).is_err());
        assert!(parse(&["--stop-grace-ms"]).is_err());
    }

    #[test]
    fn run_takes_bus_options_then_the_command_and_its_arguments() {
        let o = parse(&[
            "run",
            "--activation-dir=/a",
            "--log-file",
            "/l",
            "--",
            "sh",
            "-c",
            "--x",
        ])
        .unwrap();
        let command = |args: &[&str]| Some(args.iter().map(|a| a.to_string()).collect());
        assert_eq!(o.run, command(&["sh", "-c", "--x"]));
        assert_eq!(o.activation_dirs, vec![PathBuf::from("/a")]);
        assert_eq!(o.log_file, Some(PathBuf::from("/l")));
        let o = parse(&["run", "app", "--session"]).unwrap();
        assert_eq!(o.run, command(&["app", "--session"]));
        assert!(!o.session, "an option after COMMAND is COMMAND's");
        assert_eq!(parse(&["run"]).unwrap().run, command(&[]));
        assert_eq!(parse(&["run", "--"]).unwrap().run, command(&[]));
        assert_eq!(parse(&["--session"]).unwrap().run, None);
        assert!(parse(&["--session", "run"]).is_err(), "run comes first");
    }

    #[test]
    fn activation_dirs_accumulate() {
        let o = parse(&["--activation-dir", "/a", "--activation-dir=/b"]).unwrap();
        assert_eq!(
            o.activation_dirs,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }

    #[test]
    fn dbus_daemon_flags_are_read() {
        let o = parse(&[
            "--config-file",
            "/etc/bus.conf",
            "--nofork",
            "--nopidfile",
            "--systemd-activation",
            "--syslog-only",
            "--introspect",
        ])
        .unwrap();
        assert_eq!(o.config_file, Some(PathBuf::from("/etc/bus.conf")));
        assert!(o.nopidfile && o.systemd_activation && o.introspect);
        assert_eq!(o.log_target, LogTarget::SyslogOnly);
        let o = parse(&["--system", "--nosyslog"]).unwrap();
        assert!(o.system && !o.session);
        assert_eq!(o.log_target, LogTarget::Stderr);
        assert_eq!(parse(&["--syslog"]).unwrap().log_target, LogTarget::Syslog);
        assert_eq!(parse(&["--fork"]).unwrap().fork, Some(true));
        assert_eq!(parse(&["--nofork"]).unwrap().fork, Some(false));
        assert_eq!(parse(&[]).unwrap().fork, None);
        assert_eq!(
            parse(&["--config-file=/a"]).unwrap().config_file,
            Some(PathBuf::from("/a"))
        );
    }

    #[test]
    fn conflicting_or_unsupported_flags_are_refused() {
        assert!(parse(&["--session", "--system"]).is_err());
        assert!(parse(&["--session", "--config-file=/a"]).is_err());
        assert!(parse(&["--config-file=/a", "--config-file=/b"]).is_err());
        assert_eq!(
            parse(&["--nofork=yes"]).unwrap_err().0,
            "--nofork takes no value"
        );
        assert!(parse(&["--config-file"]).is_err());
    }

    #[test]
    fn client_commands_take_their_own_options() {
        let control = |args: &[&str]| parse(args).map(|o| o.control.expect("a client command"));
        let status = control(&["status", "--json", "--address", "unix:path=/b"]).unwrap();
        assert_eq!(status.action, ControlAction::Status);
        assert!(status.json && status.name.is_none());
        assert_eq!(status.address.as_deref(), Some("unix:path=/b"));
        let logs = control(&["logs", "a.B", "-n", "2", "-f", "--system"]).unwrap();
        assert_eq!(logs.name.as_deref(), Some("a.B"));
        assert_eq!((logs.lines, logs.follow, logs.system), (2, true, true));
        assert_eq!(control(&["logs", "a.B"]).unwrap().lines, 50);
        assert_eq!(
            control(&["stop", "a.B"]).unwrap().action,
            ControlAction::Stop
        );
        assert!(control(&["stop"]).is_err(), "stop needs a NAME");
        assert!(control(&["stop", "a.B", "--json"]).is_err());
        assert!(control(&["status", "-n", "3"]).is_err());
        assert!(control(&["status", "a.B", "c.D"]).is_err());
        assert!(control(&["logs", "a.B", "-n", "x"]).is_err());
        assert!(control(&["status", "--system", "--address=unix:path=/b"]).is_err());
        assert!(
            parse(&["--session", "status"]).is_err(),
            "status comes first"
        );
    }
}
