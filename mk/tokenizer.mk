# mk/tokenizer.mk: rules for tokenizer (fragment of Makefile.am).
