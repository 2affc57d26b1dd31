#!/bin/sh
# test-generate-cli.sh: dspark-generate on the bundled small pair: bad option
# values are usage errors (exit 2) before anything loads; greedy speculative
# output equals target-only output for dspark and fixed:64 (longer than the
# draft's block); a seed of 64 bits replays; a prompt the engine refuses fails
# alone (exit 1), the others print, and the summary counts it (with a draft
# too, its line with the draft's fields, and the step-time profile measured at
# a context that fits --max-context); the summary's time breakdown adds up to
# the engine's steps and fits in the generation time;
# a chat message's content in text parts reads as dsparkctl reads it; a model
# whose files disagree (a layer its config does not count, ids past the
# vocabulary) is refused at load.
set -u
build=${DS_BUILDDIR:-.}
src=${DS_SRCDIR:-.}
gen="$build/dspark-generate"
target="$src/models/dspark-tiny-target"
draft="$src/models/dspark-tiny-draft"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "1..22"
. "$src/tests/engine/cli-tap.sh"
usage_error() {   # ARGS...: exit 2 with a message, and no model loaded (--target does not exist)
    "$gen" --target "$tmp/no-such-model" --prompt hi "$@" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    [ $rc -eq 2 ] && [ -s "$tmp/err" ] || { echo "# $*: exit $rc: $(cat "$tmp/err")"; return 1; }
}
check "a bad --spec is a usage error" usage_error --spec fixed:65
check "a bad --backend is a usage error" usage_error --backend gpu
bad_seeds() { usage_error --seed -3 && usage_error --seed 1.5 && usage_error --seed 18446744073709551616; }
check "a negative, fractional or too large --seed is a usage error" bad_seeds
check "--trace without --draft is a usage error" usage_error --trace "$tmp/trace.jsonl"
check "--threads above the pool's 256 is a usage error" usage_error --threads 257

# a checkpoint of more layers than its config.json says is refused (it ran with the last left out)
mkdir "$tmp/five"
ln -s "$(cd "$target" && pwd)/model.safetensors" "$tmp/five/model.safetensors"
python3 -c 'import json, sys
c = json.load(open(sys.argv[1]))
c["num_hidden_layers"] -= 1
c["layer_types"] = c.get("layer_types", [])[:c["num_hidden_layers"]] or None
json.dump({k: v for k, v in c.items() if v is not None}, open(sys.argv[2], "w"))' "$target/config.json" "$tmp/five/config.json"
"$gen" --target "$tmp/five" --prompt-ids "1 2" --max-tokens 2 --threads 1 --quiet >/dev/null 2>"$tmp/err"
rc=$?
check "a checkpoint with a layer its config.json does not count is refused, naming it" sh -c '[ "$0" -eq 1 ] &&
    grep -q "model.layers.5.* belongs to a layer past the 5 that config.json.s num_hidden_layers gives" "$1"' \
    "$rc" "$tmp/err"
# an end-of-sequence id past the vocabulary in generation_config.json (it turned stopping off), and a
# tokenizer.json with ids past it (a prompt holding one failed at submit), are refused at load
for case in eos tok; do
    mkdir "$tmp/$case"
    for f in config.json generation_config.json tokenizer.json model.safetensors; do
        ln -s "$(cd "$target" && pwd)/$f" "$tmp/$case/$f"
    done
done
rm "$tmp/eos/generation_config.json" "$tmp/tok/tokenizer.json"
python3 -c 'import json, sys
g = json.load(open(sys.argv[1] + "/generation_config.json")); g["eos_token_id"] = [2147483647]
json.dump(g, open(sys.argv[2] + "/eos/generation_config.json", "w"))
t = json.load(open(sys.argv[1] + "/tokenizer.json"))
t["added_tokens"].append({"id": 99999, "content": "<|far|>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True})
json.dump(t, open(sys.argv[2] + "/tok/tokenizer.json", "w"))' "$target" "$tmp"
"$gen" --target "$tmp/eos" --prompt hi --max-tokens 2 --threads 1 --quiet >/dev/null 2>"$tmp/err"
check "an eos id past the vocabulary in generation_config.json is refused" sh -c '[ "$0" -eq 1 ] &&
    grep -q "generation_config.json.: eos_token_id 2147483647 is outside the vocabulary" "$1"' "$?" "$tmp/err"
"$gen" --target "$tmp/tok" --prompt hi --max-tokens 2 --threads 1 --quiet >/dev/null 2>"$tmp/err"
check "a tokenizer.json with ids past the vocabulary is refused" sh -c '[ "$0" -eq 1 ] &&
    grep -q "tokenizer.json.: its ids go up to 99999, past config.json.s vocab_size" "$1"' "$?" "$tmp/err"

printf '{"prompt": "The quick brown fox"}\n{"prompt": "Once upon a time"}\n{"prompt": "1, 2, 3,"}\n' >"$tmp/p.jsonl"
run() {   # NAME ARGS...: the output ids of the three prompts (--json), a line each, into $tmp/NAME.ids
    name=$1
    shift
    "$gen" --target "$target" --prompts "$tmp/p.jsonl" --max-tokens 24 --threads 2 --quiet --json "$@" \
        >"$tmp/$name.out" 2>"$tmp/$name.err"
    grep -o '"output_ids":\[[^]]*\]' "$tmp/$name.out" >"$tmp/$name.ids"
}
run none --spec none
run dspark --draft "$draft" --spec dspark --concurrency 3
run fixed --draft "$draft" --spec fixed:64 --concurrency 2
check "target-only decoding gives three outputs of 24 tokens" sh -c '[ "$(grep -c "\"output_tokens\":24" "$0")" -eq 3 ]' \
    "$tmp/none.out"
check "greedy dspark output equals target-only output" cmp -s "$tmp/none.ids" "$tmp/dspark.ids"
check "greedy fixed:64 (beyond the draft's block) equals target-only output" cmp -s "$tmp/none.ids" "$tmp/fixed.ids"

# a sampled speculative run replays with the same seed and verify lengths: fixed:4 here, as dspark's
# lengths follow the step-time profile measured at start and the batch (other lengths sample other,
# equally distributed, tokens)
run s1 --draft "$draft" --spec fixed:4 --temperature 1 --seed 18446744073709551615 --concurrency 3
run s2 --draft "$draft" --spec fixed:4 --temperature 1 --seed 18446744073709551615 --concurrency 3
check "a 64-bit seed is taken, and a sampled run replays" sh -c '[ -s "$0" ] && cmp -s "$0" "$1"' "$tmp/s1.ids" \
    "$tmp/s2.ids"

printf '{"prompt": "hi"}\n{"prompt": "a prompt far too long for a context of sixteen tokens, with many more words"}\n' \
    >"$tmp/long.jsonl"
"$gen" --target "$target" --prompts "$tmp/long.jsonl" --max-tokens 8 --max-context 16 --threads 2 \
    >"$tmp/long.out" 2>"$tmp/long.err"
rc=$?
check "a refused prompt fails alone: exit 1, its reason named, the other printed" sh -c '[ "$1" -eq 1 ] &&
    grep -q "prompt 1: .*exceeds the context" "$2" && [ -n "$(head -n 1 "$0")" ]' "$tmp/long.out" "$rc" "$tmp/long.err"
check "the summary counts the failed prompt" grep -q '^failed prompts  *1$' "$tmp/long.err"
# the same with a draft: the step-time profile fits the short context (it failed at start: "no KV room to
# profile the step time"), and the failed prompt's line has the draft fields, nothing counted
"$gen" --target "$target" --draft "$draft" --spec dspark --prompts "$tmp/long.jsonl" --max-tokens 8 \
    --max-context 16 --concurrency 1 --threads 2 --json >"$tmp/longd.out" 2>"$tmp/longd.err"
rc=$?
check "with --draft and a context of 16, the profile is measured and the other prompt printed" sh -c '[ "$1" -eq 1 ] &&
    [ "$(wc -l <"$0")" -eq 2 ] && grep -q "\"output_tokens\":[1-9]" "$0"' "$tmp/longd.out" "$rc"
check "... and the failed prompt's line has the draft fields (0 rounds, no acceptance length)" sh -c '
    sed -n 2p "$0" | grep "\"finish_reason\":\"error\"" | grep "\"rounds\":0," |
        grep "\"mean_acceptance_length\":null" | grep "\"tokens_per_s\":null" |
        grep -q "\"acceptance_by_position\":\[null,"' "$tmp/longd.out"

"$gen" --target "$target" --draft "$draft" --prompts "$tmp/p.jsonl" --max-tokens 24 --concurrency 3 --threads 2 \
    --round-log "$tmp/rounds.jsonl" >/dev/null 2>"$tmp/time.err"
time_adds_up() {
    awk '/^generation time/ { gen = $3 } /^engine steps/ { steps = $3 + 0; drafting = substr($4, 2) + 0 }
         /^  in target passes/ { pass = $4 } /^  in draft phases/ { draft = $4 } /^  in the rest/ { rest = $4 }
         /^  the profile.s passes/ { prof = $4 }
         END { sum = pass + draft + rest
               ok = steps > 0 && drafting > 0 && drafting <= steps && pass > 0 && draft > 0 && rest >= -0.002 &&
                    sum <= gen + 0.0065 && prof > 0   # the generation time is printed to hundredths
               if (!ok) print "# gen " gen " steps " steps " drafting " drafting " pass " pass " draft " draft \
                              " rest " rest " profile " prof
               exit !ok }' "$tmp/time.err"
}
check "the summary splits the steps' time into passes, draft phases and the rest, within the generation time" \
    time_adds_up
rounds_add_up() {   # a line per step; its drafting rounds and pass seconds sum to the summary's
    awk -F'[:,}] *' 'FNR == NR { if ($0 ~ /^engine steps/) { split($0, w, " +"); steps = w[3]; drafting = substr(w[4], 2) + 0 }
                                if ($0 ~ /^  in target passes/) { split($0, w, " +"); pass = w[5] }
                                next }
         { lines++; for (i = 1; i < NF; i += 2) v[$i] = $(i + 1)
           if (v["\"drafting\""] > 0) drafted++
           if (v["\"tokens\""] < 1) bad++
           sum += v["\"pass_s\""] }
         END { ok = lines == steps && drafted == drafting && !bad && sum > pass - 0.002 && sum < pass + 0.002
               if (!ok) print "# lines " lines " steps " steps " drafted " drafted " drafting " drafting " pass " pass " sum " sum
               exit !ok }' "$tmp/time.err" "$tmp/rounds.jsonl"
}
check "--round-log writes a line per step, and its passes add up to the summary's" rounds_add_up

# content as text parts, joined with a newline as dsparkctl joins them: the same prompt as the joined string
printf '%s\n' \
    '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}, {"type": "text", "text": "Be brief."}]}]}}' \
    '{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "Say hi.\nBe brief."}]}}' \
    >"$tmp/parts.jsonl"
"$gen" --target "$target" --prompts "$tmp/parts.jsonl" --max-tokens 8 --threads 2 --quiet --json >"$tmp/parts.out" \
    2>"$tmp/parts.err"
same_prompt() {
    [ "$(grep -c '"prompt_tokens"' "$tmp/parts.out")" -eq 2 ] &&
        [ "$(grep -o '"prompt_tokens":[0-9]*' "$tmp/parts.out" | sort -u | wc -l)" -eq 1 ] &&
        [ "$(grep -o '"output_ids":\[[^]]*\]' "$tmp/parts.out" | sort -u | wc -l)" -eq 1 ]
}
check "a chat message's text parts read as their texts joined with a newline" same_prompt
printf '%s\n' '{"body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}}' \
    >"$tmp/image.jsonl"
"$gen" --target "$target" --prompts "$tmp/image.jsonl" --max-tokens 8 --threads 2 >/dev/null 2>"$tmp/image.err"
check "another kind of part is refused, naming it" grep -q 'line 1: messages\[0\]\.content\[0\]: only {"type": "text"' \
    "$tmp/image.err"
# lines of spaces or tabs are blank, and a byte order mark is no part of the first line (as dsparkctl submit -f reads
# them); a prompt file that cannot be read says why
printf '\357\273\277{"prompt": "1, 2, 3,"}\n   \n\t\n{"prompt": "1, 2, 3,"}\n' >"$tmp/ws.jsonl"
"$gen" --target "$target" --prompts "$tmp/ws.jsonl" --max-tokens 4 --threads 2 --quiet >"$tmp/ws.out" 2>"$tmp/ws.err"
ws_rc=$?
ws_ok() { [ "$ws_rc" -eq 0 ] && [ "$(wc -l <"$tmp/ws.out")" -eq 2 ]; }
check "blank lines of spaces and tabs and a byte order mark are skipped ($(head -c 200 "$tmp/ws.err"))" ws_ok
"$gen" --target "$target" --prompts "$tmp" --max-tokens 4 --threads 2 --quiet >/dev/null 2>"$tmp/dir.err"
check "a prompt file that cannot be read says why" grep -q "could not read '$tmp': Is a directory" "$tmp/dir.err"
