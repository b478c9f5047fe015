//! What the example services share: argument parsing, the `Quit` plumbing,
//! and serving one interface under one well-known name until asked to quit
//! or until the bus goes away.
//!
//! Every service prints a line when it starts and when it owns its name, so
//! the broker's log (which collects a started service's stdout and stderr)
//! shows them.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::Notify;
use zbus::connection::Builder;
use zbus::object_server::Interface;

/// Parses `--name NAME` (the well-known name to own, `default_name` if
/// absent) and whatever `extra` recognises. `extra` gets every other
/// argument together with the remaining ones, to take a value from; it
/// returns `Ok(false)` for an argument it does not know.
pub fn parse_args<F>(default_name: &str, mut extra: F) -> Result<String, String>
where
    F: FnMut(&str, &mut dyn Iterator<Item = String>) -> Result<bool, String>,
{
    let mut name = default_name.to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--name" {
            name = args.next().ok_or("--name needs a value")?;
        } else if !extra(&arg, &mut args)? {
            return Err(format!("unknown argument {arg:?}"));
        }
    }
    Ok(name)
}

/// Tells `serve` to stop once the current method call has been answered.
#[derive(Clone, Default)]
pub struct Quit(Arc<Notify>);

impl Quit {
    /// Asks for the service to end; called from a `Quit` method.
    pub fn request(&self) {
        // `notify_one` keeps the permit if `serve` is not waiting yet.
        self.0.notify_one();
    }
}

/// Connects to the bus that started this service (`DBUS_STARTER_ADDRESS`: a
/// system bus sets no `DBUS_SESSION_BUS_ADDRESS` for its services), else to
/// the session bus, serves `iface` at `path` and takes `name`.
/// Returns when `quit` is requested, after the pending replies have gone
/// out, or when the bus closes the connection.
pub async fn serve<I: Interface>(
    program: &str,
    name: &str,
    path: &str,
    iface: I,
    quit: Quit,
) -> Result<(), String> {
    let builder = match std::env::var("DBUS_STARTER_ADDRESS") {
        Ok(address) => Builder::address(address.as_str()),
        Err(_) => Builder::session(),
    };
    let connection = builder
        .name(name)
        .serve_at(path, iface)
        .build()
        .await
        .map_err(|err| format!("cannot connect to the bus or take {name}: {err}"))?;
    println!("{program}: owns {name}");
    tokio::select! {
        () = quit.0.notified() => {
            println!("{program}: quitting as asked");
            // Waits for the object server to finish the `Quit` call, so the
            // caller gets its reply before the process exits.
            connection.graceful_shutdown().await;
        }
        () = connection.closed() => println!("{program}: the bus went away"),
    }
    Ok(())
}

/// Prints the start line, then runs `service` on a single-threaded tokio
/// runtime (created here, so a caller may fork before calling this) and
/// turns an error into a message and a failure status.
pub fn run(program: &str, service: impl Future<Output = Result<(), String>>) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the runtime: {err}"))
        .and_then(|runtime| runtime.block_on(service));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(program, &err),
    }
}

/// Reports `err` on stderr and gives the status to exit with.
pub fn fail(program: &str, err: &str) -> ExitCode {
    eprintln!("{program}: {err}");
    ExitCode::FAILURE
}

/// The start line every example prints first, naming its pid.
pub fn announce(program: &str) {
    println!("{program}: started as pid {}", std::process::id());
}
