//! The services the workloads talk to: the echo peer (on a bus, or on its
//! own socket for the p2p floor) and the trivial activatable service.

use std::os::unix::net::UnixListener;

use anyhow::{Context, Result};

use crate::client::Conn;
use crate::wire::{self, Frame, Header, Kind, NO_REPLY_EXPECTED};

/// Interface of the echo peer's single method `Echo`.
pub const ECHO_INTERFACE: &str = "bench.Echo";
/// Member that makes the trivial service exit.
pub const QUIT_MEMBER: &str = "Quit";

/// Owns `name` on the bus at `address` and echoes every call until the bus
/// goes away. Prints `ready` once the name is taken.
pub fn echo_on_bus(address: &str, name: &str) -> Result<()> {
    let mut conn = Conn::bus(address)?;
    conn.request_name(name)?;
    conn.stream.set_read_timeout(None)?; // idle between workloads
    println!("ready");
    serve(&mut conn, |_| Action::Echo)
}

/// Listens on `path` and echoes every call of every client, one thread per
/// client, with no bus in between. Prints `ready` once listening.
pub fn echo_p2p(path: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {path}"))?;
    println!("ready");
    for stream in listener.incoming() {
        let stream = stream.context("accept failed")?;
        std::thread::spawn(move || {
            let served =
                Conn::accept(stream).and_then(|mut conn| serve(&mut conn, |_| Action::Echo));
            if let Err(e) = served {
                eprintln!("p2p echo client: {e:#}");
            }
        });
    }
    Ok(())
}

/// The activatable service: takes `name` on the bus that started it and
/// exits when called with `Quit` (or when the bus goes away).
pub fn trivial_service(name: &str) -> Result<()> {
    let address = std::env::var("DBUS_STARTER_ADDRESS")
        .or_else(|_| std::env::var("DBUS_SESSION_BUS_ADDRESS"))
        .context("neither DBUS_STARTER_ADDRESS nor DBUS_SESSION_BUS_ADDRESS is set")?;
    let mut conn = Conn::bus(&address)?;
    conn.request_name(name)?;
    conn.stream.set_read_timeout(None)?;
    serve(&mut conn, |call| {
        if call.member == Some(QUIT_MEMBER) {
            Action::Stop
        } else {
            Action::Echo
        }
    })
}

/// What to do with one incoming method call.
enum Action {
    /// Reply with the call's own body.
    Echo,
    /// Stop serving (and let the process exit).
    Stop,
}

/// Answers method calls until end of stream or [`Action::Stop`]. Every call
/// that arrived in one read is answered with one write. Calls may already be
/// buffered (pipelined behind the handshake), so those are served first.
fn serve(conn: &mut Conn, decide: impl Fn(&Frame) -> Action) -> Result<()> {
    let mut out = Vec::new();
    loop {
        while let Some(call) = conn.inbox.next_message()? {
            if call.kind != Some(Kind::MethodCall) {
                continue;
            }
            if let Action::Stop = decide(&call) {
                return Ok(());
            }
            if call.flags & NO_REPLY_EXPECTED == 0 {
                let header = Header {
                    reply_serial: Some(call.serial),
                    destination: call.sender,
                    ..Header::default()
                };
                let serial = conn.serials.next();
                wire::encode(
                    &mut out,
                    Kind::MethodReturn,
                    serial,
                    &header,
                    call.signature,
                    call.body,
                );
            }
        }
        if !out.is_empty() {
            conn.write(&out)?;
            out.clear();
        }
        if !conn.inbox.try_fill(&conn.stream)? {
            return Ok(());
        }
    }
}
