#!/usr/bin/env bash
# Fails when a layer crate depends on what only the runtime may use: glommio, libc, socket2 or
# the configuration loader (figment) under shardmq-protocol or shardmq-core, or the broker
# runtime under the load generator. Run by scripts/test.sh (and so by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
check() { # crate, forbidden crates...
  local crate=$1; shift
  # Normal edges only, without proc-macros (they run in the compiler, not in the crate).
  local tree
  tree=$(cargo tree -q -p "$crate" -e normal,no-proc-macro --prefix none --no-dedupe | awk '{print $1}' | sort -u)
  for bad in "$@"; do
    if grep -qx "$bad" <<<"$tree"; then
      echo "check-layers: $crate depends on $bad:" >&2
      cargo tree -q -p "$crate" -e normal,no-proc-macro -i "$bad" >&2 || true
      status=1
    fi
  done
}
check shardmq-protocol glommio libc socket2 figment shardmq-core shardmq
check shardmq-core glommio libc socket2 figment shardmq
check shardmq-bench shardmq shardmq-core
# Each lower crate builds and tests on its own, with only the features it asks for (in the
# workspace, features are unified with the runtime's).
for crate in shardmq-protocol shardmq-core; do
  if ! cargo check -q -p "$crate" --all-targets; then
    echo "check-layers: $crate does not build on its own" >&2
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "check-layers: shardmq-protocol, shardmq-core and shardmq-bench keep their layers"
exit "$status"
