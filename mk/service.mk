# mk/service.mk: SQL migrations, libdscommon.a, dsparkctl and the integration tests.
