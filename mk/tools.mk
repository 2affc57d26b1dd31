# mk/tools.mk: rules for tools (fragment of Makefile.am).
