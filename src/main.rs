//! The `broker` command: parses the command line and runs the bus.

use std::process::ExitCode;

use broker::cli::{self, Options};

/// The bus allocates and frees a few small buffers per message; mimalloc does that faster than
/// glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("broker: {e}");
            return ExitCode::from(1);
        }
    };
    if opts.help {
        print!("{}", cli::help());
        return ExitCode::SUCCESS;
    }
    if opts.version {
        println!("broker {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if opts.introspect {
        print!("{}", broker::driver::introspect(broker::bus::DRIVER_PATH));
        return ExitCode::SUCCESS;
    }
    broker::logging::init();
    match broker::server::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("broker: {e}");
            ExitCode::from(1)
        }
    }
}
