# e2e-lib.sh: shared set-up of the end-to-end tests (test-e2e-*.sh): a private
# PostgreSQL (pg-harness.sh), dsparkd with real dspark-workers on the small test
# model pair, and helpers to wait for things. Source it, then call e2e_start.
#
# The models are tests/data/models/pair-target (no tokenizer: prompts are token
# ids) with the DSpark draft tests/data/drafts/draft-vanilla; random weights, so
# outputs are arbitrary but deterministic, and a job of 400 tokens takes a
# fraction of a second.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/pg-harness.sh"

E2E_TARGET="$DS_SRCDIR/tests/data/models/pair-target"
E2E_DRAFT="$DS_SRCDIR/tests/data/drafts/draft-vanilla"
E2E_MODEL=pair-target
DSPARKD="$DS_BUILDDIR/dsparkd"
WORKER="$DS_BUILDDIR/dspark-worker"
SUB="$DS_BUILDDIR/tests/integration/test-daemon-sub"
E2E_PIDS=
DPID=

# e2e_start: skip when something is missing, start PostgreSQL, create the
# schema, make $T (a temporary directory) and the step-time profile $T/sps.json.
e2e_start() {
    for p in "$DSPARKD" "$WORKER" "$DSPARKCTL" "$DS_BUILDDIR/dspark-generate"; do
        [ -x "$p" ] || tap_skip_all "$(basename "$p") not built"
    done
    pg_harness_start
    pg_harness_init
    T=$(mktemp -d "${TMPDIR:-/tmp}/dspark-e2e.XXXXXX")
    trap e2e_cleanup EXIT
    # the profile once, shared by every worker of the test (measuring it takes
    # longer than the test's jobs)
    "$DS_BUILDDIR/dspark-generate" --target "$E2E_TARGET" --draft "$E2E_DRAFT" --prompt-ids "1 2 3" \
        --max-tokens 2 --concurrency 32 --threads 1 --quiet --save-sps "$T/sps.json" >/dev/null 2>&1 ||
        { echo "Bail out! could not measure the step-time profile"; exit 1; }
}

e2e_cleanup() {
    # server processes a test stopped (SIGSTOP) must go on for the server to stop
    [ -n "${E2E_STOPPED:-}" ] && kill -CONT $E2E_STOPPED 2>/dev/null
    [ -n "$DPID" ] && kill -KILL "$DPID" 2>/dev/null
    for p in $E2E_PIDS; do kill -KILL "$p" 2>/dev/null; done
    # workers started by dsparkd are in their own process groups
    kill_workers
    if [ "${tap_failed:-0}" -gt 0 ] 2>/dev/null; then
        for f in "$T"/*.log; do
            [ -f "$f" ] || continue
            echo "# --- $(basename "$f") (last 40 lines)"
            tail -n 40 "$f" | sed 's/^/#   /'
        done
    fi
    rm -rf "$T"
    pg_harness_stop
}

# Kill the workers this test's dsparkd started (by the pids in dspark.workers,
# if the database still answers), never by name.
kill_workers() {
    [ -n "${PGH_DIR:-}" ] || return 0
    for p in $(psql -X -q -A -t -c "SELECT pid FROM dspark.workers WHERE state <> 'stopped'" 2>/dev/null); do
        if [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -q "dspark-worker"; then
            kill -KILL "$p" 2>/dev/null
        fi
    done
}

# wait_sql SQL EXPECTED SECONDS: until the query prints EXPECTED.
wait_sql() {
    _n=0
    _max=$(($3 * 5))
    while [ $_n -lt $_max ]; do
        [ "$(q "$1" 2>/dev/null)" = "$2" ] && return 0
        sleep 0.2
        _n=$((_n + 1))
    done
    return 1
}

# write_conf FILE DEVICES WORKER-ARGS [EXTRA-DSPARKD-LINES]: a dsparkd
# configuration with real workers on the test model pair.
write_conf() {
    cat >"$1" <<EOF
[dsparkd]
host_name = testhost
status_interval = 500ms
reaper_interval = 1s
log_level = debug
$4

[database]
dsn = "$DSPARK_DSN"

[events]
endpoint = ipc://$T/events.sock
heartbeat_interval = 500ms

[worker]
program = $WORKER
devices = $2
backend = cpu
target = $E2E_TARGET
draft = $E2E_DRAFT
max_batch = 32
drain_timeout = 5s
restart_delay = 200ms
args = --threads 1 --sps $T/sps.json $3
EOF
}

# start_dsparkd CONF LOG N: start dsparkd, wait until its N workers are ready.
start_dsparkd() {
    "$DSPARKD" --config "$1" 2>"$2" &
    DPID=$!
    wait_for "$2" "ready: $3 worker" 60
}

# stop_dsparkd: SIGTERM, wait; dsparkd's exit status in $DRC.
stop_dsparkd() {
    kill -TERM "$DPID" 2>/dev/null
    wait "$DPID"
    DRC=$?
    DPID=
}

# insert_jobs N MAX_TOKENS [SPEC_MODE]: N jobs of the test model with
# token-id prompts of 3..10 tokens, greedy (spec_mode default 'dspark').
insert_jobs() {
    q "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, temperature, seed, spec_mode)
       SELECT '$E2E_MODEL', ARRAY(SELECT (g * 7 + k * 13) % 500 FROM generate_series(1, 3 + g % 8) k),
              $2, 0, g, '${3:-dspark}'
       FROM generate_series(1, $1) g" >/dev/null
}
