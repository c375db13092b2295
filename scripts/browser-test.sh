#!/usr/bin/env bash
# A real browser speaking MQTT over WebSocket and over WebSocket over TLS: headless Chromium
# (Debian package chromium) runs MQTT.js (npm package mqtt) in a page against a ShardMQ started
# here on loopback ports (its TLS certificate from scripts/gen-test-certs.sh), and exchanges
# QoS 1 messages with a TCP client. npm packages go to target/browser-test.
#
# Usage: scripts/browser-test.sh [path/to/shardmq]   (default target/debug/shardmq, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/shardmq}
[ -x "$bin" ] || cargo build -q -p shardmq
command -v chromium >/dev/null || { echo "browser: chromium missing (run scripts/install-test-deps.sh)" >&2; exit 1; }
dir=target/browser-test
mkdir -p "$dir"
# The test runs from there, next to its node_modules (ES modules resolve from their own place).
cp scripts/browser/package.json scripts/browser/package-lock.json scripts/browser/ws-test.mjs "$dir/"
(cd "$dir" && npm ci --silent --no-audit --no-fund >/dev/null)

# shellcheck source=scripts/start-broker.sh
. scripts/start-broker.sh
certs=$(mktemp -d)
scripts/gen-test-certs.sh "$certs" >/dev/null
# What the browser trusts: the broker's public key (base64 SHA-256 of its SubjectPublicKeyInfo).
spki=$(openssl x509 -in "$certs/server.crt" -pubkey -noout | openssl pkey -pubin -outform der |
  openssl dgst -sha256 -binary | base64)
start_broker "$bin" \
  SHARDMQ_LISTENER__WSS__EXTERNAL__CERTFILE="$certs/server.crt" \
  SHARDMQ_LISTENER__WSS__EXTERNAL__KEYFILE="$certs/server.key"
trap 'stop_broker >/dev/null 2>&1 || true; rm -rf "$certs"' EXIT
[ -n "$BROKER_WSS_PORT" ] || { echo "browser: the WSS listener did not start" >&2; exit 1; }
status=0
node "$dir/ws-test.mjs" "$BROKER_PORT" "$BROKER_WS_PORT" "$BROKER_WSS_PORT" "$spki" || status=1
trap - EXIT
stop_broker || status=1
rm -rf "$certs"
exit "$status"
