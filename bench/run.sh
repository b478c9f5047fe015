#!/usr/bin/env bash
# bench/run.sh: broker, dbus-daemon and busd side by side (issue 5).
#
# Usage: bench/run.sh [--smoke] [--buses "broker dbus-daemon busd"]
#                     [--out FILE] [--allow-failures] [--no-build]
#                     [--broker PATH]
#
#   --smoke           every workload, very briefly (seconds in all): proves the
#                     harness works; writes target/bench/BENCHMARKS.smoke.md
#                     unless --out is given. Figures from it mean nothing.
#   --buses LIST      which buses to measure (default: all three, in turn).
#   --out FILE        where to write the report (default: BENCHMARKS.md at
#                     the repository root).
#   --allow-failures  exit 0 even if a bus failed to start or a workload
#                     failed. Without it the script still measures everything
#                     it can and writes the report, then exits 1.
#   --no-build        use the binaries already in target/release.
#   --broker PATH     measure this broker binary instead of building one.
#
# What it does: builds broker and broker-bench (release), installs busd 0.6.1
# into bench-tools/ (ignored by git) if it is not there, raises the open-file
# limit, then for each bus: starts it on a socket in a temporary directory,
# waits for the address it prints, runs every workload, stops it. Each bus is
# started three times: fresh for the memory workload, once for the other
# workloads, and once with everything under `taskset -c 0` for the pinned
# round trip. The p2p floor (the same client and echo peer, no bus) is
# measured once in each mode; its throughput and payload figures show what
# the load generator can do on its own. Progress and failures go to the terminal, bus
# and peer logs stay in the temporary directory (its path is printed; it is
# kept when something failed).
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
# them. Workloads: round trip = one 8-byte call in flight; throughput = 4
# clients x 32 calls in flight over two echo peers; broadcast = 1 emitter,
# 100 matching subscribers, 10 connections x 100 non-matching rules, median of
# 5 rounds; payload = 64 KiB and 4 MiB round trips (MB = 10^6 bytes, one
# direction); churn = connect, EXTERNAL auth, Hello, close; activation = cold
# StartServiceByName of `broker-bench trivial-service`, declared by a
# .service file in a temporary directory (dbus-daemon: <servicedir>, broker:
# --activation-dir; busd has none), then Quit and wait for NameOwnerChanged;
# memory = VmRSS of the bus idle and with 10,000 connections after Hello.
set -euo pipefail

LOG_TAG=bench
# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SMOKE=0
BUSES="broker dbus-daemon busd"
OUT=""
ALLOW_FAILURES=0
BUILD=1
BUILD_BROKER=1
ARGS=("$@")
while (($#)); do
    case $1 in
        --smoke) SMOKE=1 ;;
        --buses) BUSES=$2; shift ;;
        --out) OUT=$2; shift ;;
        --allow-failures) ALLOW_FAILURES=1 ;;
        --no-build) BUILD=0 ;;
        --broker) BROKER=$2; BUILD_BROKER=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
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

declare -A RESULT   # "bus|key" -> value, e.g. "busd|rt.p50_us"
declare -A STATUS   # bus -> "ok" | "failed to start"
FAILURES=0

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

# Waits until FILE has a first line that matches PATTERN and PID still runs.
wait_for_line() {
    local file=$1 pattern=$2 pid=$3
    for _ in $(seq 100); do
        if head -n1 "$file" 2>/dev/null | grep -q "$pattern"; then return 0; fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# Starts BUS (optionally under PREFIX, e.g. "taskset -c 0") in directory DIR;
# sets BUS_PID and ADDR, or returns 1 if it does not come up.
start_bus() {
    local bus=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    local sock="unix:path=$dir/bus"
    local cmd
    case $bus in
        broker) cmd=("$BROKER" --session --address "$sock" --print-address --activation-dir "$SVC") ;;
        dbus-daemon) cmd=(dbus-daemon --nofork --print-address --config-file="$WORK/session.conf" --address="$sock") ;;
        busd) cmd=("$BUSD" --config "$WORK/session.conf" --address "$sock" --print-address) ;;
    esac
    "$@" "${cmd[@]}" >"$dir/address" 2>"$dir/bus.log" &
    BUS_PID=$!
    if ! wait_for_line "$dir/address" '^unix:' "$BUS_PID"; then
        log "$bus did not print an address; its log ($dir/bus.log) ends with:"
        tail -n 5 "$dir/bus.log" >&2 || true
        stop "$BUS_PID"
        return 1
    fi
    ADDR=$(head -n1 "$dir/address")
}

# start_echo OUT CMD...: starts an echo peer, waits until it is ready and
# sets ECHO_PID (in this shell, so that `stop` can reap it).
start_echo() {
    local out=$1
    shift
    "$@" >"$out" 2>&1 &
    ECHO_PID=$!
    if ! wait_for_line "$out" '^ready' "$ECHO_PID"; then
        log "echo peer did not start: $(tail -n 3 "$out")"
        stop "$ECHO_PID"
        return 1
    fi
}

stop() {
    local pid
    for pid in "$@"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

# --- workloads ---------------------------------------------------------------

# run BUS KEY CMD...: runs one workload and records its `result NAME VALUE`
# lines as RESULT[BUS|KEY.NAME].
run() {
    local bus=$1 key=$2
    shift 2
    local out rc=0
    log "$bus: $key"
    out=$(timeout "$TIMEOUT" "$@" 2>"$WORK/last.err") || rc=$?
    if ((rc != 0)); then
        fail "$bus: $key (exit $rc): $(tail -n 3 "$WORK/last.err")"
        RESULT["$bus|$key.failed"]=1
        return 0
    fi
    local word name value
    while read -r word name value; do
        [[ $word == result ]] && RESULT["$bus|$key.$name"]=$value
    done <<<"$out"
}

p2p_floor() {
    local sock=$WORK/p2p.sock
    start_echo "$WORK/p2p.out" "$BENCH" echo-peer --listen "$sock" || { fail "p2p echo peer"; return 0; }
    run p2p rt "$BENCH" roundtrip --p2p "$sock" "${RT[@]}"
    run p2p throughput "$BENCH" throughput --p2p "$sock" "${TP[@]}"
    run p2p payload64k "$BENCH" payload --p2p "$sock" --size 65536 "${P64[@]}"
    run p2p payload4m "$BENCH" payload --p2p "$sock" --size 4194304 "${P4M[@]}"
    stop "$ECHO_PID"
    start_echo "$WORK/p2p-pinned.out" taskset -c 0 "$BENCH" echo-peer --listen "$sock" || { fail "pinned p2p echo peer"; return 0; }
    run p2p rt_pinned taskset -c 0 "$BENCH" roundtrip --p2p "$sock" "${RT[@]}"
    stop "$ECHO_PID"
}

measure_memory() {
    local bus=$1
    start_bus "$bus" "$WORK/$bus-memory" || return 1
    run "$bus" memory "$BENCH" memory --address "$ADDR" --bus-pid "$BUS_PID" "${MEM[@]}"
    stop "$BUS_PID"
}

measure_traffic() {
    local bus=$1 e0="" e1=""
    start_bus "$bus" "$WORK/$bus" || return 1
    local dir=$WORK/$bus
    start_echo "$dir/echo0.out" "$BENCH" echo-peer --address "$ADDR" --name bench.Echo0 && e0=$ECHO_PID
    start_echo "$dir/echo1.out" "$BENCH" echo-peer --address "$ADDR" --name bench.Echo1 && e1=$ECHO_PID
    if [[ -z $e0 || -z $e1 ]]; then
        fail "$bus: echo peers did not start"
        stop $e0 $e1 "$BUS_PID"
        return 0
    fi
    run "$bus" rt "$BENCH" roundtrip --address "$ADDR" --dest bench.Echo0 "${RT[@]}"
    run "$bus" throughput "$BENCH" throughput --address "$ADDR" --dest bench.Echo0,bench.Echo1 "${TP[@]}"
    run "$bus" broadcast "$BENCH" broadcast --address "$ADDR" "${BC[@]}"
    run "$bus" payload64k "$BENCH" payload --address "$ADDR" --dest bench.Echo0 --size 65536 "${P64[@]}"
    run "$bus" payload4m "$BENCH" payload --address "$ADDR" --dest bench.Echo0 --size 4194304 "${P4M[@]}"
    run "$bus" churn "$BENCH" churn --address "$ADDR" "${CHURN[@]}"
    if [[ $bus == busd ]]; then
        RESULT["$bus|activation.p50_ms"]="n/a"
    else
        run "$bus" activation "$BENCH" activation --address "$ADDR" --name bench.Trivial "${ACT[@]}"
    fi
    stop "$e0" "$e1" "$BUS_PID"
}

measure_pinned() {
    local bus=$1
    start_bus "$bus" "$WORK/$bus-pinned" taskset -c 0 || return 1
    if ! start_echo "$WORK/$bus-pinned/echo.out" taskset -c 0 "$BENCH" echo-peer --address "$ADDR" --name bench.Echo0; then
        fail "$bus: pinned echo peer did not start"
        stop "$BUS_PID"
        return 0
    fi
    run "$bus" rt_pinned taskset -c 0 "$BENCH" roundtrip --address "$ADDR" --dest bench.Echo0 "${RT[@]}"
    stop "$ECHO_PID" "$BUS_PID"
}

measure_bus() {
    local bus=$1
    log "=== $bus ==="
    if measure_memory "$bus" && measure_traffic "$bus" && measure_pinned "$bus"; then
        STATUS[$bus]=ok
    else
        STATUS[$bus]="failed to start"
        fail "$bus failed to start"
    fi
}

# --- report ------------------------------------------------------------------

# Rows: key|label. Arrows say which way is better.
ROWS=(
    "rt.p50_us|Round trip p50 (µs) ↓"
    "rt.p99_us|Round trip p99 (µs) ↓"
    "rt_pinned.p50_us|Round trip p50, pinned to CPU 0 (µs) ↓"
    "rt_pinned.p99_us|Round trip p99, pinned to CPU 0 (µs) ↓"
    "throughput.calls_per_s|Throughput, 4 clients × 32 in flight (calls/s) ↑"
    "broadcast.deliveries_per_s|Broadcast to 100 subscribers, 1,000 other rules (deliveries/s, median) ↑"
    "payload64k.mb_per_s|Payload 64 KiB round trip (MB/s) ↑"
    "payload4m.mb_per_s|Payload 4 MiB round trip (MB/s) ↑"
    "churn.conns_per_s|Connection churn (connections/s) ↑"
    "activation.p50_ms|Activation, cold StartServiceByName p50 (ms) ↓"
    "memory.idle_kib|RSS idle (KiB) ↓"
    "memory.loaded_kib|RSS with $MEM_CONNS connections (KiB) ↓"
    "memory.bytes_per_conn|Bytes per idle connection ↓"
)

# The table cell for BUS and KEY.
cell() {
    local bus=$1 key=$2
    if [[ ${STATUS[$bus]:-} == "failed to start" ]]; then echo "failed to start"; return; fi
    local value=${RESULT["$bus|$key"]:-}
    if [[ -n $value ]]; then format "$value"; return; fi
    if [[ -n ${RESULT["$bus|${key%%.*}.failed"]:-} ]]; then echo "failed"; else echo "—"; fi
}

format() {
    [[ $1 =~ ^[0-9.]+$ ]] || { echo "$1"; return; }
    awk -v v="$1" 'BEGIN { if (v >= 100) printf "%.0f", v; else if (v >= 10) printf "%.1f", v; else printf "%.2f", v }'
}

ratio() {
    local a=${RESULT["$1|$3"]:-} b=${RESULT["$2|$3"]:-}
    if [[ ${STATUS[$1]:-} == ok && ${STATUS[$2]:-ok} == ok && $a =~ ^[0-9.]+$ && $b =~ ^[0-9.]+$ ]]; then
        awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "—" }'
    else
        echo "—"
    fi
}

write_report() {
    mkdir -p "$(dirname "$OUT")"
    local cpu row key label floor
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //' || echo unknown)
    {
        echo "# Benchmarks: broker, dbus-daemon and busd"
        echo
        if ((SMOKE)); then echo "**Smoke run: every workload cut to almost nothing; these figures mean nothing.**"; echo; fi
        echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') in one run on one machine:"
        echo "$(nproc) cores ($cpu), Linux $(uname -r)."
        echo
        echo "| Workload | broker | dbus-daemon | busd | p2p floor (no bus) | broker / dbus-daemon | broker / busd | broker / p2p floor |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        for row in "${ROWS[@]}"; do
            key=${row%%|*}
            label=${row#*|}
            floor=${RESULT["p2p|$key"]:-}
            printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" \
                "$(cell broker "$key")" "$(cell dbus-daemon "$key")" "$(cell busd "$key")" \
                "$([[ -n $floor ]] && format "$floor" || echo "")" \
                "$(ratio broker dbus-daemon "$key")" "$(ratio broker busd "$key")" \
                "$([[ $key == rt* ]] && ratio broker p2p "$key" || echo "")"
        done
        echo
        echo "↓ lower is better, ↑ higher is better. A bus not measured in this run shows —."
        echo "MB = 10^6 bytes of payload carried one way. Pinned: the bus, the client and the"
        echo "echo peer all run under \`taskset -c 0\`. The p2p floor is the same client and echo"
        echo "peer on a direct socket, without a bus: for round trips it is the floor, for"
        echo "throughput and payloads it shows that the load generator is not the bottleneck."
        echo
        echo "Versions:"
        echo
        if ((BUILD_BROKER)); then
            echo "- broker: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown) (release build)"
        else
            echo "- broker: $BROKER"
        fi
        echo "- $(dbus-daemon --version | head -n1)"
        echo "- $("$BUSD" --version 2>/dev/null || echo "busd: not installed")"
        echo "- $(rustc --version)"
        echo
        local cmd=bench/run.sh
        ((${#ARGS[@]})) && cmd+=$(printf ' %q' "${ARGS[@]}")
        echo "Reproduce with \`$cmd\` from the repository root;"
        echo "the workloads are described at the top of bench/run.sh."
    } >"$OUT"
    log "wrote $OUT"
}

# --- main ----------------------------------------------------------------------

main() {
    ulimit -n "$(ulimit -Hn)"
    build
    install_busd
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/broker-bench.XXXXXX")
    SVC=$WORK/services
    log "working directory $WORK"
    write_dbus_config
    write_service_file
    p2p_floor
    local bus
    for bus in $BUSES; do
        measure_bus "$bus"
    done
    write_report
    cat "$OUT"
    if ((FAILURES)); then
        log "$FAILURES failure(s); logs kept in $WORK"
        ((ALLOW_FAILURES)) && return 0
        return 1
    fi
    rm -rf "$WORK"
}

main
