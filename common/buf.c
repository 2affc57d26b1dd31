/* buf.c: the growing byte buffer of ds-buf.h. */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-buf.h"
#include "dspark/ds-err.h"

/* Room for n more bytes and the NUL after them. */
static void reserve(struct ds_buf *b, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        b->data = ds_xrealloc(b->data, cap);
        b->cap = cap;
    }
}

void ds_buf_put(struct ds_buf *b, const char *s, size_t n)
{
    reserve(b, n);
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

void ds_buf_puts(struct ds_buf *b, const char *s)
{
    ds_buf_put(b, s, strlen(s));
}

void ds_buf_printf(struct ds_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void ds_buf_free(struct ds_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}
