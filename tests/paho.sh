#!/usr/bin/env bash
# Runs the Eclipse Paho MQTT interoperability suite (MQTT 3.1.1 and MQTT 5, both on the one
# port) against a real `watchpost` process started with config/examples/interop.toml in a
# fresh temporary directory. Builds nothing.
#
#   tests/paho.sh [WATCHPOST_BINARY]        # default: target/debug/watchpost
#
# Exits 0 only if each suite's closing line is "N passed, 0 failed" with N all of its tests
# (10 for MQTT 3.1.1, 27 for MQTT 5), or if at most two tests failed and passed when run once
# more, alone (the output then says RETRIED and which). Environment:
#   PAHO_INTEROP   the suite (default: ../shared/paho-interop beside the repository)
#   PAHO_VERSIONS  which suites, e.g. "5" (default "3 5")
#   PAHO_TESTS     only these tests, by name, in each suite run, e.g. "test_server_keep_alive"
#                  (then N is their number)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
config="$repo/config/examples/interop.toml"
suite=${PAHO_INTEROP:-$repo/../shared/paho-interop}
versions=${PAHO_VERSIONS:-3 5}
read -r -a only <<<"${PAHO_TESTS:-}"

fail() { echo "paho.sh: $*" >&2; exit 1; }

bin=${1:-target/debug/watchpost}
[[ $bin == /* ]] || bin="$PWD/$bin"
[ -x "$bin" ] || fail "no watchpost binary at $bin: build it first (cargo build -p watchpost --locked) or pass its path"
[ -x "$suite/run.sh" ] || fail "the Paho interoperability suite is not at $suite (no run.sh there): put it there or set PAHO_INTEROP to its directory"
command -v python3 >/dev/null || fail "the suite needs python3"

# The suite is pointed at the port the configuration listens on, read from its [broker] table.
port=$(awk '/^\[/ { table = $1 } table == "[broker]" && /^listen *=/ {
    if (match($0, /:[0-9]+"/)) { print substr($0, RSTART + 1, RLENGTH - 2); exit } }' "$config")
[ -n "$port" ] || fail "no [broker] listen port found in $config"

accepts() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
accepts && fail "something already listens on 127.0.0.1:$port; stop it first"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/watchpost-paho.XXXXXX")
log="$tmp/gateway.log"
export PAHO_LOGS="$tmp/paho-logs"
gateway=""
stop_gateway() {
    [ -n "$gateway" ] || return 0
    kill -TERM "$gateway" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while kill -0 "$gateway" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL "$gateway" 2>/dev/null || true
    wait "$gateway" 2>/dev/null || true
    gateway=""
}
ok=false
finish() {
    stop_gateway
    if $ok; then rm -rf "$tmp"; else echo "paho.sh: logs kept in $tmp" >&2; fi
}
trap finish EXIT

# Started in the temporary directory: the configuration's relative data_dir lands there.
(cd "$tmp" && exec "$bin" run --config "$config") >"$log" 2>&1 &
gateway=$!

deadline=$((SECONDS + 30))
until accepts; do
    if ! kill -0 "$gateway" 2>/dev/null; then
        echo "--- gateway log ($log)"; tail -n 40 "$log"
        fail "the gateway exited before it served 127.0.0.1:$port"
    fi
    if [ $SECONDS -ge $deadline ]; then
        echo "--- gateway log ($log)"; tail -n 40 "$log"
        fail "the gateway did not accept connections on 127.0.0.1:$port within 30 s"
    fi
    sleep 0.1
done

passed=true
for version in $versions; do
    case $version in
        3) all=10 ;;
        5) all=27 ;;
        *) fail "PAHO_VERSIONS: no suite for MQTT version $version (3 or 5)" ;;
    esac
    want=${#only[@]}
    [ "$want" -gt 0 ] || want=$all
    echo "--- Paho interoperability suite, MQTT $([ "$version" = 3 ] && echo 3.1.1 || echo 5), port $port"
    "$suite/run.sh" "$version" "$port" "${only[@]}" | tee "$tmp/v$version.out" || true
    closing=$(tail -n 1 "$tmp/v$version.out")
    # Some of the suite's tests race with their own sleeps (test_request_response publishes
    # before its second subscriber's SUBACK: it waits on the first client's callback; it failed
    # 1 run in 5 here on an idle machine): a test that failed is run again, alone, up to twice,
    # and said so. A test that fails three times fails the suite.
    mapfile -t failed < <(grep -E '^(FAIL|HANG) ' "$tmp/v$version.out" | awk '{print $2}')
    if [ "${#failed[@]}" -gt 0 ] && [ "${#failed[@]}" -le 2 ]; then
        for again in 1 2; do
            echo "--- MQTT $version: again ($again of 2), alone: ${failed[*]}"
            if "$suite/run.sh" "$version" "$port" "${failed[@]}" | tee "$tmp/v$version-again.out" \
                | tail -n 1 | grep -qx "${#failed[@]} passed, 0 failed"; then
                echo "RETRIED ${failed[*]}: passed at attempt $((again + 1))"
                closing="$want passed, 0 failed"
                break
            fi
        done
    fi
    if [ "$closing" != "$want passed, 0 failed" ]; then
        passed=false
        echo "--- MQTT $version: expected \"$want passed, 0 failed\", got \"$closing\"; the failed tests' logs end:"
        grep -E '^(FAIL|HANG) ' "$tmp/v$version.out" | while read -r _ name; do
            echo "--- $name ($PAHO_LOGS/v$version-$name.log)"
            tail -n 25 "$PAHO_LOGS/v$version-$name.log" || true
        done || true
    fi
done

alive=true
kill -0 "$gateway" 2>/dev/null || alive=false
stop_gateway
if ! $alive; then
    passed=false
    echo "--- the gateway exited during the suite"
fi
if ! $passed; then
    echo "--- gateway log, last 60 lines ($log)"
    tail -n 60 "$log"
    fail "the Paho interoperability suite did not pass"
fi
ok=true
echo "paho.sh: every Paho interoperability test passed"
