#!/bin/sh
# bench/spec-speedup.sh: wall-clock output tokens/s of --spec dspark against
# --spec none (target only) with the bundled model pair, at concurrency 1 and
# 16, side by side in one run (greedy, the same prompts). BACKEND=cpu|cuda|auto
# (default auto: cuda where a GPU exists) picks where the target runs.
# usage: bench/spec-speedup.sh BUILD_DIR PROMPTS.jsonl [N_PROMPTS] [MAX_TOKENS]
set -eu
build=${1:?usage: bench/spec-speedup.sh BUILD_DIR PROMPTS.jsonl [N_PROMPTS] [MAX_TOKENS]}
prompts=${2:?prompts}
n=${3:-32}
max=${4:-128}
models=$(cd "$(dirname "$0")/../models" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$prompts" "$n" > "$tmp/p.jsonl" <<'PY'
import json, sys
out = 0
for line in open(sys.argv[1]):
    o = json.loads(line)
    t = o["turns"][0] if "turns" in o else o.get("prompt", "")
    if "```python\n" in t:
        t = t.split("```python\n", 1)[1].rsplit("```", 1)[0]
    print(json.dumps({"prompt": t}))
    out += 1
    if out == int(sys.argv[2]):
        break
PY
# the step-time profile once, before the timed runs: a run that measured it
# itself would start with its passes warm (CUDA graphs captured), and the
# --spec none runs measure none
"$build/dspark-generate" --backend "${BACKEND:-auto}" --target "$models/dspark-tiny-target" \
    --draft "$models/dspark-tiny-draft" --prompt-ids "1 2 3" --max-tokens 2 --concurrency 16 --quiet \
    --save-sps "$tmp/sps.json" > /dev/null 2> "$tmp/sps.err" ||
    { echo "spec-speedup.sh: could not measure the step-time profile:" >&2; cat "$tmp/sps.err" >&2; exit 1; }
printf '%-12s %-6s %10s %8s %8s\n' spec conc tokens/s tau speedup
for conc in 1 16; do
    base=
    for spec in none dspark dspark-async; do
        draft="--draft $models/dspark-tiny-draft"
        "$build/dspark-generate" --backend "${BACKEND:-auto}" --target "$models/dspark-tiny-target" $draft \
            --spec "$spec" --prompts "$tmp/p.jsonl" --sps "$tmp/sps.json" \
            --max-tokens "$max" --ignore-eos --concurrency "$conc" > /dev/null 2> "$tmp/s.txt"
        tps=$(sed -n 's/^output tokens\/s *//p' "$tmp/s.txt")
        tau=$(sed -n 's/^mean acceptance length (tau) *//p' "$tmp/s.txt")
        [ -n "$base" ] || base=$tps
        printf '%-12s %-6s %10s %8s %8.2f\n' "$spec" "$conc" "$tps" "${tau:--}" "$(echo "$tps $base" | awk '{print $1/$2}')"
    done
done
