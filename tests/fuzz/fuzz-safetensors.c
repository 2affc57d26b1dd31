/* fuzz-safetensors.c: libFuzzer target for the safetensors reader.
 *
 * Each input is parsed twice through ds_st_open_buffer: as it is, and as a
 * copy whose 8-byte header size is folded into the input's length (so that
 * most mutations reach the JSON parser instead of stopping at the size check).
 * On success the target checks the reader's invariants itself and converts
 * every element of every tensor, so that AddressSanitizer sees any read outside
 * the input; a broken invariant aborts. An error must come with a message. */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fail(const char *what)
{
    fprintf(stderr, "fuzz-safetensors: invariant broken: %s\n", what);
    abort();
}

static void check(const uint8_t *buf, size_t size)
{
    struct ds_st *st = NULL;
    int r = ds_st_open_buffer(buf, size, "fuzz.safetensors", &st);
    if (r < 0) {
        if (st)
            fail("out-parameter set on failure");
        if (!strstr(ds_errdetail(), "fuzz.safetensors"))
            fail("error message does not name the file");
        return;
    }
    if (!st)
        fail("no object on success");

    size_t n = ds_st_count(st);
    float out[64];
    for (size_t i = 0; i < n; i++) {
        const struct ds_tensor *t = ds_st_at(st, i);
        if (!t || !t->name || strcmp(t->file, "fuzz.safetensors") != 0)
            fail("tensor without name or file");
        const uint8_t *p = t->data;
        if (i > 0 && strcmp(ds_st_at(st, i - 1)->name, t->name) >= 0)
            fail("names not sorted and unique");
        if (ds_st_find(st, t->name) != t)
            fail("find does not return the tensor");
        if (p < buf + 8 || p > buf + size || t->nbytes > (size_t)(buf + size - p))
            fail("tensor data outside the buffer");
        if (t->numel < 0 || (uint64_t)t->numel * ds_dtype_size(t->dtype) != t->nbytes)
            fail("byte size does not match the shape");
        if (t->ndim < 0 || t->ndim > DS_ST_MAX_DIMS)
            fail("bad number of dimensions");
        int64_t numel = 1;
        int zero = 0, over = 0;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0)
                fail("negative dimension");
            zero |= t->shape[d] == 0;
            over |= __builtin_mul_overflow(numel, t->shape[d], &numel);
        }
        if (zero ? t->numel != 0 : over || numel != t->numel)
            fail("numel is not the product of the shape");
        for (size_t done = 0; done < (size_t)t->numel;) {
            size_t k = (size_t)t->numel - done < 64 ? (size_t)t->numel - done : 64;
            ds_tensor_to_f32(t, done, k, out);
            done += k;
        }
        const struct ds_tensor *g;
        if (ds_st_get(st, t->name, t->ndim, t->shape, &g) == 0 && g != t)
            fail("get returns another tensor");
    }
    for (size_t i = 0; i < n; i++) {
        const struct ds_tensor *a = ds_st_at(st, i);
        const uint8_t *pa = a->data;
        for (size_t j = i + 1; j < n && a->nbytes; j++) {
            const struct ds_tensor *b = ds_st_at(st, j);
            const uint8_t *pb = b->data;
            if (b->nbytes && pa < pb + b->nbytes && pb < pa + a->nbytes)
                fail("tensors overlap");
        }
    }
    st = ds_st_free(st);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check(data, size);

    if (size >= 8) {
        uint8_t *copy = malloc(size);
        uint64_t n = 0;
        if (!copy)
            return 0;
        memcpy(copy, data, size);
        for (int i = 7; i >= 0; i--)
            n = (n << 8) | copy[i];
        n %= (uint64_t)(size - 8) + 1;
        for (int i = 0; i < 8; i++)
            copy[i] = (uint8_t)(n >> (8 * i));
        check(copy, size);
        free(copy);
    }
    return 0;
}
