#!/usr/bin/env bash
# Smoke-tests a cross-built ARM package on this (x86-64) machine under qemu-user:
#
#   deploy/test-cross-package.sh target/debian/watchpost_<version>_arm64.deb
#   deploy/test-cross-package.sh target/debian/watchpost_<version>_armhf.deb
#
# It unpacks the package into a temporary directory (it installs nothing), then runs the
# packaged binary with Debian's qemu-user (qemu-aarch64 or qemu-arm, with the cross C library of
# libc6-arm64-cross or libc6-armhf-cross as its root): `watchpost --version`, `watchpost check`
# on every shipped configuration, and a short run on loopback that takes a reading from
# mosquitto_pub and raises an alert that mosquitto_sub receives. It needs qemu-user, the cross
# toolchain package of the architecture (for its C library) and the Mosquitto clients. Every
# check prints "ok: ..."; the first that fails stops the script with "FAIL: ..." and exit
# status 1. Sizes and the idle RSS (of the emulated process: qemu-user's own memory included)
# are printed for the README.
set -euo pipefail

[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: $0 PACKAGE.deb" >&2; exit 2; }
deb=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
gateway_pid=""
sub_pid=""
cleanup() {
    for pid in $gateway_pid $sub_pid; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; [ -f "$work/gateway.log" ] && tail -20 "$work/gateway.log" >&2; exit 1; }
ok() { echo "ok: $*"; }

arch=$(dpkg-deb -f "$deb" Architecture)
case "$arch" in
    arm64) qemu=qemu-aarch64; sysroot=/usr/aarch64-linux-gnu ;;
    armhf) qemu=qemu-arm; sysroot=/usr/arm-linux-gnueabihf ;;
    *) fail "$deb is for $arch; this script tests arm64 and armhf packages" ;;
esac
command -v "$qemu" >/dev/null || fail "no $qemu: apt-get install qemu-user"
[ -d "$sysroot/lib" ] || fail "no C library for $arch in $sysroot: apt-get install the cross toolchain"
for tool in mosquitto_pub mosquitto_sub curl; do
    command -v "$tool" >/dev/null || fail "no $tool: apt-get install mosquitto-clients curl"
done

dpkg-deb -x "$deb" "$work/root" || fail "dpkg-deb -x $deb"
bin=$work/root/usr/bin/watchpost
[ -x "$bin" ] || fail "the package has no executable /usr/bin/watchpost"
run() { "$qemu" -L "$sysroot" "$bin" "$@"; }
ok "$arch package: $(wc -c <"$deb") bytes; binary: $(wc -c <"$bin") bytes ($(file -b "$bin" | cut -d, -f1-2))"

version=$(run --version) || fail "watchpost --version does not run under $qemu"
[ "$version" = "watchpost $(dpkg-deb -f "$deb" Version | sed 's/-[0-9]*$//')" ] ||
    fail "watchpost --version says '$version'"
ok "$version under $qemu"

for config in "$repo"/config/*.toml "$work/root/etc/watchpost/watchpost.toml"; do
    out=$(run check --config "$config" 2>&1) || fail "watchpost check --config $config: $out"
done
ok "watchpost check on every shipped configuration"

# Two loopback ports below the ephemeral range that nothing listens on.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
    while :; do
        port=$(( 20000 + $(od -An -N2 -tu2 /dev/urandom) % 12000 ))
        listening "$port" || { echo "$port"; return; }
    done
}
mqtt=$(pick_port)
http=$(pick_port)
cat >"$work/site.toml" <<EOF
[gateway]
id = "cross-$arch"
data_dir = "$work/data"
[http]
listen = "127.0.0.1:$http"
[broker]
listen = "127.0.0.1:$mqtt"
allow_anonymous = true
[[rule]]
name = "water-leak"
match = "sensors/+/water_leak"
equals = true
severity = "critical"
EOF
"$qemu" -L "$sysroot" "$bin" run --config "$work/site.toml" >"$work/gateway.log" 2>&1 &
gateway_pid=$!
ready=""
for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$http/readyz" >/dev/null 2>&1; then ready=yes; break; fi
    kill -0 "$gateway_pid" 2>/dev/null || fail "the gateway exited"
    sleep 0.1
done
[ -n "$ready" ] || fail "the gateway was not ready within 30 s"
ok "the gateway runs under $qemu and is ready"
# Idle: a second after ready, before any client.
sleep 1
rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$gateway_pid/status")
ok "idle RSS ${rss} kB (the emulated process, qemu-user included)"

mosquitto_sub -h 127.0.0.1 -p "$mqtt" -t 'alerts/#' -C 1 -W 30 >"$work/alert.json" 2>"$work/sub.err" &
sub_pid=$!
# The subscriber is in once the broker counts its session.
for _ in $(seq 1 100); do
    grep -q '^watchpost_connections 1$' <<EOF_METRICS && break
$(curl -fsS "http://127.0.0.1:$http/metrics" 2>/dev/null)
EOF_METRICS
    sleep 0.1
done
mosquitto_pub -h 127.0.0.1 -p "$mqtt" -q 1 -t sensors/basement/water_leak -m '{"v":true,"seq":0}' ||
    fail "mosquitto_pub to the gateway"
wait "$sub_pid" || fail "no alert on alerts/# within 30 s: $(cat "$work/sub.err")"
sub_pid=""
grep -q '"rule":"water-leak"' "$work/alert.json" && grep -q '"state":"raised"' "$work/alert.json" ||
    fail "not the raised water-leak alert: $(cat "$work/alert.json")"
ok "a reading in, the critical alert out: $(cut -c1-100 "$work/alert.json")..."

kill "$gateway_pid"
wait "$gateway_pid" 2>/dev/null || true
gateway_pid=""
ok "$arch package passes"
