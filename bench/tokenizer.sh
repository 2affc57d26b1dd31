#!/bin/sh
# bench/tokenizer.sh: single-thread encode throughput, dspark's tokenizer next to
# Hugging Face `tokenizers`, on the same texts in one run; prints a table.
#
#   bench/tokenizer.sh [-b BENCH_BINARY] [-t TOKENIZER] [-r RUNS] [-n ROUNDS] FILE.jsonl...
#
#   -b  the bench-tokenizer program (default: bench/bench-tokenizer under $DS_BUILDDIR,
#       ./build or the current directory)
#   -t  tokenizer.json or a model directory (default: $DS_QWEN3_TOKENIZER, else
#       ~/.cache/dspark/qwen3/tokenizer.json)
#   -r  timed runs per measurement (default 10); -n  alternating rounds (default 3)
#   FILEs: JSONL with a "turns" list per line, e.g. the gsm8k and humaneval eval sets.
#
# Each round runs dspark then HF; the table shows the median over rounds of
# each program's median run, and dspark's speed as a multiple of HF's. Needs
# python3 with `tokenizers` for the HF side (PYTHON overrides the interpreter).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bench= tok= runs=10 rounds=3
PYTHON=${PYTHON:-python3}
usage() { sed -n '2,16s/^# \{0,1\}//p' "$0"; }
while getopts b:t:r:n:h opt; do
    case $opt in
    b) bench=$OPTARG ;;
    t) tok=$OPTARG ;;
    r) runs=$OPTARG ;;
    n) rounds=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 1 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "tokenizer.sh: give the JSONL files to encode" >&2; usage >&2; exit 1; }
if [ -z "$bench" ]; then
    for d in "${DS_BUILDDIR:-}" "$here/../build" .; do
        if [ -n "$d" ] && [ -x "$d/bench/bench-tokenizer" ]; then bench="$d/bench/bench-tokenizer"; break; fi
    done
fi
[ -n "$bench" ] && [ -x "$bench" ] || { echo "tokenizer.sh: bench-tokenizer not found (build it, or give -b)" >&2; exit 1; }
[ -n "$tok" ] || tok=${DS_QWEN3_TOKENIZER:-${XDG_CACHE_HOME:-$HOME/.cache}/dspark/qwen3/tokenizer.json}
[ -e "$tok" ] || { echo "tokenizer.sh: tokenizer '$tok' not found (give -t)" >&2; exit 1; }
"$PYTHON" -c 'import tokenizers' 2>/dev/null || { echo "tokenizer.sh: $PYTHON cannot import tokenizers" >&2; exit 1; }

out=$(mktemp)
trap 'rm -f "$out"' EXIT INT TERM
i=0
while [ $i -lt "$rounds" ]; do
    i=$((i + 1))
    echo "round $i/$rounds" >&2
    "$bench" --tokenizer "$tok" --runs "$runs" --json "$@" >>"$out"
    TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=1 \
        "$PYTHON" "$here/bench_tokenizer_hf.py" --tokenizer "$tok" --runs "$runs" --json "$@" >>"$out"
done

"$PYTHON" - "$out" "$(uname -n)" "$(date -u +%Y-%m-%dT%H:%MZ)" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["impl"].split("-")[0] if r["impl"].startswith("dspark") else r["impl"], []).append(r)
res = {}
for impl, rs in by.items():
    med = statistics.median(r["median_s"] for r in rs)
    r0 = rs[0]
    res[impl] = dict(r0, median_s=med, mb_per_s=r0["bytes"] / med / 1e6, tokens_per_s=r0["tokens"] / med)
hf = next((v for k, v in res.items() if k != "dspark"), None)
print(f"single-thread encode, {sys.argv[2]}, {sys.argv[3]}")
print(f"{'implementation':<24} {'texts':>6} {'MB':>7} {'tokens':>9} {'median s':>9} {'MB/s':>8} {'tokens/s':>11} {'vs HF':>6}")
for impl, r in res.items():
    ratio = hf["median_s"] / r["median_s"] if hf else float("nan")
    print(f"{impl:<24} {r['texts']:>6} {r['bytes'] / 1e6:>7.3f} {r['tokens']:>9} {r['median_s']:>9.4f} "
          f"{r['mb_per_s']:>8.2f} {r['tokens_per_s']:>11.0f} {ratio:>5.2f}x")
if hf and "dspark" in res and hf["tokens"] != res["dspark"]["tokens"]:
    print(f"WARNING: token counts differ (dspark {res['dspark']['tokens']}, HF {hf['tokens']})")
    sys.exit(1)
EOF
