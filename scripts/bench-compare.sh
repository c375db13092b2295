#!/usr/bin/env bash
# Side-by-side benchmark of ShardMQ, Mosquitto and rumqttd on this machine, plus the raw-TCP
# forwarder baseline, all on free loopback ports, in one run.
#
# Usage: scripts/bench-compare.sh [shared|pinned] [scenario file]
#   shared  (default) brokers and load generator unpinned on every core (the headline)
#   pinned  every broker on CPU 0 (ShardMQ with one shard), the load generator on CPU 1
# Environment: OUT (default target/bench/<placement>), HALF_RATE_SECS (default 10),
#   BENCH_BEFORE=path/to/another/shardmq: also measure that build, as "shardmq-before", in
#   the same run (an A/B of a change: build the old commit, copy its binary, pass it here).
#
# Installs the peers when missing: Mosquitto (Debian package mosquitto) and rumqttd
# (cargo install rumqttd --version 0.20.0). Writes JSON, SVG plots, comparison.md and
# report.md (docs/benchmarks.md-ready) to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
placement=${1:-shared}
scenarios=${2:-bench-harness/scenarios/standard.toml}
out=${OUT:-target/bench/$placement}
mkdir -p "$out"
case "$placement" in shared | pinned) ;; *) echo "placement must be shared or pinned" >&2; exit 2 ;; esac

# --- peers -------------------------------------------------------------------------------
if ! command -v mosquitto >/dev/null; then
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
RUMQTTD=${RUMQTTD:-$(command -v rumqttd || echo "$HOME/.cargo/bin/rumqttd")}
if [ ! -x "$RUMQTTD" ]; then
  # Not --locked: its lock file pins metrics 0.22.1, which current rustc refuses.
  cargo install rumqttd --version 0.20.0
  RUMQTTD=$HOME/.cargo/bin/rumqttd
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
# Built apart: the load generator turns on glommio's wake-first feature, which must not reach
# the broker (features are unified across the packages of one build).
cargo build --release -q -p shardmq
cargo build --release -q -p shardmq-bench
BENCH=target/release/shardmq-bench

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

if [ "$placement" = pinned ]; then
  on_broker_cpu=(taskset -c 0)
  shard_cpus='[0]'
  load=(--cpus 1)
  fwd_threads=(--threads 1 --cpus 0)
else
  on_broker_cpu=()
  shard_cpus=all
  load=(--threads 2)
  fwd_threads=(--threads 2)
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# --- ShardMQ -----------------------------------------------------------------------------
. scripts/start-broker.sh
# Comparable settings: 100 unacknowledged deliveries per client on every broker (rumqttd's
# max_inflight_count below, Mosquitto's max_inflight_messages, ShardMQ's mqtt.max_inflight),
# and queues that never drop in the standard scenarios (fan-in keeps 16,000 messages on their
# way to one subscriber: ShardMQ's mqtt.max_mqueue_len, Mosquitto's max_queued_messages 0);
# every other setting is each broker's default.
start_broker target/release/shardmq SHARDMQ_SHARDS__CPUS="$shard_cpus" SHARDMQ_LOG__LEVEL=warn \
  "${shardmq_compared_env[@]}"
pids+=("$BROKER_PID")
shardmq_port=$BROKER_PORT
shardmq_pid=$BROKER_PID
before_target=()
if [ -n "${BENCH_BEFORE:-}" ]; then
  start_broker "$BENCH_BEFORE" SHARDMQ_SHARDS__CPUS="$shard_cpus" SHARDMQ_LOG__LEVEL=warn \
    "${shardmq_compared_env[@]}"
  pids+=("$BROKER_PID")
  before_target=(--target "shardmq-before=127.0.0.1:$BROKER_PORT@$BROKER_PID")
  echo "shardmq-before: $BENCH_BEFORE on :$BROKER_PORT (pid $BROKER_PID)"
fi

# --- Mosquitto: anonymous, no persistence, no logging, no connection limit ---------------
mosq_port=$(free_port)
mosquitto_conf "$mosq_port" "$out/mosquitto.conf"
"${on_broker_cpu[@]}" "$MOSQUITTO" -c "$out/mosquitto.conf" >/dev/null 2>&1 &
mosq_pid=$!
pids+=("$mosq_pid")

# --- rumqttd: connection limits raised, no accept throttling, large payloads ------------
rumq_port=$(free_port)
cat >"$out/rumqttd.toml" <<EOF
id = 0

[router]
id = 0
max_connections = 20010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:$rumq_port"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 100
    dynamic_filters = true
EOF
"${on_broker_cpu[@]}" "$RUMQTTD" -c "$out/rumqttd.toml" >"$out/rumqttd.log" 2>&1 &
rumq_pid=$!
pids+=("$rumq_pid")

# --- raw forwarder ------------------------------------------------------------------------
"$BENCH" forwarder "${fwd_threads[@]}" >"$out/forwarder.out" 2>&1 &
fwd_pid=$!
pids+=("$fwd_pid")
for _ in $(seq 1 100); do grep -q "listening on" "$out/forwarder.out" && break; sleep 0.05; done
fwd_addr=$(sed -n 's/forwarder listening on //p' "$out/forwarder.out")

wait_port "$shardmq_port"; wait_port "$mosq_port"; wait_port "$rumq_port"

echo "placement $placement: shardmq :$shardmq_port (pid $shardmq_pid), mosquitto :$mosq_port (pid $mosq_pid), rumqttd :$rumq_port (pid $rumq_pid), forwarder $fwd_addr"
targets=(--target "shardmq=127.0.0.1:$shardmq_port@$shardmq_pid" "${before_target[@]}"
  --target "mosquitto=127.0.0.1:$mosq_port@$mosq_pid"
  --target "rumqttd=127.0.0.1:$rumq_port@$rumq_pid")

"$BENCH" compare --quiet "${load[@]}" "${targets[@]}" --out "$out" "$scenarios" | tee "$out/compare.txt"

# Raw-limit baseline: the p2p QoS 0 load (same publishers, subscribers, payload, window)
# through the forwarder.
raw_p2p=("$BENCH" pubsub --quiet "${load[@]}" --broker "$fwd_addr" --broker-name forwarder --raw
  --publishers 1000 --subscribers 1000 --pattern p2p --qos 0 --warmup 2s)
"${raw_p2p[@]}" --name p2p-qos0-raw --duration 10s \
  --out "$out/p2p-qos0-raw-forwarder.json" | tee "$out/raw.txt"

# Latency at half of Mosquitto's maximum p2p QoS 0 rate, against every broker.
half=$(python3 - "$out" <<'EOF'
import json, sys
r = json.load(open(f"{sys.argv[1]}/p2p-qos0-mosquitto.json"))
print(r["outcome"]["rate_out"] / 2)
EOF
)
per_pub=$(python3 -c "print(round($half / 1000, 3))")
cat >"$out/half-rate.toml" <<EOF
[[scenario]]
kind = "pubsub"
name = "p2p-qos0-half-mosquitto-max"
publishers = 1000
subscribers = 1000
pattern = "p2p"
qos = 0
payload = 16
rate = $per_pub
duration = "${HALF_RATE_SECS:-10}s"
warmup = "2s"
EOF
"$BENCH" compare --quiet "${load[@]}" "${targets[@]}" --out "$out/half-rate" "$out/half-rate.toml" | tee "$out/half-rate.txt"

# The same open-loop load through the raw forwarder: the latency floor of this load generator,
# kernel and machine at that rate, with no MQTT logic in between.
"${raw_p2p[@]}" --name p2p-qos0-half-mosquitto-max-raw --rate "$per_pub" \
  --duration "${HALF_RATE_SECS:-10}s" --out "$out/half-rate-raw-forwarder.json" |
  tee -a "$out/half-rate.txt"

python3 scripts/bench_report.py "$out" "$placement" >"$out/report.md"
echo "report: $out/report.md"
