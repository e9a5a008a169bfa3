#!/bin/sh
# Runs the installed watchpost.service under a real systemd, where PID 1 of this machine may be
# something else (a CI runner): boots this machine's own systemd in a throwaway container
# (systemd-nspawn --volatile=yes: a tmpfs root, this machine's /usr read-only, a private
# network) with the package's user, configuration and enablement, and checks from inside:
# readiness (Type=notify), the sandbox the unit asks for and its rating, MQTT, reload, the
# watchdog (alive past WatchdogSec=, and a frozen gateway restarted), a clean stop.
#
#   deploy/test-under-systemd.sh        # as root, with the watchpost package installed
#
# deploy/test-package.sh calls it. If no container can be started here (no systemd-nspawn, or
# not allowed), it says why and exits 0 without testing anything; any check that fails inside
# prints "FAIL: ..." and exits 1.
set -eu

[ -x /usr/bin/watchpost ] && [ -f /lib/systemd/system/watchpost.service ] ||
    { echo "FAIL: install the watchpost package first" >&2; exit 1; }
if ! command -v systemd-nspawn >/dev/null; then
    echo "SKIPPED: no systemd-nspawn (package systemd-container): the unit is not run under systemd"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
boot() { # boot [COMMAND...]: this machine's /usr in a container, for 5 minutes at most
    timeout 300 systemd-nspawn --quiet --directory=/ --volatile=yes --private-network \
        --register=no --keep-unit --console=pipe \
        --bind-ro=/etc/passwd --bind-ro=/etc/group --bind-ro=/etc/watchpost \
        --bind-ro="$work/system:/etc/systemd/system" --bind-ro="$work/check.sh:/check.sh" \
        --bind="$work/out:/out" "$@"
}
mkdir -p "$work/system/multi-user.target.wants" "$work/out"
: >"$work/check.sh"
if ! probe=$(boot /bin/true 2>&1); then
    echo "SKIPPED: systemd-nspawn cannot start a container here, so the unit is not run under systemd:"
    echo "$probe"
    exit 0
fi

# As the package's postinst leaves it: enabled for multi-user.target.
ln -s /lib/systemd/system/watchpost.service "$work/system/multi-user.target.wants/"
cat >"$work/system/watchpost-check.service" <<'EOF'
[Unit]
Description=Checks watchpost.service from inside, then powers the container off
After=watchpost.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/sh /check.sh
EOF
ln -s ../watchpost-check.service "$work/system/multi-user.target.wants/"

cat >"$work/check.sh" <<'EOF'
exec >/out/check.log 2>&1
set -u
fail() { echo "FAIL: $*"; journalctl -u watchpost --no-pager; exit 1; }
ok() { echo "ok: $*"; }
prop() { systemctl show watchpost -p "$1" --value; }

[ "$(prop ActiveState)/$(prop SubState)" = active/running ] ||
    fail "watchpost.service is $(prop ActiveState)/$(prop SubState) after boot"
[ "$(prop Type)" = notify ] && [ "$(prop StatusText)" = serving ] ||
    fail "no READY=1: Type=$(prop Type), status '$(prop StatusText)'"
ok "started at boot (enabled); Type=notify, READY=1 with status '$(prop StatusText)'"
security=$(systemd-analyze security --threshold=49 watchpost 2>&1) ||
    fail "systemd-analyze security rates the running unit above 4.9: $security"
ok "systemd-analyze security of the running unit:$(echo "$security" | sed -n 's/.*Overall exposure level for [^:]*://p')"

pid=$(prop MainPID)
status() { sed -n "s/^$1:[[:space:]]*//p" /proc/"$pid"/status; }
[ "$(status Uid | cut -f1)" = "$(id -u watchpost)" ] || fail "not running as user watchpost"
for cap in CapEff CapPrm CapBnd CapAmb; do
    [ "$(status $cap)" = 0000000000000000 ] || fail "$cap is $(status $cap)"
done
[ "$(status NoNewPrivs)" = 1 ] || fail "NoNewPrivs is off"
[ "$(status Seccomp)" = 2 ] || fail "no seccomp filter"
[ "$(status Umask)" = 0077 ] || fail "umask $(status Umask)"
ok "user watchpost, no capabilities, NoNewPrivs, seccomp filter, umask 0077"

secret() { watchpost device add "$@" --config /etc/watchpost/watchpost.toml | sed -n 's/^  secret: //p'; }
device_secret=$(secret unit-test) && [ -n "$device_secret" ] || fail "watchpost device add printed no secret"
ops_secret=$(secret unit-ops --operator) && [ -n "$ops_secret" ] || fail "no operator secret"
deadline=$(($(date +%s) + 10))
until mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -i unit-test -u unit-test -P "$device_secret" \
    -t sensors/unit-test/temperature -m 1.0 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "the new device cannot publish to the gateway"
    sleep 0.2
done
alert=$(mosquitto_sub -h 127.0.0.1 -p 1883 -u unit-ops -P "$ops_secret" \
    -t alerts/warning/unit-test/freezing -C 1 -W 10) ||
    fail "no alert on alerts/warning/unit-test/freezing"
ok "serves MQTT: $alert"
[ "$(stat -c '%U %a' /var/lib/watchpost/watchpost.db)" = "watchpost 600" ] ||
    fail "StateDirectory: $(ls -la /var/lib/watchpost)"
ok "database in the StateDirectory, watchpost's, mode 600"

systemctl reload watchpost || fail "systemctl reload"
sleep 1
journalctl -u watchpost --no-pager | grep -q 'rules reloaded' || fail "no 'rules reloaded' in the journal"
[ "$(prop MainPID)" = "$pid" ] || fail "reload changed the main process"
ok "systemctl reload: rules reloaded in place (journal)"

sleep 35
[ "$(prop MainPID)" = "$pid" ] && [ "$(prop NRestarts)" = 0 ] ||
    fail "restarted within 35 s: pid $(prop MainPID), restarts $(prop NRestarts)"
[ -n "$(prop WatchdogTimestamp)" ] || fail "no watchdog ping recorded"
ok "still the same process after 35 s (WatchdogSec=$(prop WatchdogUSec)); last ping $(prop WatchdogTimestamp)"

kill -STOP "$pid"
for _ in $(seq 60); do
    [ "$(prop NRestarts)" = 1 ] && [ "$(prop ActiveState)" = active ] && break
    sleep 1
done
journalctl -u watchpost --no-pager | grep -q 'Watchdog timeout' || fail "a frozen gateway was not killed by the watchdog"
[ "$(prop ActiveState)" = active ] && [ "$(prop NRestarts)" = 1 ] ||
    fail "not restarted after the watchdog timeout: $(prop ActiveState), restarts $(prop NRestarts)"
ok "a frozen gateway: watchdog timeout, then restarted (Restart=on-failure)"

systemctl stop watchpost
[ "$(prop Result)" = success ] && [ "$(prop ExecMainStatus)" = 0 ] ||
    fail "stop: result $(prop Result), status $(prop ExecMainStatus)"
ok "systemctl stop: exit status 0"
echo "all checks under systemd passed"
EOF

echo "booting this machine's systemd in a container (about a minute)"
boot --boot >"$work/boot.log" 2>&1 || true
cat "$work/out/check.log" 2>/dev/null || { echo "FAIL: the check never ran:"; cat "$work/boot.log"; exit 1; }
grep -qx 'all checks under systemd passed' "$work/out/check.log" || exit 1
