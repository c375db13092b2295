#!/usr/bin/env bash
# Instructions per routed message, counted by valgrind's callgrind (repeatable whatever else the
# machine does; `perf stat -e instructions` is not supported on this kind of VM), for ShardMQ
# (one shard) and Mosquitto under the same small workload.
#
# Method: each broker runs under callgrind twice with the same clients for the same time: once
# with 10 publishers sending in closed loop to 10 subscribers (p2p, QoS 0, 16 B), once with the
# same connections publishing at a negligible rate. The difference in instructions divided by
# the difference in messages delivered is the cost of routing one message (read, decode, match,
# encode, write), with start-up, connection set-up and idle timers cancelled out.
#
# Usage: scripts/instructions-per-message.sh [seconds, default 20]
# Environment: BENCH_BEFORE=path/to/another/shardmq also measures that build
# ("shardmq-before"), for an A/B of a change; PATTERN (p2p, fanout or fanin; default p2p),
# PUBLISHERS and SUBSCRIBERS (default 10 and 10) change the workload; PEERS= (empty) skips
# Mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
command -v mosquitto >/dev/null || { echo "needs mosquitto (apt-get install mosquitto)" >&2; exit 1; }
# Built apart: the load generator turns on glommio's wake-first feature, which must not reach
# the broker (features are unified across the packages of one build).
cargo build --release -q -p shardmq
cargo build --release -q -p shardmq-bench
out=${OUT:-target/bench/instructions}
mkdir -p "$out"
BENCH=target/release/shardmq-bench
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

# run BROKER RATE -> prints "instructions messages"
run() {
  local broker=$1 rate=$2 port cg pid
  port=$(free_port)
  cg="$out/callgrind.$broker.$rate.out"
  case $broker in
    shardmq | shardmq-before)
      local bin=target/release/shardmq
      [ "$broker" = shardmq ] || bin=$BENCH_BEFORE
      env "${shardmq_compared_env[@]}" SHARDMQ_LISTENER__TCP__EXTERNAL__BIND=127.0.0.1:$port \
        SHARDMQ_SHARDS__CPUS='[0]' SHARDMQ_LOG__LEVEL=warn \
        valgrind --tool=callgrind --callgrind-out-file="$cg" "$bin" >"$out/$broker.log" 2>&1 &
      ;;
    mosquitto)
      mosquitto_conf "$port" "$out/mosquitto.conf"
      valgrind --tool=callgrind --callgrind-out-file="$cg" mosquitto -c "$out/mosquitto.conf" >"$out/$broker.log" 2>&1 &
      ;;
  esac
  pid=$!
  wait_port "$port" 60 # valgrind starts slowly
  "$BENCH" pubsub --quiet --threads 1 --cpus 1 --broker "127.0.0.1:$port" --broker-name "$broker" \
    --publishers "${PUBLISHERS:-10}" --subscribers "${SUBSCRIBERS:-10}" --pattern "${PATTERN:-p2p}" \
    --qos 0 --rate "$rate" --inflight 8 \
    --duration "${secs}s" --warmup 1s --drain 10s --out "$out/$broker.$rate.json" >/dev/null
  kill -INT "$pid"
  wait "$pid" || true
  local ir msgs
  ir=$(sed -n 's/^summary: //p; s/^totals: //p' "$cg" | head -n 1 | awk '{print $1}')
  msgs=$(python3 -c "import json; print(json.load(open('$out/$broker.$rate.json'))['outcome']['delivery']['received'])")
  echo "$ir $msgs"
}

printf '| broker | instructions (loaded) | messages | instructions (idle) | messages | instructions per message |\n'
printf '|---|---|---|---|---|---|\n'
brokers=(shardmq)
[ -z "${BENCH_BEFORE:-}" ] || brokers+=(shardmq-before)
for b in "${brokers[@]}" ${PEERS-mosquitto}; do
  read -r ir1 m1 < <(run "$b" 0)
  read -r ir0 m0 < <(run "$b" 0.01)
  per=$(python3 -c "print(round(($ir1 - $ir0) / max(1, $m1 - $m0)))")
  printf '| %s | %s | %s | %s | %s | %s |\n' "$b" "$ir1" "$m1" "$ir0" "$m0" "$per"
done
