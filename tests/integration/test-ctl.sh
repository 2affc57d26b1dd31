#!/bin/sh
# test-ctl.sh: dsparkctl end to end against a private PostgreSQL, with the
# worker's side played by SQL (claim_jobs / finish_jobs): usage and exit
# codes, connection options, submit (prompt, stdin, chat, JSONL in the OpenAI
# Batch and DeepSpec formats, parameters), status, list, results (OpenAI
# Batch output), stats, wait/watch (exit codes, LISTEN wake-up), cancel,
# workers; --json output parsed back.
. "${DS_SRCDIR:-$(dirname "$0")/../..}/tests/integration/pg-harness.sh"
pg_harness_start
pg_harness_init
T=$PGH_DIR
C=$DSPARKCTL

# --- usage -------------------------------------------------------------------
for cmd in db submit status list wait watch cancel resubmit results stats workers; do
    out=$("$C" "$cmd" --help 2>&1)
    rc=$?
    case $out in
    "usage: dsparkctl $cmd"*) ok=0 ;;
    *) ok=1 ;;
    esac
    tap_is "$rc$ok" 00 "dsparkctl $cmd --help prints its usage"
done
"$C" >/dev/null 2>&1
tap_is "$?" 2 "no command: exit 2"
out=$("$C" frobnicate 2>&1)
tap_is "$?" 2 "an unknown command: exit 2"
tap_like "$out" "unknown command 'frobnicate'" "... named in the message"
"$C" submit --no-such-option x >/dev/null 2>&1
tap_is "$?" 2 "an unknown option: exit 2"
out=$("$C" submit -m m --max-tokens 0 hi 2>&1)
tap_is "$?" 2 "--max-tokens 0: exit 2"
tap_like "$out" "--max-tokens must be an integer between 1 and 1000000, got '0'" "... with the range"
out=$("$C" submit -m m --temperature NaN hi 2>&1)
tap_is "$?" 2 "--temperature NaN: exit 2"
tap_like "$out" "temperature must be a finite number" "... named in the message"
"$C" wait >/dev/null 2>&1
tap_is "$?" 2 "wait without jobs: exit 2"
"$C" --version | grep -q "dsparkctl .*schema version 22"
tap_result $? "--version prints the version and the schema version"

# --- connection options ------------------------------------------------------
good_dsn=$DSPARK_DSN
out=$(DSPARK_DSN="host=$T port=1 dbname=nope" "$C" status 2>&1)
tap_is "$?" 1 "a bad \$DSPARK_DSN: exit 1"
tap_like "$out" "could not connect to the database" "... saying it could not connect"
DSPARK_DSN="host=$T port=1 dbname=nope" "$C" --dsn "$good_dsn" status >/dev/null 2>&1
tap_is "$?" 0 "--dsn overrides \$DSPARK_DSN"
(unset DSPARK_DSN; "$C" status >/dev/null 2>&1)
tap_is "$?" 0 "without a DSN the PG* environment is used"

# --- submit one prompt ----------------------------------------------------------
id1=$("$C" submit -m qwen3-4b "Tell me a joke.")
tap_like "$id1" '^[0-9]+$' "submit prints the job id"
tap_is "$(q "SELECT prompt || '|' || model || '|' || state FROM dspark.jobs WHERE id = $id1")" \
    "Tell me a joke.|qwen3-4b|queued" "... and the job is queued with its prompt"
"$C" submit -m qwen3-4b --json --system "Be brief." --chat -p - >"$T/one.json" <<'EOF'
Multi-line
prompt with "quotes", tabs	and \backslashes, ünïcödé and 😀
EOF
tap_py "submit --json prints {\"id\": N}" "isinstance(d['id'], int) and d['id'] > 0" "$T/one.json"
id2=$(py "d['id']" "$T/one.json")
q "SELECT messages FROM dspark.jobs WHERE id = $id2" >"$T/msgs.json"
tap_py "--chat --system from stdin stores the messages exactly" \
    "d == [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Multi-line\\nprompt with \"quotes\", tabs\\tand \\\\backslashes, ünïcödé and 😀'}]" "$T/msgs.json"
id3=$(DSPARK_MODEL=env-model "$C" submit --max-tokens 77 --temperature 0.5 --top-p 0.9 --top-k 40 \
    --seed -7 --stop '###' --stop 'a"b\c' --spec-mode fixed:4 --priority 5 --max-attempts 2 \
    --delay '1 hour' "params")
tap_is "$(q "SELECT concat_ws('|', model, max_tokens, temperature, top_p, top_k, seed, stop::text, spec_mode, priority, max_attempts, run_after > now() + interval '50 min') FROM dspark.jobs WHERE id = $id3")" \
    'env-model|77|0.5|0.9|40|-7|{###,"a\"b\\c"}|fixed:4|5|2|t' "every sampling and job option reaches its column"
out=$("$C" submit --spec-mode fixed:99 -m m x 2>&1)
tap_is "$?" 2 "a bad --spec-mode is refused by the database's rule: a usage error (exit 2)"
tap_like "$out" "spec_mode_dspark_dspark_async_fixed_n_threshold_x_or_none" "... naming the rule"

# --- submit a JSONL file --------------------------------------------------------
cat >"$T/batch.jsonl" <<'EOF'
{"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "qwen3-4b", "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": [{"type": "text", "text": "Say hi."}, {"type": "text", "text": "Be brief."}]}], "max_tokens": 16, "temperature": 0, "seed": 3, "stop": "\n"}}
{"custom_id": "text-1", "method": "POST", "url": "/v1/completions", "body": {"model": "qwen3-4b", "prompt": "Once upon a time", "max_completion_tokens": 32, "top_p": 0.5, "n": 1}}

{"custom_id": "ids-1", "method": "POST", "url": "/v1/completions", "body": {"prompt": [151644, 872, 198]}}
{"turns": ["What is 2+2?", "And 3+3?"], "question_id": 81}
EOF
"$C" submit -m default-model --priority 3 -f "$T/batch.jsonl" --json >"$T/sub.json"
tap_is "$?" 0 "submit -f of a mixed JSONL file succeeds"
tap_py "... and reports a batch of 4 jobs" "d['jobs'] == 4 and d['skipped'] == 0 and d['last_id'] - d['first_id'] == 3 and d['contiguous'] is True" "$T/sub.json"
B=$(py "d['batch_id']" "$T/sub.json")
# ids with others among them (as when two clients insert at once; here the identity steps by 2): said so
q "ALTER TABLE dspark.jobs ALTER COLUMN id SET INCREMENT BY 2" >/dev/null
out=$("$C" submit -m default-model -f "$T/batch.jsonl")
"$C" submit -m default-model -f "$T/batch.jsonl" --json >"$T/sub2.json"
q "ALTER TABLE dspark.jobs ALTER COLUMN id SET INCREMENT BY 1" >/dev/null
tap_like "$out" "^batch [0-9]+: 4 jobs \\(ids [0-9]+\\.\\.[0-9]+, other jobs among them\\)$" \
    "submit -f says when other jobs' ids fall among the batch's"
tap_py "... and --json has contiguous false" "d['contiguous'] is False and d['last_id'] - d['first_id'] == 6" "$T/sub2.json"
q "DELETE FROM dspark.jobs WHERE batch_id IN (SELECT id FROM dspark.batches WHERE id > $B); DELETE FROM dspark.batches WHERE id > $B" >/dev/null
tap_is "$(q "SELECT string_agg(concat_ws(':', custom_id, model, max_tokens, priority), ' ' ORDER BY id) FROM dspark.jobs WHERE batch_id = $B")" \
    "chat-1:qwen3-4b:16:3 text-1:qwen3-4b:32:3 ids-1:default-model:1024:3 81:default-model:1024:3" \
    "custom_id, model (with --model as default), max_tokens and --priority per line, in file order"
tap_is "$(q "SELECT messages::text FROM dspark.jobs WHERE batch_id = $B AND custom_id = 'chat-1'")" \
    '[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi.\nBe brief."}]' \
    "text parts are joined into one message, a newline between them (as vLLM joins them)"
tap_is "$(q "SELECT concat_ws('|', temperature, seed, stop::text) FROM dspark.jobs WHERE batch_id = $B AND custom_id = 'chat-1'")" \
    '0|3|{"
"}' "temperature, seed and a stop string from the body"
tap_is "$(q "SELECT prompt_ids::text FROM dspark.jobs WHERE batch_id = $B AND custom_id = 'ids-1'")" "{151644,872,198}" \
    "a prompt of token ids"
tap_is "$(q "SELECT messages->0->>'content' FROM dspark.jobs WHERE batch_id = $B AND custom_id = '81'")" "What is 2+2?" \
    "a DeepSpec turns line sends its first turn as a user message"
tap_is "$(q "SELECT metadata->>'input_file' FROM dspark.batches WHERE id = $B")" "$T/batch.jsonl" "the batch records its input file"

# --- status and list ------------------------------------------------------------
"$C" list --json >"$T/list.json"
tap_py "list --json gives every job" "len(d) == 7 and all(j['state'] == 'queued' for j in d)" "$T/list.json"
"$C" list --batch "$B" --state queued,running -n 2 --json >"$T/list2.json"
tap_py "list --batch --state --limit filters" "[j['custom_id'] for j in d] == ['81', 'ids-1']" "$T/list2.json"
out=$("$C" list --batch "$B")
tap_like "$out" "chat-1 +qwen3-4b +queued" "list prints a table"
"$C" list --batches --json >"$T/batches.json"
tap_py "list --batches --json" "d[0]['batch_id'] == $B and d[0]['total'] == 4 and d[0]['queued'] == 4" "$T/batches.json"
"$C" status --json >"$T/status.json"
tap_py "status --json counts the queue" "d['jobs']['queued'] == 7 and d['workers']['registered'] == 0" "$T/status.json"
"$C" status "$id1" "$id3" --json >"$T/st.json"
tap_py "status ID... --json" "[j['id'] for j in d] == [$id1, $id3] and d[1]['priority'] == 5" "$T/st.json"
tap_py "... with the hand-backs and whether the job runs alone" "d[0]['released'] == 0 and d[0]['run_alone'] is False" "$T/st.json"
out=$("$C" status 999999 2>&1)
tap_is "$?" 1 "status of a missing job: exit 1"
# (the range's loop once went past the largest id and never ended)
out=$(timeout 20 "$C" status 9223372036854775806-9223372036854775807 2>&1)
tap_is "$?" 1 "status of the two largest job ids, missing: exit 1, at once"
q "INSERT INTO dspark.jobs (model, prompt, owner, run_after) VALUES ('qwen3-4b', 'later', 'someone', now() + interval '1 hour')" >/dev/null
"$C" status --clients --json >"$T/clients.json"
tap_py "status --clients --json: each client's queued, delayed and running jobs" \
    "[(x['client'], x['queued'], x['delayed'], x['running']) for x in d] == [('postgres', 7, 1, 0), ('someone', 1, 1, 0)]" "$T/clients.json"
tap_like "$("$C" status --clients)" "^CLIENT +SHARE +QUEUED +DELAYED +RUNNING +OLDEST QUEUED S" "status --clients prints a table"
q "DELETE FROM dspark.jobs WHERE owner = 'someone'" >/dev/null
q "CREATE ROLE ctl_client LOGIN IN ROLE dspark_client" >/dev/null
out=$("$C" -d "$good_dsn user=ctl_client" status --clients 2>&1)
tap_is "$?" 1 "status --clients as a client: exit 1"
tap_like "$out" "needs the dspark_admin role" "... saying which role it needs"
out=$("$C" status --clients --batch "$B" 2>&1)
tap_is "$?" 2 "status --clients with --batch: a usage error"

# --- a worker at work (SQL) -----------------------------------------------------
q "SELECT dspark.register_worker('gpu0', 'node1', 4242, 'cuda:0', 'qwen3-4b', 'dspark-qwen3-4b', 'abc', 'def', '{\"sps\": [100, 180]}')" >/dev/null
"$C" workers --json >"$T/workers.json"
tap_py "workers --json lists the registered worker" "d[0]['worker_id'] == 'gpu0' and d[0]['device'] == 'cuda:0' and d[0]['running_jobs'] == 0" "$T/workers.json"
q "SELECT count(*) FROM dspark.claim_jobs('gpu0', 4, NULL, 600, NULL) WHERE batch_id = $B" >/dev/null
running=$(q "SELECT count(*) FROM dspark.jobs WHERE batch_id = $B AND state = 'running'")
tap_is "$running" 4 "the batch (priority 3) is claimed first"
out=$("$C" workers)
tap_like "$out" "gpu0 +node1 +4242 +cuda:0 +qwen3-4b +dspark-qwen3-4b +running .* 4$" "workers prints a table with running jobs"

ids=$(q "SELECT string_agg(id::text, ' ' ORDER BY id) FROM dspark.jobs WHERE batch_id = $B")
set -- $ids
q "SELECT count(*) FROM dspark.finish_jobs('gpu0', '[
  {\"id\": $1, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"hi\", \"finish_reason\": \"stop\",
   \"stats\": {\"prompt_tokens\": 20, \"output_tokens\": 10, \"rounds\": 4, \"mean_acceptance_length\": 2.5,
               \"num_draft_tokens\": 28, \"num_verified_tokens\": 12, \"num_accepted_tokens\": 6,
               \"acceptance_by_position\": [4, 2, 0], \"verified_by_position\": [4, 4, 2], \"mean_verify_len\": 3.0,
               \"decode_tokens_per_s\": 100, \"time_to_first_token_s\": 0.1, \"e2e_latency_s\": 1.0}},
  {\"id\": $2, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \" there was a \\\"king\\\"\", \"finish_reason\": \"length\",
   \"stats\": {\"prompt_tokens\": 4, \"output_tokens\": 32, \"rounds\": 16, \"mean_acceptance_length\": 2.0,
               \"num_verified_tokens\": 32, \"num_accepted_tokens\": 16,
               \"acceptance_by_position\": [12, 4], \"verified_by_position\": [16, 12], \"mean_verify_len\": 2.0,
               \"decode_tokens_per_s\": 200, \"time_to_first_token_s\": 0.3, \"e2e_latency_s\": 3.0}},
  {\"id\": $3, \"attempt\": 1, \"state\": \"failed\", \"error\": \"prompt of 9000 tokens exceeds the context (4096)\"},
  {\"id\": $4, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"4\", \"finish_reason\": \"stop\",
   \"stats\": {\"prompt_tokens\": 12, \"output_tokens\": 1, \"rounds\": 1, \"mean_acceptance_length\": 1.0,
               \"acceptance_by_position\": [0], \"verified_by_position\": [1],
               \"decode_tokens_per_s\": 300, \"time_to_first_token_s\": 0.2, \"e2e_latency_s\": 2.0}}]')" >/dev/null

# --- results ---------------------------------------------------------------------
"$C" results --batch "$B" -o "$T/out.jsonl"
tap_is "$?" 0 "results --batch -o FILE succeeds"
tap_py "one output line per job, joined by custom_id" \
    "sorted(x['custom_id'] for x in d) == ['81', 'chat-1', 'ids-1', 'text-1'] and all(x['id'].startswith('dspark-job-') for x in d)" "$T/out.jsonl"
tap_py "a chat job's body is a chat.completion with the assistant message" \
    "[(x['response']['status_code'], x['response']['body']['object'], x['response']['body']['choices'][0]['message'], x['response']['body']['choices'][0]['finish_reason'], x['response']['body']['model'], x['error']) for x in d if x['custom_id'] == 'chat-1'] == [(200, 'chat.completion', {'role': 'assistant', 'content': 'hi'}, 'stop', 'qwen3-4b', None)]" "$T/out.jsonl"
tap_py "a completions job's body is a text_completion" \
    "[(x['response']['body']['object'], x['response']['body']['choices'][0]['text'], x['response']['body']['choices'][0]['finish_reason']) for x in d if x['custom_id'] == 'text-1'] == [('text_completion', ' there was a \"king\"', 'length')]" "$T/out.jsonl"
tap_py "usage counts prompt and completion tokens" \
    "[x['response']['body']['usage'] for x in d if x['custom_id'] == 'text-1'] == [{'prompt_tokens': 4, 'completion_tokens': 32, 'total_tokens': 36}]" "$T/out.jsonl"
tap_py "a failed job has no response and an error with the reason" \
    "[(x['response'], x['error']['code'], x['error']['message']) for x in d if x['custom_id'] == 'ids-1'] == [(None, 'job_failed', 'prompt of 9000 tokens exceeds the context (4096)')]" "$T/out.jsonl"
"$C" results "$id1" --all >"$T/all.jsonl" 2>/dev/null
tap_py "results --all reports unfinished jobs as errors" "d[0]['error']['code'] == 'job_not_finished'" "$T/all.jsonl"
out=$("$C" results "$id1" 2>&1 >/dev/null)
tap_like "$out" "1 job is not finished yet" "results warns about unfinished jobs"
"$C" results --batch "$B" --metrics >"$T/m.jsonl"
tap_py "results --metrics adds per-job metrics" \
    "[x['response']['body']['metrics']['mean_acceptance_length'] for x in d if x['custom_id'] == 'chat-1'] == [2.5]" "$T/m.jsonl"

# --- stats -----------------------------------------------------------------------
"$C" stats --batch "$B" --json >"$T/stats.json"
tap_py "stats groups by batch and model" "[(g['batch_id'], g['model'], g['jobs']) for g in d] == [($B, 'default-model', 1), ($B, 'qwen3-4b', 2)]" "$T/stats.json"
tap_py "tau is the round-weighted mean acceptance length" \
    "abs(d[1]['mean_acceptance_length'] - (2.5 * 4 + 2.0 * 16) / 20) < 1e-9" "$T/stats.json"
tap_py "acceptance by position is summed, with conditional rates" \
    "d[1]['acceptance_by_position'] == [16, 6, 0] and d[1]['verified_by_position'] == [20, 16, 2] and d[1]['conditional_acceptance_by_position'] == [0.8, 0.375, 0.0]" "$T/stats.json"
tap_py "latency percentiles (percentile_cont)" \
    "d[1]['e2e_latency_s'] == {'p50': 2.0, 'p90': 2.8, 'p99': 2.98, 'mean': 2.0}" "$T/stats.json"
tap_py "tokens/s and the draft acceptance rate" \
    "d[1]['decode_tokens_per_s']['p50'] == 150 and abs(d[1]['draft_acceptance_rate'] - 22 / 44) < 1e-9 and d[1]['output_tokens'] == 42" "$T/stats.json"
"$C" stats --by model --json >"$T/stats2.json"
tap_py "stats --by model merges batches" "[(g['model'], g['jobs'], g['batch_id']) for g in d] == [('default-model', 1, None), ('qwen3-4b', 2, None)]" "$T/stats2.json"
out=$("$C" stats --batch "$B")
tap_like "$out" "qwen3-4b +2 +42 +2.10 +0.500 +2.20 +150.0" "stats prints a table"
tap_like "$out" "acceptance by position \\(batch $B, model qwen3-4b\\): 1:0.800 2:0.375 3:0.000" "... and acceptance by position"
out=$("$C" stats --since bogus 2>&1)
tap_is "$?" 2 "stats --since with a bad interval is a usage error: exit 2"
tap_like "$out" "--since 'bogus': .*interval" "... naming the option"

# --- wait and watch --------------------------------------------------------------
"$C" wait --batch "$B" --json >"$T/wait.json"
tap_is "$?" 3 "wait on a finished batch with a failure: exit 3"
tap_py "wait --json summarises" "(d['total'], d['succeeded'], d['failed'], d['output_tokens']) == (4, 3, 1, 43)" "$T/wait.json"
set -- $ids
"$C" wait -q "$1" "$2"
tap_is "$?" 0 "wait on succeeded jobs: exit 0"
"$C" wait -q --timeout 0.5 "$id1" 2>/dev/null
tap_is "$?" 4 "wait past --timeout: exit 4"
"$C" wait -q 424242 2>/dev/null
tap_is "$?" 1 "wait on a missing job: exit 1"

# a waiter with a long poll interval is woken by the job's notification
(sleep 1.5
 i=$(q "SELECT id FROM dspark.claim_jobs('gpu0', 1, NULL, 600, ARRAY['qwen3-4b'])")
 sleep 1
 q "SELECT count(*) FROM dspark.finish_jobs('gpu0', '[{\"id\": $i, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"ha\"}]')" >/dev/null
) &
worker=$!
start=$(date +%s)
"$C" watch "$id1" --interval 60 --timeout 30 >"$T/watch.txt"
rc=$?
took=$(($(date +%s) - start))
wait $worker
tap_is "$rc" 0 "watch returns when the job succeeds"
tap_ok "... woken by the notification, not the 60 s poll (took ${took}s)" test "$took" -lt 15
tap_is "$(grep '^job' "$T/watch.txt" | sed -n '1p;$p')" "job $id1: queued
job $id1: succeeded (- tokens, - tok/s, tau -)" "watch prints each state change"
tap_is "$(grep -c "^job $id1: running (attempt 1, worker gpu0)$" "$T/watch.txt")" 1 "... including the claim"
tap_like "$(tail -n 1 "$T/watch.txt")" "^1 jobs finished: 1 succeeded, 0 failed" "... and a summary at the end"
"$C" watch --json "$1" >"$T/watch.jsonl"
tap_py "watch --json prints a JSON object per change" "len(d) == 1 and d[0]['id'] == $1 and d[0]['state'] == 'succeeded' and d[0]['custom_id'] == 'chat-1' and d[0]['output_tokens'] == 10" "$T/watch.jsonl"

# wait survives a restart of the server
idr=$("$C" submit -m qwen3-4b --priority 1000 "survive a restart")
"$C" wait -q --interval 0.2 --timeout 60 "$idr" 2>"$T/restart.err" &
waiter=$!
sleep 1
pg_harness_ctl -w -s -m fast restart
i=$(q "SELECT id FROM dspark.claim_jobs('gpu0', 1, NULL, 600, ARRAY['qwen3-4b'])")
q "SELECT count(*) FROM dspark.finish_jobs('gpu0', '[{\"id\": $i, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"ok\"}]')" >/dev/null
wait $waiter
tap_is "$?$i" "0$idr" "wait reconnects after the server restarts and sees the job finish"
tap_like "$(cat "$T/restart.err")" "reconnecting" "... saying that it reconnects"

# ctl_server_pid: the server process of the one dsparkctl connection (waiting for it up to 10 s).
ctl_server_pid() {
    _n=0
    _pid=
    while [ -z "$_pid" ] && [ $_n -lt 100 ]; do
        sleep 0.1
        _pid=$(q "SELECT pid FROM pg_stat_activity WHERE application_name = 'dsparkctl'")
        _n=$((_n + 1))
    done
    echo "$_pid"
}

# --timeout holds when the server process stops answering (SIGSTOP: a server or pooler that holds queries)
idh=$("$C" submit -m qwen3-4b --priority 1000 "never claimed")
"$C" wait -q --interval 0.2 --timeout 3 "$idh" 2>"$T/stall.err" &
waiter=$!
hb=$(ctl_server_pid)
stop_idle "$hb"
end_of "$waiter" 150
kill -CONT $hb
tap_is "$rc" 4 "wait --timeout 3 while its server process is stopped: exit 4"
tap_ok "... at the timeout (${took} s after the stop)" test "$took" -le 4
tap_like "$(cat "$T/stall.err")" "no answer from the database within 3\\.5 s" "... saying that the database did not answer"
q "UPDATE dspark.jobs SET state = 'cancelled', finished_at = now() WHERE id = $idh" >/dev/null

# --timeout holds while a new connection waits too: the server process ends and the server does not
# answer new connections (its postmaster stopped); the reconnection ends at the timeout, not after
# connect_timeout (10 s)
idd=$("$C" submit -m qwen3-4b --priority 1000 "never claimed either")
"$C" wait -q --interval 0.2 --timeout 3 "$idd" 2>"$T/down.err" &
waiter=$!
hb=$(ctl_server_pid)
pm=$(head -n 1 "$PGH_DIR/data/postmaster.pid")
kill -STOP "$pm"
kill -TERM "$hb"
end_of "$waiter" 200
kill -CONT "$pm"
tap_is "$rc" 4 "wait --timeout 3 while the server takes no new connection: exit 4"
tap_ok "... at the timeout (${took} s after the server process ended)" test "$took" -le 4
tap_like "$(cat "$T/down.err")" "database connection is down: no answer from the database within 3\\.5 s" \
    "... saying that the database did not answer in time"
n=0
until q "SELECT 1" >/dev/null 2>&1 || [ $n -gt 50 ]; do sleep 0.1; n=$((n + 1)); done
q "UPDATE dspark.jobs SET state = 'cancelled', finished_at = now() WHERE id = $idd" >/dev/null

# watch prints the final state of jobs that finish just before it sees them all done
for k in z y x; do
    printf '{"custom_id": "%s", "method": "POST", "url": "/v1/completions", "body": {"model": "race", "prompt": "%s"}}\n' $k $k
done >"$T/race.jsonl"
rb=$("$C" submit -q -f "$T/race.jsonl" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["batch_id"])')
rids=$(q "SELECT string_agg(id::text, ' ' ORDER BY id) FROM dspark.claim_jobs('gpu9', 3, NULL, 600, ARRAY['race'])")
"$C" watch -v --batch "$rb" --interval 5 --timeout 30 >"$T/race.out" 2>/dev/null &
watcher=$!
sleep 1
for i in $rids; do
    q "SELECT count(*) FROM dspark.finish_jobs('gpu9', '[{\"id\": $i, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"ok\"}]')" >/dev/null
    sleep 0.05
done
wait $watcher
tap_is "$?$(grep -c ': succeeded' "$T/race.out")" "03" "watch prints every job's final state, also of jobs that finish together"

# --- bad option values and input ------------------------------------------------
"$C" submit -m m --spec-mode bogus hi >/dev/null 2>"$T/bad.err"
tap_is "$?" 2 "submit --spec-mode bogus: a usage error (exit 2)"
tap_like "$(cat "$T/bad.err")" "--spec-mode 'bogus': " "... naming the option"
"$C" submit -m m --delay xyz hi >/dev/null 2>&1
tap_is "$?" 2 "submit --delay xyz: exit 2"
"$C" submit -m m --run-after notatime hi >/dev/null 2>&1
tap_is "$?" 2 "submit --run-after notatime: exit 2"
"$C" submit -m '' hi >/dev/null 2>&1
tap_is "$?" 2 "submit -m '': exit 2"
out=$("$C" submit -m m --chat --system "$(printf 'sys\377')" hi 2>&1)
tap_is "$?" 1 "a system message that is not UTF-8 is refused"
tap_like "$out" "system message: not valid UTF-8" "... saying so"
out=$(printf 'a\0b' | "$C" submit -m m -p - 2>&1)
tap_like "$out" "NUL byte" "a prompt on stdin with a NUL byte is refused, not cut"
id=$(printf 'line end\r\n' | "$C" submit -m m -p -)
tap_is "$(q "SELECT prompt = 'line end' FROM dspark.jobs WHERE id = $id")" "t" "... and its final CRLF is taken off"
printf '\357\273\277{"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "after a BOM"}}\n' >"$T/bom.jsonl"
"$C" submit -q -f "$T/bom.jsonl" >/dev/null 2>"$T/bom.err"
tap_is "$?$(q "SELECT count(*) FROM dspark.jobs WHERE prompt = 'after a BOM'")" "01" "a file that starts with a UTF-8 byte order mark is read"
python3 -c 'import json
for i, p in enumerate(["ok", "x" * 16777217]):
    print(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": p}}))' >"$T/huge.jsonl"
out=$("$C" submit --skip-invalid -f "$T/huge.jsonl" 2>&1 >/dev/null)
tap_is "$?" 0 "a prompt over 16 MiB with --skip-invalid: the other lines are submitted"
tap_like "$out" "line 2: body.prompt: must have at most 16777216 bytes, got 16777217, skipped" "... and that line is named"
printf '%s\n' '{"turns": ["seven"], "custom_id": 7}' >"$T/cid.jsonl"
"$C" submit -q -m m -f "$T/cid.jsonl" >/dev/null
tap_is "$(q "SELECT custom_id FROM dspark.jobs WHERE messages->0->>'content' = 'seven'")" "7" \
    "a DeepSpec line's integer custom_id is kept as its digits"
printf '%s\n' '{"turns": ["eight"], "custom_id": [8]}' >"$T/cid2.jsonl"
out=$("$C" submit -m m -f "$T/cid2.jsonl" 2>&1)
tap_like "$?: $out" "^1: .*line 1: custom_id: must be a string or an integer" "... and one of another type is refused, not replaced"
printf '%s\n' '{"custom_id": "t", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": []}]}}' >"$T/tool.jsonl"
out=$("$C" submit -f "$T/tool.jsonl" 2>&1)
tap_like "$out" "messages\[1\]\.content: null \(tool calls are not supported\)" "a turn without content (tool calls) is refused, saying why"
"$C" status "$id" "$id" >/dev/null 2>&1
tap_is "$?" 0 "a job named twice is one job"
printf '{"custom_id": "%s\303\251x", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "p"}}\n' \
    "$(printf '%038d' 0)" >"$T/utf8.jsonl"
"$C" submit -q -f "$T/utf8.jsonl" >/dev/null
"$C" list >"$T/list.txt"
tap_ok "a table cell cut short does not cut a UTF-8 character" iconv -f UTF-8 -t UTF-8 "$T/list.txt" -o /dev/null
"$C" wait --timeout nan 1 >/dev/null 2>&1
tap_is "$?" 2 "wait --timeout nan: exit 2"
echo old >"$T/target.jsonl"
ln -s target.jsonl "$T/link.jsonl"
"$C" results --batch "$B" -o "$T/link.jsonl"
tap_is "$?$(test -L "$T/link.jsonl" && echo link)$(grep -c custom_id "$T/target.jsonl")" "0link4" \
    "results -o through a symbolic link writes the file it names and keeps the link"
echo old >"$T/keep.jsonl"
"$C" results 999999 -o "$T/keep.jsonl" 2>/dev/null
tap_is "$?$(cat "$T/keep.jsonl")" "1old" "results -o FILE that fails leaves FILE as it was"

# --- cancel ----------------------------------------------------------------------
r1=$(q "SELECT id FROM dspark.jobs WHERE id = $id2")
q "SELECT count(*) FROM dspark.claim_jobs('gpu0', 1, NULL, 600, ARRAY['qwen3-4b'])" >/dev/null
out=$("$C" cancel "$id2" "$id3" "$id1" 2>&1)
tap_is "$?" 0 "cancel of existing jobs: exit 0"
tap_like "$out" "job $id2: cancel requested \\(running" "a running job gets a cancel request"
tap_like "$out" "job $id3: cancelled" "a queued job is cancelled"
tap_like "$out" "job $id1: already succeeded" "a finished job is left alone"
"$C" cancel --json "$id3" 777777 >"$T/cancel.json" 2>/dev/null
tap_is "$?" 1 "cancel of a missing job: exit 1"
tap_py "cancel --json reports each job" "[(x['id'], x['result']) for x in d] == [($id3, 'already_cancelled'), (777777, 'not_found')]" "$T/cancel.json"

# --- resubmit ----------------------------------------------------------------------
# a batch of four: a succeeds, b fails, c is cancelled, d is still queued
{
    echo '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "rs", "messages": [{"role": "user", "content": "one"}], "max_tokens": 7}}'
    echo '{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "rs", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "two"}], "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "seed": 11, "stop": ["x", "y"]}}'
    echo '{"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "rs", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0}}'
    echo '{"custom_id": "d", "method": "POST", "url": "/v1/completions", "body": {"model": "rs", "prompt": "four"}}'
} >"$T/rs.jsonl"
RB=$("$C" submit -q -f "$T/rs.jsonl" --metadata '{"name": "rs"}' --priority 3 --max-attempts 5)
q "UPDATE dspark.jobs SET run_alone = true WHERE batch_id = $RB AND custom_id = 'c'" >/dev/null
ra=$(q "SELECT id FROM dspark.claim_jobs('gpu-rs', 1, NULL, 600, ARRAY['rs'])")
rb=$(q "SELECT id FROM dspark.claim_jobs('gpu-rs', 1, NULL, 600, ARRAY['rs'])")
q "SELECT count(*) FROM dspark.finish_jobs('gpu-rs', '[{\"id\": $ra, \"attempt\": 1, \"state\": \"succeeded\", \"output_text\": \"ok\"}, {\"id\": $rb, \"attempt\": 1, \"state\": \"failed\", \"error\": \"boom\"}]')" >/dev/null
"$C" cancel -q "$(q "SELECT id FROM dspark.jobs WHERE batch_id = $RB AND custom_id = 'c'")"
tap_is "$(q "SELECT string_agg(custom_id || ':' || state, ' ' ORDER BY custom_id) FROM dspark.jobs WHERE batch_id = $RB")" \
    "a:succeeded b:failed c:cancelled d:queued" "resubmit's batch is set up"
nbatches=$(q "SELECT count(*) FROM dspark.batches")
out=$("$C" resubmit "$RB" 2>&1)
tap_is "$?" 0 "resubmit of a batch with failed and cancelled jobs: exit 0"
N1=$(q "SELECT max(id) FROM dspark.batches")
tap_like "$out" "^batch $N1: 2 jobs \\(ids [0-9]+\\.\\.[0-9]+\\), the failed or cancelled jobs of batch $RB\$" "... and it names the new batch"
tap_is "$(q "SELECT string_agg(custom_id || ':' || state || ':' || attempt || ':' || cancel_requested, ' ' ORDER BY id) FROM dspark.jobs WHERE batch_id = $N1")" \
    "b:queued:0:false c:queued:0:false" "the new batch holds the failed and the cancelled job, queued afresh"
req="custom_id, owner, model, prompt, messages::text, prompt_ids::text, max_tokens, temperature, top_p, top_k, seed, stop::text, spec_mode, priority, max_attempts"
tap_is "$(q "SELECT string_agg(concat_ws('|', $req), ';' ORDER BY custom_id) FROM dspark.jobs WHERE batch_id = $N1")" \
    "$(q "SELECT string_agg(concat_ws('|', $req), ';' ORDER BY custom_id) FROM dspark.jobs WHERE batch_id = $RB AND custom_id IN ('b', 'c')")" \
    "... with the same requests, parameters, priority and attempts allowed"
tap_is "$(q "SELECT string_agg(run_alone::text, ' ' ORDER BY id) FROM dspark.jobs WHERE batch_id = $N1")" "false false" \
    "... and run_alone starts false again (c had it)"
tap_is "$(q "SELECT (metadata->>'name') || ' ' || (metadata->>'resubmit_of') || ' ' || (metadata->'resubmit_states')::text FROM dspark.batches WHERE id = $N1")" \
    "rs $RB [\"failed\", \"cancelled\"]" "... and the old batch's metadata, naming it"
tap_is "$(q "SELECT string_agg(custom_id || ':' || state, ' ' ORDER BY custom_id) FROM dspark.jobs WHERE batch_id = $RB")" \
    "a:succeeded b:failed c:cancelled d:queued" "the old batch is left as it was"
"$C" resubmit --json --state failed "$RB" >"$T/rs.json"
tap_is "$?" 0 "resubmit --state failed --json: exit 0"
tap_py "... reports the new batch as JSON" "d['jobs'] == 1 and d['resubmit_of'] == $RB and d['first_id'] == d['last_id'] and isinstance(d['batch_id'], int)" "$T/rs.json"
N2=$("$C" resubmit -q -s succeeded,succeeded "$RB")
tap_is "$(q "SELECT string_agg(custom_id, ' ') || ' ' || count(*) FROM dspark.jobs WHERE batch_id = ${N2:-0}")" "a 1" \
    "resubmit -q -s succeeded prints the new batch, of the succeeded job"
nbatches=$(q "SELECT count(*) FROM dspark.batches")
out=$("$C" resubmit "$N2" 2>&1)
tap_is "$?" 0 "resubmit of a batch with nothing failed: exit 0"
tap_is "$out" "batch $N2 has no failed or cancelled jobs: nothing resubmitted" "... saying so"
tap_is "$(q "SELECT count(*) FROM dspark.batches")" "$nbatches" "... and making no batch"
"$C" resubmit --json "$N2" >"$T/rs0.json"
tap_py "... in JSON: no batch, 0 jobs" "d['batch_id'] is None and d['jobs'] == 0 and d['resubmit_of'] == $N2" "$T/rs0.json"
out=$("$C" resubmit 999999 2>&1)
tap_is "$?" 1 "resubmit of a missing batch: exit 1"
tap_like "$out" "batch 999999 does not exist \\(or is not yours\\)" "... with the reason"
out=$("$C" resubmit -s queued "$RB" 2>&1)
tap_is "$?" 2 "resubmit --state queued: exit 2"
tap_like "$out" "'queued' is not a finished state" "... saying why"
"$C" resubmit "$RB" "$N2" >/dev/null 2>&1
tap_is "$?" 2 "resubmit of two batches: exit 2"
tap_like "$(q "SELECT dspark.resubmit_batch($RB, ARRAY['running'])" 2>&1)" "must be among succeeded, failed and cancelled" \
    "dspark.resubmit_batch refuses a state that is not final"
printf '%s\n' '{"custom_id": "w", "method": "POST", "url": "/v1/completions", "body": {"model": "rs", "prompt": "p"}}' >"$T/w1.jsonl"
WB=$("$C" submit -q -f "$T/w1.jsonl")
"$C" cancel -q --batch "$WB"
out=$("$C" wait --batch "$WB" 2>&1)
tap_is "$?" 3 "wait on a batch with a cancelled job: exit 3"
tap_like "$out" "'dsparkctl resubmit $WB' sends the failed and cancelled jobs again" "... and it tells how to send them again"
DB=$("$C" submit -q -f "$T/w1.jsonl" --expires-in '2 hours')
q "UPDATE dspark.jobs SET created_at = created_at - interval '1 hour', expires_at = expires_at - interval '1 hour' WHERE batch_id = $DB" >/dev/null
"$C" cancel -q --batch "$DB"
ND=$("$C" resubmit -q "$DB")
tap_is "$(q "SELECT expires_at BETWEEN now() + interval '119 minutes' AND now() + interval '121 minutes' FROM dspark.jobs WHERE batch_id = ${ND:-0}")" t \
    "a resubmitted job gets its deadline as far from now as it was from its submission (2 hours)"
# the source's jobs go away between the check and the copy (a trigger deletes them as the new batch is made):
# no batch is left behind
nb0=$(q "SELECT count(*) FROM dspark.batches")
out=$(psql -X -q -A -t -v ON_ERROR_STOP=1 \
    -c "CREATE FUNCTION pg_temp.gone() RETURNS trigger LANGUAGE plpgsql AS \$\$ BEGIN DELETE FROM dspark.jobs WHERE batch_id = (NEW.metadata->>'resubmit_of')::bigint; RETURN NEW; END \$\$" \
    -c "CREATE TRIGGER gone BEFORE INSERT ON dspark.batches FOR EACH ROW EXECUTE FUNCTION pg_temp.gone()" \
    -c "SELECT count(*) FROM dspark.resubmit_batch($DB)" \
    -c "DROP TRIGGER gone ON dspark.batches" 2>&1)
tap_is "$out $(q "SELECT count(*) FROM dspark.batches")" "0 $nb0" "a resubmission whose jobs vanished meanwhile returns nothing and leaves no batch"

# --- expiry ------------------------------------------------------------------------
x1=$("$C" submit -m ex --expires-in '1 hour' "late is useless")
tap_is "$?" 0 "submit --expires-in: exit 0"
tap_is "$(q "SELECT expires_at BETWEEN now() + interval '59 minutes' AND now() + interval '61 minutes' FROM dspark.jobs WHERE id = $x1")" t \
    "... the job must start within the hour"
"$C" status --json "$x1" >"$T/ex.json"
tap_py "status --json shows expires_at" "d[0]['expires_at'] is not None" "$T/ex.json"
printf '%s\n' '{"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": {"model": "ex", "prompt": "p"}}' >"$T/ex.jsonl"
xb=$("$C" submit -q -f "$T/ex.jsonl" --expires-at '2999-01-01 00:00:00+00')
tap_is "$(q "SELECT expires_at = '2999-01-01 00:00:00+00' FROM dspark.jobs WHERE batch_id = $xb")" t "submit -f --expires-at sets every job's deadline"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE id = $id1 AND expires_at IS NULL")" 1 "without them a job has no deadline"
out=$("$C" submit -m ex --expires-in '1 hour' --expires-at '2999-01-01' p 2>&1)
tap_is "$?" 2 "--expires-in with --expires-at: exit 2"
out=$("$C" submit -m ex --expires-in banana p 2>&1)
tap_is "$?" 2 "--expires-in banana: exit 2"
tap_like "$out" "--expires-in 'banana': .*interval" "... naming the option and the server's reason"
out=$("$C" submit -m ex --delay '2 hours' --expires-in '1 hour' p 2>&1)
tap_is "$?" 2 "a deadline before the start (--delay 2 hours, --expires-in 1 hour): exit 2"
tap_like "$out" "--expires-in is not after the jobs may start" "... saying why"
q "UPDATE dspark.jobs SET expires_at = now() - interval '1 s' WHERE id = $x1" >/dev/null
tap_is "$(q "SELECT dspark.expire_jobs()")" 1 "the job past its deadline is expired"
"$C" results "$x1" >"$T/ex-res.json"
tap_py "results gives an expired job the error code job_expired" \
    "d['response'] is None and d['error']['code'] == 'job_expired' and 'deadline' in d['error']['message']" "$T/ex-res.json"
"$C" wait "$x1" >/dev/null 2>&1
tap_is "$?" 3 "wait on an expired job: exit 3 (not succeeded)"

# --- bulk ------------------------------------------------------------------------
awk 'BEGIN { for (i = 1; i <= 20000; i++) printf "{\"custom_id\": \"r%d\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": {\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"question %d\"}], \"max_tokens\": 64}}\n", i, i }' >"$T/big.jsonl"
start=$(date +%s)
"$C" submit -q -f "$T/big.jsonl" >"$T/big.out"
tap_is "$?" 0 "submit of 20,000 lines succeeds (in $(($(date +%s) - start)) s)"
BB=$(cat "$T/big.out")
tap_is "$(q "SELECT count(*) || ' ' || count(DISTINCT custom_id) || ' ' || min(custom_id) FROM dspark.jobs WHERE batch_id = $BB")" "20000 20000 r1" \
    "... every line became one job"
"$C" cancel -q --batch "$BB"
tap_is "$(q "SELECT count(*) FROM dspark.jobs WHERE batch_id = $BB AND state = 'cancelled'")" 20000 "cancel --batch cancels the whole batch"
start=$(date +%s)
NB=$("$C" resubmit -q "$BB")
tap_is "$?" 0 "resubmit of 20,000 cancelled jobs succeeds (in $(($(date +%s) - start)) s)"
tap_is "$(q "SELECT count(*) || ' ' || count(DISTINCT custom_id) || ' ' || count(*) FILTER (WHERE state = 'queued') FROM dspark.jobs WHERE batch_id = ${NB:-0}")" \
    "20000 20000 20000" "... every one queued again in the new batch"

tap_done
