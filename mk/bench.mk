# mk/bench.mk: rules for bench (fragment of Makefile.am).
