#!/bin/sh
# test-calibrate.sh: dspark-calibrate recovers known per-position confidence
# temperatures from synthetic full-length-round traces, lowers the calibration
# error (also on held-out traces made from other draws), and merges its result
# into sts.json beside the draft.
set -u
build=${DS_BUILDDIR:-.}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "1..5"
# 20000 rounds, gamma 4, true temperatures 0.5 1 2 1 (awk's rand is seeded: reproducible)
traces() {
awk -v seed="$1" 'BEGIN { srand(seed); split("0.5 1 2 1", T, " ");
  for (i = 0; i < 20000; i++) {
    acc = 0; alive = 1; zs = "";
    for (k = 1; k <= 4; k++) {
      z = rand() * 8 - 4; zs = zs (k > 1 ? "," : "") sprintf("%.6f", z);
      if (alive && rand() < 1 / (1 + exp(-z / T[k]))) acc++; else alive = 0;
    }
    com = ""; for (k = 0; k <= acc; k++) com = com (k ? "," : "") "5";
    printf "{\"seq\":1,\"round\":%d,\"start\":0,\"anchor\":1,\"temperature\":1,\"drafts\":[1,2,3,4],\"confidence\":[%s],\"verify_len\":4,\"accepted\":%d,\"committed\":[%s]}\n", i, zs, acc, com
  } }'
}
traces 7 > "$tmp/trace.jsonl"
traces 8 > "$tmp/held-out.jsonl"
mkdir -p "$tmp/draft"
out=$("$build/dspark-calibrate" --draft "$tmp/draft" --json --held-out "$tmp/held-out.jsonl" "$tmp/trace.jsonl" \
    2>"$tmp/err")
rc=$?
[ $rc -eq 0 ] && echo "ok 1 - calibrate runs" || { echo "not ok 1 - calibrate runs: $(cat "$tmp/err")"; exit 0; }
# fitted temperatures within 30% of the truth
echo "$out" | awk -F'[][]' '{ split($2, t, ","); split("0.5 1 2 1", T, " ");
  bad = 0; for (k = 1; k <= 4; k++) if (t[k] < 0.7 * T[k] || t[k] > 1.3 * T[k]) bad = 1;
  if (bad) print "not ok 2 - temperatures recovered: " $2; else print "ok 2 - temperatures recovered: " $2 }'
# ECE after < ECE before at the miscalibrated positions 1 and 3
echo "$out" | awk -F'[][]' '{ split($4, b, ","); split($6, a, ",");
  if (a[1] < b[1] && a[3] < b[3]) print "ok 3 - calibration error falls"; else print "not ok 3 - calibration error falls: " $4 " -> " $6 }'
grep -q '"1"' "$tmp/draft/sts.json" && echo "ok 4 - sts.json written" || echo "not ok 4 - sts.json written"
# the held-out traces: the fitted temperatures lower their error at positions 1 and 3 too
echo "$out" | awk -F'[][]' '/held_out_rounds":20000/ { split($8, b, ","); split($10, a, ",");
  if (a[1] < b[1] && a[3] < b[3]) ok = 1 }
  END { if (ok) print "ok 5 - held-out calibration error falls"; else print "not ok 5 - held-out calibration error falls: " $0 }'
