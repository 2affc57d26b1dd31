#!/bin/sh
# scripts/demo.sh: the whole service end to end, on one machine, in a couple of minutes.
#
#   1. installs the build dependencies (./setup.sh) and builds (scripts/build.sh);
#   2. starts a private PostgreSQL in a temporary directory (unix socket only);
#   3. creates the dspark schema (dsparkctl db init);
#   4. starts dsparkd with one CPU dspark-worker on the bundled model pair
#      (models/dspark-tiny-target + its DSpark draft models/dspark-tiny-draft);
#   5. submits examples/prompts.jsonl (16 Python completions, OpenAI Batch format),
#      waits for them with progress, prints some outputs and the statistics;
#   6. stops everything and removes the temporary directory (also on Ctrl-C).
#
# Environment:
#   DSPARK_BUILDDIR    use this existing build directory instead of building ./build
#   DSPARK_DEMO_SETUP  0: do not run ./setup.sh (default 1; skipped with DSPARK_BUILDDIR)
#   DSPARK_DEMO_THREADS  CPU threads for the worker (default: all)
#   DSPARK_DEMO_SPEC   speculation mode of the demo jobs (default dspark-async)
#   DSPARK_DEMO_TEMPERATURE  sampling temperature of the demo jobs (default 0: greedy)
#   DSPARK_DEMO_KEEP   1: leave the database and logs in place and print where
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
[ -t 1 ] || say() { printf '\n==> %s\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

# ---- 1. dependencies and build ------------------------------------------------
if [ -n "${DSPARK_BUILDDIR:-}" ]; then
    B=$(cd "$DSPARK_BUILDDIR" && pwd)
else
    if [ "${DSPARK_DEMO_SETUP:-1}" != 0 ]; then
        say "installing dependencies (./setup.sh)"
        ./setup.sh
    fi
    say "building (scripts/build.sh)"
    scripts/build.sh
    B=$top/build
fi
for p in dsparkctl dsparkd dspark-worker; do
    [ -x "$B/$p" ] || die "'$B/$p' is missing: the build did not finish"
done

# ---- 2. a private PostgreSQL ---------------------------------------------------
pg_bindir=
for d in /usr/lib/postgresql/*/bin /usr/pgsql-*/bin; do
    [ -x "$d/initdb" ] && pg_bindir=$d
done
[ -n "$pg_bindir" ] || die "PostgreSQL server binaries not found (run ./setup.sh)"
PATH="$pg_bindir:$PATH"
export PATH

T=$(mktemp -d "${TMPDIR:-/tmp}/dspark-demo.XXXXXX")
chmod 0755 "$T"
# initdb and postgres refuse to run as root: then the server runs as an
# unprivileged system user that owns only its data directory
runas=
if [ "$(id -u)" = 0 ]; then
    id dspark-demo >/dev/null 2>&1 ||
        useradd --system --no-create-home --shell /usr/sbin/nologin dspark-demo >/dev/null 2>&1 || true
    if id dspark-demo >/dev/null 2>&1; then runas=dspark-demo; else runas=nobody; fi
    chown "$runas" "$T"
fi
as_owner() {
    if [ -z "$runas" ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$runas" -- "$@"
    else
        su -s /bin/sh "$runas" -c '"$0" "$@"' "$@"
    fi
}

DPID=
cleanup() {
    rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$DPID" ] && kill -0 "$DPID" 2>/dev/null; then
        echo "demo: stopping dsparkd"
        kill -TERM "$DPID" 2>/dev/null
        n=0
        while kill -0 "$DPID" 2>/dev/null && [ $n -lt 150 ]; do sleep 0.1; n=$((n + 1)); done
        kill -KILL "$DPID" 2>/dev/null || true
    fi
    if [ -f "$T/data/postmaster.pid" ]; then
        echo "demo: stopping PostgreSQL"
        as_owner pg_ctl -D "$T/data" -s -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [ "${DSPARK_DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: kept $T (logs: $T/dsparkd.log, $T/postgres.log)"
    elif [ $rc -ne 0 ] && [ -f "$T/dsparkd.log" ]; then
        echo "demo: failed; the last lines of the dsparkd log:" >&2
        tail -n 30 "$T/dsparkd.log" >&2
        rm -rf "$T"
    else
        rm -rf "$T"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

say "starting a private PostgreSQL in $T"
as_owner initdb -D "$T/data" -A trust -U postgres -E UTF8 --locale=C --no-sync >"$T/initdb.log" 2>&1 ||
    { cat "$T/initdb.log" >&2; die "initdb failed"; }
cat >>"$T/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$T'
fsync = off
synchronous_commit = off
log_min_messages = warning
EOF
as_owner pg_ctl -D "$T/data" -l "$T/postgres.log" -s -w -t 60 start ||
    { cat "$T/postgres.log" >&2; die "PostgreSQL did not start"; }
export PGHOST="$T" PGPORT=5432 PGUSER=postgres
psql -X -q -d postgres -c 'CREATE DATABASE dspark' >/dev/null
DSPARK_DSN="host=$T port=5432 user=postgres dbname=dspark"
PGDATABASE=dspark
export DSPARK_DSN PGDATABASE

# ---- 3. schema -------------------------------------------------------------------
say "creating the dspark schema (dsparkctl db init)"
"$B/dsparkctl" db init

# ---- 4. dsparkd with one CPU worker ---------------------------------------------
threads=${DSPARK_DEMO_THREADS:-0}
cat >"$T/dspark.conf" <<EOF
[dsparkd]
host_name = demo
reaper_interval = 2s

[database]
dsn = "$DSPARK_DSN"

[events]
endpoint = ipc://$T/events.sock

[worker]
program = $B/dspark-worker
devices = 0
backend = cpu
target = $top/models/dspark-tiny-target
draft = $top/models/dspark-tiny-draft
max_batch = 16
drain_timeout = 10s
args = --threads $threads
EOF
say "starting dsparkd with one CPU worker on models/dspark-tiny-target + models/dspark-tiny-draft"
"$B/dsparkd" --config "$T/dspark.conf" 2>"$T/dsparkd.log" &
DPID=$!
n=0
until grep -q 'ready: 1 worker' "$T/dsparkd.log" 2>/dev/null; do
    kill -0 "$DPID" 2>/dev/null || { cat "$T/dsparkd.log" >&2; die "dsparkd exited"; }
    [ $n -lt 1800 ] || { tail -n 20 "$T/dsparkd.log" >&2; die "the worker did not get ready in 3 minutes"; }
    sleep 0.1
    n=$((n + 1))
done
sed -n 's/^<[0-9]>//p' "$T/dsparkd.log" | grep -E 'loaded model|step-time|ready' | sed 's/^/    /'
"$B/dsparkctl" workers

# ---- 5. jobs ---------------------------------------------------------------------
spec=${DSPARK_DEMO_SPEC:-dspark-async}
temp=${DSPARK_DEMO_TEMPERATURE:-0}
say "submitting examples/prompts.jsonl ($(wc -l <examples/prompts.jsonl) prompts, speculation '$spec', temperature $temp)"
"$B/dsparkctl" submit --file examples/prompts.jsonl --spec-mode "$spec" --temperature "$temp" --metadata '{"demo": true}' \
    | tee "$T/submit.out"
batch=$(sed -n 's/^batch \([0-9][0-9]*\):.*/\1/p' "$T/submit.out")
[ -n "$batch" ] || die "could not read the batch id"

say "waiting for batch $batch"
t0=$(date +%s)
if [ -t 2 ]; then
    "$B/dsparkctl" wait --batch "$batch" --timeout 600 || die "the batch did not succeed"
else
    # no terminal, no progress bar: print the counts every few seconds
    "$B/dsparkctl" wait --batch "$batch" --timeout 600 &
    wpid=$!
    while kill -0 "$wpid" 2>/dev/null; do
        psql -X -A -t -c "SELECT format('    %s/%s done, %s running, %s output tokens', done, total, running,
                          output_tokens) FROM dspark.batch_progress WHERE batch_id = $batch"
        sleep 3
    done
    wait "$wpid" || die "the batch did not succeed"
fi
echo "    all $(wc -l <examples/prompts.jsonl) jobs done in $(($(date +%s) - t0)) s"

say "three of the outputs (prompt, then the completion in brackets)"
psql -X -A -t -c "SELECT j.prompt || '[' || coalesce(j.output_text, '') || ']' || E'\n' ||
                         format('    -- %s: %s tokens, %s, tau %s, %s tokens/s', j.custom_id, s.output_tokens,
                                j.finish_reason, round(s.mean_acceptance_length::numeric, 2),
                                round(s.decode_tokens_per_s::numeric, 1)) || E'\n'
                  FROM dspark.jobs j JOIN dspark.job_stats s ON s.job_id = j.id AND s.attempt = j.attempt
                  WHERE j.batch_id = $batch ORDER BY j.id LIMIT 3"

say "statistics (dsparkctl stats --batch $batch)"
"$B/dsparkctl" stats --batch "$batch"

say "the results as the OpenAI Batch API writes them (dsparkctl results, first line)"
"$B/dsparkctl" results --batch "$batch" | head -n 1 | cut -c 1-400
echo
say "done; stopping the service"
