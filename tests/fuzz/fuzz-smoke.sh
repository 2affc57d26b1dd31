#!/bin/sh
# fuzz-smoke.sh: build the safetensors fuzz target with clang and libFuzzer
# (AddressSanitizer and UndefinedBehaviorSanitizer on) and run it for a short
# while over a copy of the seed corpus. Prints TAP; skips loudly when clang or
# libFuzzer is missing. FUZZ_CC picks the compiler, FUZZ_SECONDS the run time.
set -u
srcdir=${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
builddir=${DS_BUILDDIR:-$(pwd)}
seconds=${FUZZ_SECONDS:-20}

cc=${FUZZ_CC:-}
if [ -z "$cc" ]; then
    for c in clang clang-14; do
        if command -v "$c" >/dev/null 2>&1; then cc=$c; break; fi
    done
fi
if [ -z "$cc" ]; then
    echo "1..0 # SKIP clang is not installed"
    exit 0
fi
if [ ! -f "$builddir/config.h" ]; then
    echo "1..0 # SKIP no config.h in '$builddir' (set DS_BUILDDIR)"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/dspark-fuzz-XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM

# Can this clang link a libFuzzer binary at all?
cat > "$work/probe.c" <<'PROBE'
#include <stddef.h>
#include <stdint.h>
int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n);
int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }
PROBE
if ! "$cc" -fsanitize=fuzzer,address,undefined -o "$work/probe" "$work/probe.c" >"$work/probe.log" 2>&1; then
    echo "1..0 # SKIP '$cc' cannot build libFuzzer targets (libclang-rt-dev missing?)"
    sed 's/^/# /' "$work/probe.log"
    exit 0
fi

echo "1..1"
flags="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -g -O1 -std=gnu11"
# shellcheck disable=SC2046,SC2086
if ! "$cc" $flags -I"$builddir" -I"$srcdir/include" $(pkg-config --cflags jansson) \
        -o "$work/fuzz-safetensors" \
        "$srcdir/tests/fuzz/fuzz-safetensors.c" "$srcdir/engine/safetensors.c" "$srcdir/engine/err.c" \
        $(pkg-config --libs jansson) -lm >"$work/build.log" 2>&1; then
    sed 's/^/# /' "$work/build.log"
    echo "not ok 1 - build the fuzz target with $cc"
    exit 0
fi

# libFuzzer adds what it finds to the first corpus directory: give it a copy.
mkdir "$work/corpus"
cp "$srcdir"/tests/fuzz/corpus/* "$work/corpus/"
cat > "$work/safetensors.dict" <<'DICT'
"{"
"}"
"\"dtype\""
"\"shape\""
"\"data_offsets\""
"\"__metadata__\""
"\"F32\""
"\"F16\""
"\"BF16\""
"\"F64\""
"\"I64\""
"\"I32\""
"\"U8\""
"\"BOOL\""
"\"F8_E4M3\""
"\"F8_E5M2\""
"[0,0]"
"[]"
"null"
"\\u0000"
"18446744073709551615"
"9223372036854775807"
"-1"
"1e400"
DICT

cd "$work" || exit 1
if ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
        ./fuzz-safetensors -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -dict=safetensors.dict -print_final_stats=1 corpus >fuzz.log 2>&1; then
    tail -n 12 fuzz.log | sed 's/^/# /'
    echo "ok 1 - fuzz safetensors for ${seconds}s with ASan and UBSan"
else
    tail -n 60 fuzz.log | sed 's/^/# /'
    for f in crash-* leak-* timeout-* oom-*; do
        [ -f "$f" ] || continue
        mkdir -p "$builddir/tests/fuzz" && cp "$f" "$builddir/tests/fuzz/" &&
            echo "# kept as $builddir/tests/fuzz/$f"
        echo "# input $f (hex):"
        od -An -tx1 "$f" | head -n 20 | sed 's/^/#   /'
    done
    echo "not ok 1 - fuzz safetensors for ${seconds}s with ASan and UBSan"
fi
exit 0
