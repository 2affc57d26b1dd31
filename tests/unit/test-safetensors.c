/* test-safetensors.c: the safetensors reader (engine/safetensors.c).
 *
 * Files are written by a small writer below into a temporary directory: valid
 * single files (f32, f16, bf16, unaligned data), sharded sets, and one file per
 * malformed case, each checked for its error code and for a message naming the
 * file and, where there is one, the tensor. The scalar conversions are checked
 * exhaustively against independent reference implementations built on ldexp. */
#include "config.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dspark/ds-safetensors.h"
#include "testutil.h"

static char *tmpdir;

static int group_setup(void **state)
{
    tmpdir = ds_test_tmpdir();
    return tmpdir ? 0 : -1;
}

static int group_teardown(void **state)
{
    ds_test_rmtree(tmpdir);
    free(tmpdir);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* A tiny safetensors writer                                                  */

/* Path of name inside the temporary directory (static slots, like ds_test_path). */
static const char *tpath(const char *name)
{
    static char buf[8][4096];
    static int slot;
    char *b = buf[slot++ % 8];
    snprintf(b, sizeof buf[0], "%s/%s", tmpdir, name);
    return b;
}

/* Image: 8-byte little-endian header size (declared), header [hlen], data [dlen]. */
static unsigned char *make_image(uint64_t declared, const char *hdr, size_t hlen,
                                 const void *data, size_t dlen, size_t *len)
{
    unsigned char *img = malloc(8 + hlen + dlen + 1);
    assert_non_null(img);
    for (int i = 0; i < 8; i++)
        img[i] = (unsigned char)(declared >> (8 * i));
    memcpy(img + 8, hdr, hlen);
    if (dlen)
        memcpy(img + 8 + hlen, data, dlen);
    *len = 8 + hlen + dlen;
    return img;
}

/* Write a file with header hdr (a C string) and data; returns its path. */
static const char *write_st(const char *name, const char *hdr, const void *data, size_t dlen)
{
    size_t len;
    unsigned char *img = make_image(strlen(hdr), hdr, strlen(hdr), data, dlen, &len);
    const char *p = tpath(name);
    assert_int_equal(ds_test_write_file(p, img, len), 0);
    free(img);
    return p;
}

static void write_text(const char *name, const char *text)
{
    assert_int_equal(ds_test_write_file(tpath(name), text, strlen(text)), 0);
}

static void assert_msg_has(const char *needle)
{
    if (!strstr(ds_errdetail(), needle))
        fail_msg("message '%s' does not contain '%s'", ds_errdetail(), needle);
}

static struct ds_st *const SENTINEL = (struct ds_st *)&tmpdir;

/* The image (declared header size, header bytes, data) must be refused with
 * code, through the buffer entry point and through a file, and the message
 * must name the file and, when given, the tensor. */
static void expect_bad_image(uint64_t declared, const char *hdr, size_t hlen, const void *data,
                             size_t dlen, int code, const char *tensor)
{
    size_t len;
    unsigned char *img = make_image(declared, hdr, hlen, data, dlen, &len);
    struct ds_st *st = SENTINEL;

    assert_int_equal(ds_st_open_buffer(img, len, "case.safetensors", &st), -code);
    assert_ptr_equal(st, SENTINEL);
    assert_msg_has("file 'case.safetensors'");
    if (tensor)
        assert_msg_has(tensor);

    const char *p = tpath("case.safetensors");
    assert_int_equal(ds_test_write_file(p, img, len), 0);
    assert_int_equal(ds_st_open_file(p, &st), -code);
    assert_ptr_equal(st, SENTINEL);
    assert_msg_has(p);
    if (tensor)
        assert_msg_has(tensor);
    free(img);
}

static void expect_bad(const char *hdr, size_t dlen, int code, const char *tensor)
{
    unsigned char *zeros = calloc(1, dlen + 1);
    expect_bad_image(strlen(hdr), hdr, strlen(hdr), zeros, dlen, code, tensor);
    free(zeros);
}

/* ------------------------------------------------------------------------ */
/* Valid files                                                                */

static void test_valid_f32(void **state)
{
    const float w[6] = { 1, -2, 3.5f, 0, 1e-3f, 65504 }, b[3] = { 7, 8, 9 };
    unsigned char data[36];
    memcpy(data, w, 24);
    memcpy(data + 24, b, 12);
    const char *p = write_st("f32.safetensors",
        "{\"w.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
        "\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[24,36]}}", data, sizeof data);
    struct ds_st *st;
    assert_int_equal(ds_st_open_file(p, &st), 0);
    assert_int_equal(ds_st_count(st), 2);
    /* sorted by name */
    assert_string_equal(ds_st_at(st, 0)->name, "b");
    assert_string_equal(ds_st_at(st, 1)->name, "w.weight");
    assert_null(ds_st_at(st, 2));

    const struct ds_tensor *t = ds_st_find(st, "w.weight");
    assert_non_null(t);
    assert_string_equal(t->file, p);
    assert_int_equal(t->dtype, DS_DTYPE_F32);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[0], 2);
    assert_int_equal(t->shape[1], 3);
    assert_int_equal(t->numel, 6);
    assert_int_equal(t->nbytes, 24);
    float out[6];
    ds_tensor_to_f32(t, 0, 6, out);
    assert_memory_equal(out, w, sizeof w);
    ds_tensor_to_f32(t, 4, 2, out);
    assert_true(out[0] == 1e-3f && out[1] == 65504);

    const struct ds_tensor *g = NULL;
    const int64_t shape[2] = { 2, 3 }, bshape[1] = { 3 };
    assert_int_equal(ds_st_get(st, "w.weight", 2, shape, &g), 0);
    assert_ptr_equal(g, t);
    assert_int_equal(ds_st_get(st, "b", 1, bshape, &g), 0);
    ds_tensor_to_f32(g, 0, 3, out);
    assert_memory_equal(out, b, sizeof b);
    assert_null(ds_st_find(st, "w"));
    assert_null(ds_st_find(st, "w.weight2"));
    assert_null(ds_st_free(st));
}

static void test_valid_f16_bf16(void **state)
{
    /* bf16: 1, -2, inf, NaN; f16: 1, smallest subnormal, 65504, -inf */
    const uint16_t bf[4] = { 0x3f80, 0xc000, 0x7f80, 0x7fc0 };
    const uint16_t hf[4] = { 0x3c00, 0x0001, 0x7bff, 0xfc00 };
    unsigned char data[16];
    memcpy(data, bf, 8);
    memcpy(data + 8, hf, 8);
    const char *p = write_st("half.safetensors",
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"a\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,8]},"
        "\"h\":{\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[8,16]}}", data, sizeof data);
    struct ds_st *st;
    assert_int_equal(ds_st_open_file(p, &st), 0);
    assert_int_equal(ds_st_count(st), 2);

    const struct ds_tensor *a, *h;
    const int64_t s4[1] = { 4 }, s22[2] = { 2, 2 };
    assert_int_equal(ds_st_get(st, "a", 1, s4, &a), 0);
    assert_int_equal(ds_st_get(st, "h", 2, s22, &h), 0);
    assert_int_equal(a->dtype, DS_DTYPE_BF16);
    assert_int_equal(h->dtype, DS_DTYPE_F16);
    float out[4];
    ds_tensor_to_f32(a, 0, 4, out);
    assert_true(out[0] == 1 && out[1] == -2 && isinf(out[2]) && out[2] > 0 && isnan(out[3]));
    ds_tensor_to_f32(h, 0, 4, out);
    assert_true(out[0] == 1 && out[1] == ldexpf(1, -24) && out[2] == 65504);
    assert_true(isinf(out[3]) && out[3] < 0);
    ds_tensor_to_f32(h, 1, 1, out);
    assert_true(out[0] == ldexpf(1, -24));
    ds_st_free(st);
}

/* Header padded with spaces to an odd length and a tensor at an odd offset: the
 * data pointers are unaligned, which the format allows. */
static void test_unaligned(void **state)
{
    const char *hdr = "{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
                      "\"y\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[12,16]}}   ";
    const float x[3] = { 1.5f, -0.25f, 3e38f };
    const uint16_t y[2] = { 0x4049, 0xbf80 };
    unsigned char data[16];
    memcpy(data, x, 12);
    memcpy(data + 12, y, 4);
    size_t len;
    unsigned char *img = make_image(strlen(hdr), hdr, strlen(hdr), data, sizeof data, &len);
    struct ds_st *st;
    assert_int_equal(ds_st_open_buffer(img, len, "unaligned", &st), 0);
    const struct ds_tensor *t = ds_st_find(st, "x");
    assert_non_null(t);
    assert_ptr_equal(t->data, img + 8 + strlen(hdr));
    assert_true((uintptr_t)t->data % 4 != 0);
    float out[3];
    ds_tensor_to_f32(t, 0, 3, out);
    assert_memory_equal(out, x, sizeof x);
    t = ds_st_find(st, "y");
    ds_tensor_to_f32(t, 0, 2, out);
    assert_true(out[0] == 3.140625f && out[1] == -1);
    ds_st_free(st);
    free(img);
}

static void test_valid_edge_cases(void **state)
{
    struct ds_st *st;
    const float s = 2.5f;

    /* no tensors at all, and metadata only */
    const char *p = write_st("empty.safetensors", "{}", NULL, 0);
    assert_int_equal(ds_st_open_file(p, &st), 0);
    assert_int_equal(ds_st_count(st), 0);
    assert_null(ds_st_find(st, "x"));
    ds_st_free(st);
    p = write_st("meta.safetensors", "{\"__metadata__\":{\"a\":\"b\",\"c\":\"\"}}", NULL, 0);
    assert_int_equal(ds_st_open_file(p, &st), 0);
    assert_int_equal(ds_st_count(st), 0);
    ds_st_free(st);

    /* a scalar, empty tensors sharing an offset with each other and with a
     * non-empty one, and an empty name */
    p = write_st("scalar.safetensors",
        "{\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
        "\"z\":{\"dtype\":\"BF16\",\"shape\":[0,5],\"data_offsets\":[0,0]},"
        "\"z2\":{\"dtype\":\"F32\",\"shape\":[3,0],\"data_offsets\":[0,0]},"
        "\"\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,4]}}", &s, 4);
    assert_int_equal(ds_st_open_file(p, &st), 0);
    assert_int_equal(ds_st_count(st), 4);
    const struct ds_tensor *t = ds_st_find(st, "s");
    assert_int_equal(t->ndim, 0);
    assert_int_equal(t->numel, 1);
    float out;
    ds_tensor_to_f32(t, 0, 1, &out);
    assert_true(out == 2.5f);
    assert_int_equal(ds_st_find(st, "z")->numel, 0);
    assert_int_equal(ds_st_find(st, "z2")->nbytes, 0);
    assert_non_null(ds_st_find(st, ""));
    ds_st_free(st);

    /* a gap before a tensor, and bytes after the last, are refused (as the reference library does) */
    unsigned char data[16] = { 0 };
    p = write_st("gaps.safetensors", "{\"a\":{\"dtype\":\"I8\",\"shape\":[2],\"data_offsets\":[4,6]}}",
                 data, 6);
    assert_int_equal(ds_st_open_file(p, &st), -DS_EFORMAT);
    assert_msg_has("tensor 'a' starts at byte 4 of the data buffer, but the tensors before it end at byte 0");
    p = write_st("trailing.safetensors", "{\"a\":{\"dtype\":\"I8\",\"shape\":[2],\"data_offsets\":[0,2]}}",
                 data, sizeof data);
    assert_int_equal(ds_st_open_file(p, &st), -DS_EFORMAT);
    assert_msg_has("the tensors end at byte 2 of the data buffer, which holds 16");
    /* a header length a few bytes short still parses (its padding spaces are cut): every tensor
     * would read shifted, and it is refused */
    const char *padded = "{\"a\":{\"dtype\":\"I8\",\"shape\":[2],\"data_offsets\":[0,2]}}      ";
    size_t len;
    unsigned char *img = make_image(strlen(padded) - 2, padded, strlen(padded), data, 2, &len);
    assert_int_equal(ds_st_open_buffer(img, len, "short-header", &st), -DS_EFORMAT);
    assert_msg_has("the tensors end at byte 2 of the data buffer, which holds 4");
    free(img);

    assert_null(ds_st_free(NULL));
    assert_int_equal(ds_st_count(NULL), 0);
}

static void test_all_dtypes(void **state)
{
    static const struct { const char *name; enum ds_dtype dt; size_t size; } tab[] = {
        { "F32", DS_DTYPE_F32, 4 }, { "F16", DS_DTYPE_F16, 2 }, { "BF16", DS_DTYPE_BF16, 2 },
        { "F64", DS_DTYPE_F64, 8 }, { "I64", DS_DTYPE_I64, 8 }, { "I32", DS_DTYPE_I32, 4 },
        { "I16", DS_DTYPE_I16, 2 }, { "I8", DS_DTYPE_I8, 1 }, { "U8", DS_DTYPE_U8, 1 },
        { "BOOL", DS_DTYPE_BOOL, 1 }, { "F8_E4M3", DS_DTYPE_F8_E4M3, 1 },
        { "F8_E5M2", DS_DTYPE_F8_E5M2, 1 },
    };
    for (size_t i = 0; i < sizeof tab / sizeof *tab; i++) {
        assert_string_equal(ds_dtype_name(tab[i].dt), tab[i].name);
        assert_int_equal(ds_dtype_size(tab[i].dt), tab[i].size);

        char hdr[256];
        snprintf(hdr, sizeof hdr, "{\"t\":{\"dtype\":\"%s\",\"shape\":[3],\"data_offsets\":[0,%zu]}}",
                 tab[i].name, 3 * tab[i].size);
        unsigned char data[24] = { 0 };
        size_t len;
        unsigned char *img = make_image(strlen(hdr), hdr, strlen(hdr), data, 3 * tab[i].size, &len);
        struct ds_st *st;
        assert_int_equal(ds_st_open_buffer(img, len, "dt", &st), 0);
        const struct ds_tensor *t = ds_st_find(st, "t");
        assert_int_equal(t->dtype, tab[i].dt);
        float out[3] = { 1, 1, 1 };
        ds_tensor_to_f32(t, 0, 3, out);
        assert_true(out[0] == 0 && out[1] == 0 && out[2] == 0);

        /* ds_st_get takes only the floating dtypes the model uses */
        const int64_t shape[1] = { 3 };
        const struct ds_tensor *g;
        int r = ds_st_get(st, "t", 1, shape, &g);
        if (tab[i].dt == DS_DTYPE_F32 || tab[i].dt == DS_DTYPE_F16 || tab[i].dt == DS_DTYPE_BF16) {
            assert_int_equal(r, 0);
        } else {
            assert_int_equal(r, -DS_EFORMAT);
            assert_msg_has("tensor 't'");
            assert_msg_has(tab[i].name);
        }
        ds_st_free(st);
        free(img);
    }

    /* small integer and fp8 values convert exactly */
    const char *hdr = "{\"i\":{\"dtype\":\"I16\",\"shape\":[2],\"data_offsets\":[0,4]},"
                      "\"e4\":{\"dtype\":\"F8_E4M3\",\"shape\":[4],\"data_offsets\":[4,8]},"
                      "\"e5\":{\"dtype\":\"F8_E5M2\",\"shape\":[3],\"data_offsets\":[8,11]}}";
    const int16_t iv[2] = { -300, 12345 };
    unsigned char data[11];
    memcpy(data, iv, 4);
    /* E4M3: 1.0 = 0x38, -448 = 0xfe, NaN = 0x7f, smallest subnormal 2^-9 = 0x01 */
    data[4] = 0x38, data[5] = 0xfe, data[6] = 0x7f, data[7] = 0x01;
    /* E5M2: 1.0 = 0x3c, inf = 0x7c, -2^-16 = 0x81 */
    data[8] = 0x3c, data[9] = 0x7c, data[10] = 0x81;
    size_t len;
    unsigned char *img = make_image(strlen(hdr), hdr, strlen(hdr), data, sizeof data, &len);
    struct ds_st *st;
    assert_int_equal(ds_st_open_buffer(img, len, "ints", &st), 0);
    float out[4];
    ds_tensor_to_f32(ds_st_find(st, "i"), 0, 2, out);
    assert_true(out[0] == -300 && out[1] == 12345);
    ds_tensor_to_f32(ds_st_find(st, "e4"), 0, 4, out);
    assert_true(out[0] == 1 && out[1] == -448 && isnan(out[2]) && out[3] == ldexpf(1, -9));
    ds_tensor_to_f32(ds_st_find(st, "e5"), 0, 3, out);
    assert_true(out[0] == 1 && isinf(out[1]) && out[2] == -ldexpf(1, -16));
    ds_st_free(st);
    free(img);
}

/* ------------------------------------------------------------------------ */
/* Malformed files                                                            */

static void test_bad_sizes(void **state)
{
    /* shorter than the size field */
    expect_bad_image(0, "", 0, NULL, 0, DS_EFORMAT, NULL);  /* 8 bytes, header size 0 */
    struct ds_st *st = SENTINEL;
    const unsigned char seven[7] = { 2, 0, 0, 0, 0, 0, 0 };
    assert_int_equal(ds_st_open_buffer(seven, 7, "seven.safetensors", &st), -DS_EFORMAT);
    assert_msg_has("file 'seven.safetensors'");
    assert_msg_has("too short");
    assert_int_equal(ds_st_open_buffer(NULL, 0, "none", &st), -DS_EFORMAT);
    assert_int_equal(ds_test_write_file(tpath("zero.safetensors"), "", 0), 0);
    assert_int_equal(ds_st_open_file(tpath("zero.safetensors"), &st), -DS_EFORMAT);
    assert_msg_has(tpath("zero.safetensors"));
    assert_ptr_equal(st, SENTINEL);

    /* header size beyond the file, and absurd */
    expect_bad_image(100, "{}", 2, NULL, 0, DS_EFORMAT, NULL);
    assert_msg_has("exceeds");
    expect_bad_image(DS_ST_MAX_HEADER + 1, "{}", 2, NULL, 0, DS_EFORMAT, NULL);
    assert_msg_has("absurdly large");
    expect_bad_image(UINT64_MAX, "{}", 2, NULL, 0, DS_EFORMAT, NULL);
    assert_msg_has("absurdly large");
    expect_bad_image(UINT64_MAX - 7, "{}", 2, NULL, 0, DS_EFORMAT, NULL);
}

static void test_bad_header_text(void **state)
{
    /* not UTF-8: a lone continuation byte, an overlong NUL, a surrogate, past U+10FFFF */
    static const char *const bad_utf8[] = {
        "{\"a\x80\":{}}", "{\"\xc0\x80\":{}}", "{\"\xed\xa0\x80\":{}}", "{\"\xf4\x90\x80\x80\":{}}",
        "{\"\xe2\x82\":{}}",
    };
    for (size_t i = 0; i < sizeof bad_utf8 / sizeof *bad_utf8; i++) {
        expect_bad(bad_utf8[i], 0, DS_EFORMAT, NULL);
        assert_msg_has("UTF-8");
    }
    /* valid multi-byte names are fine */
    struct ds_st *st;
    const char *hdr = "{\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\":{\"dtype\":\"U8\",\"shape\":[1],"
                      "\"data_offsets\":[0,1]}}";
    write_st("utf8.safetensors", hdr, "x", 1);
    assert_int_equal(ds_st_open_file(tpath("utf8.safetensors"), &st), 0);
    assert_non_null(ds_st_find(st, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"));
    ds_st_free(st);

    /* a NUL byte: raw (in a name and as padding), and escaped in a name */
    expect_bad_image(9, "{\"a\0\":{}}", 9, NULL, 0, DS_EFORMAT, NULL);
    assert_msg_has("NUL");
    expect_bad_image(4, "{}\0\0", 4, NULL, 0, DS_EFORMAT, NULL);
    assert_msg_has("NUL");
    expect_bad("{\"a\\u0000b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0,
               DS_EFORMAT, NULL);

    /* not JSON, not an object, not starting with '{' */
    expect_bad("{\"a\":", 0, DS_EFORMAT, NULL);
    assert_msg_has("not valid JSON");
    expect_bad("{} {}", 0, DS_EFORMAT, NULL);
    expect_bad("[1,2]", 0, DS_EFORMAT, NULL);
    expect_bad(" {}", 0, DS_EFORMAT, NULL);
    expect_bad("\"x\"", 0, DS_EFORMAT, NULL);

    /* duplicate names: the JSON parser names the key */
    expect_bad("{\"dup.w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
               "\"dup.w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2,
               DS_EFORMAT, "dup.w");
    assert_msg_has("duplicate");
}

static void test_bad_entries(void **state)
{
    struct {
        const char *hdr;
        size_t dlen;
        const char *needle;  /* besides the tensor name */
    } cases[] = {
        { "{\"t.w\":[1]}", 0, "not a JSON object" },
        { "{\"t.w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "dtype" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "shape" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "data_offsets" },
        { "{\"t.w\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "dtype" },
        { "{\"t.w\":{\"dtype\":\"Q4_K\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'Q4_K'" },
        { "{\"t.w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "'f32'" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}", 4, "shape" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "dimension 0" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1,1.5],\"data_offsets\":[0,4]}}", 4, "dimension 1" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4, "dimension 0" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
          "9 dimensions" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}", 0,
          "too many elements" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[2305843009213693952],\"data_offsets\":[0,0]}}", 0,
          "too many elements" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "data_offsets" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, "data_offsets" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, "data_offsets" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0.0,4]}}", 4, "data_offsets" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{\"a\":1}}}", 4, "data_offsets" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8, "begin after" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 7, "outside" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,9223372036854775807]}}", 4,
          "outside" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 8, "needs 8" },
        { "{\"t.w\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,16]}}", 16, "needs 8" },
        { "{\"t.w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,4]}}", 4, "needs 0" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        print_message("# case %zu: %s\n", i, cases[i].hdr);
        expect_bad(cases[i].hdr, cases[i].dlen, DS_EFORMAT, "tensor 't.w'");
        assert_msg_has(cases[i].needle);
    }
}

static void test_bad_overlap_and_metadata(void **state)
{
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, DS_EFORMAT, "'a'");
    assert_msg_has("'b'");
    assert_msg_has("overlap");
    /* the same bytes twice */
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"b\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, DS_EFORMAT, "overlap");
    /* one tensor inside another, listed out of order, with an empty one between */
    expect_bad("{\"small\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[10,12]},"
               "\"e\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[5,5]},"
               "\"big\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}}", 16, DS_EFORMAT,
               "'small'");
    assert_msg_has("'big'");
    /* touching is not overlapping */
    struct ds_st *st;
    const char *p = write_st("touch.safetensors",
        "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
        "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]}}", "abcd", 4);
    assert_int_equal(ds_st_open_file(p, &st), 0);
    ds_st_free(st);

    expect_bad("{\"__metadata__\":[\"a\"]}", 0, DS_EFORMAT, "__metadata__");
    expect_bad("{\"__metadata__\":\"pt\"}", 0, DS_EFORMAT, "__metadata__");
    expect_bad("{\"__metadata__\":{\"format\":\"pt\",\"n\":1}}", 0, DS_EFORMAT, "'n'");
    expect_bad("{\"__metadata__\":{\"n\":null}}", 0, DS_EFORMAT, "__metadata__");
}

/* ------------------------------------------------------------------------ */
/* ds_st_get                                                                  */

/* Tensors of a layer past the config's count are refused; other names are left alone. */
static void test_check_layers(void **state)
{
    (void)state;
    const unsigned char v[5] = { 0 };
    const char *p = write_st("layers.safetensors",
        "{\"model.layers.0.w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
        "\"model.layers.1.w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]},"
        "\"model.layers.9x.w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]},"
        "\"model.layers.norm\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[3,4]},"
        "\"layers.7.w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[4,5]}}", v, sizeof v);
    struct ds_st *st;
    assert_int_equal(ds_st_open_file(p, &st), 0);
    assert_int_equal(ds_st_check_layers(st, "model.layers.", 2, "n"), 0);
    assert_int_equal(ds_st_check_layers(st, "model.layers.", 1, "config.json's num_hidden_layers"), -DS_EFORMAT);
    assert_msg_has("tensor 'model.layers.1.w' belongs to a layer past the 1 that config.json's num_hidden_layers gives");
    assert_msg_has(p);
    assert_int_equal(ds_st_check_layers(st, "layers.", 7, "n"), -DS_EFORMAT);
    assert_int_equal(ds_st_check_layers(st, "layers.", 8, "n"), 0);
    ds_st_free(st);
}

static void test_get(void **state)
{
    const float v[6] = { 0 };
    const char *p = write_st("get.safetensors",
        "{\"m\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}", v, sizeof v);
    struct ds_st *st;
    const struct ds_tensor *t = (const struct ds_tensor *)&tmpdir;
    const int64_t want[2] = { 3, 2 }, want3[3] = { 2, 3, 1 };
    assert_int_equal(ds_st_open_file(p, &st), 0);

    assert_int_equal(ds_st_get(st, "nope", 2, want, &t), -DS_EFORMAT);
    assert_ptr_equal(t, (const struct ds_tensor *)&tmpdir);
    char expect[4200];
    snprintf(expect, sizeof expect, "file '%s': tensor 'nope' is missing", p);
    assert_string_equal(ds_errdetail(), expect);

    assert_int_equal(ds_st_get(st, "m", 2, want, &t), -DS_EFORMAT);
    assert_msg_has(p);
    assert_msg_has("tensor 'm'");
    assert_msg_has("[2, 3]");
    assert_msg_has("expected [3, 2]");
    assert_int_equal(ds_st_get(st, "m", 3, want3, &t), -DS_EFORMAT);
    assert_msg_has("expected [2, 3, 1]");
    assert_int_equal(ds_st_get(st, "m", 0, NULL, &t), -DS_EFORMAT);
    assert_msg_has("expected []");
    assert_int_equal(ds_st_get(st, "m", 1, NULL, &t), -DS_EINVAL);
    assert_int_equal(ds_st_get(st, "m", 9, want, &t), -DS_EINVAL);
    assert_ptr_equal(t, (const struct ds_tensor *)&tmpdir);
    ds_st_free(st);
}

/* ------------------------------------------------------------------------ */
/* Directories and sharded sets                                               */

static const char *mkdir_t(const char *name)
{
    const char *p = tpath(name);
    assert_int_equal(mkdir(p, 0700), 0);
    return p;
}

static const char SHARD_A[] =
    "{\"__metadata__\":{\"format\":\"pt\"},"
    "\"embed.weight\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,8]},"
    "\"layers.0.w\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[8,12]}}";
static const char SHARD_B[] =
    "{\"norm.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
static const char INDEX[] =
    "{\"metadata\":{\"total_size\":20},\"weight_map\":{"
    "\"embed.weight\":\"model-00001-of-00002.safetensors\","
    "\"layers.0.w\":\"model-00001-of-00002.safetensors\","
    "\"norm.weight\":\"model-00002-of-00002.safetensors\"}}";

static void write_sharded(const char *dir, const char *a, const char *b, const char *index)
{
    const uint16_t ad[6] = { 0x3f80, 0x4000, 0x4040, 0x4080, 0x3c00, 0xbc00 };
    const float bd[2] = { 0.5f, -0.5f };
    char name[512];
    snprintf(name, sizeof name, "%s/model-00001-of-00002.safetensors", dir);
    write_st(name, a, ad, sizeof ad);
    snprintf(name, sizeof name, "%s/model-00002-of-00002.safetensors", dir);
    write_st(name, b, bd, sizeof bd);
    snprintf(name, sizeof name, "%s/model.safetensors.index.json", dir);
    write_text(name, index);
}

static void test_sharded(void **state)
{
    mkdir_t("sh");
    write_sharded("sh", SHARD_A, SHARD_B, INDEX);
    /* a stale single file next to the index: the index wins */
    write_st("sh/model.safetensors", "{\"stale\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
             "x", 1);
    struct ds_st *st;
    assert_int_equal(ds_st_open_dir(tpath("sh"), &st), 0);
    assert_int_equal(ds_st_count(st), 3);
    assert_null(ds_st_find(st, "stale"));
    const struct ds_tensor *e = ds_st_find(st, "embed.weight"), *n = ds_st_find(st, "norm.weight");
    assert_non_null(e);
    assert_non_null(n);
    assert_non_null(strstr(e->file, "/sh/model-00001-of-00002.safetensors"));
    assert_non_null(strstr(n->file, "/sh/model-00002-of-00002.safetensors"));
    float out[4];
    ds_tensor_to_f32(e, 0, 4, out);
    assert_true(out[0] == 1 && out[1] == 2 && out[2] == 3 && out[3] == 4);
    ds_tensor_to_f32(n, 0, 2, out);
    assert_true(out[0] == 0.5f && out[1] == -0.5f);
    ds_tensor_to_f32(ds_st_find(st, "layers.0.w"), 0, 2, out);
    assert_true(out[0] == 1 && out[1] == -1);

    /* a missing tensor names the index */
    const struct ds_tensor *t;
    const int64_t s2[1] = { 2 };
    assert_int_equal(ds_st_get(st, "lm_head.weight", 1, s2, &t), -DS_EFORMAT);
    assert_msg_has("sh/model.safetensors.index.json");
    assert_msg_has("tensor 'lm_head.weight' is missing");
    /* a wrong shape names the shard */
    assert_int_equal(ds_st_get(st, "embed.weight", 1, s2, &t), -DS_EFORMAT);
    assert_msg_has("model-00001-of-00002.safetensors");
    ds_st_free(st);

    /* a trailing slash on the directory is fine */
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/", tpath("sh"));
    assert_int_equal(ds_st_open_dir(dir, &st), 0);
    ds_st_free(st);
}

static void test_single_dir(void **state)
{
    mkdir_t("single");
    write_st("single/model.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
             "\0\0\x80?", 4);
    struct ds_st *st = SENTINEL;
    assert_int_equal(ds_st_open_dir(tpath("single"), &st), 0);
    assert_int_equal(ds_st_count(st), 1);
    const struct ds_tensor *t;
    const int64_t s1[1] = { 1 };
    assert_int_equal(ds_st_get(st, "b", 1, s1, &t), -DS_EFORMAT);
    assert_msg_has("single/model.safetensors'");
    ds_st_free(st);

    /* a directory with neither file, a missing directory, a file instead of one */
    st = SENTINEL;
    mkdir_t("nothing");
    assert_int_equal(ds_st_open_dir(tpath("nothing"), &st), -DS_EIO);
    assert_msg_has(tpath("nothing"));
    assert_msg_has("model.safetensors.index.json");
    assert_int_equal(ds_st_open_dir(tpath("no-such-dir"), &st), -DS_EIO);
    assert_msg_has(tpath("no-such-dir"));
    assert_int_equal(ds_st_open_dir(tpath("single/model.safetensors"), &st), -DS_EIO);
    assert_msg_has("not a directory");
    assert_int_equal(ds_st_open_file(tpath("single"), &st), -DS_EIO);
    assert_msg_has("not a regular file");
    /* a FIFO is refused without blocking on the open */
    assert_int_equal(mkfifo(tpath("fifo.safetensors"), 0600), 0);
    assert_int_equal(ds_st_open_file(tpath("fifo.safetensors"), &st), -DS_EIO);
    assert_msg_has("not a regular file");
    assert_int_equal(ds_st_open_file(tpath("absent.safetensors"), &st), -DS_EIO);
    assert_msg_has(tpath("absent.safetensors"));
    assert_ptr_equal(st, SENTINEL);
}

/* Each bad index: refused with code, the message containing needle and more. */
static void expect_bad_set(const char *dir, const char *a, const char *b, const char *index,
                           int code, const char *n1, const char *n2)
{
    struct ds_st *st = SENTINEL;
    mkdir_t(dir);
    write_sharded(dir, a, b, index);
    assert_int_equal(ds_st_open_dir(tpath(dir), &st), -code);
    assert_ptr_equal(st, SENTINEL);
    if (n1)
        assert_msg_has(n1);
    if (n2)
        assert_msg_has(n2);
}

static void test_sharded_bad(void **state)
{
    const char *ix = "model.safetensors.index.json'";
    expect_bad_set("b1", SHARD_A, SHARD_B, "{\"weight_map\":", DS_EFORMAT, ix, "not valid JSON");
    expect_bad_set("b2", SHARD_A, SHARD_B, "[]", DS_EFORMAT, ix, "not a JSON object");
    expect_bad_set("b3", SHARD_A, SHARD_B, "{\"metadata\":{}}", DS_EFORMAT, ix, "weight_map");
    expect_bad_set("b4", SHARD_A, SHARD_B, "{\"weight_map\":[]}", DS_EFORMAT, ix, "weight_map");
    expect_bad_set("b5", SHARD_A, SHARD_B, "{\"weight_map\":{}}", DS_EFORMAT, ix, "empty");
    expect_bad_set("b6", SHARD_A, SHARD_B, "{\"weight_map\":{\"x\":1}}", DS_EFORMAT, ix, "tensor 'x'");
    expect_bad_set("b7", SHARD_A, SHARD_B, "{\"metadata\":3,\"weight_map\":{\"x\":\"a\"}}", DS_EFORMAT,
                   ix, "metadata");
    /* shard names that leave the directory */
    expect_bad_set("b8", SHARD_A, SHARD_B, "{\"weight_map\":{\"x\":\"../b1/model-00001-of-00002.safetensors\"}}",
                   DS_EFORMAT, "tensor 'x'", "../b1");
    expect_bad_set("b9", SHARD_A, SHARD_B, "{\"weight_map\":{\"x\":\"/etc/passwd\"}}", DS_EFORMAT,
                   "tensor 'x'", "/etc/passwd");
    expect_bad_set("b10", SHARD_A, SHARD_B, "{\"weight_map\":{\"x\":\"..\"}}", DS_EFORMAT, "tensor 'x'", NULL);
    expect_bad_set("b11", SHARD_A, SHARD_B, "{\"weight_map\":{\"x\":\"\"}}", DS_EFORMAT, "tensor 'x'", NULL);
    /* a shard file that does not exist */
    expect_bad_set("b12", SHARD_A, SHARD_B,
                   "{\"weight_map\":{\"embed.weight\":\"model-00003-of-00002.safetensors\"}}", DS_EIO,
                   "b12/model-00003-of-00002.safetensors'", NULL);
    /* a tensor listed in the index but absent from its shard */
    expect_bad_set("b13", SHARD_A, SHARD_B,
                   "{\"weight_map\":{\"embed.weight\":\"model-00001-of-00002.safetensors\","
                   "\"lm_head.weight\":\"model-00002-of-00002.safetensors\"}}", DS_EFORMAT,
                   ix, "tensor 'lm_head.weight' is missing from shard");
    /* a tensor mapped to the wrong shard */
    expect_bad_set("b14", SHARD_A, SHARD_B,
                   "{\"weight_map\":{\"embed.weight\":\"model-00002-of-00002.safetensors\","
                   "\"layers.0.w\":\"model-00001-of-00002.safetensors\","
                   "\"norm.weight\":\"model-00002-of-00002.safetensors\"}}", DS_EFORMAT,
                   ix, "tensor 'embed.weight' is mapped to shard 'model-00002-of-00002.safetensors'");
    assert_msg_has("stored in");
    /* the same tensor in two shards */
    expect_bad_set("b15", SHARD_A,
                   "{\"norm.weight\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                   "\"layers.0.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                   INDEX, DS_EFORMAT, "tensor 'layers.0.w' is in both", "model-00002-of-00002.safetensors");
    assert_msg_has("model-00001-of-00002.safetensors");
    assert_msg_has(ix);
    /* ... also when the index does not list it */
    expect_bad_set("b18",
                   "{\"embed.weight\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,8]},"
                   "\"layers.0.w\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[8,12]},"
                   "\"extra\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[12,12]}}",
                   "{\"norm.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                   "\"extra\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}",
                   INDEX, DS_EFORMAT, "tensor 'extra' is in both", ix);
    /* a malformed shard: the message names the shard and the tensor */
    expect_bad_set("b16", SHARD_A,
                   "{\"norm.weight\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}",
                   INDEX, DS_EFORMAT, "b16/model-00002-of-00002.safetensors'", "tensor 'norm.weight'");
    /* duplicate keys in the index */
    expect_bad_set("b17", SHARD_A, SHARD_B,
                   "{\"weight_map\":{\"norm.weight\":\"model-00002-of-00002.safetensors\","
                   "\"norm.weight\":\"model-00002-of-00002.safetensors\"}}", DS_EFORMAT, ix, "duplicate");
}

/* ------------------------------------------------------------------------ */
/* Scalar conversions against independent references                          */

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bitsf(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE binary16 by its definition: (-1)^s * 2^(e-15) * 1.m, subnormals 2^-14 * 0.m. */
static double ref_f16(uint16_t h, bool *nan)
{
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    *nan = false;
    if (e == 31) {
        if (m) {
            *nan = true;
            return 0;
        }
        v = INFINITY;
    } else if (e == 0) {
        v = ldexp(m, -24);
    } else {
        v = ldexp(1024 + m, e - 25);
    }
    return s ? -v : v;
}

/* bfloat16: 8 exponent bits (bias 127) and 7 mantissa bits. */
static double ref_bf16(uint16_t h, bool *nan)
{
    int s = h >> 15, e = (h >> 7) & 255, m = h & 127;
    double v;
    *nan = false;
    if (e == 255) {
        if (m) {
            *nan = true;
            return 0;
        }
        v = INFINITY;
    } else if (e == 0) {
        v = ldexp(m, -133);
    } else {
        v = ldexp(128 + m, e - 134);
    }
    return s ? -v : v;
}

static void test_f16_exhaustive(void **state)
{
    for (uint32_t h = 0; h < 65536; h++) {
        bool nan;
        double want = ref_f16((uint16_t)h, &nan);
        float got = ds_f16_to_f32((uint16_t)h);
        if (nan) {
            /* NaN stays NaN, keeping sign and payload (shifted up 13 bits) */
            uint32_t want_bits = ((h & 0x8000u) << 16) | 0x7f800000u | ((h & 0x3ffu) << 13);
            if (!isnan(got) || fbits(got) != want_bits)
                fail_msg("f16 0x%04x: got bits 0x%08x, want NaN 0x%08x", h, fbits(got), want_bits);
        } else if ((double)got != want || !signbit(got) != !signbit(want)) {
            fail_msg("f16 0x%04x: got %a, want %a", h, (double)got, want);
        }
    }
}

static void test_bf16_exhaustive(void **state)
{
    for (uint32_t h = 0; h < 65536; h++) {
        bool nan;
        double want = ref_bf16((uint16_t)h, &nan);
        float got = ds_bf16_to_f32((uint16_t)h);
        if (nan) {
            assert_true(isnan(got));
            /* and back: NaN stays NaN */
            uint16_t b = ds_f32_to_bf16(got);
            assert_true((b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0);
            continue;
        }
        if ((double)got != want || !signbit(got) != !signbit(want))
            fail_msg("bf16 0x%04x: got %a, want %a", h, (double)got, want);
        /* every bf16 value round-trips exactly */
        if (ds_f32_to_bf16(got) != h)
            fail_msg("bf16 0x%04x: round trip gives 0x%04x", h, ds_f32_to_bf16(got));
    }
}

/* f32 -> bf16, round to nearest even, from first principles: compare the
 * distances to the two neighbouring bf16 values in double precision. */
static uint16_t ref_f32_to_bf16(float f)
{
    uint32_t u = fbits(f);
    if (isnan(f))
        return 0x7fc0;
    uint32_t lo = u & 0xffff0000u;             /* toward zero */
    if (lo == u)
        return (uint16_t)(u >> 16);
    uint32_t hi = lo + 0x10000u;               /* away from zero (may be inf) */
    double a = fabs((double)f);
    double vlo = fabs((double)bitsf(lo));
    double vhi = (hi & 0x7fffffffu) == 0x7f800000u ? ldexp(1, 128) : fabs((double)bitsf(hi));
    double dlo = a - vlo, dhi = vhi - a;
    if (dlo < dhi)
        return (uint16_t)(lo >> 16);
    if (dhi < dlo)
        return (uint16_t)(hi >> 16);
    return (uint16_t)(((lo >> 16) & 1) ? hi >> 16 : lo >> 16);
}

static void check_round(uint32_t u)
{
    float f = bitsf(u);
    uint16_t got = ds_f32_to_bf16(f), want = ref_f32_to_bf16(f);
    if (isnan(f)) {
        if ((got & 0x7f80) != 0x7f80 || (got & 0x7f) == 0)
            fail_msg("f32 0x%08x (NaN) gives 0x%04x, not a NaN", u, got);
    } else if (got != want) {
        fail_msg("f32 0x%08x (%a) gives bf16 0x%04x, want 0x%04x", u, (double)f, got, want);
    }
}

static void test_f32_to_bf16(void **state)
{
    /* around every bf16 value: exactly halfway (ties to even), just above and below */
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t b = h << 16;
        check_round(b | 0x8000);
        check_round(b | 0x8001);
        check_round(b | 0x7fff);
        check_round(b | 0x0001);
        check_round(b | 0xffff);
    }
    /* a sweep of the whole 32-bit space */
    for (uint64_t u = 0; u <= 0xffffffffu; u += 4093)
        check_round((uint32_t)u);

    assert_int_equal(ds_f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(ds_f32_to_bf16(-0.0f), 0x8000);
    assert_int_equal(ds_f32_to_bf16(INFINITY), 0x7f80);
    assert_int_equal(ds_f32_to_bf16(-INFINITY), 0xff80);
    assert_int_equal(ds_f32_to_bf16(bitsf(0x3f808000)), 0x3f80);   /* tie, even below */
    assert_int_equal(ds_f32_to_bf16(bitsf(0x3f818000)), 0x3f82);   /* tie, even above */
    assert_int_equal(ds_f32_to_bf16(bitsf(0x7f7fffff)), 0x7f80);   /* FLT_MAX overflows to inf */
    /* a NaN whose payload sits only in the low bits must not become inf */
    assert_int_equal(ds_f32_to_bf16(bitsf(0x7f800001)), 0x7fc0);
    assert_int_equal(ds_f32_to_bf16(bitsf(0xffffffff)), 0x7fc0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_f32),
        cmocka_unit_test(test_valid_f16_bf16),
        cmocka_unit_test(test_unaligned),
        cmocka_unit_test(test_valid_edge_cases),
        cmocka_unit_test(test_all_dtypes),
        cmocka_unit_test(test_bad_sizes),
        cmocka_unit_test(test_bad_header_text),
        cmocka_unit_test(test_bad_entries),
        cmocka_unit_test(test_bad_overlap_and_metadata),
        cmocka_unit_test(test_check_layers),
        cmocka_unit_test(test_get),
        cmocka_unit_test(test_sharded),
        cmocka_unit_test(test_single_dir),
        cmocka_unit_test(test_sharded_bad),
        cmocka_unit_test(test_f16_exhaustive),
        cmocka_unit_test(test_bf16_exhaustive),
        cmocka_unit_test(test_f32_to_bf16),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
