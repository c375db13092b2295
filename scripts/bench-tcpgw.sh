#!/usr/bin/env bash
# The private TCP gateway's throughput: bench-harness/scenarios/tcpgw.toml (devices uplinking
# to MQTT subscribers, MQTT publishers downlinking to devices, and the same load in plain MQTT)
# against a release ShardMQ, and the plain-MQTT scenario against Mosquitto in the same run.
#
# Usage: scripts/bench-tcpgw.sh [seconds, default 10]   (results in target/bench/tcpgw/)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
command -v mosquitto >/dev/null || { echo "needs mosquitto (apt-get install mosquitto)" >&2; exit 1; }
cargo build --release -q -p shardmq
cargo build --release -q -p shardmq-bench
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
out=target/bench/tcpgw
mkdir -p "$out"
gw=$(free_port)
# The scenarios with the gateway's port and the run's length.
sed -e "s/^pattern = \"p2p\"$/pattern = \"p2p\"\ntcpgw_port = $gw\nduration = \"${secs}s\"/" \
  bench-harness/scenarios/tcpgw.toml >"$out/scenarios.toml"
grep -v '^tcpgw\|name = "tcpgw' "$out/scenarios.toml" | awk '
  /^\[\[scenario\]\]/ { if (block != "" && block ~ /mqtt-p2p/) printf "%s", block; block = $0 "\n"; next }
  { block = block $0 "\n" }
  END { if (block ~ /mqtt-p2p/) printf "%s", block }' >"$out/mqtt-only.toml"

mq=$(free_port)
env "${shardmq_compared_env[@]}" SHARDMQ_LISTENER__TCP__EXTERNAL__BIND=127.0.0.1:$mq \
  SHARDMQ_TCP__LISTENER__EXTERNAL__BIND=127.0.0.1:$gw SHARDMQ_TCP__LISTENER__EXTERNAL__MAX_CONN_RATE=0 \
  SHARDMQ_LOG__LEVEL=warn target/release/shardmq >"$out/shardmq.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_port "$mq"
wait_port "$gw"
run_scenarios shardmq "$mq" "$pid" "$out" "$out/scenarios.toml"
kill -INT "$pid"
wait "$pid" || true

mosquitto_peer "$out" "$out/mqtt-only.toml"
