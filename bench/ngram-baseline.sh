#!/bin/sh
# bench/ngram-baseline.sh: mean accepted length tau of the n-gram prompt-lookup
# baseline at temperature 0 on dspark's own greedy output, for reference next to
# bench/model-pair.sh. The target's greedy continuation of each HumanEval prompt
# comes from dspark-generate (--spec none); at temperature 0 a proposal is
# accepted exactly while it equals that continuation, so the rounds of prompt
# lookup follow from the tokens alone: each round proposes the up to GAMMA tokens
# that followed the earliest earlier occurrence of the last n tokens (n = 3, 2,
# 1; the rule of transformers' PromptLookupCandidateGenerator and of
# tools/train/spec.py), full verification, and emits the accepted ones plus one.
# usage: bench/ngram-baseline.sh BUILD_DIR HUMANEVAL.jsonl [MODELS_DIR] [MAX_TOKENS] [GAMMA]
set -eu
build=${1:?usage: bench/ngram-baseline.sh BUILD_DIR HUMANEVAL.jsonl [MODELS_DIR] [MAX_TOKENS] [GAMMA]}
he=${2:?humaneval jsonl}
models=${3:-$(dirname "$0")/../models}
max=${4:-128}
gamma=${5:-7}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the code block of each prompt, completed raw (as bench/model-pair.sh does)
python3 - "$he" "$tmp/prompts.jsonl" "$tmp/texts.jsonl" <<'PY'
import json, sys
with open(sys.argv[2], "w") as p, open(sys.argv[3], "w") as t:
    for line in open(sys.argv[1]):
        s = json.loads(line)["turns"][0]
        if "```python\n" in s:
            s = s.split("```python\n", 1)[1].rsplit("```", 1)[0]
        p.write(json.dumps({"prompt": s}) + "\n")
        t.write(json.dumps(s) + "\n")
PY
"$build/cli/dspark-tokenize" --tokenizer "$models/dspark-tiny-target/tokenizer.json" \
    < "$tmp/texts.jsonl" > "$tmp/prompt_ids.jsonl"
"$build/dspark-generate" --target "$models/dspark-tiny-target" --prompts "$tmp/prompts.jsonl" \
    --max-tokens "$max" --ignore-eos --spec none --concurrency 16 --json > "$tmp/out.jsonl" 2> /dev/null
python3 - "$tmp/prompt_ids.jsonl" "$tmp/out.jsonl" "$gamma" <<'PY'
import json, sys
prompts = [json.loads(l) for l in open(sys.argv[1])]
outs = sorted((json.loads(l) for l in open(sys.argv[2])), key=lambda o: o["index"])
gamma = int(sys.argv[3])
assert len(prompts) == len(outs), "one output per prompt"

def propose(seq):
    for n in (3, 2, 1):
        if len(seq) <= n:
            continue
        tail = seq[-n:]
        for i in range(len(seq) - n):
            if seq[i:i + n] == tail:
                return seq[i + n:i + n + gamma]
    return []

rounds = emitted = 0
for p, o in zip(prompts, outs):
    assert o["prompt_tokens"] == len(p), "dspark-generate and dspark-tokenize agree on the prompt"
    out = o["output_ids"]
    done = 1                      # the first token comes from the prefill
    while done < len(out):
        seq = p + out[:done]
        d = propose(seq)
        a = 0
        while a < len(d) and done + a < len(out) and d[a] == out[done + a]:
            a += 1
        step = min(a + 1, len(out) - done)
        rounds += 1
        emitted += step
        done += step
print(f"n-gram prompt lookup, T = 0, gamma {gamma}: {len(outs)} prompts, {rounds} rounds, tau {emitted / rounds:.3f}")
PY
