#!/usr/bin/env bash
# Makes throwaway certificates for tests and local trials (openssl). Nothing it writes is
# committed; run it again whenever you need fresh ones.
#
# Usage: scripts/gen-test-certs.sh DIR [DAYS]
#
# DIR gets, all PEM:
#   ca.crt ca.key                  a test CA
#   server.crt server.key          the broker's certificate, signed by the CA, for
#                                  localhost, 127.0.0.1 and ::1
#   client.crt client.key          a client certificate signed by the CA (CN=device-7)
#   other-ca.crt other-ca.key      an unrelated CA
#   other-client.crt other-client.key
#                                  a client certificate signed by the unrelated CA
#                                  (CN=intruder), which the broker must refuse
#
# Then, for instance:
#   SHARDMQ_LISTENER__SSL__EXTERNAL__CERTFILE=DIR/server.crt \
#   SHARDMQ_LISTENER__SSL__EXTERNAL__KEYFILE=DIR/server.key cargo run --release
#   mosquitto_pub --cafile DIR/ca.crt -h localhost -p 8883 -t hello -m world
set -euo pipefail
dir=${1:?usage: $0 DIR [DAYS]}
days=${2:-30}
mkdir -p "$dir"
cd "$dir"

ca() { # name subject
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -keyout "$1.key" -out "$1.crt" -subj "$2" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    2>/dev/null
}

leaf() { # name subject ca extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  printf '%s\n' "$4" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$3.crt" -CAkey "$3.key" -CAcreateserial \
    -days "$days" -out "$1.crt" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

ca ca "/CN=ShardMQ test CA"
ca other-ca "/CN=Some other CA"
leaf server "/CN=localhost" ca "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
leaf client "/O=ShardMQ tests/CN=device-7" ca "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
leaf other-client "/CN=intruder" other-ca "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
rm -f ./*.srl
chmod 600 ./*.key
echo "gen-test-certs: certificates in $PWD (valid $days days)"
