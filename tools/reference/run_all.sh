#!/bin/bash
# Make every reference fixture into OUTDIR and pack them as OUTDIR/fixtures.tar.gz.
#
# usage: tools/reference/run_all.sh OUTDIR
# Needs python3 with torch, transformers, safetensors and numpy; runs on the
# CPU only (CUDA is hidden) and takes well under a minute.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out=$1
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}

export CUDA_VISIBLE_DEVICES=
export PYTHONDONTWRITEBYTECODE=1

"$py" - <<'EOF'
import sys
import numpy, safetensors, torch, transformers
print("python %s" % sys.version.split()[0])
print("torch %s" % torch.__version__)
print("transformers %s" % transformers.__version__)
print("safetensors %s" % safetensors.__version__)
print("numpy %s" % numpy.__version__)
EOF

mkdir -p "$out"
rm -rf "$out/models" "$out/drafts" "$out/fixtures.tar.gz"

start=$(date +%s)
"$py" "$here/make_target_fixtures.py" "$out"
"$py" "$here/make_draft_fixtures.py" "$out"
end=$(date +%s)

echo
echo "files (bytes):"
(cd "$out" && find models drafts -type f | LC_ALL=C sort | while read -r f; do
    printf '%10d  %s\n' "$(stat -c %s "$f")" "$f"
done)
echo
(cd "$out" && du -sb models drafts)

tar -C "$out" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -cf - models drafts | gzip -n -9 > "$out/fixtures.tar.gz.tmp"
mv "$out/fixtures.tar.gz.tmp" "$out/fixtures.tar.gz"
echo
echo "packed $out/fixtures.tar.gz ($(stat -c %s "$out/fixtures.tar.gz") bytes) in $((end - start)) s"
