#!/usr/bin/env bash
# A real browser speaking MQTT over WebSocket: headless Chromium (Debian package chromium) runs
# MQTT.js (npm package mqtt) in a page against a ShardMQ started here on loopback ports, and
# exchanges QoS 1 messages with a TCP client. npm packages go to target/browser-test.
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
start_broker "$bin"
trap 'stop_broker >/dev/null 2>&1 || true' EXIT
status=0
node "$dir/ws-test.mjs" "$BROKER_PORT" "$BROKER_WS_PORT" || status=1
trap - EXIT
stop_broker || status=1
exit "$status"
