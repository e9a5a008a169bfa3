#!/usr/bin/env bash
# End-to-end tests of the gateway's broker with a client library that is not Rust: Eclipse Paho's
# Python client (tests/clients/test_paho.py), MQTT 3.1.1 and MQTT 5 on one port.
#
#   tests/clients.sh [GATEWAY_BINARY]   start the gateway (default target/debug/watchpost) on a
#                                       free loopback port with a data dir of its own, and test it
#   MQTT_PORT=18830 tests/clients.sh    test the broker already listening there (MQTT_HOST,
#                                       default 127.0.0.1), e.g. Mosquitto, to check the tests
#
# paho-mqtt is installed into a throwaway virtual environment; nothing outside a temporary
# directory is written. Exits with the tests' result; on failure the gateway's log tail follows.
set -euo pipefail
cd "$(dirname "$0")/.."

gateway_binary=${1:-target/debug/watchpost}
paho_version=2.1.0

work=$(mktemp -d)
gateway_pid=""
stop_gateway() {
    if [ -n "$gateway_pid" ]; then
        kill -TERM "$gateway_pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$gateway_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
        gateway_pid=""
    fi
}
trap 'stop_gateway; rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "paho-mqtt==${paho_version}"

if [ -z "${MQTT_PORT:-}" ]; then
    export MQTT_HOST=127.0.0.1
    MQTT_PORT=$("$work/venv/bin/python" -c \
        'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    export MQTT_PORT
    # The gateway is configured to refuse this filter, which the tests then check.
    export EXPECT_NOSUBSCRIBE_REFUSED=1
    cat >"$work/gateway.toml" <<EOF
[gateway]
id = "clients"
data_dir = "$work/data"

[http]
listen = "off"

[broker]
listen = "${MQTT_HOST}:${MQTT_PORT}"
allow_anonymous = true
refuse_subscriptions = ["test/nosubscribe"]

[[rule]]
name = "overheat"
match = "sensors/+/temperature"
above = 90.0
severity = "warning"
EOF
    "$gateway_binary" run --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
    gateway_pid=$!

    deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/${MQTT_HOST}/${MQTT_PORT}") 2>/dev/null; do
        if ! kill -0 "$gateway_pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            echo "the gateway did not listen on ${MQTT_HOST}:${MQTT_PORT} within 30 s; its log:" >&2
            tail -n 40 "$work/gateway.log" >&2
            exit 1
        fi
        sleep 0.1
    done
fi

status=0
"$work/venv/bin/python" -m unittest -v tests/clients/test_paho.py || status=$?

if [ -n "$gateway_pid" ]; then
    stop_gateway
    if [ "$status" -ne 0 ]; then
        echo "--- the gateway's log, last 60 lines" >&2
        tail -n 60 "$work/gateway.log" >&2
    fi
fi
exit "$status"
