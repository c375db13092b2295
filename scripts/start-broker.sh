# Sourced by the test scripts: start_broker BIN [ENV...] starts a ShardMQ on a free loopback port
# and sets BROKER_PID, BROKER_PORT (MQTT over TCP), BROKER_WS_PORT (over WebSocket),
# BROKER_TLS_PORT and BROKER_WSS_PORT (over TLS and WSS, which start only when ENV gives them
# a certificate) — each empty when its listener is off — BROKER_ADMIN_PORT (the admin API),
# BROKER_TCPGW_PORT (the TCP gateway), BROKER_SN_PORT (the MQTT-SN gateway, UDP),
# BROKER_LWM2M_PORT (the LwM2M gateway, UDP) and BROKER_LOG; stop_broker stops it
# (SIGTERM, then checks the exit status).

# listener_port NAME: the port of listener NAME from the broker's "listening" line.
listener_port() {
  sed -n "s/.*listening for MQTT.* listener=$1 addr=127\.0\.0\.1:\([0-9]*\).*/\1/p" "$BROKER_LOG" | head -n 1
}

start_broker() {
  local bin=$1 level=info arg
  shift
  # The listening lines are read at info level from the runtime; a level the caller gives
  # (benchmarks run at warn: no line per client) applies to everything else.
  for arg in "$@"; do
    case "$arg" in SHARDMQ_LOG__LEVEL=*) level="${arg#SHARDMQ_LOG__LEVEL=},shardmq::shard::runtime=info" ;; esac
  done
  BROKER_LOG=$(mktemp)
  env "$@" SHARDMQ_LISTENER__TCP__EXTERNAL__BIND=127.0.0.1:0 \
    SHARDMQ_LISTENER__WS__EXTERNAL__BIND=127.0.0.1:0 SHARDMQ_LISTENER__SSL__EXTERNAL__BIND=127.0.0.1:0 \
    SHARDMQ_LISTENER__WSS__EXTERNAL__BIND=127.0.0.1:0 SHARDMQ_ADMIN__BIND=127.0.0.1:0 \
    SHARDMQ_TCP__LISTENER__EXTERNAL__BIND=127.0.0.1:0 \
    SHARDMQ_MQTT__SN__BIND=127.0.0.1 SHARDMQ_MQTT__SN__PORT=0 \
    SHARDMQ_LWM2M__BIND=127.0.0.1 SHARDMQ_LWM2M__PORT=0 \
    SHARDMQ_LOG__LEVEL="$level" \
    "$bin" >"$BROKER_LOG" 2>&1 &
  BROKER_PID=$!
  for _ in $(seq 1 200); do
    if grep -q "broker started" "$BROKER_LOG"; then
      BROKER_PORT=$(listener_port external)
      BROKER_WS_PORT=$(listener_port ws.external)
      BROKER_TLS_PORT=$(listener_port ssl.external)
      BROKER_WSS_PORT=$(listener_port wss.external)
      BROKER_ADMIN_PORT=$(sed -n 's/.*admin API listening.* addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$BROKER_LOG" | head -n 1)
      BROKER_TCPGW_PORT=$(sed -n 's/.*listening for the TCP gateway.* addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$BROKER_LOG" | head -n 1)
      BROKER_SN_PORT=$(sed -n 's/.*listening for MQTT-SN.* addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$BROKER_LOG" | head -n 1)
      BROKER_LWM2M_PORT=$(sed -n 's/.*listening for LwM2M.* addr=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$BROKER_LOG" | head -n 1)
      [ -n "$BROKER_PORT" ] && return 0
    fi
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
      echo "broker exited at start:" >&2
      cat "$BROKER_LOG" >&2
      return 1
    fi
    sleep 0.05
  done
  echo "broker did not report its port" >&2
  cat "$BROKER_LOG" >&2
  return 1
}

stop_broker() {
  kill -TERM "$BROKER_PID" 2>/dev/null || true
  local status=0
  wait "$BROKER_PID" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "broker exited with status $status" >&2
    cat "$BROKER_LOG" >&2
    return 1
  fi
  rm -f "$BROKER_LOG"
}
