/* buf.c: the growing byte buffer of ds-buf.h. */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "dspark/ds-buf.h"
#include "dspark/ds-err.h"

void ds_buf_put(struct ds_buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        b->data = ds_xrealloc(b->data, cap);
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

void ds_buf_puts(struct ds_buf *b, const char *s)
{
    ds_buf_put(b, s, strlen(s));
}

void ds_buf_free(struct ds_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}
