#!/bin/sh
# test-e2e-transitions.sh: every state change of a job reaches a ZeroMQ
# subscriber of dsparkd, in version order, even when the changes follow each
# other faster than dsparkd reads the rows: a job inserted, claimed and finished
# in one transaction; requeues (a drain's hand-back, an expired lease) in one
# transaction; a hundred jobs through all their states in one transaction;
# statements in quick succession; and short jobs run by a real CPU worker,
# submitted without delay. No job is published twice at one version.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/e2e-lib.sh"
[ -x "$SUB" ] || tap_skip_all "tests/integration/test-daemon-sub not built"
e2e_start
EP="ipc://$T/events.sock"

write_conf "$T/dspark.conf" 0 "--lease 10 --heartbeat 0.3"
start_dsparkd "$T/dspark.conf" "$T/dsparkd.log" 1
tap_result $? "dsparkd starts a real dspark-worker, which becomes ready"

# one subscriber of every job, synced before any job exists
"$SUB" --endpoint "$EP" --topic 'job|' --timeout 300 >"$T/all.out" 2>&1 &
E2E_PIDS="$E2E_PIDS $!"
wait_for "$T/all.out" '^(synced|nosync)' 10
tap_like "$(head -n 1 "$T/all.out")" '^synced$' "the subscriber's subscription is acknowledged"

# events_of ID: the events of job ID as "state:version:attempt ..."
events_of() {
    sed -n "s/^job id=$1 batch=[-0-9]* state=\\([a-z]*\\) version=\\([0-9]*\\) attempt=\\([0-9]*\\) .*/\\1:\\2:\\3/p" \
        "$T/all.out" | tr '\n' ' '
}
# tx SQL...: run the statements in one transaction (psql -1), stop on error
tx() {
    printf '%s\n' "$@" >"$T/tx.sql"
    psql -X -q -A -t -v ON_ERROR_STOP=1 -1 -f "$T/tx.sql" >"$T/tx.out" 2>&1
}
# the id of the only job of model M
job_of() {
    q "SELECT id FROM dspark.jobs WHERE model = '$1'"
}

# insert, claim and finish (dspark.finish_job_results) in ONE transaction
tx "INSERT INTO dspark.jobs (model, prompt, max_tokens, priority) VALUES ('sql-a', 'x', 8, 1000);" \
   "SELECT count(*) FROM dspark.claim_jobs('w-sql', 1, NULL, 30, ARRAY['sql-a']);" \
   "SELECT applied FROM dspark.finish_job_results('w-sql', ARRAY[jsonb_populate_record(NULL::dspark.job_result,
        jsonb_build_object('id', (SELECT id FROM dspark.jobs WHERE model = 'sql-a'), 'attempt', 1,
                           'state', 'succeeded', 'output_text', 'hi', 'finish_reason', 'stop',
                           'output_tokens', 8, 'decode_tokens_per_s', 123.5, 'mean_acceptance_length', 2.5))]);"
tap_result $? "a job is inserted, claimed and finished in one transaction"
ja=$(job_of sql-a)
wait_for "$T/all.out" "^job id=$ja .*state=succeeded" 10
tap_is "$(events_of "$ja")" "queued:1:0 running:2:1 succeeded:3:1 " \
    "its subscriber receives queued, running and succeeded, versions increasing, in that order"
tap_like "$(grep "^job id=$ja .*state=succeeded" "$T/all.out")" "finish=stop tokens=8 tps=123.50 tau=2.500$" \
    "... the succeeded event with the finish reason and statistics"
tap_is "$(grep "^job id=$ja " "$T/all.out" | grep -v 'state=succeeded' | grep -c 'finish=-$')" "2" \
    "... the earlier events without them"

# a requeue by a draining worker (release_jobs), claimed again, in one transaction
tx "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('sql-b', 'x', 1000);" \
   "SELECT count(*) FROM dspark.claim_jobs('w-sql', 1, NULL, 30, ARRAY['sql-b']);" \
   "SELECT count(*) FROM dspark.release_jobs('w-sql', ARRAY(SELECT id FROM dspark.jobs WHERE model = 'sql-b'), ARRAY[1]);" \
   "SELECT count(*) FROM dspark.claim_jobs('w-sql2', 1, NULL, 30, ARRAY['sql-b']);" \
   "SELECT applied FROM dspark.finish_jobs('w-sql2', (SELECT jsonb_agg(jsonb_build_object('id', id, 'attempt', 2,
        'state', 'succeeded', 'output_text', 'o')) FROM dspark.jobs WHERE model = 'sql-b'));"
tap_result $? "a job is claimed, handed back, claimed again and finished in one transaction"
jb=$(job_of sql-b)
wait_for "$T/all.out" "^job id=$jb .*state=succeeded" 10
tap_is "$(events_of "$jb")" "queued:1:0 running:2:1 queued:3:1 running:4:2 succeeded:5:2 " \
    "... running -> queued -> running -> succeeded all arrive, in order, with their attempts"

# a requeue by the lease reaper, in one transaction (the lease made expired by
# hand; the loop waits out a concurrent run of dsparkd's own reaper)
tx "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('sql-c', 'x', 1000);" \
   "SELECT count(*) FROM dspark.claim_jobs('w-sql', 1, NULL, 30, ARRAY['sql-c']);" \
   "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s' WHERE model = 'sql-c';" \
   "DO \$\$ BEGIN WHILE dspark.requeue_expired() IS NULL LOOP PERFORM pg_sleep(0.01); END LOOP; END \$\$;" \
   "SELECT count(*) FROM dspark.claim_jobs('w-sql2', 1, NULL, 30, ARRAY['sql-c']);" \
   "SELECT applied FROM dspark.finish_jobs('w-sql2', (SELECT jsonb_agg(jsonb_build_object('id', id, 'attempt', 2,
        'state', 'failed', 'error', 'boom')) FROM dspark.jobs WHERE model = 'sql-c'));"
tap_result $? "a job's lease expires, the reaper requeues it, it is claimed again and fails, in one transaction"
jc=$(job_of sql-c)
wait_for "$T/all.out" "^job id=$jc .*state=failed" 10
tap_is "$(events_of "$jc")" "queued:1:0 running:2:1 queued:4:1 running:5:2 failed:6:2 " \
    "... every state change arrives (the lease update, version 3, changed no state)"
tap_like "$(grep "^job id=$jc .*state=failed" "$T/all.out")" "finish=error$" "... the last with its finish reason"

# a hundred jobs of a batch through all their states in one transaction
bid=$(q "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
tx "INSERT INTO dspark.jobs (batch_id, model, prompt, priority) SELECT $bid, 'sql-d', 'p' || g, 1000 FROM generate_series(1, 100) g;" \
   "SELECT count(*) FROM dspark.claim_jobs('w-sql', 100, NULL, 30, ARRAY['sql-d']);" \
   "SELECT count(*) FROM dspark.finish_jobs('w-sql', (SELECT jsonb_agg(jsonb_build_object('id', id, 'attempt', 1,
        'state', 'succeeded', 'output_text', 'o')) FROM dspark.jobs WHERE model = 'sql-d'));"
tap_result $? "100 jobs inserted, claimed and finished in one transaction"
wait_sql "SELECT count(*) FROM dspark.jobs WHERE model = 'sql-d' AND state = 'succeeded'" 100 10
n=0
while [ "$(grep -c "^job id=[0-9]* batch=$bid state=succeeded" "$T/all.out")" -lt 100 ] && [ $n -lt 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
tap_is "$(grep -c "^job id=[0-9]* batch=$bid " "$T/all.out")" "300" "... 300 events"
bad=$(for j in $(q "SELECT id FROM dspark.jobs WHERE model = 'sql-d' ORDER BY id"); do
    [ "$(events_of "$j")" = "queued:1:0 running:2:1 succeeded:3:1 " ] || echo "$j"
done | wc -l | tr -d ' ')
tap_is "$bad" "0" "... each job's queued, running, succeeded in order, with the batch in each"

# statements in quick succession (separate transactions): dsparkd may read a row
# before the notifications of its later changes arrive
: >"$T/burst.sql"
for i in $(seq 1 20); do
    cat >>"$T/burst.sql" <<EOF
INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('sql-e', 'x$i', 1000);
SELECT count(*) FROM dspark.claim_jobs('w-sql', 1, NULL, 30, ARRAY['sql-e']);
SELECT count(*) FROM dspark.finish_jobs('w-sql', (SELECT jsonb_agg(jsonb_build_object('id', id, 'attempt', 1,
    'state', 'succeeded', 'output_text', 'o')) FROM dspark.jobs WHERE model = 'sql-e' AND state = 'running'));
EOF
done
psql -X -q -A -t -v ON_ERROR_STOP=1 -f "$T/burst.sql" >/dev/null 2>&1
tap_result $? "20 jobs inserted, claimed and finished by back-to-back statements"
last=$(q "SELECT max(id) FROM dspark.jobs WHERE model = 'sql-e'")
wait_for "$T/all.out" "^job id=$last .*state=succeeded" 10
sleep 0.3
bad=$(for j in $(q "SELECT id FROM dspark.jobs WHERE model = 'sql-e' ORDER BY id"); do
    [ "$(events_of "$j")" = "queued:1:0 running:2:1 succeeded:3:1 " ] || echo "$j: $(events_of "$j")"
done)
tap_is "$bad" "" "... each job's queued, running, succeeded in order"

# short jobs run by the real worker, submitted without delay: the worker wakes
# on the insert's notification and claims at once
insert_jobs 10 4
wait_sql "SELECT count(*) FROM dspark.jobs WHERE model = '$E2E_MODEL' AND state = 'succeeded'" 10 60
tap_result $? "10 short jobs run by the worker succeed"
for j in $(q "SELECT id FROM dspark.jobs WHERE model = '$E2E_MODEL'"); do
    wait_for "$T/all.out" "^job id=$j .*state=succeeded" 5
done
bad=$(for j in $(q "SELECT id FROM dspark.jobs WHERE model = '$E2E_MODEL' ORDER BY id"); do
    echo "$(events_of "$j")" | grep -Eqx 'queued:1:0 running:2:1 succeeded:[0-9]+:1 ' || echo "$j: $(events_of "$j")"
done)
tap_is "$bad" "" "... each job's queued, running, succeeded arrive, in order"
tap_like "$(grep "^job id=[0-9]* .*state=succeeded" "$T/all.out" | tail -n 1)" "finish=length tokens=4 tps=[0-9.]+ tau=[0-9.]+$" \
    "... the final event with the worker's statistics"

# across everything: no job at one version twice, versions increasing per job
tap_is "$(sed -n 's/^job id=\([0-9]*\) .* version=\([0-9]*\) .*/\1 \2/p' "$T/all.out" | sort | uniq -d | wc -l | tr -d ' ')" "0" \
    "no job is published twice at one version"
tap_is "$(sed -n 's/^job id=\([0-9]*\) .* version=\([0-9]*\) .*/\1 \2/p' "$T/all.out" |
          awk '($1 in v) && $2 <= v[$1] { bad++ } { v[$1] = $2 } END { print bad + 0 }')" "0" \
    "versions increase from event to event of each job"
tap_is "$(grep -cE 'ignoring [0-9]+ notifications? on' "$T/dsparkd.log")" "0" "dsparkd understood every notification"
stop_dsparkd
tap_is "$DRC" "0" "SIGTERM: dsparkd and its worker stop cleanly"
tap_done
