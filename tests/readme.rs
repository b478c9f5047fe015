//! The README's run command, copied as written, on a machine where a desktop's session bus
//! already listens at `$XDG_RUNTIME_DIR/bus`: it must serve the examples on an address of its
//! own, the README's client lines must work against what it printed, and the desktop's bus
//! must be left alone.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The `sh` code blocks of the README section headed `heading`, in order.
fn shell_blocks(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    section
        .split("```sh\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or_default().to_owned())
        .collect()
}

/// A process group that is ended with SIGTERM when dropped (the run command is a shell, cargo
/// and the broker).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn dbus_send(address: &str, member: &str) -> std::process::Output {
    Command::new("dbus-send")
        .arg(format!("--bus={address}"))
        .args(["--print-reply", "--dest=org.freedesktop.DBus"])
        .args([
            "/org/freedesktop/DBus",
            &format!("org.freedesktop.DBus.{member}"),
        ])
        .output()
        .expect("dbus-send (apt-get install dbus-bin)")
}

#[test]
fn the_run_command_works_beside_a_desktop_bus_and_the_client_lines_reach_it() {
    let blocks = shell_blocks("Run the bus");
    let [run, clients] = &blocks[..] else {
        panic!("the run section should have two sh blocks: {blocks:?}");
    };
    let runtime = tempfile::tempdir().unwrap();
    let desktop_address = format!("unix:path={}/bus", runtime.path().display());
    let _desktop = Group(
        Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={desktop_address}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("dbus-daemon (apt-get install dbus-daemon)"),
    );
    wait_until_it_answers(&desktop_address);

    let mut bus = Group(
        Command::new("bash")
            .args(["-c", run.trim()])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("XDG_RUNTIME_DIR", runtime.path())
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("bash"),
    );
    let mut printed = String::new();
    BufReader::new(bus.0.stdout.take().unwrap())
        .read_line(&mut printed)
        .unwrap();
    let expected = format!("unix:path={}/broker-demo,guid=", runtime.path().display());
    assert!(printed.starts_with(&expected), "it printed {printed:?}");

    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", clients])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the client lines failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("('hello',)"), "{stdout}");
    assert!(stdout.contains("org.broker.Echo"), "{stdout}");
    assert!(stdout.contains("s \"hi\""), "{stdout}");

    // The desktop's bus still answers, and saw none of it.
    let names = dbus_send(&desktop_address, "ListNames");
    assert!(names.status.success());
    assert!(!String::from_utf8_lossy(&names.stdout).contains("org.broker.Echo"));
}

fn wait_until_it_answers(address: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !dbus_send(address, "GetId").status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "{address} never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `cargo tree`'s packages and their features, one `name version features` line each.
fn package_features(extra: &[&str]) -> std::collections::BTreeMap<String, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-p", "broker", "--prefix", "none"])
        .args(["-f", "{p}|{f}"])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| line.trim_end_matches(" (*)"))
        .filter_map(|line| line.split_once('|'))
        .map(|(package, features)| (package.to_owned(), features.to_owned()))
        .collect()
}

#[test]
fn the_run_command_builds_no_dependency_again_after_the_examples() {
    // `cargo build --examples` resolves features with the dev-dependencies, `cargo run` without:
    // every package both use must get the same features, or `cargo run` rebuilds it.
    let without_dev = package_features(&["-e", "no-dev"]);
    let with_dev = package_features(&[]);
    for (package, features) in &without_dev {
        assert_eq!(
            with_dev.get(package),
            Some(features),
            "{package} is built with other features for the examples"
        );
    }
}
