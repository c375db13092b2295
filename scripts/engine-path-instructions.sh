#!/usr/bin/env bash
# Instructions per message through the engine alone (broker/examples/engine_path.rs), counted by
# callgrind: decode, route, deliver and encode on one shard with the broker's allocator, no
# sockets, no timers, no other thread. Deterministic, so an A/B of a change on the hot path
# reads to the instruction where scripts/instructions-per-message.sh (a whole broker under
# load) moves by some 3 % from run to run.
#
# Usage: scripts/engine-path-instructions.sh [messages, default 200000]
# Environment: BEFORE=path/to/another/engine_path binary also measures that build.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200000}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release -q -p shardmq --example engine_path
out=${OUT:-target/bench/engine-path}
mkdir -p "$out"

# count BINARY MESSAGES -> total instructions
count() {
  local cg="$out/callgrind.$(basename "$(dirname "$1")").$2.out"
  valgrind --tool=callgrind --callgrind-out-file="$cg" "$1" "$2" >/dev/null 2>&1
  sed -n 's/^summary: //p; s/^totals: //p' "$cg" | head -n 1 | awk '{print $1}'
}

measure() {
  local small big
  small=$(count "$1" $((n / 2)))
  big=$(count "$1" "$n")
  echo "| $2 | $(( (big - small) / (n - n / 2) )) |"
}

echo "| build | instructions per message |"
echo "|---|---|"
measure target/release/examples/engine_path "this build"
if [ -n "${BEFORE:-}" ]; then
  measure "$BEFORE" "before"
fi
