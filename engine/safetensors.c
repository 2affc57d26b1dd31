/* safetensors.c: read-only, mmap'ed safetensors checkpoints (see ds-safetensors.h).
 *
 * A file image is validated completely before anything is returned: the header
 * size, UTF-8 and JSON syntax of the header, every tensor entry (dtype, shape,
 * offsets, byte size), the tensors' layout (no overlap, no gap, nothing after
 * them), and duplicate names, within a file and across the shards of a set.
 * Once a ds_st exists, these hold:
 *   - every tensor's [data, data + nbytes) lies inside its file's data buffer;
 *   - nbytes == numel * ds_dtype_size(dtype), numel == prod(shape);
 *   - a file's non-empty tensors cover its data buffer exactly, without overlap;
 *   - names are unique and the tensors are sorted by name (strcmp order), which
 *     is the ds_st_at order and what ds_st_find searches.
 * Data may be unaligned (the format aligns only by convention), so element
 * loads go through memcpy. Nothing is written after opening, so concurrent
 * readers need no locking. */
#include "config.h"

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "dspark/ds-safetensors.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader assumes a little-endian host"
#endif

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"

struct st_map {
    void *addr;
    size_t len;
};

struct ds_st {
    char *source;               /* named in messages: the file, or the index of a set */
    struct ds_tensor *tensors;  /* [n], sorted by name; names owned here */
    size_t n;
    char **files;               /* [nfiles] paths that tensors[i].file points to */
    size_t nfiles;
    struct st_map *maps;        /* [nmaps] mappings to unmap on free */
    size_t nmaps;
};

static const struct {
    const char *name;
    size_t size;
} dtypes[DS_DTYPE_COUNT] = {
    [DS_DTYPE_F32] = { "F32", 4 },
    [DS_DTYPE_F16] = { "F16", 2 },
    [DS_DTYPE_BF16] = { "BF16", 2 },
    [DS_DTYPE_F64] = { "F64", 8 },
    [DS_DTYPE_I64] = { "I64", 8 },
    [DS_DTYPE_I32] = { "I32", 4 },
    [DS_DTYPE_I16] = { "I16", 2 },
    [DS_DTYPE_I8] = { "I8", 1 },
    [DS_DTYPE_U8] = { "U8", 1 },
    [DS_DTYPE_BOOL] = { "BOOL", 1 },
    [DS_DTYPE_F8_E4M3] = { "F8_E4M3", 1 },
    [DS_DTYPE_F8_E5M2] = { "F8_E5M2", 1 },
};

const char *ds_dtype_name(enum ds_dtype dt)
{
    return (unsigned)dt < DS_DTYPE_COUNT ? dtypes[dt].name : "unknown";
}

size_t ds_dtype_size(enum ds_dtype dt)
{
    return (unsigned)dt < DS_DTYPE_COUNT ? dtypes[dt].size : 0;
}

/* ------------------------------------------------------------------------ */
/* Scalar conversions                                                         */

static float f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

float ds_bf16_to_f32(uint16_t h)
{
    return f32_from_bits((uint32_t)h << 16);
}

float ds_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;

    if (exp == 0x1f)                       /* inf, or NaN keeping its payload */
        return f32_from_bits(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0)
            return f32_from_bits(sign);
        /* subnormal: mant * 2^-24; shift the leading one up to bit 10 */
        uint32_t e = 127 - 15 + 1;
        while (!(mant & 0x400)) {
            mant <<= 1;
            e--;
        }
        return f32_from_bits(sign | (e << 23) | ((mant & 0x3ff) << 13));
    }
    return f32_from_bits(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

uint16_t ds_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if (isnan(f))
        return 0x7fc0;                     /* the canonical NaN, as torch writes it */
    /* round to nearest, ties to even: add 0x7fff plus the lowest kept bit */
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static float f8_e4m3_to_f32(uint8_t b)
{
    int exp = (b >> 3) & 0xf, mant = b & 7;
    float v;
    if (exp == 0xf && mant == 7)
        v = NAN;                           /* E4M3FN has no infinities */
    else if (exp == 0)
        v = ldexpf((float)mant, -9);
    else
        v = ldexpf((float)(8 + mant), exp - 10);
    return (b & 0x80) ? -v : v;
}

static float f8_e5m2_to_f32(uint8_t b)
{
    /* E5M2 is the top byte of an IEEE half */
    return ds_f16_to_f32((uint16_t)(b << 8));
}

void ds_tensor_to_f32(const struct ds_tensor *t, size_t first, size_t n, float *out /* [n] */)
{
    assert(t && (int64_t)first <= t->numel && (int64_t)n <= t->numel - (int64_t)first);
    const unsigned char *p = (const unsigned char *)t->data + first * ds_dtype_size(t->dtype);

    for (size_t i = 0; i < n; i++) {
        switch (t->dtype) {
        case DS_DTYPE_F32: {
            float v;
            memcpy(&v, p + 4 * i, 4);
            out[i] = v;
            break;
        }
        case DS_DTYPE_F16: {
            uint16_t v;
            memcpy(&v, p + 2 * i, 2);
            out[i] = ds_f16_to_f32(v);
            break;
        }
        case DS_DTYPE_BF16: {
            uint16_t v;
            memcpy(&v, p + 2 * i, 2);
            out[i] = ds_bf16_to_f32(v);
            break;
        }
        case DS_DTYPE_F64: {
            double v;
            memcpy(&v, p + 8 * i, 8);
            out[i] = (float)v;
            break;
        }
        case DS_DTYPE_I64: {
            int64_t v;
            memcpy(&v, p + 8 * i, 8);
            out[i] = (float)v;
            break;
        }
        case DS_DTYPE_I32: {
            int32_t v;
            memcpy(&v, p + 4 * i, 4);
            out[i] = (float)v;
            break;
        }
        case DS_DTYPE_I16: {
            int16_t v;
            memcpy(&v, p + 2 * i, 2);
            out[i] = (float)v;
            break;
        }
        case DS_DTYPE_I8:
            out[i] = (float)(int8_t)p[i];
            break;
        case DS_DTYPE_U8:
            out[i] = (float)p[i];
            break;
        case DS_DTYPE_BOOL:
            out[i] = p[i] ? 1.0f : 0.0f;
            break;
        case DS_DTYPE_F8_E4M3:
            out[i] = f8_e4m3_to_f32(p[i]);
            break;
        case DS_DTYPE_F8_E5M2:
            out[i] = f8_e5m2_to_f32(p[i]);
            break;
        default:
            out[i] = NAN;
            break;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Header validation                                                          */

static uint64_t load_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Offset of the first byte that breaks strict UTF-8 (RFC 3629: no overlong
 * forms, no surrogates, nothing above U+10FFFF) or is NUL; n when none. */
static size_t utf8_bad_at(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t k;
        uint32_t cp, min;
        if (c == 0)
            return i;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            k = 1, cp = c & 0x1f, min = 0x80;
        } else if (c >= 0xe0 && c <= 0xef) {
            k = 2, cp = c & 0x0f, min = 0x800;
        } else if (c >= 0xf0 && c <= 0xf4) {
            k = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return i;
        }
        if (n - i <= k)
            return i;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return i;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return i;
        i += k + 1;
    }
    return n;
}

static void format_shape(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t len = 0;
    int w = snprintf(buf, size, "[");
    len = w > 0 ? (size_t)w : 0;
    for (int i = 0; i < ndim && len < size; i++) {
        w = snprintf(buf + len, size - len, "%s%" PRId64, i ? ", " : "", shape[i]);
        len += w > 0 ? (size_t)w : 0;
    }
    if (len < size)
        snprintf(buf + len, size - len, "]");
}

static bool find_dtype(const char *s, enum ds_dtype *ret)
{
    for (int i = 0; i < DS_DTYPE_COUNT; i++) {
        if (strcmp(s, dtypes[i].name) == 0) {
            *ret = (enum ds_dtype)i;
            return true;
        }
    }
    return false;
}

/* Read a JSON integer >= 0 (what shape dims and offsets must be). */
static int get_uint(json_t *v, uint64_t *ret)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return -1;
    *ret = (uint64_t)json_integer_value(v);
    return 0;
}

/* Validate one tensor entry of file fname and fill t (name and file excepted).
 * data: the file's data buffer [data_len] bytes. */
static int parse_entry(const char *fname, const char *name, json_t *v,
                       const unsigned char *data, size_t data_len, struct ds_tensor *t)
{
    if (!json_is_object(v))
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': entry is not a JSON object",
                         fname, name);

    json_t *jd = json_object_get(v, "dtype");
    if (!jd)
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' has no dtype", fname, name);
    if (!json_is_string(jd))
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': dtype is not a string", fname, name);
    if (!find_dtype(json_string_value(jd), &t->dtype))
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' has unknown dtype '%s'",
                         fname, name, json_string_value(jd));

    json_t *js = json_object_get(v, "shape");
    if (!js)
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' has no shape", fname, name);
    if (!json_is_array(js))
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': shape is not an array", fname, name);
    if (json_array_size(js) > DS_ST_MAX_DIMS)
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' has %zu dimensions (at most %d supported)",
                         fname, name, json_array_size(js), DS_ST_MAX_DIMS);
    t->ndim = (int)json_array_size(js);
    bool zero = false;
    for (int i = 0; i < t->ndim; i++) {
        json_t *d = json_array_get(js, (size_t)i);
        uint64_t dim;
        if (get_uint(d, &dim) < 0)
            return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': dimension %d of the shape is not "
                             "a non-negative integer", fname, name, i);
        t->shape[i] = (int64_t)dim;
        zero |= dim == 0;
    }
    /* numel and nbytes, refusing anything that overflows int64 */
    uint64_t numel = 1, esize = ds_dtype_size(t->dtype);
    if (zero) {
        numel = 0;
    } else {
        for (int i = 0; i < t->ndim; i++) {
            uint64_t dim = (uint64_t)t->shape[i];
            if (numel > (uint64_t)INT64_MAX / dim) {
                char sh[256];
                format_shape(sh, sizeof sh, t->ndim, t->shape);
                return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': shape %s has too many elements",
                                 fname, name, sh);
            }
            numel *= dim;
        }
        if (numel > (uint64_t)INT64_MAX / esize) {
            char sh[256];
            format_shape(sh, sizeof sh, t->ndim, t->shape);
            return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': shape %s has too many elements",
                             fname, name, sh);
        }
    }

    json_t *jo = json_object_get(v, "data_offsets");
    if (!jo)
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' has no data_offsets", fname, name);
    uint64_t begin, end;
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        get_uint(json_array_get(jo, 0), &begin) < 0 || get_uint(json_array_get(jo, 1), &end) < 0)
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': data_offsets is not an array of two "
                         "non-negative integers", fname, name);
    if (begin > end)
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] "
                         "begin after they end", fname, name, begin, end);
    if (end > data_len)
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] "
                         "lie outside the data buffer of %zu bytes", fname, name, begin, end, data_len);
    if (end - begin != numel * esize) {
        char sh[256];
        format_shape(sh, sizeof sh, t->ndim, t->shape);
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' has %" PRIu64 " bytes of data, but %s "
                         "shape %s needs %" PRIu64, fname, name, end - begin,
                         ds_dtype_name(t->dtype), sh, numel * esize);
    }
    t->numel = (int64_t)numel;
    t->nbytes = (size_t)(end - begin);
    t->data = data + begin;
    return 0;
}

static int check_metadata(const char *fname, json_t *m)
{
    const char *key;
    json_t *v;
    if (!json_is_object(m))
        return ds_seterr(DS_EFORMAT, "file '%s': __metadata__ is not a JSON object", fname);
    json_object_foreach(m, key, v) {
        if (!json_is_string(v))
            return ds_seterr(DS_EFORMAT, "file '%s': __metadata__ value '%s' is not a string",
                             fname, key);
    }
    return 0;
}

static int cmp_by_data(const void *a, const void *b)
{
    const struct ds_tensor *x = *(const struct ds_tensor *const *)a;
    const struct ds_tensor *y = *(const struct ds_tensor *const *)b;
    const unsigned char *px = x->data, *py = y->data;
    if (px != py)
        return px < py ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

/* The non-empty tensors of one file, in offset order, must cover its data
 * buffer exactly, as the reference library requires: the first starts at byte
 * 0, each starts where the one before it ends, and the last ends at the
 * buffer's end.
 * Overlaps are refused, and so are gaps and bytes after the last tensor: a
 * header length a few bytes short still parses (the header's padding spaces
 * are cut) and would shift every tensor's data. */
static int check_layout(const char *fname, struct ds_tensor *t, size_t n, const unsigned char *data, size_t data_len)
{
    const struct ds_tensor **order = ds_xmalloc((n ? n : 1) * sizeof *order);
    for (size_t i = 0; i < n; i++)
        order[i] = &t[i];
    qsort(order, n, sizeof *order, cmp_by_data);
    size_t reach = 0;                          /* where the tensors so far end */
    const struct ds_tensor *before = NULL;     /* the non-empty tensor that ends there */
    int r = 0;
    for (size_t i = 0; i < n && r == 0; i++) {
        const struct ds_tensor *c = order[i];
        size_t begin = (size_t)((const unsigned char *)c->data - data);
        if (c->nbytes == 0)
            continue;   /* (an empty tensor reads nothing: its offset is not held against it) */
        if (begin < reach)
            r = ds_seterr(DS_EFORMAT, "file '%s': tensors '%s' and '%s' overlap in the data buffer", fname,
                          before->name, c->name);   /* (reach > 0: before is set) */
        else if (begin > reach)
            r = ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' starts at byte %zu of the data buffer, but the "
                          "tensors before it end at byte %zu (a gap: a wrong header length?)", fname, c->name,
                          begin, reach);
        else {
            reach = begin + c->nbytes;
            before = c;
        }
    }
    if (r == 0 && reach != data_len)
        r = ds_seterr(DS_EFORMAT, "file '%s': the tensors end at byte %zu of the data buffer, which holds %zu "
                      "(a wrong header length, or bytes after the data?)", fname, reach, data_len);
    free(order);
    return r;
}

static void free_tensor_names(struct ds_tensor *t, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free((char *)t[i].name);
}

/* Parse and validate the image buf [len] of file fname. On success *ret_t gets
 * a malloc'ed array of *ret_n tensors with malloc'ed names, each with file set
 * to tfile. */
static int parse_image(const unsigned char *buf, size_t len, const char *fname, const char *tfile,
                       struct ds_tensor **ret_t, size_t *ret_n)
{
    if (len < 8)
        return ds_seterr(DS_EFORMAT, "file '%s' is too short to be a safetensors file (%zu bytes)",
                         fname, len);
    uint64_t hlen = load_le64(buf);
    if (hlen > DS_ST_MAX_HEADER)
        return ds_seterr(DS_EFORMAT, "file '%s': header size %" PRIu64 " is absurdly large "
                         "(the limit is %" PRIu64 ")", fname, hlen, DS_ST_MAX_HEADER);
    if (hlen > len - 8)
        return ds_seterr(DS_EFORMAT, "file '%s': header size %" PRIu64 " exceeds the %zu bytes "
                         "that follow it (truncated file?)", fname, hlen, len - 8);

    const char *hdr = (const char *)buf + 8;
    const unsigned char *data = buf + 8 + hlen;
    size_t data_len = len - 8 - (size_t)hlen;

    if (hlen == 0 || hdr[0] != '{')
        return ds_seterr(DS_EFORMAT, "file '%s': header does not start with '{'", fname);
    size_t bad = utf8_bad_at((const unsigned char *)hdr, (size_t)hlen);
    if (bad < hlen) {
        if (hdr[bad] == 0)
            return ds_seterr(DS_EFORMAT, "file '%s': header contains a NUL byte at offset %zu",
                             fname, bad);
        return ds_seterr(DS_EFORMAT, "file '%s': header is not valid UTF-8 (bad byte 0x%02x at "
                         "offset %zu)", fname, (unsigned char)hdr[bad], bad);
    }

    json_error_t jerr;
    json_t *root = json_loadb(hdr, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return ds_seterr(DS_EFORMAT, "file '%s': header is not valid JSON: %s (offset %d)",
                         fname, jerr.text, jerr.position);
    if (!json_is_object(root)) {
        json_decref(root);
        return ds_seterr(DS_EFORMAT, "file '%s': header is not a JSON object", fname);
    }

    size_t cap = json_object_size(root), n = 0;
    struct ds_tensor *t = ds_xcalloc(cap ? cap : 1, sizeof *t);
    const char *key;
    json_t *v;
    int r = 0;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) {
            r = check_metadata(fname, v);
        } else {
            r = parse_entry(fname, key, v, data, data_len, &t[n]);
            if (r == 0) {
                t[n].name = ds_xstrdup(key);
                t[n].file = tfile;
                n++;
            }
        }
        if (r < 0)
            break;
    }
    json_decref(root);
    if (r == 0)
        r = check_layout(fname, t, n, data, data_len);
    if (r < 0) {
        free_tensor_names(t, n);
        free(t);
        return r;
    }
    *ret_t = t;
    *ret_n = n;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The ds_st object                                                           */

static struct ds_st *st_new(const char *source)
{
    struct ds_st *st = ds_xcalloc(1, sizeof *st);
    st->source = ds_xstrdup(source);
    return st;
}

static const char *st_add_file(struct ds_st *st, const char *path)
{
    st->files = ds_xrealloc(st->files, (st->nfiles + 1) * sizeof *st->files);
    st->files[st->nfiles] = ds_xstrdup(path);
    return st->files[st->nfiles++];
}

static void st_add_map(struct ds_st *st, void *addr, size_t len)
{
    if (!addr)
        return;
    st->maps = ds_xrealloc(st->maps, (st->nmaps + 1) * sizeof *st->maps);
    st->maps[st->nmaps].addr = addr;
    st->maps[st->nmaps].len = len;
    st->nmaps++;
}

/* Take over the tensors t [n] (the array is freed, the names kept). */
static void st_add_tensors(struct ds_st *st, struct ds_tensor *t, size_t n)
{
    st->tensors = ds_xrealloc(st->tensors, (st->n + n ? st->n + n : 1) * sizeof *st->tensors);
    if (n)
        memcpy(st->tensors + st->n, t, n * sizeof *t);
    st->n += n;
    free(t);
}

static int cmp_by_name(const void *a, const void *b)
{
    return strcmp(((const struct ds_tensor *)a)->name, ((const struct ds_tensor *)b)->name);
}

/* Sort by name and refuse a name present twice (only possible across shards:
 * the JSON parser already refuses duplicate keys within one header). */
static int st_finish(struct ds_st *st)
{
    if (st->n > 1)
        qsort(st->tensors, st->n, sizeof *st->tensors, cmp_by_name);
    for (size_t i = 1; i < st->n; i++) {
        const struct ds_tensor *a = &st->tensors[i - 1], *b = &st->tensors[i];
        if (strcmp(a->name, b->name) == 0)
            return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' is in both '%s' and '%s'",
                             st->source, a->name, a->file, b->file);
    }
    return 0;
}

struct ds_st *ds_st_free(struct ds_st *st)
{
    if (!st)
        return NULL;
    for (size_t i = 0; i < st->n; i++)
        free((char *)st->tensors[i].name);
    free(st->tensors);
    for (size_t i = 0; i < st->nfiles; i++)
        free(st->files[i]);
    free(st->files);
    for (size_t i = 0; i < st->nmaps; i++)
        munmap(st->maps[i].addr, st->maps[i].len);
    free(st->maps);
    free(st->source);
    free(st);
    return NULL;
}

size_t ds_st_count(const struct ds_st *st)
{
    return st ? st->n : 0;
}

const struct ds_tensor *ds_st_at(const struct ds_st *st, size_t i)
{
    return st && i < st->n ? &st->tensors[i] : NULL;
}

const struct ds_tensor *ds_st_find(const struct ds_st *st, const char *name)
{
    if (!st || !name || st->n == 0)
        return NULL;
    struct ds_tensor key = { .name = name };
    return bsearch(&key, st->tensors, st->n, sizeof *st->tensors, cmp_by_name);
}

int ds_st_check_layers(const struct ds_st *st, const char *prefix, int n_layers, const char *key)
{
    size_t pl = strlen(prefix);
    for (size_t i = 0; st && i < st->n; i++) {
        const char *name = st->tensors[i].name;
        if (strncmp(name, prefix, pl) != 0 || !isdigit((unsigned char)name[pl]))
            continue;
        char *end;
        errno = 0;
        unsigned long layer = strtoul(name + pl, &end, 10);
        if (*end == '.' && (errno != 0 || layer >= (unsigned long)n_layers))
            return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' belongs to a layer past the %d that %s gives",
                             st->tensors[i].file, name, n_layers, key);
    }
    return 0;
}

int ds_st_get(const struct ds_st *st, const char *name, int ndim, const int64_t *shape,
              const struct ds_tensor **ret)
{
    if (!st || !name || ndim < 0 || ndim > DS_ST_MAX_DIMS || (ndim > 0 && !shape))
        return ds_seterr(DS_EINVAL, "tensor '%s': invalid lookup (%d expected dimensions)",
                         name ? name : "(null)", ndim);
    const struct ds_tensor *t = ds_st_find(st, name);
    if (!t)
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' is missing", st->source, name);
    if (t->dtype != DS_DTYPE_F32 && t->dtype != DS_DTYPE_F16 && t->dtype != DS_DTYPE_BF16)
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' has dtype %s, expected F32, F16 or BF16",
                         t->file, name, ds_dtype_name(t->dtype));
    if (t->ndim != ndim || (ndim > 0 && memcmp(t->shape, shape, (size_t)ndim * sizeof *shape) != 0)) {
        char have[256], want[256];
        format_shape(have, sizeof have, t->ndim, t->shape);
        format_shape(want, sizeof want, ndim, shape);
        return ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' has shape %s, expected %s",
                         t->file, name, have, want);
    }
    *ret = t;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Files                                                                      */

/* Map path read-only and private. A zero-length file gives addr NULL. */
static int map_file(const char *path, void **ret_addr, size_t *ret_len)
{
    /* O_NONBLOCK: a FIFO named by mistake must not hang the open */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return ds_seterr(DS_EIO, "could not open file '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        int e = errno;
        close(fd);
        return ds_seterr(DS_EIO, "could not stat file '%s': %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return ds_seterr(DS_EIO, "file '%s' is not a regular file", path);
    }
    if ((uintmax_t)sb.st_size > SIZE_MAX) {
        close(fd);
        return ds_seterr(DS_ELIMIT, "file '%s' is too large to map", path);
    }
    size_t len = (size_t)sb.st_size;
    void *addr = NULL;
    if (len > 0) {
        addr = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (addr == MAP_FAILED) {
            int e = errno;
            close(fd);
            return ds_seterr(e == ENOMEM ? DS_ENOMEM : DS_EIO, "could not map file '%s': %s",
                             path, strerror(e));
        }
    }
    close(fd);
    *ret_addr = addr;
    *ret_len = len;
    return 0;
}

/* Map and parse one file into st. */
static int st_load_file(struct ds_st *st, const char *path)
{
    void *addr;
    size_t len;
    int r = map_file(path, &addr, &len);
    if (r < 0)
        return r;
    static const unsigned char empty[1];
    struct ds_tensor *t;
    size_t n;
    const char *tfile = st_add_file(st, path);
    r = parse_image(addr ? addr : empty, len, path, tfile, &t, &n);
    if (r < 0) {
        if (addr)
            munmap(addr, len);
        return r;
    }
    st_add_map(st, addr, len);
    st_add_tensors(st, t, n);
    return 0;
}

int ds_st_open_file(const char *path, struct ds_st **ret)
{
    struct ds_st *st = st_new(path);
    int r = st_load_file(st, path);
    if (r == 0)
        r = st_finish(st);
    if (r < 0) {
        ds_st_free(st);
        return r;
    }
    *ret = st;
    return 0;
}

int ds_st_open_buffer(const void *buf, size_t len, const char *fname, struct ds_st **ret)
{
    static const unsigned char empty[1];
    if (!fname)
        fname = "(buffer)";
    struct ds_st *st = st_new(fname);
    struct ds_tensor *t;
    size_t n;
    int r = parse_image(buf ? buf : empty, buf ? len : 0, fname, st_add_file(st, fname), &t, &n);
    if (r == 0) {
        st_add_tensors(st, t, n);
        r = st_finish(st);
    }
    if (r < 0) {
        ds_st_free(st);
        return r;
    }
    *ret = st;
    return 0;
}

static char *path_join(const char *dir, const char *name)
{
    size_t dl = strlen(dir), nl = strlen(name);
    while (dl > 1 && dir[dl - 1] == '/')
        dl--;
    char *p = ds_xmalloc(dl + 1 + nl + 1);
    memcpy(p, dir, dl);
    p[dl] = '/';
    memcpy(p + dl + 1, name, nl + 1);
    return p;
}

/* A shard named in an index must be a plain file name inside the directory. */
static bool shard_name_ok(const char *s)
{
    return s[0] != 0 && !strchr(s, '/') && !strstr(s, "..");
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int open_index(const char *dir, const char *ipath, struct ds_st **ret)
{
    void *addr;
    size_t len;
    int r = map_file(ipath, &addr, &len);
    if (r < 0)
        return r;
    json_error_t jerr;
    json_t *root = NULL;
    if (len > DS_ST_MAX_HEADER)
        r = ds_seterr(DS_EFORMAT, "file '%s' is absurdly large for an index (%zu bytes)", ipath, len);
    else if (!(root = json_loadb(addr ? addr : "", len, JSON_REJECT_DUPLICATES, &jerr)))
        r = ds_seterr(DS_EFORMAT, "file '%s' is not valid JSON: %s (line %d, column %d)",
                      ipath, jerr.text, jerr.line, jerr.column);
    if (addr)
        munmap(addr, len);
    if (r < 0)
        return r;

    struct ds_st *st = NULL;
    const char **shards = NULL;     /* [nshards] distinct shard names, sorted */
    const char **paths = NULL;      /* [nshards] the tensors' file strings for each */
    size_t nshards = 0;
    json_t *wm = json_object_get(root, "weight_map"), *meta = json_object_get(root, "metadata");
    const char *name;
    json_t *v;

    if (!json_is_object(root)) {
        r = ds_seterr(DS_EFORMAT, "file '%s' is not a JSON object", ipath);
        goto out;
    }
    if (meta && !json_is_object(meta) && !json_is_null(meta)) {
        r = ds_seterr(DS_EFORMAT, "file '%s': key 'metadata' is not a JSON object", ipath);
        goto out;
    }
    if (!wm) {
        r = ds_seterr(DS_EFORMAT, "file '%s': key 'weight_map' is missing", ipath);
        goto out;
    }
    if (!json_is_object(wm)) {
        r = ds_seterr(DS_EFORMAT, "file '%s': key 'weight_map' is not a JSON object", ipath);
        goto out;
    }
    if (json_object_size(wm) == 0) {
        r = ds_seterr(DS_EFORMAT, "file '%s': weight_map is empty", ipath);
        goto out;
    }

    shards = ds_xmalloc(json_object_size(wm) * sizeof *shards);
    json_object_foreach(wm, name, v) {
        if (!json_is_string(v)) {
            r = ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': the shard name is not a string",
                          ipath, name);
            goto out;
        }
        if (!shard_name_ok(json_string_value(v))) {
            r = ds_seterr(DS_EFORMAT, "file '%s': tensor '%s': shard name '%s' is not a plain "
                          "file name", ipath, name, json_string_value(v));
            goto out;
        }
        shards[nshards++] = json_string_value(v);
    }
    qsort(shards, nshards, sizeof *shards, cmp_str);
    size_t u = 0;
    for (size_t i = 0; i < nshards; i++) {
        if (u == 0 || strcmp(shards[u - 1], shards[i]) != 0)
            shards[u++] = shards[i];
    }
    nshards = u;

    st = st_new(ipath);
    paths = ds_xmalloc(nshards * sizeof *paths);
    for (size_t i = 0; i < nshards; i++) {
        char *p = path_join(dir, shards[i]);
        r = st_load_file(st, p);
        free(p);
        if (r < 0)
            goto out;
        paths[i] = st->files[st->nfiles - 1];
    }
    r = st_finish(st);
    if (r < 0)
        goto out;

    json_object_foreach(wm, name, v) {
        const char *want = json_string_value(v);
        const char **s = bsearch(&want, shards, nshards, sizeof *shards, cmp_str);
        const struct ds_tensor *t = ds_st_find(st, name);
        assert(s);
        if (!t) {
            r = ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' is missing from shard '%s'",
                          ipath, name, paths[s - shards]);
            goto out;
        }
        if (t->file != paths[s - shards]) {
            r = ds_seterr(DS_EFORMAT, "file '%s': tensor '%s' is mapped to shard '%s' but stored "
                          "in '%s'",
                          ipath, name, want, t->file);
            goto out;
        }
    }

out:
    free(shards);
    free(paths);
    json_decref(root);
    if (r < 0) {
        ds_st_free(st);
        return r;
    }
    *ret = st;
    return 0;
}

int ds_st_open_dir(const char *dir, struct ds_st **ret)
{
    struct stat sb;
    if (stat(dir, &sb) < 0)
        return ds_seterr(DS_EIO, "could not open directory '%s': %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return ds_seterr(DS_EIO, "'%s' is not a directory", dir);

    char *p = path_join(dir, INDEX_NAME);
    int r;
    if (stat(p, &sb) == 0) {
        r = open_index(dir, p, ret);
        free(p);
        return r;
    }
    if (errno != ENOENT) {
        r = ds_seterr(DS_EIO, "could not access file '%s': %s", p, strerror(errno));
        free(p);
        return r;
    }
    free(p);

    p = path_join(dir, SINGLE_NAME);
    if (stat(p, &sb) == 0) {
        r = ds_st_open_file(p, ret);
    } else if (errno == ENOENT) {
        r = ds_seterr(DS_EIO, "directory '%s' has neither " SINGLE_NAME " nor " INDEX_NAME, dir);
    } else {
        r = ds_seterr(DS_EIO, "could not access file '%s': %s", p, strerror(errno));
    }
    free(p);
    return r;
}
