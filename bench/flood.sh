#!/usr/bin/env bash
# bench/flood.sh: floods, a soak and memory peaks against broker, dbus-daemon,
# busd and dbus-broker in one run (issue 10). It prints figures and judges
# nothing: no time or size here is a pass or a fail.
#
# Usage: bench/flood.sh [--smoke] [--buses "broker dbus-daemon busd dbus-broker"]
#                       [--workloads "silent auth soak unread matches names"]
#                       [--out FILE] [--allow-failures] [--no-build]
#                       [--broker PATH]
#
#   --smoke           every workload with tiny counts (seconds per bus): proves
#                     the runner works; figures from it mean nothing.
#   --buses LIST      which buses (default: all four, each in turn per workload).
#   --workloads LIST  which workloads (default: all six, in this order).
#   --out FILE        where to write the Markdown table (default
#                     target/bench/FLOODS.md, or FLOODS.smoke.md with --smoke).
#   --allow-failures  exit 0 even when the runner itself failed somewhere.
#   --no-build        use the binaries already in target/release.
#   --broker PATH     measure this broker binary instead of building one.
#
# Workloads (each against a fresh bus, started with the stock session
# configuration; sizes of the full run):
#   silent   flood A: 5,000 connections that connect and say nothing, held
#            5 s, then closed;
#   auth     flood B: 5,000 connections that pass EXTERNAL and BEGIN but never
#            say Hello, held 5 s, then closed;
#   soak     50,000 cycles of connect, EXTERNAL, Hello, GetId, close;
#   unread   one client sends 100,000 GetId calls and never reads a reply,
#            waits until the bus's RSS stops moving, then disconnects;
#   matches  one client adds 50,000 distinct match rules (256 calls in
#            flight), then disconnects;
#   names    one client requests 50,000 names, then disconnects.
# For each: the bus's VmRSS and open fds (/proc/PID) before, at the peak (the
# largest seen, sampled every 100 ms) and 15 s after the abuser left; the
# worst round trip of a bystander client that calls GetId every 10 ms from
# before the workload until the after sample; and (except in the soak) how
# long a new client's connect, EXTERNAL and Hello took at the peak, or why it
# failed. Anything a bus does (refuse, disconnect, stall, exit) becomes a
# cell; each step is bounded in time (`timeout`), so the run always ends
# with a table.
#
# dbus-broker runs as bench/../shared/DESIGN.md says: under
# systemd-socket-activate with dbus-broker-launch --scope user; if nothing
# answers at /run/systemd/journal/socket, `broker-bench journal-sink` plays
# the journal for the run and its socket is removed afterwards (bench/common.sh
# does this for bench/run.sh too). The figures are those of the `dbus-broker`
# child, not of the launcher.
set -uo pipefail

LOG_TAG=flood
# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SMOKE=0
BUSES="broker dbus-daemon busd dbus-broker"
WORKLOADS="silent auth soak unread matches names"
OUT=""
ALLOW_FAILURES=0
BUILD=1
BUILD_BROKER=1
ARGS=("$@")
while (($#)); do
    case $1 in
        --smoke) SMOKE=1 ;;
        --buses) BUSES=$2; shift ;;
        --workloads) WORKLOADS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --allow-failures) ALLOW_FAILURES=1 ;;
        --no-build) BUILD=0 ;;
        --broker) BROKER=$2; BUILD_BROKER=0; shift ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "flood.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for kind in $WORKLOADS; do
    case $kind in
        silent | auth | soak | unread | matches | names) ;;
        *) echo "flood.sh: unknown workload $kind (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z $OUT ]]; then
    if ((SMOKE)); then OUT=$TARGET/bench/FLOODS.smoke.md; else OUT=$TARGET/bench/FLOODS.md; fi
fi

declare -A COUNT
if ((SMOKE)); then
    COUNT=([silent]=100 [auth]=100 [soak]=300 [unread]=2000 [matches]=500 [names]=500)
    HOLD=0.3 AFTER=0.5 BUDGET=20 TIMEOUT=60
else
    COUNT=([silent]=5000 [auth]=5000 [soak]=50000 [unread]=100000 [matches]=50000 [names]=50000)
    HOLD=5 AFTER=15 BUDGET=300 TIMEOUT=420
fi

declare -A RESULT    # "bus|workload.name" -> value
declare -A UNAVAILABLE  # bus -> why it is not measured at all
FAILURES=0
WORK=""
BUS_PID=""

# --- setup -----------------------------------------------------------------------

# Makes sure each bus asked for can run, or records why not.
check_buses() {
    local bus
    for bus in $BUSES; do
        case $bus in
            broker) [[ -x $BROKER ]] || UNAVAILABLE[$bus]="not built" ;;
            dbus-daemon) command -v dbus-daemon >/dev/null || UNAVAILABLE[$bus]="not installed (apt-get install dbus-daemon)" ;;
            busd) install_busd || UNAVAILABLE[$bus]="cargo install busd failed" ;;
            dbus-broker) check_dbus_broker || UNAVAILABLE[$bus]=$DBUS_BROKER_WHY ;;
            *) UNAVAILABLE[$bus]="unknown bus" ;;
        esac
    done
}

trap stop_bench_processes EXIT
trap 'stop_bench_processes; exit 130' INT TERM

# --- buses -----------------------------------------------------------------------

# Starts BUS fresh in DIR with the stock session configuration; sets ADDR,
# BUS_PID (the process to measure) and STOP_PIDS (what to stop, in order).
start_bus() {
    local bus=$1 dir=$2
    rm -rf "$dir"
    mkdir -p "$dir"
    ADDR="unix:path=$dir/bus"
    case $bus in
        broker) start_printing "$dir" "$BROKER" --session --nofork --address "$ADDR" --print-address ;;
        dbus-daemon) start_printing "$dir" dbus-daemon --session --nofork --address="$ADDR" --print-address ;;
        busd) start_printing "$dir" "$BUSD" --session --address "$ADDR" --print-address ;;
        dbus-broker) start_dbus_broker "$dir" ;;
    esac
}

start_printing() {
    local dir=$1
    shift
    "$@" >"$dir/address" 2>"$dir/bus.log" &
    BUS_PID=$!
    STOP_PIDS=("$BUS_PID")
    if ! wait_for_line "$dir/address" '^unix:' "$BUS_PID"; then
        START_ERROR="printed no address: $(tail -n 2 "$dir/bus.log" | tr '\n' ' ')"
        stop_pids "$BUS_PID"
        STOP_PIDS=()
        return 1
    fi
}

# --- workloads -------------------------------------------------------------------

# measure BUS WORKLOAD: a fresh bus, one workload, the results in RESULT.
measure() {
    local bus=$1 kind=$2 dir=$WORK/$1-$2 out rc=0
    START_ERROR=""
    if ! start_bus "$bus" "$dir"; then
        RESULT["$bus|$kind.runner"]="failed to start: $START_ERROR"
        fail "$bus: $kind: failed to start: $START_ERROR"
        return 0
    fi
    log "$bus: $kind (${COUNT[$kind]}), bus pid $BUS_PID"
    out=$(timeout -k 5 "$TIMEOUT" "$BENCH" flood --address "$ADDR" --bus-pid "$BUS_PID" \
        --kind "$kind" --count "${COUNT[$kind]}" --hold-s "$HOLD" --after-s "$AFTER" \
        --budget-s "$BUDGET" 2>"$dir/runner.err") || rc=$?
    local word name value
    while read -r word name value; do
        [[ $word == result ]] && RESULT["$bus|$kind.$name"]=$value
    done <<<"$out"
    if ((rc != 0)); then
        RESULT["$bus|$kind.runner"]="runner failed (exit $rc): $(tail -n 2 "$dir/runner.err" | tr '\n' ' ')"
        fail "$bus: $kind: ${RESULT["$bus|$kind.runner"]}"
    fi
    if ! kill -0 "$BUS_PID" 2>/dev/null; then
        RESULT["$bus|$kind.bus"]="exited during the workload"
    fi
    log "$bus: $kind: $(summary "$bus" "$kind")"
    stop_pids "${STOP_PIDS[@]}"
    STOP_PIDS=()
}

summary() {
    local k="$1|$2"
    printf 'RSS %s, fds %s, bystander worst %s ms; %s' \
        "$(triple "$1" "$2" rss)" "$(triple "$1" "$2" fds)" \
        "$(num "${RESULT["$k.bystander_worst_ms"]:-—}")" "${RESULT["$k.outcome"]:-${RESULT["$k.runner"]:-}}"
}

# --- report ----------------------------------------------------------------------

label() {
    case $1 in
        silent) echo "Flood A: $(thousands "${COUNT[$1]}") connections that say nothing" ;;
        auth) echo "Flood B: $(thousands "${COUNT[$1]}") connections authenticated, no Hello" ;;
        soak) echo "Soak: $(thousands "${COUNT[$1]}") connect/auth/Hello/GetId/close cycles" ;;
        unread) echo "Peak: $(thousands "${COUNT[$1]}") GetId calls, replies never read" ;;
        matches) echo "Peak: $(thousands "${COUNT[$1]}") distinct AddMatch" ;;
        names) echo "Peak: $(thousands "${COUNT[$1]}") RequestName" ;;
    esac
}

thousands() { echo "$1" | sed ':a; s/\B[0-9]\{3\}\>/,&/; ta'; }

# A number rounded for the table; anything else as it is.
num() {
    [[ $1 =~ ^[0-9.]+$ ]] || { echo "$1"; return; }
    awk -v v="$1" 'BEGIN { if (v >= 100) printf "%.0f", v; else if (v >= 10) printf "%.1f", v; else printf "%.2f", v }'
}

whole() {
    [[ $1 =~ ^[0-9.]+$ ]] || { echo "$1"; return; }
    awk -v v="$1" 'BEGIN { printf "%.0f", v }'
}

mib() {
    [[ $1 =~ ^[0-9.]+$ ]] || { echo "$1"; return; }
    awk -v v="$1" 'BEGIN { printf "%.1f", v / 1024 }'
}

# "before / peak / after" of rss (MiB) or fds.
triple() {
    local k="$1|$2" what=$3 when cells=()
    for when in before peak after; do
        if [[ $what == rss ]]; then
            cells+=("$(mib "${RESULT["$k.rss_${when}_kib"]:-—}")")
        else
            cells+=("$(whole "${RESULT["$k.fds_$when"]:-—}")")
        fi
    done
    echo "${cells[0]} / ${cells[1]} / ${cells[2]}"
}

# Text made safe for a table cell, cut to a readable length.
cellify() {
    local text=${1//|/\\|}
    text=${text//$'\n'/ }
    ((${#text} > 220)) && text="${text:0:217}..."
    echo "$text"
}

# The cell of BUS for WORKLOAD and MEASURE.
cell() {
    local bus=$1 kind=$2 measure=$3 k="$1|$2"
    if [[ -n ${UNAVAILABLE[$bus]:-} ]]; then
        [[ $measure == outcome ]] && cellify "${UNAVAILABLE[$bus]}" || echo "—"
        return
    fi
    if [[ -n ${RESULT["$k.runner"]:-} && -z ${RESULT["$k.outcome"]:-} ]]; then
        [[ $measure == outcome ]] && cellify "${RESULT["$k.runner"]}" || echo "—"
        return
    fi
    case $measure in
        rss | fds) triple "$bus" "$kind" "$measure" ;;
        bystander)
            local v
            v=$(num "${RESULT["$k.bystander_worst_ms"]:-—}")
            [[ -n ${RESULT["$k.bystander_failure"]:-} ]] && v+=" (then: $(cellify "${RESULT["$k.bystander_failure"]}"))"
            echo "$v"
            ;;
        newclient)
            if [[ -n ${RESULT["$k.newclient_ms"]:-} ]]; then
                num "${RESULT["$k.newclient_ms"]}"
            else
                cellify "${RESULT["$k.newclient"]:-—}"
            fi
            ;;
        outcome)
            local v=${RESULT["$k.outcome"]:-—}
            [[ -n ${RESULT["$k.bus"]:-} ]] && v+="; bus ${RESULT["$k.bus"]}"
            [[ -n ${RESULT["$k.runner"]:-} ]] && v+="; ${RESULT["$k.runner"]}"
            cellify "$v"
            ;;
    esac
}

MEASURES=(
    "rss|RSS MiB: before / peak / after"
    "fds|open fds: before / peak / after"
    "bystander|bystander's worst GetId round trip (ms)"
    "newclient|new client's connect + EXTERNAL + Hello at the peak (ms)"
    "outcome|what happened"
)

write_report() {
    mkdir -p "$(dirname "$OUT")"
    local kind row measure label_text first bus cpu header sep
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //' || echo unknown)
    header="| Workload | Measure |"
    sep="|---|---|"
    for bus in $BUSES; do header+=" $bus |"; sep+="---|"; done
    {
        echo "# Floods, soak and peaks: ${BUSES// /, }"
        echo
        if ((SMOKE)); then echo "**Smoke run: every workload cut to almost nothing; these figures mean nothing.**"; echo; fi
        echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') in one run on one machine:"
        echo "$(nproc) cores ($cpu), Linux $(uname -r). Each workload ran against a fresh bus"
        echo "with the stock session configuration. \"After\" is sampled ${AFTER} s after the abuser left."
        echo
        echo "$header"
        echo "$sep"
        for kind in $WORKLOADS; do
            first=1
            for row in "${MEASURES[@]}"; do
                measure=${row%%|*}
                [[ $kind == soak && $measure == newclient ]] && continue
                if ((first)); then label_text=$(label "$kind"); first=0; else label_text=""; fi
                printf '| %s | %s |' "$label_text" "${row#*|}"
                for bus in $BUSES; do printf ' %s |' "$(cell "$bus" "$kind" "$measure")"; done
                echo
            done
        done
        echo
        echo "Versions:"
        echo
        if ((BUILD_BROKER)); then
            echo "- broker: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown) (release build)"
        else
            echo "- broker: $BROKER"
        fi
        echo "- $(dbus-daemon --version 2>/dev/null | head -n1 || echo "dbus-daemon: not installed")"
        echo "- $("$BUSD" --version 2>/dev/null || echo "busd: not installed")"
        echo "- $(dbus-broker --version 2>/dev/null | head -n1 || echo "dbus-broker: not installed")"
        echo
        local cmd=bench/flood.sh
        ((${#ARGS[@]})) && cmd+=$(printf ' %q' "${ARGS[@]}")
        echo "Reproduce with \`$cmd\` from the repository root; the workloads and"
        echo "measures are described at the top of bench/flood.sh. The run took $(elapsed)."
    } >"$OUT"
    log "wrote $OUT"
}

elapsed() {
    local s=$((SECONDS - STARTED))
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

# --- main ------------------------------------------------------------------------

main() {
    STARTED=$SECONDS
    ulimit -n "$(ulimit -Hn)"
    build || { echo "flood.sh: build failed" >&2; exit 1; }
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/broker-flood.XXXXXX")
    log "working directory $WORK; open-file limit $(ulimit -n)"
    check_buses
    local kind bus
    for kind in $WORKLOADS; do
        for bus in $BUSES; do
            [[ -n ${UNAVAILABLE[$bus]:-} ]] && continue
            measure "$bus" "$kind"
        done
    done
    stop_bench_processes
    write_report
    cat "$OUT"
    log "run took $(elapsed)"
    if ((FAILURES)); then
        log "$FAILURES failure(s) of the runner; logs kept in $WORK"
        ((ALLOW_FAILURES)) && return 0
        return 1
    fi
    rm -rf "$WORK"
}

main
