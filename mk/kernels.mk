# mk/kernels.mk: CUDA kernels (built only with --with-cuda), compiled by nvcc.
if HAVE_CUDA
noinst_LIBRARIES += libdskernels.a
libdskernels_a_SOURCES = kernels/smoke.cu
libdskernels_a_LIBADD =
KERNELS_LIBS = libdskernels.a $(CUDA_LIBS)
SUFFIXES = .cu
.cu.o:
	$(AM_V_CC)$(NVCC) $(NVCCFLAGS) -I$(top_srcdir)/include -I$(top_builddir) -c -o $@ $<
endif
EXTRA_DIST += kernels/smoke.cu
