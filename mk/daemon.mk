# mk/daemon.mk: rules for dsparkd, common service code, systemd units and man pages.

# Common service code: logging, configuration, service manager notifications,
# the msgpack event format and the ZeroMQ event channel.
libdscommon_a_SOURCES += \
	common/log.c common/cfg.c common/wire.c common/sdnotify.c common/events.c \
	include/dspark/ds-log.h include/dspark/ds-cfg.h include/dspark/ds-wire.h \
	include/dspark/ds-notify.h include/dspark/ds-events.h

# dsparkd, the per-host daemon.
bin_PROGRAMS += dsparkd
dsparkd_SOURCES = daemon/main.c daemon/fanout.c daemon/supervise.c daemon/metrics.c daemon/dsparkd.h
dsparkd_CPPFLAGS = $(AM_CPPFLAGS) -DDS_SYSCONFDIR='"$(sysconfdir)"' -DDS_BINDIR='"$(bindir)"'
dsparkd_CFLAGS = $(AM_CFLAGS) $(LIBPQ_CFLAGS) $(LIBZMQ_CFLAGS)
dsparkd_LDADD = $(COMMON_LIBS)

# Unit tests of the common code.
check_PROGRAMS += tests/unit/test-wire tests/unit/test-cfg tests/unit/test-events
TESTS += tests/unit/test-wire tests/unit/test-cfg tests/unit/test-events
tests_unit_test_wire_SOURCES = tests/unit/test-wire.c
tests_unit_test_wire_CFLAGS = $(TEST_CFLAGS) $(MSGPACK_CFLAGS)
tests_unit_test_wire_LDADD = $(COMMON_LIBS) $(TEST_LIBS)
tests_unit_test_cfg_SOURCES = tests/unit/test-cfg.c
tests_unit_test_cfg_CFLAGS = $(TEST_CFLAGS)
tests_unit_test_cfg_LDADD = $(COMMON_LIBS) $(TEST_LIBS)
tests_unit_test_events_SOURCES = tests/unit/test-events.c
tests_unit_test_events_CFLAGS = $(TEST_CFLAGS) $(LIBZMQ_CFLAGS)
tests_unit_test_events_LDADD = $(COMMON_LIBS) $(TEST_LIBS)

# Integration tests of dsparkd against a private PostgreSQL, real ZeroMQ
# sockets and a notification socket, with helper programs.
DS_DAEMON_TESTS = \
	tests/integration/test-daemon-events.sh \
	tests/integration/test-daemon-connect.sh \
	tests/integration/test-daemon-notify.sh \
	tests/integration/test-daemon-units.sh \
	tests/integration/test-daemon-docs.sh
TESTS += $(DS_DAEMON_TESTS)
EXTRA_DIST += $(DS_DAEMON_TESTS) tests/integration/fake-worker.sh
# (test-daemon-sub and test-daemon-notify-recv are helpers the scripts run, not tests)
check_PROGRAMS += tests/integration/test-daemon-sub tests/integration/test-daemon-notify-recv
tests_integration_test_daemon_sub_SOURCES = tests/integration/test-daemon-sub.c
tests_integration_test_daemon_sub_CFLAGS = $(AM_CFLAGS) $(LIBPQ_CFLAGS)
tests_integration_test_daemon_sub_LDADD = $(COMMON_LIBS)
tests_integration_test_daemon_notify_recv_SOURCES = tests/integration/test-daemon-notify-recv.c
# the tests need the units generated
check_DATA = $(DS_SYSTEMD_GENERATED)

# systemd units (bindir substituted), sysusers.d and tmpfiles.d, the example
# configuration. The unit directory comes from configure (pkg-config systemd);
# the others are relative to the prefix, where systemd also looks
# (/usr/lib/sysusers.d, /usr/local/lib/sysusers.d ...).
DS_SYSTEMD_GENERATED = systemd/dsparkd.service systemd/dspark-worker@.service \
	systemd/sysusers.d/dspark.conf systemd/tmpfiles.d/dspark.conf
systemdsystemunit_DATA = systemd/dsparkd.service systemd/dspark-worker@.service
dssysusersdir = $(prefix)/lib/sysusers.d
dssysusers_DATA = systemd/sysusers.d/dspark.conf
dstmpfilesdir = $(prefix)/lib/tmpfiles.d
dstmpfiles_DATA = systemd/tmpfiles.d/dspark.conf
dsexampledir = $(docdir)/examples
dist_dsexample_DATA = systemd/dspark.conf.example
EXTRA_DIST += systemd/dsparkd.service.in systemd/dspark-worker@.service.in \
	systemd/dspark.sysusers systemd/dspark.tmpfiles.in
CLEANFILES += $(DS_SYSTEMD_GENERATED)
# distcheck installs as a normal user under its own prefix
AM_DISTCHECK_CONFIGURE_FLAGS = systemdsystemunitdir='$${dc_install_base}/lib/systemd/system'

ds_subst_units = sed -e 's|@bindir[@]|$(bindir)|g' -e 's|@sysconfdir[@]|$(sysconfdir)|g'
systemd/dsparkd.service: $(srcdir)/systemd/dsparkd.service.in Makefile
	$(AM_V_GEN)$(MKDIR_P) systemd && $(ds_subst_units) $(srcdir)/systemd/dsparkd.service.in >$@-t && mv -f $@-t $@
systemd/dspark-worker@.service: $(srcdir)/systemd/dspark-worker@.service.in Makefile
	$(AM_V_GEN)$(MKDIR_P) systemd && $(ds_subst_units) $(srcdir)/systemd/dspark-worker@.service.in >$@-t && \
	mv -f $@-t $@
systemd/sysusers.d/dspark.conf: $(srcdir)/systemd/dspark.sysusers
	$(AM_V_GEN)$(MKDIR_P) systemd/sysusers.d && cp $(srcdir)/systemd/dspark.sysusers $@
systemd/tmpfiles.d/dspark.conf: $(srcdir)/systemd/dspark.tmpfiles.in Makefile
	$(AM_V_GEN)$(MKDIR_P) systemd/tmpfiles.d && $(ds_subst_units) $(srcdir)/systemd/dspark.tmpfiles.in >$@-t && \
	mv -f $@-t $@

# Manual pages: written in markdown (man/*.md), converted with pandoc, and the
# generated pages are committed and shipped, so neither users nor 'make' need
# pandoc. After editing a page, run 'make update-man' (needs pandoc) and commit
# both files; test-daemon-docs.sh fails while a generated page is stale.
DS_MAN_MARKDOWN = man/dsparkd.8.md man/dspark-worker.8.md man/dspark.conf.5.md man/dspark.7.md
dist_man_MANS += man/dsparkd.8 man/dspark-worker.8 man/dspark.conf.5 man/dspark.7
EXTRA_DIST += $(DS_MAN_MARKDOWN)
PANDOC = pandoc
DS_PANDOC_FLAGS = -s -f markdown -t man
update-man:
	@command -v $(PANDOC) >/dev/null 2>&1 || { echo "update-man: '$(PANDOC)' not found" >&2; exit 1; }
	@for md in $(srcdir)/man/*.md; do \
	  out=`echo "$$md" | sed 's/\.md$$//'`; \
	  echo "  PANDOC   $$out"; \
	  $(PANDOC) $(DS_PANDOC_FLAGS) "$$md" -o "$$out-t" && mv -f "$$out-t" "$$out" || exit 1; \
	done
.PHONY: update-man
