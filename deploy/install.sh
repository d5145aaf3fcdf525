#!/bin/sh
# Installs hj212-gateway for the packaged systemd unit: the binary, the unit,
# and the config (never over an existing one), and creates the system user and
# group hj212-gateway the unit runs as. Safe to run again (an upgrade replaces
# the binary and the unit, keeps the config).
#
#   cargo build --release && sudo deploy/install.sh
#
# Layout (see README, "Deploy (systemd)"):
#   $PREFIX/bin/hj212-gateway                 0755 root:root
#   $UNITDIR/hj212-gateway.service            0644 root:root
#   $SYSCONFDIR/hj212-gateway/                0755 root:root
#   $SYSCONFDIR/hj212-gateway/gateway.toml    0640 root:hj212-gateway
# The group can read the config and (through the unit's UMask=0027) the frame
# log; the service cannot change its own config.
#
# Variables: DESTDIR (a staging root; accounts are still created on this
# system unless NO_ACCOUNTS=1), PREFIX (/usr/local), BINDIR ($PREFIX/bin),
# SYSCONFDIR (/etc), UNITDIR (/etc/systemd/system), BIN (the binary to install,
# default target/release/hj212-gateway of this checkout).
set -eu

NAME=hj212-gateway
here=$(cd "$(dirname "$0")" && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
BINDIR=${BINDIR:-$PREFIX/bin}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-/etc/systemd/system}
BIN=${BIN:-$here/../target/release/$NAME}
NO_ACCOUNTS=${NO_ACCOUNTS:-}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

[ -x "$BIN" ] || die "$BIN: no binary there; run \`cargo build --release\` first or set BIN="
[ "$(id -u)" -eq 0 ] || die "run as root: the config is given to the group $NAME"

if [ -z "$NO_ACCOUNTS" ]; then
    if ! getent group "$NAME" >/dev/null; then
        groupadd --system "$NAME"
        echo "created system group $NAME"
    fi
    if ! getent passwd "$NAME" >/dev/null; then
        useradd --system --gid "$NAME" --home-dir "/var/lib/$NAME" --no-create-home \
            --shell /usr/sbin/nologin --comment "HJ 212 gateway" "$NAME"
        echo "created system user $NAME"
    fi
fi
getent group "$NAME" >/dev/null ||
    die "no group $NAME on this system (NO_ACCOUNTS is set): create it, then run again"

install -d -m 0755 "$DESTDIR$BINDIR" "$DESTDIR$UNITDIR" "$DESTDIR$SYSCONFDIR/$NAME"
install -m 0755 "$BIN" "$DESTDIR$BINDIR/$NAME"
echo "installed $DESTDIR$BINDIR/$NAME"

# The unit names the binary and the config directory; both follow the variables.
unit=$DESTDIR$UNITDIR/$NAME.service
sed -e "s|/usr/local/bin/$NAME|$BINDIR/$NAME|" "$here/$NAME.service" >"$unit.tmp"
chmod 0644 "$unit.tmp"
mv "$unit.tmp" "$unit"
echo "installed $unit"

config=$DESTDIR$SYSCONFDIR/$NAME/gateway.toml
if [ -e "$config" ]; then
    echo "kept $config (existing config; deploy/gateway.toml has the current defaults)"
else
    install -m 0640 -o root -g "$NAME" "$here/gateway.toml" "$config"
    echo "installed $config (0640 root:$NAME)"
fi

cat <<EOF

Next steps:
  1. Edit $SYSCONFDIR/$NAME/gateway.toml, then check it as the service sees it:
       setpriv --reuid=$NAME --regid=$NAME --init-groups $BINDIR/$NAME check-config $SYSCONFDIR/$NAME/gateway.toml
  2. systemctl daemon-reload && systemctl enable --now $NAME
  3. journalctl -fu $NAME
  4. Let operators run the read commands (stats, tail, export, verify...):
       usermod -aG $NAME <operator>   (then log in again)
EOF
