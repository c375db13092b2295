#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit/property/integration tests, the fuzz targets
# (built on stable and run briefly), interop with third-party MQTT clients, and a real browser
# over WebSocket.
#
# Usage: scripts/test.sh            (installs missing test dependencies first)
#        FUZZ_SECONDS=60 scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "test dependencies"
scripts/install-test-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "vendor/glommio is glommio 0.9.0 plus its patch series"
scripts/vendor-glommio.sh check

step "glommio's own unit tests of the patched modules"
scripts/vendor-glommio.sh test

step "layers (scripts/check-layers.sh)"
scripts/check-layers.sh

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

step "fuzz targets (stable toolchain)"
scripts/fuzz.sh "${FUZZ_SECONDS:-15}"

step "interop with mosquitto-clients and paho-mqtt"
cargo build -q -p shardmq
scripts/interop.sh target/debug/shardmq

step "the TCP gateway with an independent Python client"
scripts/tcpgw-test.sh target/debug/shardmq

step "the MQTT-SN gateway with mqtt-sn-12 (PyPI) and an independent raw-UDP client"
scripts/mqttsn-test.sh target/debug/shardmq

step "the LwM2M gateway with an independent device on aiocoap"
scripts/lwm2m-test.sh target/debug/shardmq

step "the Debian package: installed in a scratch root, checked, started"
scripts/package-check.sh

step "a real browser: headless Chromium with MQTT.js over WebSocket"
scripts/browser-test.sh target/debug/shardmq

step "all tests passed"
