#!/usr/bin/env bash
# Runs python-dbusmock's own test suite with a bus binary as the `dbus-daemon`
# that its DBusTestCase starts: the way test harnesses use dbus-daemon. Each
# test file runs in a pytest of its own, so that a file that hangs costs only
# its FILE_TIMEOUT and the other files still count.
#
# Usage: tests/dbusmock/run.sh [BUS_BINARY]
#   BUS_BINARY     the bus under test (default: target/release/broker). A
#                  generated `dbus-daemon` script that execs it with the same
#                  arguments comes first on PATH; a binary that is itself named
#                  dbus-daemon (/usr/bin/dbus-daemon, the reference) is found
#                  on PATH as it is
# Environment:
#   FILE_TIMEOUT   seconds one test file may take before its unfinished cases
#                  count as failed (60; the slowest, test_api.py, takes 10 s).
#                  The 20 files take at most ceil(20 / JOBS) * FILE_TIMEOUT
#                  (10 minutes); a run takes 25 s here, plus about 35 s
#                  once to download the sdist
#   JOBS           test files run at the same time (2)
#   RESULTS_DIR    where each file's output is kept (a fresh temporary dir)
#   BASELINE       file holding the pass count to reach (tests/dbusmock/baseline)
#   DBUSMOCK_SDIST the python-dbusmock sdist to test (default: the pinned
#                  version, downloaded once from PyPI into target/dbusmock/)
#   FAKE_SYSTEMD   1 (default): run each file in a private mount namespace
#                  where /run/systemd/system exists (an empty tmpfs on
#                  /run/systemd), as python-dbusmock's own CI does, so that
#                  the logind and timedated cases run instead of skipping;
#                  needs root. 0: run without, and those 11 cases skip
#
# Debian packages (bookworm) it needs; a missing one stops the run (exit 2)
# with its name:
#   python3 python3-pytest python3-dbus python3-gi gir1.2-glib-2.0
#   python3-pip (only to download the sdist once) util-linux mount coreutils
# and those whose programs the suite mocks, without which the baseline's
# cases skip:
#   systemd (busctl, loginctl, timedatectl, systemd-inhibit)
#   libglib2.0-bin (gdbus) polkitd (pkcheck) libnotify-bin (notify-send)
#   modemmanager (mmcli) power-profiles-daemon (powerprofilesctl)
#   ofono-scripts (/usr/share/ofono/scripts)
# Not needed, and then skipped: upower, network-manager and bluez (each
# pulls in udev and systemd-sysv).
#
# Prints one line per case (PASS, FAIL or SKIP), the totals, and as its last
# line a JSON object with the totals. Exits 1 when fewer cases pass than the
# baseline, 2 when the run itself cannot be set up.
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bus=${1:-$repo/target/release/broker}
file_timeout=${FILE_TIMEOUT:-60}
jobs=${JOBS:-2}
baseline_file=${BASELINE:-$here/baseline}
results=${RESULTS_DIR:-$(mktemp -d -t broker-dbusmock.XXXXXX)}
fake_systemd=${FAKE_SYSTEMD:-1}

# The pinned release: 0.38.1 runs on bookworm's python3 3.11, python3-dbus
# 1.3.2 and python3-gi 3.42; the hash is that of the sdist on PyPI.
version=0.38.1
sdist_sha256=221b65e1c2e48de9fd11bf7e8c165adaf91648f49a11f390d086a498386f2984
cache=$repo/target/dbusmock
python=/usr/bin/python3
# Only Debian's programs, whatever the caller's PATH holds.
system_path=/usr/sbin:/usr/bin:/sbin:/bin

die() {
    echo "run.sh: $*" >&2
    exit 2
}

# Each FILE PACKAGE pair: a file the run needs, and the Debian package that
# ships it.
needed_files=(
    /usr/bin/python3 python3
    /usr/bin/unshare util-linux
    /usr/bin/setsid util-linux
    /usr/bin/mount mount
    /usr/bin/timeout coreutils
    /usr/bin/busctl systemd
    /usr/bin/loginctl systemd
    /usr/bin/timedatectl systemd
    /usr/bin/systemd-inhibit systemd
    /usr/bin/gdbus libglib2.0-bin
    /usr/bin/pkcheck polkitd
    /usr/bin/notify-send libnotify-bin
    /usr/bin/mmcli modemmanager
    /usr/bin/powerprofilesctl power-profiles-daemon
    /usr/share/ofono/scripts/list-modems ofono-scripts
)
# Each NODE_ID PROGRAM PACKAGE triple: a case that runs PROGRAM without
# checking that it is there (the suite's other cases skip when their program
# is missing). Where PROGRAM is not installed, the case is not run and counts
# as skipped, naming the package; the same happens under either bus.
needs_program=(
    tests/test_api_pytest.py::test_dbusmock_test_template upower upower
)
# Each MODULE PACKAGE pair: a module Debian's python3 must import from
# /usr/lib/python3, and the package that ships it.
needed_modules=(
    pytest python3-pytest
    dbus python3-dbus
    gi python3-gi
    gi.repository.Gio gir1.2-glib-2.0
)

# Names every missing package at once, so one apt-get line fixes the host.
check_packages() {
    local i missing=()
    for ((i = 0; i < ${#needed_files[@]}; i += 2)); do
        [[ -e ${needed_files[i]} ]] || missing+=("${needed_files[i + 1]}")
    done
    if [[ -x $python ]]; then
        for ((i = 0; i < ${#needed_modules[@]}; i += 2)); do
            # A module from a file elsewhere (/usr/local) is no Debian one.
            "${test_env[@]}" "$python" -c "
import importlib, sys
path = getattr(importlib.import_module('${needed_modules[i]}'), '__file__', None) or ''
sys.exit(path.startswith('/') and not path.startswith('/usr/lib/python3'))" >/dev/null 2>&1 ||
                missing+=("${needed_modules[i + 1]}")
        done
    fi
    ((${#missing[@]} == 0)) ||
        die "missing Debian packages: apt-get install $(printf '%s\n' "${missing[@]}" | sort -u | paste -sd' ')"
}

# The environment every test file gets, as a prefix for a command: Debian's
# python modules before any in /usr/local, no plugin that pytest would pick
# up from the host, the unpacked sdist's dbusmock first, and no bus of the
# caller's. An array rather than a function, so that `"${test_env[@]}" cmd &`
# leaves $! naming cmd itself. Set once $results is final.
test_env=()
make_test_env() {
    test_env=(env -u DBUS_SESSION_BUS_ADDRESS -u DBUS_STARTER_ADDRESS -u DBUS_STARTER_BUS_TYPE
    -u DISPLAY -u WAYLAND_DISPLAY -u PYTEST_ADDOPTS -u PYTHONHOME -u PYTHONSTARTUP
    DBUS_SYSTEM_BUS_ADDRESS="unix:path=$results/no-system-bus"
    PATH="$results/bin:$system_path"
    PYTHONPATH="$results/src:/usr/lib/python3/dist-packages"
    PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
    SKIP_STATIC_CHECKS=1 LC_ALL=C.UTF-8)
}

# Puts the pinned sdist into the cache (downloading it once) and prints its
# path. pip builds the sdist's metadata on download, which needs PyPI's
# setuptools; pip on PATH stands in only where Debian's python3 has no pip.
fetch_sdist() {
    local file=$cache/python_dbusmock-$version.tar.gz tmp pip
    if [[ -n ${DBUSMOCK_SDIST:-} ]]; then
        [[ -r $DBUSMOCK_SDIST ]] || die "DBUSMOCK_SDIST '$DBUSMOCK_SDIST' is not readable"
        echo "$DBUSMOCK_SDIST"
        return
    fi
    if [[ ! -r $file ]]; then
        mkdir -p "$cache" || die "cannot create $cache"
        tmp=$(mktemp -d "$cache/download.XXXXXX") || die "cannot create a dir in $cache"
        if "$python" -m pip --version >/dev/null 2>&1; then
            pip=("$python" -m pip)
        elif command -v pip >/dev/null; then
            pip=(pip)
        else
            die "no pip to download python-dbusmock $version (apt-get install python3-pip)"
        fi
        "${pip[@]}" download --quiet --no-deps --no-binary :all: --dest "$tmp" \
            "python-dbusmock==$version" >"$results/pip.log" 2>&1 ||
            die "pip could not download python-dbusmock $version: $(tail -n3 "$results/pip.log")"
        mv "$tmp/python_dbusmock-$version.tar.gz" "$file" ||
            die "pip left no python_dbusmock-$version.tar.gz in $tmp"
        rm -rf "$tmp"
    fi
    echo "$(sha256sum "$file" | cut -d' ' -f1) $file" >"$results/sdist.sha256"
    read -r sum _ <"$results/sdist.sha256"
    [[ $sum == "$sdist_sha256" ]] ||
        die "$file has sha256 $sum, not the pinned $sdist_sha256 (delete it to download again)"
    echo "$file"
}

# Unpacks the sdist into $results/src; it holds both dbusmock/ and tests/.
unpack() {
    if ! mkdir -p "$results/src" || ! tar -xzf "$1" -C "$results/src" --strip-components=1; then
        die "cannot unpack $1"
    fi
    [[ -d $results/src/tests && -d $results/src/dbusmock ]] ||
        die "$1 holds no tests/ and dbusmock/"
}

# The `dbus-daemon` the tests find first on PATH.
install_bus() {
    mkdir -p "$results/bin" || die "cannot create $results/bin"
    if [[ $(basename "$bus") == dbus-daemon ]]; then
        ln -s "$bus" "$results/bin/dbus-daemon"
    else
        # exec, so that the pid DBusTestCase started prints itself (it checks).
        printf '#!/bin/sh\nexec %s "$@"\n' "'${bus//\'/\'\\\'\'}'" >"$results/bin/dbus-daemon" &&
            chmod +x "$results/bin/dbus-daemon"
    fi || die "cannot install the dbus-daemon shim in $results/bin"
}

# The prefix that runs a command where /run/systemd/system exists.
namespace=()
setup_namespace() {
    ((fake_systemd)) || return 0
    [[ -d /run/systemd/system ]] && return 0
    [[ -d /run/systemd ]] || die "no /run/systemd to put a tmpfs on (FAKE_SYSTEMD=0 runs without)"
    namespace=(unshare --mount --propagation private /bin/sh -c
        'mount -t tmpfs -o mode=0755 tmpfs /run/systemd && mkdir /run/systemd/system && exec "$@"' sh)
    "${namespace[@]}" test -d /run/systemd/system 2>"$results/namespace.stderr" ||
        die "cannot make /run/systemd/system in a private mount namespace (needs root;" \
            "FAKE_SYSTEMD=0 runs without): $(head -c 300 "$results/namespace.stderr")"
}

# Starts the bus the way DBusTestCase does, and stops the run when that
# fails: then every case would fail the same way. Says so when the bus
# writes to stderr (dbus-daemon writes nothing there).
preflight() {
    local dir=$results/preflight pid="" waited
    mkdir -p "$dir"
    cat >"$dir/bus.conf" <<EOF
<busconfig>
  <type>session</type>
  <keep_umask/>
  <listen>unix:path=$dir/bus.socket</listen>
  <servicedir>$dir</servicedir>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
EOF
    "${test_env[@]}" setsid dbus-daemon --config-file="$dir/bus.conf" --print-pid=1 \
        </dev/null >"$dir/stdout" 2>"$dir/stderr" &
    local started=$!
    for ((waited = 0; waited < 100; waited++)); do
        [[ -s $dir/stdout ]] && break
        kill -0 "$started" 2>/dev/null || break
        sleep 0.1
    done
    read -r pid <"$dir/stdout"
    kill -TERM -- "-$started" 2>/dev/null
    wait "$started" 2>/dev/null
    [[ $pid == "$started" ]] ||
        die "'$results/bin/dbus-daemon --config-file=$dir/bus.conf --print-pid=1' printed" \
            "'${pid}' where its pid $started was due; it said: $(head -c 300 "$dir/stderr")"
    if [[ -s $dir/stderr ]]; then
        echo "preflight: the bus wrote to stderr at start: $(head -c 300 "$dir/stderr")"
    fi
}

# Lists every case as its node id (tests/test_api.py::TestAPI::test_foo) in
# $results/cases, but those of needs_program whose program is missing: those
# go, with the reason, in $results/not-run.
collect() {
    local i
    (cd "$results/src" &&
        "${test_env[@]}" timeout 120 "$python" -m pytest -p no:cacheprovider --collect-only -q tests \
            >"$results/collect.log" 2>&1) ||
        die "pytest could not collect the cases: $(tail -n3 "$results/collect.log")"
    grep '::' "$results/collect.log" >"$results/cases.all"
    : >"$results/not-run"
    for ((i = 0; i < ${#needs_program[@]}; i += 3)); do
        "${test_env[@]}" sh -c 'command -v "$1"' sh "${needs_program[i + 1]}" >/dev/null ||
            printf '%s\t%s\n' "${needs_program[i]}" \
                "needs ${needs_program[i + 1]}, not installed (Debian package ${needs_program[i + 2]})" \
                >>"$results/not-run"
    done
    cut -f1 "$results/not-run" | grep -vxF -f - "$results/cases.all" >"$results/cases"
}

# Runs one test file in a session of its own, so whatever it leaves behind
# (buses, mock servers) ends with it. SIGINT on time-out lets pytest write
# the results it has. Writes one verdict line per case to $2.status.
run_file() {
    local file=$1 out=$2 rc note dir deselect=()
    mapfile -t deselect < <(awk -F'\t' -v prefix="$file::" \
        'index($1, prefix) == 1 { print "--deselect"; print $1 }' "$results/not-run")
    # Short: the buses' sockets go in TMPDIR, and a socket path has 107 bytes.
    dir=$scratch/$(basename "$out")
    mkdir -p "$dir/tmp" "$dir/home" "$dir/run" && chmod 700 "$dir/run" || return
    cd "$results/src" || return
    TMPDIR=$dir/tmp HOME=$dir/home XDG_RUNTIME_DIR=$dir/run \
        "${test_env[@]}" setsid timeout -s INT -k 10 "$file_timeout" "${namespace[@]}" \
        "$python" -m pytest -p no:cacheprovider -v -rfE --junitxml="$out.xml" "${deselect[@]}" "$file" \
        </dev/null >"$out.log" 2>&1 &
    local pgid=$!
    echo "$pgid" >"$out.pgid"
    wait "$pgid" 2>/dev/null
    rc=$?
    kill -KILL -- "-$pgid" 2>/dev/null
    if ((rc == 124 || rc == 137)); then
        note="timed out after ${file_timeout}s"
    else
        note="no result: pytest exited with status $rc"
    fi
    awk -v prefix="$file::" 'index($0, prefix) == 1' "$results/cases" |
        "$python" "$here/verdicts.py" "$out.xml" "$note" >"$out.status.tmp" &&
        mv "$out.status.tmp" "$out.status"
}

declare -A running=() file_of=()

# On an interrupt, end the sessions of the files still running.
stop_running() {
    local file
    for file in "${running[@]}"; do
        [[ -r $file.pgid ]] && kill -KILL -- "-$(<"$file.pgid")" 2>/dev/null
    done
}
scratch=""
trap 'stop_running; exit 130' INT TERM
trap '[[ -n $scratch ]] && rm -rf "$scratch"' EXIT

[[ -x $bus ]] || die "bus binary '$bus' is not executable"
bus=$(realpath "$bus")
[[ -r $baseline_file ]] || die "no baseline file $baseline_file"
baseline=$(tr -d '[:space:]' <"$baseline_file")
[[ $baseline =~ ^[0-9]+$ ]] || die "baseline file $baseline_file does not hold one integer"
[[ $jobs =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive integer"
[[ $file_timeout =~ ^[1-9][0-9]*$ ]] || die "FILE_TIMEOUT must be a positive integer"
mkdir -p "$results" || die "cannot create $results"
results=$(realpath "$results")
# Each test file's TMPDIR, HOME and XDG_RUNTIME_DIR, removed at the end.
scratch=$(mktemp -d /tmp/dbusmock.XXXXXX) || die "cannot create a dir in /tmp"
make_test_env
check_packages
sdist=$(fetch_sdist) || exit 2
unpack "$sdist"
install_bus
setup_namespace
preflight
collect
mapfile -t files < <(sed 's/::.*//' "$results/cases" | sort -u)
((${#files[@]} > 0)) || die "no cases collected"

# Runs up to $jobs files at a time and reports each case of a file when the
# file has ended (its .status file exists). A runner that ended without
# writing one fails its file's cases rather than leaving the loop waiting.
passed=0 failed=0 skipped=0 index=0
report_finished() {
    local pid verdict seconds id detail
    for pid in "${!running[@]}"; do
        if [[ ! -e ${running[$pid]}.status ]]; then
            kill -0 "$pid" 2>/dev/null && continue
            [[ -e ${running[$pid]}.status ]] ||
                awk -v prefix="${file_of[$pid]}::" -v OFS='\t' \
                    'index($0, prefix) == 1 { print "FAIL", "0.0", $0, "the runner wrote no result" }' \
                    "$results/cases" >"${running[$pid]}.status"
        fi
        wait "$pid" 2>/dev/null
        while IFS=$'\t' read -r verdict seconds id detail; do
            printf '%-4s %-90s %6ss %s\n' "$verdict" "$id" "$seconds" "$detail"
            case $verdict in
                PASS) passed=$((passed + 1)) ;;
                SKIP) skipped=$((skipped + 1)) ;;
                *) failed=$((failed + 1)) ;;
            esac
        done <"${running[$pid]}.status"
        unset "running[$pid]" "file_of[$pid]"
    done
}

for file in "${files[@]}"; do
    index=$((index + 1))
    out=$results/$(printf '%02d' "$index")-$(basename "$file" .py)
    while ((${#running[@]} >= jobs)); do
        wait -n 2>/dev/null
        report_finished
    done
    run_file "$file" "$out" &
    running[$!]=$out
    file_of[$!]=$file
done
while ((${#running[@]} > 0)); do
    wait -n 2>/dev/null
    report_finished
done
while IFS=$'\t' read -r id detail; do
    printf '%-4s %-90s %6ss %s\n' SKIP "$id" 0.0 "$detail"
    skipped=$((skipped + 1))
done <"$results/not-run"

total=$((passed + failed + skipped))
echo "$(basename "$sdist" .tar.gz) suite against $bus: $total cases (baseline $baseline passed);" \
    "logs in $results"
echo "python-dbusmock: $passed passed, $failed failed, $skipped skipped"
printf '{"passed":%d,"failed":%d,"skipped":%d,"total":%d,"baseline":%d}\n' \
    "$passed" "$failed" "$skipped" "$total" "$baseline"
((passed >= baseline))
