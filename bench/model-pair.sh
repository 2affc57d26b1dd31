#!/bin/sh
# bench/model-pair.sh: mean acceptance length tau of the shipped DSpark draft
# and its DFlash-form twin with dspark's own engine, full verification
# (fixed:GAMMA), raw completion of HumanEval prompts, at temperature 0 and 1.
# usage: bench/model-pair.sh BUILD_DIR HUMANEVAL.jsonl [MODELS_DIR] [MAX_TOKENS]
set -eu
build=${1:?usage: bench/model-pair.sh BUILD_DIR HUMANEVAL.jsonl [MODELS_DIR] [MAX_TOKENS]}
he=${2:?humaneval jsonl}
models=${3:-$(dirname "$0")/../models}
max=${4:-128}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the code block of each prompt, completed raw (no chat template)
python3 - "$he" > "$tmp/prompts.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    t = json.loads(line)["turns"][0]
    if "```python\n" in t:
        t = t.split("```python\n", 1)[1].rsplit("```", 1)[0]
    print(json.dumps({"prompt": t}))
PY
gamma=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['block_size'])" "$models/dspark-tiny-draft/config.json")
printf '%-8s %-6s %8s %10s %10s\n' draft T tau verify_len tokens/s
for draft in dspark-tiny-draft dspark-tiny-dflash; do
    for t in 0 1; do
        "$build/dspark-generate" --target "$models/dspark-tiny-target" --draft "$models/$draft" \
            --prompts "$tmp/prompts.jsonl" --max-tokens "$max" --ignore-eos --temperature "$t" --seed 1 \
            --spec "fixed:$gamma" --concurrency 16 --json > "$tmp/out.jsonl" 2> "$tmp/summary.txt"
        tau=$(sed -n 's/^mean acceptance length (tau) *//p' "$tmp/summary.txt")
        vl=$(sed -n 's/^mean verify length *//p' "$tmp/summary.txt")
        tps=$(sed -n 's/^output tokens\/s *//p' "$tmp/summary.txt")
        printf '%-8s %-6s %8s %10s %10s\n' "${draft#dspark-tiny-}" "$t" "$tau" "$vl" "$tps"
    done
done
