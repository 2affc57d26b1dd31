/* bench-gemm-cuda.c: the batch-invariant bf16 product (with cuBLASLt where it
 * serves, and the in-house kernels alone) against cuBLAS on the Qwen3-4B layer
 * shapes, for a few row counts.
 *
 *   bench-gemm-cuda [--reps N] [--shapes qkv,o,...] [--ms 1,8,...] [--resident] [--accumulate]
 *                   [--max-ranges N]
 *
 * The invariant product runs three times: with its default choice between a
 * split's k ranges as one cuBLASLt batch and as products in turn, always as a
 * batch, and always in turn (the same where the split is 1 or the kernels take
 * the pass). --accumulate: the products add to y, as o and down do.
 * --max-ranges N: k in at most N ranges (ds_k_gemm_split_at_most).
 *
 * Prints, per shape and M, the time per launch of each (a CUDA graph of reps
 * launches with the weights rotated among copies larger than the L2 cache,
 * the median of 5 replays), the weight bytes per second and the tensor
 * throughput. --resident: one copy of the weights, which the L2 then holds
 * when it fits (the products' time with their weights already on chip). */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "kernels.h"

#define BENCH_NAME "bench-gemm-cuda"
#include "bench-check.h"

static int cmp(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Whether name is in the comma-separated list (every name when there is no list). */
static int listed(const char *list, const char *name)
{
    if (!list)
        return 1;
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !strncmp(p, name, n))
            return 1;
        p += len + (e ? 1 : 0);
    }
    return 0;
}

int main(int argc, char **argv)
{
    int reps = 20, resident = 0, accumulate = 0, max_ranges = 0;
    const char *only_shapes = NULL, *only_ms = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--resident")) {
            resident = 1;
        } else if (!strcmp(argv[i], "--accumulate")) {
            accumulate = 1;
        } else if (i + 1 < argc && !strcmp(argv[i], "--reps")) {
            reps = atoi(argv[++i]);
        } else if (i + 1 < argc && !strcmp(argv[i], "--shapes")) {
            only_shapes = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "--ms")) {
            only_ms = argv[++i];
        } else if (i + 1 < argc && !strcmp(argv[i], "--max-ranges")) {
            max_ranges = atoi(argv[++i]);
        } else {
            int help = !strcmp(argv[i], "--help");
            fprintf(help ? stdout : stderr, "usage: bench-gemm-cuda [--reps N] [--shapes qkv,o,gate_up,down,lm_head] "
                                            "[--ms 1,8,...] [--resident] [--accumulate] [--max-ranges N]\n");
            return help ? 0 : 2;
        }
    }
    if (reps < 1) {
        fprintf(stderr, "bench-gemm-cuda: --reps must be at least 1\n");
        return 2;
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        fprintf(stderr, "bench-gemm-cuda: no CUDA device\n");
        return 77;
    }
    struct cudaDeviceProp p;
    CHECK(cudaGetDeviceProperties(&p, 0));
    const struct { const char *name; int N, K; } shapes[] = {
        {"qkv", 6144, 2560}, {"o", 2560, 4096}, {"gate_up", 19456, 2560}, {"down", 2560, 9728}, {"lm_head", 151936, 2560},
    };
    const int Ms[] = {1, 8, 16, 17, 32, 64, 128, 256, 512, 1024, 2048};
    struct ds_k_gemm_lt *lt, *lt_batch, *lt_turn;
    CHECK(ds_k_gemm_lt_create(&lt));
    CHECK(ds_k_gemm_lt_create(&lt_batch));
    CHECK(ds_k_gemm_lt_create(&lt_turn));
    ds_k_gemm_lt_set_in_turn_rows(lt_batch, 0);
    ds_k_gemm_lt_set_in_turn_rows(lt_turn, 1);
    cublasHandle_t h;
    CHECK(cublasCreate(&h));
    void *cws;
    CHECK(cudaMalloc(&cws, 32u << 20));
    CHECK(cublasSetWorkspace(h, cws, 32u << 20));   /* products captured in graphs */
    printf("# %s, %d SMs; per launch: a graph of %d launches (%s%s), median of 5 replays\n\n", p.name,
           p.multiProcessorCount, reps, resident ? "one copy of the weights" : "weights rotated",
           accumulate ? ", adding to y" : "");
    printf("| shape | N x K | M | split | invariant us | ranges batched us | ranges in turn us | kernels alone us "
           "| cuBLAS us | invariant GB/s (W) | invariant TFLOP/s | cuBLAS TFLOP/s | invariant / cuBLAS |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        if (!listed(only_shapes, shapes[si].name))
            continue;
        int N = shapes[si].N, K = shapes[si].K;
        size_t wbytes = (size_t)N * K * 2;
        int copies = (int)(512e6 / wbytes) + 1;   /* > the 50 MB L2 by far */
        if (copies > 8)
            copies = 8;
        if (resident)
            copies = 1;
        uint16_t *w;
        CHECK(cudaMalloc((void **)&w, wbytes * copies));
        CHECK(ds_k_fill_uniform_bf16(w, wbytes / 2 * copies, 7, 0.0f, 0.05f, 0));
        int split = ds_k_gemm_split_at_most(ds_k_gemm_split(N, K, p.multiProcessorCount), K, max_ranges);
        for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++) {
            int M = Ms[mi];
            char mname[16];
            snprintf(mname, sizeof mname, "%d", M);
            if (!listed(only_ms, mname))
                continue;
            uint16_t *x;
            float *y, *ws;
            CHECK(cudaMalloc((void **)&x, (size_t)M * K * 2));
            CHECK(cudaMalloc((void **)&y, (size_t)M * N * 4));
            CHECK(cudaMalloc((void **)&ws, ds_k_gemm_workspace(M, N, split) * 4 + 4));
            CHECK(cudaMemset(ws, 0, ds_k_gemm_workspace(M, N, split) * 4 + 4));
            CHECK(ds_k_fill_uniform_bf16(x, (size_t)M * K, 3, 0.0f, 1.0f, 0));
            /* each implementation: one graph of reps launches (weights rotated), replayed 5 times */
            float t[5][5];
            cudaStream_t st;
            CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
            CHECK(cublasSetStream(h, st));
            cudaEvent_t e0, e1;
            cudaEventCreate(&e0);
            cudaEventCreate(&e1);
            struct ds_k_gemm_lt *invariant[4] = {lt, lt_batch, lt_turn, NULL};
            for (int impl = 0; impl < 5; impl++) {   /* invariant: default, batched, in turn, kernels alone; cuBLAS */
                cudaGraph_t g;
                cudaGraphExec_t ge;
                CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
                for (int r = 0; r < reps; r++) {
                    const uint16_t *wc = w + (size_t)(r % copies) * N * K;
                    if (impl < 4) {
                        CHECK(ds_k_gemm_bf16(invariant[impl], x, K, wc, M, N, K, split, ws, y, N, accumulate, st));
                    } else {
                        float one = 1, beta = (float)accumulate;
                        CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, wc, CUDA_R_16BF, K, x, CUDA_R_16BF,
                                           K, &beta, y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
                    }
                }
                CHECK(cudaStreamEndCapture(st, &g));
                CHECK(cudaGraphInstantiate(&ge, g, 0));
                CHECK(cudaGraphLaunch(ge, st));   /* warm-up */
                CHECK(cudaStreamSynchronize(st));
                for (int i = 0; i < 5; i++) {
                    cudaEventRecord(e0, st);
                    CHECK(cudaGraphLaunch(ge, st));
                    cudaEventRecord(e1, st);
                    CHECK(cudaEventSynchronize(e1));
                    cudaEventElapsedTime(&t[impl][i], e0, e1);
                    t[impl][i] /= (float)reps;
                }
                cudaGraphExecDestroy(ge);
                cudaGraphDestroy(g);
            }
            cudaStreamDestroy(st);
            for (int impl = 0; impl < 5; impl++)
                qsort(t[impl], 5, sizeof(float), cmp);
            double ti = t[0][2] * 1e-3, tb = t[1][2] * 1e-3, tt = t[2][2] * 1e-3, tk = t[3][2] * 1e-3;
            double tc = t[4][2] * 1e-3, flop = 2.0 * M * N * K;
            printf("| %s | %d x %d | %d | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f | %.1f | %.1f | %.2f |\n",
                   shapes[si].name, N, K, M, split, ti * 1e6, tb * 1e6, tt * 1e6, tk * 1e6, tc * 1e6,
                   wbytes / ti / 1e9, flop / ti / 1e12, flop / tc / 1e12, ti / tc);
            fflush(stdout);
            cudaFree(x), cudaFree(y), cudaFree(ws);
            cudaEventDestroy(e0), cudaEventDestroy(e1);
        }
        cudaFree(w);
    }
    cublasDestroy(h);
    ds_k_gemm_lt_destroy(lt);
    ds_k_gemm_lt_destroy(lt_batch);
    ds_k_gemm_lt_destroy(lt_turn);
    return 0;
}
