# mk/tokenizer.mk: the tokenizer (byte-level BPE, chat rendering), its CLI,
# tests, fixtures and benchmark (fragment of Makefile.am).
libdsengine_a_SOURCES += engine/tokenizer.c engine/chat.c

bin_PROGRAMS += cli/dspark-tokenize
cli_dspark_tokenize_SOURCES = cli/dspark-tokenize.c
cli_dspark_tokenize_CFLAGS = $(AM_CFLAGS) $(JANSSON_CFLAGS)
cli_dspark_tokenize_LDADD = $(ENGINE_LIBS)
# dspark-tokenize(1): markdown source and the generated page (see update-man in
# mk/daemon.mk).
dist_man_MANS += man/dspark-tokenize.1
EXTRA_DIST += man/dspark-tokenize.1.md
TESTS += tests/engine/test-tokenize-cli.sh
EXTRA_DIST += tests/engine/test-tokenize-cli.sh tests/engine/cli-tap.sh

# test-tokenizer: everything but the reference fixture; test-tokenizer-reference:
# ids against the Hugging Face `tokenizers` fixture (skipped while it is absent).
check_PROGRAMS += tests/unit/test-tokenizer tests/unit/test-tokenizer-reference
TESTS += tests/unit/test-tokenizer tests/unit/test-tokenizer-reference
tests_unit_test_tokenizer_SOURCES = tests/unit/test-tokenizer.c
tests_unit_test_tokenizer_CFLAGS = $(TEST_CFLAGS) $(JANSSON_CFLAGS) $(UTF8PROC_CFLAGS)
tests_unit_test_tokenizer_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)
tests_unit_test_tokenizer_reference_SOURCES = tests/unit/test-tokenizer.c
tests_unit_test_tokenizer_reference_CFLAGS = $(TEST_CFLAGS) $(JANSSON_CFLAGS) $(UTF8PROC_CFLAGS) -DDS_TEST_REFERENCE
tests_unit_test_tokenizer_reference_LDADD = $(ENGINE_LIBS) $(TEST_LIBS)

# A benchmark, not a test (bench/tokenizer.sh runs it).
noinst_PROGRAMS += bench/bench-tokenizer
bench_bench_tokenizer_SOURCES = bench/bench-tokenizer.c
bench_bench_tokenizer_CFLAGS = $(AM_CFLAGS) $(JANSSON_CFLAGS)
bench_bench_tokenizer_LDADD = $(ENGINE_LIBS)

EXTRA_DIST += \
	tests/data/tokenizer/hard-strings.jsonl \
	tests/data/tokenizer/README.md \
	tools/fixtures/make_hard_strings.py \
	tools/fixtures/tokenizer_reference.py \
	bench/bench_tokenizer_hf.py \
	bench/tokenizer.sh \
	tests/data/tokenizer/qwen3-reference.jsonl.xz
