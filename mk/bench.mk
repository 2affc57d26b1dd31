# mk/bench.mk: engine benchmarks (they print tables for bench/RESULTS.md) and the test of the step table's script.
noinst_PROGRAMS += bench/bench-prefill
bench_bench_prefill_SOURCES = bench/bench-prefill.c
bench_bench_prefill_CFLAGS = $(AM_CFLAGS) $(OPENBLAS_CFLAGS)
bench_bench_prefill_LDADD = $(ENGINE_LIBS)
noinst_PROGRAMS += bench/bench-sampler
bench_bench_sampler_SOURCES = bench/bench-sampler.c
bench_bench_sampler_LDADD = $(ENGINE_LIBS)
EXTRA_DIST += bench/model-pair.sh bench/ngram-baseline.sh bench/spec-speedup.sh bench/service-throughput.sh bench/RESULTS.md

noinst_PROGRAMS += bench/bench-step-cuda
bench_bench_step_cuda_SOURCES = bench/bench-step-cuda.c
bench_bench_step_cuda_LDADD = $(ENGINE_LIBS)
EXTRA_DIST += bench/bench_step_hf.py bench/bench_step_torch.py bench/gpu-suite.sh bench/step_table.py
TESTS += tests/unit/test-step-table.sh
EXTRA_DIST += tests/unit/test-step-table.sh
