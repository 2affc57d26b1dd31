/* dspark-tokenize: encode or decode with a tokenizer.json, one JSON value per line.
 *
 *   dspark-tokenize --tokenizer PATH            "text" per line   -> [ids] per line
 *   dspark-tokenize --tokenizer PATH --decode   [ids] per line    -> "text" per line
 *   dspark-tokenize --tokenizer PATH --chat     [{"role","content"},...] per line -> [ids]
 *
 * Output is flushed after every line, so a program may drive it line by line;
 * a blank input line gives a blank output line, so lines stay paired. Decoded
 * bytes that are not valid UTF-8 (a partial character) are written with U+FFFD
 * in their place, as Hugging Face `tokenizers` decode does. The first bad
 * input line stops the run with its line number and exit code 1; a usage
 * error exits 2. */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "dspark/ds-tokenizer.h"

static const char *prog = "dspark-tokenize";

static void usage(FILE *f)
{
    fprintf(f,
            "Usage: %s --tokenizer PATH [--decode | --chat [--thinking]]\n"
            "\n"
            "Encode (default): reads one JSON string per line on standard input and writes\n"
            "one JSON array of token ids per line. No BOS/EOS is added; special tokens in\n"
            "the text (\"<|im_start|>\") become their ids.\n"
            "\n"
            "Options:\n"
            "  -t, --tokenizer PATH  a tokenizer.json, or a model directory holding one\n"
            "  -d, --decode          read JSON arrays of ids, write JSON strings\n"
            "  -c, --chat            read JSON arrays of {\"role\", \"content\"} messages, render\n"
            "                        them with the Qwen3 chat template and a generation prompt\n"
            "                        (thinking off), and write the ids\n"
            "      --thinking        with --chat: leave thinking on (no empty think block)\n"
            "  -h, --help            show this help\n"
            "  -V, --version         show the version\n"
            "\n"
            "A blank input line gives a blank output line. The first bad line stops the run\n"
            "(exit 1, naming the line); a usage error exits 2.\n",
            prog);
}

/* Append bytes as UTF-8, each maximal invalid subsequence replaced by U+FFFD. */
static char *utf8_lossy(const unsigned char *s, size_t n, size_t *ret_len)
{
    char *out = malloc(n * 3 + 1);
    if (!out)
        return NULL;
    size_t o = 0, i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t need = 0;
        unsigned lo = 0x80, hi = 0xbf;
        if (c < 0x80) {
            out[o++] = (char)c;
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            need = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0)
                lo = 0xa0;
            if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0)
                lo = 0x90;
            if (c == 0xf4)
                hi = 0x8f;
        }
        size_t k = 1;
        while (need && k <= need && i + k < n) {
            unsigned b = s[i + k];
            if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xbf))
                break;
            k++;
        }
        if (need && k == need + 1) {
            memcpy(out + o, s + i, k);
            o += k;
        } else {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
        }
        i += k;
    }
    out[o] = 0;
    *ret_len = o;
    return out;
}

static int print_ids(const int32_t *ids, size_t n)
{
    putchar('[');
    for (size_t i = 0; i < n; i++)
        printf(i ? ",%d" : "%d", (int)ids[i]);
    fputs("]\n", stdout);
    return 0;
}

/* Handle one input line; 0, or -1 after printing the error. */
static int do_line(const struct ds_tokenizer *tok, int mode, bool thinking, const char *line, size_t len,
                   unsigned long lineno)
{
    if (strspn(line, " \t\r\n") == len) {   /* (blank: a blank line out, to keep the lines paired) */
        putchar('\n');
        return 0;
    }
    json_error_t jerr;
    json_t *v = json_loadb(line, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    int32_t *ids = NULL;
    size_t n = 0;
    int r = 0;
    if (!v) {
        fprintf(stderr, "%s: line %lu: invalid JSON: %s\n", prog, lineno, jerr.text);
        return -1;
    }
    if (mode == 'e') {
        if (!json_is_string(v)) {
            fprintf(stderr, "%s: line %lu: expected a JSON string\n", prog, lineno);
            r = -1;
        } else if (ds_tokenizer_encode(tok, json_string_value(v), json_string_length(v), &ids, &n) < 0) {
            fprintf(stderr, "%s: line %lu: %s\n", prog, lineno, ds_errdetail());
            r = -1;
        } else {
            print_ids(ids, n);
        }
    } else if (mode == 'd') {
        size_t i, cnt = json_array_size(v);
        json_t *x;
        if (!json_is_array(v)) {
            fprintf(stderr, "%s: line %lu: expected a JSON array of token ids\n", prog, lineno);
            json_decref(v);
            return -1;
        }
        ids = malloc((cnt ? cnt : 1) * sizeof *ids);
        if (!ids) {
            fprintf(stderr, "%s: line %lu: out of memory\n", prog, lineno);
            json_decref(v);
            return -1;
        }
        json_array_foreach(v, i, x) {
            if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) > INT32_MAX) {
                fprintf(stderr, "%s: line %lu: element %zu is not a token id\n", prog, lineno, i);
                r = -1;
                break;
            }
            ids[i] = (int32_t)json_integer_value(x);
        }
        char *text = NULL, *clean = NULL;
        size_t tl = 0, cl = 0;
        if (r == 0 && ds_tokenizer_decode(tok, ids, cnt, &text, &tl) < 0) {
            fprintf(stderr, "%s: line %lu: %s\n", prog, lineno, ds_errdetail());
            r = -1;
        }
        if (r == 0 && !(clean = utf8_lossy((const unsigned char *)text, tl, &cl))) {
            fprintf(stderr, "%s: line %lu: out of memory\n", prog, lineno);
            r = -1;
        }
        if (r == 0) {
            json_t *s = json_stringn(clean, cl);
            char *dump = s ? json_dumps(s, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
            if (!dump) {
                fprintf(stderr, "%s: line %lu: cannot write the decoded text as JSON\n", prog, lineno);
                r = -1;
            } else {
                fputs(dump, stdout);
                putchar('\n');
            }
            free(dump);
            json_decref(s);
        }
        free(text);
        free(clean);
    } else {
        size_t i, cnt = json_array_size(v);
        json_t *m;
        if (!json_is_array(v) || cnt == 0) {
            fprintf(stderr, "%s: line %lu: expected a non-empty JSON array of messages\n", prog, lineno);
            json_decref(v);
            return -1;
        }
        struct ds_chat_message *msgs = ds_xcalloc(cnt, sizeof *msgs);
        char **contents = ds_xcalloc(cnt, sizeof *contents);
        json_array_foreach(v, i, m) {
            /* (a content is a string or text parts, as dsparkctl and dspark-generate read it) */
            const char *why = NULL;
            long part = -1;
            json_t *role = json_object_get(m, "role");
            contents[i] = ds_chat_content_text(json_object_get(m, "content"), &why, &part);
            if (!json_is_string(role)) {
                fprintf(stderr, "%s: line %lu: message %zu needs a string 'role'\n", prog, lineno, i);
                r = -1;
            } else if (!contents[i] && part >= 0) {
                fprintf(stderr, "%s: line %lu: message %zu: content part %ld: %s\n", prog, lineno, i, part, why);
                r = -1;
            } else if (!contents[i]) {
                fprintf(stderr, "%s: line %lu: message %zu: content: %s\n", prog, lineno, i, why);
                r = -1;
            }
            if (r < 0)
                break;
            msgs[i].role = json_string_value(role);
            msgs[i].content = contents[i];
        }
        char *text = NULL;
        if (r == 0 && ds_chat_render(msgs, cnt, true, thinking, &text) < 0) {
            fprintf(stderr, "%s: line %lu: %s\n", prog, lineno, ds_errdetail());
            r = -1;
        }
        if (r == 0 && ds_tokenizer_encode(tok, text, strlen(text), &ids, &n) < 0) {
            fprintf(stderr, "%s: line %lu: %s\n", prog, lineno, ds_errdetail());
            r = -1;
        }
        if (r == 0)
            print_ids(ids, n);
        free(text);
        for (size_t k = 0; k < cnt; k++)
            free(contents[k]);
        free(contents);
        free(msgs);
    }
    free(ids);
    json_decref(v);
    return r;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "tokenizer", required_argument, NULL, 't' },
        { "decode", no_argument, NULL, 'd' },
        { "chat", no_argument, NULL, 'c' },
        { "thinking", no_argument, NULL, 'T' },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    const char *path = NULL;
    int mode = 'e', c;
    bool thinking = false;
    while ((c = getopt_long(argc, argv, "t:dchV", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            path = optarg;
            break;
        case 'd':
        case 'c':
            if (mode != 'e') {
                fprintf(stderr, "%s: --decode and --chat exclude each other\n", prog);
                return 2;
            }
            mode = c;
            break;
        case 'T':
            thinking = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("%s (dspark) %s\n", prog, PACKAGE_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[optind]);
        usage(stderr);
        return 2;
    }
    if (!path) {
        fprintf(stderr, "%s: --tokenizer PATH is required\n", prog);
        usage(stderr);
        return 2;
    }
    if (thinking && mode != 'c') {
        fprintf(stderr, "%s: --thinking only applies to --chat\n", prog);
        return 2;
    }
    struct ds_tokenizer *tok = NULL;
    if (ds_tokenizer_load(path, &tok) < 0) {
        fprintf(stderr, "%s: %s\n", prog, ds_errdetail());
        return 1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    unsigned long lineno = 0;
    int rc = 0;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        if (do_line(tok, mode, thinking, line, (size_t)len, lineno) < 0) {
            rc = 1;
            break;
        }
        if (fflush(stdout) != 0) {
            perror(prog);
            rc = 1;
            break;
        }
    }
    if (rc == 0 && ferror(stdin)) {
        fprintf(stderr, "%s: error reading standard input\n", prog);
        rc = 1;
    }
    free(line);
    ds_tokenizer_free(tok);
    return rc;
}
