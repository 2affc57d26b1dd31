# mk/kernels.mk: CUDA kernels (built only with --with-cuda), compiled by nvcc,
# and their GPU test. The test is not in TESTS (CI has no GPU): run it with
# `make check-gpu` on a GPU host.
DS_KERNEL_SOURCES = kernels/rowwise.cu kernels/attention.cu kernels/gemm.cu kernels/draft.cu kernels/sample.cu
if HAVE_CUDA
noinst_LIBRARIES += libdskernels.a
libdskernels_a_SOURCES = $(DS_KERNEL_SOURCES) kernels/kernels.h kernels/cluster.cuh kernels/pdl.cuh kernels/rowmath.cuh
libdskernels_a_LIBADD =
# nvcc's host code needs the C++ runtime (static guards, the personality routine)
KERNELS_LIBS = libdskernels.a $(CUDA_LIBS) -lstdc++
# the engine's CUDA backend (engine/forward-cuda.c) calls the kernels
libdsengine_a_SOURCES += engine/forward-cuda.c engine/draft-cuda.c engine/cuda-impl.h
libdsengine_a_CFLAGS += $(CUDA_CFLAGS) -I$(top_srcdir)/kernels
ENGINE_LIBS += $(KERNELS_LIBS)
SUFFIXES = .cu
.cu.o:
	$(AM_V_CC)$(NVCC) $(NVCCFLAGS) -Xcompiler -Wall -I$(top_srcdir)/include -I$(top_srcdir)/kernels -I$(top_builddir) -c -o $@ $<
$(libdskernels_a_OBJECTS): $(top_srcdir)/kernels/kernels.h $(top_srcdir)/kernels/cluster.cuh $(top_srcdir)/kernels/pdl.cuh $(top_srcdir)/kernels/rowmath.cuh

check_PROGRAMS += tests/gpu/test-kernels tests/gpu/test-cuda-engine
tests_gpu_test_kernels_SOURCES = tests/gpu/test-kernels.c
tests_gpu_test_kernels_CFLAGS = $(AM_CFLAGS) $(CUDA_CFLAGS) -I$(top_srcdir)/kernels
tests_gpu_test_kernels_LDADD = $(ENGINE_LIBS)
tests_gpu_test_cuda_engine_SOURCES = tests/gpu/test-cuda-engine.c
tests_gpu_test_cuda_engine_LDADD = $(ENGINE_LIBS)

# Each GPU test exits 77 without a device; the target then exits 77 too. The
# service test (a shell script: PostgreSQL, dsparkd and a cuda worker) also
# skips without PostgreSQL.
GPU_TESTS = tests/gpu/test-kernels$(EXEEXT) tests/gpu/test-cuda-engine$(EXEEXT)
GPU_SHELL_TESTS = tests/gpu/test-service-gpu.sh
check-gpu: $(GPU_TESTS) all
	@fail=0; skip=0; n=0; for t in $(GPU_TESTS) $(GPU_SHELL_TESTS); do \
	  n=$$((n + 1)); echo "== $$t"; \
	  case $$t in *.sh) $(TESTS_ENVIRONMENT) $(SHELL) $(srcdir)/$$t ;; *) ./$$t ;; esac; rc=$$?; \
	  if test $$rc -eq 77; then skip=$$((skip + 1)); elif test $$rc -ne 0; then fail=$$((fail + 1)); fi; \
	done; \
	if test $$fail -ne 0; then echo "check-gpu: $$fail test program(s) failed"; exit 1; fi; \
	if test $$skip -eq $$n; then echo "check-gpu: SKIP: no CUDA device"; exit 77; fi; \
	if test $$skip -ne 0; then echo "check-gpu: $$skip of $$n test program(s) skipped"; fi
else
# without CUDA, the backend's functions say so (ds_cuda_available() is false)
libdsengine_a_SOURCES += engine/forward-nocuda.c
check-gpu:
	@echo "check-gpu: SKIP: CUDA is not configured (run configure --with-cuda on a GPU host)"
endif
.PHONY: check-gpu
EXTRA_DIST += $(DS_KERNEL_SOURCES) kernels/kernels.h kernels/cluster.cuh kernels/pdl.cuh kernels/rowmath.cuh tests/gpu/test-kernels.c tests/gpu/test-cuda-engine.c \
	tests/gpu/README.md tests/gpu/test-service-gpu.sh

if HAVE_CUDA
noinst_PROGRAMS += bench/bench-gemm-cuda
bench_bench_gemm_cuda_SOURCES = bench/bench-gemm-cuda.c bench/bench-check.h
bench_bench_gemm_cuda_CFLAGS = $(AM_CFLAGS) $(CUDA_CFLAGS) -I$(top_srcdir)/kernels
bench_bench_gemm_cuda_LDADD = $(ENGINE_LIBS)
noinst_PROGRAMS += bench/bench-sample-cuda
bench_bench_sample_cuda_SOURCES = bench/bench-sample-cuda.c bench/bench-check.h
bench_bench_sample_cuda_CFLAGS = $(AM_CFLAGS) $(CUDA_CFLAGS) -I$(top_srcdir)/kernels
bench_bench_sample_cuda_LDADD = $(ENGINE_LIBS)
noinst_PROGRAMS += bench/bench-attention-cuda
bench_bench_attention_cuda_SOURCES = bench/bench-attention-cuda.c bench/bench-check.h
bench_bench_attention_cuda_CFLAGS = $(AM_CFLAGS) $(CUDA_CFLAGS) -I$(top_srcdir)/kernels
bench_bench_attention_cuda_LDADD = $(ENGINE_LIBS)
# a measurement of one-row decoding's products as one persistent kernel (nvcc-compiled, .cu.o above)
noinst_PROGRAMS += bench/bench-stream-cuda
bench_bench_stream_cuda_SOURCES = bench/bench-stream-cuda.cu
bench_bench_stream_cuda_LDADD = $(KERNELS_LIBS)
bench/bench-stream-cuda.$(OBJEXT): $(top_srcdir)/kernels/kernels.h
endif
EXTRA_DIST += bench/bench-gemm-cuda.c bench/bench-sample-cuda.c bench/bench-attention-cuda.c bench/bench-check.h \
	bench/bench-stream-cuda.cu
