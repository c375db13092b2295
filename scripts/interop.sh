#!/usr/bin/env bash
# Interoperability with independent, third-party MQTT clients from the registries:
# mosquitto_pub/mosquitto_sub (Debian package mosquitto-clients) and paho-mqtt (PyPI).
# QoS 0/1/2 round trips, retained messages, wills, protocol levels 3 (3.1) and 4 (3.1.1).
#
# Usage: scripts/interop.sh [path/to/shardmq]   (default: target/debug/shardmq, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/shardmq}
[ -x "$bin" ] || cargo build -q -p shardmq
for tool in mosquitto_pub mosquitto_sub python3; do
  command -v "$tool" >/dev/null || { echo "interop: $tool missing (run scripts/install-test-deps.sh)" >&2; exit 1; }
done
python3 -c 'import paho.mqtt' 2>/dev/null || { echo "interop: paho-mqtt missing (run scripts/install-test-deps.sh)" >&2; exit 1; }

. scripts/start-broker.sh
start_broker "$bin"
trap 'kill "$BROKER_PID" 2>/dev/null || true' EXIT
H=(-h 127.0.0.1 -p "$BROKER_PORT")
fail=0
check() { # name expected actual
  if [ "$2" = "$3" ]; then echo "ok   $1"; else echo "FAIL $1: expected [$2], got [$3]"; fail=1; fi
}

# Round trips at every QoS, both protocol levels, subscriber and publisher on separate clients.
for v in mqttv31 mqttv311; do
  for q in 0 1 2; do
    out=$(mktemp)
    mosquitto_sub "${H[@]}" -V "$v" -q "$q" -t "interop/$v/$q" -C 1 -W 10 -F '%q %t %p' >"$out" &
    sub=$!
    sleep 0.3
    mosquitto_pub "${H[@]}" -V "$v" -q "$q" -t "interop/$v/$q" -m "hello-$v-$q"
    wait "$sub" || true
    check "mosquitto $v QoS $q round trip" "$q interop/$v/$q hello-$v-$q" "$(cat "$out")"
    rm -f "$out"
  done
done

# Retained: set, replace, then a new subscriber gets the latest with the retain flag; clear.
mosquitto_pub "${H[@]}" -q 1 -r -t interop/retained -m first
mosquitto_pub "${H[@]}" -q 1 -r -t interop/retained -m second
check "mosquitto retained replace" "1 interop/retained second" \
  "$(mosquitto_sub "${H[@]}" -t 'interop/#' -C 1 -W 10 -F '%r %t %p')"
mosquitto_pub "${H[@]}" -q 1 -r -t interop/retained -n
check "mosquitto retained clear" "" "$(mosquitto_sub "${H[@]}" -t interop/retained -W 1 -F '%p' 2>/dev/null || true)"

# Will: a client killed without DISCONNECT has its will published; a clean exit does not.
for v in mqttv31 mqttv311; do
  out=$(mktemp)
  mosquitto_sub "${H[@]}" -V "$v" -q 1 -t "interop/will/$v" -C 1 -W 10 -F '%t %p' >"$out" &
  watcher=$!
  sleep 0.3
  mosquitto_sub "${H[@]}" -V "$v" -i "doomed-$v" -t nothing --will-topic "interop/will/$v" --will-payload "gone-$v" --will-qos 1 >/dev/null &
  doomed=$!
  sleep 0.5
  kill -9 "$doomed"
  wait "$doomed" 2>/dev/null || true
  wait "$watcher" || true
  check "mosquitto $v will on abnormal close" "interop/will/$v gone-$v" "$(cat "$out")"
  rm -f "$out"
done
out=$(mktemp)
mosquitto_sub "${H[@]}" -t interop/will/polite -W 2 -F '%p' >"$out" 2>/dev/null &
watcher=$!
sleep 0.3
mosquitto_pub "${H[@]}" -t interop/other -m x --will-topic interop/will/polite --will-payload nope
wait "$watcher" || true
check "mosquitto no will after DISCONNECT" "" "$(cat "$out")"
rm -f "$out"

python3 scripts/interop_paho.py 127.0.0.1 "$BROKER_PORT" || fail=1

trap - EXIT
stop_broker || fail=1
if [ "$fail" -ne 0 ]; then
  echo "interop: FAILED"
  exit 1
fi
echo "interop: all checks passed"
