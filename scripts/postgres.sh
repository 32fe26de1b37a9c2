#!/usr/bin/env bash
# A local PostgreSQL server for the Dagster instance (development and CI), from Debian's postgresql package.
#   scripts/postgres.sh start   install the package if needed, create the cluster in $ATTRFACE_PGDATA
#                               (default data/postgres), listen on 127.0.0.1:$DAGSTER_PG_PORT, create the
#                               database and role. Idempotent: a running server is left as it is.
#   scripts/postgres.sh install install Debian's postgresql package if no server binaries are there (CI).
#   scripts/postgres.sh stop    stop it (the data stays).
#   scripts/postgres.sh env     print the exports that point Dagster at it (eval "$(scripts/postgres.sh env)").
# Local trust authentication on 127.0.0.1 only: a development server, no password to keep. A real deployment
# sets DAGSTER_PG_HOST/USER/PASSWORD/DB/PORT for its own server (dagster_home/postgres/dagster.yaml reads them).
set -euo pipefail
cd "$(dirname "$0")/.."
PGDATA=${ATTRFACE_PGDATA:-$PWD/data/postgres}
PORT=${DAGSTER_PG_PORT:-55432}
DB=${DAGSTER_PG_DB:-attrface_dagster}
ROLE=${DAGSTER_PG_USER:-attrface}

bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
psql_() { as_pg "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qtA "$@"; }

install_server() {
  [ -n "$(bin_dir)" ] && return 0
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >/dev/null || true
  # the package's post-install creates and starts a default cluster on 5432; ours is separate, so stop that one
  $SUDO apt-get install -y -q --no-install-recommends postgresql >/dev/null
  $SUDO service postgresql stop >/dev/null 2>&1 || true
}

case "${1:-start}" in
  install)
    install_server
    echo "postgres: $("$(bin_dir)/postgres" --version)"
    exit 0 ;;
  env)
    echo "export DAGSTER_HOME=$PWD/dagster_home/postgres DAGSTER_PG_HOST=127.0.0.1 DAGSTER_PG_PORT=$PORT" \
         "DAGSTER_PG_USER=$ROLE DAGSTER_PG_PASSWORD= DAGSTER_PG_DB=$DB"
    exit 0 ;;
  stop)
    BIN=$(bin_dir)
    [ -n "$BIN" ] && [ -f "$PGDATA/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$PGDATA" -m fast stop || true
    exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|env|install" >&2; exit 2 ;;
esac

install_server
BIN=$(bin_dir)
mkdir -p "$PGDATA"
[ "$(id -u)" -eq 0 ] && chown postgres: "$PGDATA" && chmod 700 "$PGDATA"
if [ ! -f "$PGDATA/PG_VERSION" ]; then
  as_pg "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >/dev/null
fi
if ! as_pg "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
  # max_connections: every run worker and step process of a parallel build holds a few connections.
  as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w start \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PGDATA -c max_connections=300" >/dev/null
fi
[ "$(psql_ -c "select 1 from pg_roles where rolname='$ROLE'")" = 1 ] || psql_ -c "create role $ROLE login"
[ "$(psql_ -c "select 1 from pg_database where datname='$DB'")" = 1 ] || psql_ -c "create database $DB owner $ROLE"
echo "postgres: $("$BIN/postgres" --version) on 127.0.0.1:$PORT, database $DB, data $PGDATA"
