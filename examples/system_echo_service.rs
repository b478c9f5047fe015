//! A system service for the system bus tests: like `echo_service` (interface `org.broker.Echo`
//! at `/org/broker/Echo` with `Echo(s) -> s` and `Pid() -> u32`), but it connects to the bus
//! named by `DBUS_STARTER_ADDRESS`, as a system service must: a system bus gives its services
//! no `DBUS_SESSION_BUS_ADDRESS`. Owns `org.broker.SystemEcho`, or `--name NAME`.

// Only the argument parsing and the runtime of the shared module are used here.
#[allow(dead_code)]
mod common;

use std::process::ExitCode;

use zbus::connection::Builder;

const PROGRAM: &str = "system_echo_service";

struct Echo;

#[zbus::interface(name = "org.broker.Echo")]
impl Echo {
    fn echo(&self, text: String) -> String {
        text
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }
}

fn main() -> ExitCode {
    common::announce(PROGRAM);
    common::run(PROGRAM, async {
        let name = common::parse_args("org.broker.SystemEcho", |_, _| Ok(false))?;
        let address = std::env::var("DBUS_STARTER_ADDRESS")
            .map_err(|_| "DBUS_STARTER_ADDRESS is not set: start me from a bus".to_owned())?;
        let connection = Builder::address(address.as_str())
            .name(name.as_str())
            .serve_at("/org/broker/Echo", Echo)
            .build()
            .await
            .map_err(|err| format!("cannot connect to {address} or take {name}: {err}"))?;
        println!("{PROGRAM}: owns {name}");
        connection.closed().await;
        println!("{PROGRAM}: the bus went away");
        Ok(())
    })
}
