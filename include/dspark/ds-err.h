/* ds-err.h: error codes and the thread-local detail string that travels with them.
 *
 * Fallible functions return 0 or a negative DS_E* code. The function that fails
 * first records a one-line message (PostgreSQL style: lower case, values in
 * quotes) with ds_seterr(); callers may prefix context with ds_prefixerr(); the
 * program logs ds_errdetail() once. The engine never logs by itself. */
#ifndef DS_ERR_H
#define DS_ERR_H

#include <stddef.h>

enum ds_err {
    DS_OK = 0,
    DS_ENOMEM = 1,   /* out of memory */
    DS_EIO = 2,      /* a system call on a file or socket failed */
    DS_EFORMAT = 3,  /* malformed input file (JSON, safetensors, checkpoint) */
    DS_EINVAL = 4,   /* bad argument or request */
    DS_ECONFIG = 5,  /* bad configuration value */
    DS_ELIMIT = 6,   /* a size or capacity limit was reached */
    DS_ECUDA = 7,    /* CUDA runtime error */
    DS_ECUBLAS = 8,  /* cuBLAS error */
    DS_EDB = 9,      /* database error */
    DS_ECANCELED = 10,
    DS_ENOTSUP = 11, /* valid but not supported by this build */
};

#if defined(__GNUC__)
#define DS_MUSTCHECK __attribute__((warn_unused_result))
#define DS_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define DS_MUSTCHECK
#define DS_PRINTF(a, b)
#endif

/* Record the detail message for this thread and return -code. */
int ds_seterr(int code, const char *fmt, ...) DS_PRINTF(2, 3);
/* Prefix the current detail with "ctx: " and return err unchanged (err < 0). */
int ds_prefixerr(int err, const char *fmt, ...) DS_PRINTF(2, 3);
/* The detail of the last error recorded on this thread (borrowed, never NULL). */
const char *ds_errdetail(void);
/* A short name for a DS_E* code, positive or negative ("out of memory"). */
const char *ds_strerror(int err);

/* Allocation that aborts on failure, for small bookkeeping objects only;
 * weights and caches use plain malloc and report DS_ENOMEM. */
void *ds_xmalloc(size_t n);
void *ds_xcalloc(size_t n, size_t size);
void *ds_xrealloc(void *p, size_t n);
char *ds_xstrdup(const char *s);

#endif
