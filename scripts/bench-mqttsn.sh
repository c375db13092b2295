#!/usr/bin/env bash
# The MQTT-SN gateway's uplink throughput: bench-harness/scenarios/mqttsn.toml (MQTT-SN clients
# over UDP publishing to MQTT subscribers at QoS 0 and 1, and the same loads from MQTT
# publishers) against a release ShardMQ, and the MQTT scenarios against Mosquitto in the same
# run (Mosquitto has no MQTT-SN gateway of its own).
#
# Usage: scripts/bench-mqttsn.sh [seconds, default 10]   (results in target/bench/mqttsn/)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
command -v mosquitto >/dev/null || { echo "needs mosquitto (apt-get install mosquitto)" >&2; exit 1; }
cargo build --release -q -p shardmq
cargo build --release -q -p shardmq-bench
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
out=target/bench/mqttsn
mkdir -p "$out"
sn=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -e "s/^mqttsn_port = .*/mqttsn_port = $sn/" -e "s/^pattern = \"p2p\"$/pattern = \"p2p\"\nduration = \"${secs}s\"/" \
  bench-harness/scenarios/mqttsn.toml >"$out/scenarios.toml"
awk '
  /^\[\[scenario\]\]/ { if (block != "" && block ~ /mqtt-up/) printf "%s", block; block = $0 "\n"; next }
  { block = block $0 "\n" }
  END { if (block ~ /mqtt-up/) printf "%s", block }' "$out/scenarios.toml" >"$out/mqtt-only.toml"

mq=$(free_port)
env "${shardmq_compared_env[@]}" SHARDMQ_LISTENER__TCP__EXTERNAL__BIND=127.0.0.1:$mq \
  SHARDMQ_MQTT__SN__BIND=127.0.0.1 SHARDMQ_MQTT__SN__PORT=$sn \
  SHARDMQ_LOG__LEVEL=warn target/release/shardmq >"$out/shardmq.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_port "$mq"
run_scenarios shardmq "$mq" "$pid" "$out" "$out/scenarios.toml"
kill -INT "$pid"
wait "$pid" || true

mosquitto_peer "$out" "$out/mqtt-only.toml"
