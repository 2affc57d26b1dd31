#!/bin/sh
# test-service-gpu.sh: the whole service on a GPU. dsparkd supervises a
# dspark-worker on the cuda backend that serves the bundled model pair
# (models/dspark-tiny-target with its DSpark draft) and measures its step-time
# profile on the GPU at start; jobs go in with dsparkctl and come back through
# PostgreSQL.
#   - 320 greedy jobs at once, in every speculation mode (batches of up to 256
#     sequences): each one's output ids are dspark-generate's target-only
#     greedy output on the same GPU, token for token;
#   - sampled jobs without a draft and with fixed:3, seeded as dspark-generate
#     seeds its prompts: the same output as dspark-generate on the same GPU,
#     run there with other sequences beside them;
#   - a job that needs more KV cache than the worker's pool fails with the
#     reason, and the same worker process runs the next job.
# Where a second GPU answers, dsparkd runs a worker on each of two devices, both
# take jobs, and the outputs of both match the references made on device 0.
# Exit 77 (skipped) where the backend cannot run or PostgreSQL is not found.
# DS_SERVICE_BACKEND=cpu runs the same checks on the CPU backend;
# DS_SERVICE_DEVICES=1 or 2 sets the number of workers.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/e2e-lib.sh"

BACKEND=${DS_SERVICE_BACKEND:-cuda}
TARGET="$DS_SRCDIR/models/dspark-tiny-target"
DRAFT="$DS_SRCDIR/models/dspark-tiny-draft"
MODEL=dspark-tiny-target
PROMPTS="$DS_SRCDIR/examples/prompts.jsonl"
GEN="$DS_BUILDDIR/dspark-generate"
MODES="dspark dspark-async fixed:3 threshold:0.6 none"
COPIES=4   # of the 16 prompts per mode: 320 greedy jobs

skip77() {
    echo "1..0 # SKIP $*"
    exit 77
}
for p in "$DSPARKD" "$WORKER" "$DSPARKCTL" "$GEN"; do
    [ -x "$p" ] || skip77 "$(basename "$p") not built"
done
PGBIN=$(pg_harness_find_bindir)
[ -n "$PGBIN" ] || skip77 "PostgreSQL server binaries (initdb, pg_ctl) not found: set PG_BINDIR"
command -v psql >/dev/null 2>&1 || [ -x "$PGBIN/psql" ] || skip77 "psql not found (PostgreSQL's client)"
# skipped where the build or the host has no usable GPU, failed for anything else
if ! probe=$("$GEN" --backend "$BACKEND" --target "$TARGET" --prompt-ids "1 2" --max-tokens 1 --quiet 2>&1 >/dev/null); then
    case $probe in
    *"no CUDA backend"* | *"CUDA driver version is insufficient"* | *"no CUDA-capable device"* | *cudaSetDevice*)
        skip77 "the $BACKEND backend cannot run here: $(printf '%s\n' "$probe" | head -n 1)" ;;
    esac
    echo "Bail out! dspark-generate --backend $BACKEND fails: $probe"
    exit 1
fi

# two workers where device 1 answers too
DEVICES=${DS_SERVICE_DEVICES:-}
if [ -z "$DEVICES" ]; then
    DEVICES=1
    if [ "$BACKEND" != cpu ] &&
        "$GEN" --backend "$BACKEND" --device 1 --target "$TARGET" --prompt-ids "1 2" --max-tokens 1 --quiet \
            >/dev/null 2>&1; then
        DEVICES=2
    fi
fi
LAST=$((DEVICES - 1))

pg_harness_start
pg_harness_init
T=$(mktemp -d "${TMPDIR:-/tmp}/dspark-svc.XXXXXX")
trap e2e_cleanup EXIT
EP="ipc://$T/events.sock"

# conf FILE DEVICES WORKER-ARGS: dsparkd with a worker on each of DEVICES of $BACKEND
conf() {
    cat >"$1" <<EOF
[dsparkd]
host_name = gpuhost
status_interval = 500ms
reaper_interval = 1s

[database]
dsn = "$DSPARK_DSN"

[events]
endpoint = $EP

[worker]
program = $WORKER
devices = $2
backend = $BACKEND
target = $TARGET
draft = $DRAFT
max_batch = 256
drain_timeout = 5s
args = --threads 2 --lease 60 $3
EOF
}

# ids_of JSONL: "custom_id<TAB>{ids}" for each line of dspark-generate --json,
# prompt i being the examples' demo-i
ids_of() {
    sed -n 's/^{"index":\([0-9]*\),"output_ids":\[\([0-9,]*\)\].*/demo-\1	{\2}/p' "$1"
}

# submit FILE MODE COPIES [OPTIONS]: queue FILE COPIES times as batches in MODE
submit() {
    _f=$1 _m=$2 _c=$3
    shift 3
    _i=0
    while [ "$_i" -lt "$_c" ]; do
        "$DSPARKCTL" submit -q --file "$_f" --spec-mode "$_m" "$@" >/dev/null || return 1
        _i=$((_i + 1))
    done
}

conf "$T/dspark.conf" "0-$LAST" "--sps $T/sps.json"
t0=$(date +%s)
"$DSPARKD" --config "$T/dspark.conf" 2>"$T/dsparkd.log" &
DPID=$!
wait_for "$T/dsparkd.log" "ready: $DEVICES worker" 300
tap_result $? "dsparkd starts $DEVICES $BACKEND dspark-worker(s) on the bundled pair, which become ready ($(($(date +%s) - t0)) s)"
want=
for d in $(seq 0 "$LAST"); do
    want="$want gpuhost/$d|$BACKEND:$d|dspark-tiny-target|dspark-tiny-draft|running|t"
done
tap_is "$(q "SELECT string_agg(concat_ws('|', worker_id, device, model, draft, state,
                                      jsonb_array_length(sps_profile->'tokens') > 1), ' ' ORDER BY worker_id)
             FROM dspark.workers")" "${want# }" \
    "each worker registered on its device ($BACKEND:0 to $BACKEND:$LAST) with a step-time profile"
tap_ok "... measured at start on that backend and written to --sps" grep -q '"tokens"' "$T/sps.json"

# the references: dspark-generate on the same backend, target-only greedy, and
# sampled without a draft and with fixed:3 (prompt i seeded 100 + i)
awk '{ sub(/}}$/, ", \"seed\": " (99 + NR) "}}"); print }' "$PROMPTS" >"$T/sampled.jsonl"
"$GEN" --backend "$BACKEND" --target "$TARGET" --prompts "$PROMPTS" --temperature 0 --max-tokens 96 --concurrency 16 \
    --threads 2 --json --quiet >"$T/greedy.json" 2>"$T/gen.log" &&
    "$GEN" --backend "$BACKEND" --target "$TARGET" --prompts "$T/sampled.jsonl" --temperature 0.8 --top-p 0.95 --max-tokens 96 \
        --seed 100 --concurrency 16 --threads 2 --json --quiet >"$T/sampled-none.json" 2>>"$T/gen.log" &&
    "$GEN" --backend "$BACKEND" --target "$TARGET" --draft "$DRAFT" --spec fixed:3 --prompts "$T/sampled.jsonl" \
        --temperature 0.8 --top-p 0.95 --max-tokens 96 --seed 100 --concurrency 3 --threads 2 --json --quiet \
        >"$T/sampled-fixed.json" 2>>"$T/gen.log"
tap_result $? "dspark-generate --backend $BACKEND gives the reference outputs"
{ ids_of "$T/greedy.json" | sed 's/^/greedy	/'
  ids_of "$T/sampled-none.json" | sed 's/^/sampled-none	/'
  ids_of "$T/sampled-fixed.json" | sed 's/^/sampled-fixed:3	/'; } >"$T/refs.tsv"
tap_is "$(wc -l <"$T/refs.tsv" | tr -d ' ')" "48" "... for the 16 prompts, three ways"
q "CREATE TABLE ref (kind text, custom_id text, ids int[])" >/dev/null
psql -X -q -v ON_ERROR_STOP=1 -c "\\copy ref FROM '$T/refs.tsv'" >/dev/null

# the greedy jobs in every mode, and the sampled ones, all queued before the
# worker claims (run_after), so that they run in large batches
t0=$(date +%s)
due=$(q "SELECT now() + interval '5 s'")
for m in $MODES; do
    submit "$PROMPTS" "$m" "$COPIES" --temperature 0 --run-after "$due" || break
done
submit "$T/sampled.jsonl" none 1 --temperature 0.8 --top-p 0.95 --run-after "$due" &&
    submit "$T/sampled.jsonl" fixed:3 1 --temperature 0.8 --top-p 0.95 --run-after "$due"
tap_is "$(q "SELECT count(*) FROM dspark.jobs")" "$((16 * COPIES * 5 + 32))" "$((16 * COPIES * 5)) greedy and 32 sampled jobs queued"
wait_sql "SELECT count(*) FROM dspark.jobs WHERE state IN ('queued', 'running')" 0 600
tap_result $? "all of them finish ($(($(date +%s) - t0)) s)"
tap_is "$(q "SELECT string_agg(state || ':' || n, ' ') FROM (SELECT state, count(*) n FROM dspark.jobs GROUP BY state) s")" \
    "succeeded:$((16 * COPIES * 5 + 32))" "every job succeeded"
tap_diag "$(q "SELECT 'most jobs claimed at once: ' || max(n) FROM (SELECT count(*) n FROM dspark.jobs GROUP BY started_at) s")"

for m in $MODES; do
    tap_is "$(q "SELECT count(*) || '|' || count(*) FILTER (WHERE j.output_ids = r.ids)
                 FROM dspark.jobs j JOIN ref r ON r.kind = 'greedy' AND r.custom_id = j.custom_id
                 WHERE j.temperature = 0 AND j.spec_mode = '$m'")" "$((16 * COPIES))|$((16 * COPIES))" \
        "greedy, $m: every job's output is the target-only greedy output, token for token"
done
for m in none fixed:3; do
    tap_is "$(q "SELECT count(*) || '|' || count(*) FILTER (WHERE j.output_ids = r.ids)
                 FROM dspark.jobs j JOIN ref r ON r.kind = 'sampled-$m' AND r.custom_id = j.custom_id
                 WHERE j.temperature > 0 AND j.spec_mode = '$m'")" "16|16" \
        "sampled (T 0.8, top-p 0.95), $m: the same output as dspark-generate with the same seeds"
done
tap_is "$(q "SELECT count(DISTINCT j.output_ids) FROM dspark.jobs j WHERE j.temperature > 0")" "32" \
    "... and the sampled outputs differ from prompt to prompt and from way to way"
tap_is "$(q "SELECT count(*) FILTER (WHERE s.device LIKE '$BACKEND:_' AND s.decode_tokens_per_s > 0
                                     AND s.output_tokens = cardinality(j.output_ids)
                                     AND s.mean_acceptance_length >= 1)
             || '|' || count(*) FILTER (WHERE j.spec_mode <> 'none' AND s.num_draft_tokens > 0
                                        AND s.num_accepted_tokens > 0)
             FROM dspark.jobs j JOIN dspark.job_stats s ON s.job_id = j.id")" \
    "$((16 * COPIES * 5 + 32))|$((16 * COPIES * 4 + 16))" \
    "statistics: every job on a $BACKEND device with tokens/s and tau; every speculative job drafted and accepted drafts"
tap_is "$(q "SELECT count(DISTINCT s.device) FROM dspark.job_stats s")" "$DEVICES" \
    "the jobs ran on all $DEVICES device(s): $(q "SELECT string_agg(device || ' ' || n, ', ' ORDER BY device)
                                                   FROM (SELECT device, count(*) n FROM dspark.job_stats GROUP BY 1) x")"
tap_diag "$(q "SELECT 'output tokens ' || sum(s.output_tokens) || ', '
                      || round((sum(s.output_tokens) / extract(epoch FROM max(j.finished_at) - min(j.started_at)))::numeric)
                      || ' tok/s over the run; tau by mode: '
                      || (SELECT string_agg(spec_mode || ' ' || round(t::numeric, 2), ', ' ORDER BY spec_mode)
                          FROM (SELECT j2.spec_mode, avg(s2.mean_acceptance_length) t
                                FROM dspark.jobs j2 JOIN dspark.job_stats s2 ON s2.job_id = j2.id
                                WHERE j2.temperature = 0 GROUP BY 1) x)
               FROM dspark.jobs j JOIN dspark.job_stats s ON s.job_id = j.id")"

# a job larger than the KV pool: the worker fails it and goes on
stop_dsparkd
tap_is "$DRC" "0" "SIGTERM: dsparkd and its worker stop cleanly"
conf "$T/small.conf" 0 "--sps $T/sps.json --kv-tokens 256"
"$DSPARKD" --config "$T/small.conf" 2>"$T/dsparkd2.log" &
DPID=$!
wait_for "$T/dsparkd2.log" "ready: 1 worker" 300
tap_result $? "a worker with a pool of 256 KV tokens becomes ready"
wpid=$(q "SELECT pid FROM dspark.workers WHERE state = 'running' AND worker_id = 'gpuhost/0'")
big=$("$DSPARKCTL" submit -q -m "$MODEL" --temperature 0 --max-tokens 400 "def f(x):")
small=$("$DSPARKCTL" submit -q -m "$MODEL" --temperature 0 --max-tokens 16 "def g(y):")
wait_sql "SELECT count(*) FROM dspark.jobs WHERE id IN ($big, $small) AND state IN ('queued', 'running')" 0 60
tap_like "$(q "SELECT state || ': ' || coalesce(error, '') FROM dspark.jobs WHERE id = $big")" \
    "^failed: .*more than the pool holds" "the job too large for the pool fails, saying why"
tap_is "$(q "SELECT state || '|' || cardinality(output_ids) FROM dspark.jobs WHERE id = $small")" "succeeded|16" \
    "the next job succeeds"
tap_is "$(q "SELECT pid || '|' || state FROM dspark.workers WHERE pid = $wpid")" "$wpid|running" \
    "... on the same worker process"
stop_dsparkd
tap_is "$DRC" "0" "dsparkd stops cleanly"
tap_done
