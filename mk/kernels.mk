# mk/kernels.mk: CUDA kernels (built only with --with-cuda), compiled by nvcc,
# and their GPU test. The test is not in TESTS (CI has no GPU): run it with
# `make check-gpu` on a GPU host.
DS_KERNEL_SOURCES = kernels/rowwise.cu kernels/attention.cu
if HAVE_CUDA
noinst_LIBRARIES += libdskernels.a
libdskernels_a_SOURCES = $(DS_KERNEL_SOURCES) kernels/kernels.h
libdskernels_a_LIBADD =
# nvcc's host code needs the C++ runtime (static guards, the personality routine)
KERNELS_LIBS = libdskernels.a $(CUDA_LIBS) -lstdc++
SUFFIXES = .cu
.cu.o:
	$(AM_V_CC)$(NVCC) $(NVCCFLAGS) -Xcompiler -Wall -I$(top_srcdir)/include -I$(top_srcdir)/kernels -I$(top_builddir) -c -o $@ $<
$(libdskernels_a_OBJECTS): $(top_srcdir)/kernels/kernels.h

check_PROGRAMS += tests/gpu/test-kernels
tests_gpu_test_kernels_SOURCES = tests/gpu/test-kernels.c
tests_gpu_test_kernels_CFLAGS = $(AM_CFLAGS) $(CUDA_CFLAGS) -I$(top_srcdir)/kernels
tests_gpu_test_kernels_LDADD = $(KERNELS_LIBS) $(ENGINE_LIBS)

check-gpu: tests/gpu/test-kernels$(EXEEXT)
	./tests/gpu/test-kernels$(EXEEXT)
else
check-gpu:
	@echo "check-gpu: SKIP: CUDA is not configured (run configure --with-cuda on a GPU host)"
endif
.PHONY: check-gpu
EXTRA_DIST += $(DS_KERNEL_SOURCES) kernels/kernels.h tests/gpu/test-kernels.c tests/gpu/README.md
