# mk/engine.mk: libdsengine.a, the inference engine (no service dependencies).
# Other fragments add their own engine sources with libdsengine_a_SOURCES +=.
noinst_LIBRARIES += libdsengine.a
libdsengine_a_SOURCES = \
	engine/err.c
libdsengine_a_CFLAGS = $(AM_CFLAGS) $(JANSSON_CFLAGS) $(PCRE2_CFLAGS) $(UTF8PROC_CFLAGS) $(OPENBLAS_CFLAGS)

# What a program that uses the engine links with.
ENGINE_LIBS = libdsengine.a $(JANSSON_LIBS) $(PCRE2_LIBS) $(UTF8PROC_LIBS) $(OPENBLAS_LIBS) -lm
