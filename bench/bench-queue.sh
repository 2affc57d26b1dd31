#!/bin/sh
# bench-queue.sh: queue throughput of dspark against plain PostgreSQL, side by
# side on one private server (started like the integration tests do).
#
#   (a) submission: a JSONL file of N chat requests (OpenAI Batch format)
#       through 'dsparkctl submit -f', against a COPY of the same lines into a
#       minimal queue table (id bigserial primary key, state default 'queued',
#       line jsonb, and the index on queued rows that claiming needs: what a
#       plain queue must keep up at insert); the file goes in P parts,
#       alternating the two;
#   (b) claim + write-back: N queued jobs drained by C clients through
#       dspark.claim_jobs / dspark.finish_job_results, 64 at a time, against the
#       plain pattern on a minimal table (claim 64 with FOR UPDATE SKIP
#       LOCKED, mark them done with their output), in alternating rounds.
#
# Usage (from the build directory): sh SRCDIR/bench/bench-queue.sh
# Environment: BENCH_JOBS (default 100000), BENCH_CLIENTS (default 2),
# BENCH_BATCH (default 64), BENCH_ROUND (jobs per alternating round of (b),
# default 2048), BENCH_PARTS (parts of the file in (a), default 4),
# BENCH_FINISH (json: write back through the JSON form of finish_jobs rather
# than dspark.finish_job_results, which the worker uses), BENCH_OWNERS (the
# queued jobs of (b) spread over this many clients, so that claims take turns
# among them; default 1), BENCH_DELAYED (this many more jobs of the model,
# queued for the next day by another client before (b), which the claims must
# not take; default 0), BENCH_SHARES (rows for dspark.client_shares, as SQL
# VALUES, e.g. "('client-0', 3)"; default none), PG_BINDIR. Prints a table;
# exits 1 on failure.
set -u
: "${DS_SRCDIR:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${DS_BUILDDIR:=$(pwd)}"
export DS_SRCDIR DS_BUILDDIR
N=${BENCH_JOBS:-100000}
CLIENTS=${BENCH_CLIENTS:-2}
BATCH=${BENCH_BATCH:-64}
ROUND=${BENCH_ROUND:-2048}
PARTS=${BENCH_PARTS:-4}
OWNERS=${BENCH_OWNERS:-1}
DELAYED=${BENCH_DELAYED:-0}
SHARES=${BENCH_SHARES:-}
BQ="$DS_BUILDDIR/bench/bench-queue"
[ -x "$BQ" ] || { echo "bench-queue.sh: build $BQ first (make bench/bench-queue)" >&2; exit 1; }

. "$DS_SRCDIR/tests/integration/pg-harness.sh"
pg_harness_start >/dev/null
pg_harness_init
T=$PGH_DIR

now() {
    date +%s.%N
}
rate() { # jobs seconds
    awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / s }'
}

# (a) submission ------------------------------------------------------------
awk -v n="$N" 'BEGIN {
    for (i = 1; i <= n; i++)
        printf "{\"custom_id\": \"request-%d\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": {\"model\": \"qwen3-4b\", \"messages\": [{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}, {\"role\": \"user\", \"content\": \"Question %d: explain why the sky is blue in two sentences.\"}], \"max_tokens\": 256, \"temperature\": 0.7}}\n", i, i
}' >"$T/requests.jsonl"
q "CREATE TABLE plain_submit (id bigserial PRIMARY KEY, state text NOT NULL DEFAULT 'queued',
       line jsonb NOT NULL);
   CREATE INDEX plain_submit_queued ON plain_submit (id) WHERE state = 'queued'" >/dev/null
# in alternating parts, so that both see the same machine load: each part of
# the file goes through dsparkctl (one batch), then the same lines by COPY
(cd "$T" && split -l $(( (N + PARTS - 1) / PARTS )) requests.jsonl part.)
sub_ds=0
sub_plain=0
for part in "$T"/part.*; do
    t0=$(now)
    "$DS_BUILDDIR/dsparkctl" submit -q -f "$part" >/dev/null || exit 1
    t1=$(now)
    # raw lines: CSV with a delimiter and quote that never occur in the file
    psql -X -q -c "\\copy plain_submit (line) FROM '$part' WITH (FORMAT csv, DELIMITER E'\\x01', QUOTE E'\\x02')" || exit 1
    t2=$(now)
    sub_ds=$(awk -v s="$sub_ds" -v a="$t0" -v b="$t1" 'BEGIN { print s + b - a }')
    sub_plain=$(awk -v s="$sub_plain" -v a="$t1" -v b="$t2" 'BEGIN { print s + b - a }')
done
[ "$(q 'SELECT count(*) FROM dspark.jobs')" = "$N" ] || { echo "bench-queue.sh: submission lost jobs" >&2; exit 1; }

# (b) claim + write-back -------------------------------------------------------
q "CREATE TABLE bench_plain (id bigserial PRIMARY KEY, state text NOT NULL DEFAULT 'queued',
       payload text NOT NULL, result text);
   CREATE INDEX bench_plain_queued ON bench_plain (id) WHERE state = 'queued';
   INSERT INTO bench_plain (payload) SELECT line::text FROM plain_submit ORDER BY id" >/dev/null
if [ "$OWNERS" -gt 1 ]; then
    q "UPDATE dspark.jobs SET owner = 'client-' || (id % $OWNERS)" >/dev/null || exit 1
fi
q "INSERT INTO dspark.jobs (model, prompt, owner, run_after)
   SELECT 'qwen3-4b', 'later', 'client-later', now() + interval '1 day' FROM generate_series(1, $DELAYED)" >/dev/null ||
    exit 1
if [ -n "$SHARES" ]; then
    q "INSERT INTO dspark.client_shares VALUES $SHARES" >/dev/null || exit 1
fi
psql -X -q -c "VACUUM ANALYZE" >/dev/null

# both drained in alternating rounds of ROUND jobs (same machine load for both)
set -- $("$BQ" "$CLIENTS" "$BATCH" "$ROUND") || exit 1
cl_ds_n=$2 cl_ds_s=$3 cl_plain_n=$5 cl_plain_s=$6
[ "$cl_ds_n" = "$N" ] && [ "$cl_plain_n" = "$N" ] || {
    echo "bench-queue.sh: drained $cl_ds_n (dspark) and $cl_plain_n (plain) of $N" >&2
    exit 1
}
[ "$(q "SELECT count(*) FROM dspark.jobs WHERE state = 'succeeded'")" = "$N" ] &&
    [ "$(q "SELECT count(*) FROM dspark.job_stats")" = "$N" ] ||
    { echo "bench-queue.sh: not every job succeeded once" >&2; exit 1; }
[ "$(q "SELECT count(*) FROM bench_plain WHERE state = 'done' AND result = 'output of job ' || id")" = "$N" ] ||
    { echo "bench-queue.sh: not every plain job was marked done with its output" >&2; exit 1; }

ds1=$(rate "$N" "$sub_ds")
pl1=$(rate "$N" "$sub_plain")
ds2=$(rate "$N" "$cl_ds_s")
pl2=$(rate "$N" "$cl_plain_s")
printf '%s\n' "queue benchmark: $N jobs ($PARTS parts), $CLIENTS clients, batches of $BATCH, $OWNERS job owners${SHARES:+ (shares $SHARES)}, $DELAYED delayed, PostgreSQL $(q 'SHOW server_version'), $(nproc 2>/dev/null || echo ?) CPUs"
printf '%-44s %12s %12s %7s\n' "measurement" "dspark" "plain" "ratio"
printf '%-44s %12s %12s %7s\n' "submit JSONL (jobs/s)" "$ds1" "$pl1" "$(awk -v a="$ds1" -v b="$pl1" 'BEGIN { printf "%.2f", a / b }')"
printf '%-44s %12s %12s %7s\n' "claim $BATCH + write-back (jobs/s)" "$ds2" "$pl2" "$(awk -v a="$ds2" -v b="$pl2" 'BEGIN { printf "%.2f", a / b }')"
printf '%-44s %12s %12s\n' "seconds (submit)" "$(printf %.2f "$sub_ds")" "$(printf %.2f "$sub_plain")"
printf '%-44s %12s %12s\n' "seconds (claim + write-back)" "$(printf %.2f "$cl_ds_s")" "$(printf %.2f "$cl_plain_s")"
