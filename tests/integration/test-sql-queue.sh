#!/bin/sh
# test-sql-queue.sh: the queue functions: concurrent claims with SKIP LOCKED
# never hand out a job twice; priorities, delayed start, token budget, model
# filter; leases, heartbeats, requeue and max_attempts; a job whose lease
# expired runs alone; hand-backs that do not count as attempts; workers that
# announce themselves while loading; fenced write-backs; cancellation;
# release; the state machine and version; retention.
. "${DS_SRCDIR:-$(dirname "$0")/../..}/tests/integration/pg-harness.sh"
pg_harness_start
pg_harness_init
T=$PGH_DIR

# repeat_sql FILE N STATEMENT: a script of N times the statement
repeat_sql() {
    : >"$1"
    _i=0
    while [ $_i -lt "$2" ]; do
        echo "$3" >>"$1"
        _i=$((_i + 1))
    done
}

# --- two sessions claiming 1,000 jobs concurrently ------------------------
q "INSERT INTO dspark.jobs (model, prompt) SELECT 'm', 'p' || g FROM generate_series(1, 1000) g"
for w in a b; do
    repeat_sql "$T/claim-$w.sql" 130 "SELECT id FROM dspark.claim_jobs('worker-$w', 7, NULL, 300);"
done
psql -X -q -A -t -f "$T/claim-a.sql" >"$T/ids-a" 2>"$T/err-a" &
pa=$!
psql -X -q -A -t -f "$T/claim-b.sql" >"$T/ids-b" 2>"$T/err-b" &
pb=$!
wait $pa
wait $pb
na=$(grep -c . "$T/ids-a")
nb=$(grep -c . "$T/ids-b")
tap_is "$(cat "$T/ids-a" "$T/ids-b" | grep . | wc -l | tr -d ' ')" 1000 \
    "two concurrent claimers got 1000 claims in all (a: $na, b: $nb)"
tap_is "$(cat "$T/ids-a" "$T/ids-b" | grep . | sort -n | uniq | wc -l | tr -d ' ')" 1000 \
    "... every job exactly once"
tap_ok "... both sessions claimed some" test "$na" -gt 0 -a "$nb" -gt 0
tap_is "$(cat "$T/err-a" "$T/err-b")" "" "... without errors"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE state = 'running' AND attempt = 1 AND lease_expires_at > now() AND started_at IS NOT NULL")" 1000 \
    "claimed jobs are running, attempt 1, with a lease"
tap_is "$(q "SELECT count(*) FROM dspark.jobs j WHERE worker_id = 'worker-a'")" "$na" \
    "worker_id records the claimer"
q "DELETE FROM dspark.jobs" >/dev/null

# --- order, delay, budget, models -----------------------------------------
q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('m', 'low', 0), ('m', 'high', 10), ('m', 'low2', 0)" >/dev/null
tap_is "$(q "SELECT string_agg(prompt, ',') FROM dspark.claim_jobs('w', 3, NULL, 60)")" "high,low,low2" \
    "claims go by priority, then age"
q "DELETE FROM dspark.jobs" >/dev/null

q "INSERT INTO dspark.jobs (model, prompt, run_after) VALUES ('m', 'later', now() + interval '1 hour')" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 10, NULL, 60)")" 0 "a delayed job is not claimed before run_after"
q "UPDATE dspark.jobs SET run_after = now() - interval '1 s'" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 10, NULL, 60)")" 1 "... and is claimed once due"
q "DELETE FROM dspark.jobs" >/dev/null

# prompt_ids of 100 tokens + max_tokens 100 = cost 200 each
q "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens) SELECT 'm', array_fill(7, ARRAY[100]), 100 FROM generate_series(1, 5)" >/dev/null
tap_is "$(q "SELECT dspark.prompt_tokens_est(prompt, messages, prompt_ids) FROM dspark.jobs LIMIT 1")" 100 "the prompt estimate of token ids is their count"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 10, 650, 60, NULL, 17)")" 2 \
    "with 17 tokens a job beside its prompt and output (a speculative block), 650 admits two jobs of 217"
q "UPDATE dspark.jobs SET state = 'queued', worker_id = NULL, attempt = 0, lease_expires_at = NULL" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 10, 651, 60, NULL, 17)")" 3 "... and 651 three"
q "UPDATE dspark.jobs SET state = 'queued', worker_id = NULL, attempt = 0, lease_expires_at = NULL" >/dev/null
q "UPDATE dspark.jobs SET state = 'queued', worker_id = NULL, attempt = 0, lease_expires_at = NULL" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 10, 650, 60, NULL, -40)")|$(q "UPDATE dspark.jobs SET state = 'queued', worker_id = NULL, attempt = 0, lease_expires_at = NULL" >/dev/null; q "SELECT count(*) FROM dspark.claim_jobs('w', 10, 650, 60, NULL, NULL)")" "3|3" \
    "job tokens below zero or NULL count as none"
q "UPDATE dspark.jobs SET state = 'queued', worker_id = NULL, attempt = 0, lease_expires_at = NULL" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 10, NULL, 60, NULL, 100000)")" 5 "without a budget, job tokens do not matter"
q "UPDATE dspark.jobs SET state = 'queued', worker_id = NULL, attempt = 0, lease_expires_at = NULL" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 10, 650, 60)")" 3 "a token budget of 650 admits three jobs of 200"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 10, 150, 60)")" 0 "a budget smaller than the next job admits none"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 10, NULL, 60)")" 2 "no budget (an idle worker) admits the rest"
q "DELETE FROM dspark.jobs" >/dev/null

q "INSERT INTO dspark.jobs (model, prompt) VALUES ('qwen3-4b', 'a'), ('llama', 'b'), ('qwen3-4b', 'c')" >/dev/null
tap_is "$(q "SELECT string_agg(prompt, ',') FROM dspark.claim_jobs('w', 10, NULL, 60, ARRAY['qwen3-4b'])")" "a,c" \
    "a model filter claims only that model"
q "DELETE FROM dspark.jobs" >/dev/null

# --- the clients with queued jobs take turns (014) ---------------------------
# claim_jobs for model m (turns are for one model, as a worker claims)
claim_m() { # WORKER N [BUDGET] [COLUMN]: the claimed jobs' COLUMN (prompt), comma-separated, in claim order
    q "SELECT string_agg(${4:-prompt}, ',') FROM dspark.claim_jobs('$1', $2, ${3:-NULL}, 60, ARRAY['m'])"
}
# the next claim's turn starts at the first client (by name); each claim that takes jobs in turns moves it on
turns_from_first() {
    q "DELETE FROM dspark.claim_turn" >/dev/null
}
# alice queued six jobs, then bob three and carol one: a job of each client,
# then a second of each, ...
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'a' || g, 'alice' FROM generate_series(1, 6) g" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'b' || g, 'bob' FROM generate_series(1, 3) g" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) VALUES ('m', 'c1', 'carol')" >/dev/null
turns_from_first
tap_is "$(claim_m w 6)" "a1,b1,c1,a2,b2,a3" "clients take turns: one job of each a turn, returned in claim order"
tap_is "$(claim_m w 6)" "b3,a4,a5,a6" \
    "... the next claim's turn starts at the next client, and a client alone in the queue takes the rest in order"
# a job handed back to the queue is its client's first again
id=$(q "SELECT id FROM dspark.jobs WHERE prompt = 'a5'")
q "SELECT count(*) FROM dspark.release_jobs('w', ARRAY[$id]::bigint[], ARRAY[1])" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) VALUES ('m', 'b4', 'bob'), ('m', 'a7', 'alice')" >/dev/null
turns_from_first
tap_is "$(claim_m w 2)" "a5,b4" "a handed-back job is first in its client's line"
q "DELETE FROM dspark.jobs" >/dev/null

# claims of one job (a worker refilling a slot) go to the clients in rotation
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'a' || g, 'alice' FROM generate_series(1, 5) g" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'b' || g, 'bob' FROM generate_series(1, 3) g" >/dev/null
turns_from_first
got=
for i in 1 2 3 4 5 6 7 8; do got="$got${got:+,}$(claim_m w 1)"; done
tap_is "$got" "a1,b1,a2,b2,a3,b3,a4,a5" "claims of one job each serve the clients in turn"
q "DELETE FROM dspark.jobs" >/dev/null
# shares (016): a client with share k takes k jobs a turn, in its order
q "INSERT INTO dspark.client_shares VALUES ('alice', 3), ('carol', 1)" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'a' || g, 'alice' FROM generate_series(1, 9) g" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', left(o, 1) || g, o FROM generate_series(1, 3) g, unnest(ARRAY['bob', 'carol']) o" >/dev/null
turns_from_first
tap_is "$(claim_m w 10)" "a1,a2,a3,b1,c1,a4,a5,a6,b2,c2" "a client with share 3 takes three jobs a turn, the others one"
q "DELETE FROM dspark.jobs" >/dev/null
# claims of one job: three of alice's for one of bob's, hers in their order, over any start
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'a' || g, 'alice' FROM generate_series(1, 9) g" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'b' || g, 'bob' FROM generate_series(1, 3) g" >/dev/null
turns_from_first
got=
for i in 1 2 3 4 5 6 7 8 9 10; do got="$got${got:+,}$(claim_m w 1)"; done
tap_is "$got" "a1,a2,a3,b1,a4,a5,a6,b2,a7,a8" "... and claims of one job each serve it three times for another's once"
q "DELETE FROM dspark.jobs; UPDATE dspark.claim_turn SET next = 2" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'a' || g, 'alice' FROM generate_series(1, 9) g" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'b' || g, 'bob' FROM generate_series(1, 3) g" >/dev/null
tap_is "$(claim_m w 5)|$(claim_m w 3)" "a1,b1,a2,a3,a4|b2,a5,a6" \
    "... a turn that starts within a client's places gives its first jobs the first of them"
tap_is "$(q "SELECT string_agg(client || ':' || share, ',' ORDER BY client) FROM dspark.client_status")" "alice:3,bob:1" \
    "client_status shows each client's share"
# a priority's turns count only the clients with jobs of that priority
q "DELETE FROM dspark.jobs; INSERT INTO dspark.client_shares VALUES ('zed', 10)" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner, priority) SELECT 'm', left(o, 1) || g, o, 5 FROM generate_series(1, 4) g, unnest(ARRAY['alice', 'bob']) o" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'z' || g, 'zed' FROM generate_series(1, 4) g" >/dev/null
q "DELETE FROM dspark.client_shares WHERE owner = 'alice'" >/dev/null
turns_from_first
got=
for i in 1 2 3 4 5 6 7 8 9; do got="$got${got:+,}$(claim_m w 1)"; done
tap_is "$got" "a1,b1,a2,b2,a3,b3,a4,b4,z1" \
    "... claims of one job serve two clients of a priority in rotation while a third with share 10 has jobs of a lower one"
q "DELETE FROM dspark.client_shares WHERE owner = 'zed'; INSERT INTO dspark.client_shares VALUES ('alice', 3)" >/dev/null
# a first read of two turns each (6 of alice's, 2 of bob's) is one of alice's short,
# since one of the six has a higher priority: the list is read again
q "DELETE FROM dspark.jobs" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner, priority) VALUES ('m', 'a0', 'alice', 5)" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'a' || g, 'alice' FROM generate_series(1, 9) g" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'b' || g, 'bob' FROM generate_series(1, 9) g" >/dev/null
tap_is "$(q "SELECT string_agg(j.prompt, ',' ORDER BY u.k)
             FROM unnest((SELECT t.ids FROM dspark.claim_turns(ARRAY['alice', 'bob']::name[], 'm', 8, 0) t)) WITH ORDINALITY AS u(id, k)
             JOIN dspark.jobs j ON j.id = u.id")" "a0,a1,a2,a3,b1,a4,a5,a6" \
    "... a client with a share whose first read was cut is read again (the list of claim_turns)"
q "DELETE FROM dspark.jobs; DELETE FROM dspark.client_shares" >/dev/null
# a client with only jobs not yet due takes no place in the rotation
q "INSERT INTO dspark.jobs (model, prompt, owner, run_after) VALUES ('m', 'later', 'aaron', now() + interval '1 hour')" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', o || g, o FROM generate_series(1, 3) g, unnest(ARRAY['b', 'c']) o" >/dev/null
turns_from_first
got=
for i in 1 2 3 4 5 6; do got="$got${got:+,}$(claim_m w 1)"; done
tap_is "$got" "b1,c1,b2,c2,b3,c3" "... and a client whose jobs are not due yet takes no place in the rotation"
q "DELETE FROM dspark.jobs" >/dev/null
# each model has its rotation, and claims that take nothing do not move it
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT m, m || o || g, o
   FROM generate_series(1, 3) g, unnest(ARRAY['alice', 'bob']) o, unnest(ARRAY['A', 'B']) m" >/dev/null
turns_from_first
got=
for i in 1 2 3 4; do
    for m in A B; do
        got="$got${got:+,}$(q "SELECT string_agg(prompt, ',') FROM dspark.claim_jobs('w$m', 1, NULL, 60, ARRAY['$m'])")"
        q "SELECT count(*) FROM dspark.claim_jobs('w-full', 1, 1, 60, ARRAY['$m'])" >/dev/null   # a budget that fits nothing
    done
done
tap_is "$got" "Aalice1,Balice1,Abob1,Bbob1,Aalice2,Balice2,Abob2,Bbob2" \
    "each model's claims rotate over its clients, whatever the other model's claims and the claims that take nothing"
q "DELETE FROM dspark.jobs" >/dev/null

# priorities first; turns within a priority; the budget's prefix and the model filter in turn order
q "INSERT INTO dspark.jobs (model, prompt, owner, priority) VALUES
   ('m', 'a1', 'alice', 0), ('m', 'a2', 'alice', 0), ('m', 'a3', 'alice', 0), ('m', 'b1', 'bob', 0),
   ('m', 'b-urgent', 'bob', 5), ('m', 'a-urgent', 'alice', 5), ('m', 'b-urgent2', 'bob', 5)" >/dev/null
turns_from_first
tap_is "$(claim_m w 7)" "a-urgent,b-urgent,b-urgent2,a1,b1,a2,a3" \
    "a higher priority goes first, whoever's it is; turns are taken within a priority"
q "DELETE FROM dspark.jobs" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt_ids, max_tokens, owner)
   SELECT 'm', array_fill(7, ARRAY[100]), 100, o FROM generate_series(1, 3) g, unnest(ARRAY['a', 'b']) o" >/dev/null
turns_from_first
tap_is "$(claim_m w 10 650 owner)" "a,b,a" "a token budget admits the prefix of the turns (three jobs of 200 in 650)"
q "DELETE FROM dspark.jobs" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) VALUES ('llama', 'a1', 'alice'), ('qwen', 'a2', 'alice'),
   ('qwen', 'a3', 'alice'), ('llama', 'b1', 'bob'), ('qwen', 'b2', 'bob'), ('llama', 'c1', 'carol')" >/dev/null
turns_from_first
tap_is "$(q "SELECT string_agg(prompt, ',') FROM dspark.claim_jobs('w', 10, NULL, 60, ARRAY['qwen'])")" "a2,b2,a3" \
    "turns are taken among the clients with jobs of the worker's model"
tap_is "$(q "SELECT string_agg(prompt, ',') FROM dspark.claim_jobs('w', 10, NULL, 60)")" "a1,b1,c1" \
    "... and a claim for any model goes by priority and id"
q "DELETE FROM dspark.jobs" >/dev/null

# a job that runs alone, first in line, is claimed alone from a queue of several clients
q "INSERT INTO dspark.jobs (model, prompt, owner, run_alone) VALUES ('m', 'a-alone', 'alice', true),
   ('m', 'b1', 'bob', false), ('m', 'a2', 'alice', false)" >/dev/null
tap_is "$(claim_m w-alone 5)" "a-alone" "a job that runs alone is claimed alone when several clients have jobs queued"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w-alone', 5, NULL, 60, ARRAY['m'])")" 0 \
    "... and its worker claims nothing more"
turns_from_first
tap_is "$(claim_m w-other 5)" "a2,b1" "... while another worker takes the rest in turns"
q "DELETE FROM dspark.jobs" >/dev/null
# one that is not first in line takes no turn and cuts no claim short
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'a' || g, 'alice' FROM generate_series(1, 4) g" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner, run_alone) VALUES ('m', 'b-alone', 'bob', true), ('m', 'b2', 'bob', false)" >/dev/null
turns_from_first
tap_is "$(claim_m w-idle 8)" "a1,b2,a2,a3,a4" \
    "a job that runs alone and is not first in line is left out of the turns, and cuts no claim short"
tap_is "$(claim_m w-idle2 8)" "b-alone" "... then, first in line, it is claimed alone"
q "DELETE FROM dspark.jobs" >/dev/null

# another claimer holds the first four jobs in turns: a claim of two reads a
# longer list and takes the next two turns (not alice's next two by id)
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'a' || g, 'alice' FROM generate_series(1, 10) g" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'm', 'b' || g, 'bob' FROM generate_series(1, 10) g" >/dev/null
# the gate: a session holding advisory lock 7234; the holder: a transaction
# that locks the four rows and then waits for the gate
advisory() { # GRANTED: how many sessions hold (t) or wait for (f) lock 7234
    q "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 7234 AND granted = $1"
}
until_is() { # EXPECTED COMMAND...: run COMMAND until it prints EXPECTED (30 s at most)
    _want=$1
    shift
    _n=0
    while [ "$("$@")" != "$_want" ] && [ $_n -lt 300 ]; do
        sleep 0.1
        _n=$((_n + 1))
    done
}
psql -X -q -A -t -c "SELECT pg_advisory_lock(7234)" -c "SELECT pg_sleep(600)" >/dev/null 2>&1 &
gate=$!
until_is 1 advisory true
psql -X -q -A -t -c "BEGIN" -c "SELECT id FROM dspark.jobs WHERE prompt IN ('a1', 'b1', 'a2', 'b2') FOR UPDATE" \
    -c "SELECT pg_advisory_xact_lock(7234)" -c "COMMIT" >/dev/null 2>&1 &
holder=$!
until_is 1 advisory false
turns_from_first
tap_is "$(claim_m w 2)" "a3,b3" "with the first turns locked by another claimer, a claim takes the next turns"
q "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objid = 7234 AND granted" >/dev/null
wait $gate
wait $holder
q "DELETE FROM dspark.jobs" >/dev/null

# concurrent claimers over three clients' jobs, 540 of 900 claimed: every
# job at most once, and the clients' shares even (a claim can lose races for
# single rows to the others, on a loaded machine in two claims running: so
# within two claims' worth)
q "INSERT INTO dspark.jobs (model, prompt, owner)
   SELECT 'm', o || g, o FROM generate_series(1, 300) g, unnest(ARRAY['alice', 'bob', 'carol']) o" >/dev/null
for w in a b c; do
    repeat_sql "$T/turns-$w.sql" 20 "SELECT id || ' ' || owner FROM dspark.claim_jobs('turns-$w', 9, NULL, 300, ARRAY['m']);"
done
for w in a b c; do
    psql -X -q -A -t -f "$T/turns-$w.sql" >"$T/turns-out-$w" 2>"$T/turns-err-$w" &
    eval "p$w=\$!"
done
wait $pa
wait $pb
wait $pc
cat "$T/turns-out-a" "$T/turns-out-b" "$T/turns-out-c" | grep . >"$T/turns-all"
tap_is "$(cut -d' ' -f1 "$T/turns-all" | sort | uniq -d | wc -l | tr -d ' ')|$(wc -l <"$T/turns-all" | tr -d ' ')" \
    "0|$(q "SELECT count(*) FROM dspark.jobs WHERE state = 'running'")" \
    "three concurrent claimers over three clients: no job handed out twice"
tap_is "$(cat "$T/turns-err-a" "$T/turns-err-b" "$T/turns-err-c")" "" "... without errors"
spread=$(q "SELECT max(n) - min(n) FROM (SELECT count(*) FILTER (WHERE state = 'running') AS n FROM dspark.jobs GROUP BY owner) s")
tap_ok "... and the clients' shares within 18 jobs of each other (spread $spread, $(wc -l <"$T/turns-all" | tr -d ' ') claimed)" test "$spread" -le 18
q "DELETE FROM dspark.jobs" >/dev/null

# a claimer in turns never waits on another's step of the turn: the model's
# claim_turn row missing (both would insert it), then held by the other
q "INSERT INTO dspark.jobs (model, prompt, owner) SELECT 'tw', o || g, o FROM generate_series(1, 30) g, unnest(ARRAY['ann', 'cat']) o" >/dev/null
for round in missing held; do
    psql -X -q -A -t -c "BEGIN" -c "SELECT count(*) FROM dspark.claim_jobs('A', 4, NULL, 60, ARRAY['tw'])" \
        -c "SELECT pg_sleep(3)" -c "COMMIT" >/dev/null 2>&1 &
    pa=$!
    tries=0
    # (until A's claim has stepped the turn: it holds claim_turn)
    until [ "$(q "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'claim_turn' AND l.mode = 'RowExclusiveLock'")" -gt 0 ] ||
          [ $tries -ge 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    out=$(psql -X -q -A -t -c "SET lock_timeout = '200ms'" -c "SELECT count(*) FROM dspark.claim_jobs('B', 4, NULL, 60, ARRAY['tw'])" 2>&1)
    wait $pa
    tap_is "$out" 4 "a claim in turns while another claimer holds the model's turn step ($round row): no wait"
done
q "DELETE FROM dspark.jobs; DELETE FROM dspark.claim_turn WHERE model = 'tw'" >/dev/null

plan=$(psql -X -A -t -c "EXPLAIN SELECT c.owner FROM dspark.jobs c WHERE c.state = 'queued' AND NOT c.delayed AND c.model = 'm' AND c.owner > 'a'
                                 ORDER BY c.model, c.owner LIMIT 1" 2>&1)
tap_like "$plan" "jobs_queued_owner_idx" "the clients are found through the queued jobs' owner index"

# --- delayed jobs stay out of the claims' scans (015) -----------------------
q "INSERT INTO dspark.jobs (model, prompt, owner, run_after) VALUES ('m', 'now', 'ann', now()), ('m', 'later', 'ann', now() + interval '1 hour')" >/dev/null
tap_is "$(q "SELECT string_agg(prompt || ':' || delayed, ',' ORDER BY id) FROM dspark.jobs")" "now:false,later:true" \
    "a job queued to run later is marked delayed, one to run now is not"
q "UPDATE dspark.jobs SET run_after = now() + interval '1 hour' WHERE prompt = 'now'" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE delayed")" 2 "... and so is a queued job whose run_after is moved into the future"
q "UPDATE dspark.jobs SET run_after = now() - interval '1 s' WHERE prompt = 'later'" >/dev/null
tap_is "$(q "SELECT prompt || ':' || delayed FROM dspark.claim_jobs('w', 5, NULL, 60, ARRAY['m'])")" "later:false" \
    "a claim takes the delayed job that has come due (and clears its mark), not the other"
q "DELETE FROM dspark.jobs" >/dev/null
# claimed and handed back while still marked (claim_unserved, or ad-hoc SQL): the next claim promotes it
q "INSERT INTO dspark.jobs (model, prompt, run_after) VALUES ('m', 'x', now() + interval '1 hour')" >/dev/null
q "UPDATE dspark.jobs SET run_after = now() - interval '1 s'" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.claim_unserved('w', 'm', 5, 60)")" 1 "claim_unserved takes a delayed job that has come due"
q "UPDATE dspark.jobs SET state = 'queued', worker_id = NULL" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 5, NULL, 60)")" 1 "... and a job handed back later is claimed again"
q "DELETE FROM dspark.jobs" >/dev/null

# 200,000 jobs for later, queued first by id: a claim reads none of them
q "INSERT INTO dspark.jobs (model, prompt, owner, run_after) SELECT 'm', 'later', 'ann', now() + interval '1 hour' FROM generate_series(1, 200000)" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner) VALUES ('m', 'ann-now', 'ann')" >/dev/null
q "ANALYZE dspark.jobs" >/dev/null
# the heap rows a claim reads, through indexes or in scans (schema 14's claims
# read all the delayed ones)
claim_fetches() {
    psql -X -q -A -t -c "BEGIN" -c "SELECT string_agg(prompt, ',' ORDER BY prompt) FROM dspark.claim_jobs('w', 2, NULL, 60, ARRAY['m'])" \
        -c "SELECT idx_tup_fetch + seq_tup_read FROM pg_stat_xact_user_tables WHERE relid = 'dspark.jobs'::regclass" -c "ROLLBACK" | tr '\n' ' '
}
out=$(claim_fetches)
set -- $out
tap_is "$1" "ann-now" "one client: the claim takes the job that is due behind 200,000 delayed ones"
tap_ok "... reading $2 rows, not the delayed ones" test "$2" -lt 100
q "INSERT INTO dspark.jobs (model, prompt, owner) VALUES ('m', 'bob-now', 'bob')" >/dev/null
out=$(claim_fetches)
set -- $out
tap_is "$1" "ann-now,bob-now" "two clients in turns: the claim takes both due jobs"
tap_ok "... reading $2 rows" test "$2" -lt 100
q "UPDATE dspark.jobs SET run_after = now() - interval '1 s' WHERE prompt = 'later' AND id % 20 = 0" >/dev/null
tap_is "$(q "SELECT dspark.promote_due_jobs(NULL, 4000)")" 4000 "promote_due_jobs clears the marks of up to its limit of due jobs"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w', 20000, NULL, 60, ARRAY['m'])")" 5002 \
    "... a claim clears up to 1,000 more first: 5,000 of the 10,000 due, claimed with the two of before"
out=$(psql -X -q -A -t -c "LISTEN dspark_events" -c "SELECT dspark.promote_due_jobs()" 2>&1 | tr '\n' ' ')
tap_like "$out" "^5000 Asynchronous notification \"dspark_events\" with payload \"due:\\*\" received" \
    "... dsparkd's call clears the rest, with one notification that wakes idle workers"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE state = 'queued' AND delayed")" 190000 "... the jobs still to come stay marked"
q "DELETE FROM dspark.jobs" >/dev/null
# a claim clears its own model's due jobs first, whatever other models have due
q "INSERT INTO dspark.jobs (model, prompt, run_after) SELECT 'y', 'y', now() + interval '1 hour' FROM generate_series(1, 3000)" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, run_after) VALUES ('m', 'm-job', now() + interval '2 hour')" >/dev/null
q "UPDATE dspark.jobs SET run_after = now() - interval '1 s' WHERE model = 'y'" >/dev/null
q "UPDATE dspark.jobs SET run_after = now() WHERE model = 'm'" >/dev/null
tap_is "$(q "SELECT string_agg(prompt, ',') FROM dspark.claim_jobs('w', 5, NULL, 60, ARRAY['m'])")" "m-job" \
    "a claim takes its model's due job while 3,000 of another model came due earlier"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE model = 'y' AND delayed")" 3000 "... and leaves the other model's to their claims and dsparkd"
q "DELETE FROM dspark.jobs" >/dev/null
# up to 1,000 due, priorities and turns hold across them
q "INSERT INTO dspark.jobs (model, prompt, owner, run_after) SELECT 'm', 'ann', 'ann', now() + interval '1 hour' FROM generate_series(1, 900)" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, owner, priority, run_after) VALUES ('m', 'bob-5', 'bob', 5, now() + interval '2 hour'), ('m', 'cat', 'cat', 0, now() + interval '2 hour')" >/dev/null
q "UPDATE dspark.jobs SET run_after = now() - interval '2 s' WHERE owner = 'ann'" >/dev/null
q "UPDATE dspark.jobs SET run_after = now() - interval '1 s' WHERE owner <> 'ann'" >/dev/null
tap_is "$(q "SELECT prompt FROM dspark.claim_jobs('w', 1, NULL, 60, ARRAY['m'])")|$(q "SELECT string_agg(prompt, ',' ORDER BY prompt) FROM dspark.claim_jobs('w', 2, NULL, 60, ARRAY['m'])")" "bob-5|ann,cat" \
    "with 902 jobs come due at once, the priority goes first, then the clients in turns"
q "DELETE FROM dspark.jobs" >/dev/null

# --- leases, requeue, max_attempts ----------------------------------------
id=$(q "INSERT INTO dspark.jobs (model, prompt, max_attempts) VALUES ('m', 'doomed', 2) RETURNING id")
q "SELECT count(*) FROM dspark.claim_jobs('w1', 1, NULL, 60)" >/dev/null
tap_is "$(q "SELECT dspark.requeue_expired()")" 0 "a live lease is not requeued"
q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $id" >/dev/null
tap_is "$(q "SELECT dspark.requeue_expired()")" 1 "an expired lease is requeued"
tap_is "$(q "SELECT state || ' ' || attempt || ' ' || coalesce(worker_id, '-') FROM dspark.jobs WHERE id = $id")" "queued 1 -" \
    "... back to queued, the attempt count kept"
tap_is "$(q "SELECT attempt FROM dspark.claim_jobs('w2', 1, NULL, 60)")" 2 "the next claim is attempt 2"
q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $id" >/dev/null
q "SELECT dspark.requeue_expired()" >/dev/null
tap_is "$(q "SELECT state || '|' || error || '|' || finish_reason || '|' || (finished_at IS NOT NULL) FROM dspark.jobs WHERE id = $id")" \
    "failed|lease expired after 2 attempts|error|true" "after max_attempts an expired lease fails the job"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w3', 1, NULL, 60)")" 0 "... and it is never claimed again"

# --- a crash is paid by the job that causes it --------------------------------
# A worker dies holding five jobs: the reaper requeues them to run alone.
q "DELETE FROM dspark.jobs" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt) SELECT 'm', 'p' || g FROM generate_series(1, 5) g" >/dev/null
first=$(q "SELECT min(id) FROM dspark.jobs")
q "SELECT count(*) FROM dspark.claim_jobs('dead', 5, NULL, 60)" >/dev/null
q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s'" >/dev/null
q "SELECT dspark.requeue_expired()" >/dev/null
tap_is "$(q "SELECT string_agg(state || ' ' || attempt || ' ' || run_alone, ',') FROM dspark.jobs")" \
    "queued 1 true,queued 1 true,queued 1 true,queued 1 true,queued 1 true" "an expired lease requeues the job to run alone"
tap_is "$(q "SELECT string_agg(id::text, ',') FROM dspark.claim_jobs('w1', 5, NULL, 60)")" "$first" \
    "a worker that holds nothing claims the first such job, and only it"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w1', 5, NULL, 60)")" 0 "... and claims nothing more while it runs it"
q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('m', 'urgent', 5)" >/dev/null
tap_is "$(q "SELECT string_agg(prompt, ',') FROM dspark.claim_jobs('w2', 5, NULL, 60)")" "urgent" \
    "jobs ahead of a job that runs alone are claimed without it"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w2', 5, NULL, 60)")" 0 \
    "a worker that holds a job claims nothing while a job that runs alone is first in line"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w3', 5, 1, 60)")" 0 "... nor does one whose budget it exceeds"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w3', 5, NULL, 60)")" 1 "... and an empty worker takes it, alone"
tap_is "$(q "SELECT count(*) FROM dspark.claim_unserved('w2', 'm', 10, 60)")" 3 \
    "claim_unserved (the unknown-model sweep) takes such jobs whatever the worker holds"

# Two busy workers claiming at once: the one whose claim locks the job that
# runs alone (and the jobs behind it) must not make the other skip past it.
q "DELETE FROM dspark.jobs" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'held-a'), ('m', 'held-b'), ('m', 'alone')" >/dev/null
q "SELECT count(*) FROM dspark.claim_jobs('busy-a', 1, NULL, 60)" >/dev/null
q "SELECT count(*) FROM dspark.claim_jobs('busy-b', 1, NULL, 60)" >/dev/null
q "UPDATE dspark.jobs SET run_alone = true WHERE prompt = 'alone'" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt) SELECT 'm', 'behind' || g FROM generate_series(1, 5) g" >/dev/null
psql -X -q -A -t -c "BEGIN" -c "SELECT count(*) FROM dspark.claim_jobs('busy-a', 4, NULL, 60)" \
    -c "SELECT pg_sleep(2)" -c "COMMIT" >"$T/busy-a" 2>&1 &
busy=$!
sleep 0.5
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('busy-b', 4, NULL, 60)")" 0 \
    "a busy worker takes nothing past a job that runs alone while another claimer holds it locked"
wait $busy
tap_is "$(q "SELECT string_agg(prompt, ',' ORDER BY id) FROM dspark.jobs WHERE state = 'running'")" "held-a,held-b" \
    "... and neither busy worker took a job behind it"

# Ten jobs, one of which kills every worker that runs it, three attempts each:
# only that one fails. (Before, the ten were claimed together after each
# crash and all ten failed.)
q "DELETE FROM dspark.jobs" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt) SELECT 'm', CASE WHEN g = 4 THEN 'poison' ELSE 'p' || g END FROM generate_series(1, 10) g" >/dev/null
q "SELECT count(*) FROM dspark.claim_jobs('crash-0', 10, NULL, 60)" >/dev/null
crash=0
while [ "$(q "SELECT count(*) FROM dspark.jobs WHERE state IN ('queued', 'running')")" -gt 0 ] && [ $crash -lt 40 ]; do
    crash=$((crash + 1))
    # the worker dies: its leases expire
    q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s' WHERE state = 'running'" >/dev/null
    q "SELECT dspark.requeue_expired()" >/dev/null
    # a new worker runs what it claims: a poisoned claim kills it, the others succeed
    for id in $(q "SELECT id FROM dspark.claim_jobs('crash-$crash', 10, NULL, 60) WHERE prompt <> 'poison'"); do
        q "SELECT * FROM dspark.finish_jobs('crash-$crash', '[{\"id\": $id, \"attempt\": 2, \"state\": \"succeeded\"}]')" >/dev/null
    done
done
tap_is "$(q "SELECT string_agg(state || ' ' || attempt, ',' ORDER BY id) FROM dspark.jobs")" \
    "succeeded 2,succeeded 2,succeeded 2,failed 3,succeeded 2,succeeded 2,succeeded 2,succeeded 2,succeeded 2,succeeded 2" \
    "a job that kills its worker fails after max_attempts; the nine claimed with it succeed on their second attempt"
tap_is "$(q "SELECT error FROM dspark.jobs WHERE prompt = 'poison'")" "lease expired after 3 attempts" "... with the reason"

# one reaper at a time
id=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'x') RETURNING id")
q "SELECT count(*) FROM dspark.claim_jobs('w1', 1, NULL, 60)" >/dev/null
q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $id" >/dev/null
psql -X -q -c "BEGIN; SELECT pg_advisory_xact_lock(7234107125306835201); SELECT pg_sleep(3); COMMIT;" >/dev/null 2>&1 &
holder=$!
sleep 0.5
tap_is "$(q "SELECT coalesce(dspark.requeue_expired()::text, 'null')")" "null" \
    "requeue_expired does nothing while another session holds the reaper lock"
wait $holder
tap_is "$(q "SELECT dspark.requeue_expired()")" 1 "... and works once the lock is free"

# requeue of a job whose cancellation was requested ends it
q "DELETE FROM dspark.jobs" >/dev/null
id=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'x') RETURNING id")
q "SELECT count(*) FROM dspark.claim_jobs('w1', 1, NULL, 60)" >/dev/null
q "SELECT * FROM dspark.cancel_jobs(ARRAY[$id]::bigint[])" >/dev/null
q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $id" >/dev/null
q "SELECT dspark.requeue_expired()" >/dev/null
tap_is "$(q "SELECT state FROM dspark.jobs WHERE id = $id")" cancelled "an expired job with cancel requested ends cancelled"

# --- a worker that loads its model -------------------------------------------
q "SELECT dspark.worker_starting('host1/0', 'host1', 100, 'cuda:0', 'qwen3-8b')" >/dev/null
tap_is "$(q "SELECT state || ' ' || model || ' ' || pid FROM dspark.workers WHERE worker_id = 'host1/0'")" "starting qwen3-8b 100" \
    "worker_starting records a worker that loads its model"
q "UPDATE dspark.workers SET heartbeat_at = now() - interval '50 s', started_at = now() - interval '50 s' WHERE worker_id = 'host1/0'" >/dev/null
q "SELECT dspark.worker_starting('host1/0', 'host1', 100, 'cuda:0', 'qwen3-8b')" >/dev/null
tap_is "$(q "SELECT (heartbeat_at > now() - interval '5 s') || ' ' || (started_at < now() - interval '40 s') FROM dspark.workers WHERE worker_id = 'host1/0'")" "true true" \
    "... again from the same process: a heartbeat, the start time kept"
q "SELECT dspark.register_worker('host1/0', 'host1', 100, 'cuda:0', 'qwen3-8b', NULL, 'sha-m', NULL)" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt) VALUES ('qwen3-8b', 'x')" >/dev/null
id=$(q "SELECT id FROM dspark.claim_jobs('host1/0', 1, NULL, 600)")
q "SELECT dspark.worker_starting('host1/0', 'host1', 100, 'cuda:0', 'qwen3-8b')" >/dev/null
tap_is "$(q "SELECT lease_expires_at > now() + interval '500 s' FROM dspark.jobs WHERE id = $id")" t \
    "... leaving the jobs of the same process alone"
q "SELECT dspark.worker_starting('host1/0', 'host1', 101, 'cuda:0', 'qwen3-8b')" >/dev/null
tap_is "$(q "SELECT (lease_expires_at <= now()) || ' ' || w.state || ' ' || (w.model_checksum IS NULL) FROM dspark.jobs j, dspark.workers w WHERE j.id = $id AND w.worker_id = 'host1/0'")" \
    "true starting true" "a new process under the same worker_id ends the old one's leases and clears its identity"
out=$(q "SELECT dspark.worker_starting('host1/0', 'host2', 7, 'cuda:0', 'qwen3-8b', 30)" 2>&1)
tap_like "$out" "worker id 'host1/0' is in use on host 'host1' \\(pid 101, starting, heartbeat [0-9.]+ s ago\\)" \
    "another host's worker under a live worker's id is refused, naming the holder"
out=$(q "SELECT dspark.register_worker('host1/0', 'host2', 7, 'cuda:0', 'qwen3-8b', NULL, 'sha-m', NULL, NULL, 30)" 2>&1)
tap_like "$out" "is in use on host 'host1'" "... by register_worker too"
tap_is "$(q "SELECT w.host || ' ' || w.pid || ' ' || (j.lease_expires_at <= now()) FROM dspark.workers w, dspark.jobs j WHERE w.worker_id = 'host1/0' AND j.id = $id")" \
    "host1 101 true" "... and the holder's row is left alone"
q "UPDATE dspark.workers SET heartbeat_at = now() - interval '31 s' WHERE worker_id = 'host1/0'" >/dev/null
q "SELECT dspark.worker_starting('host1/0', 'host2', 7, 'cuda:0', 'qwen3-8b', 30)" >/dev/null
tap_is "$(q "SELECT host || ' ' || pid FROM dspark.workers WHERE worker_id = 'host1/0'")" "host2 7" \
    "once the holder's heartbeat is older than p_live_s, another host takes the id"
# two hosts announcing a new id at once: the second waits for the first's row, then is refused
psql -X -q -A -t -v ON_ERROR_STOP=1 -c "BEGIN; SELECT dspark.worker_starting('race/0', 'hostA', 1, 'cuda:0', 'm', 30);
    SELECT pg_sleep(1.5); COMMIT;" >/dev/null 2>&1 &
pa=$!
sleep 0.5
out=$(q "SELECT dspark.worker_starting('race/0', 'hostB', 2, 'cuda:0', 'm', 30)" 2>&1)
rb=$?
wait $pa
tap_is "$rb $(q "SELECT host FROM dspark.workers WHERE worker_id = 'race/0'")" "1 hostA" \
    "two hosts announcing one new id at once: the first keeps it, the second is refused"
tap_like "$out" "SQLSTATE 55006|is in use on host 'hostA'" "... with the holder named"
q "DELETE FROM dspark.jobs; DELETE FROM dspark.workers" >/dev/null

# --- heartbeats ----------------------------------------------------------
q "DELETE FROM dspark.jobs" >/dev/null
q "SELECT dspark.register_worker('w1', 'host1', 42, 'cuda:0', 'qwen3-4b', 'dspark-4b', 'sha-m', 'sha-d', '{\"sps\": [1, 2]}')" >/dev/null
tap_is "$(q "SELECT state || ' ' || host || ' ' || pid FROM dspark.workers WHERE worker_id = 'w1'")" "running host1 42" \
    "register_worker records the worker"
q "INSERT INTO dspark.jobs (model, prompt) SELECT 'm', 'p' || g FROM generate_series(1, 3) g" >/dev/null
ids=$(q "SELECT string_agg(id::text, ',' ORDER BY id) FROM dspark.claim_jobs('w1', 3, NULL, 5)")
j1=${ids%%,*}
j3=${ids##*,}
j2=$(echo "$ids" | cut -d, -f2)
q "UPDATE dspark.workers SET heartbeat_at = now() - interval '1 hour'" >/dev/null
v0=$(q "SELECT version FROM dspark.jobs WHERE id = $j1")
stop=$(q "SELECT coalesce(string_agg(h::text, ','), '') FROM dspark.heartbeat('w1', ARRAY[$ids]::bigint[], ARRAY[1,1,1], 600) h")
tap_is "$stop" "" "a heartbeat for held jobs asks to stop none"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE lease_expires_at > now() + interval '500 s'")" 3 "... and extends their leases"
tap_is "$(q "SELECT heartbeat_at > now() - interval '1 min' FROM dspark.workers WHERE worker_id = 'w1'")" t "... and the worker's heartbeat"
tap_is "$(q "SELECT version FROM dspark.jobs WHERE id = $j1")" "$((v0 + 1))" "every update bumps the version"
q "SELECT * FROM dspark.cancel_jobs(ARRAY[$j2]::bigint[])" >/dev/null
tap_is "$(q "SELECT state || ' ' || cancel_requested FROM dspark.jobs WHERE id = $j2")" "running true" \
    "cancelling a running job sets cancel_requested and leaves it running"
stop=$(q "SELECT string_agg(h::text, ',') FROM dspark.heartbeat('w1', ARRAY[$ids]::bigint[], ARRAY[1,1,1], 600) h")
tap_is "$stop" "$j2" "the next heartbeat tells the worker to stop it"
stop=$(q "SELECT string_agg(h::text, ',') FROM dspark.heartbeat('w1', ARRAY[$j1,$j3]::bigint[], ARRAY[1,2], 600) h")
tap_is "$stop" "$j3" "a heartbeat with a stale attempt is told to stop that job"
stop=$(q "SELECT string_agg(h::text, ',') FROM dspark.heartbeat('w9', ARRAY[$j1]::bigint[], ARRAY[1], 600) h")
tap_is "$stop" "$j1" "a heartbeat from another worker holds nothing"
stop=$(q "SELECT coalesce(string_agg(h::text, ','), '') FROM dspark.heartbeat('w1', ARRAY[$j1]::bigint[], ARRAY[1], 600, 'host1', 42) h")
tap_is "$stop" "" "a heartbeat with the holder's host and pid is accepted"
q "UPDATE dspark.jobs SET lease_expires_at = now() WHERE id = $j1" >/dev/null
out=$(q "SELECT * FROM dspark.heartbeat('w1', ARRAY[$j1]::bigint[], ARRAY[1], 600, 'host1', 41)" 2>&1)
tap_like "$out" "worker id 'w1' was taken over by host 'host1' \\(pid 42\\)" \
    "a heartbeat from a process that no longer holds the id is refused, naming the holder"
tap_is "$(q "SELECT lease_expires_at <= now() FROM dspark.jobs WHERE id = $j1")" t "... before it extends any lease"
q "SELECT dspark.set_worker_state('w1', 'stopped', 'host9', 42)" >/dev/null
tap_is "$(q "SELECT state FROM dspark.workers WHERE worker_id = 'w1'")" running \
    "set_worker_state from a process that no longer holds the id leaves the row alone"
q "SELECT dspark.set_worker_state('w1', 'draining', 'host1', 42)" >/dev/null
tap_is "$(q "SELECT state FROM dspark.workers WHERE worker_id = 'w1'")" draining "... and the holder's own call changes it"
q "SELECT dspark.set_worker_state('w1', 'running')" >/dev/null

# --- a process's instance token (010) ---
q "SELECT dspark.register_worker('w5', 'host1', 42, 'cuda:0', 'qwen3-4b', NULL, 'sha-m', NULL, NULL, 30, 'inst-a')" >/dev/null
out=$(q "SELECT * FROM dspark.heartbeat('w5', ARRAY[]::bigint[], ARRAY[]::int[], 600, 'host1', 42, 'inst-b')" 2>&1)
tap_like "$out" "worker id 'w5' was taken over by host 'host1' \\(pid 42, instance 'inst-a'\\)" \
    "a heartbeat from another process with the holder's host and pid is refused by its instance"
stop=$(q "SELECT coalesce(string_agg(h::text, ','), '') FROM dspark.heartbeat('w5', ARRAY[]::bigint[], ARRAY[]::int[], 600, 'host1', 42, 'inst-a') h" 2>&1)
tap_is "$stop" "" "... and the holder's is accepted"
q "SELECT dspark.set_worker_state('w5', 'stopped', 'host1', 42, 'inst-b')" >/dev/null
tap_is "$(q "SELECT state FROM dspark.workers WHERE worker_id = 'w5'")" running \
    "set_worker_state goes by the instance: the other process's call changes nothing"
q "SELECT dspark.set_worker_state('w5', 'draining', 'host1', 42, 'inst-a')" >/dev/null
tap_is "$(q "SELECT state FROM dspark.workers WHERE worker_id = 'w5'")" draining "... and the holder's does"
q "SELECT dspark.worker_starting('w5', 'host1', 42, 'cuda:0', 'qwen3-4b')" >/dev/null
q "SELECT dspark.register_worker('w5', 'host1', 42, 'cuda:0', 'qwen3-4b', NULL, 'sha-m', NULL)" >/dev/null
tap_is "$(q "SELECT instance FROM dspark.worker_status WHERE worker_id = 'w5'")" inst-a \
    "a caller without a token that has the holder's host and pid keeps the row's instance (worker_status shows it)"
q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'instance')" >/dev/null
ij=$(q "SELECT id FROM dspark.claim_jobs('w5', 1, NULL, 5)")
q "SELECT dspark.worker_starting('w5', 'host1', 42, 'cuda:0', 'qwen3-4b', 30, 'inst-c')" >/dev/null
tap_is "$(q "SELECT (j.lease_expires_at <= now()) || ' ' || w.instance FROM dspark.jobs j, dspark.workers w WHERE j.id = $ij AND w.worker_id = 'w5'")" \
    "true inst-c" "a new process with the old one's host and pid ends its leases (worker_starting with a new instance)"
q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $ij; DELETE FROM dspark.workers WHERE worker_id = 'w5'" >/dev/null
out=$(q "SELECT * FROM dspark.heartbeat('w5', ARRAY[$ij]::bigint[], ARRAY[1], 600, 'host1', 42, 'inst-c')" 2>&1)
tap_like "$out" "worker id 'w5' has no row in dspark.workers" "a heartbeat with an instance for a row that is gone is refused"
tap_is "$(q "SELECT lease_expires_at <= now() FROM dspark.jobs WHERE id = $ij")" t "... before it extends any lease"
stop=$(q "SELECT coalesce(string_agg(h::text, ','), '') FROM dspark.heartbeat('w5', ARRAY[$ij]::bigint[], ARRAY[1], 600, 'host1', 42) h" 2>&1)
tap_is "$stop" "" "without an instance a heartbeat for a missing row goes on as before"
q "DELETE FROM dspark.jobs WHERE id = $ij" >/dev/null

# --- a heartbeat with an instance ends the leases of the jobs it does not name (017) ---
q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('m', 'before', 9)" >/dev/null
jb=$(q "SELECT id FROM dspark.claim_jobs('w6', 1, NULL, 600)")
q "SELECT dspark.register_worker('w6', 'host6', 60, 'cuda:0', 'qwen3-4b', NULL, 'sha-m', NULL, NULL, 30, 'inst-s')" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, priority) SELECT 'm', 's' || g, 8 FROM generate_series(1, 5) g" >/dev/null
sids=$(q "SELECT string_agg(id::text, ' ' ORDER BY id) FROM dspark.claim_jobs('w6', 5, NULL, 600)")
sa=$(echo "$sids" | cut -d' ' -f1) sb=$(echo "$sids" | cut -d' ' -f2) sc=$(echo "$sids" | cut -d' ' -f3)
sd=$(echo "$sids" | cut -d' ' -f4) se=$(echo "$sids" | cut -d' ' -f5)
q "UPDATE dspark.jobs SET max_attempts = 1 WHERE id = $sc" >/dev/null
q "SELECT * FROM dspark.cancel_jobs(ARRAY[$sd]::bigint[])" >/dev/null
vb=$(q "SELECT version FROM dspark.jobs WHERE id = $sb")
# its watermark (018): the server time the worker had heard up to; these claims came before it
q "SELECT * FROM dspark.heartbeat('w6', ARRAY[$sa, $se]::bigint[], ARRAY[1, 1], 600, 'host6', 60, 'inst-s')" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE worker_id = 'w6' AND state = 'running'")" 6 \
    "a heartbeat with an instance but no watermark (a worker older than schema 18) ends no lease"
stop=$(q "SELECT coalesce(string_agg(h::text, ','), '') FROM dspark.heartbeat('w6', ARRAY[$sa, $se]::bigint[], ARRAY[1, 1], 600, 'host6', 60, 'inst-s', now()) h" 2>"$PGH_DIR/stray-warning")
tap_is "$stop" "" "a heartbeat naming two of the process's six running jobs asks to stop none"
tap_like "$(cat "$PGH_DIR/stray-warning")" \
    "WARNING:  heartbeat of worker 'w6': 3 running job\\(s\\) that it did not name ended their leases: $sb \\(queued\\), $sc \\(failed\\), $sd \\(cancelled\\)" \
    "... and says so in a WARNING (019) naming the three it did not name, each with the state it went to"
tap_is "$(q "SELECT string_agg(state || ' ' || coalesce(worker_id, '-') || ' ' || (lease_expires_at IS NULL) || ' ' || run_alone || ' ' || attempt || ' ' || released, ', ' ORDER BY id) FROM dspark.jobs WHERE id IN ($sa, $sb, $se)")" \
    "running w6 false false 1 0, queued - true false 1 0, running w6 false false 1 0" \
    "... a job it does not name goes back to the queue, its claim counted, not to run alone; the named ones keep theirs"
tap_is "$(q "SELECT version FROM dspark.jobs WHERE id = $sb")" "$((vb + 1))" "... its version bumped"
tap_like "$(q "SELECT state || ' ' || finish_reason || ' ' || error FROM dspark.jobs WHERE id = $sc")" \
    "failed error not held by worker 'w6', which had it running .* after 1 attempts" \
    "... one whose attempts are spent fails, saying why"
tap_is "$(q "SELECT state FROM dspark.jobs WHERE id = $sd")" cancelled "... one with a cancel asked for is cancelled"
tap_is "$(q "SELECT state || ' ' || worker_id FROM dspark.jobs WHERE id = $jb")" "running w6" \
    "... and one claimed before the process registered is left to its lease"
q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('m', 'legacy', 7)" >/dev/null
sf=$(q "SELECT id FROM dspark.claim_jobs('w6', 1, NULL, 600)")
q "SELECT * FROM dspark.heartbeat('w6', ARRAY[$sa]::bigint[], ARRAY[1], 600, 'host6', 60)" >/dev/null
q "SELECT * FROM dspark.heartbeat('w6', ARRAY[$sa]::bigint[], ARRAY[1], 600)" >/dev/null
tap_is "$(q "SELECT state FROM dspark.jobs WHERE id = $sf")" running "a heartbeat without an instance ends no lease"
q "SELECT * FROM dspark.heartbeat('w6', ARRAY[$sa]::bigint[], ARRAY[1], 600, 'host6', 60, 'inst-x', now())" >/dev/null 2>&1
tap_is "$(q "SELECT state FROM dspark.jobs WHERE id = $sf")" running "... nor one from a process that does not hold the row"
# a job claimed after the heartbeat's watermark is not one the worker could have named: left running
wm=$(q "SELECT now()")
q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('m', 'newer', 7)" >/dev/null
sg=$(q "SELECT id FROM dspark.claim_jobs('w6', 1, NULL, 600)")
q "SELECT * FROM dspark.heartbeat('w6', ARRAY[$sa]::bigint[], ARRAY[1], 600, 'host6', 60, 'inst-s', '$wm')" >/dev/null
tap_is "$(q "SELECT id || ' ' || state FROM dspark.jobs WHERE id IN ($sf, $sg) ORDER BY id")" "$sf queued
$sg running" "a heartbeat ends the lease of an unnamed job claimed before its watermark, not of one claimed after it"
# a heartbeat that runs late: sent on a connection whose server process stopped (the worker then gives the
# connection up and claims more on another), it runs when the process resumes, naming the jobs of before;
# its watermark is older than the newer claims, which stay running
wm=$(q "SELECT now()")
mkfifo "$PGH_DIR/late.fifo"
psql -X -q -A -t "application_name=late-heartbeat" <"$PGH_DIR/late.fifo" >"$PGH_DIR/late.out" 2>&1 &
lp=$!
exec 9>"$PGH_DIR/late.fifo"
lb=
for _ in 1 2 3 4 5 6 7 8 9 10; do
    lb=$(q "SELECT pid FROM pg_stat_activity WHERE application_name = 'late-heartbeat'")
    [ -n "$lb" ] && break
    sleep 0.2
done
stop_idle "$lb"
tap_result $? "a worker's connection whose server process is stopped while idle (pid $lb)"
echo "SELECT * FROM dspark.heartbeat('w6', ARRAY[$sa, $sg]::bigint[], ARRAY[1, 1], 600, 'host6', 60, 'inst-s', '$wm');" >&9
sleep 0.3
exec 9>&-
kill -KILL "$lp" 2>/dev/null
wait "$lp" 2>/dev/null
q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('m', 'after-1', 21), ('m', 'after-2', 20)" >/dev/null
sh=$(q "SELECT id FROM dspark.claim_jobs('w6', 1, NULL, 600)")
si=$(q "SELECT id FROM dspark.claim_jobs('w6', 1, NULL, 600)")
q "UPDATE dspark.jobs SET max_attempts = 1 WHERE id = $si" >/dev/null
q "SELECT * FROM dspark.heartbeat('w6', ARRAY[$sa, $sg, $sh, $si]::bigint[], ARRAY[1, 1, 1, 1], 600, 'host6', 60, 'inst-s', now())" >/dev/null
hb2=$(q "SELECT heartbeat_at FROM dspark.workers WHERE worker_id = 'w6'")
kill -CONT "$lb"
for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    [ -z "$(q "SELECT pid FROM pg_stat_activity WHERE pid = $lb")" ] && break
    sleep 0.25
done
tap_is "$(q "SELECT count(*) FROM pg_stat_activity WHERE pid = $lb")|$(q "SELECT heartbeat_at > '$hb2' FROM dspark.workers WHERE worker_id = 'w6'")|$(q "SELECT string_agg(state || ' ' || worker_id || ' ' || attempt, ', ' ORDER BY id) FROM dspark.jobs WHERE id IN ($sa, $sg, $sh, $si)")" \
    "0|t|running w6 1, running w6 1, running w6 1, running w6 1" \
    "... once it resumes, its late heartbeat has run and ended no lease of the jobs claimed since on the new connection"
# claims only for the process that holds the worker row (018)
q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('m', 'held-1', 30), ('m', 'held-2', 29)" >/dev/null
tap_is "$(q "SELECT prompt || ' ' || worker_id || ' ' || state FROM dspark.claim_jobs_held('inst-s', 'w6', 1, NULL, 600)")" \
    "held-1 w6 running" "claim_jobs_held claims for the process that holds the worker row"
out=$(q "SELECT * FROM dspark.claim_jobs_held('inst-old', 'w6', 5, NULL, 600)" 2>&1)
tap_like "$out" "worker id 'w6' was taken over by host 'host6' \\(pid 60, instance 'inst-s'\\)" \
    "... and refuses a process whose id was taken over, naming the holder"
tap_is "$(q "SELECT state FROM dspark.jobs WHERE prompt = 'held-2'")" queued "... which claims nothing"
out=$(psql -X -q -A -t -c "SELECT * FROM dspark.claim_jobs_held('inst-s', 'w-none', 5, NULL, 600)" 2>&1)
tap_like "$out" "worker id 'w-none' has no row in dspark.workers" "... and a worker id with no row"
tap_is "$(q "SELECT state FROM dspark.jobs WHERE prompt = 'held-2'")" queued "... which claims nothing either"
q "DELETE FROM dspark.jobs WHERE prompt IN ('held-1', 'held-2')" >/dev/null
# the unknown-model sweep's claims too (020)
q "INSERT INTO dspark.jobs (model, prompt) VALUES ('gone', 'gone-1'), ('gone', 'gone-2')" >/dev/null
out=$(q "SELECT * FROM dspark.claim_unserved_held('inst-old', 'w6', 'gone', 10, 600)" 2>&1)
tap_like "$out" "worker id 'w6' was taken over by host 'host6' \\(pid 60, instance 'inst-s'\\)" \
    "claim_unserved_held refuses a process whose id was taken over, naming the holder"
out=$(psql -X -q -A -t -c "SELECT * FROM dspark.claim_unserved_held('inst-s', 'w-none', 'gone', 10, 600)" 2>&1)
tap_like "$out" "worker id 'w-none' has no row in dspark.workers" "... and a worker id with no row"
tap_is "$(q "SELECT string_agg(state, ',') FROM dspark.jobs WHERE model = 'gone'")" "queued,queued" \
    "... neither claims a job"
tap_is "$(q "SELECT string_agg(prompt || ' ' || worker_id || ' ' || state, ', ' ORDER BY id) FROM dspark.claim_unserved_held('inst-s', 'w6', 'gone', 10, 600)")" \
    "gone-1 w6 running, gone-2 w6 running" "... and it claims for the process that holds the worker row"
q "DELETE FROM dspark.jobs WHERE model = 'gone'" >/dev/null
# ... with the sweep's timeout, only the jobs that have waited it, and none of a served model (021)
q "INSERT INTO dspark.jobs (model, prompt, created_at, run_after)
   VALUES ('gone', 'gone-old', now() - interval '2 minutes', now() - interval '2 minutes'), ('gone', 'gone-new', now(), now()),
          ('served', 'served-old', now() - interval '2 minutes', now() - interval '2 minutes')" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, created_at, run_after, delayed)
   VALUES ('gone', 'gone-due', now() - interval '2 minutes', now() - interval '1 second', true)" >/dev/null
tap_is "$(q "SELECT string_agg(prompt, ', ' ORDER BY id) FROM dspark.claim_unserved_held('inst-s', 'w6', 'gone', 10, 600, 60)")|$(q "SELECT string_agg(prompt || ' ' || state, ', ' ORDER BY id) FROM dspark.jobs WHERE model = 'gone' AND state = 'queued'")" \
    "gone-old|gone-new queued, gone-due queued" \
    "claim_unserved_held with the sweep's timeout takes only the jobs queued and due that long, not a new one nor one just come due"
q "SELECT dspark.register_worker('w8', 'host8', 80, 'cuda:0', 'served', NULL, 'sha-s', NULL, NULL, 30, 'inst-8')" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.claim_unserved_held('inst-s', 'w6', 'served', 10, 600, 60)")|$(q "SELECT state FROM dspark.jobs WHERE prompt = 'served-old'")" \
    "0|queued" "... and nothing of a model that a worker serves by the time it claims"
q "UPDATE dspark.workers SET state = 'stopped', heartbeat_at = now() - interval '11 minutes' WHERE worker_id = 'w8'" >/dev/null
tap_is "$(q "SELECT string_agg(prompt, ', ') FROM dspark.claim_unserved_held('inst-s', 'w6', 'served', 10, 600, 60)")" \
    "served-old" "... but a stopped worker not heard from for ten minutes serves it no longer"
tap_is "$(q "SELECT string_agg(prompt, ', ' ORDER BY id) FROM dspark.claim_unserved('w6', 'gone', 10, 600)")" \
    "gone-new, gone-due" "claim_unserved without the timeout claims every due job, as before"
q "DELETE FROM dspark.jobs WHERE model IN ('gone', 'served'); DELETE FROM dspark.workers WHERE worker_id = 'w8'" >/dev/null
q "DELETE FROM dspark.jobs WHERE id IN ($jb, $sa, $sb, $sc, $sd, $se, $sf, $sg, $sh, $si); DELETE FROM dspark.workers WHERE worker_id = 'w6'" >/dev/null
# many unnamed jobs: the warning names the first 20, then counts the rest; a heartbeat that ends no
# lease warns of nothing
q "SELECT dspark.register_worker('w7', 'host7', 70, 'cuda:0', 'qwen3-4b', NULL, 'sha-m', NULL, NULL, 30, 'inst-m')" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, priority) SELECT 'm', 'many-' || g, 40 FROM generate_series(1, 23) g" >/dev/null
mids=$(q "SELECT string_agg(id::text, ', ' ORDER BY id) FROM dspark.claim_jobs('w7', 23, NULL, 600)")
first20=$(q "SELECT string_agg(id || ' (queued)', ', ' ORDER BY id) FROM (SELECT id FROM dspark.jobs WHERE prompt LIKE 'many-%' ORDER BY id LIMIT 20) f")
q "SELECT * FROM dspark.heartbeat('w7', ARRAY[]::bigint[], ARRAY[]::int[], 600, 'host7', 70, 'inst-m', now())" \
    >/dev/null 2>"$PGH_DIR/many-warning"
tap_like "$(cat "$PGH_DIR/many-warning")" \
    "WARNING:  heartbeat of worker 'w7': 23 running job\\(s\\) that it did not name ended their leases: $(echo "$first20" | sed 's/[()]/\\&/g') and 3 more" \
    "... of 23 unnamed jobs, the warning names the first 20 and counts the other 3"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE id IN ($mids) AND state = 'queued'")" 23 "... which are all queued again"
q "SELECT * FROM dspark.heartbeat('w7', ARRAY[]::bigint[], ARRAY[]::int[], 600, 'host7', 70, 'inst-m', now())" \
    >/dev/null 2>"$PGH_DIR/no-warning"
tap_is "$(cat "$PGH_DIR/no-warning")" "" "a heartbeat that ends no lease warns of nothing"
q "DELETE FROM dspark.jobs WHERE prompt LIKE 'many-%'; DELETE FROM dspark.workers WHERE worker_id = 'w7'" >/dev/null
out=$(psql -X -q -c "UPDATE dspark.jobs SET cancel_requested = false WHERE id = $j2" 2>&1)
tap_like "$out" "cancellation of job $j2 cannot be withdrawn" "a cancellation cannot be withdrawn"

# --- fenced write-back -----------------------------------------------------
res() {
    echo "[{\"id\": $1, \"attempt\": $2, \"state\": \"$3\", \"output_text\": \"out $1\", \"output_ids\": [1, 2], \"finish_reason\": \"stop\", \"stats\": {\"output_tokens\": 2, \"rounds\": 1, \"mean_acceptance_length\": 2.0, \"acceptance_by_position\": [1, 0], \"verified_by_position\": [1, 1], \"model\": \"qwen3-4b\", \"device\": \"cuda:0\", \"time_to_first_token_s\": 0.25}}]"
}
tap_is "$(q "SELECT applied FROM dspark.finish_jobs('w1', '$(res "$j1" 2 succeeded)')")" f \
    "a write-back with a stale attempt is refused"
tap_is "$(q "SELECT applied FROM dspark.finish_jobs('w2', '$(res "$j1" 1 succeeded)')")" f \
    "a write-back from another worker is refused"
tap_is "$(q "SELECT state || ' ' || (output_text IS NULL) FROM dspark.jobs WHERE id = $j1")" "running true" \
    "... and changed nothing"
tap_is "$(q "SELECT applied FROM dspark.finish_jobs('w1', '$(res "$j1" 1 succeeded)')")" t \
    "the current attempt's write-back is applied"
tap_is "$(q "SELECT state || '|' || output_text || '|' || output_ids::text || '|' || finish_reason || '|' || (lease_expires_at IS NULL) FROM dspark.jobs WHERE id = $j1")" \
    "succeeded|out $j1|{1,2}|stop|true" "... storing output and finish reason"
tap_is "$(q "SELECT attempt || '|' || worker_id || '|' || device || '|' || output_tokens || '|' || acceptance_by_position::text || '|' || time_to_first_token_s || '|' || (queue_wait_s >= 0) || '|' || (e2e_latency_s > 0) || '|' || owner FROM dspark.job_stats WHERE job_id = $j1")" \
    "1|w1|cuda:0|2|{1,0}|0.25|true|true|postgres" "... and one job_stats row, with queue wait and latency filled in"
tap_is "$(q "SELECT applied FROM dspark.finish_jobs('w1', '$(res "$j1" 1 succeeded)')")" f \
    "a second write-back of a finished job is refused"
tap_is "$(q "SELECT count(*) FROM dspark.job_stats WHERE job_id = $j1")" 1 "... and adds no statistics"
out=$(psql -X -q -c "SELECT * FROM dspark.finish_jobs('w1', '$(res "$j3" 1 queued)')" 2>&1)
tap_like "$out" "invalid final state 'queued'" "a write-back to a non-final state is refused"
tap_is "$(q "SELECT applied FROM dspark.finish_jobs('w1', '$(res "$j2" 1 cancelled)')")" t \
    "the worker ends a cancelled running job"
tap_is "$(q "SELECT state || ' ' || finish_reason FROM dspark.jobs WHERE id = $j2")" "cancelled stop" \
    "... as cancelled"
out=$(psql -X -q -c "UPDATE dspark.jobs SET state = 'queued' WHERE id = $j1" 2>&1)
tap_like "$out" "job $j1 cannot go from 'succeeded' to 'queued'" "a finished job cannot change state"
tap_is "$(q "SELECT id FROM dspark.job_results WHERE id = $j1 AND output_tokens = 2 AND mean_acceptance_length = 2")" "$j1" \
    "job_results joins the job with its final statistics"

# --- release (drain) --------------------------------------------------------
q "DELETE FROM dspark.jobs" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'x')" >/dev/null
id=$(q "SELECT id FROM dspark.claim_jobs('w1', 1, NULL, 60)")
tap_is "$(q "SELECT count(*) FROM dspark.release_jobs('w1', ARRAY[$id]::bigint[], ARRAY[7])")" 0 "release with a stale attempt does nothing"
tap_is "$(q "SELECT count(*) FROM dspark.release_jobs('w1', ARRAY[$id]::bigint[], ARRAY[1])")" 1 "release hands a job back"
tap_is "$(q "SELECT state || ' ' || attempt || ' ' || released FROM dspark.jobs WHERE id = $id")" "queued 1 1" \
    "... queued, attempt kept, the hand-back counted"
tap_is "$(q "SELECT applied FROM dspark.finish_jobs('w1', '$(res "$id" 1 succeeded)')")" f "... and the old claim's write-back is refused"
# three drains and two crashes: a job with max_attempts 3 is still queued
q "UPDATE dspark.jobs SET max_attempts = 3 WHERE id = $id" >/dev/null
for a in 2 3; do
    q "SELECT count(*) FROM dspark.claim_jobs('w1', 1, NULL, 60)" >/dev/null
    q "SELECT count(*) FROM dspark.release_jobs('w1', ARRAY[$id]::bigint[], ARRAY[$a])" >/dev/null
done
for a in 4 5; do
    q "SELECT count(*) FROM dspark.claim_jobs('w1', 1, NULL, 60)" >/dev/null
    q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $id" >/dev/null
    q "SELECT dspark.requeue_expired()" >/dev/null
done
tap_is "$(q "SELECT state || ' ' || attempt || ' ' || released FROM dspark.jobs WHERE id = $id")" "queued 5 3" \
    "hand-backs do not count against max_attempts: three drains and two crashes leave the job queued"
q "SELECT count(*) FROM dspark.claim_jobs('w1', 1, NULL, 60)" >/dev/null
q "UPDATE dspark.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $id" >/dev/null
q "SELECT dspark.requeue_expired()" >/dev/null
tap_is "$(q "SELECT state || '|' || error FROM dspark.jobs WHERE id = $id")" "failed|lease expired after 3 attempts" \
    "... and the third crash fails it"

# --- cancel queued ----------------------------------------------------------
q "DELETE FROM dspark.jobs" >/dev/null
id=$(q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'x') RETURNING id")
tap_is "$(q "SELECT state FROM dspark.cancel_jobs(ARRAY[$id]::bigint[])")" cancelled "cancelling a queued job ends it at once"
tap_is "$(q "SELECT finish_reason || ' ' || (finished_at IS NOT NULL) FROM dspark.jobs WHERE id = $id")" "cancelled true" "... with finish_reason and finished_at"
tap_is "$(q "SELECT count(*) FROM dspark.cancel_jobs(ARRAY[$id]::bigint[])")" 0 "cancelling it again changes nothing"
tap_is "$(q "SELECT count(*) FROM dspark.claim_jobs('w1', 1, NULL, 60)")" 0 "a cancelled job is never claimed"
bid=$(q "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
q "INSERT INTO dspark.jobs (batch_id, model, prompt) SELECT $bid, 'm', 'x' FROM generate_series(1, 4)" >/dev/null
q "SELECT count(*) FROM dspark.claim_jobs('w1', 1, NULL, 60)" >/dev/null
tap_is "$(q "SELECT string_agg(state, ',' ORDER BY state) FROM dspark.cancel_batch($bid)")" "cancelled,cancelled,cancelled,running" \
    "cancel_batch cancels the queued jobs and flags the running one"
tap_is "$(q "SELECT total || ' ' || cancelled || ' ' || running || ' ' || done FROM dspark.batch_progress WHERE batch_id = $bid")" "4 3 1 3" \
    "batch_progress counts the batch"

# --- expiry -----------------------------------------------------------------
q "DELETE FROM dspark.jobs" >/dev/null
e1=$(q "INSERT INTO dspark.jobs (model, prompt, expires_at) VALUES ('m', 'past', now() - interval '1 s') RETURNING id")
e2=$(q "INSERT INTO dspark.jobs (model, prompt, expires_at, priority) VALUES ('m', 'future', now() + interval '1 hour', -1) RETURNING id")
e3=$(q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('m', 'none', -2) RETURNING id")
tap_is "$(q "SELECT string_agg(id::text, ',' ORDER BY id) FROM dspark.claim_jobs('w1', 10, NULL, 60)")" "$e2,$e3" \
    "claim_jobs passes over a queued job past its expires_at"
q "UPDATE dspark.jobs SET expires_at = now() - interval '1 s' WHERE id = $e2" >/dev/null   # it runs past its deadline
u1=$(q "INSERT INTO dspark.jobs (model, prompt, expires_at) VALUES ('unserved', 'x', now() - interval '1 s') RETURNING id")
tap_is "$(q "SELECT count(*) FROM dspark.claim_unserved('w1', 'unserved', 10, 60)")" 0 \
    "claim_unserved (the unknown-model sweep) passes over it too"
q "DELETE FROM dspark.jobs WHERE id = $u1" >/dev/null
tap_is "$(q "SELECT dspark.expire_jobs()")" 1 "expire_jobs ends the queued job past its deadline"
tap_is "$(q "SELECT state || ' ' || finish_reason || ' ' || (finished_at IS NOT NULL) || ' ' || (error ~ '^still queued at its deadline, [0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8} UTC$') FROM dspark.jobs WHERE id = $e1")" \
    "cancelled expired true true" "... cancelled, finish_reason expired, with finished_at and the reason"
tap_is "$(q "SELECT state FROM dspark.jobs WHERE id = $e2")" running "... and leaves a running job past its deadline to finish"
tap_is "$(q "SELECT dspark.expire_jobs()")" 0 "a second sweep finds nothing"
q "INSERT INTO dspark.jobs (model, prompt, expires_at) SELECT 'm', 'p' || g, now() - interval '1 s' FROM generate_series(1, 5) g" >/dev/null
tap_is "$(q "SELECT dspark.expire_jobs(3)") $(q "SELECT dspark.expire_jobs(3)")" "3 2" "expire_jobs ends at most p_limit jobs a call"
x=$(q "INSERT INTO dspark.jobs (model, prompt, expires_at) VALUES ('m', 'n', now() - interval '1 s') RETURNING id")
out=$(psql -X -q -A -t -c "LISTEN dspark_events" -c "SELECT dspark.expire_jobs()" -c "SELECT 1" 2>&1)
tap_like "$out" "payload \"[^\"]*$x[^0-9]" "an expiry is notified on dspark_events, as any state change"

# --- retention --------------------------------------------------------------
q "DELETE FROM dspark.jobs; DELETE FROM dspark.batches" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.job_stats")" 0 "deleting jobs deletes their statistics"
bid=$(q "INSERT INTO dspark.batches DEFAULT VALUES RETURNING id")
q "INSERT INTO dspark.jobs (batch_id, model, prompt) SELECT $bid, 'm', 'x' FROM generate_series(1, 6)" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt) VALUES ('m', 'stays queued')" >/dev/null
for id in $(q "SELECT id FROM dspark.claim_jobs('w1', 4, NULL, 60)"); do
    q "SELECT * FROM dspark.finish_jobs('w1', '$(res "$id" 1 succeeded)')" >/dev/null
done
# two of them finished long ago, and the batch is old
q "UPDATE dspark.jobs SET finished_at = now() - interval '10 days' WHERE id IN (SELECT id FROM dspark.jobs WHERE state = 'succeeded' ORDER BY id LIMIT 2)" >/dev/null
q "UPDATE dspark.batches SET created_at = now() - interval '11 days'" >/dev/null
tap_is "$(q "SELECT dspark.prune('7 days')")" 2 "prune deletes the finished jobs older than the interval"
tap_is "$(q "SELECT count(*) FROM dspark.jobs")" 5 "... and nothing else"
tap_is "$(q "SELECT count(*) FROM dspark.job_stats")" 2 "... with their statistics"
tap_is "$(q "SELECT dspark.prune('0 s')")" 2 "prune('0 s') deletes every finished job"
tap_is "$(q "SELECT string_agg(state, ',' ORDER BY state) FROM dspark.jobs")" "queued,queued,queued" \
    "... never queued or running ones"
q "DELETE FROM dspark.jobs WHERE batch_id IS NOT NULL" >/dev/null
q "SELECT dspark.prune('7 days')" >/dev/null
tap_is "$(q "SELECT count(*) FROM dspark.batches")" 0 "an old, empty batch is pruned"
out=$(psql -X -q -c "SELECT dspark.prune('-1 day')" 2>&1)
tap_like "$out" "interval must be zero or positive" "a negative retention interval is refused"

# --- (018) a claim under way (its transaction open, as when its server process stalls) holds up neither the lease
# reaper, which marks a silent worker lost, nor the worker's heartbeat on another connection
q "SELECT dspark.register_worker('w7', 'host7', 70, 'cuda:0', 'qwen3-4b', NULL, 'sha-m', NULL, NULL, 30, 'inst-7')" >/dev/null
q "INSERT INTO dspark.jobs (model, prompt, priority) VALUES ('m', 'open-claim', 40)" >/dev/null
q "UPDATE dspark.workers SET heartbeat_at = now() - interval '1 hour' WHERE worker_id = 'w7'" >/dev/null
mkfifo "$PGH_DIR/claim.fifo"
psql -X -q -A -t <"$PGH_DIR/claim.fifo" >/dev/null 2>&1 &
cp=$!
exec 8>"$PGH_DIR/claim.fifo"
echo "BEGIN; SELECT count(*) FROM dspark.claim_jobs_held('inst-7', 'w7', 1, NULL, 600);" >&8
for _ in 1 2 3 4 5 6 7 8 9 10; do
    [ "$(q "SELECT state FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND query LIKE '%claim_jobs_held%'")" = "idle in transaction" ] && break
    sleep 0.2
done
out=$(PGOPTIONS='-c statement_timeout=3000' psql -X -q -A -t -c "SELECT dspark.requeue_expired('1 minute')" 2>&1)
tap_like "$out|$(q "SELECT state FROM dspark.workers WHERE worker_id = 'w7'")" "^[0-9]+\\|lost$" \
    "a claim whose transaction is still open does not hold up the lease reaper, which marks its silent worker lost"
out=$(PGOPTIONS='-c statement_timeout=3000' psql -X -q -A -t -c "SELECT count(*) FROM dspark.heartbeat('w7', ARRAY[]::bigint[], ARRAY[]::int[], 600, 'host7', 70, 'inst-7')" 2>&1)
tap_is "$out|$(q "SELECT state FROM dspark.workers WHERE worker_id = 'w7'")" "0|running" \
    "... nor the worker's heartbeat on another connection"
echo "ROLLBACK;" >&8
exec 8>&-
wait "$cp"
tap_done
