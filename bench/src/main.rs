//! broker-bench: the load generator of bench/run.sh. It speaks D-Bus over
//! blocking unix sockets with its own marshalling, so that it costs less
//! than the buses it measures (the p2p round trip shows how little).

mod args;
mod client;
mod peers;
mod wire;
mod workloads;

use anyhow::{Context, Result, bail};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use args::Options;

const USAGE: &str = "\
usage: broker-bench MODE [--option value]...

Peers:
  echo-peer --address ADDR --name NAME   own NAME on the bus, echo every call
  echo-peer --listen PATH                p2p: echo on a socket of our own
  trivial-service NAME                   activatable service, exits on Quit

Workloads (each prints `result NAME VALUE` lines):
  roundtrip  (--address ADDR --dest NAME | --p2p PATH) [--calls 20000]
             [--warmup 1000] [--size 8]                  -> p50_us p99_us
  throughput --address ADDR --dest NAME[,NAME...] [--clients 4] [--depth 32]
             [--seconds 3]                               -> calls_per_s
  broadcast  --address ADDR [--subscribers 100] [--idle-conns 10]
             [--rules-per-conn 100] [--signals 2000] [--rounds 5]
                                                         -> deliveries_per_s
  payload    (--address ADDR --dest NAME | --p2p PATH) [--size 65536]
             [--calls 100]                               -> mb_per_s
  churn      --address ADDR [--seconds 3]                -> conns_per_s
  activation --address ADDR --name NAME [--rounds 20]    -> p50_ms
  memory     --address ADDR --bus-pid PID [--conns 10000] [--settle-ms 1000]
                                                -> idle_kib loaded_kib bytes_per_conn

Flood and soak runner (bench/flood.sh; figures and sentences, no judgement):
  flood      --address ADDR --bus-pid PID --kind silent|auth|soak|unread|matches|names
             [--count 5000] [--hold-s 5] [--after-s 15] [--budget-s 300]
             -> rss_{before,peak,after}_kib fds_{before,peak,after}
                bystander_worst_ms newclient_ms outcome ...
  wait-bus   --address ADDR [--timeout-s 10]     returns once Hello works
  journal-sink PATH                              fake journal for dbus-broker
";

fn main() {
    if let Err(e) = run() {
        eprintln!("broker-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut argv = std::env::args().skip(1);
    let Some(mode) = argv.next() else {
        bail!("no mode given\n{USAGE}");
    };
    if mode == "journal-sink" {
        let path = argv.next().context("journal-sink needs a PATH")?;
        return workloads::flood::journal_sink(&path);
    }
    if mode == "trivial-service" {
        let name = argv.next().context("trivial-service needs a NAME")?;
        return peers::trivial_service(&name);
    }
    raise_fd_limit()?;
    let opts = Options::parse(argv)?;
    match mode.as_str() {
        "echo-peer" => echo_peer(&opts),
        "roundtrip" => workloads::roundtrip::latency(&opts),
        "throughput" => workloads::throughput::run(&opts),
        "broadcast" => workloads::broadcast::run(&opts),
        "payload" => workloads::roundtrip::payload(&opts),
        "churn" => workloads::churn::run(&opts),
        "activation" => workloads::activation::run(&opts),
        "memory" => workloads::memory::run(&opts),
        "flood" => workloads::flood::run(&opts),
        "wait-bus" => workloads::flood::wait_bus(&opts),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown mode {other:?}\n{USAGE}"),
    }
}

fn echo_peer(opts: &Options) -> Result<()> {
    if let Some(path) = opts.optional("listen") {
        opts.finish()?;
        return peers::echo_p2p(path);
    }
    let address = opts.required("address")?;
    let name = opts.required("name")?;
    opts.finish()?;
    peers::echo_on_bus(address, name)
}

/// The memory workload and the floods hold thousands of sockets: lift the
/// soft limit to the hard one.
fn raise_fd_limit() -> Result<()> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    Ok(())
}
