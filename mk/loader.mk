# mk/loader.mk: rules for loader (fragment of Makefile.am).
