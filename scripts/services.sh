#!/usr/bin/env bash
# Local services for `make run` with DATABASE_URL/REDIS_URL and for `make test`:
#   up      start Postgres and Redis if they are down, create the databases
#           parley and test_parley, and run our own PgBouncer on 127.0.0.1:6432
#   down    stop our PgBouncer (Postgres and Redis are machine services: left running)
#   status  show what answers
# Idempotent: `up` on a running set-up only checks it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379
PGB_PORT=${PGBOUNCER_PORT:-6432}
# PgBouncer's pools (docs/database.md says why): Postgres backends per (database, user),
# extra ones lent to a client that waited PGBOUNCER_RESERVE_POOL_TIMEOUT seconds, a hard
# cap per database (<= 25 server connections however many sessions), client connections.
PGB_DEFAULT_POOL_SIZE=${PGBOUNCER_DEFAULT_POOL_SIZE:-10}
PGB_RESERVE_POOL_SIZE=${PGBOUNCER_RESERVE_POOL_SIZE:-5}
PGB_RESERVE_POOL_TIMEOUT=${PGBOUNCER_RESERVE_POOL_TIMEOUT:-5}
PGB_MAX_DB_CONNECTIONS=${PGBOUNCER_MAX_DB_CONNECTIONS:-20}
PGB_MAX_CLIENT_CONN=${PGBOUNCER_MAX_CLIENT_CONN:-1000}
PGB_TEMPLATE=$ROOT/deploy/pgbouncer/pgbouncer.ini
RUN_LINK=$ROOT/var/pgbouncer
# var/pgbouncer may be a symlink (see prepare_run_dir): PgBouncer gets real paths.
RUN_DIR=$(readlink -f "$RUN_LINK" 2>/dev/null || echo "$RUN_LINK")
DATABASES=(parley test_parley)

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    printf 'services: %s did not answer within %ss\n' "$what" "$seconds" >&2
    return 1
}

pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }
redis_up() { [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }
pgb_up() { psql -h 127.0.0.1 -p "$PGB_PORT" -U postgres -d pgbouncer -tAc 'SHOW VERSION' >/dev/null 2>&1; }
psql_admin() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -tAq "$@"; }

pgb_pid() {
    local pid
    pid=$(cat "$RUN_DIR/pgbouncer.pid" 2>/dev/null) || return 1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# A PgBouncer in transaction mode that knows our databases.
pgb_compatible() {
    local admin="psql -h 127.0.0.1 -p $PGB_PORT -U postgres -d pgbouncer -tA"
    [[ "$($admin -c 'SHOW CONFIG' 2>/dev/null | awk -F'|' '$1 == "pool_mode" {print $2}')" == transaction ]] &&
        [[ $($admin -c 'SHOW DATABASES' 2>/dev/null | cut -d'|' -f1 | grep -cxE 'parley|test_parley') -eq 2 ]]
}

start_postgres() {
    if pg_up; then return 0; fi
    command -v pg_ctlcluster >/dev/null || die "Postgres is not installed (apt-get install -y postgresql)"
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting Postgres $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_for 60 Postgres pg_up || exit 1
}

start_redis() {
    if redis_up; then return 0; fi
    command -v redis-server >/dev/null || die "Redis is not installed (apt-get install -y redis-server)"
    say "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
    wait_for 30 Redis redis_up || exit 1
}

create_databases() {
    local db
    for db in "${DATABASES[@]}"; do
        if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]]; then
            say "creating database $db"
            psql_admin -c "CREATE DATABASE $db"
        fi
    done
}

# var/pgbouncer must be writable by the user PgBouncer runs as, and every
# directory above it traversable by that user: PgBouncer opens its pidfile and
# logfile after dropping root. When the work tree is not reachable by postgres
# (a clone under /root, mode 700), var/pgbouncer becomes a symlink to a private
# directory under /tmp, one per work tree.
prepare_run_dir() {
    mkdir -p "$RUN_LINK"
    RUN_DIR=$(readlink -f "$RUN_LINK")
    [[ $(id -u) -eq 0 ]] || return 0
    chown postgres: "$RUN_DIR"
    runuser -u postgres -- test -w "$RUN_DIR" && return 0
    local fallback
    fallback=${TMPDIR:-/tmp}/parley-pgbouncer-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)
    mkdir -p "$fallback"
    chown postgres: "$fallback"
    chmod 700 "$fallback"
    runuser -u postgres -- test -w "$fallback" || die "no directory writable by postgres for PgBouncer"
    rm -rf "$RUN_LINK"
    ln -s "$fallback" "$RUN_LINK"
    RUN_DIR=$fallback
    say "var/pgbouncer -> $fallback (the work tree is not reachable by postgres)"
}

# check_pool_sizes: every PGBOUNCER_* pool setting is a whole number, and the pools fit.
check_pool_sizes() {
    local name value
    for name in PGB_DEFAULT_POOL_SIZE PGB_RESERVE_POOL_SIZE PGB_RESERVE_POOL_TIMEOUT \
        PGB_MAX_DB_CONNECTIONS PGB_MAX_CLIENT_CONN; do
        value=${!name}
        [[ "$value" =~ ^[0-9]+$ ]] || die "${name/PGB_/PGBOUNCER_}=$value is not a whole number"
    done
    ((PGB_DEFAULT_POOL_SIZE >= 1)) || die "PGBOUNCER_DEFAULT_POOL_SIZE must be at least 1"
    ((PGB_MAX_DB_CONNECTIONS == 0 || PGB_MAX_DB_CONNECTIONS >= PGB_DEFAULT_POOL_SIZE)) ||
        die "PGBOUNCER_MAX_DB_CONNECTIONS ($PGB_MAX_DB_CONNECTIONS) is below PGBOUNCER_DEFAULT_POOL_SIZE ($PGB_DEFAULT_POOL_SIZE)"
    ((PGB_MAX_CLIENT_CONN >= PGB_DEFAULT_POOL_SIZE)) ||
        die "PGBOUNCER_MAX_CLIENT_CONN ($PGB_MAX_CLIENT_CONN) is below PGBOUNCER_DEFAULT_POOL_SIZE"
}

render_pgbouncer() {
    prepare_run_dir
    check_pool_sizes
    sed -e "s|@RUN_DIR@|$RUN_DIR|g" -e "s|@PORT@|$PGB_PORT|g" \
        -e "s|@DEFAULT_POOL_SIZE@|$PGB_DEFAULT_POOL_SIZE|g" \
        -e "s|@RESERVE_POOL_SIZE@|$PGB_RESERVE_POOL_SIZE|g" \
        -e "s|@RESERVE_POOL_TIMEOUT@|$PGB_RESERVE_POOL_TIMEOUT|g" \
        -e "s|@MAX_DB_CONNECTIONS@|$PGB_MAX_DB_CONNECTIONS|g" \
        -e "s|@MAX_CLIENT_CONN@|$PGB_MAX_CLIENT_CONN|g" \
        "$PGB_TEMPLATE" >"$RUN_DIR/pgbouncer.ini.new"
    printf '"postgres" ""\n' >"$RUN_DIR/userlist.txt"
    if [[ $(id -u) -eq 0 ]]; then chown -R postgres: "$RUN_DIR"; fi
}

# Debian's own pgbouncer service (started by the package on some machines)
# also listens on 6432, with no databases: stop it so that ours can listen.
stop_foreign_pgbouncer() {
    local pid
    pid=$(cat /var/run/postgresql/pgbouncer.pid 2>/dev/null) || return 0
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        say "stopping Debian's pgbouncer service (pid $pid) that holds port $PGB_PORT"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    fi
}

start_pgbouncer() {
    command -v pgbouncer >/dev/null || die "pgbouncer is not installed (make system-deps)"
    render_pgbouncer
    local pid ini=$RUN_DIR/pgbouncer.ini
    if pid=$(pgb_pid); then
        if pgb_up; then # ours, on this port
            if ! cmp -s "$ini.new" "$ini"; then
                mv "$ini.new" "$ini"
                say "PgBouncer configuration changed: reloading (clients stay connected)"
                kill -HUP "$pid"
            fi
            rm -f "$ini.new"
            return 0
        fi
        stop_pgbouncer # ours, but on another port
    fi
    mv "$ini.new" "$ini"
    if pgb_up; then
        stop_foreign_pgbouncer
        if pgb_up; then
            # Another checkout's PgBouncer, started from this same template, will do.
            if pgb_compatible; then
                say "using the PgBouncer already on 127.0.0.1:$PGB_PORT (started elsewhere)"
                return 0
            fi
            die "port $PGB_PORT is taken by a PgBouncer that is not ours (stop it, or set PGBOUNCER_PORT)"
        fi
    fi
    rm -f "$RUN_DIR/pgbouncer.pid"
    say "starting PgBouncer on 127.0.0.1:$PGB_PORT (log: var/pgbouncer/pgbouncer.log)"
    if [[ $(id -u) -eq 0 ]]; then # PgBouncer refuses to run as root
        pgbouncer -d -u postgres "$ini"
    else
        pgbouncer -d "$ini"
    fi
    if ! wait_for 30 PgBouncer pgb_up; then
        tail -n 20 "$RUN_DIR/pgbouncer.log" >&2 || true
        exit 1
    fi
}

stop_pgbouncer() {
    local pid
    pid=$(pgb_pid) || { say "PgBouncer is not running"; return 0; }
    say "stopping PgBouncer (pid $pid)"
    kill -INT "$pid" # SIGINT: safe shutdown
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$RUN_DIR/pgbouncer.pid"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$RUN_DIR/pgbouncer.pid"
}

status() {
    local rc=0
    if pg_up; then say "Postgres  up    $PG_HOST:$PG_PORT"; else say "Postgres  down"; rc=1; fi
    if redis_up; then say "Redis     up    127.0.0.1:$REDIS_PORT"; else say "Redis     down"; rc=1; fi
    if pgb_up; then
        say "PgBouncer up    127.0.0.1:$PGB_PORT (pid $(pgb_pid || echo '?'))"
    else
        say "PgBouncer down"; rc=1
    fi
    return $rc
}

case "${1:-}" in
up)
    start_postgres
    start_redis
    create_databases
    start_pgbouncer
    say "ready: DATABASE_URL=postgres://postgres@127.0.0.1:$PGB_PORT/parley REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
    ;;
down) stop_pgbouncer ;;
status) status ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
