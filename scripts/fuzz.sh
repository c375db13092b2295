#!/usr/bin/env bash
# Builds the cargo-fuzz targets under broker/fuzz with the stable toolchain and runs each one
# for a while, coverage-guided.
#
# cargo-fuzz itself needs nightly only for -Zsanitizer; libFuzzer's coverage instrumentation is
# available on stable through -Cpasses=sancov-module and the sanitizer-coverage LLVM options,
# which is what this script passes (the same flags cargo-fuzz uses, minus AddressSanitizer).
# With a nightly toolchain, `cargo fuzz run <target>` in broker/fuzz works as usual.
#
# Usage: scripts/fuzz.sh [seconds per target, default 15] [target...]
set -euo pipefail
cd "$(dirname "$0")/../broker/fuzz"
secs=${1:-15}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(mqtt_decode engine_input tcpgw_decode mqttsn_decode lwm2m_decode)
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
cargo build --release --target "$triple" --bins
for t in "${targets[@]}"; do
  corpus=corpus/$t
  mkdir -p "$corpus" artifacts/"$t"
  echo "fuzz: $t for ${secs}s"
  "target/$triple/release/$t" -max_total_time="$secs" -max_len=4096 -print_final_stats=0 \
    -artifact_prefix=artifacts/"$t"/ "$corpus" seeds/"$t" 2>&1 | grep -E 'DONE|ERROR|panicked|SUMMARY' || true
  if ls artifacts/"$t"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $t found a crash:" artifacts/"$t"/crash-* >&2
    exit 1
  fi
done
