#!/usr/bin/env bash
# ShardMQ and Mosquitto side by side over each transport: plain TCP, TLS, WebSocket and
# WebSocket over TLS, on free loopback ports, in one run. For each transport both brokers are
# started afresh with the same listeners (the same test certificates, from
# scripts/gen-test-certs.sh), and the load generator drives them over that transport
# (shardmq-bench --transport) through bench-harness/scenarios/transports.toml: idle
# connections (memory per connection), p2p QoS 0 and fan-out QoS 0.
#
# Usage: scripts/bench-transports.sh [scenario file]
# Environment: OUT (default target/bench/transports), TRANSPORTS (default "tcp tls ws wss").
# Writes one directory per transport (JSON, plots, comparison.md) and report.md
# (docs/benchmarks.md-ready: same-run ratios, memory per idle connection) to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
scenarios=${1:-bench-harness/scenarios/transports.toml}
out=${OUT:-target/bench/transports}
mkdir -p "$out"

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
# Built apart: the load generator's glommio feature must not reach the broker.
cargo build --release -q -p shardmq
cargo build --release -q -p shardmq-bench
BENCH=target/release/shardmq-bench

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
# shellcheck source=scripts/start-broker.sh
. scripts/start-broker.sh
certs="$out/certs"
scripts/gen-test-certs.sh "$certs" >/dev/null

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

for transport in ${TRANSPORTS:-tcp tls ws wss}; do
  dir="$out/$transport"
  mkdir -p "$dir"
  # ShardMQ with every listener (the compared settings, WebSocket back on).
  start_broker target/release/shardmq SHARDMQ_LOG__LEVEL=warn "${shardmq_compared_env[@]}" \
    SHARDMQ_LISTENER__WS__EXTERNAL__ENABLE=true \
    SHARDMQ_LISTENER__SSL__EXTERNAL__CERTFILE="$certs/server.crt" \
    SHARDMQ_LISTENER__SSL__EXTERNAL__KEYFILE="$certs/server.key" \
    SHARDMQ_LISTENER__WSS__EXTERNAL__CERTFILE="$certs/server.crt" \
    SHARDMQ_LISTENER__WSS__EXTERNAL__KEYFILE="$certs/server.key"
  shardmq_pid=$BROKER_PID
  pids+=("$shardmq_pid")
  case "$transport" in
    tcp) shardmq_port=$BROKER_PORT ;;
    tls) shardmq_port=$BROKER_TLS_PORT ;;
    ws) shardmq_port=$BROKER_WS_PORT ;;
    wss) shardmq_port=$BROKER_WSS_PORT ;;
    *) echo "unknown transport $transport" >&2; exit 2 ;;
  esac
  # Mosquitto as compared everywhere (scripts/bench-lib.sh), with the same listener added.
  mosq_port=$(free_port)
  mosq_tcp=$(free_port)
  mosquitto_conf "$mosq_tcp" "$dir/mosquitto.conf"
  {
    echo "listener $mosq_port 127.0.0.1"
    case "$transport" in ws | wss) echo "protocol websockets" ;; esac
    case "$transport" in
      tls | wss)
        echo "cafile $certs/ca.crt"
        echo "certfile $certs/server.crt"
        echo "keyfile $certs/server.key"
        ;;
    esac
  } >>"$dir/mosquitto.conf"
  if [ "$transport" = tcp ]; then mosq_port=$mosq_tcp; fi
  "$MOSQUITTO" -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
  mosq_pid=$!
  pids+=("$mosq_pid")
  wait_port "$shardmq_port"
  wait_port "$mosq_port"
  echo "== $transport: shardmq :$shardmq_port (pid $shardmq_pid), mosquitto :$mosq_port (pid $mosq_pid)"
  "$BENCH" compare --quiet --threads 2 --transport "$transport" --cafile "$certs/ca.crt" \
    --target "shardmq=127.0.0.1:$shardmq_port@$shardmq_pid" \
    --target "mosquitto=127.0.0.1:$mosq_port@$mosq_pid" \
    --out "$dir" "$scenarios" | tee "$dir/compare.txt"
  kill "$shardmq_pid" "$mosq_pid" 2>/dev/null || true
  wait "$shardmq_pid" "$mosq_pid" 2>/dev/null || true
  pids=()
done

python3 - "$out" ${TRANSPORTS:-tcp tls ws wss} >"$out/report.md" <<'EOF'
import json, os, platform, sys
out, transports = sys.argv[1], sys.argv[2:]
def load(t):
    p = os.path.join(out, t, "all.json")
    return json.load(open(p)) if os.path.exists(p) else []
def get(rs, scenario, broker):
    return next((r for r in rs if r["scenario"]["name"] == scenario and r["broker"] == broker), None)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"Machine: {os.cpu_count()} CPUs ({cpu}), {platform.release()}; brokers and load generator share them.\n")
print("| transport | scenario | ShardMQ msgs/s out | Mosquitto msgs/s out | ratio | ShardMQ p99 µs | Mosquitto p99 µs |")
print("|---|---|---:|---:|---:|---:|---:|")
for t in transports:
    rs = load(t)
    for sc in ("p2p-qos0", "fanout-qos0"):
        s, m = get(rs, sc, "shardmq"), get(rs, sc, "mosquitto")
        if not s or not m:
            continue
        so, mo = s["outcome"], m["outcome"]
        ratio = so["rate_out"] / mo["rate_out"] if mo["rate_out"] else float("nan")
        print(f"| {t} | {sc} | {so['rate_out']:,.0f} | {mo['rate_out']:,.0f} | {ratio:.2f}× | "
              f"{so['latency']['p99_us']:,.0f} | {mo['latency']['p99_us']:,.0f} |")
print()
print("| transport | idle connections | ShardMQ bytes/conn | Mosquitto bytes/conn |")
print("|---|---:|---:|---:|")
for t in transports:
    rs = load(t)
    s, m = get(rs, "conn-10k", "shardmq"), get(rs, "conn-10k", "mosquitto")
    if not s or not m:
        continue
    f = lambda r: "n/a" if r["outcome"].get("rss_per_connection") is None else f"{r['outcome']['rss_per_connection']:,.0f}"
    print(f"| {t} | {s['outcome']['opened']:,} | {f(s)} | {f(m)} |")
EOF
cat "$out/report.md"
