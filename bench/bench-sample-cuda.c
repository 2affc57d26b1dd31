/* bench-sample-cuda.c: the sampling kernels on their own, on a 151,936-token
 * vocabulary (Qwen3's): the per-row sampling distribution (ds_k_sampling_probs)
 * and the inverse-CDF draw (ds_k_sample), and both in one launch
 * (ds_k_sample_logits), for 1, 8, 64 and 512 rows.
 *
 *   bench-sample-cuda [--blocks N] [--hashes FILE]
 *
 * --blocks N spreads every row over N blocks (1..8) instead of the count the
 * time model picks (ds_k_sampling_force_blocks_per_row).
 * --hashes FILE writes, for every row set, a 64-bit FNV-1a hash of the rows
 * and ids the last launch in one (ds_k_sample_logits) wrote: two builds give
 * the same file when their distributions and draws are the same bits.
 * Logits are normal with standard deviation 0.5 (a flat distribution, as random
 * weights give), 3 (a peaked one), 8 (most of the vocabulary far below 1 / V,
 * as in a trained model's rows) or 29 (as the random 4B's tied embedding
 * gives: at T 0.6 nearly every probability underflows to 0); the time is the
 * fastest of 7 launches. */
#include "config.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "kernels.h"

#define V 151936
#define MAX_ROWS 512
#define REPS 7

#define BENCH_NAME "bench-sample-cuda"
#include "bench-check.h"

static double normal(unsigned *s)
{
    double u1 = (rand_r(s) + 1.0) / (RAND_MAX + 2.0), u2 = (rand_r(s) + 1.0) / (RAND_MAX + 2.0);
    return sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
}

/* FNV-1a over n bytes, continuing from h. */
static uint64_t fnv1a(const void *p, size_t n, uint64_t h)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

int main(int argc, char **argv)
{
    FILE *hashes = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--blocks") && i + 1 < argc) {
            char *end;
            long c = strtol(argv[++i], &end, 10);
            if (*end || c < 1 || c > 8 || ds_k_sampling_force_blocks_per_row((int)c) < 0) {
                fprintf(stderr, "bench-sample-cuda: --blocks takes 1 to 8\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--hashes") && i + 1 < argc) {
            if (!(hashes = fopen(argv[++i], "w"))) {
                perror(argv[i]);
                return 1;
            }
        } else {
            fprintf(stderr, "usage: bench-sample-cuda [--blocks N] [--hashes FILE]\n");
            return !!strcmp(argv[i], "--help") * 2;
        }
    }
    float *h = malloc((size_t)MAX_ROWS * V * sizeof(float)); /* [MAX_ROWS, V] */
    float *d_x, *d_out, *d_u;                                /* [MAX_ROWS, V] ×2, [MAX_ROWS] */
    int32_t *d_ids;                                          /* [MAX_ROWS] */
    struct ds_k_sampling *d_p;                               /* [MAX_ROWS] */
    CHECK(!h);
    CHECK(cudaMalloc((void **)&d_x, (size_t)MAX_ROWS * V * sizeof(float)));
    CHECK(cudaMalloc((void **)&d_out, (size_t)MAX_ROWS * V * sizeof(float)));
    CHECK(cudaMalloc((void **)&d_u, MAX_ROWS * sizeof(float)));
    CHECK(cudaMalloc((void **)&d_ids, MAX_ROWS * sizeof(int32_t)));
    CHECK(cudaMalloc((void **)&d_p, MAX_ROWS * sizeof(struct ds_k_sampling)));
    float u[MAX_ROWS];
    for (int i = 0; i < MAX_ROWS; i++)
        u[i] = (float)(i * 0.618 - floor(i * 0.618));
    CHECK(cudaMemcpy(d_u, u, sizeof u, cudaMemcpyHostToDevice));
    static const double stds[] = {0.5, 3.0, 8.0, 29.0};
    static const struct {
        const char *name;
        struct ds_k_sampling p;
    } cases[] = {{"greedy", {0.0f, 1.0f, 0}},
                 {"T 1, no cut", {1.0f, 1.0f, 0}},
                 {"T 1, top-p 0.95", {1.0f, 0.95f, 0}},
                 {"T 0.7, top-k 50", {0.7f, 1.0f, 50}},
                 {"T 0.8, top-p 0.9, top-k 200", {0.8f, 0.9f, 200}},
                 {"T 0.6, top-p 0.95, top-k 20", {0.6f, 0.95f, 20}}};
    static const int rows[] = {1, 8, 64, 512};
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    char dev[320] = "";
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
        snprintf(dev, sizeof dev, "%.255s, %d SMs", prop.name, prop.multiProcessorCount);
    printf("# %s; vocabulary %d; fastest of %d launches, µs per launch (distribution / draw / both in one "
           "launch)\n\n", dev, V, REPS);
    printf("blocks per row: %d, %d, %d and %d\n\n", ds_k_sampling_blocks_per_row(1, V), ds_k_sampling_blocks_per_row(8, V),
           ds_k_sampling_blocks_per_row(64, V), ds_k_sampling_blocks_per_row(512, V));
    printf("| logits std | sampling | 1 row | 8 rows | 64 rows | 512 rows |\n|---|---|---|---|---|---|\n");
    for (int si = 0; si < (int)(sizeof stds / sizeof stds[0]); si++) {
        unsigned seed = 7;
        for (size_t i = 0; i < (size_t)MAX_ROWS * V; i++)
            h[i] = (float)(stds[si] * normal(&seed));
        CHECK(cudaMemcpy(d_x, h, (size_t)MAX_ROWS * V * sizeof(float), cudaMemcpyHostToDevice));
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            struct ds_k_sampling p[MAX_ROWS];
            for (int i = 0; i < MAX_ROWS; i++)
                p[i] = cases[c].p;
            CHECK(cudaMemcpy(d_p, p, sizeof p, cudaMemcpyHostToDevice));
            printf("| %.1f | %s |", stds[si], cases[c].name);
            for (int k = 0; k < 4; k++) {
                float best[3] = {1e30f, 1e30f, 1e30f};
                for (int rep = 0; rep < REPS; rep++)
                    for (int which = 0; which < 3; which++) {
                        CHECK(cudaEventRecord(e0, 0));
                        if (which == 0)
                            CHECK(ds_k_sampling_probs(d_x, V, NULL, d_p, rows[k], V, d_out, V, 0));
                        else if (which == 1)
                            CHECK(ds_k_sample(d_out, V, NULL, d_u, rows[k], V, d_ids, 0));
                        else
                            CHECK(ds_k_sample_logits(d_x, V, NULL, d_p, rows[k], V, d_out, V, d_u, d_ids, 0));
                        CHECK(cudaEventRecord(e1, 0));
                        CHECK(cudaEventSynchronize(e1));
                        float ms;
                        CHECK(cudaEventElapsedTime(&ms, e0, e1));
                        if (ms < best[which])
                            best[which] = ms;
                    }
                printf(" %.1f / %.1f / %.1f |", best[0] * 1e3, best[1] * 1e3, best[2] * 1e3);
                if (hashes) {   /* the last launch was ds_k_sample_logits' */
                    int32_t ids[MAX_ROWS];
                    CHECK(cudaMemcpy(h, d_out, (size_t)rows[k] * V * sizeof(float), cudaMemcpyDeviceToHost));
                    CHECK(cudaMemcpy(ids, d_ids, (size_t)rows[k] * sizeof(int32_t), cudaMemcpyDeviceToHost));
                    uint64_t f = fnv1a(ids, (size_t)rows[k] * sizeof(int32_t),
                                       fnv1a(h, (size_t)rows[k] * V * sizeof(float), 14695981039346656037ull));
                    fprintf(hashes, "std %.1f | %s | %d rows | %016llx\n", stds[si], cases[c].name, rows[k],
                            (unsigned long long)f);
                }
            }
            printf("\n");
        }
    }
    free(h);
    if (hashes && fclose(hashes) != 0) {
        perror("bench-sample-cuda: --hashes");
        return 1;
    }
    return 0;
}
