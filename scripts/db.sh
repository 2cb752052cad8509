#!/usr/bin/env bash
# scripts/db.sh — one-command local PostgreSQL for BizQ.
#
#   scripts/db.sh url     print a ready DATABASE_URL (starts the private cluster if needed)
#   scripts/db.sh start   start (creating on first use) the private cluster and the `bizq` database
#   scripts/db.sh stop    stop the private cluster
#   scripts/db.sh status  say whether it runs, and where
#   scripts/db.sh restart restart it (the tests use this to check that the fleet reconnects);
#                         exits 1 when there is no private cluster to restart
#   scripts/db.sh destroy stop it and delete its data directory
#
# BIZQ_PG_DIR chooses another directory for the cluster (tests start throwaway ones).
# When $DATABASE_URL is already set, `url` and `start` use it as is and start nothing.
# Otherwise a private cluster lives under .bizq/pg (git-ignored), owned by the `postgres`
# OS user when this runs as root (initdb refuses root), listening on 127.0.0.1 on a free port.
# Migrations are applied by the binaries (`bizq migrate`), not by this script.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:-url}"
db_name="${BIZQ_DB_NAME:-bizq}"

log() { echo "db.sh: $*" >&2; }

find_bindir() {
  if [ -n "${PG_BINDIR:-}" ]; then echo "$PG_BINDIR"; return; fi
  local d
  for d in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin /usr/local/pgsql/bin; do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"; return
  fi
  return 1
}

# Run a PostgreSQL server binary as the cluster's owner.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    # From /, so a checkout the postgres user cannot enter (e.g. under /root) is no bother.
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# The data directory must be reachable by the `postgres` user; a clone under /root is not,
# so fall back to a per-checkout directory under /tmp.
default_base() { echo "${BIZQ_PG_DIR:-$root/.bizq/pg}"; }
fallback_base() { echo "${TMPDIR:-/tmp}/bizq-pg-$(echo -n "$(default_base)" | md5sum | cut -c1-10)"; }

pick_base() {
  local base; base="$(default_base)"
  if [ "$(id -u)" = 0 ]; then
    mkdir -p "$base"
    chown postgres: "$base"
    if ! runuser -u postgres -- test -w "$base"; then
      base="$(fallback_base)"
      mkdir -p "$base"; chown postgres: "$base"
    fi
  else
    mkdir -p "$base"
  fi
  echo "$base"
}

free_port() {
  local p
  for p in $(seq "${1:-54329}" 54400); do
    if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "$p"; return; fi
  done
  log "no free TCP port in 54329-54400"; exit 1
}

cluster_url() { echo "postgres://postgres@127.0.0.1:$(cat "$1/port")/$db_name"; }

start() {
  local bindir base data
  if ! bindir="$(find_bindir)"; then
    log "PostgreSQL server binaries (initdb, pg_ctl) not found."
    log "Install them with:  sudo apt-get update && sudo apt-get install -y postgresql-15 postgresql-client-15"
    exit 3
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    log "running as root, but there is no 'postgres' OS user to own the cluster (initdb refuses root)."
    log "Create one with:  useradd --system --create-home postgres"
    exit 3
  fi
  base="$(pick_base)"; data="$base/data"
  if [ ! -f "$data/PG_VERSION" ]; then
    log "creating a private cluster in $data"
    as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$base/initdb.log" 2>&1 \
      || { cat "$base/initdb.log" >&2; exit 1; }
    free_port > "$base/port"
    cat >> "$data/postgresql.conf" <<CONF
# BizQ private development cluster
listen_addresses = '127.0.0.1'
port = $(cat "$base/port")
unix_socket_directories = '$base'
max_connections = 400
shared_buffers = 256MB
max_wal_size = 2GB
CONF
    [ "$(id -u)" = 0 ] && chown postgres: "$base/port"
  fi
  if ! as_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    # The port may have been taken since the cluster was created: move it.
    local port; port="$(cat "$base/port")"
    if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
      port="$(free_port)"; echo "$port" > "$base/port"
      sed -i "s/^port = .*/port = $port/" "$data/postgresql.conf"
    fi
    # A port nobody listens on can still be bound (say, as the local end of an outgoing
    # connection: 54329-54400 lies in Linux's ephemeral range), so a start that finds its
    # port in use moves to the next free one and tries again.
    local tries=0
    until as_owner "$bindir/pg_ctl" -D "$data" -l "$base/server.log" -w -t 60 start >/dev/null 2>&1; do
      tries=$((tries + 1))
      if [ "$tries" -ge 5 ] || ! tail -5 "$base/server.log" | grep -q "Address already in use"; then
        tail -20 "$base/server.log" >&2; exit 1
      fi
      port="$(free_port $(( $(cat "$base/port") + 1 )))"; echo "$port" > "$base/port"
      sed -i "s/^port = .*/port = $port/" "$data/postgresql.conf"
      log "port in use; retrying on $port"
    done
  fi
  local psql="$bindir/psql"
  [ -x "$psql" ] || psql="psql"
  if ! "$psql" -h 127.0.0.1 -p "$(cat "$base/port")" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$db_name'" | grep -q 1; then
    "$psql" -h 127.0.0.1 -p "$(cat "$base/port")" -U postgres -d postgres -qc "CREATE DATABASE \"$db_name\"" >/dev/null
  fi
  echo "$base"
}

case "$cmd" in
  url)
    if [ -n "${DATABASE_URL:-}" ]; then echo "$DATABASE_URL"; exit 0; fi
    base="$(start)"; cluster_url "$base" ;;
  start)
    if [ -n "${DATABASE_URL:-}" ]; then log "DATABASE_URL is set; using it, nothing to start"; exit 0; fi
    base="$(start)"; log "running: $(cluster_url "$base")" ;;
  stop|destroy|status|restart)
    bindir="$(find_bindir)" || { log "no PostgreSQL binaries"; exit 3; }
    for base in "$(default_base)" "$(fallback_base)"; do
      [ -f "$base/data/PG_VERSION" ] || continue
      case "$cmd" in
        status)
          if as_owner "$bindir/pg_ctl" -D "$base/data" status >/dev/null 2>&1; then
            log "running: $(cluster_url "$base")"
          else log "stopped ($base/data)"; fi ;;
        restart)
          as_owner "$bindir/pg_ctl" -D "$base/data" -m fast -w -t 60 -l "$base/server.log" restart >/dev/null
          log "restarted: $(cluster_url "$base")" ;;
        *)
          as_owner "$bindir/pg_ctl" -D "$base/data" -m fast stop >/dev/null 2>&1 || true
          log "stopped ($base/data)"
          if [ "$cmd" = destroy ]; then rm -rf "$base"; log "deleted $base"; fi ;;
      esac
      exit 0
    done
    log "no private cluster here"
    # Nothing was restarted: say so with the exit status, so a caller (the restart test)
    # cannot mistake it for a restart. stop/destroy/status of nothing succeed, as before.
    if [ "$cmd" = restart ]; then exit 1; fi ;;
  *) echo "usage: scripts/db.sh [url|start|stop|status|restart|destroy]" >&2; exit 2 ;;
esac
