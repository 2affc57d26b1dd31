#!/bin/sh
# bench/gpu-suite.sh: what issue 5 asks to be shown on a GPU host, in parts that
# each take under ten minutes on one H200, every log and table under OUT_DIR:
#   tests  make check-gpu; compute-sanitizer memcheck of tests/gpu/test-kernels
#          and of tests/gpu/test-cuda-engine (DS_TEST_QUICK=1)
#   step   target step time for R in 1..256 x q in 1, 4, 8 at context 1024 with
#          the weight-streaming floor and the weights + KV floor, invariant and
#          cuBLAS products (step.jsonl)
#   round  the whole round against its verify pass at R 1, 8, 32, 64: greedy,
#          T 1 with top-p 0.95, and Qwen3's T 0.6 top-p 0.95 top-k 20
#   att    the attention alone (bench-attention-cuda: attention.md, and its
#          outputs in attention.bin for a bit comparison with another build)
#   long   the 4B's and the 8B's step at 8,192 and 32,768 positions for 1, 4
#          and 16 sequences, and the attention alone there (long.md; only
#          when the list names it)
#   sample the sampling kernels alone (bench-sample-cuda: sample.md, and the
#          hashes of their rows and draws in sample-hashes.txt, to compare
#          with another build)
#   hf     transformers eager and sdpa on the same shapes (bench_step_hf.py;
#          needs torch and transformers), within HF_BUDGET_S seconds (280);
#          after a step part, both side by side in table.md (step_table.py)
#   torch  a compiled PyTorch Qwen3 on the same shapes at a few points, its
#          eager ops and its torch.compile form each in one CUDA graph
#          (bench_step_torch.py: torch.md; only when the list names it;
#          compilations start within TORCH_BUDGET_S seconds, 420)
# usage: bench/gpu-suite.sh BUILD_DIR OUT_DIR [tests,step,round,att,long,sample,hf,torch]
# BUILD_DIR is a build configured --with-cuda. Exit status: 0, 1 when a part
# failed, 77 when the tests part found no CUDA device.
set -u
build=${1:?usage: bench/gpu-suite.sh BUILD_DIR OUT_DIR [tests,step,round,att,long,sample,hf,torch]}
out=${2:?usage: bench/gpu-suite.sh BUILD_DIR OUT_DIR [tests,step,round,att,long,sample,hf,torch]}
parts=${3:-tests,step,round,att,sample}
src=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "$build" && pwd) || exit 1
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1
sanitizer=${COMPUTE_SANITIZER:-compute-sanitizer}
command -v "$sanitizer" > /dev/null 2>&1 || sanitizer=/usr/local/cuda/bin/compute-sanitizer
status=0

say() { printf '%s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { say "FAILED: $*"; status=1; }

has_part() { case ",$parts," in *",$1,"*) return 0 ;; esac; return 1; }

if has_part tests; then
    say "tests: make check-gpu"
    make -C "$build" check-gpu > "$out/check-gpu.log" 2>&1
    rc=$?
    tail -n 3 "$out/check-gpu.log"
    if [ "$rc" -eq 77 ] || grep -q "check-gpu: SKIP" "$out/check-gpu.log"; then
        say "tests: no CUDA device, skipped"
        [ "$status" -ne 0 ] || status=77
    elif [ "$rc" -ne 0 ]; then
        fail "make check-gpu (exit $rc, $out/check-gpu.log)"
    else
        for t in test-kernels test-cuda-engine; do
            say "tests: memcheck of $t"
            DS_TEST_QUICK=1 "$sanitizer" --tool memcheck "$build/tests/gpu/$t" > "$out/memcheck-$t.log" 2>&1
            rc=$?
            summary=$(grep "ERROR SUMMARY" "$out/memcheck-$t.log" | tail -n 1)
            say "tests: $t under memcheck: exit $rc, ${summary:-no summary}, $(grep -c '^ok' "$out/memcheck-$t.log") ok"
            case "$summary" in *" 0 errors"*) [ "$rc" -eq 0 ] || fail "memcheck of $t (exit $rc)" ;;
            *) fail "memcheck of $t ($out/memcheck-$t.log)" ;; esac
        done
    fi
fi

if has_part step; then
    say "step: bench-step-cuda"
    "$build/bench/bench-step-cuda" --models 0.6b,4b,8b --rs 1,8,32,64,128,256 --qs 1,4,8 --reps 5 \
        --products invariant,cublas --json "$out/step.jsonl" > "$out/step.md" 2> "$out/step.err" ||
        fail "bench-step-cuda ($out/step.err)"
    cat "$out/step.md"
fi

if has_part round; then
    : > "$out/round.md"
    for sampling in "" "--temperature 1" "--temperature 0.6 --top-k 20"; do
        say "round: ${sampling:-greedy}"
        # shellcheck disable=SC2086
        { echo "## ${sampling:-greedy}"; "$build/bench/bench-step-cuda" --round --models 4b,8b --rs 1,8,32,64 \
            --reps 15 $sampling 2>&1; } >> "$out/round.md" || fail "round ${sampling:-greedy}"
    done
    cat "$out/round.md"
fi

if has_part att; then
    say "att: bench-attention-cuda"
    "$build/bench/bench-attention-cuda" --out "$out/attention.bin" > "$out/attention.md" 2>&1 ||
        fail "bench-attention-cuda ($out/attention.md)"
    cat "$out/attention.md"
fi

if has_part long; then
    : > "$out/long.md"
    for ctx in 8192 32768; do
        say "long: bench-step-cuda at $ctx positions"
        "$build/bench/bench-step-cuda" --models 4b,8b --ctx "$ctx" --rs 1,4,16 --qs 1,8 --reps 5 \
            --products invariant >> "$out/long.md" 2>> "$out/long.err" || fail "bench-step-cuda --ctx $ctx ($out/long.err)"
    done
    say "long: bench-attention-cuda"
    "$build/bench/bench-attention-cuda" --passes 1x1x8192,4x1x8192,1x8x8192,1x1x32768,4x1x32768,1x8x32768 \
        >> "$out/long.md" 2>> "$out/long.err" || fail "bench-attention-cuda, long contexts ($out/long.err)"
    cat "$out/long.md"
fi

if has_part sample; then
    say "sample: bench-sample-cuda"
    "$build/bench/bench-sample-cuda" --hashes "$out/sample-hashes.txt" > "$out/sample.md" 2>&1 ||
        fail "bench-sample-cuda ($out/sample.md)"
    cat "$out/sample.md"
fi

if has_part hf; then
    say "hf: transformers eager and sdpa"
    python3 "$src/bench/bench_step_hf.py" --models 0.6b,4b,8b --rs 1,8,32,64,128,256 --qs 1,4,8 \
        --impl eager,sdpa --reps 5 --budget-s "${HF_BUDGET_S:-280}" --out "$out/hf-step.jsonl" \
        > "$out/hf-step.md" 2> "$out/hf-step.err" || fail "bench_step_hf.py ($out/hf-step.err)"
    tail -n 60 "$out/hf-step.md"
    if [ -s "$out/step.jsonl" ]; then   # the step part's points beside transformers': issue 5's table
        python3 "$src/bench/step_table.py" "$out/step.jsonl" "$out/hf-step.jsonl" > "$out/table.md" ||
            fail "step_table.py ($out/table.md)"
        tail -n 5 "$out/table.md"
    fi
fi

if has_part torch; then
    say "torch: a compiled PyTorch Qwen3"
    python3 "$src/bench/bench_step_torch.py" --models 0.6b,4b,8b --points 1x1,8x1,64x1,64x8 --compile 1x1,64x1 \
        --budget-s "${TORCH_BUDGET_S:-420}" --out "$out/torch-step.jsonl" > "$out/torch.md" 2> "$out/torch.err" ||
        fail "bench_step_torch.py ($out/torch.err)"
    tail -n 16 "$out/torch.md"
fi

say "done: $out (exit $status)"
exit "$status"
