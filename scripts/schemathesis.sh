#!/usr/bin/env bash
# Property-based fuzzing of /api/v1 with Schemathesis, driven by the
# OpenAPI document the server serves: every documented operation gets
# generated path parameters, methods and (negative) inputs, as the admin
# and as a viewer. Checks: no 5xx ever (not_a_server_error), and answers
# match the document where it declares a schema (error answers are RFC 9457
# problem documents: response_schema_conformance).
#
# Installs Schemathesis (pinned) into target/schemathesis-venv, starts
# m2mhub on free loopback ports with a fresh data directory, stops it.
#
# Usage: scripts/schemathesis.sh [path/to/m2mhub]   (default: builds target/debug/m2mhub)
# Environment: ST_MAX_EXAMPLES (20), ST_MAX_TIME (seconds per run, 100),
#              ST_SEED (fixed, so CI is reproducible; "random" for a new one).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1mschemathesis:\033[0m %s\n' "$*"; }
fail() { printf '\033[31mschemathesis FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

SCHEMATHESIS_VERSION=4.32.5
VENV=target/schemathesis-venv
if [[ ! -x $VENV/bin/schemathesis ]] || [[ $("$VENV/bin/schemathesis" --version 2>/dev/null) != *"$SCHEMATHESIS_VERSION"* ]]; then
  log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
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
  rm -rf "$WORK"
}
trap cleanup EXIT

# A fresh data directory: the first start creates the administrator and
# prints its credentials before the ready line. Login lockouts are relaxed:
# the fuzzer posts to /auth/login from one address and must not lock out
# the token logins below (lockouts have their own tests).
M2MHUB_LOGIN_MAX_FAILURES_PER_ADDRESS=0 M2MHUB_LOGIN_MAX_FAILURES_PER_USER=0 \
  "$BIN" serve --data-dir "$WORK/data" \
  --mqtt-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --mqtts-listen 127.0.0.1:0 --https-listen 127.0.0.1:0 \
  --coaps-listen 127.0.0.1:0 \
  >"$WORK/stdout" 2>"$WORK/stderr" &
SERVER_PID=$!
for _ in $(seq 1 100); do
  grep -q '^m2mhub ready' "$WORK/stdout" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/stderr"; fail "server exited at start"; }
  sleep 0.1
done
READY=$(grep '^m2mhub ready' "$WORK/stdout") || fail "server did not become ready"
HTTP=$(sed -E 's/.* http=([^ ]+).*/\1/' <<<"$READY")
ADMIN_USER=$(sed -n 's/^  user: *//p' "$WORK/stdout")
ADMIN_PW=$(sed -n 's/^  password: *//p' "$WORK/stdout")
[[ -n $ADMIN_USER && -n $ADMIN_PW ]] || fail "the first start did not print the admin credentials"
log "server up: http=$HTTP"

# POST JSON, print one field of the answer.
post() { # URL TOKEN BODY FIELD
  "$VENV/bin/python" - "$@" <<'PY'
import json, sys, urllib.request
url, token, body, field = sys.argv[1:5]
req = urllib.request.Request(url, data=body.encode(), method="POST",
                             headers={"Content-Type": "application/json"})
if token:
    req.add_header("Authorization", "Bearer " + token)
with urllib.request.urlopen(req, timeout=10) as r:
    doc = json.load(r)
print(doc.get(field, "") if field else "")
PY
}
API="http://$HTTP/api/v1"
login() { post "$API/auth/login" "" "{\"username\": \"$1\", \"password\": \"$2\"}" token; }
ADMIN_TOKEN=$(login "$ADMIN_USER" "$ADMIN_PW") || fail "admin login"
VIEWER_PW="viewer-$(date +%s)-password"
post "$API/users" "$ADMIN_TOKEN" "{\"username\": \"fuzz-viewer\", \"password\": \"$VIEWER_PW\", \"role\": \"viewer\"}" "" \
  >/dev/null || fail "create the viewer"
VIEWER_TOKEN=$(login fuzz-viewer "$VIEWER_PW") || fail "viewer login"
# Something for path parameters to find: a device with a token.
post "$API/devices" "$ADMIN_TOKEN" '{"id": "fuzz-device"}' id >/dev/null || fail "create a device"

# Schemathesis and Hypothesis keep state in the working directory: keep it
# under target/, not in the source tree.
ROOT=$PWD
mkdir -p target/schemathesis-work
SEED_ARGS=(--seed "${ST_SEED:-20250101}")
[[ ${ST_SEED:-} == random ]] && SEED_ARGS=()
run() { # NAME TOKEN
  log "fuzzing /api/v1 as $1"
  # The live stream never ends, and a device's command poll waits: both
  # are left out (the integration tests cover them).
  (cd target/schemathesis-work && "$ROOT/$VENV/bin/schemathesis" run "$API/openapi.json" \
    --url "$API" \
    --header "Authorization: Bearer $2" \
    --checks not_a_server_error,response_schema_conformance \
    --phases examples,coverage,fuzzing \
    --max-examples "${ST_MAX_EXAMPLES:-20}" \
    --max-time "${ST_MAX_TIME:-100}" \
    --request-timeout 10 \
    --workers 2 \
    --exclude-path /live \
    --exclude-path '/devices/{id}/commands/next' \
    --suppress-health-check all \
    --report junit --report-dir "$ROOT/target/schemathesis-report/$1" \
    "${SEED_ARGS[@]}" \
    --warnings off) \
    || { tail -n 50 "$WORK/stderr" >&2; fail "as $1 (reports in target/schemathesis-report/$1)"; }
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/stderr"; fail "the server died while fuzzed as $1"; }
}
run admin "$ADMIN_TOKEN"
run viewer "$VIEWER_TOKEN"
log "no server errors, answers conform to the document"
