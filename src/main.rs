//! The `broker` command: parses the command line and runs the bus.

use std::process::ExitCode;

use broker::cli::{LogTarget, Options, USAGE};

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
        println!("{USAGE}");
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BROKER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    if matches!(opts.log_target, LogTarget::Syslog | LogTarget::SyslogOnly) {
        // No syslog client here: stderr is what the journal and test harnesses collect.
        tracing::debug!("syslog was asked for; logging to stderr instead");
    }
    match broker::server::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("broker: {e}");
            ExitCode::from(1)
        }
    }
}
