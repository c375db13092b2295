#!/usr/bin/env bash
# The LwM2M gateway against an independent device on aiocoap (PyPI), written from the LwM2M
# specification (scripts/lwm2m_device.py; paho-mqtt for the MQTT application): as a 1.0
# device speaking TLV only and a 1.1 device speaking SenML JSON only; reads, writes, executes,
# discover, attributes, observe and notifications, create and delete, updates,
# deregistration, lifetime expiry and queue mode; then DTLS 1.2 handshakes with openssl
# s_client against the DTLS port (a PSK, a wrong PSK, an ECDSA certificate).
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
# DTLS: a PSK table and an ECDSA certificate, for the handshake checks with openssl s_client.
dir=$(mktemp -d)
echo "dev1:000102030405060708090a0b0c0d0e0f" >"$dir/psk"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/srv.key" \
  -out "$dir/srv.crt" -days 2 -subj /CN=localhost 2>/dev/null
. scripts/start-broker.sh
start_broker "$bin" SHARDMQ_LWM2M__QMODE_TIME_WINDOW=2s SHARDMQ_LWM2M__LIFETIME_MIN=1s \
  SHARDMQ_LWM2M__PSK_FILE="$dir/psk" SHARDMQ_LWM2M__CERTFILE="$dir/srv.crt" \
  SHARDMQ_LWM2M__KEYFILE="$dir/srv.key" SHARDMQ_LWM2M__DTLS_PORT=0
trap 'kill "$BROKER_PID" 2>/dev/null || true; rm -rf "$dir"' EXIT
[ -n "$BROKER_LWM2M_PORT" ] || { echo "lwm2m: the gateway did not report its port" >&2; cat "$BROKER_LOG" >&2; exit 1; }
"$venv/bin/python" scripts/lwm2m_device.py "$BROKER_LWM2M_PORT" "$BROKER_PORT"
dtls=$(sed -n 's/.*listening for LwM2M over CoAP over DTLS.* addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$BROKER_LOG" | head -n 1)
[ -n "$dtls" ] || { echo "lwm2m: the DTLS socket did not report its port" >&2; exit 1; }
handshake() { (sleep 1) | timeout 10 openssl s_client -dtls1_2 -connect "127.0.0.1:$dtls" "$@" 2>&1 || true; }
out=$(handshake -psk 000102030405060708090a0b0c0d0e0f -psk_identity dev1 -cipher PSK-AES128-CCM8)
echo "$out" | grep -q 'Cipher is PSK-AES128-CCM8' || { echo "FAIL openssl DTLS 1.2 PSK handshake: $out" >&2; exit 1; }
echo "ok   openssl s_client -dtls1_2 with a PSK: TLS_PSK_WITH_AES_128_CCM_8"
out=$(handshake -psk ffffffffffffffffffffffffffffffff -psk_identity dev1 -cipher PSK-AES128-CCM8)
if echo "$out" | grep -q 'Cipher is PSK'; then echo "FAIL a wrong PSK was accepted" >&2; exit 1; fi
echo "ok   a wrong PSK is refused"
out=$(handshake -CAfile "$dir/srv.crt")
echo "$out" | grep -q 'Cipher is ECDHE-ECDSA-AES' && echo "$out" | grep -q 'Verify return code: 0' \
  || { echo "FAIL openssl DTLS 1.2 certificate handshake: $out" >&2; exit 1; }
echo "ok   openssl s_client -dtls1_2 with the ECDSA certificate: $(echo "$out" | sed -n 's/.*Cipher is //p' | head -n 1)"
stop_broker
