#!/usr/bin/env bash
# Runs dbus-daemon's own bus tests (Debian's `dbus-tests` package) against a
# bus binary, one case at a time: a failed assertion aborts the whole test
# binary, so a suite run as one process would hide every later case.
#
# Usage: tests/reference/run.sh [BUS_BINARY]
#   BUS_BINARY     the bus under test (default: target/release/broker)
# Environment:
#   CASE_TIMEOUT   seconds one case may take before it counts as failed (30;
#                  the slowest case takes 6 s under dbus-daemon)
#   JOBS           cases run at the same time (8). A case whose bus hangs
#                  only waits, so more jobs than cores keeps a hanging bus
#                  from stretching the run: 91 cases that all time out take
#                  12 rounds of CASE_TIMEOUT
#   RESULTS_DIR    where each case's output is kept (a fresh temporary dir)
#   BASELINE       file holding the pass count to reach (tests/reference/baseline)
#   DBUS_TESTS_DIR where the installed tests live
#                  (/usr/lib/dbus-1.0/installed-tests/dbus)
#
# Prints one line per case (PASS, FAIL or SKIP), the totals, and as its last
# line a JSON object with the totals. Exits 1 when fewer cases pass than the
# baseline, 2 when the run itself cannot be set up.
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
daemon=${1:-$repo/target/release/broker}
tests_dir=${DBUS_TESTS_DIR:-/usr/lib/dbus-1.0/installed-tests/dbus}
case_timeout=${CASE_TIMEOUT:-30}
jobs=${JOBS:-8}
baseline_file=${BASELINE:-$here/baseline}
results=${RESULTS_DIR:-$(mktemp -d -t broker-reference.XXXXXX)}

suites=(test-dbus-daemon test-dbus-daemon-eavesdrop test-monitor test-uid-permissions
        test-sd-activation test-containers test-header-fields)

die() {
    echo "run.sh: $*" >&2
    exit 2
}

[[ -x $daemon ]] || die "bus binary '$daemon' is not executable"
daemon=$(realpath "$daemon")
[[ -d $tests_dir ]] || die "no tests in $tests_dir (apt-get install dbus-tests)"
[[ -r $baseline_file ]] || die "no baseline file $baseline_file"
baseline=$(tr -d '[:space:]' <"$baseline_file")
[[ $baseline =~ ^[0-9]+$ ]] || die "baseline file $baseline_file does not hold one integer"
mkdir -p "$results" || die "cannot create $results"

# How the reference suite finds the bus under test and its data files.
export DBUS_TEST_DAEMON=$daemon
export DBUS_TEST_DATA=$tests_dir/data
export DBUS_TEST_EXEC=$tests_dir
# Each case starts its own bus; none may reach a bus of the caller's.
unset DBUS_SESSION_BUS_ADDRESS DBUS_SYSTEM_BUS_ADDRESS DBUS_STARTER_ADDRESS DBUS_STARTER_BUS_TYPE

# Prints "SUITE CASE" for every case of every suite. GLib's -l lists the
# cases without running them (the suite's own --list-tests would run them).
list_cases() {
    local suite
    for suite in "${suites[@]}"; do
        [[ -x $tests_dir/$suite ]] || die "missing test binary $tests_dir/$suite"
        "$tests_dir/$suite" -l | grep '^/' | sed "s|^|$suite |" ||
            die "cannot list the cases of $suite"
    done
}

# Runs one case in a session of its own, so whatever it leaves behind (the
# bus it started, when an assertion aborted the test before it could stop
# it) is ended with the session. Writes "VERDICT SECONDS DETAIL" to $3.status.
run_case() {
    local suite=$1 case=$2 out=$3 start rc pgid verdict detail elapsed_ms
    start=${EPOCHREALTIME/./}
    setsid timeout -k 5 "$case_timeout" "$tests_dir/$suite" -p "$case" --tap \
        </dev/null >"$out.log" 2>&1 &
    pgid=$!
    echo "$pgid" >"$out.pgid"
    # Quietly: bash would announce a test that died of a signal (abort).
    wait "$pgid" 2>/dev/null
    rc=$?
    kill -KILL -- "-$pgid" 2>/dev/null
    verdict=$(classify "$rc" "$out.log")
    detail=${verdict#"${verdict%% *}"}
    verdict=${verdict%% *}
    elapsed_ms=$(((${EPOCHREALTIME/./} - start) / 1000))
    printf '%s %d.%d %s\n' "$verdict" $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100)) \
        "$detail" >"$out.status.tmp" && mv "$out.status.tmp" "$out.status"
}

# Turns a case's exit status and TAP output into "PASS|FAIL|SKIP reason".
classify() {
    local rc=$1 log=$2
    if ((rc == 124 || rc == 137)); then
        echo "FAIL timed out after ${case_timeout}s"
    elif grep -q '^not ok' "$log"; then
        echo "FAIL $(grep -m1 '^not ok' "$log")"
    elif ((rc != 0)); then
        echo "FAIL exit status $rc: $(last_words "$log")"
    elif grep -q '^ok .*# SKIP' "$log"; then
        echo "SKIP $(grep -m1 '^ok .*# SKIP' "$log" | sed 's/.*# SKIP *//')"
    elif grep -q '^ok ' "$log"; then
        echo "PASS"
    else
        echo "FAIL no TAP result: $(last_words "$log")"
    fi
}

# The most telling line of a failed case's output: GLib's assertion or
# error message when there is one, else the last line.
last_words() {
    local line
    line=$(grep -m1 -E 'ERROR|assertion|Bail out|CRITICAL' "$1") || line=$(tail -n1 "$1")
    echo "${line:0:200}"
}

declare -A running=() label=()

# On an interrupt, end the sessions of the cases still running.
stop_running() {
    local file
    for file in "${running[@]}"; do
        [[ -r $file.pgid ]] && kill -KILL -- "-$(<"$file.pgid")" 2>/dev/null
    done
}
trap 'stop_running; exit 130' INT TERM

# Starts the bus once the way most cases do, and says so when it cannot
# start: then every case fails the same way (and takes CASE_TIMEOUT, as the
# tests wait for an address that never comes), and this says why.
preflight() {
    local address="" config=$DBUS_TEST_DATA/valid-config-files/session.conf
    {
        read -r -t 10 address
    } < <(setsid timeout 10 "$daemon" --config-file="$config" --nofork --print-address=1 \
        --systemd-activation </dev/null 2>"$results/preflight.stderr")
    kill -KILL -- "-$!" 2>/dev/null
    if [[ -z $address ]]; then
        echo "preflight: '$daemon --config-file=$config --nofork --print-address=1" \
            "--systemd-activation' printed no address; it said: $(head -c 300 "$results/preflight.stderr")"
    fi
}

preflight
list_cases >"$results/cases" || exit 2
mapfile -t cases <"$results/cases"
((${#cases[@]} > 0)) || die "no cases listed"

# Runs up to $jobs cases at a time and reports each as it ends. A case has
# ended when its .status file exists (a finished job that is not yet reaped
# would still answer kill -0).
passed=0 failed=0 skipped=0 index=0
report_finished() {
    local pid verdict seconds detail
    for pid in "${!running[@]}"; do
        [[ -e ${running[$pid]}.status ]] || continue
        wait "$pid" 2>/dev/null
        read -r verdict seconds detail <"${running[$pid]}.status"
        printf '%-4s %-80s %6ss %s\n' "$verdict" "${label[$pid]}" "$seconds" "$detail"
        case $verdict in
            PASS) passed=$((passed + 1)) ;;
            SKIP) skipped=$((skipped + 1)) ;;
            *) failed=$((failed + 1)) ;;
        esac
        unset "running[$pid]" "label[$pid]"
    done
}

for entry in "${cases[@]}"; do
    suite=${entry%% *} case=${entry#* }
    index=$((index + 1))
    out=$results/$(printf '%03d' "$index")-$suite${case//\//_}
    while ((${#running[@]} >= jobs)); do
        wait -n 2>/dev/null
        report_finished
    done
    run_case "$suite" "$case" "$out" &
    running[$!]=$out
    label[$!]="$suite $case"
done
while ((${#running[@]} > 0)); do
    wait -n 2>/dev/null
    report_finished
done

total=$((passed + failed + skipped))
echo "Reference suite against $daemon: $passed passed, $failed failed, $skipped skipped" \
    "of $total (baseline $baseline); logs in $results"
printf '{"passed":%d,"failed":%d,"skipped":%d,"total":%d,"baseline":%d}\n' \
    "$passed" "$failed" "$skipped" "$total" "$baseline"
((passed >= baseline))
