//! A service that crashes on request, for trying what the broker does when
//! a service dies: owns `org.broker.Crash` (or the name given with
//! `--name NAME`) and serves interface `org.broker.Crash` at
//! `/org/broker/Crash`:
//!
//! - `Echo(s) -> s` returns its argument;
//! - `Pid() -> u32` is this process's pid, so a caller can tell that the
//!   service was started again after a crash;
//! - `Crash()` never replies: the process aborts (`SIGABRT`), its
//!   connection drops and its name goes away;
//! - `Quit()` replies, then the service exits with status 0.
//!
//! It exits with status 0 when the bus closes its connection.

mod common;

use std::process::ExitCode;

use common::Quit;

const PROGRAM: &str = "crash_service";

struct Crash {
    quit: Quit,
}

#[zbus::interface(name = "org.broker.Crash")]
impl Crash {
    fn echo(&self, text: String) -> String {
        text
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn crash(&self) {
        eprintln!("{PROGRAM}: aborting as asked");
        std::process::abort();
    }

    fn quit(&self) {
        self.quit.request();
    }
}

fn main() -> ExitCode {
    common::announce(PROGRAM);
    common::run(PROGRAM, async {
        let name = common::parse_args("org.broker.Crash", |_, _| Ok(false))?;
        let quit = Quit::default();
        let crash = Crash { quit: quit.clone() };
        common::serve(PROGRAM, &name, "/org/broker/Crash", crash, quit).await
    })
}
