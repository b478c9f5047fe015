//! The `broker` command: parses the command line and runs the bus.

use std::process::ExitCode;

use broker::cli::{self, Options};
use broker::daemon::PrintFds;

/// The bus allocates and frees a few small buffers per message; mimalloc does that faster than
/// glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The bus's own helper (see broker::supervisor::spawner), exec'd by the bus; hidden.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == broker::supervisor::spawner::MODE_ARG)
    {
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
        let code = broker::supervisor::spawner::main(&args);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    purge_freed_pages_at_once();
    let mut opts = match Options::parse(std::env::args().skip(1)) {
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
    if let Some(command) = opts.control.take() {
        return broker::control::main(command);
    }
    if opts.introspect {
        print!("{}", broker::driver::introspect(broker::bus::DRIVER_PATH));
        return ExitCode::SUCCESS;
    }
    if let Err(status) = check_run_usage(&opts) {
        return status;
    }
    // Before anything opens a descriptor that could take the number of one of these.
    let prints = match PrintFds::claim(&opts) {
        Ok(prints) => prints,
        Err(e) => {
            eprintln!("broker: {e}");
            return ExitCode::from(1);
        }
    };
    broker::bus::set_memory_release(release_memory);
    if let Some(command) = opts.run.take() {
        return broker::run::run(opts, command, prints);
    }
    broker::logging::init();
    match broker::server::run(opts, prints) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("broker: {e}");
            ExitCode::from(1)
        }
    }
}

/// Refuses what `broker run` cannot do, and `--log-file` without it: a missing COMMAND with
/// status 2 (so that it differs from the status 1 a COMMAND often exits with), the rest with 1,
/// as other usage errors.
fn check_run_usage(opts: &Options) -> Result<(), ExitCode> {
    let Some(command) = &opts.run else {
        if opts.log_file.is_some() {
            eprintln!("broker: --log-file is an option of broker run");
            return Err(ExitCode::from(1));
        }
        return Ok(());
    };
    if command.is_empty() {
        eprintln!("broker run: no COMMAND given\n{}", broker::run::USAGE);
        return Err(ExitCode::from(2));
    }
    broker::run::check_options(opts).map_err(|e| {
        eprintln!("broker run: {e}");
        ExitCode::from(1)
    })
}

/// Hands the memory that mimalloc keeps for reuse back to the system: the pages freed since,
/// in the bus thread's heap and in the arenas, however recently. Without it the pages a peak
/// took stay with the process, since mimalloc purges only as it allocates, and an idle bus
/// does not.
fn release_memory() {
    // SAFETY: mimalloc's own entry point; it only touches the calling thread's heap and the
    // shared arenas, which it locks.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Has mimalloc hand pages back to the system as soon as they are free, instead of a second
/// later: a delayed purge runs only when the allocator is next called, and a bus that went idle
/// after a flood of connections would keep their memory for good. Pages a busy bus frees and
/// takes again stay cached in its heap, so this costs a handful of `madvise` calls (20 instead
/// of 12 over a throughput and churn run). `MIMALLOC_PURGE_DELAY` in the environment still
/// wins. mimalloc reads its options in a constructor before `main`, so a default set here
/// would be ignored: the option is set outright.
fn purge_freed_pages_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one of mimalloc's options; no memory is involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

/// Runs [`reserve_small_arenas`] as the program loads, before mimalloc's own start-up (which
/// reserves the first arena, before `main`): the entries of this binary's `.init_array` run in
/// link order, broker's objects before the mimalloc library.
#[used]
#[unsafe(link_section = ".init_array")]
static RESERVE_SMALL_ARENAS: extern "C" fn() = reserve_small_arenas;

/// Has mimalloc reserve its address space 64 MiB at a time instead of 1 GiB: its page map
/// commits an entry for every 64 KiB of a reservation, 128 KiB of resident memory for the first
/// gigabyte, which a fresh bus using 1 MiB of heap carried for nothing (RSS 156 KiB smaller).
/// Later reservations grow as more are needed, so a large bus makes a few more `mmap` calls,
/// no more. `MIMALLOC_ARENA_RESERVE` in the environment still wins. Allocates nothing, so
/// that it runs before the first allocation reserves the first arena.
extern "C" fn reserve_small_arenas() {
    // SAFETY: getenv with a NUL-terminated name; only whether it is set is looked at.
    if !unsafe { nix::libc::getenv(c"MIMALLOC_ARENA_RESERVE".as_ptr()) }.is_null() {
        return;
    }
    // SAFETY: sets one of mimalloc's options; no memory is involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_RESERVE, 64 * 1024) }
}

/// `mi_option_arena_reserve` of mimalloc 3's `mimalloc.h` (in KiB), which the Rust bindings do
/// not name.
const MI_OPTION_ARENA_RESERVE: libmimalloc_sys::mi_option_t = 23;

/// `mi_option_purge_delay` of `mimalloc.h` (the same in mimalloc 2 and 3), which the Rust
/// bindings do not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
