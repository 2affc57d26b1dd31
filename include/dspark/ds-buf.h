/* ds-buf.h: a growing byte buffer, always NUL-terminated after its data (for
 * building SQL text, COPY rows and array literals). Zero-initialize, append,
 * free; allocation failure aborts (ds_xrealloc), as for bookkeeping objects. */
#ifndef DS_BUF_H
#define DS_BUF_H

#include <stddef.h>

struct ds_buf {
    char *data;     /* [cap], NULL until the first append */
    size_t len, cap;
};

void ds_buf_put(struct ds_buf *b, const char *s, size_t n);
void ds_buf_puts(struct ds_buf *b, const char *s);
/* Append printf-formatted text. */
void ds_buf_printf(struct ds_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Free the data and reset the buffer to empty. */
void ds_buf_free(struct ds_buf *b);

#endif
