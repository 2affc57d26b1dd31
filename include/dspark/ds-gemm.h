/* ds-gemm.h: a thread pool and the batch-invariant f32 matrix product of the CPU backend.
 *
 * y[m, n] = x[m, k] · W[n, k]ᵀ, with W packed once at load into column panels
 * of `nr` outputs ([n/nr][k][nr]). Each output element is one fused
 * multiply-add chain over k = 0..k-1 in order, whatever m is, whichever row tile
 * or thread computes it and whichever instruction set runs: a token's result
 * never depends on the other tokens in its pass (what lossless speculative
 * decoding needs), and runs replay bit for bit. */
#ifndef DS_GEMM_H
#define DS_GEMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dspark/ds-err.h"
#include "dspark/ds-safetensors.h"

/* ---- thread pool ---- */
struct ds_pool;
typedef void (*ds_task_fn)(void *ctx, int task, int thread);

#define DS_POOL_MAX_THREADS 256

/* The default thread count for a machine with online_cpus CPUs online (0 or less: unknown): all of them,
 * but at most DS_POOL_MAX_THREADS, so that large hosts start. */
static inline int ds_pool_default_threads(long online_cpus)
{
    return online_cpus < 1 ? 1 : online_cpus > DS_POOL_MAX_THREADS ? DS_POOL_MAX_THREADS : (int)online_cpus;
}
/* n_threads <= 0: ds_pool_default_threads of the online CPUs; above DS_POOL_MAX_THREADS: DS_EINVAL. */
int ds_pool_new(int n_threads, struct ds_pool **ret) DS_MUSTCHECK;
struct ds_pool *ds_pool_free(struct ds_pool *pool);
int ds_pool_threads(const struct ds_pool *pool);
/* Run fn(ctx, task, thread) for task in 0..n_tasks-1 on the pool and wait. pool may be NULL (serial). */
void ds_pool_run(struct ds_pool *pool, int n_tasks, ds_task_fn fn, void *ctx);

/* ---- packed weights ---- */
struct ds_mat {
    int n;          /* output features (rows of W) */
    int k;          /* input features */
    int nr;         /* panel width */
    float *panels;  /* [ceil(n/nr), k, nr], zero-padded past n */
};

/* Pack rows [row0, row0 + n) of a [N, k] f32/f16/bf16 tensor. */
int ds_mat_from_tensor(struct ds_mat *m, const struct ds_tensor *t, int64_t row0, int n) DS_MUSTCHECK;
/* Pack a row-major f32 matrix w[n, k]. */
int ds_mat_from_f32(struct ds_mat *m, const float *w /* [n, k] */, int n, int k) DS_MUSTCHECK;
/* Stack several packed matrices with equal k into one (rows of a, then b, ...); frees nothing. */
int ds_mat_concat(struct ds_mat *out, const struct ds_mat *parts, int n_parts) DS_MUSTCHECK;
void ds_mat_done(struct ds_mat *m);
/* Unpack row i into out[k] (tests and slow paths). */
void ds_mat_row(const struct ds_mat *m, int i, float *out /* [k] */);

/* y = x·Wᵀ (or y += x·Wᵀ when accumulate: the chain then starts from y's value).
 * ldx/ldy are row strides in floats (>= k and >= n). */
void ds_gemm(struct ds_pool *pool, const struct ds_mat *w, const float *x /* [m, ldx] */, int ldx, int m,
             float *y /* [m, ldy] */, int ldy, bool accumulate);

/* The instruction set the product runs with ("avx512f", "avx2+fma" or "generic"). */
const char *ds_gemm_isa(void);
/* Choose the instruction set (NULL or "" = the best available); for tests and
 * benchmarks. Not thread-safe against running products. */
int ds_gemm_set_isa(const char *isa) DS_MUSTCHECK;

#endif
