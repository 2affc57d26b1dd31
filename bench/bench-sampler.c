/* bench-sampler: time of the CPU sampling distribution (ds_probs) of one row
 * of the Qwen3 vocabulary, per sampling setting and kind of row; median of
 * --reps calls. Prints a table for bench/RESULTS.md. */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dspark/ds-sampler.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static uint64_t rng = 88172645463325252ull;

static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

int main(int argc, char **argv)
{
    int V = 151936, reps = 21;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--vocab") && i + 1 < argc)
            V = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench-sampler [--vocab N] [--reps N]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    if (V < 1 || reps < 1) {
        fprintf(stderr, "bench-sampler: --vocab and --reps must be positive\n");
        return 2;
    }
    static const struct {
        const char *name;
        struct ds_sampling s;
    } cases[] = {
        {"T 1, no cut", {.temperature = 1.0f, .top_p = 1.0f}},
        {"T 1, top-p 0.95", {.temperature = 1.0f, .top_p = 0.95f}},
        {"T 0.7, top-k 50", {.temperature = 0.7f, .top_p = 1.0f, .top_k = 50}},
        {"T 0.8, top-p 0.9, top-k 1000", {.temperature = 0.8f, .top_p = 0.9f, .top_k = 1000}},
        {"T 0.6, top-p 0.95, top-k 20", {.temperature = 0.6f, .top_p = 0.95f, .top_k = 20}},
    };
    float *x = malloc((size_t)V * 4), *p = malloc((size_t)V * 4);
    uint64_t *scratch = malloc((size_t)V * 2 * sizeof *scratch);
    double *ms = malloc((size_t)reps * sizeof *ms);
    printf("ds_probs, vocabulary %d, median of %d calls\n\n", V, reps);
    printf("| setting | logits | ms per row |\n|---|---|---|\n");
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int peaked = 0; peaked < 2; peaked++) {
            for (int i = 0; i < V; i++)
                x[i] = 3.0f * frand();
            if (peaked)   /* a few confident tokens, as a trained model gives */
                for (int j = 0; j < 4; j++)
                    x[(size_t)(rng % (uint64_t)V)] = 16.0f - 2.0f * (float)j;
            for (int r = 0; r < reps; r++) {
                double t0 = now();
                ds_probs(x, V, &cases[c].s, p, scratch);
                ms[r] = (now() - t0) * 1e3;
            }
            qsort(ms, (size_t)reps, sizeof *ms, cmpd);
            printf("| %s | %s | %.3f |\n", cases[c].name, peaked ? "peaked" : "uniform in [-3, 3]", ms[reps / 2]);
        }
    free(x), free(p), free(scratch), free(ms);
    return 0;
}
