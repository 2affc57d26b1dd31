#!/bin/sh
# test-tokenize-cli.sh: dspark-tokenize on the bundled tiny target's
# tokenizer.json: encode and decode give back the text; a blank line gives a
# blank line (lines stay paired); --chat takes a content as a string or as text
# parts, alike, and refuses a NUL or a non-text part naming the line; a bad line
# stops the run with exit 1 after the lines before it; usage errors exit 2.
set -u
build=${DS_BUILDDIR:-.}
src=${DS_SRCDIR:-.}
tk="$build/cli/dspark-tokenize"
tok="$src/models/dspark-tiny-target"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "1..8"
. "$src/tests/engine/cli-tap.sh"

printf '"def add(a, b):\\n    return a + b"\n\n  \n"héllo wörld"\n' >"$tmp/text"
"$tk" --tokenizer "$tok" <"$tmp/text" >"$tmp/ids" 2>"$tmp/err"
paired() { [ "$(wc -l <"$tmp/ids")" -eq 4 ] && [ -z "$(sed -n 2p "$tmp/ids")$(sed -n 3p "$tmp/ids")" ] &&
           grep -q '^\[[0-9]' "$tmp/ids"; }
check "encode: a line of ids a string, a blank line for a blank line" paired
"$tk" -t "$tok" --decode <"$tmp/ids" >"$tmp/back" 2>"$tmp/err"
roundtrip() { python3 -c 'import json, sys
a = [l.strip() for l in open(sys.argv[1])]
b = [l.strip() for l in open(sys.argv[2])]
sys.exit(0 if len(a) == len(b) == 4 and json.loads(a[0]) == json.loads(b[0]) and json.loads(a[3]) == json.loads(b[3])
         and b[1] == b[2] == "" else 1)' "$tmp/text" "$tmp/back"; }
check "decode gives the text back, blank lines kept" roundtrip

printf '[{"role": "user", "content": "Add two numbers."}]\n[{"role": "user", "content": [{"type": "text", "text": "Add two numbers."}]}]\n' |
    "$tk" -t "$tok" --chat >"$tmp/chat" 2>"$tmp/err"
same_chat() { [ "$(wc -l <"$tmp/chat")" -eq 2 ] && [ "$(sed -n 1p "$tmp/chat")" = "$(sed -n 2p "$tmp/chat")" ] &&
              grep -q '^\[[0-9]' "$tmp/chat"; }
check "--chat: a content as a string and as text parts give the same ids" same_chat
printf '[{"role": "user", "content": "ok"}]\n[{"role": "user", "content": "a\\u0000b"}]\n' |
    "$tk" -t "$tok" --chat >"$tmp/out" 2>"$tmp/err"
rc=$?
nul() { [ $rc -eq 1 ] && [ "$(wc -l <"$tmp/out")" -eq 1 ] &&
        grep -q "line 2: message 0: content: contains a NUL character" "$tmp/err"; }
check "--chat refuses a content with a NUL at its line, after answering the line before" nul
printf '[{"role": "user", "content": [{"type": "image_url"}]}]\n' | "$tk" -t "$tok" --chat >"$tmp/out" 2>"$tmp/err"
rc=$?
check "--chat refuses a part that is not text, naming it" sh -c '[ "$0" -eq 1 ] && grep -q "line 1: message 0: content part 0:" "$1"' \
    "$rc" "$tmp/err"
printf '"a"\n[1, 2]\n"b"\n' | "$tk" -t "$tok" >"$tmp/out" 2>"$tmp/err"
rc=$?
check "a line of the wrong kind stops the run: exit 1, the line named" sh -c '[ "$0" -eq 1 ] &&
    [ "$(wc -l <"$1")" -eq 1 ] && grep -q "line 2: expected a JSON string" "$2"' "$rc" "$tmp/out" "$tmp/err"
usage() {
    for args in "--bogus" "" "-t $tok --decode --chat" "-t $tok --thinking"; do
        # shellcheck disable=SC2086
        "$tk" $args </dev/null >/dev/null 2>"$tmp/err"
        rc=$?
        [ $rc -eq 2 ] && [ -s "$tmp/err" ] || { echo "# '$args': exit $rc"; return 1; }
    done
}
check "usage errors exit 2 with a message" usage
check "--version names the program" sh -c '"$0" --version | grep -q "^dspark-tokenize (dspark) "' "$tk"
