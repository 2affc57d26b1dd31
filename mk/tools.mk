# mk/tools.mk: the engine's command-line tools.
bin_PROGRAMS += dspark-generate
dspark_generate_SOURCES = cli/dspark-generate.c cli/cli-util.c cli/cli-util.h
dspark_generate_CFLAGS = $(AM_CFLAGS) $(JANSSON_CFLAGS)
dspark_generate_LDADD = $(ENGINE_LIBS)
# dspark-generate(1): markdown source and the generated page (see update-man in
# mk/daemon.mk).
dist_man_MANS += man/dspark-generate.1
EXTRA_DIST += man/dspark-generate.1.md

EXTRA_DIST += models examples scripts/build.sh scripts/check.sh scripts/generate-demo.sh tools/train \
	tools/calibration-study.py tools/code-prompts.py tools/reliability-plot.py

bin_PROGRAMS += dspark-calibrate
dspark_calibrate_SOURCES = cli/dspark-calibrate.c
dspark_calibrate_CFLAGS = $(AM_CFLAGS) $(JANSSON_CFLAGS)
dspark_calibrate_LDADD = $(JANSSON_LIBS) -lm
dist_man_MANS += man/dspark-calibrate.1
EXTRA_DIST += man/dspark-calibrate.1.md
TESTS += tests/engine/test-calibrate.sh
EXTRA_DIST += tests/engine/test-calibrate.sh
TESTS += tests/engine/test-generate-cli.sh
EXTRA_DIST += tests/engine/test-generate-cli.sh
