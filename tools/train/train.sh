#!/usr/bin/env bash
# Train dspark's small model pair: tools/train/train.sh OUTDIR [--seed N] [--quick] [...]
# Runs offline on one GPU host with Python 3 + torch + transformers + tokenizers + safetensors.
# The console output is also kept in OUTDIR/train.out.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUTDIR [--seed N] [--quick] [--budget-scale X] [--humaneval FILE]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$1"
"$PYTHON" "$here/recipe.py" "$@" 2>&1 | tee "$1/train.out"
