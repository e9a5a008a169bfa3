#!/usr/bin/env bash
# Peak memory of the gateway and of Mosquitto, one after the other in one run, under the same
# flood (QoS 0 readings from four connections as fast as the broker takes them, for SECONDS)
# with one client subscribed to sensors/# that never reads after its SUBACK.
# usage: tests/bench/slow-subscriber.sh [SECONDS]   (needs the release build:
#        cargo build --release -p watchpost -p watchpost-e2e; mosquitto and python3)
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-8}
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cat > "$work/silent.py" <<'PY'
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
cid = b"dashboard"
body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
s.sendall(bytes([0x10, len(body)]) + body)
s.recv(4)
topic = b"sensors/#"
sub = b"\x00\x01" + len(topic).to_bytes(2, "big") + topic + b"\x00"
s.sendall(bytes([0x82, len(sub)]) + sub)
s.recv(5)
print("subscribed", flush=True)
time.sleep(3600)
PY

# run NAME PORT PID: the silent client, the flood, and the broker's RSS sampled every 100 ms.
run() {
    local name=$1 port=$2 pid=$3 peak=0 rss
    local before; before=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    python3 "$work/silent.py" "$port" > "$work/silent-$name.log" &
    local silent=$!
    sleep 0.5
    (echo go | "$bin/watchpost-bench" flood "127.0.0.1:$port" 4 0 0 "$seconds" 250 > "$work/flood-$name.json") &
    local flood=$!
    while kill -0 "$flood" 2>/dev/null; do
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
        [ "$rss" -gt "$peak" ] && peak=$rss
        sleep 0.1
    done
    local sent; sent=$(grep -o '"sent":[0-9]*' "$work/flood-$name.json" | cut -d: -f2)
    awk -v n="$name" -v s="$sent" -v b="$before" -v p="$peak" -v t="$seconds" \
        'BEGIN { printf "| %s | %d | %.1f | %.1f | %.0f |\n", n, s, b / 1024, p / 1024, s / t }'
    kill "$silent"
}

cat > "$work/gw.toml" <<TOML
[gateway]
id = "bench"
data_dir = "$work/data"
[broker]
listen = "127.0.0.1:18930"
allow_anonymous = true
max_publish_rate = 0
[http]
listen = "off"
[[rule]]
name = "hot"
match = "sensors/+/temperature"
above = 1000.0
TOML
printf 'listener 18931 127.0.0.1\nallow_anonymous true\nlog_dest none\n' > "$work/m.conf"

echo "| broker | readings sent in ${seconds} s | RSS before, MiB | peak RSS, MiB | readings/s taken |"
echo "|---|---:|---:|---:|---:|"
"$bin/watchpost" run --config "$work/gw.toml" 2> "$work/gw.log" &
gw=$!
sleep 1
run watchpost 18930 "$gw"
kill "$gw"; wait "$gw" 2>/dev/null || true
mosquitto -c "$work/m.conf" &
mq=$!
sleep 0.5
run mosquitto 18931 "$mq"
kill "$mq"
