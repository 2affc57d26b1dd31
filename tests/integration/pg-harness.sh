# pg-harness.sh: a private PostgreSQL for one integration test, and TAP helpers.
#
# Source it from a test script, then call pg_harness_start:
#
#   . "$DS_SRCDIR/tests/integration/pg-harness.sh"
#   pg_harness_start            # or prints "1..0 # SKIP ..." and exits
#   psql -c 'select 1'          # PGHOST/PGPORT/PGUSER/PGDATABASE point at it
#
# The server runs from a fresh initdb in a temporary directory (trust
# authentication, fsync off, no TCP: a unix socket in that directory only) and
# is stopped and removed when the script exits. initdb and the server refuse
# to run as root: as root they run as the system user dspark-test (created
# when missing) or, failing that, nobody. Server binaries come from
# $PG_BINDIR (set by make check from configure) or /usr/lib/postgresql/*/bin.
#
# Exports: PGHOST PGPORT PGUSER PGDATABASE DSPARK_DSN, PGH_DIR (the temporary
# directory), PGH_CTL (a command line running pg_ctl on the cluster as the
# right user), DSPARKCTL (the dsparkctl under test), DS_SRCDIR, DS_BUILDDIR.

: "${DS_SRCDIR:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${DS_BUILDDIR:=$(pwd)}"
export DS_SRCDIR DS_BUILDDIR
DSPARKCTL="$DS_BUILDDIR/dsparkctl"
export DSPARKCTL

# TAP helpers --------------------------------------------------------------
tap_n=0
tap_failed=0

# ok COND-EXIT-STATUS DESCRIPTION: "ok N - desc" when the status is 0.
tap_result() {
    tap_n=$((tap_n + 1))
    if [ "$1" -eq 0 ]; then
        echo "ok $tap_n - $2"
    else
        echo "not ok $tap_n - $2"
        tap_failed=$((tap_failed + 1))
    fi
}

# tap_ok DESCRIPTION COMMAND...: passes when the command succeeds.
tap_ok() {
    _d=$1
    shift
    "$@" >/dev/null 2>&1
    tap_result $? "$_d"
}

# tap_is GOT EXPECTED DESCRIPTION
tap_is() {
    if [ "$1" = "$2" ]; then
        tap_result 0 "$3"
    else
        tap_result 1 "$3"
        echo "#   got:      '$1'"
        echo "#   expected: '$2'"
    fi
}

# tap_like TEXT PATTERN DESCRIPTION: TEXT contains PATTERN (grep -E).
tap_like() {
    if printf '%s\n' "$1" | grep -Eq -- "$2"; then
        tap_result 0 "$3"
    else
        tap_result 1 "$3"
        printf '%s\n' "$1" | head -n 5 | sed 's/^/#   got: /'
        echo "#   expected to match: $2"
    fi
}

tap_diag() {
    printf '%s\n' "$*" | sed 's/^/# /'
}

# tap_done: print the plan and exit with the right status.
tap_done() {
    echo "1..$tap_n"
    [ "$tap_failed" -eq 0 ]
    exit $?
}

# tap_skip DESCRIPTION REASON: a skipped test point.
tap_skip() {
    tap_n=$((tap_n + 1))
    echo "ok $tap_n - $1 # SKIP $2"
}

# py EXPR FILE: evaluate a Python expression over the JSON document in FILE
# (bound to d; for a FILE named *.jsonl, d is the list of its lines) and print
# the result.
# Returns 2 when python3 is absent (callers skip).
have_python() {
    command -v python3 >/dev/null 2>&1
}
py() {
    have_python || return 2
    python3 - "$2" "$1" <<'PYEOF'
import json, sys
text = open(sys.argv[1], encoding="utf-8").read()
if sys.argv[1].endswith(".jsonl"):
    d = [json.loads(line) for line in text.splitlines() if line.strip()]
else:
    d = json.loads(text)
print(eval(sys.argv[2], {"d": d, "json": json}))
PYEOF
}

# tap_py DESCRIPTION EXPR FILE: passes when EXPR over the JSON in FILE is True.
tap_py() {
    if ! have_python; then
        tap_skip "$1" "python3 not found"
        return
    fi
    _got=$(py "$2" "$3" 2>&1)
    if [ "$_got" = True ]; then
        tap_result 0 "$1"
    else
        tap_result 1 "$1"
        printf '%s\n' "$_got" | tail -n 3 | sed 's/^/#   /'
        echo "#   expression: $2"
    fi
}

# wait_for FILE REGEX SECONDS: until a line of FILE matches (every 0.1 s); 1 when none did in time.
wait_for() {
    _n=0
    _max=$(($3 * 10))
    while [ $_n -lt $_max ]; do
        grep -Eq -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
        _n=$((_n + 1))
    done
    return 1
}

tap_skip_all() {
    echo "1..0 # SKIP $*"
    exit 0
}

# The server ---------------------------------------------------------------
pg_harness_find_bindir() {
    if [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/initdb" ]; then
        echo "$PG_BINDIR"
        return 0
    fi
    for d in /usr/lib/postgresql/*/bin /usr/pgsql-*/bin; do
        [ -x "$d/initdb" ] && _found=$d
    done
    [ -n "${_found:-}" ] && echo "$_found"
}

# Run a command as the cluster's owner.
pg_harness_as_owner() {
    if [ -z "$PGH_RUNAS" ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$PGH_RUNAS" -- "$@"
    elif command -v setpriv >/dev/null 2>&1; then
        setpriv --reuid="$PGH_RUNAS" --regid="$(id -g "$PGH_RUNAS")" --clear-groups -- "$@"
    else
        su -s /bin/sh "$PGH_RUNAS" -c '"$0" "$@"' "$@"
    fi
}

pg_harness_stop() {
    if [ -n "${PGH_DIR:-}" ] && [ -d "$PGH_DIR" ]; then
        if [ -f "$PGH_DIR/data/postmaster.pid" ]; then
            pg_harness_as_owner "$PGH_BINDIR/pg_ctl" -D "$PGH_DIR/data" -s -m immediate -w stop \
                >/dev/null 2>&1
        fi
        if [ -n "${PGH_KEEP_LOG:-}" ] && [ -f "$PGH_DIR/server.log" ]; then
            cp "$PGH_DIR/server.log" "$PGH_KEEP_LOG" 2>/dev/null
        fi
        rm -rf "$PGH_DIR"
    fi
    PGH_DIR=
}

pg_harness_start() {
    PGH_BINDIR=$(pg_harness_find_bindir)
    if [ -z "$PGH_BINDIR" ]; then
        tap_skip_all "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql or set PG_BINDIR"
    fi
    command -v psql >/dev/null 2>&1 || PATH="$PGH_BINDIR:$PATH"
    command -v psql >/dev/null 2>&1 || tap_skip_all "psql not found"

    PGH_RUNAS=
    if [ "$(id -u)" = 0 ]; then
        if ! id dspark-test >/dev/null 2>&1; then
            useradd --system --no-create-home --shell /usr/sbin/nologin dspark-test \
                >/dev/null 2>&1 || true
        fi
        if id dspark-test >/dev/null 2>&1; then
            PGH_RUNAS=dspark-test
        else
            PGH_RUNAS=nobody
        fi
    fi

    PGH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/dspark-pg.XXXXXX") || tap_skip_all "mktemp failed"
    export PGH_DIR
    trap 'pg_harness_stop' EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
    if [ -n "$PGH_RUNAS" ]; then
        chown "$PGH_RUNAS" "$PGH_DIR"
        chmod 0755 "$PGH_DIR"
    fi

    if ! pg_harness_as_owner "$PGH_BINDIR/initdb" -D "$PGH_DIR/data" -A trust --no-sync \
            -U postgres -E UTF8 --locale=C >"$PGH_DIR/initdb.log" 2>&1; then
        echo "Bail out! initdb failed"
        sed 's/^/# /' "$PGH_DIR/initdb.log"
        exit 1
    fi
    cat >>"$PGH_DIR/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$PGH_DIR'
port = 5432
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 40
shared_buffers = 64MB
log_min_messages = warning
log_min_error_statement = panic
EOF
    PGH_CTL="$PGH_BINDIR/pg_ctl -D $PGH_DIR/data -l $PGH_DIR/server.log"
    PGH_SCRIPT="$DS_SRCDIR/tests/integration/pg-harness.sh"
    export PGH_CTL PGH_BINDIR PGH_RUNAS PGH_SCRIPT
    if ! pg_harness_as_owner $PGH_CTL -w -s -t 30 start >/dev/null 2>&1; then
        echo "Bail out! the PostgreSQL server did not start"
        sed 's/^/# /' "$PGH_DIR/server.log"
        exit 1
    fi
    PGHOST=$PGH_DIR
    PGPORT=5432
    PGUSER=postgres
    PGDATABASE=dspark
    DSPARK_DSN="host=$PGH_DIR port=5432 user=postgres dbname=dspark"
    export PGHOST PGPORT PGUSER PGDATABASE DSPARK_DSN
    unset PGPASSWORD PGSERVICE PGOPTIONS
    psql -X -q -d postgres -c 'CREATE DATABASE dspark' >/dev/null ||
        { echo "Bail out! createdb failed"; exit 1; }
}

# pg_harness_ctl ARGS: pg_ctl on the cluster (restart, stop, start) as its owner.
pg_harness_ctl() {
    pg_harness_as_owner $PGH_CTL "$@"
}

# pg_harness_init: apply the migrations with dsparkctl.
pg_harness_init() {
    "$DSPARKCTL" db init >/dev/null || { echo "Bail out! dsparkctl db init failed"; exit 1; }
}

# race_migrate CONNINFO: two 'dsparkctl db migrate' at once on one database;
# prints their exit statuses ("00" when both succeed).
race_migrate() {
    "$DSPARKCTL" -d "$1" db migrate >/dev/null 2>&1 &
    _rm1=$!
    "$DSPARKCTL" -d "$1" db migrate >/dev/null 2>&1 &
    _rm2=$!
    wait $_rm1
    _rr1=$?
    wait $_rm2
    echo "$_rr1$?"
}

# q SQL: run SQL with psql, unaligned, tuples only, stop on error.
q() {
    psql -X -q -A -t -v ON_ERROR_STOP=1 -c "$1"
}

# stop_idle PID: SIGSTOP the server process PID at a moment it waits for its client (pg_stat_activity's
# state idle: it runs no statement and holds no lock), trying for up to 5 s; status 1 when it never was.
# The caller sends SIGCONT (the server cannot stop while one of its processes is stopped).
stop_idle() {
    _n=0
    while [ $_n -lt 100 ]; do
        kill -STOP "$1" 2>/dev/null || return 1
        [ "$(q "SELECT state FROM pg_stat_activity WHERE pid = $1")" = idle ] && return 0
        kill -CONT "$1"
        sleep 0.05
        _n=$((_n + 1))
    done
    return 1
}

# end_of PID TENTHS: wait up to TENTHS tenths of a second for the background job PID to end (then kill it);
# sets took (seconds waited) and rc (its exit status).
end_of() {
    _start=$(date +%s)
    _n=0
    while kill -0 "$1" 2>/dev/null && [ $_n -lt "$2" ]; do sleep 0.1; _n=$((_n + 1)); done
    took=$(($(date +%s) - _start))
    kill -0 "$1" 2>/dev/null && kill -KILL "$1"
    wait "$1"
    rc=$?
}

# q_as ROLE SQL: the same as login role ROLE.
q_as() {
    psql -X -q -A -t -v ON_ERROR_STOP=1 -U "$1" -c "$2"
}
