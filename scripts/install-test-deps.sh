#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: the third-party MQTT clients
# used by scripts/interop.sh (mosquitto_pub/mosquitto_sub from Debian, paho-mqtt from PyPI),
# python3-venv for the MQTT-SN client and aiocoap from PyPI (scripts/mqttsn-test.sh,
# scripts/lwm2m-test.sh),
# openssl for the throwaway test certificates (scripts/gen-test-certs.sh), curl and jq for the
# admin API's checks,
# and for scripts/browser-test.sh a real browser (Debian's chromium) and Node.js with npm
# (whose packages, MQTT.js and playwright-core, that script installs under target/).
set -euo pipefail
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
if ! command -v mosquitto_pub >/dev/null || ! command -v mosquitto_sub >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto-clients >/dev/null
fi
if ! command -v mosquitto_passwd >/dev/null; then
  # The auth tests check that a file made by mosquitto_passwd works (package mosquitto).
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
if ! command -v curl >/dev/null || ! command -v jq >/dev/null; then
  # scripts/interop.sh checks the admin API with curl (and reads its JSON with jq).
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq curl jq >/dev/null
fi
if ! command -v dpkg-deb >/dev/null || ! command -v objdump >/dev/null; then
  # scripts/package.sh builds the Debian package (dpkg-deb; objdump reads the glibc it needs).
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dpkg binutils >/dev/null
fi
if ! command -v openssl >/dev/null; then
  # scripts/gen-test-certs.sh makes the TLS tests' certificates with it.
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl >/dev/null
fi
if ! python3 -c 'import paho.mqtt, sys; sys.exit(0 if paho.mqtt.__version__.startswith("2.") else 1)' 2>/dev/null; then
  python3 -m pip install -q --root-user-action=ignore 'paho-mqtt==2.2.0'
fi
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  # scripts/mqttsn-test.sh installs the MQTT-SN client (mqtt-sn-12) in a venv under target/.
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
if ! command -v chromium >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! command -v npm >/dev/null; then
  # Debian splits npm from nodejs; NodeSource's nodejs package carries npm itself.
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs >/dev/null
  command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null
fi
