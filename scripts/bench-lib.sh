# Sourced by the benchmark scripts: free loopback ports, waiting for a listener, and the
# Mosquitto configuration every comparison uses.

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_port PORT [SECONDS, default 10]: returns once something accepts on 127.0.0.1:PORT.
wait_port() {
  local deadline=$((SECONDS + ${2:-10}))
  while [ "$SECONDS" -le "$deadline" ]; do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# ShardMQ's settings wherever it is compared, the counterpart of mosquitto_conf (environment
# for the broker process; every other setting is its default): 100 unacknowledged deliveries
# per client and a queue that does not drop in the standard scenarios (fan-in keeps 16,000
# messages on their way to one subscriber). The admin API and the gateways (idle meanwhile) take
# free ports, so a broker already running on this host does not stop the benchmark's.
shardmq_compared_env=(SHARDMQ_MQTT__MAX_INFLIGHT=100 SHARDMQ_MQTT__MAX_MQUEUE_LEN=100000
  SHARDMQ_LISTENER__WS__EXTERNAL__ENABLE=false SHARDMQ_ADMIN__BIND=127.0.0.1:0
  SHARDMQ_TCP__LISTENER__EXTERNAL__BIND=127.0.0.1:0 SHARDMQ_MQTT__SN__BIND=127.0.0.1
  SHARDMQ_MQTT__SN__PORT=0 SHARDMQ_LWM2M__BIND=127.0.0.1 SHARDMQ_LWM2M__PORT=0)

# mosquitto_conf PORT FILE: Mosquitto as compared everywhere — anonymous, no persistence, no
# logging, no connection limit, 100 unacknowledged deliveries per client, no limit on queued
# QoS 1/2 messages (with any finite max_queued_messages we tried — 1,000, 10,000, 100,000 —
# Mosquitto 2.0.11 dropped messages in fan-in, even with fewer than that outstanding), and it
# keeps the current user (started as root it would switch to user mosquitto, and tools that
# write files from inside its process, such as callgrind, could no longer do so).
mosquitto_conf() {
  cat >"$2" <<EOT
listener $1 127.0.0.1
allow_anonymous true
max_connections -1
persistence false
max_inflight_messages 100
max_queued_messages 0
log_type none
log_dest none
user $(id -un)
EOT
}

# run_scenarios NAME PORT PID OUT FILE: the load generator runs the scenarios of FILE against the
# broker NAME on 127.0.0.1:PORT (process PID, for its memory); results in OUT/NAME and
# OUT/NAME.txt.
run_scenarios() {
  target/release/shardmq-bench run --broker "127.0.0.1:$2" --broker-name "$1" --pid "$3" \
    --quiet --out "$4/$1" "$5" | tee "$4/$1.txt"
}

# mosquitto_peer OUT FILE: the scenarios of FILE against a Mosquitto started for them with
# mosquitto_conf (on a free port), stopped afterwards.
mosquitto_peer() {
  local port pid
  port=$(free_port)
  mosquitto_conf "$port" "$1/mosquitto.conf"
  mosquitto -c "$1/mosquitto.conf" >"$1/mosquitto.log" 2>&1 &
  pid=$!
  wait_port "$port"
  run_scenarios mosquitto "$port" "$pid" "$1" "$2"
  kill "$pid"
  wait "$pid" || true
}
