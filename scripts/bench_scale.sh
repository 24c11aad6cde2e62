#!/usr/bin/env bash
# Idle connections at scale and a reconnect storm of all of them, m2mhub
# then Mosquitto (if installed), each broker pinned to core 0, the load
# (`m2mhub bench --source-ips 8`) to core 1.
# usage: scripts/bench_scale.sh BIN N   (N up to the hard open-file limit)
set -u
BIN=$1; N=$2
mkdir -p target; W=$(mktemp -d "$PWD/target/scale.XXXX")
export M2MHUB_MQTT_MAX_CONNECTIONS_PER_IP=0 M2MHUB_MQTT_MAX_CONNECT_RATE_PER_IP=0 M2MHUB_MQTT_MAX_CONNECTS_PER_CLIENT_ID=0 MIMALLOC_PURGE_DELAY=0 RUST_LOG=error
taskset -c 0 $BIN serve --data-dir $W/data --allow-anonymous --mqtt-listen 127.0.0.1:18932 --http-listen 127.0.0.1:18982 --mqtts-listen 127.0.0.1:18933 --https-listen 127.0.0.1:18934 --coaps-listen 127.0.0.1:18935 > $W/out 2> $W/err &
PID=$!
sleep 3
echo "== m2mhub idle $N"
taskset -c 1 $BIN bench --host 127.0.0.1:18932 --scenario idle --connections $N --source-ips 8 --concurrency 1000 --duration 10 --warmup 1 --broker-pid $PID --json > $W/idle.json 2> $W/idle.err; cat $W/idle.json | python3 -c "import json,sys; j=json.load(sys.stdin); print({k:v for k,v in j.items() if k in ('connections','bytes_per_connection','connect_secs','rss_before_kb','rss_after_kb','connected','failures')})" || tail -3 $W/idle.err
grep "^Max open files" /proc/$PID/limits
echo "== m2mhub reconnect storm $N"
taskset -c 1 $BIN bench --host 127.0.0.1:18932 --scenario connect --connections $N --source-ips 8 --concurrency 1000 --reconnect-storm --duration 5 --warmup 0 --json > $W/storm.json 2> $W/storm.err; python3 -c "import json; j=json.load(open('$W/storm.json')); print({k:v for k,v in j.items() if 'storm' in k or 'connect' in k or 'fail' in k})" || tail -3 $W/storm.err
kill $PID; wait $PID
cat > $W/mosq.conf <<EOC
listener 18931 127.0.0.1
allow_anonymous true
persistence false
log_type error
max_connections -1
EOC
taskset -c 0 mosquitto -c $W/mosq.conf &
MP=$!
sleep 1
echo "== mosquitto idle $N"
taskset -c 1 $BIN bench --host 127.0.0.1:18931 --scenario idle --connections $N --source-ips 8 --concurrency 1000 --duration 10 --warmup 1 --broker-pid $MP --json > $W/midle.json 2> $W/midle.err; python3 -c "import json; j=json.load(open('$W/midle.json')); print({k:v for k,v in j.items() if k in ('connections','bytes_per_connection','connect_secs','rss_before_kb','rss_after_kb')})" || tail -3 $W/midle.err
echo "== mosquitto reconnect storm $N"
taskset -c 1 $BIN bench --host 127.0.0.1:18931 --scenario connect --connections $N --source-ips 8 --concurrency 1000 --reconnect-storm --duration 5 --warmup 0 --json > $W/mstorm.json 2> $W/mstorm.err; python3 -c "import json; j=json.load(open('$W/mstorm.json')); print({k:v for k,v in j.items() if 'storm' in k or 'connect' in k or 'fail' in k})" || tail -3 $W/mstorm.err
kill $MP; wait $MP
echo "data in $W"
