/* testutil.c: helpers for the C tests (see testutil.h). */
#include "config.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

const char *ds_test_path(const char *rel)
{
    static _Thread_local char buf[8][4096];
    static _Thread_local int slot;
    const char *src = getenv("DS_SRCDIR");
    char *b = buf[slot++ % 8];
    snprintf(b, sizeof buf[0], "%s/%s", src && *src ? src : DS_SRCDIR, rel);
    return b;
}

char *ds_test_tmpdir(void)
{
    const char *t = getenv("TMPDIR");
    char tmpl[4096];
    snprintf(tmpl, sizeof tmpl, "%s/dspark-test-XXXXXX", t && *t ? t : "/tmp");
    char *d = mkdtemp(tmpl);
    return d ? strdup(d) : NULL;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    return remove(p);
}

void ds_test_rmtree(const char *dir)
{
    if (dir)
        nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

char *ds_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = 0;
        if (len)
            *len = (size_t)n;
    }
    return buf;
}

int ds_test_write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(data, 1, len, f);
    return fclose(f) == 0 && w == len ? 0 : -1;
}

void ds_test_skip_all(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("1..0 # SKIP %s\n", msg);
    fprintf(stderr, "SKIPPED: %s\n", msg);
    exit(0);
}

const char *ds_test_qwen3_tokenizer(void)
{
    static char buf[4096];
    const char *e = getenv("DS_QWEN3_TOKENIZER");
    if (e && *e)
        return access(e, R_OK) == 0 ? e : NULL;
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (xdg && *xdg)
        snprintf(buf, sizeof buf, "%s/dspark/qwen3/tokenizer.json", xdg);
    else
        snprintf(buf, sizeof buf, "%s/.cache/dspark/qwen3/tokenizer.json", home ? home : "/root");
    return access(buf, R_OK) == 0 ? buf : NULL;
}
