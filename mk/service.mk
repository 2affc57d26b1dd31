# mk/service.mk: rules for service (fragment of Makefile.am).
