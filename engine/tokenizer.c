/* tokenizer.c: Hugging Face tokenizer.json byte-level BPE, bit-exact with the
 * `tokenizers` library for the Qwen family (see ds-tokenizer.h).
 *
 * Encode, as the reference does it:
 *   1. added tokens that are not "normalized" are cut out of the raw text,
 *      leftmost-longest, honouring single_word/lstrip/rstrip;
 *   2. every remaining piece is normalized (NFC with utf8proc; skipped when a
 *      quick check proves the text is NFC already), then the "normalized"
 *      added tokens are cut out of it the same way;
 *   3. each text piece is split by the pre-tokenizer regex (PCRE2, UTF+UCP,
 *      JIT; Oniguruma's Unicode \s, \S, \w, \h are spelled out because
 *      PCRE2's differ). For the Qwen pattern, ASCII stretches are split by an
 *      equivalent hand-written matcher that defers to PCRE2 whenever a decision
 *      depends on a non-ASCII character (tests compare the two);
 *   4. every split becomes bytes and is merged by BPE rank (lowest rank first,
 *      leftmost among equals); a split that is itself a vocab token whose bytes
 *      merge back into it is emitted directly.
 *
 * The loaded tokenizer is immutable except for one relaxed-atomic byte per
 * vocab id that caches whether the token's own bytes BPE-merge back into
 * that single token; any thread may fill it, all fill it identically. The
 * NFC quick-check table is built once per process. Every scratch buffer of
 * an encode lives in that call. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <utf8proc.h>

#include "dspark/ds-tokenizer.h"

/* Largest id accepted in a tokenizer.json (bounds the per-id arrays). */
#define TOK_MAX_ID (1 << 24)
/* Words up to this many symbols merge by a plain scan, longer ones by heap. */
#define BPE_SCAN_MAX 64

enum { NORM_NONE, NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD };
enum { WHOLE_UNKNOWN = 0, WHOLE_YES = 1, WHOLE_NO = 2 };

struct added_token {
    char *content;      /* as matched: NFC'ed when normalized */
    size_t len;
    char *raw;          /* content as written in tokenizer.json (decode, lookup) */
    size_t raw_len;
    int32_t id;
    bool single_word, lstrip, rstrip, normalized, special;
};

/* The added tokens of one matching pass, bucketed by first byte, longest first. */
struct added_set {
    uint32_t *idx;             /* [n] indices into tok->added, by first byte then length desc */
    uint32_t start[257];       /* bucket b is idx[start[b] .. start[b+1]) */
    size_t n;
    int only_first;            /* the one first byte of all tokens, or -1 */
};

struct merge_slot {
    uint64_t key;   /* left id << 32 | right id; UINT64_MAX when empty */
    uint32_t rank;
    int32_t id;     /* the merged token */
};

struct ds_tokenizer {
    int32_t n_ids;            /* max id + 1 */
    int32_t n_vocab;          /* ids held by the BPE model */

    /* vocab strings as written in tokenizer.json, and their decoded bytes */
    char *str_blob;
    uint32_t *str_off;        /* [n_ids + 1] */
    char *byte_blob;
    uint32_t *byte_off;       /* [n_ids + 1] */
    uint8_t *in_vocab;        /* [n_ids] 1 when the model has this id */
    int32_t *added_of;        /* [n_ids] index into added, or -1 */
    _Atomic uint8_t *whole;   /* [n_ids] WHOLE_* cache, see the file comment */

    uint32_t *str_tab;        /* [str_mask + 1] id + 1, 0 empty: vocab string -> id */
    uint32_t *byte_tab;       /* [byte_mask + 1] id + 1, 0 empty: vocab bytes -> id */
    size_t str_mask, byte_mask;

    struct merge_slot *merges;   /* [merge_mask + 1] */
    size_t merge_mask;
    int32_t byte_id[256];     /* id of each single byte, -1 if absent */
    int32_t unk_id;           /* -1: none */
    bool fuse_unk;

    struct added_token *added;
    size_t n_added;
    struct added_set raw_set, norm_set;

    int norm;                 /* NORM_* */
    pcre2_code *re;           /* pre-tokenizer split; NULL: whole piece */
    bool re_jit;
    bool ascii_fast;          /* re is the Qwen2/3 pattern: ASCII runs split without PCRE2 */
};

/* ---- small helpers ---------------------------------------------------- */

static inline uint64_t hash_mix(uint64_t h, uint64_t w)
{
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 31);
}

static uint64_t hash_bytes(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 0x9e3779b97f4a7c15ull ^ ((uint64_t)n * 0xff51afd7ed558ccdull);
    uint64_t w;
    uint32_t a, b;
    while (n > 8) {
        memcpy(&w, s, 8);
        h = hash_mix(h, w);
        s += 8;
        n -= 8;
    }
    /* the last 1..8 bytes: two loads that may overlap */
    if (n >= 4) {
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        w = (uint64_t)a << 32 | b;
    } else if (n) {
        w = (uint64_t)s[0] << 16 | (uint64_t)s[n / 2] << 8 | s[n - 1];
    } else {
        w = 0;
    }
    h = hash_mix(h, w);
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 29);
}

static inline uint64_t hash_pair(uint64_t key)
{
    key *= 0x9e3779b97f4a7c15ull;
    return key ^ (key >> 32);
}

static size_t table_size(size_t n)
{
    size_t s = 16;
    while (s < n * 2 + 1)
        s <<= 1;
    return s;
}

/* Decode one code point of valid UTF-8 at s (n bytes left); *len gets its size. */
static inline int32_t utf8_next(const unsigned char *s, size_t *len)
{
    unsigned c = s[0];
    if (c < 0x80) {
        *len = 1;
        return (int32_t)c;
    }
    if (c < 0xe0) {
        *len = 2;
        return (int32_t)(((c & 0x1f) << 6) | (s[1] & 0x3f));
    }
    if (c < 0xf0) {
        *len = 3;
        return (int32_t)(((c & 0x0f) << 12) | ((s[1] & 0x3f) << 6) | (s[2] & 0x3f));
    }
    *len = 4;
    return (int32_t)(((c & 0x07) << 18) | ((s[1] & 0x3f) << 12) | ((s[2] & 0x3f) << 6) | (s[3] & 0x3f));
}

/* Code point ending at s[end] (exclusive), of valid UTF-8; *len gets its size. */
static int32_t utf8_prev(const unsigned char *s, size_t end, size_t *len)
{
    size_t i = end - 1;
    while (i > 0 && (s[i] & 0xc0) == 0x80)
        i--;
    return utf8_next(s + i, len);
}

/* Offset of the first invalid byte, or len when s is valid UTF-8 (no
 * overlongs, no surrogates, nothing above U+10FFFF). */
static size_t utf8_check(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        if (i + 8 <= len) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ull)) {
                i += 8;
                continue;
            }
        }
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xc2 && c <= 0xdf) {
            if (i + 1 >= len || (s[i + 1] & 0xc0) != 0x80)
                return i;
            i += 2;
        } else if (c >= 0xe0 && c <= 0xef) {
            if (i + 2 >= len || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80)
                return i;
            if ((c == 0xe0 && s[i + 1] < 0xa0) || (c == 0xed && s[i + 1] > 0x9f))
                return i;
            i += 3;
        } else if (c >= 0xf0 && c <= 0xf4) {
            if (i + 3 >= len || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80 ||
                (s[i + 3] & 0xc0) != 0x80)
                return i;
            if ((c == 0xf0 && s[i + 1] < 0x90) || (c == 0xf4 && s[i + 1] > 0x8f))
                return i;
            i += 4;
        } else {
            return i;
        }
    }
    return len;
}

/* The White_Space property: what Oniguruma's and Rust's \s match. */
static bool is_white_space(int32_t c)
{
    if (c < 0x80)
        return c == ' ' || (c >= '\t' && c <= '\r');
    return c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) ||
           c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Rust regex's Unicode \w: alphabetic, marks, decimal digits, connector
 * punctuation, joiners (Other_Alphabetic symbols such as circled letters are
 * not covered). Used only by single_word added tokens. */
static bool is_word_char(int32_t c)
{
    if (c < 0x80)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
               c == '_';
    if (c == 0x200c || c == 0x200d)
        return true;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return false;
    }
}

/* GPT-2's byte <-> printable character table: bytes that print map to
 * themselves, the others to U+0100 onwards in byte order. */
static int32_t byte_char(int b)
{
    if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff))
        return b;
    int n = 0;
    for (int i = 0; i < b; i++)
        if (!((i >= '!' && i <= '~') || (i >= 0xa1 && i <= 0xac) || (i >= 0xae && i <= 0xff)))
            n++;
    return 256 + n;
}

/* NFC quick check. A code point is "inert" when it is below U+0300 (none of
 * those has a canonical singleton, a non-zero combining class, or composes
 * with what precedes it), or when it has combining class 0, no canonical
 * decomposition, and never appears after the first place in any canonical
 * decomposition (so it cannot be the second of a composition). Text made
 * only of inert code points is already NFC (every character is NFC_QC=Yes
 * with class 0). The table covers planes 0-2 (every code point with a
 * canonical decomposition lives there); above, class 0 and no decomposition
 * suffice. Built once per process from utf8proc's own data. */
#define NFC_TABLE_END 0x30000
static uint8_t nfc_inert_bits[NFC_TABLE_END / 8];
static pthread_once_t nfc_once = PTHREAD_ONCE_INIT;

static utf8proc_ssize_t canon_decomp(int32_t c, utf8proc_int32_t *d, utf8proc_ssize_t cap)
{
    int bc = 0;
    return utf8proc_decompose_char(c, d, cap, UTF8PROC_DECOMPOSE, &bc);
}

static void nfc_table_init(void)
{
    utf8proc_int32_t d[32];
    for (int32_t c = 0x300; c < NFC_TABLE_END; c++) {
        if (c >= 0xd800 && c <= 0xdfff)
            continue;
        utf8proc_ssize_t k = canon_decomp(c, d, 32);
        if (utf8proc_get_property(c)->combining_class == 0 && k == 1 && d[0] == c)
            nfc_inert_bits[c >> 3] |= (uint8_t)(1u << (c & 7));
    }
    for (int32_t c = 0xc0; c < NFC_TABLE_END; c++) {
        if (c >= 0xd800 && c <= 0xdfff)
            continue;
        utf8proc_ssize_t k = canon_decomp(c, d, 32);
        for (utf8proc_ssize_t i = 1; i < k && i < 32; i++)
            if (d[i] >= 0x300 && d[i] < NFC_TABLE_END)
                nfc_inert_bits[d[i] >> 3] &= (uint8_t)~(1u << (d[i] & 7));
    }
}

static bool nfc_inert(int32_t c)
{
    if (c < 0x300)
        return true;
    if (c < NFC_TABLE_END)
        return nfc_inert_bits[c >> 3] >> (c & 7) & 1;
    utf8proc_int32_t d[4];
    return utf8proc_get_property(c)->combining_class == 0 && canon_decomp(c, d, 4) == 1 && d[0] == c;
}

/* True when NFC leaves s[0..n) (valid UTF-8) unchanged. */
static bool nfc_quick_yes(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ull)) {
                i += 8;
                continue;
            }
        }
        if (s[i] < 0xcc) {
            i++;
            continue;
        }
        size_t l;
        int32_t c = utf8_next(s + i, &l);
        if (!nfc_inert(c))
            return false;
        i += l;
    }
    return true;
}

/* ---- tables ------------------------------------------------------------ */

static int32_t str_lookup(const struct ds_tokenizer *t, const char *s, size_t n)
{
    size_t i = hash_bytes(s, n) & t->str_mask;
    for (;;) {
        uint32_t v = t->str_tab[i];
        if (!v)
            return -1;
        int32_t id = (int32_t)v - 1;
        uint32_t a = t->str_off[id], b = t->str_off[id + 1];
        if (b - a == n && memcmp(t->str_blob + a, s, n) == 0)
            return id;
        i = (i + 1) & t->str_mask;
    }
}

static inline int32_t byte_lookup(const struct ds_tokenizer *t, const unsigned char *s, size_t n)
{
    size_t i = hash_bytes(s, n) & t->byte_mask;
    for (;;) {
        uint32_t v = t->byte_tab[i];
        if (!v)
            return -1;
        int32_t id = (int32_t)v - 1;
        uint32_t a = t->byte_off[id], b = t->byte_off[id + 1];
        if (b - a == n && memcmp(t->byte_blob + a, s, n) == 0)
            return id;
        i = (i + 1) & t->byte_mask;
    }
}

/* Rank of merging (a, b), UINT32_MAX if no merge; *res gets the merged id. */
static inline uint32_t merge_lookup(const struct ds_tokenizer *t, int32_t a, int32_t b, int32_t *res)
{
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    size_t i = hash_pair(key) & t->merge_mask;
    for (;;) {
        const struct merge_slot *s = &t->merges[i];
        if (s->key == key) {
            *res = s->id;
            return s->rank;
        }
        if (s->key == UINT64_MAX) {
            *res = -1;
            return UINT32_MAX;
        }
        i = (i + 1) & t->merge_mask;
    }
}

/* ---- loading ----------------------------------------------------------- */

struct ds_tokenizer *ds_tokenizer_free(struct ds_tokenizer *t)
{
    if (!t)
        return NULL;
    free(t->str_blob);
    free(t->str_off);
    free(t->byte_blob);
    free(t->byte_off);
    free(t->in_vocab);
    free(t->added_of);
    free((void *)t->whole);
    free(t->str_tab);
    free(t->byte_tab);
    free(t->merges);
    for (size_t i = 0; i < t->n_added; i++) {
        free(t->added[i].content);
        free(t->added[i].raw);
    }
    free(t->added);
    free(t->raw_set.idx);
    free(t->norm_set.idx);
    pcre2_code_free(t->re);
    free(t);
    return NULL;
}

static char *read_whole(const char *path, size_t *ret_len, int *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        *err = ds_seterr(DS_EIO, "could not open tokenizer file '%s': %s", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (cap - len < 65536) {
            cap = cap ? cap * 2 : 1 << 20;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                *err = ds_seterr(DS_ENOMEM, "out of memory reading tokenizer file '%s'", path);
                return NULL;
            }
            buf = nb;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0)
            break;
    }
    if (ferror(f)) {
        *err = ds_seterr(DS_EIO, "could not read tokenizer file '%s': %s", path, strerror(errno));
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[len] = 0;
    *ret_len = len;
    return buf;
}

/* NFC/NFD/NFKC/NFKD of s as a malloc'ed string, or NULL when out of memory or invalid. */
static char *normalize_dup(int norm, const char *s, size_t n, size_t *ret_len)
{
    utf8proc_option_t opt = UTF8PROC_STABLE;
    if (norm == NORM_NFC)
        opt |= UTF8PROC_COMPOSE;
    else if (norm == NORM_NFD)
        opt |= UTF8PROC_DECOMPOSE;
    else if (norm == NORM_NFKC)
        opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
    else if (norm == NORM_NFKD)
        opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
    if (norm == NORM_NONE || n == 0) {
        char *d = malloc(n + 1);
        if (d) {
            memcpy(d, s, n);
            d[n] = 0;
            *ret_len = n;
        }
        return d;
    }
    utf8proc_uint8_t *out = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &out, opt);
    if (r < 0)
        return NULL;
    *ret_len = (size_t)r;
    return (char *)out;
}

static int parse_normalizer(json_t *j, int *norm, const char *path)
{
    if (!j || json_is_null(j)) {
        *norm = NORM_NONE;
        return 0;
    }
    const char *type = json_string_value(json_object_get(j, "type"));
    if (!type)
        return ds_seterr(DS_EFORMAT, "tokenizer '%s': normalizer without a type", path);
    if (strcmp(type, "Sequence") == 0) {
        json_t *seq = json_object_get(j, "normalizers");
        size_t n = json_array_size(seq);
        if (n == 0) {
            *norm = NORM_NONE;
            return 0;
        }
        if (n == 1)
            return parse_normalizer(json_array_get(seq, 0), norm, path);
        return ds_seterr(DS_ENOTSUP, "tokenizer '%s': a sequence of %zu normalizers is not supported", path, n);
    }
    static const struct { const char *name; int norm; } known[] = {
        { "NFC", NORM_NFC }, { "NFD", NORM_NFD }, { "NFKC", NORM_NFKC }, { "NFKD", NORM_NFKD },
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(type, known[i].name) == 0) {
            *norm = known[i].norm;
            return 0;
        }
    return ds_seterr(DS_ENOTSUP, "tokenizer '%s': normalizer '%s' is not supported", path, type);
}

/* Rewrite an Oniguruma pattern for PCRE2: \s, \S, \w, \W get Oniguruma's
 * Unicode meaning (White_Space; letters, marks, decimal digits, connector
 * punctuation), which PCRE2's UCP versions do not have exactly (PCRE2's \s
 * also takes U+180E), and \h, \H are hexadecimal digits as in Oniguruma. */
static int translate_regex(const char *pat, size_t n, char **ret, const char *path)
{
    static const char ws[] = "\\t-\\r\\x{85}\\p{Z}";
    static const char wc[] = "\\p{L}\\p{M}\\p{Nd}\\p{Pc}";
    static const char hx[] = "0-9a-fA-F";
    /* the longest replacement: a 2-byte \W becomes "[^" + wc + "]" */
    size_t cap = (n / 2 + 1) * (sizeof wc + 3) + n + 64, o = 0;
    char *out = ds_xmalloc(cap);
    bool in_class = false;
    for (size_t i = 0; i < n; i++) {
        char c = pat[i];
        if (c == '\\' && i + 1 < n) {
            char e = pat[i + 1];
            const char *set = e == 's' || e == 'S'   ? ws
                              : e == 'w' || e == 'W' ? wc
                              : e == 'h' || e == 'H' ? hx
                                                     : NULL;
            if (set) {
                bool neg = e == 'S' || e == 'W' || e == 'H';
                if (in_class && neg) {
                    free(out);
                    return ds_seterr(DS_ENOTSUP, "tokenizer '%s': '\\%c' inside a character class is not supported",
                                     path, e);
                }
                o += (size_t)sprintf(out + o, "%s%s%s", in_class ? "" : neg ? "[^" : "[", set, in_class ? "" : "]");
            } else {
                out[o++] = c;
                out[o++] = e;
            }
            i++;
            continue;
        }
        if (!in_class && c == '[') {
            in_class = true;
            out[o++] = c;
            if (i + 1 < n && pat[i + 1] == '^')
                out[o++] = pat[++i];
            if (i + 1 < n && pat[i + 1] == ']')
                out[o++] = pat[++i];
            continue;
        }
        if (in_class && c == '[' && i + 1 < n && pat[i + 1] == ':') {
            const char *end = strstr(pat + i + 2, ":]");
            if (end && (size_t)(end - pat) < n) {
                size_t k = (size_t)(end - pat) + 2 - i;
                memcpy(out + o, pat + i, k);
                o += k;
                i += k - 1;
                continue;
            }
        }
        if (in_class && c == ']')
            in_class = false;
        out[o++] = c;
    }
    out[o] = 0;
    *ret = out;
    return 0;
}

/* The split regex of Qwen2 and Qwen3, which ascii_match() implements for ASCII. */
static const char qwen_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static int compile_split(struct ds_tokenizer *t, json_t *pattern, const char *path)
{
    json_t *rx = json_object_get(pattern, "Regex"), *lit = json_object_get(pattern, "String");
    char *src = NULL;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_NEVER_BACKSLASH_C;
    int r;
    json_t *given = json_is_string(rx) ? rx : lit;
    if (json_is_string(given) && strlen(json_string_value(given)) != json_string_length(given))
        return ds_seterr(DS_EFORMAT, "tokenizer '%s': split pattern holds a NUL character", path);
    if (json_is_string(rx)) {
        r = translate_regex(json_string_value(rx), json_string_length(rx), &src, path);
        if (r < 0)
            return r;
        t->ascii_fast = strcmp(json_string_value(rx), qwen_regex) == 0;
    } else if (json_is_string(lit)) {
        if (json_string_length(lit) == 0)
            return ds_seterr(DS_EFORMAT, "tokenizer '%s': empty split pattern", path);
        src = ds_xmalloc(json_string_length(lit) + 1);
        memcpy(src, json_string_value(lit), json_string_length(lit) + 1);
        opts = PCRE2_UTF | PCRE2_LITERAL;   /* (PCRE2 refuses UCP and NEVER_BACKSLASH_C beside LITERAL) */
    } else {
        return ds_seterr(DS_EFORMAT, "tokenizer '%s': split pattern is neither 'Regex' nor 'String'", path);
    }
    int ecode;
    PCRE2_SIZE eoff;
    t->re = pcre2_compile((PCRE2_SPTR)src, PCRE2_ZERO_TERMINATED, opts, &ecode, &eoff, NULL);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ecode, msg, sizeof msg);
        r = ds_seterr(DS_EFORMAT, "tokenizer '%s': split regex does not compile at offset %zu: %s", path,
                      (size_t)eoff, (const char *)msg);
        free(src);
        return r;
    }
    free(src);
    t->re_jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

/* The regex GPT-2's ByteLevel pre-tokenizer applies when use_regex is true. */
static const char gpt2_regex[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int parse_byte_level(struct ds_tokenizer *t, json_t *j, bool *have_split, const char *path)
{
    if (json_is_true(json_object_get(j, "add_prefix_space")))
        return ds_seterr(DS_ENOTSUP, "tokenizer '%s': ByteLevel add_prefix_space is not supported", path);
    json_t *ur = json_object_get(j, "use_regex");
    if (!ur || json_is_true(ur)) {
        if (*have_split)
            return ds_seterr(DS_ENOTSUP, "tokenizer '%s': more than one splitting pre-tokenizer", path);
        json_t *p = json_pack("{s:s}", "Regex", gpt2_regex);
        int r = compile_split(t, p, path);
        json_decref(p);
        if (r < 0)
            return r;
        *have_split = true;
    }
    return 0;
}

static int parse_pre_tokenizer(struct ds_tokenizer *t, json_t *j, const char *path)
{
    if (!j || json_is_null(j))
        return ds_seterr(DS_ENOTSUP, "tokenizer '%s': a byte-level BPE needs a ByteLevel pre-tokenizer", path);
    const char *type = json_string_value(json_object_get(j, "type"));
    json_t *list = NULL;
    size_t n = 1;
    if (type && strcmp(type, "Sequence") == 0) {
        list = json_object_get(j, "pretokenizers");
        n = json_array_size(list);
    }
    bool have_split = false, have_bl = false;
    for (size_t i = 0; i < n; i++) {
        json_t *p = list ? json_array_get(list, i) : j;
        const char *pt = json_string_value(json_object_get(p, "type"));
        if (!pt)
            return ds_seterr(DS_EFORMAT, "tokenizer '%s': pre-tokenizer without a type", path);
        if (strcmp(pt, "Split") == 0) {
            const char *beh = json_string_value(json_object_get(p, "behavior"));
            if (have_split || have_bl)
                return ds_seterr(DS_ENOTSUP, "tokenizer '%s': this pre-tokenizer sequence is not supported", path);
            if (!beh || strcmp(beh, "Isolated") != 0)
                return ds_seterr(DS_ENOTSUP, "tokenizer '%s': Split behavior '%s' is not supported", path,
                                 beh ? beh : "(none)");
            if (json_is_true(json_object_get(p, "invert")))
                return ds_seterr(DS_ENOTSUP, "tokenizer '%s': inverted Split is not supported", path);
            int r = compile_split(t, json_object_get(p, "pattern"), path);
            if (r < 0)
                return r;
            have_split = true;
        } else if (strcmp(pt, "ByteLevel") == 0) {
            if (have_bl)
                return ds_seterr(DS_ENOTSUP, "tokenizer '%s': two ByteLevel pre-tokenizers", path);
            int r = parse_byte_level(t, p, &have_split, path);
            if (r < 0)
                return r;
            have_bl = true;
        } else {
            return ds_seterr(DS_ENOTSUP, "tokenizer '%s': pre-tokenizer '%s' is not supported", path, pt);
        }
    }
    if (!have_bl)
        return ds_seterr(DS_ENOTSUP, "tokenizer '%s': a byte-level BPE needs a ByteLevel pre-tokenizer", path);
    return 0;
}

static int build_tables(struct ds_tokenizer *t)
{
    t->str_mask = table_size((size_t)t->n_vocab) - 1;
    t->byte_mask = t->str_mask;
    t->str_tab = calloc(t->str_mask + 1, sizeof *t->str_tab);
    t->byte_tab = calloc(t->byte_mask + 1, sizeof *t->byte_tab);
    if (!t->str_tab || !t->byte_tab)
        return ds_seterr(DS_ENOMEM, "out of memory building the vocabulary tables");
    for (int32_t id = 0; id < t->n_ids; id++) {
        if (!t->in_vocab[id])
            continue;
        uint32_t a = t->str_off[id], b = t->str_off[id + 1];
        size_t i = hash_bytes(t->str_blob + a, b - a) & t->str_mask;
        while (t->str_tab[i])
            i = (i + 1) & t->str_mask;
        t->str_tab[i] = (uint32_t)id + 1;
        /* bytes: distinct strings may decode to the same bytes only through
         * the raw fallback; the first keeps the slot (used as a shortcut only) */
        a = t->byte_off[id];
        b = t->byte_off[id + 1];
        if (byte_lookup(t, (const unsigned char *)t->byte_blob + a, b - a) >= 0) {
            atomic_store_explicit(&t->whole[id], WHOLE_NO, memory_order_relaxed);
            continue;
        }
        i = hash_bytes(t->byte_blob + a, b - a) & t->byte_mask;
        while (t->byte_tab[i])
            i = (i + 1) & t->byte_mask;
        t->byte_tab[i] = (uint32_t)id + 1;
    }
    return 0;
}

/* Vocab string -> bytes: each character through the byte table; a token with
 * a character outside it keeps its UTF-8 bytes, as the ByteLevel decoder does. */
static size_t token_to_bytes(const int16_t *char_byte, const char *s, size_t n, char *out)
{
    size_t o = 0, i = 0;
    while (i < n) {
        size_t l;
        int32_t c = utf8_next((const unsigned char *)s + i, &l);
        if (c >= 512 || char_byte[c] < 0) {
            memcpy(out, s, n);
            return n;
        }
        out[o++] = (char)char_byte[c];
        i += l;
    }
    return o;
}

static int load_vocab(struct ds_tokenizer *t, json_t *vocab, json_t *added, const char *path)
{
    const char *key;
    json_t *val;
    int32_t max_id = -1;
    size_t total = 0;
    json_object_foreach(vocab, key, val) {
        if (!json_is_integer(val) || json_integer_value(val) < 0 || json_integer_value(val) >= TOK_MAX_ID)
            return ds_seterr(DS_EFORMAT, "tokenizer '%s': vocab entry '%s' has a bad id", path, key);
        if ((int32_t)json_integer_value(val) > max_id)
            max_id = (int32_t)json_integer_value(val);
        total += strlen(key);
        if (utf8_check((const unsigned char *)key, strlen(key)) != strlen(key))
            return ds_seterr(DS_EFORMAT, "tokenizer '%s': vocab entry is not valid UTF-8", path);
    }
    if (max_id < 0)
        return ds_seterr(DS_EFORMAT, "tokenizer '%s': empty vocab", path);
    t->n_vocab = max_id + 1;
    size_t i;
    json_array_foreach(added, i, val) {
        json_t *id = json_object_get(val, "id");
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= TOK_MAX_ID)
            return ds_seterr(DS_EFORMAT, "tokenizer '%s': added token %zu has a bad id", path, i);
        if ((int32_t)json_integer_value(id) > max_id)
            max_id = (int32_t)json_integer_value(id);
    }
    if (total >= UINT32_MAX / 4)
        return ds_seterr(DS_EFORMAT, "tokenizer '%s': vocab too large", path);
    t->n_ids = max_id + 1;
    size_t n = (size_t)t->n_ids;
    t->str_off = calloc(n + 1, sizeof *t->str_off);
    t->byte_off = calloc(n + 1, sizeof *t->byte_off);
    t->in_vocab = calloc(n, 1);
    t->added_of = malloc(n * sizeof *t->added_of);
    t->whole = calloc(n, 1);
    t->str_blob = malloc(total + 1);
    t->byte_blob = malloc(total + 1);
    const char **strs = calloc(n, sizeof *strs);
    if (!t->str_off || !t->byte_off || !t->in_vocab || !t->added_of || !t->whole || !t->str_blob ||
        !t->byte_blob || !strs) {
        free(strs);
        return ds_seterr(DS_ENOMEM, "out of memory loading tokenizer '%s'", path);
    }
    for (size_t k = 0; k < n; k++)
        t->added_of[k] = -1;
    json_object_foreach(vocab, key, val) {
        int32_t id = (int32_t)json_integer_value(val);
        if (strs[id]) {
            int r = ds_seterr(DS_EFORMAT, "tokenizer '%s': vocab entries '%s' and '%s' share id %d", path,
                              strs[id], key, id);
            free(strs);
            return r;
        }
        strs[id] = key;
        t->in_vocab[id] = 1;
    }
    int16_t char_byte[512];
    for (int c = 0; c < 512; c++)
        char_byte[c] = -1;
    for (int b = 0; b < 256; b++)
        char_byte[byte_char(b)] = (int16_t)b;
    size_t so = 0, bo = 0;
    for (size_t id = 0; id < n; id++) {
        t->str_off[id] = (uint32_t)so;
        t->byte_off[id] = (uint32_t)bo;
        if (!strs[id])
            continue;
        size_t l = strlen(strs[id]);
        memcpy(t->str_blob + so, strs[id], l);
        so += l;
        bo += token_to_bytes(char_byte, strs[id], l, t->byte_blob + bo);
    }
    t->str_off[n] = (uint32_t)so;
    t->byte_off[n] = (uint32_t)bo;
    free(strs);
    int r = build_tables(t);
    if (r < 0)
        return r;
    for (int b = 0; b < 256; b++) {
        char s[2];
        int32_t c = byte_char(b);
        size_t l;
        if (c < 0x80) {
            s[0] = (char)c;
            l = 1;
        } else {
            s[0] = (char)(0xc0 | (c >> 6));
            s[1] = (char)(0x80 | (c & 0x3f));
            l = 2;
        }
        t->byte_id[b] = str_lookup(t, s, l);
    }
    return 0;
}

static int load_merges(struct ds_tokenizer *t, json_t *merges, const char *path)
{
    size_t n = json_array_size(merges);
    t->merge_mask = table_size(n) - 1;
    t->merges = malloc((t->merge_mask + 1) * sizeof *t->merges);
    if (!t->merges)
        return ds_seterr(DS_ENOMEM, "out of memory loading the merges of '%s'", path);
    for (size_t i = 0; i <= t->merge_mask; i++)
        t->merges[i].key = UINT64_MAX;
    char *buf = NULL;
    size_t cap = 0;
    int r = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(merges, i);
        const char *a, *b;
        size_t la, lb;
        if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
            json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            la = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            lb = json_string_length(json_array_get(m, 1));
        } else if (json_is_string(m) && strchr(json_string_value(m), ' ')) {
            a = json_string_value(m);
            b = strchr(a, ' ') + 1;
            la = (size_t)(b - 1 - a);
            lb = json_string_length(m) - la - 1;
        } else {
            r = ds_seterr(DS_EFORMAT, "tokenizer '%s': merge %zu is not a pair of tokens", path, i);
            break;
        }
        if (la + lb + 1 > cap) {
            cap = (la + lb + 1) * 2;
            buf = ds_xrealloc(buf, cap);
        }
        memcpy(buf, a, la);
        memcpy(buf + la, b, lb);
        int32_t ia = str_lookup(t, a, la), ib = str_lookup(t, b, lb), im = str_lookup(t, buf, la + lb);
        if (ia < 0 || ib < 0 || im < 0) {
            buf[la + lb] = 0;
            r = ds_seterr(DS_EFORMAT, "tokenizer '%s': merge %zu ('%.*s' + '%.*s') uses a token missing from the vocab",
                          path, i, (int)la, a, (int)lb, b);
            break;
        }
        uint64_t key = (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib;
        size_t s = hash_pair(key) & t->merge_mask;
        while (t->merges[s].key != UINT64_MAX && t->merges[s].key != key)
            s = (s + 1) & t->merge_mask;
        /* a repeated pair takes its last rank, as the reference's map does */
        t->merges[s].key = key;
        t->merges[s].rank = (uint32_t)i;
        t->merges[s].id = im;
    }
    free(buf);
    return r;
}

static int cmp_added(const void *pa, const void *pb, void *arg)
{
    const struct added_token *added = arg;
    const struct added_token *a = &added[*(const uint32_t *)pa], *b = &added[*(const uint32_t *)pb];
    unsigned char ca = (unsigned char)a->content[0], cb = (unsigned char)b->content[0];
    if (ca != cb)
        return ca < cb ? -1 : 1;
    if (a->len != b->len)
        return a->len > b->len ? -1 : 1;
    /* same text twice: the earlier pattern wins, as in the reference */
    return *(const uint32_t *)pa < *(const uint32_t *)pb ? -1 : 1;
}

static void build_added_set(struct ds_tokenizer *t, struct added_set *set, bool normalized, const uint32_t *order)
{
    set->idx = ds_xmalloc((t->n_added + 1) * sizeof *set->idx);
    set->n = 0;
    for (size_t k = 0; k < t->n_added; k++) {
        uint32_t i = order[k];
        if (t->added[i].normalized == normalized && t->added[i].len > 0)
            set->idx[set->n++] = i;
    }
    qsort_r(set->idx, set->n, sizeof *set->idx, cmp_added, t->added);
    size_t k = 0;
    for (int b = 0; b < 256; b++) {
        set->start[b] = (uint32_t)k;
        while (k < set->n && (unsigned char)t->added[set->idx[k]].content[0] == b)
            k++;
    }
    set->start[256] = (uint32_t)set->n;
    set->only_first = -1;
    for (int b = 0; b < 256; b++)
        if (set->start[b + 1] - set->start[b] == set->n && set->n > 0)
            set->only_first = b;
}

static int load_added(struct ds_tokenizer *t, json_t *added, const char *path)
{
    size_t n = json_array_size(added), i;
    json_t *a;
    t->added = calloc(n ? n : 1, sizeof *t->added);
    if (!t->added)
        return ds_seterr(DS_ENOMEM, "out of memory loading tokenizer '%s'", path);
    json_array_foreach(added, i, a) {
        json_t *c = json_object_get(a, "content");
        if (!json_is_string(c))
            return ds_seterr(DS_EFORMAT, "tokenizer '%s': added token %zu has no content", path, i);
        struct added_token *at = &t->added[t->n_added];
        at->id = (int32_t)json_integer_value(json_object_get(a, "id"));
        at->single_word = json_is_true(json_object_get(a, "single_word"));
        at->lstrip = json_is_true(json_object_get(a, "lstrip"));
        at->rstrip = json_is_true(json_object_get(a, "rstrip"));
        at->special = json_is_true(json_object_get(a, "special"));
        json_t *nz = json_object_get(a, "normalized");
        at->normalized = nz ? json_is_true(nz) : !at->special;
        at->raw_len = json_string_length(c);
        at->raw = ds_xmalloc(at->raw_len + 1);
        memcpy(at->raw, json_string_value(c), at->raw_len + 1);
        if (at->normalized && t->norm != NORM_NONE) {
            at->content = normalize_dup(t->norm, at->raw, at->raw_len, &at->len);
            if (!at->content)
                return ds_seterr(DS_EFORMAT, "tokenizer '%s': added token %zu cannot be normalized", path, i);
        } else {
            at->content = ds_xmalloc(at->raw_len + 1);
            memcpy(at->content, at->raw, at->raw_len + 1);
            at->len = at->raw_len;
        }
        t->n_added++;
        if (t->added_of[at->id] >= 0) {
            /* the same id twice: the later entry describes it */
            t->added[t->added_of[at->id]].len = 0;
        }
        t->added_of[at->id] = (int32_t)(t->n_added - 1);
    }
    /* matching order: special tokens first, then the others (each in file order) */
    uint32_t *order = ds_xmalloc((t->n_added + 1) * sizeof *order);
    size_t k = 0;
    for (size_t j = 0; j < t->n_added; j++)
        if (t->added[j].special)
            order[k++] = (uint32_t)j;
    for (size_t j = 0; j < t->n_added; j++)
        if (!t->added[j].special)
            order[k++] = (uint32_t)j;
    build_added_set(t, &t->raw_set, false, order);
    build_added_set(t, &t->norm_set, true, order);
    free(order);
    return 0;
}

static int load_model(struct ds_tokenizer *t, json_t *root, const char *path)
{
    json_t *model = json_object_get(root, "model");
    const char *type = json_string_value(json_object_get(model, "type"));
    if (!json_is_object(model))
        return ds_seterr(DS_EFORMAT, "tokenizer '%s': no 'model' object", path);
    if (type && strcmp(type, "BPE") != 0)
        return ds_seterr(DS_ENOTSUP, "tokenizer '%s': model type '%s' is not supported", path, type);
    json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab) || !json_is_array(merges))
        return ds_seterr(DS_EFORMAT, "tokenizer '%s': BPE model without 'vocab' and 'merges'", path);
    json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout))
        return ds_seterr(DS_ENOTSUP, "tokenizer '%s': BPE dropout is not supported", path);
    if (json_is_true(json_object_get(model, "byte_fallback")))
        return ds_seterr(DS_ENOTSUP, "tokenizer '%s': BPE byte_fallback is not supported", path);
    if (json_is_true(json_object_get(model, "ignore_merges")))
        return ds_seterr(DS_ENOTSUP, "tokenizer '%s': BPE ignore_merges is not supported", path);
    const char *csp = json_string_value(json_object_get(model, "continuing_subword_prefix"));
    const char *ews = json_string_value(json_object_get(model, "end_of_word_suffix"));
    if ((csp && *csp) || (ews && *ews))
        return ds_seterr(DS_ENOTSUP, "tokenizer '%s': BPE subword prefixes and suffixes are not supported", path);
    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_array(added))
        return ds_seterr(DS_EFORMAT, "tokenizer '%s': 'added_tokens' is not an array", path);
    int r = load_vocab(t, vocab, added, path);
    if (r < 0)
        return r;
    t->unk_id = -1;
    const char *unk = json_string_value(json_object_get(model, "unk_token"));
    if (unk) {
        t->unk_id = str_lookup(t, unk, strlen(unk));
        if (t->unk_id < 0)
            return ds_seterr(DS_EFORMAT, "tokenizer '%s': unk_token '%s' is not in the vocab", path, unk);
    }
    t->fuse_unk = json_is_true(json_object_get(model, "fuse_unk"));
    r = load_merges(t, merges, path);
    if (r < 0)
        return r;
    return load_added(t, added, path);
}

int ds_tokenizer_load(const char *path, struct ds_tokenizer **ret)
{
    char file[4096];
    struct stat st;
    if (stat(path, &st) != 0)
        return ds_seterr(DS_EIO, "could not open tokenizer '%s': %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        if ((size_t)snprintf(file, sizeof file, "%s/tokenizer.json", path) >= sizeof file)
            return ds_seterr(DS_EINVAL, "tokenizer path '%s' is too long", path);
    } else {
        if (strlen(path) >= sizeof file)
            return ds_seterr(DS_EINVAL, "tokenizer path '%s' is too long", path);
        strcpy(file, path);
    }
    int r = 0;
    size_t len = 0;
    char *text = read_whole(file, &len, &r);
    if (!text)
        return r;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_ALLOW_NUL, &jerr);
    free(text);
    if (!root)
        return ds_seterr(DS_EFORMAT, "tokenizer '%s': invalid JSON at line %d column %d: %s", file, jerr.line,
                         jerr.column, jerr.text);
    struct ds_tokenizer *t = ds_xcalloc(1, sizeof *t);
    if (!json_is_object(root)) {
        r = ds_seterr(DS_EFORMAT, "tokenizer '%s': top level is not an object", file);
        goto out;
    }
    r = parse_normalizer(json_object_get(root, "normalizer"), &t->norm, file);
    if (r < 0)
        goto out;
    if (t->norm == NORM_NFC)
        pthread_once(&nfc_once, nfc_table_init);
    r = parse_pre_tokenizer(t, json_object_get(root, "pre_tokenizer"), file);
    if (r < 0)
        goto out;
    json_t *dec = json_object_get(root, "decoder");
    const char *dt = json_string_value(json_object_get(dec, "type"));
    if (dec && !json_is_null(dec) && (!dt || strcmp(dt, "ByteLevel") != 0)) {
        r = ds_seterr(DS_ENOTSUP, "tokenizer '%s': decoder '%s' is not supported", file, dt ? dt : "(none)");
        goto out;
    }
    r = load_model(t, root, file);
out:
    json_decref(root);
    if (r < 0) {
        ds_tokenizer_free(t);
        return r;
    }
    *ret = t;
    return 0;
}

/* ---- encoding ----------------------------------------------------------- */

struct enc {
    const struct ds_tokenizer *t;
    int32_t *ids;             /* [cap] output */
    size_t n, cap;
    pcre2_match_data *md;
    pcre2_match_context *mctx;   /* only after the JIT stack ran out */
    pcre2_jit_stack *jstack;
    int32_t *u32;             /* [u32_cap] normalization scratch */
    size_t u32_cap;
    int32_t *sym;             /* [sym_cap] BPE scratch: symbols */
    int32_t *prev, *next;     /* [sym_cap] heap path links */
    uint64_t *heap;           /* [heap_cap] rank << 32 | position */
    size_t sym_cap, heap_cap;
};

static int emit(struct enc *e, int32_t id)
{
    if (e->n == e->cap) {
        size_t nc = e->cap * 2 + 64;
        int32_t *ni = realloc(e->ids, nc * sizeof *ni);
        if (!ni)
            return ds_seterr(DS_ENOMEM, "out of memory encoding %zu tokens", nc);
        e->ids = ni;
        e->cap = nc;
    }
    e->ids[e->n++] = id;
    return 0;
}

static int grow_sym(struct enc *e, size_t n)
{
    if (n <= e->sym_cap)
        return 0;
    size_t c = n + n / 2 + 64;
    int32_t *s = realloc(e->sym, c * sizeof *s), *p, *q;
    if (s)
        e->sym = s;
    p = s ? realloc(e->prev, c * sizeof *p) : NULL;
    if (p)
        e->prev = p;
    q = p ? realloc(e->next, c * sizeof *q) : NULL;
    if (q)
        e->next = q;
    if (!q)
        return ds_seterr(DS_ENOMEM, "out of memory merging a %zu-byte word", n);
    e->sym_cap = c;
    return 0;
}

static void heap_push(uint64_t *h, size_t *n, uint64_t v)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v)
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n)
{
    uint64_t top = h[0], v = h[--*n];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m)
            break;
        if (c + 1 < m && h[c + 1] < h[c])
            c++;
        if (v <= h[c])
            break;
        h[i] = h[c];
        i = c;
    }
    if (m)
        h[i] = v;
    return top;
}

/* Merge sym[0..n) in place: always the lowest-ranked adjacent pair, the
 * leftmost of equal ranks (the reference's order). Returns the new length. */
static size_t bpe_scan(const struct ds_tokenizer *t, int32_t *sym, size_t n)
{
    uint32_t rank[BPE_SCAN_MAX];
    int32_t res[BPE_SCAN_MAX];
    for (size_t i = 0; i + 1 < n; i++)
        rank[i] = merge_lookup(t, sym[i], sym[i + 1], &res[i]);
    while (n > 1) {
        uint32_t best = UINT32_MAX;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < n; i++)
            if (rank[i] < best) {
                best = rank[i];
                bi = i;
            }
        if (best == UINT32_MAX)
            break;
        sym[bi] = res[bi];
        for (size_t i = bi + 1; i + 1 < n; i++) {
            sym[i] = sym[i + 1];
            rank[i] = rank[i + 1];
            res[i] = res[i + 1];
        }
        n--;
        if (bi > 0)
            rank[bi - 1] = merge_lookup(t, sym[bi - 1], sym[bi], &res[bi - 1]);
        if (bi + 1 < n)
            rank[bi] = merge_lookup(t, sym[bi], sym[bi + 1], &res[bi]);
    }
    return n;
}

/* The same merge order for long words: a min-heap of (rank, position) over a
 * doubly linked list of symbols; stale entries are skipped when popped. */
static int bpe_heap(struct enc *e, size_t n, size_t *ret_n)
{
    const struct ds_tokenizer *t = e->t;
    int32_t *sym = e->sym, *prev = e->prev, *next = e->next;
    if (e->heap_cap < n * 2) {
        uint64_t *h = realloc(e->heap, n * 2 * sizeof *h);
        if (!h)
            return ds_seterr(DS_ENOMEM, "out of memory merging a %zu-symbol word", n);
        e->heap = h;
        e->heap_cap = n * 2;
    }
    uint64_t *heap = e->heap;
    size_t hn = 0;
    int32_t res = -1;
    for (size_t i = 0; i < n; i++) {
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
        if (i + 1 < n) {
            uint32_t r = merge_lookup(t, sym[i], sym[i + 1], &res);
            if (r != UINT32_MAX)
                heap_push(heap, &hn, (uint64_t)r << 32 | i);
        }
    }
    while (hn) {
        uint64_t top = heap_pop(heap, &hn);
        uint32_t rank = (uint32_t)(top >> 32);
        size_t pos = (uint32_t)top;
        if (sym[pos] < 0 || next[pos] < 0)
            continue;
        size_t nx = (size_t)next[pos];
        if (merge_lookup(t, sym[pos], sym[nx], &res) != rank)
            continue;
        sym[pos] = res;
        sym[nx] = -1;
        next[pos] = next[nx];
        if (next[nx] >= 0)
            prev[next[nx]] = (int32_t)pos;
        /* each merge pops one entry and pushes at most two: 2n slots suffice */
        if (prev[pos] >= 0) {
            uint32_t r = merge_lookup(t, sym[prev[pos]], sym[pos], &res);
            if (r != UINT32_MAX)
                heap_push(heap, &hn, (uint64_t)r << 32 | (uint32_t)prev[pos]);
        }
        if (next[pos] >= 0) {
            uint32_t r = merge_lookup(t, sym[pos], sym[next[pos]], &res);
            if (r != UINT32_MAX)
                heap_push(heap, &hn, (uint64_t)r << 32 | pos);
        }
    }
    size_t o = 0;
    for (size_t i = 0; i < n; i++)
        if (sym[i] >= 0)
            sym[o++] = sym[i];
    *ret_n = o;
    return 0;
}

/* BPE of one pre-tokenized piece, s[0..n) as bytes. */
static int encode_word(struct enc *e, const unsigned char *s, size_t n)
{
    const struct ds_tokenizer *t = e->t;
    if (n == 1 && t->byte_id[s[0]] >= 0)
        return emit(e, t->byte_id[s[0]]);
    int32_t whole = byte_lookup(t, s, n);
    uint8_t known = WHOLE_NO;
    if (whole >= 0) {
        known = atomic_load_explicit(&t->whole[whole], memory_order_relaxed);
        if (known == WHOLE_YES)
            return emit(e, whole);
    }
    int32_t small[BPE_SCAN_MAX], *sym = small;
    int r;
    if (n > BPE_SCAN_MAX) {
        r = grow_sym(e, n);
        if (r < 0)
            return r;
        sym = e->sym;
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[s[i]];
        if (id < 0) {
            /* a byte missing from the vocab: the unknown token, or nothing */
            if (t->unk_id < 0 || (t->fuse_unk && m > 0 && sym[m - 1] == t->unk_id))
                continue;
            id = t->unk_id;
        }
        sym[m++] = id;
    }
    if (m <= BPE_SCAN_MAX) {
        m = bpe_scan(t, sym, m);
    } else {
        /* only reached with sym == e->sym (m <= n) */
        r = bpe_heap(e, m, &m);
        if (r < 0)
            return r;
    }
    if (whole >= 0 && known == WHOLE_UNKNOWN)
        atomic_store_explicit(&t->whole[whole], m == 1 && sym[0] == whole ? WHOLE_YES : WHOLE_NO,
                              memory_order_relaxed);
    for (size_t i = 0; i < m; i++) {
        r = emit(e, sym[i]);
        if (r < 0)
            return r;
    }
    return 0;
}

/* One regex search; a pathological input that exhausts the default JIT
 * stack or match limits gets a second try with generous ones. */
static int re_search(struct enc *e, const unsigned char *s, size_t n, size_t start)
{
    const struct ds_tokenizer *t = e->t;
    if (!e->md) {
        /* made on first use: the ASCII fast path may never need it */
        e->md = pcre2_match_data_create_from_pattern(t->re, NULL);
        if (!e->md)
            return ds_seterr(DS_ENOMEM, "out of memory for regex match data");
    }
    for (;;) {
        int rc = t->re_jit ? pcre2_jit_match(t->re, s, n, start, PCRE2_NO_UTF_CHECK, e->md, e->mctx)
                           : pcre2_match(t->re, s, n, start, PCRE2_NO_UTF_CHECK, e->md, e->mctx);
        if (rc >= 0 || rc == PCRE2_ERROR_NOMATCH)
            return rc;
        bool limit = rc == PCRE2_ERROR_JIT_STACKLIMIT || rc == PCRE2_ERROR_HEAPLIMIT ||
                     rc == PCRE2_ERROR_MATCHLIMIT || rc == PCRE2_ERROR_DEPTHLIMIT;
        if (!limit || e->mctx) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return ds_seterr(limit ? DS_ELIMIT : DS_EINVAL, "pre-tokenizer regex failed at byte %zu: %s", start,
                             (const char *)msg);
        }
        e->mctx = pcre2_match_context_create(NULL);
        if (!e->mctx)
            return ds_seterr(DS_ENOMEM, "out of memory for a regex match context");
        pcre2_set_match_limit(e->mctx, UINT32_MAX);
        pcre2_set_depth_limit(e->mctx, UINT32_MAX);
        pcre2_set_heap_limit(e->mctx, 1u << 22);   /* KiB: 4 GiB */
        if (t->re_jit) {
            e->jstack = pcre2_jit_stack_create(1 << 16, 1 << 30, NULL);
            if (!e->jstack)
                return ds_seterr(DS_ENOMEM, "out of memory for a regex stack");
            pcre2_jit_stack_assign(e->mctx, NULL, e->jstack);
        }
    }
}

/* The Qwen split regex on ASCII, without PCRE2. On ASCII every character
 * starts a match (letters the second alternative, digits the third, other
 * symbols the fourth, whitespace the fifth to seventh), and each alternative
 * reduces to runs of one character class:
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)   apostrophe + suffix, any case
 *   [^\r\n\p{L}\p{N}]?\p{L}+       letters, with one non-letter, non-digit,
 *                                  non-newline character before them
 *   \p{N}                          one digit
 *    ?[^\s\p{L}\p{N}]+[\r\n]*      symbols, maybe after a space, then newlines
 *   \s*[\r\n]+                     whitespace up to its last newline
 *   \s+(?!\S)                      whitespace but the last before a non-space
 *   \s+                            (a single space before a non-space)
 * s[0..lim) is ASCII; lim == n is the end of the text, otherwise s[lim] is a
 * non-ASCII character. Returns the match length at p, or 0 when the answer
 * depends on s[lim] (PCRE2 then decides). */
enum { AC_L = 1, AC_N = 2, AC_S = 4, AC_NL = 8, AC_O = 16 };

#define O_ AC_O
#define S_ AC_S
static const uint8_t ascii_classes[128] = {
    O_, O_, O_, O_, O_, O_, O_, O_, O_, S_, S_ | AC_NL, S_, S_, S_ | AC_NL, O_, O_,   /* \t-\r */
    O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_,
    S_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_, O_,                   /* space */
    AC_N, AC_N, AC_N, AC_N, AC_N, AC_N, AC_N, AC_N, AC_N, AC_N, O_, O_, O_, O_, O_, O_,
    O_, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L,
    AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, O_, O_, O_, O_, O_,
    O_, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L,
    AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, AC_L, O_, O_, O_, O_, O_,
};
#undef O_
#undef S_

static inline unsigned ascii_class(unsigned c)
{
    return ascii_classes[c];
}

static size_t ascii_match(const unsigned char *s, size_t p, size_t lim, bool end)
{
    unsigned c = s[p], k = ascii_class(c);
    size_t i;
    if (c == '\'') {
        if (p + 1 >= lim) {
            if (!end)
                return 0;
        } else {
            unsigned a = s[p + 1] | 0x20;
            if (a == 's' || a == 't' || a == 'm' || a == 'd')
                return 2;
            if (a == 'r' || a == 'v' || a == 'l') {
                if (p + 2 >= lim) {
                    if (!end)
                        return 0;
                } else {
                    unsigned b = s[p + 2] | 0x20;
                    if (b == (a == 'l' ? 'l' : 'e'))
                        return 3;
                }
            }
        }
    }
    if (k == AC_L || !(k & (AC_N | AC_NL))) {
        /* letters, or one other character and letters */
        i = p + 1;
        if (k != AC_L) {
            if (i >= lim) {
                if (!end)
                    return 0;
                i = 0;
            } else if (ascii_class(s[i]) == AC_L) {
                i++;
            } else {
                i = 0;
            }
        }
        if (i) {
            while (i < lim && ascii_class(s[i]) == AC_L)
                i++;
            return i >= lim && !end ? 0 : i - p;
        }
    }
    if (k == AC_N)
        return 1;
    size_t q = p;
    if (c == ' ' && p + 1 < lim && ascii_class(s[p + 1]) == AC_O)
        q = p + 1;
    if (ascii_class(s[q]) == AC_O) {
        i = q + 1;
        while (i < lim && ascii_class(s[i]) == AC_O)
            i++;
        if (i >= lim && !end)
            return 0;
        /* no character at or past lim is \r or \n */
        while (i < lim && (s[i] == '\r' || s[i] == '\n'))
            i++;
        return i - p;
    }
    /* whitespace */
    size_t last_nl = SIZE_MAX;
    i = p;
    while (i < lim && (ascii_class(s[i]) & AC_S)) {
        if (s[i] == '\r' || s[i] == '\n')
            last_nl = i;
        i++;
    }
    if (i >= lim && !end)
        return 0;
    if (last_nl != SIZE_MAX)
        return last_nl + 1 - p;
    if (i >= lim)
        return i - p;
    return i - p >= 2 ? i - 1 - p : 1;
}

/* Index of the first byte >= 0x80 at or after i, or n. */
static size_t next_non_ascii(const unsigned char *s, size_t i, size_t n)
{
    while (i + 8 <= n) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        if (w & 0x8080808080808080ull)
            break;
        i += 8;
    }
    while (i < n && s[i] < 0x80)
        i++;
    return i;
}

/* Pre-tokenize normalized text s[0..n) with the split regex (Isolated:
 * matches and the text between them are all pieces) and BPE each piece. */
static int encode_text(struct enc *e, const unsigned char *s, size_t n)
{
    if (!e->t->re)
        return n ? encode_word(e, s, n) : 0;
    size_t last = 0, start = 0, u = 0;
    bool fast = e->t->ascii_fast;
    int r;
    if (fast)
        u = next_non_ascii(s, 0, n);
    while (start < n) {
        if (fast) {
            if (start > u)
                u = next_non_ascii(s, start, n);
            size_t l = start < u ? ascii_match(s, start, u, u == n) : 0;
            if (l) {
                r = encode_word(e, s + start, l);
                if (r < 0)
                    return r;
                last = start = start + l;
                continue;
            }
        }
        int rc = re_search(e, s, n, start);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0)
            return rc;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > last) {
            r = encode_word(e, s + last, ms - last);
            if (r < 0)
                return r;
            last = ms;
        }
        if (me == ms) {
            /* an empty match splits here and moves on one character */
            size_t l = 1;
            if (ms < n)
                utf8_next(s + ms, &l);
            start = ms + l;
            continue;
        }
        r = encode_word(e, s + ms, me - ms);
        if (r < 0)
            return r;
        last = start = me;
    }
    return last < n ? encode_word(e, s + last, n - last) : 0;
}

typedef int (*text_fn)(struct enc *e, const unsigned char *s, size_t n);

/* Cut the added tokens of one set out of s[0..n) as the reference's
 * find_matches does; the text between them goes to fn. */
static int split_added(struct enc *e, const struct added_set *set, const unsigned char *s, size_t n, text_fn fn)
{
    const struct ds_tokenizer *t = e->t;
    if (set->n == 0)
        return n ? fn(e, s, n) : 0;
    size_t from = 0, i = 0, l;
    int r;
    while (i < n) {
        if (set->only_first >= 0) {
            const unsigned char *q = memchr(s + i, set->only_first, n - i);
            if (!q)
                break;
            i = (size_t)(q - s);
        } else {
            while (i < n && set->start[s[i]] == set->start[s[i] + 1])
                i++;
            if (i == n)
                break;
        }
        uint32_t b0 = set->start[s[i]], b1 = set->start[s[i] + 1];
        const struct added_token *m = NULL;
        for (uint32_t k = b0; k < b1; k++) {
            const struct added_token *a = &t->added[set->idx[k]];
            if (a->len <= n - i && memcmp(a->content, s + i, a->len) == 0) {
                m = a;
                break;
            }
        }
        if (!m) {
            i++;
            continue;
        }
        size_t start = i, stop = i + m->len;
        i = stop;   /* the search resumes after the match, even a dropped one */
        if (m->single_word) {
            bool word_before = start > 0 && is_word_char(utf8_prev(s, start, &l));
            bool word_after = stop < n && is_word_char(utf8_next(s + stop, &l));
            if (word_before || word_after)
                continue;
        }
        if (m->lstrip) {
            size_t ns = start;
            while (ns > 0 && is_white_space(utf8_prev(s, ns, &l)))
                ns -= l;
            start = ns > from ? ns : from;
        }
        if (m->rstrip)
            while (stop < n && is_white_space(utf8_next(s + stop, &l)))
                stop += l;
        if (from < start) {
            r = fn(e, s + from, start - from);
            if (r < 0)
                return r;
        }
        r = emit(e, m->id);
        if (r < 0)
            return r;
        from = stop;
    }
    return from < n ? fn(e, s + from, n - from) : 0;
}

static int encode_normalized(struct enc *e, const unsigned char *s, size_t n)
{
    return split_added(e, &e->t->norm_set, s, n, encode_text);
}

/* Normalize one piece of raw text, then cut the normalized added tokens. */
static int encode_raw(struct enc *e, const unsigned char *s, size_t n)
{
    const struct ds_tokenizer *t = e->t;
    int norm = t->norm;
    if (norm == NORM_NFC) {
        if (nfc_quick_yes(s, n))
            norm = NORM_NONE;
    } else if (norm != NORM_NONE) {
        /* the other forms leave only ASCII alone for sure */
        size_t i = 0;
        while (i < n && s[i] < 0x80)
            i++;
        if (i == n)
            norm = NORM_NONE;
    }
    if (norm == NORM_NONE)
        return encode_normalized(e, s, n);
    utf8proc_option_t opt = UTF8PROC_STABLE;
    if (norm == NORM_NFC)
        opt |= UTF8PROC_COMPOSE;
    else if (norm == NORM_NFD)
        opt |= UTF8PROC_DECOMPOSE;
    else if (norm == NORM_NFKC)
        opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
    else
        opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
    for (;;) {
        utf8proc_ssize_t m = utf8proc_decompose(s, (utf8proc_ssize_t)n, e->u32, (utf8proc_ssize_t)e->u32_cap, opt);
        if (m < 0)
            return ds_seterr(DS_EINVAL, "cannot normalize the text: %s", utf8proc_errmsg(m));
        if ((size_t)m <= e->u32_cap) {
            m = utf8proc_reencode(e->u32, m, opt);
            if (m < 0)
                return ds_seterr(DS_EINVAL, "cannot normalize the text: %s", utf8proc_errmsg(m));
            return encode_normalized(e, (const unsigned char *)e->u32, (size_t)m);
        }
        size_t cap = (size_t)m + 64;
        int32_t *nb = realloc(e->u32, cap * sizeof *nb);
        if (!nb)
            return ds_seterr(DS_ENOMEM, "out of memory normalizing %zu bytes", n);
        e->u32 = nb;
        e->u32_cap = cap;
    }
}

int ds_tokenizer_encode(const struct ds_tokenizer *tok, const char *text, size_t len, int32_t **ret_ids,
                        size_t *ret_n)
{
    if (!tok || (!text && len))
        return ds_seterr(DS_EINVAL, "encode needs a tokenizer and a text");
    const unsigned char *s = (const unsigned char *)text;
    size_t bad = utf8_check(s, len);
    if (bad < len)
        return ds_seterr(DS_EINVAL, "text is not valid UTF-8 at byte %zu", bad);
    struct enc e = { .t = tok };
    e.cap = len / 3 + 16;
    e.ids = malloc(e.cap * sizeof *e.ids);
    int r = 0;
    if (!e.ids) {
        r = ds_seterr(DS_ENOMEM, "out of memory encoding %zu bytes", len);
        goto out;
    }
    r = split_added(&e, &tok->raw_set, s, len, encode_raw);
out:
    pcre2_match_data_free(e.md);
    pcre2_match_context_free(e.mctx);
    pcre2_jit_stack_free(e.jstack);
    free(e.u32);
    free(e.sym);
    free(e.prev);
    free(e.next);
    free(e.heap);
    if (r < 0) {
        free(e.ids);
        return r;
    }
    *ret_ids = e.ids;
    *ret_n = e.n;
    return 0;
}

/* ---- decoding and lookups ---------------------------------------------- */

static int token_span(const struct ds_tokenizer *t, int32_t id, const char **p, size_t *n)
{
    if (id < 0 || id >= t->n_ids)
        return ds_seterr(DS_EINVAL, "unknown token id %d", (int)id);
    if (t->added_of[id] >= 0) {
        const struct added_token *a = &t->added[t->added_of[id]];
        *p = a->raw;
        *n = a->raw_len;
        return 0;
    }
    if (!t->in_vocab[id])
        return ds_seterr(DS_EINVAL, "unknown token id %d", (int)id);
    *p = t->byte_blob + t->byte_off[id];
    *n = t->byte_off[id + 1] - t->byte_off[id];
    return 0;
}

/* Both decodes: an id without a token is an error, or (skip_unknown) adds nothing. */
static int decode_ids(const struct ds_tokenizer *tok, const int32_t *ids, size_t n, bool skip_unknown,
                      char **ret_text, size_t *ret_len)
{
    size_t total = 0;
    const char *p = NULL;
    size_t l = 0;
    for (size_t i = 0; i < n; i++) {
        int r = token_span(tok, ids[i], &p, &l);
        if (r < 0 && !skip_unknown)
            return r;
        total += r < 0 ? 0 : l;
    }
    char *out = malloc(total + 1);
    if (!out)
        return ds_seterr(DS_ENOMEM, "out of memory decoding %zu tokens", n);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (token_span(tok, ids[i], &p, &l) < 0)
            continue;   /* (only when skip_unknown: the first pass returned otherwise) */
        memcpy(out + o, p, l);
        o += l;
    }
    out[o] = 0;
    *ret_text = out;
    *ret_len = o;
    return 0;
}

int ds_tokenizer_decode(const struct ds_tokenizer *tok, const int32_t *ids, size_t n, char **ret_text,
                        size_t *ret_len)
{
    return decode_ids(tok, ids, n, false, ret_text, ret_len);
}

int ds_tokenizer_decode_known(const struct ds_tokenizer *tok, const int32_t *ids, size_t n, char **ret_text,
                              size_t *ret_len)
{
    return decode_ids(tok, ids, n, true, ret_text, ret_len);
}

int ds_tokenizer_token_bytes(const struct ds_tokenizer *tok, int32_t id, char *buf, size_t cap)
{
    const char *p = NULL;
    size_t l = 0;
    int r = token_span(tok, id, &p, &l);
    if (r < 0)
        return r;
    if (l > cap || l > INT_MAX)
        return ds_seterr(DS_ELIMIT, "token %d is %zu bytes, the buffer holds %zu", (int)id, l, cap);
    memcpy(buf, p, l);
    return (int)l;
}

int ds_tokenizer_vocab_size(const struct ds_tokenizer *tok)
{
    return tok->n_ids;
}

int32_t ds_tokenizer_token_id(const struct ds_tokenizer *tok, const char *token)
{
    size_t n = strlen(token);
    for (size_t i = 0; i < tok->n_added; i++) {
        const struct added_token *a = &tok->added[i];
        if (a->raw_len == n && memcmp(a->raw, token, n) == 0 && tok->added_of[a->id] == (int32_t)i)
            return a->id;
    }
    return str_lookup(tok, token, n);
}

bool ds_tokenizer_is_special(const struct ds_tokenizer *tok, int32_t id)
{
    if (id < 0 || id >= tok->n_ids || tok->added_of[id] < 0)
        return false;
    return tok->added[tok->added_of[id]].special;
}
