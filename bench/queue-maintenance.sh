#!/bin/sh
# queue-maintenance.sh: what the queue's upkeep costs, on one private
# PostgreSQL (started like the integration tests do):
#
#   (a) dsparkctl resubmit of a batch of N cancelled jobs, against the same
#       rows copied by one plain INSERT ... SELECT (the function's floor);
#   (b) dspark.expire_jobs(10000) over N queued jobs past their deadline, one
#       sweep at a time, against a plain UPDATE of the same rows;
#   (c) the sweep dsparkd runs every reaper_interval when nothing is due: N
#       queued jobs whose deadline is an hour away, and N without one;
#   (d) GET /metrics from a running dsparkd, 500 scrapes one after another.
#
# Usage (from the build directory): sh SRCDIR/bench/queue-maintenance.sh
# Environment: BENCH_JOBS (default 100000), PG_BINDIR. Prints a table; exits 1
# on failure.
set -u
: "${DS_SRCDIR:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${DS_BUILDDIR:=$(pwd)}"
export DS_SRCDIR DS_BUILDDIR
N=${BENCH_JOBS:-100000}
C="$DS_BUILDDIR/dsparkctl"
[ -x "$C" ] && [ -x "$DS_BUILDDIR/dsparkd" ] || { echo "queue-maintenance.sh: build dsparkctl and dsparkd first" >&2; exit 1; }

. "$DS_SRCDIR/tests/integration/pg-harness.sh"
pg_harness_start >/dev/null
pg_harness_init
T=$PGH_DIR

now() {
    date +%s.%N
}
ms() {   # ms START END
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) * 1000 }'
}
best_ms() {   # SQL: the fastest of 5 runs through psql, ms
    _best=
    for _i in 1 2 3 4 5; do
        _t0=$(now)
        q "$1" >/dev/null
        _t1=$(now)
        _best=$(awk -v a="${_best:-1e9}" -v b="$(ms "$_t0" "$_t1")" 'BEGIN { print (b < a ? b : a) }')
    done
    echo "$_best"
}
row() {
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4"
}

awk -v n="$N" 'BEGIN { for (i = 1; i <= n; i++) printf "{\"custom_id\": \"r%d\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": {\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"question %d\"}], \"max_tokens\": 64}}\n", i, i }' >"$T/big.jsonl"
B=$("$C" submit -q -f "$T/big.jsonl") || exit 1
"$C" cancel -q --batch "$B" || exit 1
q "VACUUM ANALYZE dspark.jobs" >/dev/null

echo "| what | dspark | plain SQL | dspark / plain |"
echo "|---|---|---|---|"
cols="custom_id, model, prompt, messages, prompt_ids, max_tokens, temperature, top_p, top_k, seed, stop, spec_mode, priority, max_attempts"
for i in 1 2; do
    t0=$(now)
    nb=$("$C" resubmit -q "$B") || exit 1
    t1=$(now)
    got=$(q "SELECT count(*) FROM dspark.jobs WHERE batch_id = $nb")
    [ "$got" = "$N" ] || { echo "resubmit made $got jobs, not $N" >&2; exit 1; }
    pb=$(q "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
    t2=$(now)
    q "INSERT INTO dspark.jobs (batch_id, $cols) SELECT $pb, $cols FROM dspark.jobs WHERE batch_id = $B AND state = ANY ('{failed,cancelled}') ORDER BY id" >/dev/null || exit 1
    t3=$(now)
    a=$(ms "$t0" "$t1"); p=$(ms "$t2" "$t3")
    row "(a) resubmit $N cancelled jobs, ms (run $i)" "$a" "$p" "$(awk -v a="$a" -v p="$p" 'BEGIN { printf "%.2f", a / p }')"
    q "DELETE FROM dspark.jobs WHERE batch_id IN ($nb, $pb)" >/dev/null
done

# (b): every queued job of two copies past its deadline, one expired by sweeps, one by a plain UPDATE
q "DELETE FROM dspark.jobs; DELETE FROM dspark.batches" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, expires_at) SELECT 'm', 'p' || g, now() - interval '1 s' FROM generate_series(1, $N) g" >/dev/null
q "VACUUM ANALYZE dspark.jobs" >/dev/null
t0=$(now)
sweeps=0
while [ "$(q "SELECT dspark.expire_jobs(10000)")" != 0 ]; do
    sweeps=$((sweeps + 1))
done
t1=$(now)
[ "$(q "SELECT count(*) FROM dspark.jobs WHERE finish_reason = 'expired'")" = "$N" ] || { echo "expire_jobs left jobs" >&2; exit 1; }
q "DELETE FROM dspark.jobs" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, expires_at) SELECT 'm', 'p' || g, now() - interval '1 s' FROM generate_series(1, $N) g" >/dev/null
q "VACUUM ANALYZE dspark.jobs" >/dev/null
t2=$(now)
q "UPDATE dspark.jobs SET state = 'cancelled', finished_at = now(), finish_reason = 'expired' WHERE state = 'queued' AND expires_at <= now()" >/dev/null
t3=$(now)
a=$(ms "$t0" "$t1"); p=$(ms "$t2" "$t3")
row "(b) expire $N queued jobs ($sweeps sweeps of 10,000, and one that finds none), ms" "$a" "$p" "$(awk -v a="$a" -v p="$p" 'BEGIN { printf "%.2f", a / p }')"

# (c): nothing due
q "DELETE FROM dspark.jobs" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, expires_at) SELECT 'm', 'p' || g, CASE WHEN g % 2 = 0 THEN now() + interval '1 hour' END FROM generate_series(1, $N) g" >/dev/null
q "VACUUM ANALYZE dspark.jobs" >/dev/null
best=$(best_ms "SELECT dspark.expire_jobs(10000)")
base=$(best_ms "SELECT 1")
row "(c) a sweep with nothing due among $N queued jobs, ms (best of 5; plain: SELECT 1, psql's own cost)" "$best" "$base" \
    "$(awk -v a="$best" -v p="$base" 'BEGIN { printf "%.2f", a / p }')"

# (d): scrapes
MPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf '[dsparkd]\nstatus_interval = 200ms\n[database]\ndsn = "%s"\n[events]\nendpoint = ipc://%s/events.sock\n[metrics]\nlisten = 127.0.0.1:%s\n' \
    "$DSPARK_DSN" "$T" "$MPORT" >"$T/d.conf"
"$DS_BUILDDIR/dsparkd" --config "$T/d.conf" 2>"$T/d.log" &
DPID=$!
wait_for "$T/d.log" "ready: 0 workers" 10 || { cat "$T/d.log" >&2; kill "$DPID"; exit 1; }
sleep 0.5
python3 - "$MPORT" <<'PYEOF' >"$T/scrape.txt" || { kill "$DPID"; exit 1; }
import http.client, sys, time
port = int(sys.argv[1])
times = []
for _ in range(500):
    t = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/metrics")
    body = c.getresponse().read()
    c.close()
    times.append(time.perf_counter() - t)
times.sort()
print("%.3f %.3f %d" % (times[len(times) // 2] * 1000, times[int(len(times) * 0.99)] * 1000, len(body)))
PYEOF
kill -TERM "$DPID"
wait "$DPID"
read -r p50 p99 bytes <"$T/scrape.txt"
row "(d) GET /metrics ($bytes bytes), ms: median / p99 of 500" "$p50 / $p99" "-" "-"
