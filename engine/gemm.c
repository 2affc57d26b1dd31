/* gemm.c: the batch-invariant f32 matrix product y = x·Wᵀ of the CPU backend.
 *
 * W is packed into panels of NR = 32 output columns: panel j holds
 * W[j*NR + c][kk] at [kk][c], so one k step of a micro-kernel loads 32
 * contiguous weights. A micro-kernel computes an MR x 32 tile of y as
 * fma(x[r][kk], w[kk][c], acc) for kk = 0..k-1 in order. The k loop is never
 * split, so every element of y is the same chain of fused multiply-adds for
 * any m, row tile, thread or instruction set (the generic path uses fmaf).
 * Threads take whole panels; rows are processed in blocks that stay in cache. */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-gemm.h"

#define NR 32
#define ROW_BLOCK 96     /* rows of x per block: x block stays in L2 while panels stream */

typedef float v16 __attribute__((vector_size(64)));

static float *alloc_panels(int n, int k, size_t *ret_count)
{
    size_t np = (size_t)(n + NR - 1) / NR;
    size_t count = np * (size_t)k * NR;
    float *p = NULL;
    if (posix_memalign((void **)&p, 64, count * sizeof(float) + 64) != 0)
        return NULL;
    memset(p, 0, count * sizeof(float));
    *ret_count = count;
    return p;
}

int ds_mat_from_f32(struct ds_mat *m, const float *w, int n, int k)
{
    size_t count;
    if (n <= 0 || k <= 0)
        return ds_seterr(DS_EINVAL, "matrix shape [%d, %d] is invalid", n, k);
    float *p = alloc_panels(n, k, &count);
    if (!p)
        return ds_seterr(DS_ENOMEM, "could not allocate a %d x %d weight matrix", n, k);
    for (int i = 0; i < n; i++) {
        float *dst = p + (size_t)(i / NR) * k * NR + (i % NR);
        const float *src = w + (size_t)i * k;
        for (int kk = 0; kk < k; kk++)
            dst[(size_t)kk * NR] = src[kk];
    }
    m->n = n;
    m->k = k;
    m->nr = NR;
    m->panels = p;
    return 0;
}

int ds_mat_from_tensor(struct ds_mat *m, const struct ds_tensor *t, int64_t row0, int n)
{
    if (t->ndim != 2 || row0 < 0 || n <= 0 || row0 + n > t->shape[0])
        return ds_seterr(DS_EINVAL, "tensor '%s': rows %lld..%lld are not inside its shape",
                         t->name, (long long)row0, (long long)(row0 + n));
    int k = (int)t->shape[1];
    size_t count;
    float *p = alloc_panels(n, k, &count);
    if (!p)
        return ds_seterr(DS_ENOMEM, "tensor '%s': could not allocate %d x %d floats", t->name, n, k);
    float *row = malloc((size_t)k * sizeof(float));
    if (!row) {
        free(p);
        return ds_seterr(DS_ENOMEM, "tensor '%s': out of memory", t->name);
    }
    for (int i = 0; i < n; i++) {
        ds_tensor_to_f32(t, (size_t)(row0 + i) * k, (size_t)k, row);
        float *dst = p + (size_t)(i / NR) * k * NR + (i % NR);
        for (int kk = 0; kk < k; kk++)
            dst[(size_t)kk * NR] = row[kk];
    }
    free(row);
    m->n = n;
    m->k = k;
    m->nr = NR;
    m->panels = p;
    return 0;
}

void ds_mat_row(const struct ds_mat *m, int i, float *out)
{
    const float *src = m->panels + (size_t)(i / NR) * m->k * NR + (i % NR);
    for (int kk = 0; kk < m->k; kk++)
        out[kk] = src[(size_t)kk * NR];
}

int ds_mat_concat(struct ds_mat *out, const struct ds_mat *parts, int n_parts)
{
    int n = 0, k = parts[0].k;
    for (int i = 0; i < n_parts; i++) {
        if (parts[i].k != k)
            return ds_seterr(DS_EINVAL, "cannot stack matrices with %d and %d inputs", k, parts[i].k);
        n += parts[i].n;
    }
    size_t count;
    float *p = alloc_panels(n, k, &count);
    if (!p)
        return ds_seterr(DS_ENOMEM, "could not allocate a %d x %d weight matrix", n, k);
    float *row = ds_xmalloc((size_t)k * sizeof(float));
    int base = 0;
    for (int i = 0; i < n_parts; i++) {
        for (int r = 0; r < parts[i].n; r++) {
            ds_mat_row(&parts[i], r, row);
            int dst_row = base + r;
            float *dst = p + (size_t)(dst_row / NR) * k * NR + (dst_row % NR);
            for (int kk = 0; kk < k; kk++)
                dst[(size_t)kk * NR] = row[kk];
        }
        base += parts[i].n;
    }
    free(row);
    out->n = n;
    out->k = k;
    out->nr = NR;
    out->panels = p;
    return 0;
}

void ds_mat_done(struct ds_mat *m)
{
    if (!m)
        return;
    free(m->panels);
    memset(m, 0, sizeof *m);
}

/* ---- micro-kernels ----
 * KERNEL_BODY(MR) computes rows x[0..MR) against one panel into y, columns
 * [0, ncols). It is instantiated per instruction set below. */
#define KERNEL_BODY(MR)                                                                   \
    do {                                                                                  \
        v16 c0[MR], c1[MR];                                                               \
        for (int r = 0; r < MR; r++) {                                                    \
            if (acc) {                                                                    \
                float tmp[NR] = {0};                                                      \
                memcpy(tmp, y + (size_t)r * ldy, (size_t)ncols * sizeof(float));          \
                memcpy(&c0[r], tmp, 64);                                                  \
                memcpy(&c1[r], tmp + 16, 64);                                             \
            } else {                                                                      \
                c0[r] = (v16){0};                                                         \
                c1[r] = (v16){0};                                                         \
            }                                                                             \
        }                                                                                 \
        for (int kk = 0; kk < k; kk++) {                                                  \
            v16 b0, b1;                                                                   \
            memcpy(&b0, panel + (size_t)kk * NR, 64);                                     \
            memcpy(&b1, panel + (size_t)kk * NR + 16, 64);                                \
            for (int r = 0; r < MR; r++) {                                                \
                v16 a = (v16){0} + x[(size_t)r * ldx + kk];                               \
                c0[r] = FMA(a, b0, c0[r]);                                                \
                c1[r] = FMA(a, b1, c1[r]);                                                \
            }                                                                             \
        }                                                                                 \
        for (int r = 0; r < MR; r++) {                                                    \
            float tmp[NR];                                                                \
            memcpy(tmp, &c0[r], 64);                                                      \
            memcpy(tmp + 16, &c1[r], 64);                                                 \
            memcpy(y + (size_t)r * ldy, tmp, (size_t)ncols * sizeof(float));              \
        }                                                                                 \
    } while (0)

#define KERNEL_ARGS const float *x, int ldx, const float *panel, int k, float *y, int ldy, int ncols, bool acc

/* Runs rows [0, m) against one panel with the widest tiles first. */
#define DEFINE_PANEL(ISA, ATTR, MRBIG, MRMID)                                             \
    ATTR static void kern_##ISA##_big(KERNEL_ARGS) { KERNEL_BODY(MRBIG); }              \
    ATTR static void kern_##ISA##_mid(KERNEL_ARGS) { KERNEL_BODY(MRMID); }              \
    ATTR static void kern_##ISA##_1(KERNEL_ARGS) { KERNEL_BODY(1); }                    \
    ATTR static void panel_##ISA(const float *x, int ldx, int m, const float *panel,      \
                                 int k, float *y, int ldy, int ncols, bool acc)            \
    {                                                                                     \
        int r = 0;                                                                        \
        for (; r + MRBIG <= m; r += MRBIG)                                                \
            kern_##ISA##_big(x + (size_t)r * ldx, ldx, panel, k, y + (size_t)r * ldy,     \
                             ldy, ncols, acc);                                            \
        for (; r + MRMID <= m; r += MRMID)                                                \
            kern_##ISA##_mid(x + (size_t)r * ldx, ldx, panel, k, y + (size_t)r * ldy, ldy,  \
                           ncols, acc);                                                   \
        for (; r < m; r++)                                                                \
            kern_##ISA##_1(x + (size_t)r * ldx, ldx, panel, k, y + (size_t)r * ldy, ldy,  \
                           ncols, acc);                                                   \
    }

/* Vector fused multiply-add: with FMA hardware the compiler contracts a*b+c into
 * one instruction (-ffp-contract=fast is GCC's default for GNU C). */
#define FMA(a, b, c) ((a) * (b) + (c))
DEFINE_PANEL(avx512, __attribute__((target("avx512f,fma"))), 12, 4)
DEFINE_PANEL(avx2, __attribute__((target("avx2,fma"))), 3, 2)
#undef FMA

/* Generic path: explicit fmaf per lane, so the result is bit-identical to the FMA paths. */
#define FMA(a, b, c)                                                                      \
    ({                                                                                    \
        v16 fma_r_;                                                                       \
        for (int fma_i_ = 0; fma_i_ < 16; fma_i_++)                                       \
            fma_r_[fma_i_] = fmaf((a)[fma_i_], (b)[fma_i_], (c)[fma_i_]);                  \
        fma_r_;                                                                           \
    })
DEFINE_PANEL(generic, , 4, 2)
#undef FMA

typedef void (*panel_fn)(const float *, int, int, const float *, int, float *, int, int, bool);

static panel_fn select_panel(const char **name)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) {
        *name = "avx512f";
        return panel_avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *name = "avx2+fma";
        return panel_avx2;
    }
    *name = "generic";
    return panel_generic;
}

static panel_fn the_panel;
static const char *the_isa;

static panel_fn get_panel(void)
{
    if (!the_panel) {
        const char *name;
        panel_fn f = select_panel(&name);
        the_isa = name;
        the_panel = f;   /* idempotent: a race writes the same values */
    }
    return the_panel;
}

int ds_gemm_set_isa(const char *isa)
{
    const char *best;
    panel_fn f = select_panel(&best);
    if (!isa || !*isa || strcmp(isa, best) == 0) {
        the_panel = f;
        the_isa = best;
        return 0;
    }
    if (strcmp(isa, "generic") == 0) {
        the_panel = panel_generic;
        the_isa = "generic";
        return 0;
    }
    if (strcmp(isa, "avx2+fma") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        the_panel = panel_avx2;
        the_isa = "avx2+fma";
        return 0;
    }
    return ds_seterr(DS_ENOTSUP, "instruction set '%s' is not available here (best: '%s')", isa, best);
}

const char *ds_gemm_isa(void)
{
    get_panel();
    return the_isa;
}

struct gemm_job {
    const struct ds_mat *w;
    const float *x;
    int ldx, m;
    float *y;
    int ldy;
    bool acc;
    int panels_per_task;
    panel_fn fn;
};

static void gemm_task(void *ctx, int task, int thread)
{
    (void)thread;
    const struct gemm_job *j = ctx;
    const struct ds_mat *w = j->w;
    int np = (w->n + NR - 1) / NR;
    int p0 = task * j->panels_per_task, p1 = p0 + j->panels_per_task;
    if (p1 > np)
        p1 = np;
    for (int r0 = 0; r0 < j->m; r0 += ROW_BLOCK) {
        int rows = j->m - r0 < ROW_BLOCK ? j->m - r0 : ROW_BLOCK;
        for (int p = p0; p < p1; p++) {
            int ncols = w->n - p * NR < NR ? w->n - p * NR : NR;
            j->fn(j->x + (size_t)r0 * j->ldx, j->ldx, rows, w->panels + (size_t)p * w->k * NR, w->k,
                  j->y + (size_t)r0 * j->ldy + (size_t)p * NR, j->ldy, ncols, j->acc);
        }
    }
}

void ds_gemm(struct ds_pool *pool, const struct ds_mat *w, const float *x, int ldx, int m, float *y,
             int ldy, bool accumulate)
{
    if (m <= 0)
        return;
    int np = (w->n + NR - 1) / NR;
    /* small products are cheaper than waking the pool */
    if ((double)m * w->n * w->k < 524288.0)
        pool = NULL;
    int threads = ds_pool_threads(pool);
    /* a few tasks per thread for balance; whole panels only */
    int tasks = threads == 1 ? 1 : threads * 4;
    if (tasks > np)
        tasks = np;
    struct gemm_job j = {
        .w = w, .x = x, .ldx = ldx, .m = m, .y = y, .ldy = ldy, .acc = accumulate,
        .panels_per_task = (np + tasks - 1) / tasks, .fn = get_panel(),
    };
    tasks = (np + j.panels_per_task - 1) / j.panels_per_task;
    ds_pool_run(pool, tasks, gemm_task, &j);
}
