#!/usr/bin/env bash
# Interoperability check against clients nobody on this project wrote:
# Debian's mosquitto_pub/mosquitto_sub (MQTT 3.1.1 and 5, QoS 0/1/2,
# retained, will), Python paho-mqtt (MQTT 5 properties, WebSocket),
# pysparkplug (Sparkplug B), Debian's libcoap coap-client and Python aiocoap
# (CoAP: block-wise, Observe).
# Installs what it needs, starts m2mhub on free loopback ports, stops it.
#
# Usage: scripts/interop.sh [path/to/m2mhub]   (default: builds target/debug/m2mhub)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1minterop:\033[0m %s\n' "$*"; }
fail() { printf '\033[31minterop FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

SUDO=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if ! command -v mosquitto_pub >/dev/null || ! command -v openssl >/dev/null || ! command -v coap-client-notls >/dev/null; then
  log "installing mosquitto-clients, openssl and libcoap3-bin"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto-clients openssl libcoap3-bin >/dev/null
fi
VENV=target/interop-venv
if [[ ! -x $VENV/bin/python ]]; then
  log "installing paho-mqtt into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check paho-mqtt==2.1.0
fi

BIN=${1:-}
if [[ -z $BIN ]]; then
  cargo build --quiet -p m2mhub
  BIN=target/debug/m2mhub
fi

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null || true
  jobs -p | xargs -r kill 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# A self-signed CA and a server certificate for the TLS listener.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=m2mhub interop CA" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj "/CN=localhost" -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$WORK/ext.cnf"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 2 -extfile "$WORK/ext.cnf" -out "$WORK/server.pem" 2>/dev/null

# A password-file user with full access observes what devices publish.
"$BIN" passwd observer --password observer-pw > "$WORK/users.txt"

"$BIN" serve --data-dir "$WORK/data" --allow-anonymous --password-file "$WORK/users.txt" \
  --mqtt-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --mqtts-listen 127.0.0.1:0 --https-listen 127.0.0.1:0 --coaps-listen 127.0.0.1:0 \
  --coap-listen 127.0.0.1:0 \
  --tls-cert "$WORK/server.pem" --tls-key "$WORK/server.key" \
  >"$WORK/stdout" 2>"$WORK/stderr" &
SERVER_PID=$!
for _ in $(seq 1 100); do
  grep -q '^m2mhub ready' "$WORK/stdout" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/stderr"; fail "server exited at start"; }
  sleep 0.1
done
READY=$(grep '^m2mhub ready' "$WORK/stdout") || fail "server did not become ready"
MQTT=$(sed -E 's/.* mqtt=([^ ]+).*/\1/' <<<"$READY")
MQTTS=$(sed -E 's/.* mqtts=([^ ]+).*/\1/' <<<"$READY")
HTTP=$(sed -E 's/.* http=([^ ]+).*/\1/' <<<"$READY")
COAP=$(sed -E 's/.* coap=([^ ]+).*/\1/' <<<"$READY")
COAPS=$(sed -E 's/.* coaps=([^ ]+).*/\1/' <<<"$READY")
PORT=${MQTT##*:}
TLS_PORT=${MQTTS##*:}
log "server up: mqtt=$MQTT mqtts=$MQTTS http=$HTTP"

# sub_then_pub VERSION QOS RETAIN: a subscriber receives what a publisher sends.
check_roundtrip() {
  local v=$1 q=$2 topic="interop/v$1/q$2" msg="hello-v$1-q$2"
  mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$v" -q "$q" -t "$topic" -C 1 -W 5 >"$WORK/out.$v.$q" &
  local sub=$!
  sleep 0.3
  mosquitto_pub -h 127.0.0.1 -p "$PORT" -V "$v" -q "$q" -t "$topic" -m "$msg" || fail "publish v$v qos$q"
  wait "$sub" || fail "subscriber v$v qos$q got nothing"
  [[ $(cat "$WORK/out.$v.$q") == "$msg" ]] || fail "v$v qos$q: got '$(cat "$WORK/out.$v.$q")'"
  log "mosquitto v$v QoS $q round trip ok"
}
for v in 311 5; do for q in 0 1 2; do check_roundtrip "$v" "$q"; done; done

# Retained: published first, received by a later subscriber with the retain flag.
for v in 311 5; do
  mosquitto_pub -h 127.0.0.1 -p "$PORT" -V "$v" -q 1 -r -t "interop/retained/$v" -m "kept-$v"
  out=$(mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$v" -t "interop/retained/$v" -C 1 -W 5 -v --retained-only)
  [[ $out == "interop/retained/$v kept-$v" ]] || fail "retained v$v: '$out'"
  mosquitto_pub -h 127.0.0.1 -p "$PORT" -V "$v" -r -t "interop/retained/$v" -n
  if mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$v" -t "interop/retained/$v" -C 1 -W 1 --retained-only >/dev/null 2>&1; then
    fail "retained v$v: not deleted by an empty payload"
  fi
  log "mosquitto v$v retained set/delete ok"
done

# Will: a client killed without DISCONNECT has its will published.
for v in 311 5; do
  mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$v" -t "interop/will/$v" -C 1 -W 8 >"$WORK/will.$v" &
  watcher=$!
  sleep 0.3
  mosquitto_sub -h 127.0.0.1 -p "$PORT" -V "$v" -t "interop/nothing" -k 5 \
    --will-topic "interop/will/$v" --will-payload "gone-$v" --will-qos 1 &
  victim=$!
  sleep 0.5
  kill -9 "$victim"; wait "$victim" 2>/dev/null || true
  wait "$watcher" || fail "will v$v not received"
  [[ $(cat "$WORK/will.$v") == "gone-$v" ]] || fail "will v$v: '$(cat "$WORK/will.$v")'"
  log "mosquitto v$v will ok"
done

# TLS: mosquitto clients verify the server certificate.
mosquitto_sub -h localhost -p "$TLS_PORT" --cafile "$WORK/ca.pem" -V 5 -t interop/tls -C 1 -W 5 >"$WORK/tls" &
sub=$!
sleep 0.5
mosquitto_pub -h localhost -p "$TLS_PORT" --cafile "$WORK/ca.pem" -V 311 -q 1 -t interop/tls -m over-tls
wait "$sub" || fail "TLS subscriber got nothing"
[[ $(cat "$WORK/tls") == "over-tls" ]] || fail "TLS: '$(cat "$WORK/tls")'"
log "mosquitto over TLS ok"

# MQTT 5 properties and WebSocket with paho-mqtt.
"$VENV/bin/python" scripts/interop_paho.py --host 127.0.0.1 --port "$PORT" --http "$HTTP" \
  || fail "paho-mqtt checks"

# Device identity: a token device and a certificate device (built-in CA,
# mutual TLS), driven by mosquitto clients; the CLI manages them.
ADMIN_PW=$(sed -n 's/^  password: //p' "$WORK/stdout")
[[ -n $ADMIN_PW ]] || fail "the first start did not print the admin password"
export M2MHUB_PROFILE="$WORK/cli.toml"
"$BIN" login --server "http://$HTTP" --user admin --password "$ADMIN_PW" >/dev/null || fail "CLI login"
"$BIN" device add interop-token >/dev/null || fail "CLI device add"
"$BIN" device add interop-cert >/dev/null || fail "CLI device add"
TOKEN=$("$BIN" device token issue interop-token --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
"$BIN" device cert issue interop-cert --out-dir "$WORK/dev" >/dev/null || fail "CLI cert issue"

mosquitto_sub -h 127.0.0.1 -p "$PORT" -u observer -P observer-pw -t 'devices/#' -C 2 -W 8 -v >"$WORK/observed" &
observer=$!
sleep 0.5
mosquitto_pub -h 127.0.0.1 -p "$PORT" -V 5 -i interop-token -u interop-token -P "$TOKEN" \
  -t devices/interop-token/telemetry -m '{"t":1}' -q 1 || fail "token device publish"
if mosquitto_pub -h 127.0.0.1 -p "$PORT" -V 5 -i interop-token -u interop-token -P "m2m_wrong" \
  -t devices/interop-token/telemetry -m x 2>/dev/null; then
  fail "a wrong token was accepted"
fi
mosquitto_pub -h localhost -p "$TLS_PORT" --cafile "$WORK/ca.pem" \
  --cert "$WORK/dev/interop-cert.pem" --key "$WORK/dev/interop-cert.key" -i interop-cert \
  -t devices/interop-cert/telemetry -m '{"t":2}' -q 1 || fail "certificate device publish over mutual TLS"
wait "$observer" || fail "observer did not see both devices"
grep -q 'devices/interop-token/telemetry {"t":1}' "$WORK/observed" || fail "token device message: $(cat "$WORK/observed")"
grep -q 'devices/interop-cert/telemetry {"t":2}' "$WORK/observed" || fail "cert device message: $(cat "$WORK/observed")"
log "mosquitto with a device token and with a device certificate (mutual TLS) ok"
# Sparkplug B: an edge node driven by pysparkplug (its own venv: it needs
# paho-mqtt 1.x), authenticated as a registered device whose id is its node id.
SPVENV=target/sparkplug-venv
if [[ ! -x $SPVENV/bin/python ]]; then
  log "installing pysparkplug into $SPVENV"
  python3 -m venv "$SPVENV"
  "$SPVENV/bin/pip" install --quiet --disable-pip-version-check pysparkplug==0.6.1
fi
"$BIN" device add plc-py >/dev/null || fail "CLI device add plc-py"
SP_TOKEN=$("$BIN" device token issue plc-py --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
"$SPVENV/bin/python" scripts/interop_sparkplug.py --host 127.0.0.1 --port "$PORT" --node plc-py --secret "$SP_TOKEN" \
  || fail "pysparkplug edge node"
for _ in $(seq 1 50); do
  "$BIN" query latest plc-py --json 2>/dev/null | grep -q '"temperature"' && break
  sleep 0.1
done
"$BIN" query latest plc-py --json | python3 -c '
import json, sys
items = {i["metric"]: i["value"] for i in json.load(sys.stdin)["items"]}
assert items.get("temperature") == 21.5, items
assert items.get("running") is True, items
' || fail "Sparkplug node data not stored: $("$BIN" query latest plc-py --json)"
"$BIN" query latest plc-py.sensor --json | python3 -c '
import json, sys
items = {i["metric"]: i["value"] for i in json.load(sys.stdin)["items"]}
assert items.get("humidity") == 41.0, items
' || fail "Sparkplug device data not stored: $("$BIN" query latest plc-py.sensor --json 2>&1)"
log "pysparkplug edge node (NBIRTH, DBIRTH, NDATA, DDATA, NDEATH) ok"

# CoAP: libcoap's coap-client (plain CoAP, the token in the path) posts a
# reading and a block-wise batch and reads the shadow block-wise; aiocoap
# observes commands (its own venv).
"$BIN" device add probe-coap >/dev/null || fail "CLI device add probe-coap"
CO_TOKEN=$("$BIN" device token issue probe-coap --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
CO_BASE="coap://$COAP/probe-coap/$CO_TOKEN"
coap-client-notls -B 10 -m post -t 50 -e '{"moisture": 9.5}' "$CO_BASE/telemetry" >"$WORK/coap.out" 2>&1 \
  || fail "coap-client POST: $(cat "$WORK/coap.out")"
python3 -c 'import json,time; t=int(time.time()*1000); print(json.dumps([{"ts": t-90000+i*100, "level": i} for i in range(300)]))' >"$WORK/batch.json"
coap-client-notls -B 20 -m post -t 50 -b 64 -f "$WORK/batch.json" "$CO_BASE/telemetry" >"$WORK/coap.out" 2>&1 \
  || fail "coap-client block-wise POST: $(cat "$WORK/coap.out")"
for _ in $(seq 1 50); do
  "$BIN" query latest probe-coap --json | grep -q '"level"' && break
  sleep 0.1
done
"$BIN" query latest probe-coap --json | python3 -c '
import json, sys
items = {i["metric"]: i["value"] for i in json.load(sys.stdin)["items"]}
assert items.get("moisture") == 9.5 and items.get("level") == 299, items
' || fail "CoAP readings not stored: $("$BIN" query latest probe-coap --json)"
if coap-client-notls -B 5 -m post -t 50 -e '1' "coap://$COAP/probe-coap/wrong/telemetry" 2>&1 | grep -q "4.01"; then
  log "coap-client: a wrong secret is refused with 4.01"
else
  fail "coap-client: a wrong secret was not refused with 4.01"
fi
log "coap-client (libcoap) POST, block-wise POST ok"
COVENV=target/coap-venv
if [[ ! -x $COVENV/bin/python ]]; then
  log "installing aiocoap into $COVENV"
  python3 -m venv "$COVENV"
  "$COVENV/bin/pip" install --quiet --disable-pip-version-check aiocoap==0.4.17
fi
"$COVENV/bin/python" scripts/interop_coap.py --coap "$COAP" --device probe-coap --secret "$CO_TOKEN" --bin "$BIN" \
  || fail "aiocoap checks"
log "aiocoap (SenML+JSON, Block1, Observe, command answer, shadow) ok"

# CoAPS: libcoap's coap-client over DTLS 1.2 with a pre-shared key, with
# both of its DTLS stacks (OpenSSL and GnuTLS); the device's own
# (factory-provisioned) key is registered with --key-hex.
"$BIN" device add probe-dtls >/dev/null || fail "CLI device add probe-dtls"
PSK_TEXT="interop-factory-psk-42"
PSK_HEX=$(python3 -c "print('$PSK_TEXT'.encode().hex())")
"$BIN" device psk issue probe-dtls --key-hex "$PSK_HEX" >/dev/null || fail "CLI psk issue"
for stack in openssl gnutls; do
  coap-client-$stack -B 15 -u probe-dtls -k "$PSK_TEXT" -m post -t 50 -e "{\"dtls_$stack\": 1}" \
    "coaps://$COAPS/telemetry" >"$WORK/coaps.out" 2>&1 || fail "coap-client-$stack over DTLS-PSK: $(cat "$WORK/coaps.out")"
done
coap-client-openssl -B 20 -u probe-dtls -k "$PSK_TEXT" -m post -t 50 -b 64 -f "$WORK/batch.json" \
  "coaps://$COAPS/telemetry" >"$WORK/coaps.out" 2>&1 || fail "coap-client block-wise over DTLS: $(cat "$WORK/coaps.out")"
for _ in $(seq 1 50); do
  "$BIN" query latest probe-dtls --json | grep -q '"level"' && break
  sleep 0.1
done
"$BIN" query latest probe-dtls --json | python3 -c '
import json, sys
items = {i["metric"]: i["value"] for i in json.load(sys.stdin)["items"]}
assert items.get("dtls_openssl") == 1 and items.get("dtls_gnutls") == 1 and items.get("level") == 299, items
' || fail "CoAPS readings not stored: $("$BIN" query latest probe-dtls --json)"
timeout 12 coap-client-openssl -B 5 -u probe-dtls -k "not-the-key-at-all" -m post -t 50 -e '{"wrong_key": 1}' \
  "coaps://$COAPS/telemetry" >/dev/null 2>&1 || true
sleep 0.3
if "$BIN" query latest probe-dtls --json | grep -q wrong_key; then
  fail "a reading sent with a wrong PSK was stored"
fi
log "coap-client over DTLS-PSK (OpenSSL and GnuTLS stacks, block-wise) ok"

"$BIN" audit verify >/dev/null || fail "audit chain"
log "audit chain verified"

# Graceful shutdown: SIGTERM, exit code 0.
kill -TERM "$SERVER_PID"
if wait "$SERVER_PID"; then log "graceful shutdown ok"; else fail "server exited non-zero on SIGTERM"; fi
SERVER_PID=""
log "all interop checks passed"
