//! The command line as a user meets it: `--help`, the man page, a bus that keeps quiet on
//! stderr when it works, as test harnesses that start one per test expect, and the descriptors
//! of `--print-address=FD` and `--print-pid=FD`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{RawClient, wait_within};

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

/// `broker` run by `sh -c SCRIPT`, where the script says `"$0"` for the broker and `$1` for the
/// socket path; what the shell redirects is what the broker inherits.
fn broker_in_shell(script: &str, socket: &Path) -> Command {
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_broker"))
        .arg(format!("unix:path={}", socket.display()));
    command
}

#[test]
fn a_print_fd_that_is_not_open_is_refused_before_the_bus_listens() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bus");
    // The shell closes the fd (`N>&-`) before it runs the broker: whatever the test process
    // holds, the number is not open in the broker.
    for (args, closed, expected) in [
        (
            "--print-address=7",
            7,
            "broker: --print-address=7: fd 7 is not open\n",
        ),
        (
            "--print-address --print-pid 9",
            9,
            "broker: --print-pid=9: fd 9 is not open\n",
        ),
    ] {
        let script = format!(r#"exec "$0" --session --address="$1" {args} {closed}>&-"#);
        let out = broker_in_shell(&script, &socket)
            .stdin(Stdio::null())
            .output()
            .expect("run broker");
        assert_eq!(out.status.code(), Some(1), "{args}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), expected, "{args}");
        assert!(out.stdout.is_empty(), "{args}: printed {:?}", out.stdout);
        assert!(!socket.exists(), "{args}: the bus listened before refusing");
    }
}

#[test]
fn both_prints_to_one_fd_write_both_lines_then_close_it_while_the_bus_runs() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bus");
    // fd 3 is the pipe the test reads; standard output goes elsewhere, so only fd 3 holds the
    // pipe's write end in the broker.
    let script =
        r#"exec "$0" --session --address="$1" --print-address=3 --print-pid=3 3>&1 >/dev/null"#;
    let mut bus = broker_in_shell(script, &socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start broker");
    let mut pipe = bus.stdout.take().expect("the pipe");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let read = pipe.read_to_string(&mut text).map(|_| text);
        let _ = sender.send(read);
    });
    // End of file comes only once the broker has closed fd 3.
    let printed = match receiver.recv_timeout(Duration::from_secs(10)) {
        Ok(read) => read.expect("read the pipe"),
        Err(_) => {
            let _ = bus.kill();
            let _ = bus.wait();
            panic!("the broker did not close fd 3 within 10 s");
        }
    };
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2, "{printed:?}");
    assert!(
        lines[0].starts_with(&format!("unix:path={},guid=", socket.display())),
        "{printed:?}"
    );
    assert_eq!(lines[1], bus.id().to_string());
    // The bus runs on after closing it.
    assert!(bus.try_wait().unwrap().is_none(), "the bus exited");
    RawClient::connect(&socket)
        .driver_call("GetId", &())
        .expect("the bus answers");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bus.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_within(&mut bus, Duration::from_secs(10)).expect("the bus stops");
    assert!(status.success(), "{status:?}");
}
