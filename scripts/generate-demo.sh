#!/bin/sh
# scripts/generate-demo.sh: install, build, and generate with the bundled model
# pair (on the GPU where one exists, else the CPU): the same prompts target-only
# and with DSpark speculation,
# each followed by its summary table (tau, acceptance by position, tokens/s).
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
./setup.sh
scripts/build.sh
gen=build/dspark-generate
prompts=${1:-examples/prompts.jsonl}
echo "== target only (--spec none)"
$gen --target models/dspark-tiny-target --prompts "$prompts" --max-tokens 96 --concurrency 8 --spec none \
    > build/demo-none.txt
head -c 600 build/demo-none.txt; echo
echo "== DSpark speculation (--spec dspark)"
$gen --target models/dspark-tiny-target --draft models/dspark-tiny-draft --prompts "$prompts" --max-tokens 96 \
    --concurrency 8 --spec dspark > build/demo-dspark.txt
if cmp -s build/demo-none.txt build/demo-dspark.txt; then
    echo "greedy outputs identical with and without speculation (lossless)"
else
    echo "outputs differ between --spec none and --spec dspark" >&2
    exit 1
fi
