#!/usr/bin/env bash
# bench/run.sh: broker, dbus-daemon, busd and dbus-broker side by side (issues 5, 13).
#
# Usage: bench/run.sh [--smoke] [--buses "broker dbus-daemon busd dbus-broker"]
#                     [--rounds N] [--out FILE] [--allow-failures] [--no-build]
#                     [--broker PATH]
#
#   --smoke           every workload, very briefly and once (seconds in all):
#                     proves the harness works; writes
#                     target/bench/BENCHMARKS.smoke.md unless --out is given.
#                     Figures from it mean nothing.
#   --buses LIST      which buses to measure (default: all four, in turn).
#   --rounds N        rounds of every workload (default 5, with --smoke 1);
#                     each figure in the table is the median of the rounds.
#   --out FILE        where to write the report (default: BENCHMARKS.md at
#                     the repository root).
#   --allow-failures  exit 0 even if a bus failed to start or a workload
#                     failed. Without it the script still measures everything
#                     it can and writes the report, then exits 1.
#   --no-build        use the binaries already in target/release.
#   --broker PATH     measure this broker binary instead of building one.
#
# What it does: builds broker and broker-bench (release), installs busd 0.6.1
# into bench-tools/ (ignored by git) if it is not there, and, as root, Debian's
# dbus-broker and systemd (for systemd-socket-activate) with apt-get if they are
# missing; raises the open-file limit, then for each bus: starts it on a socket
# in a temporary directory, waits until it answers, runs the workloads, stops it.
# Every workload runs N rounds (5), each a separate run of the workload, and the
# table shows the median of the rounds: the round trips, throughput, broadcast,
# payloads, churn and activation run their rounds one after the other against one
# bus; the memory workload gets a fresh bus for every round; the pinned round
# trip runs its rounds against a second bus started with everything under
# `taskset -c 0`. The p2p floor (the same client and echo peer, no bus) is
# measured the same way in each mode; its throughput and payload figures show
# what the load generator can do on its own. Progress and failures go to the
# terminal, bus and peer logs stay in the temporary directory (its path is
# printed; it is kept when something failed).
#
# dbus-daemon, busd and dbus-broker read the same configuration (the stock
# session.conf reduced to what the bench needs, written below); broker runs
# with --session and --activation-dir. dbus-broker runs as
# ../shared/DESIGN.md says (see bench/common.sh): dbus-broker-launch --scope user
# under systemd-socket-activate, with a stand-in journal when the host has none;
# its figures are those of the `dbus-broker` child, not of the launcher. It
# cannot activate services without systemd (its launcher asks systemd to start
# a unit, and StartServiceByName fails with "Could not activate remote peer:
# unit failed"), and busd 0.6.1 has no activation: their activation cells say so.
#
# The load generator, bench/src (`broker-bench help` lists its modes):
#   broker-bench echo-peer --address ADDR --name NAME | --listen PATH
#   broker-bench trivial-service NAME      (started by the bus, see below)
#   broker-bench roundtrip  (--address A --dest N | --p2p PATH) -> p50_us p99_us
#   broker-bench throughput --address A --dest N1,N2            -> calls_per_s
#   broker-bench broadcast  --address A                          -> deliveries_per_s
#   broker-bench payload    (--address A --dest N | --p2p PATH) --size B -> mb_per_s
#   broker-bench churn      --address A                          -> conns_per_s
#   broker-bench activation --address A --name N                 -> p50_ms
#   broker-bench memory     --address A --bus-pid PID            -> bytes_per_conn ...
# Each workload prints `result NAME VALUE` lines on stdout; this script reads
# them. Workloads (one round each): round trip = one 8-byte call in flight;
# throughput = 4 clients x 32 calls in flight over two echo peers; broadcast = 1
# emitter, 100 matching subscribers, 10 connections x 100 non-matching rules,
# the median of 5 timed bursts; payload = 64 KiB and 4 MiB round trips (MB =
# 10^6 bytes, one direction); churn = connect, EXTERNAL auth, Hello, close;
# activation = the p50 of 20 cold StartServiceByName of `broker-bench
# trivial-service`, declared by a .service file in a temporary directory
# (dbus-daemon: <servicedir>, broker: --activation-dir), each followed by Quit
# and a wait for NameOwnerChanged; memory = VmRSS of a fresh bus, and with
# 10,000 idle connections after Hello.
set -euo pipefail

LOG_TAG=bench
# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SMOKE=0
BUSES="broker dbus-daemon busd dbus-broker"
ROUNDS=""
OUT=""
ALLOW_FAILURES=0
BUILD=1
BUILD_BROKER=1
ARGS=("$@")
while (($#)); do
    case $1 in
        --smoke) SMOKE=1 ;;
        --buses) BUSES=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --allow-failures) ALLOW_FAILURES=1 ;;
        --no-build) BUILD=0 ;;
        --broker) BROKER=$2; BUILD_BROKER=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for bus in $BUSES; do
    case $bus in
        broker | dbus-daemon | busd | dbus-broker) ;;
        *) echo "run.sh: unknown bus $bus (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z $ROUNDS ]]; then
    if ((SMOKE)); then ROUNDS=1; else ROUNDS=5; fi
fi
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --rounds needs a positive number, not $ROUNDS" >&2; exit 2; }
if [[ -z $OUT ]]; then
    if ((SMOKE)); then OUT=$TARGET/bench/BENCHMARKS.smoke.md; else OUT=$ROOT/BENCHMARKS.md; fi
fi

# Workload sizes: full run, and the smoke run that only proves the harness.
if ((SMOKE)); then
    RT=(--calls 200 --warmup 20)
    TP=(--seconds 0.3)
    BC=(--subscribers 10 --idle-conns 2 --rules-per-conn 10 --signals 50 --rounds 1)
    P64=(--calls 5)
    P4M=(--calls 2)
    CHURN=(--seconds 0.3)
    ACT=(--rounds 2)
    MEM=(--conns 200 --settle-ms 100)
    MEM_CONNS=200
    TIMEOUT=60
else
    RT=(--calls 20000 --warmup 2000)
    TP=(--seconds 5)
    BC=(--subscribers 100 --idle-conns 10 --rules-per-conn 100 --signals 2000 --rounds 5)
    P64=(--calls 2000)
    P4M=(--calls 50)
    CHURN=(--seconds 3)
    ACT=(--rounds 20)
    MEM=(--conns 10000 --settle-ms 1000)
    MEM_CONNS=10000
    TIMEOUT=300
fi

declare -A RESULT   # "bus|key" -> the values of the rounds, e.g. "busd|rt.p50_us" -> "31.2 30.9 ..."
declare -A FAILED   # "bus|workload" -> how many rounds failed
declare -A NA       # "bus|workload" -> why the bus cannot run it
declare -A STATUS   # bus -> "ok" | "failed to start" | why it is not measured
FAILURES=0
ECHO_PIDS=()        # echo peers running, for the exit trap

# --- setup -------------------------------------------------------------------

# The stock session.conf, reduced to what the bench needs: our socket,
# EXTERNAL, allow-all policy, our service directory, room for 10,000 peers.
write_dbus_config() {
    cat >"$WORK/session.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <keep_umask/>
  <listen>unix:tmpdir=$WORK</listen>
  <auth>EXTERNAL</auth>
  <servicedir>$SVC</servicedir>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_message_size">1000000000</limit>
  <limit name="service_start_timeout">120000</limit>
  <limit name="auth_timeout">240000</limit>
  <limit name="max_completed_connections">100000</limit>
  <limit name="max_incomplete_connections">10000</limit>
  <limit name="max_connections_per_user">100000</limit>
  <limit name="max_pending_service_starts">10000</limit>
  <limit name="max_names_per_connection">50000</limit>
  <limit name="max_match_rules_per_connection">50000</limit>
  <limit name="max_replies_per_connection">50000</limit>
</busconfig>
EOF
}

write_service_file() {
    mkdir -p "$SVC"
    printf '[D-BUS Service]\nName=bench.Trivial\nExec=%s trivial-service bench.Trivial\n' \
        "$BENCH" >"$SVC/bench.Trivial.service"
}

# --- processes ---------------------------------------------------------------

# Starts BUS (optionally under PREFIX, e.g. "taskset -c 0") in directory DIR;
# sets BUS_PID (the process to measure), ADDR and STOP_PIDS (what to stop, in
# order), or returns 1 if it does not come up.
start_bus() {
    local bus=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    START_ERROR=""
    if [[ $bus == dbus-broker ]]; then
        DBUS_BROKER_CONFIG=$WORK/session.conf start_dbus_broker "$dir" "$@" && return 0
        log "dbus-broker did not start: $START_ERROR"
        return 1
    fi
    local sock="unix:path=$dir/bus"
    local cmd
    case $bus in
        broker) cmd=("$BROKER" --session --address "$sock" --print-address --activation-dir "$SVC") ;;
        dbus-daemon) cmd=(dbus-daemon --nofork --print-address --config-file="$WORK/session.conf" --address="$sock") ;;
        busd) cmd=("$BUSD" --config "$WORK/session.conf" --address "$sock" --print-address) ;;
    esac
    "$@" "${cmd[@]}" >"$dir/address" 2>"$dir/bus.log" &
    BUS_PID=$!
    STOP_PIDS=("$BUS_PID")
    if ! wait_for_line "$dir/address" '^unix:' "$BUS_PID"; then
        log "$bus did not print an address; its log ($dir/bus.log) ends with:"
        tail -n 5 "$dir/bus.log" >&2 || true
        stop_bus
        return 1
    fi
    ADDR=$(head -n1 "$dir/address")
}

stop_bus() {
    if ((${#STOP_PIDS[@]})); then stop_pids "${STOP_PIDS[@]}"; fi
    STOP_PIDS=()
}

# start_echo OUT CMD...: starts an echo peer, waits until it is ready and
# adds it to ECHO_PIDS (in this shell, so that stop_echoes can reap it).
start_echo() {
    local out=$1 pid
    shift
    "$@" >"$out" 2>&1 &
    pid=$!
    ECHO_PIDS+=("$pid")
    if ! wait_for_line "$out" '^ready' "$pid"; then
        log "echo peer did not start: $(tail -n 3 "$out")"
        return 1
    fi
}

stop_echoes() {
    if ((${#ECHO_PIDS[@]})); then stop_pids "${ECHO_PIDS[@]}"; fi
    ECHO_PIDS=()
}

cleanup() {
    stop_echoes
    stop_bench_processes
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# --- workloads ---------------------------------------------------------------

# run BUS KEY CMD...: runs one round of a workload and appends the values of
# its `result NAME VALUE` lines to RESULT[BUS|KEY.NAME]; a failed round is
# counted in FAILED[BUS|KEY].
run() {
    local bus=$1 key=$2
    shift 2
    local out rc=0
    log "$bus: $key (round $ROUND of $ROUNDS)"
    out=$(timeout "$TIMEOUT" "$@" 2>"$WORK/last.err") || rc=$?
    if ((rc != 0)); then
        fail "$bus: $key, round $ROUND (exit $rc): $(tail -n 3 "$WORK/last.err")"
        FAILED["$bus|$key"]=$((${FAILED["$bus|$key"]:-0} + 1))
        return 0
    fi
    local word name value
    while read -r word name value; do
        [[ $word == result ]] || continue
        RESULT["$bus|$key.$name"]="${RESULT["$bus|$key.$name"]:+${RESULT["$bus|$key.$name"]} }$value"
    done <<<"$out"
}

p2p_floor() {
    local sock=$WORK/p2p.sock
    if start_echo "$WORK/p2p.out" "$BENCH" echo-peer --listen "$sock"; then
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            run p2p rt "$BENCH" roundtrip --p2p "$sock" "${RT[@]}"
            run p2p throughput "$BENCH" throughput --p2p "$sock" "${TP[@]}"
            run p2p payload64k "$BENCH" payload --p2p "$sock" --size 65536 "${P64[@]}"
            run p2p payload4m "$BENCH" payload --p2p "$sock" --size 4194304 "${P4M[@]}"
        done
    else
        fail "p2p echo peer"
    fi
    stop_echoes
    if start_echo "$WORK/p2p-pinned.out" taskset -c 0 "$BENCH" echo-peer --listen "$sock"; then
        for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
            run p2p rt_pinned taskset -c 0 "$BENCH" roundtrip --p2p "$sock" "${RT[@]}"
        done
    else
        fail "pinned p2p echo peer"
    fi
    stop_echoes
}

# A fresh bus for every round: what a bus holds after one round's 10,000
# connections have gone must not count in the next round's figures.
measure_memory() {
    local bus=$1
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        start_bus "$bus" "$WORK/$bus-memory-$ROUND" || return 1
        run "$bus" memory "$BENCH" memory --address "$ADDR" --bus-pid "$BUS_PID" "${MEM[@]}"
        stop_bus
    done
}

# One bus for all the rounds of the traffic workloads: each round runs every
# workload once, so that a slow spell of the machine spreads over all of them.
measure_traffic() {
    local bus=$1
    start_bus "$bus" "$WORK/$bus" || return 1
    local dir=$WORK/$bus
    if ! start_echo "$dir/echo0.out" "$BENCH" echo-peer --address "$ADDR" --name bench.Echo0 ||
        ! start_echo "$dir/echo1.out" "$BENCH" echo-peer --address "$ADDR" --name bench.Echo1; then
        fail "$bus: echo peers did not start"
        stop_echoes
        stop_bus
        return 0
    fi
    case $bus in
        busd) NA["$bus|activation"]="n/a (busd 0.6.1 has no activation)" ;;
        dbus-broker) NA["$bus|activation"]="n/a (needs systemd)" ;;
    esac
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        run "$bus" rt "$BENCH" roundtrip --address "$ADDR" --dest bench.Echo0 "${RT[@]}"
        run "$bus" throughput "$BENCH" throughput --address "$ADDR" --dest bench.Echo0,bench.Echo1 "${TP[@]}"
        run "$bus" broadcast "$BENCH" broadcast --address "$ADDR" "${BC[@]}"
        run "$bus" payload64k "$BENCH" payload --address "$ADDR" --dest bench.Echo0 --size 65536 "${P64[@]}"
        run "$bus" payload4m "$BENCH" payload --address "$ADDR" --dest bench.Echo0 --size 4194304 "${P4M[@]}"
        run "$bus" churn "$BENCH" churn --address "$ADDR" "${CHURN[@]}"
        if [[ -z ${NA["$bus|activation"]:-} ]]; then
            run "$bus" activation "$BENCH" activation --address "$ADDR" --name bench.Trivial "${ACT[@]}"
        fi
    done
    stop_echoes
    stop_bus
}

measure_pinned() {
    local bus=$1
    start_bus "$bus" "$WORK/$bus-pinned" taskset -c 0 || return 1
    if ! start_echo "$WORK/$bus-pinned/echo.out" taskset -c 0 "$BENCH" echo-peer --address "$ADDR" --name bench.Echo0; then
        fail "$bus: pinned echo peer did not start"
        stop_echoes
        stop_bus
        return 0
    fi
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        run "$bus" rt_pinned taskset -c 0 "$BENCH" roundtrip --address "$ADDR" --dest bench.Echo0 "${RT[@]}"
    done
    stop_echoes
    stop_bus
}

# Whether BUS can run here at all; if not, STATUS says why.
check_bus() {
    local bus=$1
    case $bus in
        dbus-daemon) command -v dbus-daemon >/dev/null || STATUS[$bus]="not installed (apt-get install dbus-daemon)" ;;
        busd) install_busd || STATUS[$bus]="not installed (cargo install busd failed)" ;;
        dbus-broker) check_dbus_broker || STATUS[$bus]=$DBUS_BROKER_WHY ;;
    esac
    [[ -z ${STATUS[$bus]:-} ]] && return 0
    fail "$bus: ${STATUS[$bus]}"
    return 1
}

measure_bus() {
    local bus=$1
    log "=== $bus ==="
    check_bus "$bus" || return 0
    if measure_memory "$bus" && measure_traffic "$bus" && measure_pinned "$bus"; then
        STATUS[$bus]=ok
    else
        STATUS[$bus]="failed to start"
        fail "$bus failed to start"
    fi
}

# --- report ------------------------------------------------------------------

# The median of the numbers in $1 (separated by spaces), or nothing.
median() {
    # shellcheck disable=SC2086  # the words are the values
    printf '%s\n' $1 | sort -g | awk 'NF { v[++n] = $1 }
        END { if (n % 2) print v[(n + 1) / 2]; else if (n) printf "%.6g\n", (v[n / 2] + v[n / 2 + 1]) / 2 }'
}

# The figure of BUS for KEY: the median of its rounds.
figure() { median "${RESULT["$1|$2"]:-}"; }

# The pinned round trip p50 of each bus as a multiple of the pinned p2p floor's
# (the ratio of the medians); a row of its own, issue 13's target for it.
floor_multiples() {
    local floor bus value
    floor=$(figure p2p rt_pinned.p50_us)
    [[ -n $floor ]] || return 0
    for bus in $BUSES; do
        value=$(figure "$bus" rt_pinned.p50_us)
        [[ -n $value ]] || continue
        RESULT["$bus|rt_pinned.floor_multiple"]=$(awk -v a="$value" -v b="$floor" 'BEGIN { if (b > 0) printf "%.3f", a / b }')
    done
}

thousands() { echo "$1" | sed ':a; s/\B[0-9]\{3\}\>/,&/; ta'; }

# Rows: key|label. Arrows say which way is better.
ROWS=(
    "rt.p50_us|Round trip p50 (µs) ↓"
    "rt.p99_us|Round trip p99 (µs) ↓"
    "rt_pinned.p50_us|Round trip p50, pinned to CPU 0 (µs) ↓"
    "rt_pinned.p99_us|Round trip p99, pinned to CPU 0 (µs) ↓"
    "rt_pinned.floor_multiple|Round trip p50, pinned to CPU 0, × the pinned p2p floor ↓"
    "throughput.calls_per_s|Throughput, 4 clients × 32 in flight (calls/s) ↑"
    "broadcast.deliveries_per_s|Broadcast to 100 subscribers, 1,000 other rules (deliveries/s) ↑"
    "payload64k.mb_per_s|Payload 64 KiB round trip (MB/s) ↑"
    "payload4m.mb_per_s|Payload 4 MiB round trip (MB/s) ↑"
    "churn.conns_per_s|Connection churn (connections/s) ↑"
    "activation.p50_ms|Activation, cold StartServiceByName p50 (ms) ↓"
    "memory.idle_kib|RSS of a fresh bus (KiB) ↓"
    "memory.loaded_kib|RSS with $(thousands "$MEM_CONNS") idle connections (KiB) ↓"
    "memory.bytes_per_conn|Bytes per idle connection ($(thousands "$MEM_CONNS") connections) ↓"
)
REPORT_BUSES=(broker dbus-daemon busd dbus-broker)

# The table cell for BUS and KEY: the median, or why there is none.
cell() {
    local bus=$1 key=$2 workload=${2%%.*}
    local status=${STATUS[$bus]:-}
    if [[ -z $status ]]; then echo "—"; return; fi
    if [[ $status != ok ]]; then cellify "$status"; return; fi
    if [[ -n ${NA["$bus|$workload"]:-} ]]; then echo "${NA["$bus|$workload"]}"; return; fi
    local value failed=${FAILED["$bus|$workload"]:-0}
    value=$(figure "$bus" "$key")
    if [[ -z $value ]]; then
        if ((failed)); then echo "failed"; else echo "—"; fi
        return
    fi
    value=$(format "$value")
    ((failed)) && value+=" ($failed of $ROUNDS rounds failed)"
    echo "$value"
}

# Text made safe for a table cell, cut to a readable length.
cellify() {
    local text=${1//|/\\|}
    ((${#text} > 120)) && text="${text:0:117}..."
    echo "$text"
}

format() {
    [[ $1 =~ ^[0-9.]+$ ]] || { echo "$1"; return; }
    awk -v v="$1" 'BEGIN { if (v >= 100) printf "%.0f", v; else if (v >= 10) printf "%.1f", v; else printf "%.2f", v }'
}

# broker's figure over BUS's for KEY (medians), or — when either is missing.
ratio() {
    local a b
    a=$(figure "$1" "$3")
    b=$(figure "$2" "$3")
    if [[ ${STATUS[$1]:-} == ok && ${STATUS[$2]:-ok} == ok && $a =~ ^[0-9.]+$ && $b =~ ^[0-9.]+$ ]]; then
        awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "—" }'
    else
        echo "—"
    fi
}

# One row of the table.
table_row() {
    local key=$1 label=$2 floor bus line
    floor=$(figure p2p "$key")
    line="| $label |"
    for bus in "${REPORT_BUSES[@]}"; do line+=" $(cell "$bus" "$key") |"; done
    if [[ -n $floor ]]; then line+=" $(format "$floor") |"; else line+="  |"; fi
    for bus in dbus-daemon busd dbus-broker; do line+=" $(ratio broker "$bus" "$key") |"; done
    if [[ $key == rt.* || $key == rt_pinned.p* ]]; then line+=" $(ratio broker p2p "$key") |"; else line+="  |"; fi
    echo "$line"
}

versions() {
    if ((BUILD_BROKER)); then
        echo "- broker: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown) (release build)"
    else
        echo "- broker: $BROKER"
    fi
    echo "- $(dbus-daemon --version 2>/dev/null | head -n1 || true)"
    echo "- $("$BUSD" --version 2>/dev/null || echo "busd: not installed")"
    echo "- $(dbus-broker --version 2>/dev/null | head -n1 || true) (Debian package $(dpkg-query -W -f '${Version}' dbus-broker 2>/dev/null || echo "not installed"))"
    echo "- $(rustc --version)"
}

write_report() {
    mkdir -p "$(dirname "$OUT")"
    local cpu row rounds_text
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //' || echo unknown)
    if ((ROUNDS == 1)); then rounds_text="one round"; else rounds_text="the median of $ROUNDS rounds"; fi
    floor_multiples
    {
        echo "# Benchmarks: broker, dbus-daemon, busd and dbus-broker"
        echo
        if ((SMOKE)); then echo "**Smoke run: every workload cut to almost nothing; these figures mean nothing.**"; echo; fi
        echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') in one run on one machine:"
        echo "$(nproc) cores ($cpu), Linux $(uname -r). Every figure is $rounds_text."
        echo
        echo "| Workload | broker | dbus-daemon | busd | dbus-broker | p2p floor (no bus) | broker / dbus-daemon | broker / busd | broker / dbus-broker | broker / p2p floor |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for row in "${ROWS[@]}"; do table_row "${row%%|*}" "${row#*|}"; done
        echo
        echo "↓ lower is better, ↑ higher is better. A bus not measured in this run shows —."
        echo "Each round is a separate run of the workload: against one bus for the traffic"
        echo "rows, against a fresh bus for every round of the memory rows (the broadcast"
        echo "figure of a round is itself the median of 5 timed bursts)."
        echo "MB = 10^6 bytes of payload carried one way. Pinned: the bus, the client and the"
        echo "echo peer all run under \`taskset -c 0\`. The p2p floor is the same client and echo"
        echo "peer on a direct socket, without a bus: for round trips it is the floor, for"
        echo "throughput and payloads it shows that the load generator is not the bottleneck."
        echo "dbus-broker runs under systemd-socket-activate with dbus-broker-launch --scope user"
        echo "and the configuration dbus-daemon and busd read; it cannot activate services"
        echo "without systemd, and busd 0.6.1 has no activation."
        echo
        echo "Versions:"
        echo
        versions
        echo
        local repro=bench/run.sh
        ((${#ARGS[@]})) && repro+=$(printf ' %q' "${ARGS[@]}")
        echo "Reproduce with \`$repro\` from the repository root;"
        echo "the workloads are described at the top of bench/run.sh. The run took $(elapsed)."
    } >"$OUT"
    log "wrote $OUT"
}

elapsed() {
    local s=$((SECONDS - STARTED))
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

# --- main ----------------------------------------------------------------------

main() {
    STARTED=$SECONDS
    ulimit -n "$(ulimit -Hn)"
    build
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/broker-bench.XXXXXX")
    SVC=$WORK/services
    log "working directory $WORK; $ROUNDS round(s) of every workload"
    write_dbus_config
    write_service_file
    p2p_floor
    local bus
    for bus in $BUSES; do
        measure_bus "$bus"
    done
    stop_bench_processes
    write_report
    cat "$OUT"
    log "run took $(elapsed)"
    if ((FAILURES)); then
        log "$FAILURES failure(s); logs kept in $WORK"
        ((ALLOW_FAILURES)) && return 0
        return 1
    fi
    rm -rf "$WORK"
}

main
