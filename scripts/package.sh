#!/usr/bin/env bash
# Builds the Debian package target/debian/shardmq_<version>_<arch>.deb with dpkg-deb.
#
# It installs the binary (/usr/bin/shardmq), the configuration (/etc/shardmq/shardmq.toml and
# /etc/shardmq/profiles/, kept as conffiles across upgrades), the systemd unit
# (/lib/systemd/system/shardmq.service, not enabled), the LwM2M object definitions
# (/usr/share/shardmq/lwm2m_xml/) and the docs (/usr/share/doc/shardmq/);
# its postinst creates the system user `shardmq`. See docs/tuning.md (running as a service).
#
# Usage: scripts/package.sh            (release build)
#        scripts/package.sh --debug    (packages the debug build: for the CI check only)
# Prints the path of the package.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v dpkg-deb >/dev/null || { echo "needs dpkg-deb (a Debian or Ubuntu host)" >&2; exit 1; }
if [ "${1:-}" = "--debug" ]; then
  cargo build -q -p shardmq
  bin=target/debug/shardmq
else
  cargo build --release -q -p shardmq
  bin=target/release/shardmq
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' broker/Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
# The newest glibc symbol version the binary needs.
glibc=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

install -D -m 0755 "$bin" "$root/usr/bin/shardmq"
install -D -m 0644 configs/package/shardmq.toml "$root/etc/shardmq/shardmq.toml"
install -D -m 0644 configs/package/node.toml "$root/etc/shardmq/profiles/node.toml"
for p in configs/profiles/*.toml; do
  install -D -m 0644 "$p" "$root/etc/shardmq/profiles/$(basename "$p")"
done
install -D -m 0644 configs/systemd/shardmq.service "$root/lib/systemd/system/shardmq.service"
for x in configs/lwm2m_xml/*; do
  install -D -m 0644 "$x" "$root/usr/share/shardmq/lwm2m_xml/$(basename "$x")"
done
doc="$root/usr/share/doc/shardmq"
install -D -m 0644 README.md "$doc/README.md"
install -D -m 0644 configs/default.toml "$doc/default.toml"
for d in configuration operations security tuning; do
  install -D -m 0644 "docs/$d.md" "$doc/$d.md"
done

mkdir -p "$root/DEBIAN"
(cd "$root" && find etc -type f | sed 's|^|/|' | sort) >"$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: shardmq
Version: $version
Architecture: $arch
Maintainer: ShardMQ developers <shardmq@localhost>
Installed-Size: $size
Depends: libc6 (>= $glibc)
Section: net
Priority: optional
Description: MQTT broker on a sharded thread-per-core runtime
 ShardMQ speaks MQTT 3.1 and 3.1.1 over TCP, TLS and WebSocket, on one shard per CPU core
 (glommio, io_uring; Linux 5.8 or newer). It ships a systemd unit (not enabled), an
 admin HTTP API on 127.0.0.1:18083 and the "shardmq ctl" command line.
CONTROL
cat >"$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
# Creates the system user the service runs as (not in a scratch root: DPKG_ROOT is set there).
set -e
if [ "$1" = "configure" ] && [ -z "${DPKG_ROOT:-}" ]; then
  if ! getent passwd shardmq >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin shardmq
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
  fi
fi
exit 0
POSTINST
chmod 0755 "$root/DEBIAN/postinst"
mkdir -p target/debian
out="target/debian/shardmq_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$root" "$out" >/dev/null
echo "$out"
