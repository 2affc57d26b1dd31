# mk/loader.mk: safetensors and config loading (engine), their tests and the fuzz target.
libdsengine_a_SOURCES += engine/safetensors.c engine/config.c

check_PROGRAMS += tests/unit/test-safetensors tests/unit/test-config tests/fuzz/fuzz-replay
TESTS += tests/unit/test-safetensors tests/unit/test-config tests/fuzz/fuzz-replay \
	tests/fuzz/fuzz-smoke.sh

tests_unit_test_safetensors_SOURCES = tests/unit/test-safetensors.c
tests_unit_test_safetensors_CFLAGS = $(TEST_CFLAGS) $(JANSSON_CFLAGS)
tests_unit_test_safetensors_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)

tests_unit_test_config_SOURCES = tests/unit/test-config.c
tests_unit_test_config_CFLAGS = $(TEST_CFLAGS) $(JANSSON_CFLAGS)
tests_unit_test_config_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)

# Replays the seed corpus through the fuzz target without libFuzzer.
tests_fuzz_fuzz_replay_SOURCES = tests/fuzz/fuzz-replay.c tests/fuzz/fuzz-safetensors.c
tests_fuzz_fuzz_replay_CFLAGS = $(TEST_CFLAGS)
tests_fuzz_fuzz_replay_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)

# The libFuzzer binary proper (configure --enable-fuzz CC=clang). Run it on a
# scratch copy of tests/fuzz/corpus: libFuzzer adds what it finds to the first
# directory it is given. fuzz-smoke.sh (run by make check) builds its own copy.
if ENABLE_FUZZ
FUZZ_FLAGS = -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -g -O1
noinst_PROGRAMS += tests/fuzz/fuzz-safetensors
tests_fuzz_fuzz_safetensors_SOURCES = tests/fuzz/fuzz-safetensors.c engine/safetensors.c engine/err.c
tests_fuzz_fuzz_safetensors_CFLAGS = $(AM_CFLAGS) $(JANSSON_CFLAGS) $(FUZZ_FLAGS)
tests_fuzz_fuzz_safetensors_LDFLAGS = $(FUZZ_FLAGS)
tests_fuzz_fuzz_safetensors_LDADD = $(JANSSON_LIBS) -lm
endif

EXTRA_DIST += tests/fuzz/fuzz-smoke.sh tests/fuzz/corpus
