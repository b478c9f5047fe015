//! `broker status`, `broker stop` and `broker logs`: a command-line client of the supervisor
//! interface (`org.broker.Supervisor1`) that a running bus serves through its driver.
//!
//! The output is plain text for a person; `status --json` is for scripts. Every failure is one
//! line on stderr starting with `broker:`, and exit status 1.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use nix::libc;
use zbus::{Connection, OwnedVariant, Variant};

use crate::bus::{DRIVER, DRIVER_PATH};
use crate::cli::{ControlAction, ControlCommand};
use crate::driver::messages::SUPERVISOR;

/// Where the system bus is when `DBUS_SYSTEM_BUS_ADDRESS` does not say.
const SYSTEM_BUS: &str = "unix:path=/run/dbus/system_bus_socket";

/// How many lines of output `broker status NAME` shows.
const STATUS_LINES: u32 = 10;

/// How often `broker logs -f` asks for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// What went wrong, as the one line to print after `broker: `.
type Failure = String;

/// Runs `cmd` and prints what it found; the exit status is 1 on any failure.
pub fn main(cmd: ControlCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("cannot start the client's runtime: {e}")),
    };
    match runtime.block_on(run(&cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(text) => fail(text),
    }
}

fn fail(text: Failure) -> ExitCode {
    eprintln!("broker: {text}");
    ExitCode::from(1)
}

async fn run(cmd: &ControlCommand) -> Result<(), Failure> {
    let address = address_of(cmd)?;
    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .map_err(|e| format!("cannot reach the bus at {address}: {e}"))?;
    let client = Client { conn };
    let name = cmd.name.as_deref();
    match (cmd.action, name) {
        (ControlAction::Status, None) => client.print_list(cmd.json).await,
        (ControlAction::Status, Some(name)) => client.print_service(name, cmd.json).await,
        (ControlAction::Stop, Some(name)) => client.stop(name).await,
        (ControlAction::Logs, Some(name)) => client.print_logs(name, cmd.lines, cmd.follow).await,
        (_, None) => Err("no service NAME given".into()),
    }
}

/// `--address`, else the system bus's address with `--system`, else the session bus's.
fn address_of(cmd: &ControlCommand) -> Result<String, Failure> {
    if let Some(address) = &cmd.address {
        return Ok(address.clone());
    }
    if cmd.system {
        return Ok(std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
            .ok()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| SYSTEM_BUS.to_owned()));
    }
    std::env::var("DBUS_SESSION_BUS_ADDRESS")
        .ok()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            "no bus to talk to: give --address=ADDRESS or --system, or set \
             DBUS_SESSION_BUS_ADDRESS"
                .to_owned()
        })
}

/// One service, as the bus describes it.
#[derive(Debug, Default)]
struct Service {
    name: String,
    state: String,
    main_pid: u32,
    pids: Vec<u32>,
    started_at_us: u64,
    starts: u32,
    last_exit: String,
    last_failure: String,
}

impl Service {
    /// Reads the dictionary of `ListServices`/`GetService`; a missing or mistyped entry is left
    /// at its default rather than failing the whole listing.
    fn from_dict(dict: &HashMap<String, OwnedVariant>) -> Service {
        let text = |key: &str| match dict.get(key).map(|v| &**v) {
            Some(Variant::Str(s)) => s.to_string(),
            _ => String::new(),
        };
        let number = |key: &str| match dict.get(key).map(|v| &**v) {
            Some(Variant::U32(n)) => u64::from(*n),
            Some(Variant::U64(n)) => *n,
            _ => 0,
        };
        let pids = match dict.get("PIDs").map(|v| &**v) {
            Some(Variant::Array(a)) => a
                .inner()
                .iter()
                .filter_map(|v| match v {
                    Variant::U32(n) => Some(*n),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Service {
            name: text("Name"),
            state: text("State"),
            main_pid: u32::try_from(number("MainPID")).unwrap_or(0),
            pids,
            started_at_us: number("StartedAt"),
            starts: u32::try_from(number("Starts")).unwrap_or(u32::MAX),
            last_exit: text("LastExit"),
            last_failure: text("LastFailure"),
        }
    }

    fn to_json(&self) -> String {
        let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
        format!(
            "{{\"name\":{},\"state\":{},\"main_pid\":{},\"pids\":[{}],\"started_at_us\":{},\
             \"starts\":{},\"last_exit\":{},\"last_failure\":{}}}",
            json_string(&self.name),
            json_string(&self.state),
            self.main_pid,
            pids.join(","),
            self.started_at_us,
            self.starts,
            json_string(&self.last_exit),
            json_string(&self.last_failure),
        )
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A connection to the bus, and the calls of the supervisor interface.
struct Client {
    conn: Connection,
}

impl Client {
    /// Calls `method` of the supervisor interface. `ServiceUnknown` becomes "no service NAME";
    /// any other error is its text (`AccessDenied` says who may stop a service).
    async fn call<B>(&self, method: &str, name: &str, body: &B) -> Result<zbus::Message, Failure>
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        self.conn
            .call_method(Some(DRIVER), DRIVER_PATH, Some(SUPERVISOR), method, body)
            .await
            .map_err(|e| failure_text(method, name, &e))
    }

    async fn services(&self) -> Result<Vec<Service>, Failure> {
        let reply = self.call("ListServices", "", &()).await?;
        let dicts: Vec<HashMap<String, OwnedVariant>> = reply
            .body()
            .deserialize()
            .map_err(|e| format!("unexpected reply to ListServices: {e}"))?;
        Ok(dicts.iter().map(Service::from_dict).collect())
    }

    async fn service(&self, name: &str) -> Result<Service, Failure> {
        let reply = self.call("GetService", name, &(name,)).await?;
        let dict: HashMap<String, OwnedVariant> = reply
            .body()
            .deserialize()
            .map_err(|e| format!("unexpected reply to GetService: {e}"))?;
        Ok(Service::from_dict(&dict))
    }

    async fn output(&self, name: &str, lines: u32) -> Result<Vec<String>, Failure> {
        let reply = self.call("GetOutput", name, &(name, lines)).await?;
        reply
            .body()
            .deserialize()
            .map_err(|e| format!("unexpected reply to GetOutput: {e}"))
    }

    /// `broker status`: `NAME  STATE  PID`, one line per service.
    async fn print_list(&self, json: bool) -> Result<(), Failure> {
        let services = self.services().await?;
        if json {
            let all: Vec<String> = services.iter().map(Service::to_json).collect();
            println!("[{}]", all.join(","));
            return Ok(());
        }
        let width = services
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(0)
            .max(4);
        println!("{:width$}  {:8}  PID", "NAME", "STATE");
        for s in &services {
            println!("{:width$}  {:8}  {}", s.name, s.state, pid_text(s.main_pid));
        }
        Ok(())
    }

    /// `broker status NAME`: the details, the processes and the last lines of output.
    async fn print_service(&self, name: &str, json: bool) -> Result<(), Failure> {
        let s = self.service(name).await?;
        if json {
            println!("{}", s.to_json());
            return Ok(());
        }
        let output = self.output(name, STATUS_LINES).await?;
        print!("{}", describe(&s, &output));
        Ok(())
    }

    /// `broker stop NAME`.
    async fn stop(&self, name: &str) -> Result<(), Failure> {
        self.call("StopService", name, &(name,)).await?;
        Ok(())
    }

    /// `broker logs NAME [-n N] [-f]`. With `-f`, asks again every [`FOLLOW_EVERY`] and prints
    /// what is new, until the bus goes or the service is no longer known.
    async fn print_logs(&self, name: &str, lines: u32, follow: bool) -> Result<(), Failure> {
        let mut seen = self.output(name, lines).await?;
        for line in &seen {
            println!("{line}");
        }
        if !follow {
            return Ok(());
        }
        // Compared against everything kept, to find where the new lines start.
        seen = self.output(name, u32::MAX).await?;
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            // The bus went (or forgot the service): following is over.
            let Ok(now) = self.output(name, u32::MAX).await else {
                return Ok(());
            };
            for line in &now[new_from(&seen, &now)..] {
                println!("{line}");
            }
            seen = now;
        }
    }
}

/// Where the lines of `now` that `before` did not have start: `now` is the same ring of lines
/// moved on, so the longest tail of `before` that starts `now` is what was already printed.
fn new_from(before: &[String], now: &[String]) -> usize {
    (0..=before.len())
        .map(|skip| &before[skip..])
        .find(|tail| now.starts_with(tail))
        .map_or(0, <[String]>::len)
}

/// The line to print for a failed call: `ServiceUnknown` is "no service NAME"; another error
/// reply is its name and text (`AccessDenied` says who may stop a service).
fn failure_text(method: &str, name: &str, e: &zbus::Error) -> Failure {
    use zbus::DBusError;
    let (error, text) = match e {
        zbus::Error::MethodError(error, text, _) => {
            (error.to_string(), text.clone().unwrap_or_default())
        }
        zbus::Error::FDO(e) => (
            e.name().to_string(),
            e.description().unwrap_or_default().to_owned(),
        ),
        other => return format!("{method} failed: {other}"),
    };
    if error == "org.freedesktop.DBus.Error.ServiceUnknown" {
        return format!("no service {name}");
    }
    format!("{error}: {text}")
}

fn pid_text(pid: u32) -> String {
    if pid == 0 {
        "-".into()
    } else {
        pid.to_string()
    }
}

/// The text of `broker status NAME`.
fn describe(s: &Service, output: &[String]) -> String {
    let or_dash = |t: &str| {
        if t.is_empty() {
            "-".to_owned()
        } else {
            t.to_owned()
        }
    };
    let started = if s.started_at_us == 0 {
        "-".to_owned()
    } else {
        local_time(s.started_at_us / 1_000_000)
    };
    let mut text = format!("{} - {}\n", s.name, s.state);
    let _ = writeln!(text, "    Main PID: {}", pid_text(s.main_pid));
    let _ = writeln!(text, "  Started at: {started}");
    let _ = writeln!(text, "      Starts: {}", s.starts);
    let _ = writeln!(text, "   Last exit: {}", or_dash(&s.last_exit));
    let _ = writeln!(text, "Last failure: {}", or_dash(&s.last_failure));
    if !s.pids.is_empty() {
        let _ = writeln!(text, "   Processes:");
        for pid in &s.pids {
            let _ = writeln!(text, "      {pid} {}", command_line(*pid));
        }
    }
    if !output.is_empty() {
        let _ = writeln!(text, "\nLast {} lines of output:", output.len());
        for line in output {
            let _ = writeln!(text, "  {line}");
        }
    }
    text
}

/// The command line of `pid` from `/proc`, its arguments joined by spaces; `?` once it is gone
/// (or for a process of another bus's host).
fn command_line(pid: u32) -> String {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) if !raw.is_empty() => raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" "),
        _ => "?".into(),
    }
}

/// `secs` since the epoch as local time, `YYYY-MM-DD HH:MM:SS TZ`.
fn local_time(secs: u64) -> String {
    let Ok(time) = libc::time_t::try_from(secs) else {
        return secs.to_string();
    };
    let mut tm = std::mem::MaybeUninit::<libc::tm>::zeroed();
    let mut buf = [0u8; 64];
    // SAFETY: `localtime_r` writes into `tm`, which lives for the call; `strftime` writes at
    // most `buf.len()` bytes into `buf` and reads the `tm` that `localtime_r` filled in.
    let len = unsafe {
        if libc::localtime_r(&time, tm.as_mut_ptr()).is_null() {
            return secs.to_string();
        }
        libc::strftime(
            buf.as_mut_ptr().cast(),
            buf.len(),
            c"%Y-%m-%d %H:%M:%S %Z".as_ptr(),
            tm.as_ptr(),
        )
    };
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_lines_are_found_after_the_ring_moved_on() {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(new_from(&v(&["a", "b"]), &v(&["a", "b", "c"])), 2);
        assert_eq!(new_from(&v(&["a", "b", "c"]), &v(&["b", "c", "d"])), 2);
        assert_eq!(new_from(&v(&[]), &v(&["x"])), 0);
        assert_eq!(new_from(&v(&["a"]), &v(&["z"])), 0);
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }
}
