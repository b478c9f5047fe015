# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# bench/common.sh: what bench/run.sh and bench/flood.sh share: where the binaries are, the
# progress log, failure counting, building, busd's install, stopping processes, and starting
# dbus-broker with its stand-in journal. Sourced, not run; the caller sets LOG_TAG (the prefix
# of its progress lines) first.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BENCH=$TARGET/release/broker-bench
BROKER=$TARGET/release/broker
BUSD=$ROOT/bench-tools/bin/busd
BUSD_VERSION=0.6.1

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }

fail() {
    FAILURES=$((FAILURES + 1))
    printf '[%s] FAILED: %s\n' "$LOG_TAG" "$*" >&2
}

# Builds broker-bench, and broker unless --broker named a binary (BUILD, BUILD_BROKER).
build() {
    ((BUILD)) || return 0
    local packages=(-p broker-bench)
    ((BUILD_BROKER)) && packages+=(-p broker)
    log "building ${packages[*]} (release)"
    cargo build --release --manifest-path "$ROOT/Cargo.toml" "${packages[@]}" >&2
}

install_busd() {
    if [[ -x $BUSD ]] && [[ $("$BUSD" --version) == "busd $BUSD_VERSION" ]]; then
        return 0
    fi
    log "installing busd $BUSD_VERSION into bench-tools/"
    cargo install busd --version "$BUSD_VERSION" --root "$ROOT/bench-tools" >&2
}

# --- processes -------------------------------------------------------------------
# Both scripts run under their own error settings (run.sh with `set -e`), so every
# command here that may fail on purpose is guarded.

# Waits until FILE has a first line that matches PATTERN and PID still runs.
wait_for_line() {
    local file=$1 pattern=$2 pid=$3 _
    for _ in $(seq 100); do
        if head -n1 "$file" 2>/dev/null | grep -q "$pattern"; then return 0; fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# TERM, up to 5 s of grace, then KILL; reaps our own children. Stops them in
# the order given, so a child named first is reaped by its parent named after.
stop_pids() {
    local pid alive _
    for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        alive=0
        for pid in "$@"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "$@"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    return 0
}

# --- dbus-broker -------------------------------------------------------------------
# dbus-broker runs as ../shared/DESIGN.md says: dbus-broker-launch --scope user
# under systemd-socket-activate, which hands it the listening socket; when nothing
# answers at $JOURNAL, `broker-bench journal-sink` plays the journal the launcher
# insists on for the run, and its socket is removed afterwards. The bus to measure
# is the `dbus-broker` child of the launcher.

JOURNAL=/run/systemd/journal/socket
SINK_PID=""
MADE_JOURNAL=0
STOP_PIDS=()        # what stop_bench_processes stops: the running bus, in order
DBUS_BROKER_WHY=""  # why dbus-broker cannot run here, after check_dbus_broker fails

# Makes sure dbus-broker can run (installing its packages with apt-get as root)
# and that a journal answers; otherwise sets DBUS_BROKER_WHY and returns 1.
# Needs WORK (the run's directory) and BENCH.
check_dbus_broker() {
    local missing=()
    command -v dbus-broker-launch >/dev/null || missing+=(dbus-broker)
    command -v systemd-socket-activate >/dev/null || missing+=(systemd)
    if ((${#missing[@]})) && ((EUID == 0)); then
        log "installing ${missing[*]} with apt-get (for the dbus-broker column)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2 || true
    fi
    if ! command -v dbus-broker-launch >/dev/null; then
        DBUS_BROKER_WHY="not installed (apt-get install dbus-broker)"
    elif ! command -v systemd-socket-activate >/dev/null; then
        DBUS_BROKER_WHY="systemd-socket-activate missing (apt-get install systemd)"
    elif ! start_journal_sink; then
        DBUS_BROKER_WHY="no journal socket at $JOURNAL"
    else
        return 0
    fi
    return 1
}

# dbus-broker-launch refuses to start without a journal: when nothing answers
# at $JOURNAL, a sink of ours takes the place for this run.
start_journal_sink() {
    [[ -n $SINK_PID ]] && return 0
    mkdir -p "$(dirname "$JOURNAL")" || return 1
    "$BENCH" journal-sink "$JOURNAL" >"$WORK/journal.out" 2>&1 &
    SINK_PID=$!
    local _
    for _ in $(seq 50); do
        case $(head -n1 "$WORK/journal.out" 2>/dev/null) in
            present) wait "$SINK_PID" 2>/dev/null || true; SINK_PID=""; return 0 ;;
            ready) MADE_JOURNAL=1; log "fake journal at $JOURNAL"; return 0 ;;
        esac
        kill -0 "$SINK_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "journal sink did not start: $(cat "$WORK/journal.out")"
    stop_pids "$SINK_PID"
    SINK_PID=""
    return 1
}

# start_dbus_broker DIR [PREFIX...]: starts dbus-broker on DIR/bus (under
# PREFIX, e.g. `taskset -c 0`; the launcher's children inherit it), with
# DBUS_BROKER_CONFIG as its configuration if set (else the stock session one).
# systemd-socket-activate starts the launcher on the first connection and the
# launcher forks the bus: wait until Hello works, then find the child. Sets
# ADDR, BUS_PID and STOP_PIDS (the bus first, so that the launcher reaps it),
# or START_ERROR and returns 1.
start_dbus_broker() {
    local dir=$1 launcher config=()
    shift
    ADDR="unix:path=$dir/bus"
    [[ -n ${DBUS_BROKER_CONFIG:-} ]] && config=(--config-file "$DBUS_BROKER_CONFIG")
    "$@" systemd-socket-activate -E XDG_RUNTIME_DIR="$dir" -E DBUS_SESSION_BUS_ADDRESS="$ADDR" \
        -l "$dir/bus" dbus-broker-launch --scope user "${config[@]}" >"$dir/bus.log" 2>&1 &
    launcher=$!
    STOP_PIDS=("$launcher")
    if ! timeout 20 "$BENCH" wait-bus --address "$ADDR" --timeout-s 15 2>>"$dir/bus.log"; then
        START_ERROR="no Hello within 15 s: $(tail -n 2 "$dir/bus.log" | tr '\n' ' ')"
        stop_pids "$launcher"
        STOP_PIDS=()
        return 1
    fi
    BUS_PID=$(pgrep -P "$launcher" -x dbus-broker | head -n1 || true)
    if [[ -z $BUS_PID ]]; then
        START_ERROR="no dbus-broker child of the launcher"
        stop_pids "$launcher"
        STOP_PIDS=()
        return 1
    fi
    STOP_PIDS=("$BUS_PID" "$launcher")
}

# Stops the bus still running (STOP_PIDS) and the journal sink, and removes
# the journal socket if it was ours: at the end of a run and on EXIT/INT/TERM.
stop_bench_processes() {
    if ((${#STOP_PIDS[@]})); then stop_pids "${STOP_PIDS[@]}"; fi
    STOP_PIDS=()
    if [[ -n $SINK_PID ]]; then
        stop_pids "$SINK_PID"
        SINK_PID=""
    fi
    if ((MADE_JOURNAL)); then
        rm -f "$JOURNAL"
        MADE_JOURNAL=0
    fi
    return 0
}
