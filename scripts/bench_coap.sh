#!/usr/bin/env bash
# CoAP benchmarks (BENCHMARKS.md, "CoAP"): m2mhub on core 0, the load
# (`m2mhub bench-coap`) on core 1. Readings/s of SenML+CBOR over plain CoAP
# and CoAPS (DTLS-PSK), CON and NON, each reading stored durably; bytes on
# the wire per reading; DTLS handshakes/s. Peer: libcoap's coap-server
# (Debian's libcoap3-bin) answering PUT /example_data from memory, on the
# same core — a ceiling for a CoAP stack that stores nothing.
#
# Usage: scripts/bench_coap.sh path/to/release/m2mhub [seconds]
set -euo pipefail
BIN=${1:?usage: bench_coap.sh path/to/m2mhub [seconds]}
SECS=${2:-10}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

env M2MHUB_COAP_RATE_PER_SECOND=1000000 M2MHUB_COAP_RATE_BURST=1000000 \
  taskset -c 0 "$BIN" serve --data-dir "$WORK/data" --mqtt-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --mqtts-listen 127.0.0.1:0 --https-listen 127.0.0.1:0 --coap-listen 127.0.0.1:0 --coaps-listen 127.0.0.1:0 \
  >"$WORK/out" 2>"$WORK/err" &
PIDS+=($!)
for _ in $(seq 1 100); do grep -q '^m2mhub ready' "$WORK/out" 2>/dev/null && break; sleep 0.1; done
READY=$(grep '^m2mhub ready' "$WORK/out")
HTTP=$(sed -E 's/.* http=([^ ]+).*/\1/' <<<"$READY")
COAP=$(sed -E 's/.* coap=([^ ]+).*/\1/' <<<"$READY")
COAPS=$(sed -E 's/.* coaps=([^ ]+).*/\1/' <<<"$READY")
PW=$(sed -n 's/^  password: //p' "$WORK/out")
export M2MHUB_PROFILE="$WORK/cli.toml"
"$BIN" login --server "http://$HTTP" --user admin --password "$PW" >/dev/null
"$BIN" device add bench-probe >/dev/null
TOKEN=$("$BIN" device token issue bench-probe --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
KEY=$("$BIN" device psk issue bench-probe --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key_hex"])')

load() { taskset -c 1 "$BIN" bench-coap --duration "$SECS" "$@"; }
echo "== m2mhub $(git -C "$(dirname "$0")/.." rev-parse --short HEAD 2>/dev/null || echo '?'), $SECS s each"
for clients in 16 64; do
  echo "coap CON  clients=$clients  $(load --target "$COAP" --device bench-probe --secret "$TOKEN" --clients $clients)"
  echo "coap NON  clients=$clients  $(load --target "$COAP" --device bench-probe --secret "$TOKEN" --clients $clients --non)"
  echo "coaps CON clients=$clients  $(load --target "$COAPS" --psk-identity bench-probe --psk-key "$KEY" --clients $clients)"
  echo "coaps NON clients=$clients  $(load --target "$COAPS" --psk-identity bench-probe --psk-key "$KEY" --clients $clients --non)"
done
echo "dtls handshakes            $(load --target "$COAPS" --psk-identity bench-probe --psk-key "$KEY" --clients 8 --handshakes)"
"$BIN" telemetry stats >/dev/null 2>&1 || true
echo "server RSS after: $(ps -o rss= -p "${PIDS[0]}") KiB"

# The peer: libcoap's example server, PUT /example_data kept in memory.
taskset -c 0 coap-server-notls -A 127.0.0.1 -p 15683 >/dev/null 2>&1 &
PIDS+=($!)
sleep 0.5
for clients in 16 64; do
  echo "libcoap coap-server CON clients=$clients  $(load --target 127.0.0.1:15683 --path example_data --clients $clients)"
  echo "libcoap coap-server NON clients=$clients  $(load --target 127.0.0.1:15683 --path example_data --clients $clients --non)"
done
