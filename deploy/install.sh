#!/bin/sh
# Installs the Watchpost gateway as a systemd service on a machine without dpkg: the same files
# in the same places as the Debian package, and the user the unit runs as.
#
#   deploy/install.sh [--root DIR] [BINARY]
#
# BINARY is the gateway to install (default: target/release/watchpost, which
# `cargo build --release -p watchpost` writes). With --root DIR everything goes below DIR
# instead of / (to try the script, or to build an image) and nothing else is touched.
#
# Run it again at any time: it replaces the binary and the unit, and never touches an existing
# /etc/watchpost/watchpost.toml. It needs root (or write access to DIR) and systemd-sysusers.
set -eu

usage() {
    sed -n '2,13s/^# \{0,1\}//p' "$0"
}

root=""
bin=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root)
            [ $# -ge 2 ] || { echo "install.sh: --root needs a directory" >&2; exit 2; }
            root=${2%/}
            shift 2
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            echo "install.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
        *)
            [ -z "$bin" ] || { echo "install.sh: one binary only (see --help)" >&2; exit 2; }
            bin=$1
            shift
            ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
bin=${bin:-$here/../target/release/watchpost}
if [ ! -x "$bin" ]; then
    echo "install.sh: no gateway binary at $bin" >&2
    echo "  build it with: cargo build --release -p watchpost (or give its path)" >&2
    exit 1
fi
version=$("$bin" --version) || { echo "install.sh: $bin does not run on this machine" >&2; exit 1; }
if ! command -v systemd-sysusers >/dev/null; then
    echo "install.sh: systemd-sysusers not found; the unit needs systemd" >&2
    exit 1
fi

say() { echo "  $*"; }
echo "Installing $version${root:+ into $root}"

# A file is replaced by renaming a complete copy over it, so a running gateway keeps its
# binary and no reader ever sees half a file.
put() { # put SOURCE DESTINATION MODE
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.new"
    chmod "$3" "$2.new"
    mv -f "$2.new" "$2"
}

put "$bin" "$root/usr/bin/watchpost" 0755
say "installed /usr/bin/watchpost"

put "$here/watchpost.service" "$root/usr/lib/systemd/system/watchpost.service" 0644
say "installed /usr/lib/systemd/system/watchpost.service"

# The unit runs as the system user watchpost (User=, Group=).
if grep -q '^watchpost:' "$root/etc/passwd" 2>/dev/null; then
    say "user watchpost exists"
else
    mkdir -p "$root/etc"
    systemd-sysusers ${root:+--root="$root"} \
        --inline 'u watchpost - "Watchpost gateway" /var/lib/watchpost'
    say "created system user watchpost"
fi

ids=$(awk -F: '$1 == "watchpost" { print $3 ":" $4 }' "$root/etc/passwd")
[ -n "$ids" ] || { echo "install.sh: no user watchpost in $root/etc/passwd" >&2; exit 1; }

# The configuration may hold the upstream password: root and the service may read it.
config=/etc/watchpost/watchpost.toml
if [ -e "$root$config" ]; then
    say "kept $config (yours; the shipped one is deploy/watchpost.toml)"
else
    put "$here/watchpost.toml" "$root$config" 0640
    chgrp "${ids#*:}" "$root$config"
    say "installed $config (group watchpost, mode 0640)"
fi

# The database lives here (the configuration's data_dir; the unit's StateDirectory= creates it
# too, this one serves `watchpost run` by hand).
data=/var/lib/watchpost
if [ -d "$root$data" ]; then
    say "kept $data"
else
    mkdir -p "$root$data"
    chown "$ids" "$root$data"
    chmod 0750 "$root$data"
    say "created $data (owner watchpost, mode 0750)"
fi

running=""
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "reloaded systemd's unit files"
    if systemctl --quiet is-active watchpost; then running=yes; fi
fi

if ! check=$("$bin" check --config "$root$config" 2>&1); then
    echo "$check" >&2
    echo "install.sh: installed, but $config has errors; fix them before starting" >&2
    exit 1
fi

if [ -n "$running" ]; then
    echo "Done. The running gateway goes on with the old binary until: systemctl restart watchpost"
else
    echo "Done. Next: set the site id and rules in $config, then"
    echo "  systemctl enable --now watchpost"
    echo "  journalctl -u watchpost -f          # its log"
fi
