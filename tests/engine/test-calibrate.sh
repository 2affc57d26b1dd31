#!/bin/sh
# test-calibrate.sh: dspark-calibrate recovers known per-position confidence
# temperatures from synthetic full-length-round traces, lowers the calibration
# error (also on held-out traces made from other draws), and merges its result
# into sts.json beside the draft; with the draft's probabilities in the traces
# it also fits a (z, p) map that beats the temperatures where the truth needs p;
# it refuses traces of another block size than the draft's (the draft would then
# refuse its sts.json) and an sts.json it cannot read (it replaced it before).
set -u
build=${DS_BUILDDIR:-.}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "1..12"
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

# 20000 rounds whose acceptance follows sigmoid(0.3 z + 1.2 logit p + 0.5): no temperature can carry it
traces_p() {
awk -v seed="$1" 'BEGIN { srand(seed);
  for (i = 0; i < 20000; i++) {
    acc = 0; alive = 1; zs = ""; ps = "";
    for (k = 1; k <= 4; k++) {
      z = rand() * 8 - 4; p = 0.02 + 0.96 * rand();
      zs = zs (k > 1 ? "," : "") sprintf("%.6f", z); ps = ps (k > 1 ? "," : "") sprintf("%.6f", p);
      x = 0.3 * z + 1.2 * log(p / (1 - p)) + 0.5;
      if (alive && rand() < 1 / (1 + exp(-x))) acc++; else alive = 0;
    }
    com = ""; for (k = 0; k <= acc; k++) com = com (k ? "," : "") "5";
    printf "{\"seq\":1,\"round\":%d,\"start\":0,\"anchor\":1,\"temperature\":0,\"drafts\":[1,2,3,4],\"confidence\":[%s],\"draft_prob\":[%s],\"verify_len\":4,\"accepted\":%d,\"committed\":[%s]}\n", i, zs, ps, acc, com
  } }'
}
traces_p 9 > "$tmp/trace-p.jsonl"
traces_p 10 > "$tmp/held-out-p.jsonl"
out=$("$build/dspark-calibrate" --draft "$tmp/draft" --json --held-out "$tmp/held-out-p.jsonl" "$tmp/trace-p.jsonl" \
    2>"$tmp/err")
[ $? -eq 0 ] && grep -q '"maps"' "$tmp/draft/sts.json" && grep -q '"1"' "$tmp/draft/sts.json" &&
    echo "ok 6 - a (z, p) map written beside the temperatures" ||
    echo "not ok 6 - a (z, p) map written beside the temperatures: $(cat "$tmp/err")"
# held out: the map's worst position beats the temperatures' worst, and stays under 2 %
ht=$(echo "$out" | sed -n 's/.*"held_out_ece_after":\[\([^]]*\)\].*/\1/p')
hm=$(echo "$out" | sed -n 's/.*"held_out_ece_after_map":\[\([^]]*\)\].*/\1/p')
awk -v t="$ht" -v m="$hm" 'BEGIN { nt = split(t, a, ","); nm = split(m, b, ","); mt = 0; mm = 1;
  if (nt == 4 && nm == 4) { mm = 0; for (i = 1; i <= 4; i++) { if (a[i] + 0 > mt) mt = a[i] + 0; if (b[i] + 0 > mm) mm = b[i] + 0 } }
  printf "%s 7 - held-out ECE with the map %.4f against %.4f with temperatures\n", (mm < mt && mm < 0.02) ? "ok" : "not ok", mm, mt }'
# traces without draft_prob, or --no-map: temperatures only, and the earlier map for that temperature goes
"$build/dspark-calibrate" --draft "$tmp/draft" --json "$tmp/trace.jsonl" >/dev/null 2>"$tmp/err"
"$build/dspark-calibrate" --draft "$tmp/draft" --no-map --json "$tmp/trace-p.jsonl" >/dev/null 2>>"$tmp/err"
if grep -q '"maps": {}' "$tmp/draft/sts.json" && grep -q 'removed the earlier (z, p) map for 0' "$tmp/err" &&
    grep -q '"0": \[' "$tmp/draft/sts.json" && grep -q '"1": \[' "$tmp/draft/sts.json"; then
    echo "ok 8 - --no-map refits temperatures and drops the earlier map"
else
    echo "not ok 8 - --no-map refits temperatures and drops the earlier map: $(cat "$tmp/err" "$tmp/draft/sts.json")"
fi
# traces of 4 drafts a round for a draft of block size 7: refused before anything is written
mkdir -p "$tmp/draft7"
printf '{"architectures": ["DSparkDraftModel"], "block_size": 7}\n' >"$tmp/draft7/config.json"
"$build/dspark-calibrate" --draft "$tmp/draft7" "$tmp/trace.jsonl" >/dev/null 2>"$tmp/err"
rc=$?
if [ $rc -eq 1 ] && grep -q "have 4 drafts, the draft's block_size is 7: they were made with another draft" "$tmp/err" &&
    [ ! -e "$tmp/draft7/sts.json" ]; then
    echo "ok 9 - traces of another block size than the draft's are refused, nothing written"
else
    echo "not ok 9 - traces of another block size than the draft's are refused: exit $rc, $(cat "$tmp/err")"
fi
# an sts.json that is not JSON is left as it is
printf '{"temperatures": {"1": [0.5, 1' >"$tmp/draft7/sts.json"
cp "$tmp/draft7/sts.json" "$tmp/sts.before"
rm "$tmp/draft7/config.json"
"$build/dspark-calibrate" --draft "$tmp/draft7" "$tmp/trace.jsonl" >/dev/null 2>"$tmp/err"
rc=$?
if [ $rc -eq 1 ] && grep -q "sts.json': .*; not replaced" "$tmp/err" && cmp -s "$tmp/sts.before" "$tmp/draft7/sts.json" &&
    [ -z "$(ls "$tmp/draft7" | grep tmp)" ]; then
    echo "ok 10 - an sts.json that cannot be read is not replaced"
else
    echo "not ok 10 - an sts.json that cannot be read is not replaced: exit $rc, $(cat "$tmp/err")"
fi
# a set of the traces' temperature under another spelling is replaced, and a ninth set is refused (the draft
# loads at most 8, and one temperature once)
mkdir -p "$tmp/d8"
printf '{"format": 1, "block_size": 4, "temperatures": {"1.0": [1,1,1,1], "0.1": [1,1,1,1], "0.2": [1,1,1,1], "0.3": [1,1,1,1], "0.4": [1,1,1,1], "0.5": [1,1,1,1], "0.6": [1,1,1,1], "0.7": [1,1,1,1]}, "maps": {"1.0": [[1,0,0],[1,0,0],[1,0,0],[1,0,0]]}}\n' >"$tmp/d8/sts.json"
"$build/dspark-calibrate" --draft "$tmp/d8" "$tmp/trace.jsonl" >/dev/null 2>"$tmp/err"
rc=$?
if [ $rc -eq 0 ] && ! grep -q '"1.0"' "$tmp/d8/sts.json" && grep -q '"1": \[' "$tmp/d8/sts.json"; then
    echo "ok 11 - a set of the same temperature under another spelling is replaced, its map too"
else
    echo "not ok 11 - a set of the same temperature under another spelling is replaced: exit $rc, $(cat "$tmp/err")"
fi
sed 's/"0.7"/"0.8"/; s/"1":/"0.7":/' "$tmp/d8/sts.json" >"$tmp/d8/x" && mv "$tmp/d8/x" "$tmp/d8/sts.json"
cp "$tmp/d8/sts.json" "$tmp/sts8.before"
"$build/dspark-calibrate" --draft "$tmp/d8" "$tmp/trace.jsonl" >/dev/null 2>"$tmp/err"
rc=$?
if [ $rc -eq 1 ] && grep -q "holds 8 sets of temperatures" "$tmp/err" && cmp -s "$tmp/sts8.before" "$tmp/d8/sts.json"; then
    echo "ok 12 - a ninth set is refused, the file left as it was"
else
    echo "not ok 12 - a ninth set is refused: exit $rc, $(cat "$tmp/err")"
fi
