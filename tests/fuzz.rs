//! A mutation fuzzer on stable Rust for everything in broker that parses what a peer or a file
//! says: the wire reader (framing, header, body validation), the SASL server, the match-rule
//! parser, the busconfig parser and both activation-file parsers.
//!
//! Each target starts from the seed inputs in `tests/fuzz/corpus/<target>/` (real client traffic
//! for the wire and SASL targets, recorded once through a proxy in front of a real broker), mutates them (bit flips,
//! byte inserts and deletes, splices, length fields set to interesting integers, tokens of the
//! target's grammar) and checks that the target never panics, never takes longer than
//! [`CASE_LIMIT`] on one input, and keeps its own invariants (see each `run_*`). An input whose
//! outcome is of a kind not seen before joins the pool that later inputs are mutated from.
//!
//! `cargo test --test fuzz` runs every corpus file as it is (the regression inputs among them) and
//! a fixed number of mutated cases per target, with a fixed seed. The long mode runs by hand:
//! `FUZZ_SECONDS=600 cargo test --release --test fuzz -- --nocapture --test-threads=1` gives each
//! target that many seconds (`FUZZ_TARGET=wire` picks one, `FUZZ_SEED=N` the PRNG seed) and
//! prints the inputs run, the time, and the crashes, each written to `target/fuzz-crashes/`.
//! A crash file copied into the target's corpus folder runs in every later run; the
//! `regression_*` tests name such inputs and what must come of them.
//!
//! The PRNG is a small xorshift64*: the run is reproducible from its printed seed, and the
//! `rand` or `arbitrary` crates would add dependencies without adding anything a byte mutator
//! needs.

mod common;

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::auth::{AuthPolicy, Handshake, Mechanisms};
use broker::match_rule::{MatchContext, MatchRule};
use broker::wire::{FrameLimits, FrameReader, MAX_MESSAGE_SIZE, WireError};
use zbus::Message;
use zbus::message::Type;
use zbus::wire::Endian;
use zbus::wire::serialized::{Context, Data};

/// The longest one case may take before it counts as a hang (generous: debug builds under load).
const CASE_LIMIT: Duration = Duration::from_secs(10);
/// Mutated cases per target in a plain `cargo test` (the wire target is slower per case: a
/// socket pair and several reads each).
const QUICK_CASES: usize = 10_000;
const QUICK_WIRE_CASES: usize = 3_000;
/// The most inputs the pool of a target keeps beside its seeds.
const MAX_POOL: usize = 4096;
/// The most kinds of outcome remembered; past it, no input joins the pool for being new.
const MAX_KINDS: usize = 100_000;

/// One thing under test: feeds it an input, checks what it did.
struct Target {
    name: &'static str,
    /// Runs one input. `Ok` names the kind of outcome (inputs with a new kind join the pool);
    /// `Err` is a broken invariant. A panic is a crash.
    run: fn(&[u8]) -> Result<String, String>,
    /// Tokens of the target's grammar, inserted or overwritten by the mutator.
    tokens: &'static [&'static [u8]],
    /// The largest input the mutator makes for it.
    max_input: usize,
    /// Run on half the mutated inputs, to keep them past the target's first check.
    fixup: Option<fn(&mut [u8])>,
}

const TARGETS: [Target; 6] = [
    Target {
        name: "wire",
        run: run_wire,
        tokens: &[
            b"l\x01\x00\x01",
            b"B\x01\x00\x01",
            b"l\x02\x00\x01",
            b"l\x03\x00\x01",
            b"l\x04\x00\x01",
            // Header fields: code, then the signature of the variant.
            b"\x01\x01o\x00",
            b"\x02\x01s\x00",
            b"\x03\x01s\x00",
            b"\x04\x01s\x00",
            b"\x05\x01u\x00",
            b"\x06\x01s\x00",
            b"\x07\x01s\x00",
            b"\x08\x01g\x00",
            b"\x09\x01u\x00",
            b"\x0a\x01s\x00",
            b"\x08\x01g\x00\x05a{sv}\x00",
            b"\x08\x01g\x00\x01h\x00",
            b"\x08\x01g\x00\x02av\x00",
            // Body pieces: a variant's signature, an empty array, a string.
            b"\x01v\x00",
            b"\x02ay\x00",
            b"\x00\x00\x00\x00",
            b"\x01\x00\x00\x00x\x00",
        ],
        max_input: 64 * 1024,
        fixup: Some(fit_body_length),
    },
    Target {
        name: "sasl",
        run: run_sasl,
        tokens: &[
            b"\0",
            b"\r\n",
            b"AUTH ",
            b"AUTH EXTERNAL ",
            b"AUTH ANONYMOUS",
            b"AUTH EXTERNAL\r\n",
            b"DATA ",
            b"DATA\r\n",
            b"BEGIN\r\n",
            b"NEGOTIATE_UNIX_FD\r\n",
            b"CANCEL\r\n",
            b"ERROR\r\n",
            b"31303030",
            b"30",
            b"3",
        ],
        max_input: 16 * 1024,
        fixup: None,
    },
    Target {
        name: "match_rule",
        run: run_match_rule,
        tokens: &[
            b"type=",
            b"'signal'",
            b"sender=",
            b"interface=",
            b"member=",
            b"path=",
            b"path_namespace=",
            b"destination=",
            b"arg0=",
            b"arg63=",
            b"arg64=",
            b"arg1path=",
            b"arg0namespace=",
            b"eavesdrop=",
            b"'true'",
            b"'",
            b",",
            b"\\'",
            b"'\\''",
            b"=",
            b"/",
            b".",
            b":1.",
        ],
        max_input: 16 * 1024,
        fixup: None,
    },
    Target {
        name: "busconfig",
        run: run_busconfig,
        tokens: &[
            b"<busconfig>",
            b"</busconfig>",
            b"<policy context=\"default\">",
            b"<policy user=\"",
            b"<policy group=\"",
            b"</policy>",
            b"<allow ",
            b"<deny ",
            b"send_destination=\"*\"",
            b"own_prefix=\"",
            b"receive_type=\"",
            b"/>",
            b"<limit name=\"",
            b"\">",
            b"</limit>",
            b"<listen>",
            b"</listen>",
            b"<include>",
            b"<includedir>",
            b"<![CDATA[",
            b"]]>",
            b"<!DOCTYPE busconfig [",
            b"<!ENTITY e \"",
            b"&e;",
            b"&amp;",
            b"&#x",
            b"<!--",
            b"-->",
            b"4294967296",
        ],
        max_input: 16 * 1024,
        fixup: None,
    },
    Target {
        name: "activation_toml",
        run: run_activation_toml,
        tokens: &[
            b"name = ",
            b"exec = [",
            b"]",
            b"\"",
            b"'''",
            b"\"\"\"",
            b"\\u",
            b"environment = {",
            b"}",
            b"working_directory = ",
            b"start_timeout_ms = ",
            b"18446744073709551616",
            b"[",
            b"[[",
            b"=",
            b"\n",
            b"#",
        ],
        max_input: 16 * 1024,
        fixup: None,
    },
    Target {
        name: "activation_service",
        run: run_activation_service,
        tokens: &[
            b"[D-BUS Service]\n",
            b"Name=",
            b"Exec=",
            b"User=",
            b"SystemdService=",
            b"AssumedAppArmorLabel=",
            b"\n",
            b"\\",
            b"\\s",
            b"\"",
            b"'",
            b"=",
            b"[",
            b"]",
            b"#",
            b"%",
            b" ",
        ],
        max_input: 16 * 1024,
        fixup: None,
    },
];

// ---------------------------------------------------------------------------------------------
// The runner.

/// xorshift64*: small, fast, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// FNV-1a: names crash files and derives each input's own choices (chunking, fds, uid), so that
/// a saved input replays the same way.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target)
}

fn crash_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("fuzz-crashes")
}

/// The seed inputs of `target`, in file-name order.
fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "corpus {} is empty", dir.display());
    paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).expect("read seed");
            (path, bytes)
        })
        .collect()
}

/// Integers that sit on the edges of the lengths and limits the parsers check.
const INTERESTING: [u32; 18] = [
    0,
    1,
    2,
    7,
    8,
    0x7f,
    0x80,
    0xff,
    0x100,
    0xffff,
    (1 << 26) - 1,
    1 << 26,
    (1 << 26) + 8,
    (1 << 27) - 16,
    1 << 27,
    (1 << 27) + 1,
    0x7fff_ffff,
    0xffff_ffff,
];

/// One to four mutations of an input from the pool.
fn mutate(rng: &mut Rng, pool: &[Vec<u8>], target: &Target) -> Vec<u8> {
    let mut input = pool[rng.below(pool.len())].clone();
    for _ in 0..1 + rng.below(4) {
        mutate_once(rng, &mut input, pool, target.tokens);
    }
    // Splices and repeats grow inputs over time; cut the big ones back often, so that most
    // cases stay small and fast.
    if input.len() > 4096 && rng.chance(2) {
        input.truncate(4096 + rng.below(input.len() - 4096));
    }
    input.truncate(target.max_input);
    if let Some(fixup) = target.fixup
        && rng.chance(2)
    {
        fixup(&mut input);
    }
    input
}

fn mutate_once(rng: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>], tokens: &[&[u8]]) {
    let len = input.len();
    let at = if len == 0 { 0 } else { rng.below(len) };
    match rng.below(10) {
        0 if len > 0 => input[at] ^= 1 << rng.below(8),
        1 if len > 0 => {
            input[at] = [0, 0xff, 0x7f, 0x80, b'\r', b'\n', b'\\', rng.next() as u8][rng.below(8)]
        }
        2 => {
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            input.splice(at..at, bytes);
        }
        3 if len > 0 => {
            let end = (at + 1 + rng.below(16)).min(len);
            input.drain(at..end);
        }
        4 if len > 0 => {
            // Repeat a piece in place.
            let end = (at + 1 + rng.below(64)).min(len);
            let piece = input[at..end].to_vec();
            input.splice(at..at, piece);
        }
        5 => {
            // Splice: this input up to `at`, then another from some point on.
            let other = &pool[rng.below(pool.len())];
            let from = if other.is_empty() {
                0
            } else {
                rng.below(other.len())
            };
            input.truncate(at);
            input.extend_from_slice(&other[from..]);
        }
        6 | 7 if len >= 4 => {
            // A length field: an aligned u32 (or any place) set to an edge, or nudged.
            let at = if rng.chance(2) { at & !3 } else { at }.min(len - 4);
            let old = u32::from_le_bytes(input[at..at + 4].try_into().expect("4 bytes"));
            let value = match rng.below(3) {
                0 => INTERESTING[rng.below(INTERESTING.len())],
                1 => old.wrapping_add(rng.below(17) as u32).wrapping_sub(8),
                _ => old.wrapping_mul(2),
            };
            let bytes = if rng.chance(2) {
                value.to_le_bytes()
            } else {
                value.to_be_bytes()
            };
            input[at..at + 4].copy_from_slice(&bytes);
        }
        _ if !tokens.is_empty() => {
            let token = tokens[rng.below(tokens.len())];
            if rng.chance(2) || len == 0 {
                input.splice(at..at, token.iter().copied());
            } else {
                let end = (at + token.len()).min(len);
                input.splice(at..end, token.iter().copied());
            }
        }
        _ => input.push(rng.next() as u8),
    }
}

/// Where the current case of a target is, for the watchdog.
struct Slot {
    input: Vec<u8>,
    started: Instant,
    busy: bool,
    finished: bool,
}

/// Aborts the process (after saving the input) if one case runs past [`CASE_LIMIT`]: a hang
/// cannot be unwound, and the crash file is what matters.
fn watchdog(name: &'static str, slot: Arc<Mutex<Slot>>) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            if slot.finished {
                return;
            }
            if slot.busy && slot.started.elapsed() > CASE_LIMIT {
                let path = save_crash(name, "hang", &slot.input);
                eprintln!(
                    "fuzz {name}: one input ran longer than {CASE_LIMIT:?}; saved as {}",
                    path.display()
                );
                std::process::abort();
            }
        }
    });
}

fn save_crash(name: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = crash_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}-{kind}-{:016x}.bin", hash(input)));
    if let Err(e) = std::fs::write(&path, input) {
        eprintln!("cannot save {}: {e}", path.display());
    }
    path
}

/// What one target's run found.
#[derive(Default)]
struct Report {
    inputs: usize,
    crashes: Vec<String>,
    outcomes: usize,
    slowest: Duration,
}

/// Runs `input` once under the watchdog; a panic or a broken invariant is saved and reported.
fn run_case(
    target: &Target,
    slot: &Mutex<Slot>,
    input: &[u8],
    report: &mut Report,
) -> Option<String> {
    {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.input.clear();
        slot.input.extend_from_slice(input);
        slot.started = Instant::now();
        slot.busy = true;
    }
    let started = Instant::now();
    let result = std::panic::catch_unwind(|| (target.run)(input));
    report.slowest = report.slowest.max(started.elapsed());
    slot.lock().unwrap_or_else(|e| e.into_inner()).busy = false;
    report.inputs += 1;
    let failure = match result {
        Ok(Ok(outcome)) => return Some(outcome),
        Ok(Err(broken)) => ("invariant", broken),
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            ("panic", text)
        }
    };
    let path = save_crash(target.name, failure.0, input);
    report
        .crashes
        .push(format!("{}: {} ({})", failure.0, failure.1, path.display()));
    None
}

/// Fuzzes `target` for `cases` inputs or until `deadline`, whichever comes first.
fn fuzz(target: &Target, seed: u64, cases: usize, deadline: Option<Instant>) -> Report {
    let slot = Arc::new(Mutex::new(Slot {
        input: Vec::new(),
        started: Instant::now(),
        busy: false,
        finished: false,
    }));
    watchdog(target.name, slot.clone());
    let mut report = Report::default();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut seen = HashSet::new();
    for (_, bytes) in seeds(target.name) {
        if let Some(outcome) = run_case(target, &slot, &bytes, &mut report) {
            seen.insert(outcome);
        }
        pool.push(bytes);
    }
    let seed_count = pool.len();
    let mut rng = Rng::new(seed ^ hash(target.name.as_bytes()));
    let mut case = 0;
    while case < cases && deadline.is_none_or(|d| Instant::now() < d) {
        case += 1;
        let input = mutate(&mut rng, &pool, target);
        if let Some(outcome) = run_case(target, &slot, &input, &mut report)
            && seen.len() < MAX_KINDS
            && seen.insert(outcome)
        {
            if pool.len() >= seed_count + MAX_POOL {
                let evict = seed_count + rng.below(MAX_POOL);
                pool[evict] = input;
            } else {
                pool.push(input);
            }
        }
    }
    slot.lock().unwrap_or_else(|e| e.into_inner()).finished = true;
    report.outcomes = seen.len();
    report
}

/// Runs one target in the mode the environment asks for and fails on any crash.
fn fuzz_target(name: &str) {
    let target = TARGETS
        .iter()
        .find(|t| t.name == name)
        .expect("a known target");
    let long = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    if let Ok(only) = std::env::var("FUZZ_TARGET")
        && long.is_some()
        && only != name
    {
        return;
    }
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| match long {
            // A fresh seed each long run covers new ground; the quick run stays the same.
            Some(_) => hash(
                &std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
                    .to_le_bytes(),
            ),
            None => 0x5eed,
        });
    let started = Instant::now();
    let report = match long {
        Some(secs) => fuzz(
            target,
            seed,
            usize::MAX,
            Some(started + Duration::from_secs(secs)),
        ),
        None if name == "wire" => fuzz(target, seed, QUICK_WIRE_CASES, None),
        None => fuzz(target, seed, QUICK_CASES, None),
    };
    let elapsed = started.elapsed();
    println!(
        "fuzz {name}: {} inputs in {:.1} s ({:.0}/s), seed {seed}, {} kinds of outcome, slowest case {:?}, {} crashes",
        report.inputs,
        elapsed.as_secs_f64(),
        report.inputs as f64 / elapsed.as_secs_f64().max(1e-9),
        report.outcomes,
        report.slowest,
        report.crashes.len()
    );
    for crash in report.crashes.iter().take(20) {
        println!("  {crash}");
    }
    assert!(
        report.crashes.is_empty(),
        "fuzz {name}: {} crashes, inputs saved in {}:\n{}",
        report.crashes.len(),
        crash_dir().display(),
        report.crashes.join("\n")
    );
}

#[test]
fn fuzz_wire() {
    fuzz_target("wire");
}

#[test]
fn fuzz_sasl() {
    fuzz_target("sasl");
}

#[test]
fn fuzz_match_rule() {
    fuzz_target("match_rule");
}

#[test]
fn fuzz_busconfig() {
    fuzz_target("busconfig");
}

#[test]
fn fuzz_activation_toml() {
    fuzz_target("activation_toml");
}

#[test]
fn fuzz_activation_service() {
    fuzz_target("activation_service");
}

/// An error's text up to the first quoted value, element or line break, digits out: outcomes that
/// differ only in a number or a name are one kind.
fn kind_of(text: &str) -> String {
    text.chars()
        .take_while(|c| !matches!(c, '"' | '\'' | '`' | '<' | '\n'))
        .filter(|c| !c.is_ascii_digit())
        .take(80)
        .collect()
}

/// What `target` makes of the corpus file `file`; a broken invariant fails the test.
fn replay(target: &str, file: &str) -> String {
    let target = TARGETS
        .iter()
        .find(|t| t.name == target)
        .expect("a known target");
    let input = std::fs::read(corpus_dir(target.name).join(file)).expect("corpus file");
    (target.run)(&input).unwrap_or_else(|broken| panic!("{file}: {broken}"))
}

// Inputs the fuzzer found, each kept in the corpus and named here with what must come of it.

/// A fixed header whose field array claims 2^26 + 8 bytes is refused from its 16 bytes alone.
#[test]
fn regression_header_field_array_over_the_maximum() {
    let outcome = replay("wire", "built-field-array-over-maximum");
    assert!(
        outcome.starts_with("invalid: header field array"),
        "{outcome}"
    );
}

/// Under a small limit, a message that fits as sent and not once the bus adds its SENDER field
/// is passed on, as dbus-daemon does (the limit is on what the peer sends), and it reads back
/// the same.
#[test]
fn regression_stamp_past_a_small_limit() {
    let outcome = replay("wire", "regress-stamp-past-a-small-limit");
    assert!(outcome.starts_with("ok MethodCall,MethodCall"), "{outcome}");
}

/// `BEGIN EXTERNAL` is BEGIN: its arguments are ignored, as dbus-daemon ignores them, and the
/// message stream starts right after that line.
#[test]
fn regression_begin_with_arguments() {
    let outcome = replay("sasl", "regress-begin-with-arguments");
    assert!(outcome.starts_with("begin fds=true"), "{outcome}");
}

/// Lines that follow BEGIN are the leftover, left for the message reader, not answered.
#[test]
fn regression_begin_then_more_lines() {
    let outcome = replay("sasl", "regress-begin-then-more-lines");
    assert!(outcome.starts_with("begin"), "{outcome}");
}

// ---------------------------------------------------------------------------------------------
// The wire reader.

/// Makes the first message's body length claim every byte after its header fields, so that a
/// mutated message stays one whole frame and its header and body reach validation.
fn fit_body_length(input: &mut [u8]) {
    if input.len() < 16 {
        return;
    }
    let big = input[0] == b'B';
    let fields = u32::from_le_bytes(input[12..16].try_into().expect("4 bytes"));
    let fields = if big { fields.swap_bytes() } else { fields } as usize;
    let Some(body) = input.len().checked_sub((16 + fields).next_multiple_of(8)) else {
        return;
    };
    let body = body as u32;
    let bytes = if big {
        body.to_be_bytes()
    } else {
        body.to_le_bytes()
    };
    input[4..8].copy_from_slice(&bytes);
}

const SENDER: &str = ":1.42";

/// Each input's own choices, derived from its bytes so that a saved input replays the same.
struct WirePlan {
    limits: FrameLimits,
    /// How many fds go with the first chunk.
    fds: usize,
    /// How much of the input is the handshake's leftover, parsed before any read.
    leftover: usize,
    chunks: Vec<usize>,
}

fn wire_plan(input: &[u8]) -> WirePlan {
    let mut rng = Rng::new(hash(input));
    let max_message_size = match rng.below(8) {
        0 => 16 + rng.below(4096),
        _ => MAX_MESSAGE_SIZE,
    };
    let fds = if rng.chance(4) { rng.below(3) } else { 0 };
    let leftover = if rng.chance(3) {
        rng.below(input.len() + 1)
    } else {
        0
    };
    let mut chunks = Vec::new();
    let mut left = input.len() - leftover;
    while left > 0 {
        let n = match rng.below(3) {
            0 => left,
            1 => 1 + rng.below(left.min(16)),
            _ => 1 + rng.below(left),
        };
        chunks.push(n);
        left -= n;
    }
    WirePlan {
        limits: FrameLimits {
            max_message_size,
            max_fds: 16,
        },
        fds,
        leftover,
        chunks,
    }
}

/// Feeds the input through a socket pair as the plan says; returns what the reader made of it.
fn read_through_socket(input: &[u8], plan: &WirePlan) -> (Vec<Message>, Result<(), WireError>) {
    use nix::sys::socket::{
        AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    let mut reader = FrameReader::new(SENDER.into(), input[..plan.leftover].to_vec());
    let mut out = Vec::new();
    if let Err(e) = reader.drain_leftover(&plan.limits, &mut out) {
        return (out, Err(e));
    }
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let fds: Vec<std::os::fd::RawFd> = (0..plan.fds).map(|_| null.as_raw_fd()).collect();
    let mut scratch = Vec::new();
    let mut at = plan.leftover;
    for (i, &n) in plan.chunks.iter().enumerate() {
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if i == 0 && !fds.is_empty() {
            &cmsg
        } else {
            &[]
        };
        let iov = [std::io::IoSlice::new(&input[at..at + n])];
        let sent = sendmsg::<()>(theirs.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
            .expect("sendmsg");
        assert_eq!(sent, n, "short write to the socket pair");
        at += n;
        loop {
            match reader.read(ours.as_raw_fd(), &mut scratch, &plan.limits, &mut out) {
                Ok(true) => break,
                Ok(false) => continue,
                // Nothing more to read: the reader waits for the next chunk.
                Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return (out, Err(e)),
            }
        }
    }
    (out, Ok(()))
}

/// How many whole messages the input holds by its fixed headers alone, the longest of them, and
/// whether bytes of an incomplete one follow: what a reader that neither stalls nor invents must
/// have seen when it accepted everything.
fn frames_in(input: &[u8]) -> (usize, usize, bool) {
    let mut at = 0;
    let mut count = 0;
    let mut longest = 0;
    while input.len() - at >= 16 {
        let head = &input[at..at + 16];
        let u32_at = |i: usize| {
            let b = [head[i], head[i + 1], head[i + 2], head[i + 3]];
            if head[0] == b'B' {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        } as usize;
        let total = (16 + u32_at(12)).next_multiple_of(8) + u32_at(4);
        if input.len() - at < total {
            return (count, longest, true);
        }
        at += total;
        count += 1;
        longest = longest.max(total);
    }
    (count, longest, at < input.len())
}

/// Checks one message the reader accepted, as a receiver would: from its bytes alone.
fn revalidate(msg: &Message, limits: &FrameLimits) -> Result<(), String> {
    let bytes = msg.data().bytes();
    // The configured limit applies to what the peer sent (see `run_wire`); the SENDER field the
    // bus adds may take a message past it, as in dbus-daemon, but never past the specification's
    // maximum, which receivers enforce.
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(format!("passes on {} bytes, over the maximum", bytes.len()));
    }
    let endian = if bytes.first() == Some(&b'B') {
        Endian::Big
    } else {
        Endian::Little
    };
    let fds: Vec<OwnedFd> = msg
        .data()
        .fds()
        .iter()
        .map(|fd| fd.as_fd().try_clone_to_owned().expect("dup"))
        .collect();
    let data = Data::new_fds(bytes.to_vec(), Context::new(endian, 0), fds);
    // SAFETY: this parses the bytes afresh; the body is validated below before it is read.
    let copy = unsafe { Message::from_bytes(data) }
        .map_err(|e| format!("accepted a message whose header fails re-parsing: {e}"))?;
    match copy.body().validate() {
        // Handles past the fds the message brought pass, on purpose (see wire.rs).
        Ok(()) | Err(zbus::Error::UnknownFd) => {}
        Err(e) => {
            return Err(format!(
                "accepted a message whose body fails validation: {e}"
            ));
        }
    }
    let header = copy.header();
    if header.sender().map(|s| s.as_str()) != Some(SENDER) {
        return Err(format!(
            "sender is {:?}, not the stamped {SENDER}",
            header.sender()
        ));
    }
    let required = match header.message_type() {
        Type::MethodCall => header.path().is_some() && header.member().is_some(),
        Type::Signal => {
            header.path().is_some() && header.interface().is_some() && header.member().is_some()
        }
        Type::Error => header.error_name().is_some() && header.reply_serial().is_some(),
        Type::MethodReturn => header.reply_serial().is_some(),
    };
    if !required {
        return Err(format!(
            "accepted a {:?} without its required fields",
            header.message_type()
        ));
    }
    if msg.data().fds().is_empty() {
        // Read again, the stamped message must come out the same.
        let mut again = Vec::new();
        let any_size = FrameLimits {
            max_message_size: MAX_MESSAGE_SIZE,
            ..*limits
        };
        FrameReader::new(SENDER.into(), bytes.to_vec())
            .drain_leftover(&any_size, &mut again)
            .map_err(|e| format!("the reader refuses its own output: {e}"))?;
        if again.len() != 1 || again[0].data().bytes() != bytes {
            return Err("reading the reader's output again changes it".into());
        }
    }
    Ok(())
}

/// The wire reader: it yields whole valid messages, waits for the bytes of an incomplete one,
/// or refuses the stream; never a message that a receiver would refuse, never a stall with a
/// whole message in hand.
fn run_wire(input: &[u8]) -> Result<String, String> {
    let plan = wire_plan(input);
    let (out, result) = read_through_socket(input, &plan);
    for msg in &out {
        revalidate(msg, &plan.limits)?;
    }
    match result {
        Ok(()) => {
            let (whole, longest, rest) = frames_in(input);
            if out.len() != whole {
                return Err(format!(
                    "{whole} whole messages sent, {} yielded without an error",
                    out.len()
                ));
            }
            if longest > plan.limits.max_message_size {
                return Err(format!(
                    "accepted a message of {longest} bytes over the limit"
                ));
            }
            let types: Vec<String> = out
                .iter()
                .map(|m| format!("{:?}", m.message_type()))
                .collect();
            Ok(format!("ok {} rest={rest}", types.join(",")))
        }
        Err(WireError::Invalid(why)) => Ok(format!("invalid: {}", kind_of(&why))),
        Err(e) => Err(format!("unexpected error from a socket pair: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The SASL server.

const OWNER: u32 = 1000;
const GUID: &str = "0123456789abcdef0123456789abcdef";

/// The SASL server, fed in pieces: it answers with whole lines of the protocol's replies, lets
/// in only the owner or root (or ANONYMOUS when allowed), only after `OK` and `BEGIN`, and gives
/// back exactly the bytes that followed `BEGIN`.
fn run_sasl(input: &[u8]) -> Result<String, String> {
    let mut rng = Rng::new(hash(input));
    let peer_uid = [OWNER, 0, 1001][rng.below(3)];
    let anonymous = rng.chance(4);
    let policy = AuthPolicy {
        guid: GUID.into(),
        owner_uid: OWNER,
        timeout: Duration::from_secs(30),
        max_line: 16 * 1024,
        mechanisms: Mechanisms {
            external: true,
            anonymous,
        },
    };
    let mut handshake = Handshake::new(peer_uid, &policy);
    let mut replies = Vec::new();
    let mut at = 0;
    let outcome = loop {
        if at == input.len() {
            break Ok(None);
        }
        let n = 1 + rng.below(input.len() - at);
        match handshake.receive(&input[at..at + n], &mut replies) {
            Ok(None) => at += n,
            Ok(Some(done)) => break Ok(Some((done, at + n))),
            Err(e) => break Err(e),
        }
    };
    let text = String::from_utf8(replies).map_err(|_| "a reply is not UTF-8".to_string())?;
    if !text.is_empty() && !text.ends_with("\r\n") {
        return Err(format!("a reply is not a whole line: {text:?}"));
    }
    let mut replied_ok = false;
    for line in text.split_terminator("\r\n") {
        let known = ["OK ", "REJECTED ", "ERROR", "AGREE_UNIX_FD", "DATA"];
        if !known.iter().any(|k| line.starts_with(k)) {
            return Err(format!("unknown reply line {line:?}"));
        }
        replied_ok |= line.starts_with("OK ");
    }
    match outcome {
        Ok(Some((done, fed))) => {
            if !replied_ok {
                return Err("BEGIN accepted without OK".into());
            }
            let trusted = peer_uid == OWNER || peer_uid == 0;
            if !(trusted || anonymous && done.anonymous) {
                return Err(format!(
                    "uid {peer_uid} let in (anonymous: {})",
                    done.anonymous
                ));
            }
            if done.anonymous && !anonymous {
                return Err("ANONYMOUS let in while not allowed".into());
            }
            // The leftover is the end of what was fed, right after a BEGIN line (whose
            // arguments, as in dbus-daemon, are ignored).
            let sent = &input[..fed];
            let before = sent.len().checked_sub(done.leftover.len());
            let follows_begin = before.is_some_and(|at| {
                let lines = sent[..at].strip_suffix(b"\r\n").unwrap_or(b"x");
                let last = lines.split(|&b| b == b'\n').next_back().unwrap_or_default();
                sent.ends_with(&done.leftover) && (last == b"BEGIN" || last.starts_with(b"BEGIN "))
            });
            if !follows_begin {
                return Err("the leftover is not what followed BEGIN".into());
            }
            Ok(format!(
                "begin fds={} anonymous={}",
                done.unix_fds, done.anonymous
            ))
        }
        Ok(None) => Ok(format!("waiting {}", text.lines().count())),
        Err(e) => Ok(format!("refused: {}", kind_of(&e.to_string()))),
    }
}

// ---------------------------------------------------------------------------------------------
// Match rules.

/// A few messages for a parsed rule to be matched against.
fn sample_messages() -> &'static [Message] {
    static MESSAGES: std::sync::OnceLock<Vec<Message>> = std::sync::OnceLock::new();
    MESSAGES.get_or_init(|| {
        let signal = Message::signal("/org/example/a", "org.example.I", "Changed")
            .sender(":1.5")
            .build(&("org.example.Name", "/org/example", 3u32))
            .expect("signal");
        let call = Message::method_call("/org/example", "Get")
            .destination("org.example")
            .build(&("org.example.I.x",))
            .expect("call");
        vec![signal, call]
    })
}

/// The match-rule parser: a rule it accepts prints as text that parses back to the same rule
/// (what `GetAllMatchRules` relies on), and matching it against messages does not panic.
fn run_match_rule(input: &[u8]) -> Result<String, String> {
    // AddMatch takes a D-Bus string, which is always UTF-8.
    let text = String::from_utf8_lossy(input);
    let rule = match MatchRule::parse(&text) {
        Ok(rule) => rule,
        Err(e) => {
            let why = if e.too_long() { "too long" } else { "invalid" };
            return Ok(format!("refused: {why} {}", kind_of(&e.to_string())));
        }
    };
    let printed = rule.to_string();
    if printed.len() <= broker::match_rule::MAX_RULE_LEN {
        let again = MatchRule::parse(&printed)
            .map_err(|e| format!("the printed rule {printed:?} does not parse: {e}"))?;
        if again != rule {
            return Err(format!("{printed:?} parses to another rule"));
        }
    }
    let owner_of = |name: &str| (name == "org.example.Name").then_some(":1.5");
    let ctx = MatchContext {
        owner_of: &owner_of,
        destination_unique: Some(":1.9"),
    };
    let matched: Vec<bool> = sample_messages()
        .iter()
        .map(|m| rule.matches(m, &ctx))
        .collect();
    // Which conditions the rule has, whatever their values.
    let conditions = [
        rule.msg_type().is_some(),
        rule.sender().is_some(),
        rule.interface().is_some(),
        rule.member().is_some(),
        rule.path().is_some(),
        rule.path_namespace().is_some(),
        rule.destination().is_some(),
        rule.eavesdrop(),
        printed.contains("arg"),
    ];
    Ok(format!("rule {conditions:?} {matched:?}"))
}

// ---------------------------------------------------------------------------------------------
// Files.

/// The busconfig parser, on a file in a directory that does not exist (so no include reaches
/// the host's files): a result or an error, never a panic.
fn run_busconfig(input: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(input);
    let path = Path::new("/nonexistent-broker-fuzz/bus.conf");
    match broker::config::load_text(&text, path) {
        Ok(config) => Ok(format!(
            "ok listen={} auth={} dirs={}",
            config.listen.len(),
            config.auth.len(),
            config.servicedirs.len()
        )),
        Err(e) => Ok(format!("refused: {}", kind_of(&e.message))),
    }
}

/// An activation file: a service it accepts owns a valid name and runs a program.
fn check_activation(path: &str, input: &[u8]) -> Result<String, String> {
    let text = match std::str::from_utf8(input) {
        Ok(text) => text,
        // The loader refuses a file that is not UTF-8 before any parser sees it.
        Err(_) => return Ok("not UTF-8".into()),
    };
    match broker::activation::files::parse_text(Path::new(path), text) {
        Ok(service) => {
            zbus::names::WellKnownName::try_from(service.name.as_str())
                .map_err(|e| format!("accepted the name {:?}: {e}", service.name))?;
            if service.exec.is_empty() {
                return Err("accepted a service with no program".into());
            }
            Ok(format!("ok args={}", service.exec.len()))
        }
        // A TOML error quotes the input first and says what is wrong on its last line.
        Err(e) => {
            let said = e.message.lines().rfind(|l| !l.trim().is_empty());
            Ok(format!("refused: {}", kind_of(said.unwrap_or_default())))
        }
    }
}

fn run_activation_toml(input: &[u8]) -> Result<String, String> {
    check_activation("/nonexistent-broker-fuzz/org.example.Fuzz.toml", input)
}

fn run_activation_service(input: &[u8]) -> Result<String, String> {
    check_activation("/nonexistent-broker-fuzz/org.example.Fuzz.service", input)
}
