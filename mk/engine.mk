# mk/engine.mk: libdsengine.a, the inference engine (no service dependencies).
# Other fragments add their own engine sources with libdsengine_a_SOURCES +=.
noinst_LIBRARIES += libdsengine.a
libdsengine_a_SOURCES = \
	engine/err.c \
	engine/threadpool.c \
	engine/gemm.c \
	engine/kv.c \
	engine/model.c \
	engine/forward-cpu.c \
	engine/sampler.c \
	engine/engine.c \
	engine/engine-impl.h \
	engine/spec.c \
	engine/sched.c \
	engine/draft.c \
	engine/draft-impl.h \
	engine/draft-ops.h \
	engine/load-util.h
libdsengine_a_CFLAGS = $(AM_CFLAGS) -O3 $(JANSSON_CFLAGS) $(PCRE2_CFLAGS) $(UTF8PROC_CFLAGS) $(OPENBLAS_CFLAGS)

# What a program that uses the engine links with.
ENGINE_LIBS = libdsengine.a $(JANSSON_LIBS) $(PCRE2_LIBS) $(UTF8PROC_LIBS) $(OPENBLAS_LIBS) -lm

check_PROGRAMS += tests/unit/test-gemm
TESTS += tests/unit/test-gemm
tests_unit_test_gemm_SOURCES = tests/unit/test-gemm.c
tests_unit_test_gemm_CFLAGS = $(TEST_CFLAGS)
tests_unit_test_gemm_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)

check_PROGRAMS += tests/unit/test-sampler
TESTS += tests/unit/test-sampler
tests_unit_test_sampler_SOURCES = tests/unit/test-sampler.c
tests_unit_test_sampler_CFLAGS = $(TEST_CFLAGS)
tests_unit_test_sampler_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)

check_PROGRAMS += tests/engine/test-qwen3
TESTS += tests/engine/test-qwen3
tests_engine_test_qwen3_SOURCES = tests/engine/test-qwen3.c
tests_engine_test_qwen3_CFLAGS = $(TEST_CFLAGS) $(JANSSON_CFLAGS)
tests_engine_test_qwen3_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)

EXTRA_DIST += tests/data/models tests/data/drafts tools/reference

check_PROGRAMS += tests/engine/test-draft
TESTS += tests/engine/test-draft
tests_engine_test_draft_SOURCES = tests/engine/test-draft.c
tests_engine_test_draft_CFLAGS = $(TEST_CFLAGS) $(JANSSON_CFLAGS)
tests_engine_test_draft_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)

check_PROGRAMS += tests/engine/test-spec
TESTS += tests/engine/test-spec
tests_engine_test_spec_SOURCES = tests/engine/test-spec.c
tests_engine_test_spec_CFLAGS = $(TEST_CFLAGS)
tests_engine_test_spec_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)
EXTRA_DIST += include/dspark
