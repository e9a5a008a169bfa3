#!/bin/sh
# Tests the Debian package and deploy/install.sh on this machine, as CI does (.ci/run):
#
#   deploy/test-package.sh target/debian/watchpost_<version>_<arch>.deb
#
# It installs, upgrades, removes and purges the package with dpkg and runs the installed
# gateway, by hand and under systemd (deploy/test-under-systemd.sh), so it changes the
# machine: run it as root on a CI machine or a throwaway VM, never on a gateway in service. It
# needs dpkg, systemd-analyze (package systemd), systemd-nspawn (systemd-container), setpriv and
# the Mosquitto clients. Every check prints "ok: ..."; the first that fails stops the script with
# "FAIL: ..." and exit status 1.
set -eu

[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: $0 PACKAGE.deb" >&2; exit 2; }
deb=$1
here=$(cd "$(dirname "$0")" && pwd)
config=/etc/watchpost/watchpost.toml
unit=/lib/systemd/system/watchpost.service
work=$(mktemp -d)
gateway_pid=""
cleanup() {
    if [ -n "$gateway_pid" ]; then kill "$gateway_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

if dpkg-query -W watchpost >/dev/null 2>&1; then
    echo "--- purge the watchpost package an earlier run left, to test a first installation"
    dpkg -P watchpost || fail "dpkg -P watchpost"
fi
echo "--- install $deb"
dpkg -i "$deb" || fail "dpkg -i $deb"
version=$(dpkg-deb -f "$deb" Version)
[ "$(dpkg-query -W -f '${Status} ${Version}' watchpost)" = "install ok installed $version" ] ||
    fail "dpkg does not report watchpost $version as installed"
ok "watchpost $version installed ($(wc -c <"$deb") bytes)"

echo "--- files"
[ -x /usr/bin/watchpost ] || fail "/usr/bin/watchpost is missing or not executable"
/usr/bin/watchpost --version >/dev/null || fail "/usr/bin/watchpost does not run"
ok "binary /usr/bin/watchpost: $(/usr/bin/watchpost --version)"
[ -f "$unit" ] || fail "$unit is missing"
dpkg -L watchpost | grep -qx '/usr/lib/systemd/system/watchpost.service' ||
    fail "the unit is not in the package's file list"
ok "unit $unit"
[ -f "$config" ] || fail "$config is missing"
dpkg-query -W -f '${Conffiles}\n' watchpost | grep -q "^ $config " ||
    fail "$config is not a conffile"
[ "$(stat -c '%U:%G %a' "$config")" = "root:watchpost 640" ] ||
    fail "$config is not root:watchpost 640: $(stat -c '%U:%G %a' "$config")"
ok "config $config, a conffile, root:watchpost 640"
[ "$(getent passwd watchpost | cut -d: -f7)" = /usr/sbin/nologin ] ||
    fail "no system user watchpost with shell /usr/sbin/nologin"
[ "$(stat -c '%U:%G %a' /var/lib/watchpost)" = "watchpost:watchpost 750" ] ||
    fail "/var/lib/watchpost is not watchpost:watchpost 750: $(stat -c '%U:%G %a' /var/lib/watchpost)"
ok "system user watchpost, data directory /var/lib/watchpost (watchpost:watchpost 750)"
[ -L /etc/systemd/system/multi-user.target.wants/watchpost.service ] ||
    fail "the unit is not enabled (no multi-user.target.wants link)"
ok "unit enabled for multi-user.target"

echo "--- the unit"
# verify exits 0 on warnings such as unknown keys; any output at all is a failure here.
verify=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify warns: $verify"
ok "systemd-analyze verify: no complaint"
# Offline: no running systemd needed. --threshold=49 fails above 4.9 ("OK" or better).
security=$(systemd-analyze security --offline=true --threshold=49 "$unit" 2>&1) ||
    fail "systemd-analyze security rates the unit above 4.9:
$security"
ok "systemd-analyze security:$(echo "$security" | sed -n 's/.*Overall exposure level for [^:]*://p')"

echo "--- the configuration"
/usr/bin/watchpost check --config "$config" || fail "watchpost check --config $config"
ok "watchpost check accepts $config"

echo "--- the installed gateway, run as the unit runs it"
# User=watchpost, no capabilities, NoNewPrivileges=, UMask=0077, the unit's working
# directory and command line. (systemd itself, hence the sandbox, is not involved here.)
start_gateway() { # start_gateway CONFIG: returns once it is ready, or fails
    setpriv --reuid=watchpost --regid=watchpost --init-groups --no-new-privs \
        --inh-caps=-all --bounding-set=-all \
        sh -c "umask 0077 && cd /var/lib/watchpost && exec /usr/bin/watchpost run --config $1" \
        >"$work/gateway.log" 2>&1 &
    gateway_pid=$!
    deadline=$(($(date +%s) + 30))
    until grep -q ' ready ' "$work/gateway.log"; do
        if ! kill -0 "$gateway_pid" 2>/dev/null; then
            gateway_pid=""
            return 1
        fi
        [ "$(date +%s)" -lt "$deadline" ] || fail "the gateway is not ready after 30 s:
$(cat "$work/gateway.log")"
        sleep 0.2
    done
}
port=1883
data=/var/lib/watchpost
if ! start_gateway "$config"; then
    # Another broker (say a Mosquitto that apt started) may hold port 1883: then the same
    # configuration on another port and, so as not to share a database, another data_dir.
    grep -q 'cannot listen on 0.0.0.0:1883' "$work/gateway.log" ||
        fail "the gateway did not start:
$(cat "$work/gateway.log")"
    port=18883
    data=$work/data
    echo "port 1883 is taken; running $config on port $port with a data_dir of its own"
    install -d -o watchpost -g watchpost -m 0750 "$data"
    chmod 0755 "$work"
    sed -e "s|^listen = \"0.0.0.0:1883\"|listen = \"0.0.0.0:$port\"|" \
        -e "s|^data_dir = .*|data_dir = \"$data\"|" "$config" >"$work/port.toml"
    chmod 0644 "$work/port.toml"
    start_gateway "$work/port.toml" || fail "the gateway did not start:
$(cat "$work/gateway.log")"
fi
ok "gateway ready as user watchpost: $(grep ' ready ' "$work/gateway.log" | sed 's/.* ready //')"
# The shipped configuration admits only named clients. Root adds them while the gateway runs;
# the file must end up readable by the service user, and the gateway picks it up by itself.
running=$config
[ "$port" = 1883 ] || running=$work/port.toml
secret() { /usr/bin/watchpost device add "$@" --config "$running" | sed -n 's/^  secret: //p'; }
device_secret=$(secret package-test) && [ -n "$device_secret" ] || fail "watchpost device add printed no secret"
ops_secret=$(secret package-ops --operator) && [ -n "$ops_secret" ] || fail "watchpost device add --operator printed no secret"
[ "$(stat -c '%U %a' "$data/credentials.toml")" = "watchpost 600" ] ||
    fail "credentials file: $(ls -la "$data/credentials.toml")"
mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t sensors/package-test/temperature -m 1.0 2>/dev/null &&
    fail "an anonymous client could publish"
ok "credentials added by root are the service's (watchpost, 600); anonymous clients are refused"
# A reading of 1.0 raises the shipped "freezing" rule; the alert is published retained.
deadline=$(($(date +%s) + 10))
until mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -i package-test -u package-test -P "$device_secret" \
    -t sensors/package-test/temperature -m 1.0 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "the new device cannot publish to the gateway on port $port"
    sleep 0.2
done
alert=$(mosquitto_sub -h 127.0.0.1 -p "$port" -u package-ops -P "$ops_secret" \
    -t 'alerts/warning/package-test/freezing' -C 1 -W 10) ||
    fail "no retained alert on alerts/warning/package-test/freezing within 10 s"
echo "$alert" | grep -q '"state":"raised"' || fail "unexpected alert document: $alert"
ok "serves MQTT: a reading raised the freezing alert ($alert)"
kill -HUP "$gateway_pid"
deadline=$(($(date +%s) + 10))
until grep -q 'rules reloaded' "$work/gateway.log"; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "no reload within 10 s of SIGHUP"
    sleep 0.2
done
ok "SIGHUP reloads the rules (ExecReload=)"
kill -TERM "$gateway_pid"
wait "$gateway_pid" || fail "the gateway exited with status $? on SIGTERM"
gateway_pid=""
db=$data/watchpost.db
[ "$(stat -c '%U %a' "$db")" = "watchpost 600" ] ||
    fail "$db is not owned by watchpost with mode 600: $(stat -c '%U %a' "$db")"
ok "stopped on SIGTERM; $db is watchpost's, mode 600"

echo "--- the installed unit under a real systemd"
"$here/test-under-systemd.sh" || fail "the unit under systemd (see above)"

echo "--- upgrades and reinstalls: the operator's configuration is kept"
# Two later versions of the package, each shipping a different default configuration.
variant() { # variant SUFFIX MAX_DB_MB: prints the path of the package it builds
    dpkg-deb -R "$deb" "$work/$1"
    sed -i "s/^Version: .*/Version: $version+$1/" "$work/$1/DEBIAN/control"
    sed -i "s/^max_db_mb = 1024 /max_db_mb = $2 /" "$work/$1/etc/watchpost/watchpost.toml"
    dpkg-deb -b --root-owner-group "$work/$1" "$work/$1.deb" >/dev/null
    echo "$work/$1.deb"
}
next=$(variant next1 2048)
later=$(variant next2 4096)
installed() { [ "$(dpkg-query -W -f '${Version}' watchpost)" = "$1" ] || fail "watchpost $1 is not installed"; }
mode() { [ "$(stat -c '%U:%G %a' "$config")" = "root:watchpost 640" ] ||
    fail "$1: $config is $(stat -c '%U:%G %a' "$config"), not root:watchpost 640"; }

dpkg -i "$next" || fail "dpkg -i (upgrade to $version+next1)"
installed "$version+next1"
grep -q '^max_db_mb = 2048 ' "$config" || fail "the upgrade did not update the unedited $config"
mode "the upgrade"
ok "an upgrade replaces an unedited $config with its own, root:watchpost 640 still"

marker="# edited by the operator $(date +%s)"
sed -i 's/^id = "site-1"/id = "edited-site"/' "$config"
echo "$marker" >>"$config"
dpkg -i "$next" || fail "dpkg -i $next (reinstall)"
tail -n 1 "$config" | grep -qx "$marker" || fail "reinstalling replaced the edited $config"
grep -q '^id = "edited-site"' "$config" || fail "reinstalling replaced the edited $config"
ok "reinstalling the same package keeps the edited $config"

# The shipped configuration changed as well: dpkg would ask; --force-confold is the answer an
# unattended upgrade gives. The operator's file stays, the new one is put beside it.
dpkg -i --force-confold "$later" || fail "dpkg -i (upgrade to $version+next2)"
installed "$version+next2"
tail -n 1 "$config" | grep -qx "$marker" || fail "the upgrade replaced the edited $config"
grep -q '^max_db_mb = 4096 ' "$config.dpkg-dist" || fail "the upgrade's configuration is not in $config.dpkg-dist"
mode "the upgrade"
ok "an upgrade keeps the edited $config; the new default is $config.dpkg-dist"
rm -f "$config.dpkg-dist"

echo "--- install.sh into a temporary root"
root="$work/root"
"$here/install.sh" --root "$root" /usr/bin/watchpost >"$work/install.log" 2>&1 ||
    fail "install.sh --root $root:
$(cat "$work/install.log")"
cmp -s "$root/usr/bin/watchpost" /usr/bin/watchpost || fail "install.sh: binary"
cmp -s "$root/usr/lib/systemd/system/watchpost.service" "$here/watchpost.service" || fail "install.sh: unit"
cmp -s "$root$config" "$here/watchpost.toml" || fail "install.sh: configuration"
[ "$(stat -c '%U %a' "$root$config")" = "root 640" ] || fail "install.sh: configuration's mode"
grep -q '^watchpost:x:[0-9]*:[0-9]*:.*:/var/lib/watchpost:/usr/sbin/nologin$' "$root/etc/passwd" ||
    fail "install.sh: no user watchpost in $root/etc/passwd"
uid=$(awk -F: '$1 == "watchpost" { print $3 }' "$root/etc/passwd")
gid=$(awk -F: '$1 == "watchpost" { print $4 }' "$root/etc/passwd")
[ "$(stat -c '%g' "$root$config")" = "$gid" ] || fail "install.sh: configuration's group"
[ "$(stat -c '%u %a' "$root/var/lib/watchpost")" = "$uid 750" ] || fail "install.sh: data directory"
grep -q 'systemctl enable --now watchpost' "$work/install.log" || fail "install.sh: no next step"
ok "install.sh --root: binary, unit, configuration, user, data directory, next step"
echo "# edited" >>"$root$config"
"$here/install.sh" --root "$root" /usr/bin/watchpost >"$work/install.log" 2>&1 ||
    fail "install.sh, second run:
$(cat "$work/install.log")"
tail -n 1 "$root$config" | grep -qx '# edited' || fail "install.sh replaced an existing configuration"
grep -q "kept $config" "$work/install.log" || fail "install.sh does not say it kept the configuration"
ok "install.sh again: keeps the existing configuration, says so"

echo "--- remove and purge"
dpkg -r watchpost || fail "dpkg -r watchpost"
[ ! -e /usr/bin/watchpost ] || fail "dpkg -r left /usr/bin/watchpost"
[ -f "$config" ] || fail "dpkg -r removed $config (only purge may)"
ok "remove: binary gone, configuration kept"
dpkg -P watchpost || fail "dpkg -P watchpost"
[ ! -e "$config" ] || fail "purge left $config"
[ ! -e /var/lib/watchpost ] || fail "purge left /var/lib/watchpost"
[ ! -e /etc/systemd/system/multi-user.target.wants/watchpost.service ] || fail "purge left the unit enabled"
! dpkg-statoverride --list "$config" >/dev/null || fail "purge left the statoverride of $config"
ok "purge: configuration, data and enablement gone"

echo "all package checks passed"
