#!/usr/bin/env bash
# System calls and CPU per routed message for ShardMQ (one shard) and Mosquitto, each on CPU 0
# with the load generator on CPU 1 (the pinned placement of scripts/bench-compare.sh).
#
# Method: the harness runs one scenario against the broker; after the warm-up, `perf stat`
# counts every system call the broker process enters (tracepoint raw_syscalls:sys_enter, and
# the main ones by name) for a fixed window while the broker's CPU time is read from /proc. The
# harness's delivered rate over its whole run gives the messages in the window. This shows
# where a broker's time goes when it is kernel-bound: on this VM a send that wakes the load
# generator's socket costs microseconds, so the calls per message decide the throughput.
#
# Usage: scripts/syscalls-per-message.sh [scenario file, default: p2p QoS 1 of standard.toml]
# Needs perf (linux-perf) and mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 1; }
command -v mosquitto >/dev/null || { echo "needs mosquitto (apt-get install mosquitto)" >&2; exit 1; }
out=${OUT:-target/bench/syscalls}
mkdir -p "$out"
scenario=${1:-}
if [ -z "$scenario" ]; then
  scenario=$out/p2p-qos1.toml
  python3 - "$scenario" <<'EOF'
import sys, tomllib
doc = tomllib.load(open("bench-harness/scenarios/standard.toml", "rb"))
s = next(s for s in doc["scenario"] if s["name"] == "p2p-qos1")
with open(sys.argv[1], "w") as f:
    f.write("[[scenario]]\n")
    for k, v in s.items():
        f.write(f"{k} = {v!r}\n".replace("'", '"'))
EOF
fi
# Built apart: the load generator turns on glommio's wake-first feature, which must not reach
# the broker (features are unified across the packages of one build).
cargo build --release -q -p shardmq
cargo build --release -q -p shardmq-bench
BENCH=target/release/shardmq-bench
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
window=4
events=raw_syscalls:sys_enter,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_write,syscalls:sys_enter_read,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_epoll_wait

printf '| broker | msgs/s | CPU %% | syscalls per message | send/write per message | recv/read per message | other per message |\n'
printf '|---|---|---|---|---|---|---|\n'
for broker in shardmq mosquitto; do
  port=$(free_port)
  case $broker in
    shardmq)
      env "${shardmq_compared_env[@]}" SHARDMQ_LISTENER__TCP__EXTERNAL__BIND=127.0.0.1:$port \
        SHARDMQ_SHARDS__CPUS='[0]' SHARDMQ_LOG__LEVEL=warn taskset -c 0 target/release/shardmq >"$out/$broker.log" 2>&1 &
      ;;
    mosquitto)
      mosquitto_conf "$port" "$out/mosquitto.conf"
      taskset -c 0 mosquitto -c "$out/mosquitto.conf" >"$out/$broker.log" 2>&1 &
      ;;
  esac
  pid=$!
  wait_port "$port"
  "$BENCH" run --quiet --cpus 1 --broker "127.0.0.1:$port" --broker-name "$broker" \
    --out "$out/$broker.json" "$scenario" >/dev/null &
  harness=$!
  sleep 6 # past connection set-up and the warm-up
  t0=$(cpu_ticks "$pid")
  s0=$(date +%s.%N)
  perf stat -x, -e "$events" -p "$pid" -o "$out/$broker.perf" -- sleep "$window" >/dev/null 2>&1
  t1=$(cpu_ticks "$pid")
  s1=$(date +%s.%N)
  wait "$harness"
  kill -TERM "$pid"
  wait "$pid" || true
  python3 - "$broker" "$out/$broker.json" "$out/$broker.perf" "$t0" "$t1" "$window" "$s0" "$s1" <<'EOF'
import json, sys
broker, report, perf, t0, t1, window, s0, s1 = sys.argv[1:]
window = float(window)
r = json.load(open(report))
rate = r["outcome"]["rate_out"]
counts = {}
for line in open(perf):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0].replace(".", "").isdigit():
        counts[parts[2]] = float(parts[0])
msgs = rate * window
total = counts.get("raw_syscalls:sys_enter", 0)
send = counts.get("syscalls:sys_enter_sendto", 0) + counts.get("syscalls:sys_enter_write", 0)
recv = counts.get("syscalls:sys_enter_recvfrom", 0) + counts.get("syscalls:sys_enter_read", 0)
cpu = (float(t1) - float(t0)) / (float(s1) - float(s0))  # clock ticks are 1/100 s
print(f"| {broker} | {rate / 1000:.1f}k | {cpu:.0f} | {total / msgs:.2f} | {send / msgs:.2f} | {recv / msgs:.2f} | {(total - send - recv) / msgs:.2f} |")
EOF
done
