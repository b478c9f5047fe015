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
    serve(&mut conn, quit_or_echo)
}

/// The trivial service's answer to a call: `Quit` stops it, anything else
/// is echoed (so `Peer.Ping` and friends get a reply).
fn quit_or_echo(call: &Frame) -> Action {
    if call.member == Some(QUIT_MEMBER) {
        Action::Stop
    } else {
        Action::Echo
    }
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::wire::Body;

    #[test]
    fn echoes_bodies_and_stops_on_quit() -> Result<()> {
        let (client_side, server_side) = UnixStream::pair()?;
        let server = std::thread::spawn(move || -> Result<()> {
            serve(&mut Conn::accept(server_side)?, quit_or_echo)
        });
        let mut client = Conn::p2p_handshake(client_side)?;
        let body = Body::default().string("hello").u32(7);
        let mut out = Vec::new();
        let serial = client.push_call(&mut out, None, ECHO_INTERFACE, "Echo", &body);
        client.write(&out)?;
        let reply = client.wait_reply(serial)?;
        let frame = reply.frame()?;
        assert_eq!(frame.kind, Some(Kind::MethodReturn));
        assert_eq!((frame.signature, frame.body), ("su", body.bytes()));
        client.call_no_reply("bench.Trivial", "bench.Trivial", QUIT_MEMBER)?;
        let served = server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))?;
        assert!(served.is_ok(), "serve ended with {served:?}");
        assert!(
            !client.inbox.try_fill(&client.stream)?,
            "server kept the socket open"
        );
        Ok(())
    }
}
