#!/usr/bin/env bash
# A throwaway PostgreSQL server for the PostgreSQL store's tests and
# benchmarks (crates/pgstore): its own data directory, 127.0.0.1 only, a
# generated password (scram-sha-256). Never the system cluster a Debian
# package may have started on 5432.
#
# Usage:
#   scripts/postgres.sh start DIR PORT   prints postgres://m2mhub:PASS@127.0.0.1:PORT/m2mhub
#   scripts/postgres.sh stop DIR
#
# The server also accepts TLS (ssl=on) with a certificate for 127.0.0.1
# from a throwaway CA: DIR/ca.pem is what a client verifies it with
# (`storage.postgres_ca`). Plain connections stay allowed, for the tests
# that do not use TLS. Needs openssl (without it: plain TCP only).
#
# The user m2mhub is the server's superuser (the tests create a database
# per test). Run as root, the server runs as the `postgres` user (PostgreSQL
# refuses to run as root), with DIR handed to it. Debian's binaries are used
# (/usr/lib/postgresql/*/bin, the highest version); the `postgresql`
# package is installed when none are there.
set -euo pipefail

log() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

SUDO=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi

# The highest PostgreSQL version whose server binaries are installed.
bin_dir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V | tail -n 1 || true)
  [[ -n $d && -x $d/initdb && -x $d/pg_ctl ]] && echo "$d"
}

# Run a command as the server's owner: `postgres` when we are root.
as_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local dir=$1 port=$2
  [[ $port =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
  local bin
  bin=$(bin_dir || true)
  if [[ -z $bin ]]; then
    log "installing Debian's postgresql package"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    bin=$(bin_dir) || die "no PostgreSQL binaries under /usr/lib/postgresql after installing"
  fi
  if [[ -e $dir && ! -e $dir/.m2mhub-postgres ]] && [[ -n $(ls -A "$dir" 2>/dev/null) ]]; then
    die "$dir is not empty and was not made by this script; choose another directory"
  fi
  if [[ -e $dir/.m2mhub-postgres ]]; then
    stop "$dir" 2>/dev/null || true
    local old
    old=$(cat "$dir/work" 2>/dev/null || true)
    if [[ $old == /tmp/m2mhub-postgres.* ]]; then rm -rf "$old"; fi
  fi
  rm -rf "$dir"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  touch "$dir/.m2mhub-postgres"
  # Where the server's files go: DIR itself, unless the server's user
  # cannot reach it (a checkout under /root), then a folder of its own
  # under /tmp, recorded in DIR/work.
  local work=$dir
  if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "no postgres user to run the server as"
    chown postgres: "$dir"
    if ! runuser -u postgres -- test -w "$dir"; then
      work=$(mktemp -d /tmp/m2mhub-postgres.XXXXXX)
      chown postgres: "$work"
    fi
  fi
  printf '%s\n' "$work" >"$dir/work"
  local pass
  pass=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s\n' "$pass" >"$work/pwfile"
  chmod 600 "$work/pwfile"
  if [[ $(id -u) -eq 0 ]]; then chown postgres: "$work/pwfile"; fi
  as_owner "$bin/initdb" -D "$work/data" -U m2mhub --pwfile="$work/pwfile" \
    --auth=scram-sha-256 -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 ||
    { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  rm -f "$work/pwfile"
  local ssl=""
  if command -v openssl >/dev/null; then
    (
      cd "$dir"
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=m2mhub test PostgreSQL CA" -keyout ca-key.pem -out ca.pem 2>/dev/null
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
        -keyout server-key.pem -out server.csr 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >server.ext
      openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
        -extfile server.ext -out server.pem 2>/dev/null
    )
    if [[ $work != "$dir" ]]; then cp "$dir/server.pem" "$dir/server-key.pem" "$work/"; fi
    chmod 600 "$work/server-key.pem"
    if [[ $(id -u) -eq 0 ]]; then chown postgres: "$work/server.pem" "$work/server-key.pem"; fi
    ssl="-c ssl=on -c ssl_cert_file=$work/server.pem -c ssl_key_file=$work/server-key.pem"
  else
    log "no openssl: the server accepts plain TCP only"
  fi
  # TCP on loopback only; no Unix socket (none to clash with the system's).
  as_owner "$bin/pg_ctl" -D "$work/data" -l "$work/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='' $ssl" start >/dev/null ||
    { cat "$work/server.log" >&2; die "the server did not start on 127.0.0.1:$port"; }
  PGPASSWORD=$pass "$bin/createdb" -h 127.0.0.1 -p "$port" -U m2mhub m2mhub ||
    die "createdb m2mhub failed"
  local url="postgres://m2mhub:$pass@127.0.0.1:$port/m2mhub"
  (umask 077 && printf '%s\n' "$url" >"$dir/url")
  log "PostgreSQL $(basename "$(dirname "$bin")") on 127.0.0.1:$port, data in $work (stop: scripts/postgres.sh stop $dir)"
  printf '%s\n' "$url"
}

stop() {
  local dir=$1
  local work
  work=$(cat "$dir/work" 2>/dev/null || echo "$dir")
  [[ -e $work/data/postmaster.pid ]] || { log "no server running in $dir"; return 0; }
  local bin
  bin=$(bin_dir) || die "no PostgreSQL binaries under /usr/lib/postgresql"
  as_owner "$bin/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null
  if [[ $work == /tmp/m2mhub-postgres.* ]]; then rm -rf "$work"; fi
}

case "${1:-}" in
  start) [[ $# -eq 3 ]] || die "usage: $0 start DIR PORT"; start "$2" "$3" ;;
  stop) [[ $# -eq 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) die "usage: $0 start DIR PORT | stop DIR" ;;
esac
