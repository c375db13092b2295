#!/usr/bin/env bash
# The MQTT-SN gateway against independent clients: mqtt-sn-12 from PyPI (mqtt_sn_pub,
# mqtt_sn_sub) and a raw-UDP client written from the specification in Python
# (scripts/mqttsn_client.py; paho-mqtt for the MQTT side).
#
# Usage: scripts/mqttsn-test.sh [path/to/shardmq]   (default: target/debug/shardmq)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/shardmq}
[ -x "$bin" ] || cargo build -q -p shardmq
python3 -c 'import paho.mqtt' 2>/dev/null || { echo "mqttsn: paho-mqtt missing (run scripts/install-test-deps.sh)" >&2; exit 1; }
venv=target/mqttsn-venv
if [ ! -x "$venv/bin/mqtt_sn_pub" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'mqtt-sn-12==1.0.9'
fi
# A free loopback UDP port for ADVERTISE (the broker sends there; the client listens).
adv=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
. scripts/start-broker.sh
start_broker "$bin" \
  SHARDMQ_MQTT__SN__GATEWAY_ID=5 SHARDMQ_MQTT__SN__ENABLE_QOS3=true \
  SHARDMQ_MQTT__SN__PREDEFINED__7=pre/seven SHARDMQ_MQTT__SN__RETRY_INTERVAL=1s \
  SHARDMQ_MQTT__SN__MAX_RETRIES=2 SHARDMQ_MQTT__SN__ADVERTISE_ADDRESS="127.0.0.1:$adv" \
  SHARDMQ_MQTT__SN__ADVERTISE_DURATION=1s
trap 'kill "$BROKER_PID" 2>/dev/null || true' EXIT
[ -n "$BROKER_SN_PORT" ] || { echo "mqttsn: the gateway did not report its port" >&2; cat "$BROKER_LOG" >&2; exit 1; }
python3 scripts/mqttsn_client.py "$BROKER_SN_PORT" "$BROKER_PORT" "$BROKER_ADMIN_PORT" "$adv" "$venv/bin"
stop_broker
