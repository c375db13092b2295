#!/usr/bin/env bash
# The LwM2M gateway against an independent device on aiocoap (PyPI), written from the LwM2M
# specification (scripts/lwm2m_device.py; paho-mqtt for the MQTT application): as a 1.0
# device speaking TLV only and a 1.1 device speaking SenML JSON only; reads, writes, executes,
# discover, attributes, observe and notifications, create and delete, updates,
# deregistration, lifetime expiry and queue mode.
#
# Usage: scripts/lwm2m-test.sh [path/to/shardmq]   (default: target/debug/shardmq)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/shardmq}
[ -x "$bin" ] || cargo build -q -p shardmq
python3 -c 'import paho.mqtt' 2>/dev/null || { echo "lwm2m: paho-mqtt missing (run scripts/install-test-deps.sh)" >&2; exit 1; }
venv=target/lwm2m-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import aiocoap' 2>/dev/null; then
  python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q 'aiocoap==0.4.17'
fi
. scripts/start-broker.sh
start_broker "$bin" SHARDMQ_LWM2M__QMODE_TIME_WINDOW=2s SHARDMQ_LWM2M__LIFETIME_MIN=1s
trap 'kill "$BROKER_PID" 2>/dev/null || true' EXIT
[ -n "$BROKER_LWM2M_PORT" ] || { echo "lwm2m: the gateway did not report its port" >&2; cat "$BROKER_LOG" >&2; exit 1; }
"$venv/bin/python" scripts/lwm2m_device.py "$BROKER_LWM2M_PORT" "$BROKER_PORT"
stop_broker
