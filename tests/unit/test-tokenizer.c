/* test-tokenizer.c: the Qwen3 tokenizer against the real tokenizer.json.
 *
 * Built twice from this file:
 *   test-tokenizer            hand-checked ids, round trips of the hard strings,
 *                             added-token flags, chat rendering, errors, threads;
 *   test-tokenizer-reference  (DS_TEST_REFERENCE) every string of the Hugging Face
 *                             `tokenizers` fixture tests/data/tokenizer/
 *                             qwen3-reference.jsonl.xz, made by
 *                             tools/fixtures/tokenizer_reference.py; skipped
 *                             while that fixture is absent.
 * Both skip when the Qwen3 tokenizer.json is absent (setup.sh fetches it). */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <utf8proc.h>

#include "testutil.h"
#include "dspark/ds-tokenizer.h"

static struct ds_tokenizer *tok;
static const char *tok_path;

/* Print ids on failure. */
static void show_ids(const char *what, const int32_t *ids, size_t n)
{
    char buf[4096];
    size_t o = 0;
    for (size_t i = 0; i < n && o < sizeof buf - 16; i++)
        o += (size_t)snprintf(buf + o, sizeof buf - o, "%s%d", i ? "," : "", (int)ids[i]);
    print_message("%s: [%s]\n", what, buf);
}

static bool ids_equal(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

static void encode_ok(const struct ds_tokenizer *t, const char *s, size_t n, int32_t **ids, size_t *ni)
{
    int r = ds_tokenizer_encode(t, s, n, ids, ni);
    if (r < 0)
        print_message("encode failed: %s\n", ds_errdetail());
    assert_int_equal(r, 0);
}

/* Build a tokenizer.json: the real one with extra added tokens appended,
 * and with its split regex wrapped in "(?:...)" when wrap is set (the same
 * language, but the encoder then leaves all splitting to PCRE2). */
static struct ds_tokenizer *load_variant(json_t *extra, bool wrap, char **dir_out)
{
    json_error_t err;
    json_t *doc = json_load_file(tok_path, 0, &err);
    assert_non_null(doc);
    json_t *added = json_object_get(doc, "added_tokens");
    assert_true(json_is_array(added));
    if (extra)
        json_array_extend(added, extra);
    if (wrap) {
        json_t *seq = json_object_get(json_object_get(doc, "pre_tokenizer"), "pretokenizers");
        json_t *pat = json_object_get(json_object_get(json_array_get(seq, 0), "pattern"), "Regex");
        assert_true(json_is_string(pat));
        char *w = malloc(json_string_length(pat) + 8);
        sprintf(w, "(?:%s)", json_string_value(pat));
        json_string_set(pat, w);
        free(w);
    }
    char *dir = ds_test_tmpdir();
    assert_non_null(dir);
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    assert_int_equal(json_dump_file(doc, path, JSON_COMPACT), 0);
    json_decref(doc);
    struct ds_tokenizer *t = NULL;
    int r = ds_tokenizer_load(dir, &t);   /* a directory holding tokenizer.json */
    if (r < 0)
        print_message("load failed: %s\n", ds_errdetail());
    assert_int_equal(r, 0);
    *dir_out = dir;
    return t;
}

#ifdef DS_TEST_REFERENCE

static const char *fixture_path(void)
{
    return ds_test_path("tests/data/tokenizer/qwen3-reference.jsonl.xz");
}

/* Compare every fixture line of one variant ("" = the tokenizer as is). */
static void check_fixture(const struct ds_tokenizer *t, const char *variant, json_t **meta_out)
{
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "xz -dc '%s'", fixture_path());
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    char *line = NULL;
    size_t cap = 0, lineno = 0, checked = 0, bad = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        json_error_t err;
        json_t *v = json_loadb(line, (size_t)len, JSON_ALLOW_NUL, &err);
        if (!v) {
            print_message("fixture line %zu: %s\n", lineno, err.text);
            fail();
        }
        if (lineno == 1) {
            json_t *meta = json_object_get(v, "meta");
            assert_non_null(meta);
            if (meta_out)
                *meta_out = json_incref(meta);
            json_decref(v);
            continue;
        }
        const char *var = json_string_value(json_object_get(v, "variant"));
        if (strcmp(var ? var : "", variant) != 0) {
            json_decref(v);
            continue;
        }
        json_t *text = json_object_get(v, "text"), *ids = json_object_get(v, "ids");
        assert_true(json_is_string(text) && json_is_array(ids));
        size_t ne = json_array_size(ids), ni;
        int32_t *want = malloc((ne + 1) * sizeof *want), *got;
        for (size_t i = 0; i < ne; i++)
            want[i] = (int32_t)json_integer_value(json_array_get(ids, i));
        encode_ok(t, json_string_value(text), json_string_length(text), &got, &ni);
        if (!ids_equal(got, ni, want, ne)) {
            if (bad < 5) {
                size_t k = 0;
                while (k < ni && k < ne && got[k] == want[k])
                    k++;
                print_message("fixture line %zu differs at id %zu: text '%.120s'\n", lineno, k,
                              json_string_value(text));
                show_ids("  want", want + k, ne - k < 20 ? ne - k : 20);
                show_ids("  got ", got + k, ni - k < 20 ? ni - k : 20);
            }
            bad++;
        }
        checked++;
        free(want);
        free(got);
        json_decref(v);
    }
    free(line);
    assert_int_equal(pclose(f), 0);
    print_message("fixture variant '%s': %zu strings, %zu differ\n", *variant ? variant : "base", checked, bad);
    assert_true(checked > 0);
    assert_int_equal(bad, 0);
}

static void test_reference_ids(void **state)
{
    (void)state;
    json_t *meta = NULL;
    check_fixture(tok, "", &meta);
    print_message("fixture made with tokenizers %s\n",
                  json_string_value(json_object_get(meta, "tokenizers_version")));
    json_decref(meta);
}

static void test_reference_flags(void **state)
{
    (void)state;
    json_t *meta = NULL;
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "xz -dc '%s' | head -n 1", fixture_path());
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    json_error_t err;
    json_t *first = json_loadf(f, JSON_DISABLE_EOF_CHECK, &err);
    pclose(f);
    assert_non_null(first);
    meta = json_object_get(json_object_get(first, "meta"), "flags_added_tokens");
    assert_true(json_is_array(meta) && json_array_size(meta) > 0);
    char *dir;
    struct ds_tokenizer *t = load_variant(meta, false, &dir);
    json_decref(first);
    check_fixture(t, "flags", NULL);
    ds_tokenizer_free(t);
    ds_test_rmtree(dir);
    free(dir);
}

int main(void)
{
    tok_path = ds_test_qwen3_tokenizer();
    if (!tok_path)
        ds_test_skip_all("Qwen3 tokenizer.json not found (run setup.sh or set DS_QWEN3_TOKENIZER)");
    if (access(fixture_path(), R_OK) != 0)
        ds_test_skip_all("no reference fixture '%s' yet: make it with tools/fixtures/tokenizer_reference.py",
                         fixture_path());
    if (system("xz --version >/dev/null 2>&1") != 0)
        ds_test_skip_all("xz is not installed (needed to read the reference fixture)");
    if (ds_tokenizer_load(tok_path, &tok) < 0) {
        fprintf(stderr, "cannot load '%s': %s\n", tok_path, ds_errdetail());
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_ids),
        cmocka_unit_test(test_reference_flags),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    ds_tokenizer_free(tok);
    return r;
}

#else /* !DS_TEST_REFERENCE */

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* The hard strings of tests/data/tokenizer/hard-strings.jsonl. */
static json_t *hard;

static void load_hard(void)
{
    FILE *f = fopen(ds_test_path("tests/data/tokenizer/hard-strings.jsonl"), "r");
    if (!f)
        return;
    hard = json_array();
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, f)) >= 0) {
        json_error_t err;
        json_t *s = json_loadb(line, (size_t)len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
        if (json_is_string(s))
            json_array_append_new(hard, s);
        else
            json_decref(s);
    }
    free(line);
    fclose(f);
}

/* Ids checked by hand against the vocab ("Hello" 9707, "," 11, " world" 1879,
 * "!" 0, " " 220, "\n" 198, "\n\n" 271, "it" 275, "'s" 594, "1" 16, " my" 847)
 * and against an independent implementation. */
static void test_known_ids(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        int32_t ids[16];
        size_t n;
    } cases[] = {
        { "Hello, world!", { 9707, 11, 1879, 0 }, 4 },
        { "", { 0 }, 0 },
        { " ", { 220 }, 1 },
        { "\n", { 198 }, 1 },
        { "\n\n", { 271 }, 1 },
        { "<|im_start|>user\nhi<|im_end|>\n", { 151644, 872, 198, 6023, 151645, 198 }, 6 },
        { "<|endoftext|>", { 151643 }, 1 },
        { "a<|endoftext|>b", { 64, 151643, 65 }, 3 },
        { "<think>\n\n</think>\n\n", { 151667, 271, 151668, 271 }, 4 },
        { "it's", { 275, 594 }, 2 },
        { "12345", { 16, 17, 18, 19, 20 }, 5 },
        { "caf\xc3\xa9", { 924, 58858 }, 2 },
        /* NFC: "e" + U+0301 becomes U+00E9 before BPE */
        { "cafe\xcc\x81", { 924, 58858 }, 2 },
        { "Hello, my dog is cute", { 9707, 11, 847, 5562, 374, 18838 }, 6 },
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        int32_t *ids;
        size_t n;
        encode_ok(tok, cases[i].text, strlen(cases[i].text), &ids, &n);
        if (!ids_equal(ids, n, cases[i].ids, cases[i].n)) {
            print_message("case %zu '%s'\n", i, cases[i].text);
            show_ids("got", ids, n);
            show_ids("want", cases[i].ids, cases[i].n);
            fail();
        }
        free(ids);
    }
}

static void test_vocab(void **state)
{
    (void)state;
    assert_int_equal(ds_tokenizer_vocab_size(tok), 151669);
    assert_int_equal(ds_tokenizer_token_id(tok, "Hello"), 9707);
    assert_int_equal(ds_tokenizer_token_id(tok, "\xc4\xa0world"), 1879);   /* "Ġworld" */
    assert_int_equal(ds_tokenizer_token_id(tok, "<|im_start|>"), 151644);
    assert_int_equal(ds_tokenizer_token_id(tok, "<|im_end|>"), 151645);
    assert_int_equal(ds_tokenizer_token_id(tok, "</think>"), 151668);
    assert_int_equal(ds_tokenizer_token_id(tok, "no such token at all"), -1);
    assert_true(ds_tokenizer_is_special(tok, 151643));
    assert_true(ds_tokenizer_is_special(tok, 151645));
    assert_false(ds_tokenizer_is_special(tok, 151657));   /* <tool_call> is not special */
    assert_false(ds_tokenizer_is_special(tok, 151667));   /* <think> */
    assert_false(ds_tokenizer_is_special(tok, 9707));
    assert_false(ds_tokenizer_is_special(tok, -1));
    assert_false(ds_tokenizer_is_special(tok, 1 << 30));
}

static void test_token_bytes(void **state)
{
    (void)state;
    char buf[256];
    assert_int_equal(ds_tokenizer_token_bytes(tok, 220, buf, sizeof buf), 1);
    assert_memory_equal(buf, " ", 1);
    assert_int_equal(ds_tokenizer_token_bytes(tok, 1879, buf, sizeof buf), 6);
    assert_memory_equal(buf, " world", 6);
    assert_int_equal(ds_tokenizer_token_bytes(tok, 151644, buf, sizeof buf), 12);
    assert_memory_equal(buf, "<|im_start|>", 12);
    assert_int_equal(ds_tokenizer_token_bytes(tok, 151669, buf, sizeof buf), -DS_EINVAL);
    assert_int_equal(ds_tokenizer_token_bytes(tok, -5, buf, sizeof buf), -DS_EINVAL);
    assert_int_equal(ds_tokenizer_token_bytes(tok, 1879, buf, 3), -DS_ELIMIT);
    /* every token fits the documented 256 bytes */
    for (int32_t id = 0; id < ds_tokenizer_vocab_size(tok); id++)
        assert_true(ds_tokenizer_token_bytes(tok, id, buf, sizeof buf) >= 1);
}

/* A partial UTF-8 character decodes to its raw bytes. */
static void test_decode_partial(void **state)
{
    (void)state;
    const char *s = "\xf0\x93\x80\x80";   /* U+13000, not one token */
    int32_t *ids;
    size_t n;
    encode_ok(tok, s, strlen(s), &ids, &n);
    assert_true(n >= 2);
    char *text;
    size_t len;
    assert_int_equal(ds_tokenizer_decode(tok, ids, 1, &text, &len), 0);
    assert_true(len >= 1 && len < 4);
    assert_memory_equal(text, s, len);
    free(text);
    assert_int_equal(ds_tokenizer_decode(tok, ids, n, &text, &len), 0);
    assert_int_equal(len, 4);
    assert_string_equal(text, s);
    free(text);
    free(ids);
    int32_t bad[] = { 9707, 151669 };
    assert_int_equal(ds_tokenizer_decode(tok, bad, 2, &text, &len), -DS_EINVAL);
    /* an output's text skips ids past the tokenizer's, as tokenizers' decode does */
    int32_t mixed[] = { 9707, 151669, 9707, -1 };
    char *one;
    size_t one_len;
    assert_int_equal(ds_tokenizer_decode(tok, mixed, 1, &one, &one_len), 0);
    assert_int_equal(ds_tokenizer_decode_known(tok, mixed, 4, &text, &len), 0);
    assert_int_equal(len, 2 * one_len);
    assert_memory_equal(text, one, one_len);
    assert_memory_equal(text + one_len, one, one_len);
    free(one);
    free(text);
    assert_int_equal(ds_tokenizer_decode(tok, bad, 0, &text, &len), 0);
    assert_int_equal(len, 0);
    assert_string_equal(text, "");
    free(text);
}

/* NFC of s as the encoder applies it: per piece between added tokens. */
static char *nfc_pieces(const char *s, size_t n, size_t *ret_len)
{
    static const char *specials[32];
    static size_t nspec;
    if (!nspec) {
        for (int32_t id = 151643; id <= 151668; id++) {
            char buf[256];
            int l = ds_tokenizer_token_bytes(tok, id, buf, sizeof buf);
            assert_true(l > 0);
            specials[nspec++] = strndup(buf, (size_t)l);
        }
    }
    char *out = malloc(n * 3 + 16);
    size_t o = 0, from = 0, i = 0;
    while (i <= n) {
        size_t best = 0;
        for (size_t k = 0; k < nspec && i < n; k++) {
            size_t l = strlen(specials[k]);
            if (l <= n - i && memcmp(s + i, specials[k], l) == 0 && l > best)
                best = l;
        }
        if (best || i == n) {
            if (i > from) {
                utf8proc_uint8_t *norm;
                utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s + from, (utf8proc_ssize_t)(i - from),
                                                  &norm, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
                assert_true(m >= 0);
                out = realloc(out, o + (size_t)m + n * 3 + 16);
                memcpy(out + o, norm, (size_t)m);
                o += (size_t)m;
                free(norm);
            }
            memcpy(out + o, s + i, best);
            o += best;
            i += best ? best : 1;
            from = i;
        } else {
            i++;
        }
    }
    out[o] = 0;
    *ret_len = o;
    return out;
}

/* decode(encode(s)) == NFC(s) for every hard string. */
static void test_roundtrip(void **state)
{
    (void)state;
    if (!hard)
        fail_msg("cannot read tests/data/tokenizer/hard-strings.jsonl");
    assert_true(json_array_size(hard) >= 500);
    size_t i, bad = 0;
    json_t *v;
    json_array_foreach(hard, i, v) {
        const char *s = json_string_value(v);
        size_t n = json_string_length(v), ni, dl, el;
        int32_t *ids;
        char *dec;
        encode_ok(tok, s, n, &ids, &ni);
        assert_int_equal(ds_tokenizer_decode(tok, ids, ni, &dec, &dl), 0);
        char *want = nfc_pieces(s, n, &el);
        if (dl != el || memcmp(dec, want, dl) != 0) {
            if (bad++ < 5)
                print_message("hard string %zu does not round-trip: '%.80s'\n", i, s);
        }
        /* an id never exceeds the vocabulary, and no piece is lost */
        for (size_t k = 0; k < ni; k++)
            assert_true(ids[k] >= 0 && ids[k] < ds_tokenizer_vocab_size(tok));
        free(want);
        free(dec);
        free(ids);
    }
    assert_int_equal(bad, 0);
}

/* Long runs take the heap merge and a larger regex stack. */
static void test_long_inputs(void **state)
{
    (void)state;
    static const char *units[] = { " ", "a", "\n", "ab", "\xe4\xb8\xad", "!", " \n", "\xc2\xa0", "1", "e\xcc\x81" };
    for (size_t u = 0; u < ARRAY_LEN(units); u++) {
        size_t ul = strlen(units[u]), reps = 200000 / ul;
        char *s = malloc(ul * reps + 1);
        for (size_t k = 0; k < reps; k++)
            memcpy(s + k * ul, units[u], ul);
        s[ul * reps] = 0;
        int32_t *ids;
        size_t n, dl, el;
        char *dec;
        encode_ok(tok, s, ul * reps, &ids, &n);
        assert_true(n > 0 && n <= ul * reps);
        assert_int_equal(ds_tokenizer_decode(tok, ids, n, &dec, &dl), 0);
        char *want = nfc_pieces(s, ul * reps, &el);
        assert_int_equal(dl, el);
        assert_memory_equal(dec, want, dl);
        free(want);
        free(dec);
        free(ids);
        free(s);
    }
    /* a run of n spaces is the same tokens at any length that splits alike */
    int32_t *a, *b;
    size_t na, nb;
    encode_ok(tok, "                                x", 33, &a, &na);   /* 32 spaces */
    assert_int_equal(na, 2);
    assert_int_equal(a[0], ds_tokenizer_token_id(tok, "\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0"
                                                      "\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0"
                                                      "\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0"
                                                      "\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0\xc4\xa0"
                                                      "\xc4\xa0\xc4\xa0\xc4\xa0"));
    assert_int_equal(a[1], ds_tokenizer_token_id(tok, "\xc4\xa0x"));
    encode_ok(tok, "a                                ", 33, &b, &nb);   /* trailing run stays whole */
    assert_int_equal(nb, 2);
    assert_int_equal(b[0], 64);
    free(a);
    free(b);
}

static void test_invalid_utf8(void **state)
{
    (void)state;
    static const char *bad[] = {
        "\x80", "a\xbf", "\xc0\x80", "\xc1\xbf", "\xe0\x80\x80", "\xed\xa0\x80", "\xf0\x80\x80\x80",
        "\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\xff", "\xe4\xb8", "abc\xf0\x9f\x99",
    };
    for (size_t i = 0; i < ARRAY_LEN(bad); i++) {
        int32_t *ids = NULL;
        size_t n = 12345;
        assert_int_equal(ds_tokenizer_encode(tok, bad[i], strlen(bad[i]), &ids, &n), -DS_EINVAL);
        assert_null(ids);
        assert_int_equal(n, 12345);
        assert_non_null(strstr(ds_errdetail(), "UTF-8"));
    }
    /* a NUL byte is a character like any other */
    int32_t *ids;
    size_t n;
    encode_ok(tok, "a\0b", 3, &ids, &n);
    assert_int_equal(n, 3);
    free(ids);
}

static void test_load_errors(void **state)
{
    (void)state;
    struct ds_tokenizer *t = NULL;
    char *dir = ds_test_tmpdir(), path[4200];
    assert_non_null(dir);
    assert_int_equal(ds_tokenizer_load("/nonexistent/dir/tokenizer.json", &t), -DS_EIO);
    assert_null(t);
    assert_non_null(strstr(ds_errdetail(), "/nonexistent/dir/tokenizer.json"));
    assert_int_equal(ds_tokenizer_load(dir, &t), -DS_EIO);   /* directory without tokenizer.json */
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    static const struct {
        const char *json;
        int err;
    } cases[] = {
        { "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0", -DS_EFORMAT },
        { "[1, 2, 3]", -DS_EFORMAT },
        { "{}", -DS_ENOTSUP },
        { "{\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"use_regex\": true}}", -DS_EFORMAT },
        { "{\"pre_tokenizer\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"Unigram\", \"vocab\": []}}",
          -DS_ENOTSUP },
        { "{\"pre_tokenizer\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, "
          "\"b\": 1}, \"merges\": [[\"a\", \"c\"]]}}",
          -DS_EFORMAT },
        { "{\"pre_tokenizer\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -1}, "
          "\"merges\": []}}",
          -DS_EFORMAT },
        { "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\"}, \"behavior\": \"Isolated\"}}",
          -DS_ENOTSUP },
        { "{\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": "
          "{\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}, {\"type\": \"ByteLevel\", \"use_regex\": false}]}}",
          -DS_EFORMAT },
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        assert_int_equal(ds_test_write_file(path, cases[i].json, strlen(cases[i].json)), 0);
        int r = ds_tokenizer_load(path, &t);
        if (r != cases[i].err)
            print_message("case %zu: got %d (%s)\n", i, r, ds_errdetail());
        assert_int_equal(r, cases[i].err);
        assert_null(t);
    }
    ds_test_rmtree(dir);
    free(dir);
}

/* A small tokenizer.json written here: merges by rank, a missing byte. */
static void test_tiny_tokenizer(void **state)
{
    (void)state;
    /* "a"+"b" ranks before "b"+"c", so "abc" is ab,c; "bcd" is bc,d ("bc"+"d" has no merge) */
    const char *json =
        "{\"normalizer\": null, \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
        "\"use_regex\": true}, \"decoder\": {\"type\": \"ByteLevel\"}, \"added_tokens\": [{\"id\": 9, "
        "\"content\": \"<x>\", \"special\": true, \"normalized\": false}], \"model\": {\"type\": \"BPE\", "
        "\"vocab\": {\"a\": 0, \"b\": 1, \"c\": 2, \"d\": 3, \"ab\": 4, \"bc\": 5, \"abc\": 6, \"\xc4\xa0\": 7, "
        "\"\xc4\xa0\x61\": 8}, \"merges\": [\"a b\", [\"b\", \"c\"], [\"ab\", \"c\"], [\"\xc4\xa0\", \"a\"]]}}";
    char *dir = ds_test_tmpdir(), path[4200];
    snprintf(path, sizeof path, "%s/tok.json", dir);
    assert_int_equal(ds_test_write_file(path, json, strlen(json)), 0);
    struct ds_tokenizer *t;
    int r = ds_tokenizer_load(path, &t);
    if (r < 0)
        print_message("%s\n", ds_errdetail());
    assert_int_equal(r, 0);
    assert_int_equal(ds_tokenizer_vocab_size(t), 10);
    static const struct {
        const char *text;
        int32_t ids[8];
        size_t n;
    } cases[] = {
        { "abc", { 6 }, 1 },
        { "bcd", { 5, 3 }, 2 },
        { "abcd abc", { 6, 3, 7, 6 }, 4 },   /* "abcd", " abc": (a,b) ranks before (Ġ,a) */
        { "cab<x>a", { 2, 4, 9, 0 }, 4 },
        { "a\xc3\xa9z", { 0 }, 1 },          /* bytes missing from the vocab vanish */
    };
    for (size_t i = 0; i < ARRAY_LEN(cases); i++) {
        int32_t *ids;
        size_t n;
        encode_ok(t, cases[i].text, strlen(cases[i].text), &ids, &n);
        if (!ids_equal(ids, n, cases[i].ids, cases[i].n)) {
            print_message("tiny case %zu '%s'\n", i, cases[i].text);
            show_ids("got", ids, n);
            fail();
        }
        free(ids);
    }
    ds_tokenizer_free(t);
    ds_test_rmtree(dir);
    free(dir);
}

/* Split patterns: a literal ("String") splits, a regex of many \W compiles
 * (its translation outgrew its buffer: a heap overflow), a NUL is refused. */
static void test_split_patterns(void **state)
{
    (void)state;
    char *dir = ds_test_tmpdir(), path[4200], json[4096];
    snprintf(path, sizeof path, "%s/split.json", dir);
    static const char fmt[] =
        "{\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": "
        "{\"%s\": \"%s\"}, \"behavior\": \"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\", "
        "\"add_prefix_space\": false, \"use_regex\": false}]}, \"model\": {\"type\": \"BPE\", \"vocab\": "
        "{\"a\": 0, \"b\": 1, \"!\": 2, \"ab\": 3}, \"merges\": [[\"a\", \"b\"]]}}";
    struct ds_tokenizer *t;
    int32_t *ids;
    size_t n;
    /* "abab" split at each "b": a, b, a, b (unsplit, the merge makes ab, ab) */
    snprintf(json, sizeof json, fmt, "String", "b");
    assert_int_equal(ds_test_write_file(path, json, strlen(json)), 0);
    if (ds_tokenizer_load(path, &t) < 0)
        fail_msg("%s", ds_errdetail());
    encode_ok(t, "abab", 4, &ids, &n);
    const int32_t split[4] = { 0, 1, 0, 1 };
    assert_true(ids_equal(ids, n, split, 4));
    free(ids);
    ds_tokenizer_free(t);
    /* 200 \W in a row: each becomes a 25-byte class */
    char many[1024] = "";
    for (int i = 0; i < 200; i++)
        strcat(many, "\\\\W");
    snprintf(json, sizeof json, fmt, "Regex", many);
    assert_int_equal(ds_test_write_file(path, json, strlen(json)), 0);
    if (ds_tokenizer_load(path, &t) < 0)
        fail_msg("%s", ds_errdetail());
    encode_ok(t, "ab!", 3, &ids, &n);
    const int32_t plain[2] = { 3, 2 };
    assert_true(ids_equal(ids, n, plain, 2));
    free(ids);
    ds_tokenizer_free(t);
    /* a NUL in a pattern (PCRE2 read it as the pattern's end) */
    snprintf(json, sizeof json, fmt, "Regex", "a\\u0000b");
    assert_int_equal(ds_test_write_file(path, json, strlen(json)), 0);
    assert_int_equal(ds_tokenizer_load(path, &t), -DS_EFORMAT);
    assert_non_null(strstr(ds_errdetail(), "split pattern holds a NUL character"));
    ds_test_rmtree(dir);
    free(dir);
}

/* A split regex that backtracks through a capturing group on a long input
 * outgrows PCRE2's default JIT stack; the encoder retries with a larger one. */
static void test_regex_limits(void **state)
{
    (void)state;
    const char *json =
        "{\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": "
        "{\"Regex\": \"(?:(a)|b)+\"}, \"behavior\": \"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\", "
        "\"add_prefix_space\": false, \"use_regex\": false}]}, \"model\": {\"type\": \"BPE\", \"vocab\": "
        "{\"a\": 0, \"b\": 1, \"c\": 2, \"ab\": 3}, \"merges\": [[\"a\", \"b\"]]}}";
    char *dir = ds_test_tmpdir(), path[4200];
    snprintf(path, sizeof path, "%s/deep.json", dir);
    assert_int_equal(ds_test_write_file(path, json, strlen(json)), 0);
    struct ds_tokenizer *t;
    assert_int_equal(ds_tokenizer_load(path, &t), 0);
    size_t reps = 200000, n;
    char *s = malloc(reps * 2 + 2);
    for (size_t k = 0; k < reps; k++)
        memcpy(s + 2 * k, "ab", 2);
    memcpy(s + 2 * reps, "c", 2);
    int32_t *ids;
    encode_ok(t, s, reps * 2 + 1, &ids, &n);
    /* one split of 400000 letters (every "ab" merged), then "c" */
    assert_int_equal(n, reps + 1);
    for (size_t k = 0; k < reps; k++)
        assert_int_equal(ids[k], 3);
    assert_int_equal(ids[reps], 2);
    free(ids);
    free(s);
    ds_tokenizer_free(t);
    ds_test_rmtree(dir);
    free(dir);
}

/* Expected ids built from pieces: text pieces encoded by the plain tokenizer. */
struct piece {
    const char *text;   /* NULL: the added token below */
    int tok;            /* index into the extra tokens */
};

static void expect_pieces(const struct ds_tokenizer *t, const int32_t *extra_ids, const char *text,
                          const struct piece *p, size_t np)
{
    int32_t want[512];
    size_t nw = 0;
    for (size_t i = 0; i < np; i++) {
        if (!p[i].text) {
            want[nw++] = extra_ids[p[i].tok];
            continue;
        }
        int32_t *ids;
        size_t n;
        encode_ok(tok, p[i].text, strlen(p[i].text), &ids, &n);
        memcpy(want + nw, ids, n * sizeof *ids);
        nw += n;
        free(ids);
    }
    int32_t *got;
    size_t ng;
    encode_ok(t, text, strlen(text), &got, &ng);
    if (!ids_equal(got, ng, want, nw)) {
        print_message("added-token flags: '%s'\n", text);
        show_ids("got", got, ng);
        show_ids("want", want, nw);
        fail();
    }
    free(got);
}

/* single_word, lstrip, rstrip and normalized added tokens, split as the
 * reference library's AddedVocabulary does (its own unit tests' cases). */
static void test_added_flags(void **state)
{
    (void)state;
    json_error_t err;
    json_t *extra = json_loads(
        "[{\"id\": 151669, \"content\": \"<mask>\", \"single_word\": true, \"lstrip\": true, \"rstrip\": true, "
        "\"normalized\": false, \"special\": true},"
        " {\"id\": 151670, \"content\": \"<m1>\", \"single_word\": true, \"lstrip\": false, \"rstrip\": false, "
        "\"normalized\": false, \"special\": true},"
        " {\"id\": 151671, \"content\": \"caf\\u00e9\", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, "
        "\"normalized\": true, \"special\": false},"
        " {\"id\": 151672, \"content\": \"<|im_start|>x\", \"single_word\": false, \"lstrip\": false, "
        "\"rstrip\": false, \"normalized\": false, \"special\": true}]",
        0, &err);
    assert_non_null(extra);
    char *dir;
    struct ds_tokenizer *t = load_variant(extra, false, &dir);
    json_decref(extra);
    const int32_t ids[] = { 151669, 151670, 151671, 151672 };
    assert_int_equal(ds_tokenizer_vocab_size(t), 151673);
    assert_true(ds_tokenizer_is_special(t, 151669));
    assert_false(ds_tokenizer_is_special(t, 151671));

    /* strips take the whitespace around, Unicode spaces included */
    const struct piece p1[] = { { "Hi", 0 }, { NULL, 0 }, { "there", 0 }, { NULL, 0 }, { NULL, 0 } };
    expect_pieces(t, ids, "Hi <mask> there\t<mask>\t<mask>\xe2\x80\x80", p1, ARRAY_LEN(p1));
    /* single_word: only between non-word characters */
    const struct piece p2[] = { { NULL, 1 }, { " My name ", 0 }, { NULL, 1 }, { " A<m1> <m1>ony ", 0 },
                                { NULL, 1 } };
    expect_pieces(t, ids, "<m1> My name <m1> A<m1> <m1>ony <m1>", p2, ARRAY_LEN(p2));
    const struct piece p3[] = { { NULL, 1 }, { ", ", 0 }, { NULL, 1 }, { "- \xe2\x97\x8c\xcc\xb0<m1>", 0 } };
    expect_pieces(t, ids, "<m1>, <m1>- \xe2\x97\x8c\xcc\xb0<m1>", p3, ARRAY_LEN(p3));
    /* normalized: matched after NFC */
    const struct piece p4[] = { { NULL, 2 }, { " ", 0 }, { NULL, 2 }, { " CAF\xc3\x89 ", 0 }, { NULL, 2 },
                                { "s", 0 } };
    expect_pieces(t, ids, "caf\xc3\xa9 cafe\xcc\x81 CAF\xc3\x89 caf\xc3\xa9s", p4, ARRAY_LEN(p4));
    /* longest match first */
    const struct piece p5[] = { { NULL, 3 }, { " ", 0 }, { "<|im_start|>y", 0 }, { NULL, 3 }, { "x", 0 } };
    expect_pieces(t, ids, "<|im_start|>x <|im_start|>y<|im_start|>xx", p5, ARRAY_LEN(p5));
    ds_tokenizer_free(t);
    ds_test_rmtree(dir);
    free(dir);
}

static void check_same(const struct ds_tokenizer *a, const struct ds_tokenizer *b, const char *s, size_t n,
                       size_t *bad)
{
    int32_t *x, *y;
    size_t nx, ny;
    encode_ok(a, s, n, &x, &nx);
    encode_ok(b, s, n, &y, &ny);
    if (!ids_equal(x, nx, y, ny) && (*bad)++ < 5) {
        print_message("ASCII fast path differs from PCRE2 on '%.*s' (%zu bytes)\n", (int)(n < 80 ? n : 80), s, n);
        show_ids("fast", x, nx);
        show_ids("pcre2", y, ny);
    }
    free(x);
    free(y);
}

/* The ASCII fast path splits exactly as PCRE2 does: every string of up to 4
 * symbols from a set that covers each class and each alternative (and the
 * non-ASCII boundary), random longer ones, and the hard strings. */
static void test_fast_path(void **state)
{
    (void)state;
    static const char *sym[] = { "a", "S", "l", "e", "'", "0", " ", "\t", "\n", "\r", "!", "\x0b", "\x1f",
                                 "\xc3\xa9", "\xc2\xa0", "\xe2\x80\x99", "\xc5\xbf", "\xc2\x85" };
    const size_t ns = ARRAY_LEN(sym);
    char *dir;
    struct ds_tokenizer *slow = load_variant(NULL, true, &dir);
    size_t bad = 0, count = 0;
    char buf[64];
    for (size_t len = 1; len <= 4; len++) {
        size_t total = 1;
        for (size_t k = 0; k < len; k++)
            total *= ns;
        for (size_t code = 0; code < total; code++) {
            size_t o = 0, c = code;
            for (size_t k = 0; k < len; k++, c /= ns) {
                size_t l = strlen(sym[c % ns]);
                memcpy(buf + o, sym[c % ns], l);
                o += l;
            }
            check_same(tok, slow, buf, o, &bad);
            count++;
        }
    }
    uint64_t x = 88172645463325252ull;
    for (int k = 0; k < 20000; k++) {
        size_t o = 0, len = 5 + k % 12;
        for (size_t j = 0; j < len; j++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            /* mostly ASCII symbols, now and then a non-ASCII one */
            const char *t = sym[x % 100 < 90 ? x % 13 : 13 + x % 5];
            memcpy(buf + o, t, strlen(t));
            o += strlen(t);
        }
        check_same(tok, slow, buf, o, &bad);
        count++;
    }
    size_t i;
    json_t *v;
    json_array_foreach(hard, i, v) {
        check_same(tok, slow, json_string_value(v), json_string_length(v), &bad);
        count++;
    }
    print_message("%zu strings compared\n", count);
    assert_int_equal(bad, 0);
    ds_tokenizer_free(slow);
    ds_test_rmtree(dir);
    free(dir);
}

struct thread_arg {
    size_t from, to;
    int32_t **ids;
    size_t *n;
    int fails;
};

static void *encode_range(void *p)
{
    struct thread_arg *a = p;
    for (int round = 0; round < 2; round++)
        for (size_t i = a->from; i < a->to; i++) {
            json_t *v = json_array_get(hard, i);
            int32_t *ids;
            size_t n;
            if (ds_tokenizer_encode(tok, json_string_value(v), json_string_length(v), &ids, &n) < 0 ||
                !ids_equal(ids, n, a->ids[i], a->n[i]))
                a->fails++;
            free(ids);
        }
    return NULL;
}

/* Four threads share one tokenizer and agree with one thread. */
static void test_threads(void **state)
{
    (void)state;
    assert_non_null(hard);
    size_t n = json_array_size(hard);
    int32_t **ids = calloc(n, sizeof *ids);
    size_t *cnt = calloc(n, sizeof *cnt);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(hard, i);
        encode_ok(tok, json_string_value(v), json_string_length(v), &ids[i], &cnt[i]);
    }
    pthread_t th[4];
    struct thread_arg args[4];
    for (int k = 0; k < 4; k++) {
        /* overlapping ranges, so threads race on the same words */
        args[k] = (struct thread_arg){ .from = (size_t)k * n / 8, .to = n - (size_t)(3 - k) * n / 8, .ids = ids,
                                       .n = cnt };
        assert_int_equal(pthread_create(&th[k], NULL, encode_range, &args[k]), 0);
    }
    for (int k = 0; k < 4; k++) {
        pthread_join(th[k], NULL);
        assert_int_equal(args[k].fails, 0);
    }
    for (size_t i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
    free(cnt);
}

static void check_chat(const struct ds_chat_message *m, size_t n, bool gen, bool think, const char *want)
{
    char *got = NULL;
    int r = ds_chat_render(m, n, gen, think, &got);
    if (r < 0)
        print_message("render failed: %s\n", ds_errdetail());
    assert_int_equal(r, 0);
    assert_string_equal(got, want);
    free(got);
}

static void test_chat(void **state)
{
    (void)state;
    const struct ds_chat_message one[] = { { "user", "What is 2+2?" } };
    check_chat(one, 1, true, false,
               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
    check_chat(one, 1, true, true, "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n");
    check_chat(one, 1, false, false, "<|im_start|>user\nWhat is 2+2?<|im_end|>\n");

    const struct ds_chat_message sys[] = { { "system", "Be brief." }, { "user", "Hi" } };
    check_chat(sys, 2, true, false,
               "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\n<think>\n\n</think>\n\n");

    /* earlier assistant turns lose their reasoning; a later system message is a turn */
    const struct ds_chat_message multi[] = {
        { "user", "Q1" },
        { "assistant", "<think>\nstep one\n</think>\n\nA1" },
        { "system", "Now in French." },
        { "user", "Q2" },
    };
    check_chat(multi, 4, true, false,
               "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
               "<|im_start|>system\nNow in French.<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
               "<|im_start|>assistant\n<think>\n\n</think>\n\n");

    /* the assistant turn after the last query keeps its reasoning, and the
     * final one gets a think block even when it had none */
    const struct ds_chat_message last[] = {
        { "user", "Q" },
        { "assistant", "<think>\n\nwhy\n\n</think>\n\n\nA" },
    };
    check_chat(last, 2, false, false,
               "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nwhy\n</think>\n\nA<|im_end|>\n");
    const struct ds_chat_message plain[] = { { "user", "Q" }, { "assistant", "\nA" } };
    check_chat(plain, 2, false, false,
               "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n");

    /* tool results: one user turn; a tool-response user message is not a query */
    const struct ds_chat_message tools[] = {
        { "user", "Weather?" },
        { "assistant", "<think>x</think>calling" },
        { "tool", "sunny" },
        { "tool", "20C" },
        { "assistant", "no think here" },
        { "user", "<tool_response>\nlate\n</tool_response>" },
    };
    check_chat(tools, 6, true, true,
               "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n<think>\nx\n</think>\n\ncalling"
               "<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20C\n"
               "</tool_response><|im_end|>\n<|im_start|>assistant\nno think here<|im_end|>\n"
               "<|im_start|>user\n<tool_response>\nlate\n</tool_response><|im_end|>\n<|im_start|>assistant\n");

    /* only the text after the last </think> stays; reasoning comes after the last <think> */
    const struct ds_chat_message nested[] = {
        { "user", "Q" },
        { "assistant", "<think>a<think>b\n</think>mid</think>\n\nend" },
        { "user", "Q2" },
    };
    check_chat(nested, 3, false, false,
               "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nend<|im_end|>\n<|im_start|>user\nQ2"
               "<|im_end|>\n");

    char *out = NULL;
    const struct ds_chat_message badrole[] = { { "robot", "x" } };
    assert_int_equal(ds_chat_render(badrole, 1, true, false, &out), -DS_EINVAL);
    assert_int_equal(ds_chat_render(one, 0, true, false, &out), -DS_EINVAL);
    assert_null(out);

    /* rendered chat encodes with the special tokens as single ids */
    assert_int_equal(ds_chat_render(one, 1, true, false, &out), 0);
    int32_t *ids;
    size_t n;
    encode_ok(tok, out, strlen(out), &ids, &n);
    assert_int_equal(ids[0], 151644);
    assert_int_equal(ids[n - 4], 151667);
    assert_int_equal(ids[n - 3], 271);
    assert_int_equal(ids[n - 2], 151668);
    assert_int_equal(ids[n - 1], 271);
    free(ids);
    free(out);
}

int main(void)
{
    tok_path = ds_test_qwen3_tokenizer();
    if (!tok_path)
        ds_test_skip_all("Qwen3 tokenizer.json not found (run setup.sh or set DS_QWEN3_TOKENIZER)");
    if (ds_tokenizer_load(tok_path, &tok) < 0) {
        fprintf(stderr, "cannot load '%s': %s\n", tok_path, ds_errdetail());
        return 1;
    }
    load_hard();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_known_ids),
        cmocka_unit_test(test_vocab),
        cmocka_unit_test(test_token_bytes),
        cmocka_unit_test(test_decode_partial),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_long_inputs),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_tiny_tokenizer),
        cmocka_unit_test(test_split_patterns),
        cmocka_unit_test(test_regex_limits),
        cmocka_unit_test(test_added_flags),
        cmocka_unit_test(test_fast_path),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_chat),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    json_decref(hard);
    ds_tokenizer_free(tok);
    return r;
}

#endif
