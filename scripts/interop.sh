#!/usr/bin/env bash
# Interoperability with independent, third-party MQTT clients from the registries:
# mosquitto_pub/mosquitto_sub (Debian package mosquitto-clients) and paho-mqtt (PyPI).
# QoS 0/1/2 round trips, retained messages, wills, protocol levels 3 (3.1) and 4 (3.1.1), and
# mosquitto_pub/sub over TLS (--cafile, with certificates from scripts/gen-test-certs.sh); the
# admin API with curl, as docs/operations.md shows it, beside mosquitto clients.
#
# Usage: scripts/interop.sh [path/to/shardmq]   (default: target/debug/shardmq, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/shardmq}
[ -x "$bin" ] || cargo build -q -p shardmq
for tool in mosquitto_pub mosquitto_sub mosquitto_passwd python3 curl jq; do
  command -v "$tool" >/dev/null || { echo "interop: $tool missing (run scripts/install-test-deps.sh)" >&2; exit 1; }
done
python3 -c 'import paho.mqtt' 2>/dev/null || { echo "interop: paho-mqtt missing (run scripts/install-test-deps.sh)" >&2; exit 1; }

certs=$(mktemp -d)
scripts/gen-test-certs.sh "$certs" >/dev/null
# A user made by Mosquitto's own tool; anonymous clients stay welcome on loopback (default).
: >"$certs/passwd"
mosquitto_passwd -b "$certs/passwd" interop-user interop-pass
. scripts/start-broker.sh
start_broker "$bin" \
  SHARDMQ_LISTENER__SSL__EXTERNAL__CERTFILE="$certs/server.crt" \
  SHARDMQ_LISTENER__SSL__EXTERNAL__KEYFILE="$certs/server.key" \
  SHARDMQ_AUTH__PASSWORD_FILE="$certs/passwd"
trap 'kill "$BROKER_PID" 2>/dev/null || true; rm -rf "$certs"' EXIT
H=(-h 127.0.0.1 -p "$BROKER_PORT")
fail=0
check() { # name expected actual
  if [ "$2" = "$3" ]; then echo "ok   $1"; else echo "FAIL $1: expected [$2], got [$3]"; fail=1; fi
}

# watch OUT mosquitto_sub-args...: starts mosquitto_sub in the background (pid in WATCHER) and
# returns once the broker has acknowledged its subscription, so nothing published afterwards
# can be missed; `seen OUT` then prints what it received (without its debug lines).
watch() {
  local out=$1
  shift
  stdbuf -oL mosquitto_sub -d "$@" >"$out" 2>&1 &
  WATCHER=$!
  for _ in $(seq 1 200); do
    grep -q "received SUBACK" "$out" && return 0
    kill -0 "$WATCHER" 2>/dev/null || break
    sleep 0.05
  done
  echo "FAIL mosquitto_sub $* got no SUBACK"
  fail=1
}
seen() { grep -v -E '^(Client |Subscribed )' "$1" || true; }

# Round trips at every QoS, both protocol levels, subscriber and publisher on separate clients.
for v in mqttv31 mqttv311; do
  for q in 0 1 2; do
    out=$(mktemp)
    watch "$out" "${H[@]}" -V "$v" -q "$q" -t "interop/$v/$q" -C 1 -W 10 -F '%q %t %p'
    mosquitto_pub "${H[@]}" -V "$v" -q "$q" -t "interop/$v/$q" -m "hello-$v-$q"
    wait "$WATCHER" || true
    check "mosquitto $v QoS $q round trip" "$q interop/$v/$q hello-$v-$q" "$(seen "$out")"
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
  watch "$out" "${H[@]}" -V "$v" -q 1 -t "interop/will/$v" -C 1 -W 10 -F '%t %p'
  doomed_out=$(mktemp)
  stdbuf -oL mosquitto_sub -d "${H[@]}" -V "$v" -i "doomed-$v" -t nothing --will-topic "interop/will/$v" --will-payload "gone-$v" --will-qos 1 >"$doomed_out" 2>&1 &
  doomed=$!
  for _ in $(seq 1 200); do grep -q "received SUBACK" "$doomed_out" && break; sleep 0.05; done
  kill -9 "$doomed"
  wait "$doomed" 2>/dev/null || true
  wait "$WATCHER" || true
  check "mosquitto $v will on abnormal close" "interop/will/$v gone-$v" "$(seen "$out")"
  rm -f "$out" "$doomed_out"
done
out=$(mktemp)
watch "$out" "${H[@]}" -t interop/will/polite -W 2 -F '%p'
mosquitto_pub "${H[@]}" -t interop/other -m x --will-topic interop/will/polite --will-payload nope
wait "$WATCHER" || true
check "mosquitto no will after DISCONNECT" "" "$(seen "$out" | grep -v -i 'timed out' || true)"
rm -f "$out"

# Credentials from a mosquitto_passwd file: the right password publishes, a wrong one is
# refused (CONNACK 0x04, "bad user name or password").
out=$(mktemp)
watch "$out" "${H[@]}" -u interop-user -P interop-pass -q 1 -t interop/auth -C 1 -W 10 -F '%t %p'
mosquitto_pub "${H[@]}" -u interop-user -P interop-pass -q 1 -t interop/auth -m with-password
wait "$WATCHER" || true
check "mosquitto with a password" "interop/auth with-password" "$(seen "$out")"
rm -f "$out"
refused=$(mosquitto_pub "${H[@]}" -u interop-user -P wrong -t interop/auth -m x 2>&1 || true)
case "$refused" in
  *"username or password"* | *"user name or password"*) check "mosquitto wrong password refused" refused refused ;;
  *) check "mosquitto wrong password refused" refused "[$refused]" ;;
esac

# $SYS: retained, so a new subscriber gets the version at once.
check "mosquitto \$SYS/broker/version" "ShardMQ" \
  "$(mosquitto_sub "${H[@]}" -t '$SYS/broker/version' -C 1 -W 10 | cut -d' ' -f1)"

# Over TLS: mosquitto_pub/sub check the broker's certificate against the test CA (as
# localhost, a name the certificate carries); TLS to TCP and back at QoS 1.
[ -n "$BROKER_TLS_PORT" ] || { echo "FAIL the TLS listener did not start"; fail=1; }
T=(-h localhost -p "$BROKER_TLS_PORT" --cafile "$certs/ca.crt")
out=$(mktemp)
watch "$out" "${T[@]}" -q 1 -t interop/tls/in -C 1 -W 10 -F '%q %t %p'
mosquitto_pub "${H[@]}" -q 1 -t interop/tls/in -m from-tcp
wait "$WATCHER" || true
check "mosquitto TCP -> TLS QoS 1" "1 interop/tls/in from-tcp" "$(seen "$out")"
watch "$out" "${H[@]}" -q 1 -t interop/tls/out -C 1 -W 10 -F '%q %t %p'
mosquitto_pub "${T[@]}" -q 1 -t interop/tls/out -m from-tls
wait "$WATCHER" || true
check "mosquitto TLS -> TCP QoS 1" "1 interop/tls/out from-tls" "$(seen "$out")"
rm -f "$out"
if mosquitto_pub -h localhost -p "$BROKER_TLS_PORT" --cafile "$certs/other-ca.crt" \
  -t interop/tls/x -m x 2>/dev/null; then
  check "mosquitto refuses a broker signed by another CA" "refused" "accepted"
else
  check "mosquitto refuses a broker signed by another CA" "refused" "refused"
fi

# The admin API with curl: status, a mosquitto_sub client seen and shown, a publish through
# the API reaching it, the Prometheus text, and a kick.
A="http://127.0.0.1:$BROKER_ADMIN_PORT"
check "curl status" "running" "$(curl -sf "$A/api/v1/status" | jq -r .status)"
out=$(mktemp)
watch "$out" "${H[@]}" -i interop-admin -q 1 -t interop/admin -C 1 -W 10 -F '%q %t %p'
check "curl clients/{id}" "true 1" \
  "$(curl -sf "$A/api/v1/clients/interop-admin" | jq -r '"\(.connected) \(.subscriptions | length)"')"
check "curl clients?clientid_prefix" "interop-admin" \
  "$(curl -sf "$A/api/v1/clients?clientid_prefix=interop-adm" | jq -r '.data[].clientid')"
curl -sf -X POST "$A/api/v1/publish" -d '{"topic":"interop/admin","payload":"from-curl","qos":1}' >/dev/null
wait "$WATCHER" || true
check "curl publish -> mosquitto_sub" "1 interop/admin from-curl" "$(seen "$out")"
rm -f "$out"
check "curl unknown client" "404" \
  "$(curl -s -o /dev/null -w '%{http_code}' "$A/api/v1/clients/nobody-here")"
check "curl /metrics" "1" \
  "$(curl -sf "$A/metrics" | grep -c '^# TYPE shardmq_messages_received_total counter$')"
stdbuf -oL mosquitto_sub "${H[@]}" -i interop-kicked -c -q 1 -t interop/k >/dev/null 2>&1 &
kicked=$!
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$A/api/v1/clients/interop-kicked")" = 200 ] && break
  sleep 0.05
done
check "curl kick" "204" \
  "$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$A/api/v1/clients/interop-kicked")"
kill "$kicked" 2>/dev/null || true
wait "$kicked" 2>/dev/null || true

python3 scripts/interop_paho.py 127.0.0.1 "$BROKER_PORT" ${BROKER_WS_PORT:+"$BROKER_WS_PORT"} || fail=1

trap - EXIT
stop_broker || fail=1
if [ "$fail" -ne 0 ]; then
  echo "interop: FAILED"
  exit 1
fi
echo "interop: all checks passed"
