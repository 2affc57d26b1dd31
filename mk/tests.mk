# mk/tests.mk: the shared test helper library, and the engine tests.
check_LIBRARIES = libdstestutil.a
libdstestutil_a_SOURCES = tests/testutil.c tests/testutil.h
libdstestutil_a_CFLAGS = $(AM_CFLAGS) $(CMOCKA_CFLAGS)
# What a cmocka test links with (add ENGINE_LIBS or others as needed).
TEST_LIBS = libdstestutil.a $(CMOCKA_LIBS)
TEST_CFLAGS = $(AM_CFLAGS) $(CMOCKA_CFLAGS) -I$(top_srcdir)/tests
