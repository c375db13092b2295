#!/usr/bin/env bash
# Checks the Debian package: builds it (from the debug build unless given a .deb), installs it
# with dpkg into a scratch root, checks what it put where, then runs the installed broker with
# the installed configuration: `--check`, and a start on a loopback port that an MQTT client
# connects to before SIGTERM stops it.
#
# Usage: scripts/package-check.sh [path/to/shardmq.deb]
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-$(scripts/package.sh --debug)}
root=$(mktemp -d)
log=$(mktemp)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$root" "$log"
}
trap cleanup EXIT

fail() { echo "package check: $*" >&2; [ -s "$log" ] && sed 's/^/  broker: /' "$log" >&2; exit 1; }

# A scratch root with an empty dpkg database; maintainer scripts run outside it (DPKG_ROOT set).
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/var/lib/dpkg/triggers"
: >"$root/var/lib/dpkg/status"
# (The scratch root has no libc6 package: dpkg's note about the dependency is expected.)
dpkg --root="$root" --force-script-chrootless --force-depends --log=/dev/null -i "$deb" >"$log" 2>&1 \
  || fail "dpkg -i into the scratch root failed: $(cat "$log")"
: >"$log"
dpkg --root="$root" -s shardmq | grep -q '^Status: install ok installed' || fail "not installed"
for f in usr/bin/shardmq etc/shardmq/shardmq.toml etc/shardmq/profiles/node.toml \
  etc/shardmq/profiles/baremetal-16core.toml lib/systemd/system/shardmq.service \
  usr/share/doc/shardmq/configuration.md usr/share/shardmq/lwm2m_xml/3.xml; do
  [ -e "$root/$f" ] || fail "/$f missing"
done
dpkg-deb -f "$deb" Depends | grep -q '^libc6 (>= ' || fail "no libc6 dependency"
grep -q '^ExecReload=/bin/kill -HUP \$MAINPID' "$root/lib/systemd/system/shardmq.service" \
  || fail "the unit has no ExecReload"
if command -v systemd-analyze >/dev/null; then
  # Only the unit's own syntax: the binary is not at /usr/bin on this host.
  if systemd-analyze verify "$root/lib/systemd/system/shardmq.service" 2>&1 \
    | grep -v 'is not executable\|No such file' | grep -q .; then
    systemd-analyze verify "$root/lib/systemd/system/shardmq.service" >&2 || true
    fail "systemd-analyze finds fault with the unit"
  fi
fi

bin="$root/usr/bin/shardmq"
args=(--config "$root/etc/shardmq/shardmq.toml" --profiles-dir "$root/etc/shardmq/profiles" --profile node)
"$bin" --version | grep -q '^commit:' || fail "--version names no commit"
"$bin" "${args[@]}" --check | grep -q '^configuration OK for this host' || fail "--check refused the installed configuration"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
env -u RUST_LOG SHARDMQ_LISTENER__WS__EXTERNAL__ENABLE=false SHARDMQ_ADMIN__BIND=127.0.0.1:0 \
  SHARDMQ_TCP__LISTENER__EXTERNAL__BIND=127.0.0.1:0 SHARDMQ_MQTT__SN__BIND=127.0.0.1 \
  SHARDMQ_MQTT__SN__PORT=0 SHARDMQ_LWM2M__BIND=127.0.0.1 SHARDMQ_LWM2M__PORT=0 \
  SHARDMQ_LWM2M__XML_DIR="$root/usr/share/shardmq/lwm2m_xml" \
  "$bin" "${args[@]}" --bind 127.0.0.1 -p "$port" 2>"$log" &
pid=$!
for _ in $(seq 100); do
  grep -q "listening for MQTT.*127.0.0.1:$port" "$log" && break
  kill -0 "$pid" 2>/dev/null || fail "the installed broker exited"
  sleep 0.1
done
grep -q "listening for MQTT.*127.0.0.1:$port" "$log" || fail "the installed broker does not listen on 127.0.0.1:$port"
if command -v mosquitto_pub >/dev/null; then
  mosquitto_pub -h 127.0.0.1 -p "$port" -t package/check -m ok -q 1 || fail "mosquitto_pub could not publish"
else
  # CONNECT (clean, keepalive 10, client id "pkg") and expect CONNACK 0.
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  printf '\x10\x0f\x00\x04MQTT\x04\x02\x00\x0a\x00\x03pkg' >&3
  reply=$(head -c 4 <&3 | od -An -tx1 | tr -d ' \n')
  exec 3>&-
  [ "$reply" = "20020000" ] || fail "CONNACK was $reply"
fi
kill -TERM "$pid"
wait "$pid" || fail "the installed broker did not stop cleanly on SIGTERM"
pid=
echo "package check: $(basename "$deb") installs, checks its configuration, serves MQTT and stops"
