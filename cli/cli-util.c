/* cli-util.c: option parsing, error reporting and JSON text helpers for the tools. */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dspark/ds-err.h"
#include "cli-util.h"

int ds_cli_int(const char *opt, const char *val, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(val, &end, 10);
    if (end == val || *end || errno || v < min || v > max) {
        fprintf(stderr, "invalid value '%s' for %s: expected an integer in %ld..%ld\n", val, opt, min, max);
        exit(2);
    }
    return (int)v;
}

double ds_cli_double(const char *opt, const char *val, double min, double max)
{
    char *end;
    errno = 0;
    double v = strtod(val, &end);
    if (end == val || *end || errno || !isfinite(v) || v < min || v > max) {
        fprintf(stderr, "invalid value '%s' for %s: expected a number in %g..%g\n", val, opt, min, max);
        exit(2);
    }
    return v;
}

unsigned long long ds_cli_u64(const char *opt, const char *val)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(val, &end, 10);
    if (val[0] < '0' || val[0] > '9' || *end || errno) {   /* (strtoull would take a sign) */
        fprintf(stderr, "invalid value '%s' for %s: expected an integer in 0..18446744073709551615\n", val, opt);
        exit(2);
    }
    return v;
}

int ds_cli_fail(const char *prog)
{
    fprintf(stderr, "%s: %s\n", prog, ds_errdetail());
    return 1;
}

double ds_cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 if invalid. */
static int utf8_len(const unsigned char *s, size_t left)
{
    unsigned char c = s[0];
    int n;
    unsigned min;
    unsigned cp;
    if (c < 0x80)
        return 1;
    if ((c & 0xE0) == 0xC0) { n = 2; cp = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { n = 3; cp = c & 0x0F; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { n = 4; cp = c & 0x07; min = 0x10000; }
    else return 0;
    if ((size_t)n > left)
        return 0;
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

json_t *ds_json_text(const char *s, size_t len)
{
    char *buf = ds_xmalloc(len * 3 + 1);
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        int n = utf8_len((const unsigned char *)s + i, len - i);
        if (n == 0) {
            memcpy(buf + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        } else {
            memcpy(buf + o, s + i, (size_t)n);
            o += (size_t)n;
            i += (size_t)n;
        }
    }
    json_t *j = json_stringn(buf, o);
    free(buf);
    return j;
}
