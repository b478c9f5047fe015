//! A small service for trying activation: owns `org.broker.Echo` (or the
//! name given with `--name NAME`) and serves interface `org.broker.Echo` at
//! `/org/broker/Echo`:
//!
//! - `Echo(s) -> s` returns its argument;
//! - `Pid() -> u32` is this process's pid, so a caller can tell which start
//!   of the service answered;
//! - `Quit()` replies, then the service exits with status 0.
//!
//! It also exits with status 0 when the bus closes its connection.

mod common;

use std::process::ExitCode;

use common::Quit;

const PROGRAM: &str = "echo_service";

struct Echo {
    quit: Quit,
}

#[zbus::interface(name = "org.broker.Echo")]
impl Echo {
    fn echo(&self, text: String) -> String {
        text
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn quit(&self) {
        self.quit.request();
    }
}

fn main() -> ExitCode {
    common::announce(PROGRAM);
    common::run(PROGRAM, async {
        let name = common::parse_args("org.broker.Echo", |_, _| Ok(false))?;
        let quit = Quit::default();
        let echo = Echo { quit: quit.clone() };
        common::serve(PROGRAM, &name, "/org/broker/Echo", echo, quit).await
    })
}
