/* bench-attention-cuda.c: the attention over a paged bf16 cache on its own
 * (ds_k_attention_bf16: the tensor-core kernel and the merge of its position
 * groups), with Qwen3-4B/8B's heads (32 query heads, 8 KV heads, head_dim
 * 128), for verification passes of R sequences x q tokens at a context of C
 * positions, on random caches and queries.
 *
 *   bench-attention-cuda [--reps N] [--out FILE] [--passes RxQxC,...]
 *
 * Prints µs per launch, the fastest of N (20). --passes replaces the default
 * list of passes (R sequences x q tokens at context C). --out writes every pass's bf16
 * output, one after another, so that two builds can be compared bit for bit
 * (`cmp`). The sequences' contexts differ (C down to 5/8 C), and their pages
 * are scattered over the pool. */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "kernels.h"

#define N_HEADS 32
#define N_KV 8
#define HEAD_DIM 128
#define PAGE 16

#define BENCH_NAME "bench-attention-cuda"
#include "bench-check.h"

static uint64_t rng = 88172645463325252ull;

/* uniform in [-1, 1) (xorshift64) */
static float uniform(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0) * 2.0f - 1.0f;
}

static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static void *dev_copy(const void *h, size_t bytes)
{
    void *d;
    CHECK(cudaMalloc(&d, bytes));
    CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    return d;
}

/* One pass: R sequences of q new tokens each at context ctx; the fastest of reps launches, in µs. */
static double run_pass(int R, int q, int ctx, int reps, FILE *out)
{
    int n = R * q, max_pages = (ctx + q + PAGE - 1) / PAGE, n_pages = R * max_pages;
    size_t cache = (size_t)n_pages * PAGE * N_KV * HEAD_DIM, q_elems = (size_t)n * N_HEADS * HEAD_DIM;
    uint16_t *k = malloc(cache * 2), *v = malloc(cache * 2);   /* [n_pages, PAGE, N_KV, HEAD_DIM] */
    float *qh = malloc(q_elems * 4);                           /* [n, N_HEADS * HEAD_DIM] */
    int32_t *seq = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4);
    int32_t *pages = malloc((size_t)R * max_pages * 4);        /* [R, max_pages] */
    int32_t *run_start = malloc((size_t)n * 4), *run_len = malloc((size_t)n * 4);
    uint16_t *result = malloc(q_elems * 2);
    CHECK(!k || !v || !qh || !seq || !pos || !pages || !run_start || !run_len || !result);
    for (size_t i = 0; i < cache; i++) {
        k[i] = to_bf16(uniform());
        v[i] = to_bf16(uniform());
    }
    for (size_t i = 0; i < q_elems; i++)
        qh[i] = 3.0f * uniform();
    for (int s = 0; s < R; s++)
        for (int p = 0; p < max_pages; p++)
            pages[s * max_pages + p] = p * R + s;   /* each sequence's pages spread over the pool */
    for (int s = 0; s < R; s++)
        for (int t = 0; t < q; t++) {
            seq[s * q + t] = s;
            pos[s * q + t] = ctx - (s % 4) * (ctx / 8) + t;
        }
    int longest = 0;
    int32_t n_runs = ds_k_attention_runs(seq, n, N_HEADS, N_KV, run_start, run_len, &longest);

    void *d_k = dev_copy(k, cache * 2), *d_v = dev_copy(v, cache * 2), *d_q = dev_copy(qh, q_elems * 4);
    void *d_seq = dev_copy(seq, (size_t)n * 4), *d_pos = dev_copy(pos, (size_t)n * 4);
    void *d_pages = dev_copy(pages, (size_t)R * max_pages * 4);
    void *d_rs = dev_copy(run_start, (size_t)n * 4), *d_rl = dev_copy(run_len, (size_t)n * 4);
    void *d_nr = dev_copy(&n_runs, 4), *d_ws, *d_out;
    CHECK(cudaMalloc(&d_ws, ds_k_attention_workspace(n, N_HEADS, HEAD_DIM) * 4));
    CHECK(cudaMalloc(&d_out, q_elems * 2));
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    float best = 1e30f;
    for (int r = 0; r < reps; r++) {
        CHECK(cudaEventRecord(e0, 0));
        CHECK(ds_k_attention_bf16(d_q, N_HEADS * HEAD_DIM, d_k, d_v, d_seq, d_pos, d_rs, d_rl, d_nr, longest, d_pages,
                                  max_pages, PAGE, n, N_HEADS, N_KV, HEAD_DIM, 0.08838834764831845f, d_ws, d_out, 0));
        CHECK(cudaEventRecord(e1, 0));
        CHECK(cudaEventSynchronize(e1));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (ms < best)
            best = ms;
    }
    CHECK(cudaMemcpy(result, d_out, q_elems * 2, cudaMemcpyDeviceToHost));
    if (out)
        CHECK(fwrite(result, 2, q_elems, out) != q_elems);
    void *dev[] = {d_k, d_v, d_q, d_seq, d_pos, d_pages, d_rs, d_rl, d_nr, d_ws, d_out};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        cudaFree(dev[i]);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    free(k);
    free(v);
    free(qh);
    free(seq);
    free(pos);
    free(pages);
    free(run_start);
    free(run_len);
    free(result);
    return best * 1e3;
}

struct pass {
    int R, q, ctx;
};

/* "RxQxC,RxQxC,..." into at most max passes; their count, or -1 when the list is malformed. */
static int parse_passes(const char *list, struct pass *passes, int max)
{
    int n = 0;
    const char *s = list;
    while (*s) {
        int R, q, ctx, used = 0;
        if (n == max || sscanf(s, "%dx%dx%d%n", &R, &q, &ctx, &used) != 3 || R < 1 || R > 4096 || q < 1 ||
            q > 64 || ctx < 1 || ctx > 131072)
            return -1;
        passes[n++] = (struct pass){R, q, ctx};
        s += used;
        if (*s == ',')
            s++;
        else if (*s)
            return -1;
    }
    return n;
}

int main(int argc, char **argv)
{
    int reps = 20;
    const char *out_path = NULL;
    struct pass passes[32] = {{1, 1, 1024}, {1, 8, 1024}, {8, 8, 1024}, {64, 1, 1024}, {64, 8, 1024},
                              {256, 4, 300}, {3, 5, 100}, {32, 8, 4096}};
    int n_passes = 8;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            char *end;
            long r = strtol(argv[++i], &end, 10);
            if (*end || r < 1 || r > 1000) {
                fprintf(stderr, "bench-attention-cuda: --reps takes 1 to 1000\n");
                return 2;
            }
            reps = (int)r;
        } else if (!strcmp(argv[i], "--out") && i + 1 < argc) {
            out_path = argv[++i];
        } else if (!strcmp(argv[i], "--passes") && i + 1 < argc) {
            n_passes = parse_passes(argv[++i], passes, (int)(sizeof passes / sizeof passes[0]));
            if (n_passes < 1) {
                fprintf(stderr, "bench-attention-cuda: --passes takes RxQxC,... (R 1-4096, q 1-64, C 1-131072; "
                                "at most 32)\n");
                return 2;
            }
        } else {
            fprintf(stderr, "usage: bench-attention-cuda [--reps N] [--out FILE] [--passes RxQxC,...]\n");
            return !!strcmp(argv[i], "--help") * 2;
        }
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        fprintf(stderr, "bench-attention-cuda: no CUDA device\n");
        return 1;
    }
    FILE *out = NULL;
    if (out_path && !(out = fopen(out_path, "wb"))) {
        perror(out_path);
        return 1;
    }
    char dev[320] = "";
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
        snprintf(dev, sizeof dev, "%.255s, %d SMs", prop.name, prop.multiProcessorCount);
    printf("# %s; %d query heads, %d KV heads, head_dim %d, pages of %d; fastest of %d launches\n\n", dev, N_HEADS,
           N_KV, HEAD_DIM, PAGE, reps);
    printf("| R | q | context | tokens | attention + merge µs |\n|---|---|---|---|---|\n");
    for (int i = 0; i < n_passes; i++) {
        double us = run_pass(passes[i].R, passes[i].q, passes[i].ctx, reps, out);
        printf("| %d | %d | %d | %d | %.1f |\n", passes[i].R, passes[i].q, passes[i].ctx, passes[i].R * passes[i].q, us);
        fflush(stdout);
    }
    if (out && fclose(out) != 0) {
        perror(out_path);
        return 1;
    }
    return 0;
}
