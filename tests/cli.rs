//! The command line as a user meets it: `--help`, the man page, and a bus that keeps quiet on
//! stderr when it works, as test harnesses that start one per test expect.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// The options `broker --help` lists, without their values (`--address`, `--print-pid`, ...).
fn options_in_help() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("--help")
        .output()
        .expect("run broker --help");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("help is UTF-8");
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix("--"))
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            format!("--{name}")
        })
        .collect()
}

#[test]
fn help_lists_every_option_on_a_line_of_its_own() {
    let options = options_in_help();
    for expected in [
        "--session",
        "--system",
        "--config-file",
        "--address",
        "--print-address",
        "--print-pid",
        "--fork",
        "--nofork",
        "--nopidfile",
        "--systemd-activation",
        "--nosyslog",
        "--syslog",
        "--syslog-only",
        "--introspect",
        "--activation-dir",
        "--start-timeout-ms",
        "--start-limit-burst",
        "--start-limit-interval-ms",
        "--version",
        "--help",
    ] {
        assert!(
            options.iter().any(|o| o == expected),
            "--help does not list {expected}: {options:?}"
        );
    }
}

#[test]
fn the_man_page_documents_every_option_that_help_lists() {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("man/broker.1");
    let roff = std::fs::read_to_string(&page).expect("man/broker.1");
    let text = roff.replace("\\-", "-");
    for option in options_in_help() {
        // Each option has a paragraph of its own: a .TP tag line that starts with it.
        let lines: Vec<&str> = text.lines().collect();
        let documented = lines.windows(2).any(|pair| {
            pair[0] == ".TP"
                && pair[1].starts_with(".B")
                && pair[1]
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|tag| tag.trim_end_matches(['=', '"']) == option)
        });
        assert!(documented, "man/broker.1 has no paragraph for {option}");
    }
    for section in [
        "OPTIONS",
        "ACTIVATION FILES",
        "SIGNALS",
        "ENVIRONMENT",
        "FILES",
    ] {
        assert!(text.contains(&format!(".SH {section}")), "no {section}");
    }
}

#[test]
fn a_bus_that_works_writes_nothing_to_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bus.conf");
    let socket = dir.path().join("bus");
    std::fs::write(
        &config,
        format!(
            r#"<busconfig><type>session</type><listen>unix:path={}</listen>
               <policy context="default"><allow send_destination="*" eavesdrop="true"/>
               <allow eavesdrop="true"/><allow own="*"/></policy></busconfig>"#,
            socket.display()
        ),
    )
    .unwrap();
    let stderr_file = dir.path().join("stderr");
    // As python-dbusmock's DBusTestCase starts dbus-daemon: the address is in the configuration
    // file, and only the pid is printed; no BROKER_LOG is set.
    let mut bus = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg(format!("--config-file={}", config.display()))
        .args(["--nofork", "--print-pid=1"])
        .env_remove("BROKER_LOG")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .spawn()
        .expect("start broker");
    let mut pid = String::new();
    BufReader::new(bus.stdout.take().unwrap())
        .read_line(&mut pid)
        .unwrap();
    assert_eq!(pid.trim(), bus.id().to_string());
    let address = format!("unix:path={}", socket.display());
    let out = Command::new("dbus-send")
        .arg(format!("--bus={}", address.trim()))
        .args([
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.ListNames",
        ])
        .output()
        .expect("dbus-send (apt-get install dbus-bin)");
    assert!(out.status.success(), "{out:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bus.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(bus.wait().unwrap().success());
    let written = std::fs::read_to_string(&stderr_file).unwrap();
    assert_eq!(written, "", "broker wrote to stderr");
}
