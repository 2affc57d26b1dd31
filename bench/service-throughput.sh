#!/bin/sh
# service-throughput.sh: output tokens/s of the whole service against the
# engine alone, side by side in one run. The service: jobs queued with
# 'dsparkctl submit', due together, claimed from PostgreSQL by the
# dspark-worker that dsparkd supervises, written back with their statistics;
# each spec's run has a worker of its own that starts cold, as dspark-generate
# does (the step-time profile is measured once beforehand and loaded by both);
# timed from the first claim (started_at) to the last finish (finished_at),
# and the first claim's wait after the jobs were due (the worker's poll: due
# jobs wake no one).
# The engine alone: dspark-generate on the same prompts with the same model
# pair, backend, batch size and step-time profile. Greedy, so both give the
# same outputs and the same token counts.
#
# Usage (from the build directory): sh SRCDIR/bench/service-throughput.sh PROMPTS.jsonl
# PROMPTS: DeepSpec lines ({"turns": [...]}: the first turn), {"prompt": ...}
# or OpenAI Batch lines with body.prompt; each is sent as raw text.
# Environment: BACKEND (auto: cuda where a GPU exists), PROMPTS_N (prompts
# taken from the file, default 64), COPIES (times each is queued, default 8),
# MAX_TOKENS (default 128), MAX_BATCH (default 256), SPECS (default
# "none dspark"), TARGET and DRAFT (default the bundled pair), THREADS (CPU
# threads, default 2), PG_BINDIR. Prints a table; exits 1 on failure.
set -u
: "${DS_SRCDIR:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${DS_BUILDDIR:=$(pwd)}"
export DS_SRCDIR DS_BUILDDIR
PROMPTS=${1:?usage: sh SRCDIR/bench/service-throughput.sh PROMPTS.jsonl}
BACKEND=${BACKEND:-auto}
PROMPTS_N=${PROMPTS_N:-64}
COPIES=${COPIES:-8}
MAX_TOKENS=${MAX_TOKENS:-128}
MAX_BATCH=${MAX_BATCH:-256}
SPECS=${SPECS:-none dspark}
TARGET=${TARGET:-$DS_SRCDIR/models/dspark-tiny-target}
DRAFT=${DRAFT:-$DS_SRCDIR/models/dspark-tiny-draft}
THREADS=${THREADS:-2}
MODEL=$(basename "$TARGET")
for p in dsparkd dspark-worker dsparkctl dspark-generate; do
    [ -x "$DS_BUILDDIR/$p" ] || { echo "service-throughput.sh: build $p first (make)" >&2; exit 1; }
done
command -v python3 >/dev/null 2>&1 || { echo "service-throughput.sh: needs python3" >&2; exit 1; }

. "$DS_SRCDIR/tests/integration/pg-harness.sh"
# the harness skips a test without PostgreSQL; a benchmark fails
tap_skip_all() {
    echo "service-throughput.sh: $*" >&2
    exit 1
}
pg_harness_start >/dev/null
pg_harness_init
T=$PGH_DIR
DPID=
trap 'stop_dsparkd; pg_harness_stop' EXIT

stop_dsparkd() {
    [ -n "$DPID" ] || return 0
    kill -TERM "$DPID" 2>/dev/null
    wait "$DPID" 2>/dev/null
    DPID=
}

die() {
    echo "service-throughput.sh: $*" >&2
    for f in "$T"/*.log; do [ -f "$f" ] && tail -n 20 "$f" | sed "s|^|$(basename "$f"): |" >&2; done
    exit 1
}

# the requests: PROMPTS_N prompts as raw text, COPIES times each
python3 - "$PROMPTS" "$PROMPTS_N" "$COPIES" "$MODEL" "$MAX_TOKENS" >"$T/requests.jsonl" <<'PYEOF' || die "could not read $PROMPTS"
import json, sys
path, n, copies, model, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
texts = []
for line in open(path, encoding="utf-8"):
    if not line.strip():
        continue
    o = json.loads(line)
    t = o["turns"][0] if "turns" in o else o.get("prompt", o.get("body", {}).get("prompt"))
    if isinstance(t, str) and t:
        texts.append(t)
    if len(texts) == n:
        break
for c in range(copies):
    for i, t in enumerate(texts):
        print(json.dumps({"custom_id": "p%d-%d" % (i, c), "method": "POST", "url": "/v1/completions",
                          "body": {"model": model, "prompt": t, "max_tokens": max_tokens}}))
PYEOF
JOBS=$(wc -l <"$T/requests.jsonl" | tr -d ' ')

# the step-time profile once, before anything is timed; the worker loads it, so
# that it starts as cold as dspark-generate (measuring it would run every pass
# shape once, and capture their CUDA graphs, before the first job)
"$DS_BUILDDIR/dspark-generate" --backend "$BACKEND" --target "$TARGET" --draft "$DRAFT" --prompt-ids "1 2 3" \
    --max-tokens 2 --concurrency "$MAX_BATCH" --threads "$THREADS" --quiet --save-sps "$T/sps.json" \
    >/dev/null 2>"$T/sps.log" || die "could not measure the step-time profile"

cat >"$T/dspark.conf" <<EOF
[dsparkd]
host_name = bench
status_interval = 1s
[database]
dsn = "$DSPARK_DSN"
[events]
endpoint = ipc://$T/events.sock
[worker]
program = $DS_BUILDDIR/dspark-worker
devices = 0
backend = $BACKEND
target = $TARGET
draft = $DRAFT
max_batch = $MAX_BATCH
args = --threads $THREADS --sps $T/sps.json --gpu-memory 40
EOF
# start_dsparkd: dsparkd and a fresh worker (so that each spec's service run starts cold)
start_dsparkd() {
    "$DS_BUILDDIR/dsparkd" --config "$T/dspark.conf" 2>"$T/dsparkd.log" &
    DPID=$!
    n=0
    until grep -q "ready: 1 worker" "$T/dsparkd.log" 2>/dev/null; do
        n=$((n + 1))
        [ $n -lt 3000 ] && kill -0 $DPID 2>/dev/null || die "the worker did not become ready"
        sleep 0.1
    done
}
start_dsparkd
device=$(q "SELECT device FROM dspark.workers")
stop_dsparkd

printf '%s jobs (%s prompts x %s) of at most %s tokens, greedy, %s, max_batch %s, %s\n\n' "$JOBS" \
    "$((JOBS / COPIES))" "$COPIES" "$MAX_TOKENS" "$MODEL" "$MAX_BATCH" "$device"
printf '| spec | output tokens | first claim after due, s | service s | service tok/s | dspark-generate s | dspark-generate tok/s | service / generate |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for spec in $SPECS; do
    q "TRUNCATE dspark.job_stats, dspark.jobs, dspark.batches" >/dev/null || die "could not empty the queue"
    start_dsparkd
    due=$(q "SELECT now() + interval '3 s'")
    "$DSPARKCTL" submit -q --file "$T/requests.jsonl" --spec-mode "$spec" --temperature 0 --run-after "$due" \
        >/dev/null || die "submit failed"
    n=0
    while [ "$(q "SELECT count(*) FROM dspark.jobs WHERE state IN ('queued', 'running')")" != 0 ]; do
        n=$((n + 1))
        [ $n -lt 12000 ] || die "the jobs did not finish in 20 minutes"
        sleep 0.1
    done
    [ "$(q "SELECT count(*) FROM dspark.jobs WHERE state <> 'succeeded'")" = 0 ] || die "some $spec jobs did not succeed"
    stop_dsparkd
    set -- $(q "SELECT sum(s.output_tokens), extract(epoch FROM max(j.finished_at) - min(j.started_at)),
                       extract(epoch FROM min(j.started_at) - min(j.run_after))
                FROM dspark.jobs j JOIN dspark.job_stats s ON s.job_id = j.id" | tr '|' ' ')
    svc_tokens=$1 svc_s=$2 svc_wait=$3
    draft=
    [ "$spec" = none ] || draft="--draft $DRAFT"
    # shellcheck disable=SC2086
    "$DS_BUILDDIR/dspark-generate" --backend "$BACKEND" --target "$TARGET" $draft --spec "$spec" \
        --prompts "$T/requests.jsonl" --temperature 0 --max-tokens "$MAX_TOKENS" --concurrency "$MAX_BATCH" \
        --threads "$THREADS" --sps "$T/sps.json" >/dev/null 2>"$T/generate.log" || die "dspark-generate failed"
    gen_tokens=$(sed -n 's/^output tokens  *\([0-9]*\)$/\1/p' "$T/generate.log")
    gen_tps=$(sed -n 's/^output tokens\/s  *//p' "$T/generate.log")
    [ -n "$gen_tps" ] || die "no tokens/s in dspark-generate's summary"
    awk -v spec="$spec" -v st="$svc_tokens" -v ss="$svc_s" -v sw="$svc_wait" -v gt="$gen_tokens" -v gtps="$gen_tps" 'BEGIN {
        stps = st / ss; gs = (gt > 0 ? gt : st) / gtps
        printf "| %s | %d%s | %.2f | %.2f | %.0f | %.2f | %.0f | %.2f |\n", spec, st,
               (gt != "" && gt != st) ? " (generate " gt ")" : "", sw, ss, stps, gs, gtps, stps / gtps }'
done
