# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# bench/common.sh: what bench/run.sh and bench/flood.sh share: where the binaries are, the
# progress log, failure counting, building, and busd's install. Sourced, not run; the caller
# sets LOG_TAG (the prefix of its progress lines) first.

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
