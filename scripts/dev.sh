#!/usr/bin/env bash
# Development services for tidings: PostgreSQL and a real Kafka-protocol broker
# on loopback. Every command is idempotent.
#
#   scripts/dev.sh up          start PostgreSQL (if down) and the broker (installing it
#                              once), and install the AsyncAPI parser the tests use
#   scripts/dev.sh down        stop the broker this script started (by pid)
#   scripts/dev.sh status      say what runs where
#   scripts/dev.sh env         print the environment the tests and examples use
#   scripts/dev.sh toolchain   make the pinned Rust toolchain (rust-toolchain.toml)
#                              usable, offline too when the default is that release
#   scripts/dev.sh test        up, then run the whole test suite
#   scripts/dev.sh quickstart  PostgreSQL up, then the quick start (on an
#                              embedded broker unless one answers or
#                              KAFKA_BROKERS names one: no install)
#
# Settings (environment): TIDINGS_CACHE (install and run folder, default
# ~/.cache/tidings), TIDINGS_BROKER_PORT (default 9092), TIDINGS_PG_PORT (5432).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NISSHI_VERSION="0.8.1"
CACHE="${TIDINGS_CACHE:-$HOME/.cache/tidings}"
NISSHI_ROOT="$CACHE/nisshi-$NISSHI_VERSION"
NISSHI="$NISSHI_ROOT/bin/nisshi"
RUN_DIR="$CACHE/run"
BROKER_PORT="${TIDINGS_BROKER_PORT:-9092}"
PG_PORT="${TIDINGS_PG_PORT:-5432}"
BROKER_PID="$RUN_DIR/broker-$BROKER_PORT.pid"
BROKER_LOG="$RUN_DIR/broker-$BROKER_PORT.log"

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:$PG_PORT/postgres}"
GIVEN_KAFKA_BROKERS="${KAFKA_BROKERS:-}"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:$BROKER_PORT}"

say() { printf '[dev] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pg_up() {
    if port_open "$PG_PORT"; then
        say "postgres: answering on 127.0.0.1:$PG_PORT"
        return
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        say "postgres: no server on 127.0.0.1:$PG_PORT and none installed."
        say "  install one with: apt-get install -y postgresql  (then rerun this script)"
        exit 1
    fi
    local version
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    say "postgres: starting cluster $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 60); do
        port_open "$PG_PORT" && { say "postgres: answering on 127.0.0.1:$PG_PORT"; return; }
        sleep 0.5
    done
    say "postgres: did not come up on 127.0.0.1:$PG_PORT"
    exit 1
}

broker_install() {
    if [ -x "$NISSHI" ] && "$NISSHI" --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
        return
    fi
    say "broker: installing nisshi $NISSHI_VERSION into $NISSHI_ROOT (once; 20 to 40 min on 2 cores)"
    mkdir -p "$NISSHI_ROOT"
    CARGO_TARGET_DIR="$CACHE/nisshi-build" cargo install nisshi --version "$NISSHI_VERSION" --locked \
        --ignore-rust-version --no-default-features --features postgres,dynostore \
        --root "$NISSHI_ROOT"
    rm -rf "$CACHE/nisshi-build"
}

# Whether a Kafka-protocol broker answers on port $1: an ApiVersions v0
# request (key 18) with correlation id 7 must come back with that id.
speaks_kafka() {
    local reply
    reply=$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; printf '\x00\x00\x00\x0d\x00\x12\x00\x00\x00\x00\x00\x07\x00\x03dev' >&3; head -c 8 <&3 | od -An -tx1" 2>/dev/null) || return 1
    [[ "$(echo $reply | tr -d ' ')" =~ ^[0-9a-f]{8}00000007$ ]]
}

broker_running() {
    [ -f "$BROKER_PID" ] && kill -0 "$(cat "$BROKER_PID")" 2>/dev/null
}

broker_up() {
    if broker_running && speaks_kafka "$BROKER_PORT"; then
        say "broker: nisshi $NISSHI_VERSION listening on 127.0.0.1:$BROKER_PORT (pid $(cat "$BROKER_PID"))"
        return
    fi
    if port_open "$BROKER_PORT"; then
        if speaks_kafka "$BROKER_PORT"; then
            say "broker: another Kafka-protocol broker answers on 127.0.0.1:$BROKER_PORT; using it"
            return
        fi
        say "broker: something that does not speak the Kafka protocol listens on 127.0.0.1:$BROKER_PORT; stop it or set TIDINGS_BROKER_PORT"
        exit 1
    fi
    broker_install
    mkdir -p "$RUN_DIR"
    say "broker: starting nisshi on 127.0.0.1:$BROKER_PORT (in-memory storage, log $BROKER_LOG)"
    nohup "$NISSHI" broker \
        --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" \
        --group-initial-rebalance-delay "${TIDINGS_BROKER_REBALANCE_DELAY:-200ms}" \
        --storage-engine "memory://nisshi/" >"$BROKER_LOG" 2>&1 </dev/null &
    echo $! >"$BROKER_PID"
    for _ in $(seq 1 120); do
        if port_open "$BROKER_PORT"; then
            say "broker: nisshi $NISSHI_VERSION listening on 127.0.0.1:$BROKER_PORT (pid $(cat "$BROKER_PID"))"
            return
        fi
        broker_running || { say "broker: exited at start; log follows"; tail -n 40 "$BROKER_LOG" >&2; exit 1; }
        sleep 0.5
    done
    say "broker: not accepting connections after 60 s; log follows"
    tail -n 40 "$BROKER_LOG" >&2
    exit 1
}

broker_down() {
    if broker_running; then
        local pid
        pid="$(cat "$BROKER_PID")"
        say "broker: stopping pid $pid"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    else
        say "broker: not running (started by this script)"
    fi
    rm -f "$BROKER_PID"
}

# The AsyncAPI project's parser, which the tests validate documents with:
# installed from the npm registry at the version package-lock.json pins.
asyncapi_up() {
    local dir="$ROOT/scripts/asyncapi"
    if ! command -v npm >/dev/null; then
        say "asyncapi parser: npm not found (install Node.js and npm)"; return 1
    fi
    if [ -d "$dir/node_modules/@asyncapi/parser" ] \
        && [ "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ]; then
        return 0
    fi
    say "asyncapi parser: npm ci in scripts/asyncapi"
    (cd "$dir" && npm ci --ignore-scripts --no-fund --no-audit --loglevel=error >/dev/null)
}

# The workspace's pinned toolchain (rust-toolchain.toml). rustup would try to
# download it if missing; on a machine without internet whose default
# toolchain is that very release, the default is linked under its name.
toolchain_ready() {
    command -v rustup >/dev/null || return 0
    local pinned installed default release
    pinned="$(sed -n 's/^channel = "\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")"
    installed="$(rustup toolchain list)"
    case $'\n'"$installed" in *$'\n'"$pinned"[-\ ]*|*$'\n'"$pinned") return 0 ;; esac
    default="$(rustup default | cut -d' ' -f1)"
    release="$(RUSTUP_TOOLCHAIN="$default" rustc -vV | sed -n 's/^release: //p')"
    if [ "$release" = "$pinned" ]; then
        say "toolchain: $pinned is not installed; linking the default ($default), which is that release"
        rustup toolchain link "$pinned" "$(RUSTUP_TOOLCHAIN="$default" rustc --print sysroot)"
    else
        say "toolchain: rust-toolchain.toml pins $pinned; rustup installs it on first use (the default here is $release)"
    fi
}

cmd="${1:-up}"
case "$cmd" in
    toolchain) toolchain_ready ;;
    up) toolchain_ready; pg_up; broker_up; asyncapi_up ;;
    down) broker_down ;;
    status)
        port_open "$PG_PORT" && say "postgres: up on 127.0.0.1:$PG_PORT" || say "postgres: down"
        broker_running && say "broker: up on 127.0.0.1:$BROKER_PORT (pid $(cat "$BROKER_PID"))" || say "broker: down"
        ;;
    env)
        echo "export DATABASE_URL=$DATABASE_URL"
        echo "export KAFKA_BROKERS=$KAFKA_BROKERS"
        echo "export TIDINGS_NISSHI=$NISSHI"
        ;;
    test)
        toolchain_ready; pg_up; broker_up; asyncapi_up
        cd "$ROOT"
        export TIDINGS_NISSHI="$NISSHI"
        cargo test --workspace --locked "${@:2}"
        if [ $# -le 1 ]; then
            # The read side's suites again, their projections applying one
            # event at a time instead of set-based batches: both paths.
            say "the read side again, one event at a time (TIDINGS_TEST_APPLY=each)"
            TIDINGS_TEST_APPLY=each cargo test --locked -p tidings-tests \
                --test projection --test projection_faults --test dead_letters --test batched_apply \
                --test evolution
        fi
        ;;
    quickstart)
        # No broker install for a first run: a broker the user names, else
        # one that answers here, else the quick start's embedded one.
        toolchain_ready; pg_up
        if [ -n "$GIVEN_KAFKA_BROKERS" ]; then
            say "broker: KAFKA_BROKERS=$GIVEN_KAFKA_BROKERS"
        elif speaks_kafka "$BROKER_PORT"; then
            say "broker: a Kafka-protocol broker answers on 127.0.0.1:$BROKER_PORT; using it"
        else
            say "broker: none answers on 127.0.0.1:$BROKER_PORT; the quick start embeds one (set KAFKA_BROKERS to use yours)"
            export KAFKA_BROKERS=embedded
        fi
        cd "$ROOT"
        cargo run --locked -p tidings-examples --example quickstart -- "${@:2}"
        ;;
    *) sed -n '2,18p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
