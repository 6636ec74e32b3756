#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for the service tests and print its URL.
# Usage: eval "$(.ci/postgres.sh start DIR)"  (exports MEDSYNBENCH_TEST_POSTGRES_URL);  .ci/postgres.sh stop DIR
# Installs Debian's `postgresql` package when it is missing and we are root.
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?data folder}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
[ -n "$bin" ] || { echo "echo 'PostgreSQL not available: its service tests will be skipped' >&2"; exit 0; }
# The server refuses to run as root: run it as the postgres user when we are root.
as() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$cmd" in
  start)
    port=${PGPORT_TEST:-55432}
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    as "$bin/initdb" -D "$dir/data" -U postgres --auth=trust >/dev/null
    as "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" -w start >/dev/null
    as "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres medsynbench_test
    echo "export MEDSYNBENCH_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:$port/medsynbench_test"
    ;;
  stop)
    as "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    ;;
esac
