/* err.c: thread-local error detail and aborting allocators (see ds-err.h). */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-err.h"

#define DS_ERRDETAIL_MAX 1024

static _Thread_local char errdetail[DS_ERRDETAIL_MAX];

int ds_seterr(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errdetail, sizeof errdetail, fmt, ap);
    va_end(ap);
    return code > 0 ? -code : code;
}

int ds_prefixerr(int err, const char *fmt, ...)
{
    char old[DS_ERRDETAIL_MAX];
    memcpy(old, errdetail, sizeof old);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(errdetail, sizeof errdetail, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n + 2 < sizeof errdetail) {
        size_t room = sizeof errdetail - (size_t)n;
        errdetail[n] = ':';
        errdetail[n + 1] = ' ';
        size_t len = strnlen(old, sizeof old - 1);
        if (len > room - 3)
            len = room - 3;
        memcpy(errdetail + n + 2, old, len);
        errdetail[n + 2 + len] = 0;
    }
    return err;
}

const char *ds_errdetail(void)
{
    return errdetail[0] ? errdetail : "no error detail";
}

const char *ds_strerror(int err)
{
    switch (err < 0 ? -err : err) {
    case DS_OK: return "success";
    case DS_ENOMEM: return "out of memory";
    case DS_EIO: return "input/output error";
    case DS_EFORMAT: return "malformed input";
    case DS_EINVAL: return "invalid argument";
    case DS_ECONFIG: return "invalid configuration";
    case DS_ELIMIT: return "limit exceeded";
    case DS_ECUDA: return "CUDA error";
    case DS_ECUBLAS: return "cuBLAS error";
    case DS_EDB: return "database error";
    case DS_ECANCELED: return "canceled";
    case DS_ENOTSUP: return "not supported";
    default: return "unknown error";
    }
}

static void *oom(size_t n)
{
    fprintf(stderr, "<2>out of memory (requested %zu bytes)\n", n);
    abort();
}

void *ds_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    return p ? p : oom(n);
}

void *ds_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    return p ? p : oom(n * size);
}

void *ds_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    return q ? q : oom(n);
}

char *ds_xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    return memcpy(ds_xmalloc(n), s, n);
}
