/* bench-tokenizer: single-thread encode throughput of the tokenizer.
 *
 *   bench-tokenizer --tokenizer PATH [--runs N] [--json] FILE.jsonl...
 *
 * Every turn of every line ({"turns": [str, ...]}) of the files is encoded
 * once per run, one string at a time, on one thread; one warm-up pass first.
 * Prints the median run as MB/s and tokens/s (with --json, one JSON object). */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "dspark/ds-tokenizer.h"

struct text {
    char *s;
    size_t n;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int load_turns(const char *path, struct text **texts, size_t *n, size_t *cap)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        return -1;
    }
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    unsigned long lineno = 0;
    while ((len = getline(&line, &lcap, f)) >= 0) {
        lineno++;
        json_error_t err;
        json_t *v = json_loadb(line, (size_t)len, JSON_ALLOW_NUL, &err);
        json_t *turns = json_object_get(v, "turns"), *t;
        size_t i;
        if (!json_is_array(turns)) {
            fprintf(stderr, "%s:%lu: no \"turns\" array\n", path, lineno);
            json_decref(v);
            free(line);
            fclose(f);
            return -1;
        }
        json_array_foreach(turns, i, t) {
            if (!json_is_string(t))
                continue;
            if (*n == *cap) {
                *cap = *cap * 2 + 256;
                *texts = realloc(*texts, *cap * sizeof **texts);
                if (!*texts)
                    abort();
            }
            size_t l = json_string_length(t);
            (*texts)[*n].s = malloc(l + 1);
            memcpy((*texts)[*n].s, json_string_value(t), l + 1);
            (*texts)[*n].n = l;
            (*n)++;
        }
        json_decref(v);
    }
    free(line);
    fclose(f);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "tokenizer", required_argument, NULL, 't' },
        { "runs", required_argument, NULL, 'r' },
        { "json", no_argument, NULL, 'j' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *path = NULL;
    int runs = 5, c;
    bool json = false;
    while ((c = getopt_long(argc, argv, "t:r:jh", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            path = optarg;
            break;
        case 'r':
            runs = atoi(optarg);
            break;
        case 'j':
            json = true;
            break;
        case 'h':
            printf("Usage: bench-tokenizer --tokenizer PATH [--runs N] [--json] FILE.jsonl...\n");
            return 0;
        default:
            return 1;
        }
    }
    if (!path || optind >= argc || runs < 1) {
        fprintf(stderr, "usage: bench-tokenizer --tokenizer PATH [--runs N] [--json] FILE.jsonl...\n");
        return 1;
    }
    struct text *texts = NULL;
    size_t n = 0, cap = 0, bytes = 0;
    for (int i = optind; i < argc; i++)
        if (load_turns(argv[i], &texts, &n, &cap) < 0)
            return 1;
    for (size_t i = 0; i < n; i++)
        bytes += texts[i].n;
    struct ds_tokenizer *tok;
    double t0 = now();
    if (ds_tokenizer_load(path, &tok) < 0) {
        fprintf(stderr, "bench-tokenizer: %s\n", ds_errdetail());
        return 1;
    }
    double load_s = now() - t0;
    double *times = malloc((size_t)(runs + 1) * sizeof *times);
    size_t tokens = 0;
    for (int r = -1; r < runs; r++) {
        size_t nt = 0;
        double s = now();
        for (size_t i = 0; i < n; i++) {
            int32_t *ids;
            size_t ni;
            if (ds_tokenizer_encode(tok, texts[i].s, texts[i].n, &ids, &ni) < 0) {
                fprintf(stderr, "bench-tokenizer: text %zu: %s\n", i, ds_errdetail());
                return 1;
            }
            nt += ni;
            free(ids);
        }
        if (r >= 0)
            times[r] = now() - s;
        tokens = nt;
    }
    qsort(times, (size_t)runs, sizeof *times, cmp_double);
    double med = runs % 2 ? times[runs / 2] : (times[runs / 2 - 1] + times[runs / 2]) / 2;
    if (json)
        printf("{\"impl\": \"dspark\", \"texts\": %zu, \"bytes\": %zu, \"tokens\": %zu, \"runs\": %d, "
               "\"median_s\": %.6f, \"best_s\": %.6f, \"mb_per_s\": %.3f, \"tokens_per_s\": %.0f, "
               "\"load_s\": %.3f}\n",
               n, bytes, tokens, runs, med, times[0], (double)bytes / med / 1e6, (double)tokens / med, load_s);
    else
        printf("dspark: %zu texts, %zu bytes, %zu tokens; median of %d runs %.4f s (best %.4f s): %.2f MB/s, "
               "%.0f tokens/s (load %.2f s)\n",
               n, bytes, tokens, runs, med, times[0], (double)bytes / med / 1e6, (double)tokens / med, load_s);
    for (size_t i = 0; i < n; i++)
        free(texts[i].s);
    free(texts);
    free(times);
    ds_tokenizer_free(tok);
    return 0;
}
