#!/usr/bin/env bash
# The TCP gateway against an independent client written from the protocol's description in
# Python (scripts/tcpgw_client.py, raw sockets; paho-mqtt for the MQTT side): connect,
# credentials, data both ways, PING, takeover, bad version and frames, idle and keepalive
# timeouts.
#
# Usage: scripts/tcpgw-test.sh [path/to/shardmq]   (default: target/debug/shardmq)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/shardmq}
[ -x "$bin" ] || cargo build -q -p shardmq
python3 -c 'import paho.mqtt' 2>/dev/null || { echo "tcpgw: paho-mqtt missing (run scripts/install-test-deps.sh)" >&2; exit 1; }
dir=$(mktemp -d)
"$bin" passwd "$dir/passwd" gw-user --password gw-secret-1 2>/dev/null
. scripts/start-broker.sh
start_broker "$bin" \
  SHARDMQ_AUTH__PASSWORD_FILE="$dir/passwd" SHARDMQ_AUTH__ALLOW_ANONYMOUS=false \
  SHARDMQ_TCP__PROTO__IDLE_TIMEOUT=2s SHARDMQ_TCP__PROTO__MAX_PACKET_SIZE=1000
trap 'kill "$BROKER_PID" 2>/dev/null || true; rm -rf "$dir"' EXIT
[ -n "$BROKER_TCPGW_PORT" ] || { echo "tcpgw: the gateway did not report its port" >&2; cat "$BROKER_LOG" >&2; exit 1; }
python3 scripts/tcpgw_client.py "$BROKER_TCPGW_PORT" "$BROKER_PORT" gw-user gw-secret-1
stop_broker
