#!/bin/sh
# test-step-table.sh: bench/step_table.py joins bench-step-cuda's and
# bench_step_hf.py's points into issue 5's table: the speed-up over the better
# transformers implementation, the summary counts (also against eager alone), the weights + KV floor
# column when the step points carry it, and the points where a tenth of the
# transformers time is under that floor.
set -u
src=${DS_SRCDIR:-.}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "1..7"
cat > "$tmp/step.jsonl" <<'J'
{"device": "test", "copy_bytes_per_s": 4.0e12, "ctx": 1024, "reps": 5}
{"model": "8b", "R": 1, "q": 1, "tokens": 1, "invariant_ms": 5.0, "kernels_ms": -1, "cublas_ms": 4.0, "floor_ms": 3.8, "weight_bytes": 15200000000, "kv_bytes": 150000000, "memory_floor_ms": 3.9}
{"model": "4b", "R": 8, "q": 4, "tokens": 32, "invariant_ms": 4.0, "kernels_ms": -1, "cublas_ms": -1, "floor_ms": 1.9, "weight_bytes": 7600000000, "kv_bytes": 1200000000, "memory_floor_ms": 2.2}
J
cat > "$tmp/hf.jsonl" <<'J'
{"kind": "header", "torch": "test"}
{"kind": "point", "model": "8b", "R": 1, "q": 1, "impl": "eager", "status": "ok", "ms": 31.0}
{"kind": "point", "model": "8b", "R": 1, "q": 1, "impl": "sdpa", "status": "ok", "ms": 35.0}
{"kind": "point", "model": "4b", "R": 8, "q": 4, "impl": "eager", "status": "ok", "ms": 50.0}
{"kind": "point", "model": "4b", "R": 8, "q": 4, "impl": "sdpa", "status": "ok", "ms": 44.0}
J
out=$(python3 "$src/bench/step_table.py" "$tmp/step.jsonl" "$tmp/hf.jsonl" 2>&1)
rc=$?
[ $rc -eq 0 ] && echo "ok 1 - the table is made" || { echo "not ok 1 - the table is made: $out"; exit 0; }
# the better transformers time (eager 31.0 for the 8B point, sdpa 44.0 for the 4B one) over the invariant step
echo "$out" | grep -q '^| 8b | 1 | 1 | 1 | 5.000 | 4.000 | 3.800 | 1.32 | 1.25 | 3.900 | 31.0 (eager) | 6.2 |$' &&
    echo "ok 2 - the 8B row: floors, ratios and the better transformers time" ||
    echo "not ok 2 - the 8B row: $out"
echo "$out" | grep -q '^| 4b | 8 | 4 | 32 | 4.000 | - | 1.900 | 2.11 | - | 2.200 | 44.0 (sdpa) | 11.0 |$' &&
    echo "ok 3 - the 4B row: no cuBLAS time, sdpa the better" || echo "not ok 3 - the 4B row: $out"
echo "$out" | grep -q '^- all: 6.2-11.0x; at least 10x at 1 of 2 points$' &&
    echo "ok 4 - the summary counts the points at 10x" || echo "not ok 4 - the summary: $out"
# 31.0 / 10 = 3.1 ms is under the 8B point's 3.9 ms floor; 4.4 ms is above the 4B point's 2.2
echo "$out" | grep -q '^- a tenth of the transformers time is under the weights + KV floor at 1 of 2 points: 8b R 1 q 1$' &&
    echo "ok 5 - the points 10x cannot reach are named" || echo "not ok 5 - the points below the floor: $out"
joined=$out
# step points without the weights + KV floor (older runs): no such column or line
sed 's/, "kv_bytes": [0-9]*, "memory_floor_ms": [0-9.]*//' "$tmp/step.jsonl" > "$tmp/old.jsonl"
out=$(python3 "$src/bench/step_table.py" "$tmp/old.jsonl" "$tmp/hf.jsonl" 2>&1)
if echo "$out" | grep -q 'KV' || ! echo "$out" | grep -q '^| 8b | 1 | 1 | 1 | 5.000 | 4.000 | 3.800 | 1.32 | 1.25 | 31.0 (eager) | 6.2 |$'; then
    echo "not ok 6 - older step points: $out"
else
    echo "ok 6 - older step points keep the old columns"
fi
# eager alone: 31.0 / 5.0 and 50.0 / 4.0
echo "$joined" | grep -q '^- against transformers eager alone: 6.2-12.5x; at least 10x at 1 of 2 points$' &&
    echo "ok 7 - the count against transformers eager alone" || echo "not ok 7 - against eager alone: $joined"
