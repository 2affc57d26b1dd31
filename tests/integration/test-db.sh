#!/bin/sh
# test-db.sh: run the C tests of common/db.c (tests/integration/test-db)
# against a private PostgreSQL; they restart and stop that server themselves.
. "${DS_SRCDIR:-$(dirname "$0")/../..}/tests/integration/pg-harness.sh"
prog="$DS_BUILDDIR/tests/integration/test-db"
[ -x "$prog" ] || tap_skip_all "$prog not built"
pg_harness_start
"$prog"
