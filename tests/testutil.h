/* testutil.h: small helpers shared by the C tests (cmocka, TAP output).
 * Include after <cmocka.h>'s prerequisites; see tests/testutil.c. */
#ifndef DS_TESTUTIL_H
#define DS_TESTUTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

/* Absolute path of a file under the source tree: ds_test_path("tests/data/x"). Static buffer per call slot. */
const char *ds_test_path(const char *rel);
/* A fresh temporary directory (removed by the caller with ds_test_rmtree). */
char *ds_test_tmpdir(void);
void ds_test_rmtree(const char *dir);
/* Read a whole file; NULL on failure. *len gets the size. Caller frees. */
char *ds_test_read_file(const char *path, size_t *len);
/* Write a whole file; 0 or -1. */
int ds_test_write_file(const char *path, const void *data, size_t len);
/* Print a TAP "skip everything" plan and exit 0: the run counts as skipped, loudly. */
void ds_test_skip_all(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
/* Path of the real Qwen3 tokenizer.json fetched by setup.sh ($DS_QWEN3_TOKENIZER
 * overrides), or NULL when absent. */
const char *ds_test_qwen3_tokenizer(void);

/* The next of a xorshift64 stream (state nonzero): a float uniform in [-1, 1). */
float ds_test_frand(uint64_t *state);

/* Write a random-weight f32 Qwen3 directory (config.json, generation_config.json,
 * model.safetensors) with tied embeddings; 0 or -1. */
struct ds_test_shape {
    int vocab, hidden, inter, layers, heads, kv_heads, head_dim;
};
int ds_test_write_random_qwen3(const char *dir, const struct ds_test_shape *s, unsigned seed);

#endif
