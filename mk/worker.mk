# mk/worker.mk: dspark-worker, the demo, and the end-to-end tests.

bin_PROGRAMS += dspark-worker
dspark_worker_SOURCES = worker/main.c worker/dbthread.c worker/job.c worker/worker.h
dspark_worker_CFLAGS = $(AM_CFLAGS) $(LIBPQ_CFLAGS) $(JANSSON_CFLAGS)
dspark_worker_LDADD = $(COMMON_LIBS) $(ENGINE_LIBS)

# End-to-end tests: a private PostgreSQL, dsparkd, real CPU workers on the
# small test model pair, ZeroMQ subscribers (tests/integration/e2e-lib.sh).
DS_E2E_TESTS = \
	tests/integration/test-e2e-events.sh \
	tests/integration/test-e2e-badinput.sh \
	tests/integration/test-e2e-scale.sh \
	tests/integration/test-e2e-faults.sh \
	tests/integration/test-e2e-transitions.sh \
	tests/integration/test-e2e-turns.sh \
	tests/integration/test-pgbouncer.sh
TESTS += $(DS_E2E_TESTS)
EXTRA_DIST += $(DS_E2E_TESTS) tests/integration/e2e-lib.sh scripts/demo.sh
