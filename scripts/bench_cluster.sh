#!/usr/bin/env bash
# What crossing the cluster costs: the same fan-in load (10 publishers → 1
# wildcard subscriber, 64-byte payloads) on one node, then with the
# publishers on node A and the subscriber on node B of a two-node cluster
# over NATS with JetStream (scripts/nats.sh). Everything on loopback, on this
# machine's cores together (two nodes, NATS and the load generator share
# them; read the ratios).
#
#   scripts/bench_cluster.sh target/release/m2mhub [seconds] [load ...]
#
# Each load is a set of `m2mhub bench` options, quoted (default: QoS 0 at
# 20k, 50k and 100k msg/s, and QoS 1 unpaced).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:?"usage: scripts/bench_cluster.sh BIN [seconds]"}
DUR=${2:-5}
work=$(mktemp -d /tmp/m2mhub-bench-cluster.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  cp "$work/nats/nats.log" /tmp/bench-cluster-nats.log 2>/dev/null || true
  scripts/nats.sh stop "$work/nats" || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

nats_url=$(scripts/nats.sh start "$work/nats" "$(free_port)")
export M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP=0 M2MHUB_MQTT_MAX_CONNECTS_PER_CLIENT_ID=0
export M2MHUB_MQTT_SYS_INTERVAL_SECS=0 M2MHUB_CLUSTER_NAME="bench$$"

# start NAME PORT [cluster args...]: a node on 127.0.0.1:PORT, ready when it says so.
start() {
  local name=$1 port=$2
  shift 2
  "$BIN" serve --data-dir "$work/$name" --mqtt-listen "127.0.0.1:$port" \
    --http-listen 127.0.0.1:0 --mqtts-listen 127.0.0.1:0 --https-listen 127.0.0.1:0 \
    --coaps-listen 127.0.0.1:0 --allow-anonymous "$@" >"$work/$name.out" 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 1 100); do
    grep -q '^m2mhub ready' "$work/$name.out" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "node $name did not start:" >&2
  cat "$work/$name.log" >&2
  exit 1
}

single=$(free_port)
a=$(free_port)
b=$(free_port)
start single "$single"
start a "$a" --cluster --nats-url "$nats_url" --node-id a
start b "$b" --cluster --nats-url "$nats_url" --node-id b

run() {
  local label=$1
  shift
  printf '\n## %s\n' "$label"
  "$BIN" bench --scenario fan-in --publishers 10 --duration "$DUR" --warmup 1 "$@" 2>&1 | tail -n 6
}

specs=("${@:3}")
if [[ ${#specs[@]} -eq 0 ]]; then
  specs=("--qos 0 --rate 20000" "--qos 0 --rate 50000" "--qos 0 --rate 100000" "--qos 1")
fi
for spec in "${specs[@]}"; do
  # shellcheck disable=SC2086
  run "one node: $spec" --host "127.0.0.1:$single" $spec
  # shellcheck disable=SC2086
  run "across the cluster (publishers on A, subscriber on B): $spec" --host "127.0.0.1:$a" --sub-host "127.0.0.1:$b" $spec
done
