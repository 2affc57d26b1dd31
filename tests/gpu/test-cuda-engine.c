/* test-cuda-engine.c: the CUDA backend as a whole, on a GPU host.
 *
 *  1. The target forward on the GPU against the CPU backend, for the bundled
 *     model and three test models (tied/untied, GQA 1/2/4, head_dim 16, 24, 32,
 *     sharded): logits and captured layers within bf16 tolerance.
 *     A model loaded without its layers, which the GPU then reads from the
 *     checkpoint itself, gives the same logits bits as one uploaded from the host.
 *  2. Batch invariance of the whole forward: a sequence's logits are the same
 *     bits alone and inside a ragged batch with other sequences. The target's
 *     products with k in fewer ranges (ds_cuda_opts.max_ranges) give other
 *     bits, within bf16 rounding of the default's.
 *  3. The draft on the GPU against the CPU draft (draft.c), for every Markov
 *     head kind, with and without a confidence head: context rows from the
 *     target's captured features, a block, then the γ Markov positions:
 *     corrected logits and confidence logits within bf16 tolerance; the
 *     greedy phase chained on the device (and replayed as a CUDA graph) gives
 *     the step-by-step chain's drafts bit for bit.
 *  4. Greedy speculative output equals greedy target-only output token for
 *     token, on the GPU (target and draft), for every speculation mode, at
 *     concurrency 1, 32 and 256 (the bundled target and DSpark draft), and
 *     with the target's k in fewer ranges at concurrency 32.
 *  5. Sampled speculative decoding (--spec dspark, T > 0 with top-p, and with
 *     top-k, greedy sequences mixed in) with the draws on the GPU against the
 *     draws on the host from the same GPU logits: equal outputs token for token
 *     (all but at most one sequence), acceptance above zero, no full-vocabulary
 *     logits copied to the host in the GPU run (and some in the host run, so
 *     the counter counts), a replay gives the same tokens, sampled sequences
 *     with one prompt and different seeds part, greedy ones do not; a case
 *     without greedy rows (the draft's phase skips its argmax), and one of 3
 *     sequences at a time (verifies too small for the screen); the screen
 *     computes fewer distributions than rows verified where it runs (top-k
 *     rows included).
 * Prints TAP; without a CUDA device it prints a skip plan and exits 77.
 * DS_TEST_QUICK=1 runs part 4 at concurrency 1 only (for the memory checker). */
#include "config.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-cuda.h"
#include "dspark/ds-draft.h"
#include "dspark/ds-engine.h"
#include "dspark/ds-model.h"
#include "dspark/ds-sched.h"
#include "../../engine/draft-ops.h"

static int n_test, n_failed;

static void tap(bool ok, const char *fmt, ...) DS_PRINTF(2, 3);
static void tap(bool ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s %d - ", ok ? "ok" : "not ok", ++n_test);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    n_failed += !ok;
}

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static const char *src_path(const char *rel)
{
    static char buf[4][4096];
    static int slot;
    char *b = buf[slot++ % 4];
    snprintf(b, 4096, "%s/%s", DS_SRCDIR, rel);
    return b;
}

/* max |a - b| / max |b| */
static double norm_err(const float *a, const float *b, size_t n)
{
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (isnan(a[i]))
            d = INFINITY;
        if (d > md)
            md = d;
        if (fabs(b[i]) > mr)
            mr = fabs(b[i]);
    }
    return md / (mr > 0 ? mr : 1e-30);
}

/* A ragged batch: n_seqs sequences prefilled from position 0 with lens[s] random tokens, interleaved. */
struct pass {
    int n;
    int32_t tokens[512], pos[512], seq[512], rows[512];
    struct ds_kv_seq kv[4];
    struct ds_kv_seq *kvp[4];
};

static int make_pass(struct ds_kv_pool *pool, struct pass *p, const int *lens, int n_seqs, int V,
                     const int32_t (*ids)[128])
{
    memset(p, 0, sizeof *p);
    for (int s = 0; s < n_seqs; s++) {
        if (ds_kv_reserve(pool, &p->kv[s], lens[s]) < 0)
            return -1;
        p->kvp[s] = &p->kv[s];
    }
    int done[4] = {0};
    while (1) {
        bool any = false;
        for (int s = 0; s < n_seqs; s++) {
            int take = 1 + (int)(rnd() % 5);
            for (int k = 0; k < take && done[s] < lens[s]; k++) {
                p->tokens[p->n] = ids[s][done[s]] % V;
                p->pos[p->n] = done[s]++;
                p->seq[p->n] = s;
                p->rows[p->n] = p->n;
                p->n++;
                any = true;
            }
        }
        if (!any)
            break;
    }
    return 0;
}

static void release_pass(struct ds_kv_pool *pool, struct pass *p, int n_seqs)
{
    for (int s = 0; s < n_seqs; s++)
        ds_kv_release(pool, &p->kv[s]);
}

/* Part 1 and 2 for one model directory. */
static void check_forward(const char *rel, double bound)
{
    struct ds_model *m = NULL;
    struct ds_model_opts mo = {0};
    if (ds_model_load(src_path(rel), &mo, &m) < 0) {
        tap(false, "%s: load: %s", rel, ds_errdetail());
        return;
    }
    const struct ds_qwen3_config *c = &m->cfg;
    int V = c->vocab_size, H = c->hidden_size;
    struct ds_cuda_target *t = NULL;
    struct ds_cuda_opts co = {0};
    if (ds_cuda_target_new(m, &co, &t) < 0 || ds_cuda_kv_alloc(t, 64, 8, 32) < 0) {
        tap(false, "%s: upload: %s", rel, ds_errdetail());
        ds_model_free(m);
        return;
    }
    struct ds_kv_pool cpu_pool, gpu_pool;
    if (ds_kv_pool_init(&cpu_pool, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 8, 64) < 0 ||
        ds_kv_pool_init_pages(&gpu_pool, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 8, 64) < 0) {
        tap(false, "%s: pools: %s", rel, ds_errdetail());
        return;
    }
    struct ds_pool *threads = NULL;
    struct ds_forward_ctx *ctx = NULL;
    if (ds_pool_new(0, &threads) < 0 || ds_forward_ctx_new(m, threads, &ctx) < 0)
        abort();
    int32_t ids[3][128];
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < 128; i++)
            ids[s][i] = (int32_t)(rnd() % (uint32_t)V);
    int lens[3] = {5, 17, 33};
    struct pass pc, pg;
    uint64_t saved = rng;
    if (make_pass(&cpu_pool, &pc, lens, 3, V, (const int32_t(*)[128])ids) < 0)
        abort();
    rng = saved;
    if (make_pass(&gpu_pool, &pg, lens, 3, V, (const int32_t(*)[128])ids) < 0)
        abort();
    int cap_layers[3] = {-1, 1, c->num_hidden_layers - 1};
    int n = pc.n;
    float *lc = malloc((size_t)n * V * 4), *lg = malloc((size_t)n * V * 4);
    float *cc = malloc((size_t)n * 3 * H * 4), *cg = malloc((size_t)n * 3 * H * 4);
    struct ds_batch bc = {.n_tokens = n, .tokens = pc.tokens, .pos = pc.pos, .seq = pc.seq, .kv = pc.kvp,
                          .n_logits = n, .logit_rows = pc.rows, .logits = lc, .n_capture = 3,
                          .capture_layers = cap_layers, .captured = cc};
    struct ds_batch bg = bc;
    bg.kv = pg.kvp;
    bg.logits = lg;
    bg.captured = cg;
    for (size_t i = 0; i < (size_t)n * V; i++)
        lg[i] = NAN;
    if (ds_model_forward(m, ctx, &cpu_pool, &bc) < 0 || ds_cuda_forward(t, &gpu_pool, &bg) < 0) {
        tap(false, "%s: forward: %s", rel, ds_errdetail());
    } else {
        double el = norm_err(lg, lc, (size_t)n * V), ec = norm_err(cg, cc, (size_t)n * 3 * H);
        int agree = 0;
        for (int r = 0; r < n; r++) {
            int a = 0, b = 0;
            for (int v = 1; v < V; v++) {
                if (lc[(size_t)r * V + v] > lc[(size_t)r * V + a])
                    a = v;
                if (lg[(size_t)r * V + v] > lg[(size_t)r * V + b])
                    b = v;
            }
            agree += a == b;
        }
        printf("# %s: logits normalized max error %.3g, captures %.3g, argmax agrees on %d of %d rows\n", rel, el,
               ec, agree, n);
        tap(el < bound && ec < bound, "%s: GPU forward (bf16) vs CPU forward (f32): logits and captures within %.0e",
            rel, bound);

        /* part 2: the middle sequence alone, in a fresh cache */
        release_pass(&gpu_pool, &pg, 3);
        struct pass alone;
        int len1[1] = {17};
        const int32_t(*ids1)[128] = (const int32_t(*)[128])ids[1];
        if (make_pass(&gpu_pool, &alone, len1, 1, V, ids1) < 0)
            abort();
        float *la = malloc((size_t)alone.n * V * 4);
        struct ds_batch ba = {.n_tokens = alone.n, .tokens = alone.tokens, .pos = alone.pos, .seq = alone.seq,
                              .kv = alone.kvp, .n_logits = alone.n, .logit_rows = alone.rows, .logits = la};
        if (ds_cuda_forward(t, &gpu_pool, &ba) < 0) {
            tap(false, "%s: forward alone: %s", rel, ds_errdetail());
        } else {
            int same = 0, k = 0;
            for (int i = 0; i < n; i++) {
                if (pc.seq[i] != 1)
                    continue;
                /* token k of the sequence: same position in the batch-alone pass */
                same += !memcmp(lg + (size_t)i * V, la + (size_t)pc.pos[i] * V, (size_t)V * 4);
                k++;
            }
            tap(same == k && k == 17, "%s: a sequence's logits are the same bits alone and in a ragged batch (%d of %d)",
                rel, same, k);
        }
        free(la);
        release_pass(&gpu_pool, &alone, 1);
    }
    release_pass(&cpu_pool, &pc, 3);
    free(lc), free(lg), free(cc), free(cg);
    ds_forward_ctx_free(ctx);
    ds_pool_free(threads);
    ds_kv_pool_done(&cpu_pool);
    ds_kv_pool_done(&gpu_pool);
    ds_cuda_target_free(t);
    ds_model_free(m);
}


/* ds_cuda_opts.max_ranges reaches the products: the bundled target (whose down product splits k in 3 ranges)
 * with at most 2 gives other bits for the same pass, within bf16 rounding of the default's logits. */
static void check_fewer_ranges(void)
{
    struct ds_model *m = NULL;
    struct ds_model_opts mo = {0};
    if (ds_model_load(src_path("models/dspark-tiny-target"), &mo, &m) < 0) {
        tap(false, "fewer k ranges: load: %s", ds_errdetail());
        return;
    }
    int V = m->cfg.vocab_size;
    struct ds_cuda_target *t[2] = {NULL, NULL};
    struct ds_kv_pool pool;
    if (ds_kv_pool_init_pages(&pool, m->cfg.num_hidden_layers, m->cfg.num_key_value_heads, m->cfg.head_dim, 8, 64) < 0)
        abort();
    int32_t ids[2][128];
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < 128; i++)
            ids[s][i] = (int32_t)(rnd() % (uint32_t)V);
    int lens[2] = {9, 21};
    struct pass p;
    if (make_pass(&pool, &p, lens, 2, V, (const int32_t(*)[128])ids) < 0)
        abort();
    float *logits[2];
    bool ran = true;
    for (int i = 0; i < 2; i++) {
        struct ds_cuda_opts co = {.max_ranges = i ? 2 : 0};
        logits[i] = malloc((size_t)p.n * V * 4);
        struct ds_batch b = {.n_tokens = p.n, .tokens = p.tokens, .pos = p.pos, .seq = p.seq, .kv = p.kvp,
                             .n_logits = p.n, .logit_rows = p.rows, .logits = logits[i]};
        if (ds_cuda_target_new(m, &co, &t[i]) < 0 || ds_cuda_kv_alloc(t[i], 64, 8, 32) < 0 ||
            ds_cuda_forward(t[i], &pool, &b) < 0) {
            tap(false, "fewer k ranges: %s", ds_errdetail());
            ran = false;
            break;
        }
    }
    if (ran) {
        size_t n = (size_t)p.n * V, differ = 0;
        for (size_t i = 0; i < n; i++)
            differ += memcmp(&logits[0][i], &logits[1][i], 4) != 0;
        double e = norm_err(logits[1], logits[0], n);
        tap(differ > 0 && e < 1e-2, "products in at most 2 k ranges: %zu of %zu logits other bits than with 3, "
            "normalized max difference %.3g", differ, n, e);
    }
    for (int i = 0; i < 2; i++)
        ds_cuda_target_free(t[i]);
    free(logits[0]);
    free(logits[1]);
    release_pass(&pool, &p, 2);
    ds_kv_pool_done(&pool);
    ds_model_free(m);
}
/* Part 1b: a model loaded without its layers (the GPU reads them from the
 * checkpoint) gives the same logits bits as one uploaded from the host. */
static void check_direct_load(const char *rel)
{
    struct ds_model *full = NULL, *lean = NULL;
    struct ds_model_opts mo_full = {0}, mo_lean = {.skip_layers = true};
    if (ds_model_load(src_path(rel), &mo_full, &full) < 0 || ds_model_load(src_path(rel), &mo_lean, &lean) < 0) {
        tap(false, "%s: load: %s", rel, ds_errdetail());
        return;
    }
    const struct ds_qwen3_config *c = &full->cfg;
    int V = c->vocab_size;
    struct ds_cuda_target *ta = NULL, *tb = NULL;
    struct ds_cuda_opts co = {0};
    struct ds_kv_pool pool_a, pool_b;
    if (ds_cuda_target_new(full, &co, &ta) < 0 || ds_cuda_target_new(lean, &co, &tb) < 0 ||
        ds_cuda_kv_alloc(ta, 64, 8, 32) < 0 || ds_cuda_kv_alloc(tb, 64, 8, 32) < 0 ||
        ds_kv_pool_init_pages(&pool_a, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 8, 64) < 0 ||
        ds_kv_pool_init_pages(&pool_b, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 8, 64) < 0) {
        tap(false, "%s: direct load: %s", rel, ds_errdetail());
        return;
    }
    int32_t ids[2][128];
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < 128; i++)
            ids[s][i] = (int32_t)(rnd() % (uint32_t)V);
    int lens[2] = {9, 21};
    struct pass pa, pb;
    uint64_t saved = rng;
    if (make_pass(&pool_a, &pa, lens, 2, V, (const int32_t(*)[128])ids) < 0)
        abort();
    rng = saved;
    if (make_pass(&pool_b, &pb, lens, 2, V, (const int32_t(*)[128])ids) < 0)
        abort();
    int n = pa.n;
    float *la = malloc((size_t)n * V * 4), *lb = malloc((size_t)n * V * 4);
    struct ds_batch ba = {.n_tokens = n, .tokens = pa.tokens, .pos = pa.pos, .seq = pa.seq, .kv = pa.kvp,
                          .n_logits = n, .logit_rows = pa.rows, .logits = la};
    struct ds_batch bb = ba;
    bb.kv = pb.kvp;
    bb.logits = lb;
    if (ds_cuda_forward(ta, &pool_a, &ba) < 0 || ds_cuda_forward(tb, &pool_b, &bb) < 0) {
        tap(false, "%s: direct load forward: %s", rel, ds_errdetail());
    } else {
        bool same = !memcmp(la, lb, (size_t)n * V * 4);
        tap(same && ds_cuda_weight_bytes(ta) == ds_cuda_weight_bytes(tb),
            "%s: layers read from the checkpoint on the GPU give the same logits bits as the host upload", rel);
    }
    /* and the CPU refuses a model without layers */
    struct ds_pool *threads = NULL;
    struct ds_forward_ctx *ctx = NULL;
    struct ds_kv_pool cpu_pool;
    if (ds_pool_new(1, &threads) < 0 || ds_forward_ctx_new(lean, threads, &ctx) < 0 ||
        ds_kv_pool_init(&cpu_pool, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 8, 64) < 0)
        abort();
    struct pass pc;
    rng = saved;
    if (make_pass(&cpu_pool, &pc, lens, 2, V, (const int32_t(*)[128])ids) < 0)
        abort();
    struct ds_batch bcpu = {.n_tokens = pc.n, .tokens = pc.tokens, .pos = pc.pos, .seq = pc.seq, .kv = pc.kvp,
                            .n_logits = pc.n, .logit_rows = pc.rows, .logits = la};
    tap(ds_model_forward(lean, ctx, &cpu_pool, &bcpu) == -DS_EINVAL && strstr(ds_errdetail(), "without its layers"),
        "%s: the CPU forward refuses a model loaded without its layers", rel);
    release_pass(&cpu_pool, &pc, 2);
    ds_kv_pool_done(&cpu_pool);
    ds_forward_ctx_free(ctx);
    ds_pool_free(threads);
    release_pass(&pool_a, &pa, 2);
    release_pass(&pool_b, &pb, 2);
    free(la), free(lb);
    ds_kv_pool_done(&pool_a);
    ds_kv_pool_done(&pool_b);
    ds_cuda_target_free(ta);
    ds_cuda_target_free(tb);
    ds_model_free(full);
    ds_model_free(lean);
}

/* Part 3: the GPU draft against the CPU draft on three sequences of one pass. */
static void check_draft(const char *target_rel, const char *draft_rel, double bound)
{
    struct ds_model *m = NULL;
    struct ds_draft *d = NULL;
    struct ds_model_opts mo = {0};
    if (ds_model_load(src_path(target_rel), &mo, &m) < 0 || ds_draft_load(src_path(draft_rel), m, &d) < 0) {
        tap(false, "%s: load: %s", draft_rel, ds_errdetail());
        ds_model_free(m);
        return;
    }
    const struct ds_qwen3_config *c = &m->cfg;
    const struct ds_dspark_config *dc = ds_draft_config(d);
    int V = c->vocab_size, H = c->hidden_size, g = ds_draft_block_size(d), nm = dc->n_target_layers;
    enum { S = 3 };
    struct ds_cuda_target *t = NULL;
    struct ds_cuda_draft *gd = NULL;
    struct ds_cuda_opts co = {.graphs = true};
    struct ds_kv_pool cpu_pool, gpu_pool;
    if (ds_cuda_target_new(m, &co, &t) < 0 || ds_cuda_kv_alloc(t, 64, 8, 32) < 0 ||
        ds_cuda_reserve(t, 128, S, nm) < 0 || ds_cuda_draft_new(t, d, S, &gd) < 0 ||
        ds_kv_pool_init(&cpu_pool, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 8, 64) < 0 ||
        ds_kv_pool_init_pages(&gpu_pool, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 8, 64) < 0) {
        tap(false, "%s: GPU draft: %s", draft_rel, ds_errdetail());
        return;
    }
    struct ds_pool *threads = NULL;
    struct ds_forward_ctx *ctx = NULL;
    if (ds_pool_new(0, &threads) < 0 || ds_forward_ctx_new(m, threads, &ctx) < 0)
        abort();
    int32_t ids[S][128];
    for (int s = 0; s < S; s++)
        for (int i = 0; i < 128; i++)
            ids[s][i] = (int32_t)(rnd() % (uint32_t)V);
    int lens[S] = {4, 19, 30};
    struct pass pc, pg;
    uint64_t saved = rng;
    if (make_pass(&cpu_pool, &pc, lens, S, V, (const int32_t(*)[128])ids) < 0)
        abort();
    rng = saved;
    if (make_pass(&gpu_pool, &pg, lens, S, V, (const int32_t(*)[128])ids) < 0)
        abort();
    for (int s = 0; s < S; s++)   /* the block's positions too */
        if (ds_kv_reserve(&gpu_pool, &pg.kv[s], lens[s] + g) < 0)
            abort();
    int n = pc.n;
    float *lc = malloc((size_t)n * V * 4), *feats = malloc((size_t)n * nm * H * 4);
    struct ds_batch bc = {.n_tokens = n, .tokens = pc.tokens, .pos = pc.pos, .seq = pc.seq, .kv = pc.kvp,
                          .n_logits = n, .logit_rows = pc.rows, .logits = lc, .n_capture = nm,
                          .capture_layers = dc->target_layer_ids, .captured = feats};
    struct ds_batch bg = bc;   /* the GPU keeps its captures on the device */
    bg.kv = pg.kvp;
    bg.logits = NULL;
    bg.captured = NULL;
    bg.n_logits = 0;
    struct ds_draft_scratch scr = {0};
    struct ds_draft_cache cache[S] = {{0}};
    struct ds_draft_cache *row_cache[512], *caches[S];
    struct ds_kv_seq *row_kv[512];
    float *h = malloc((size_t)S * g * H * 4), *U = malloc((size_t)S * g * V * 4);
    float *corr = malloc((size_t)S * V * 4), *lg = malloc((size_t)S * V * 4);
    float *state = calloc((size_t)S * (dc->markov_rank + 1), 4);
    double e_logits = 0, e_conf = 0;
    int agree = 0, total = 0, r = 0;
    for (int s = 0; s < S; s++) {
        caches[s] = &cache[s];
        if (ds_draft_cache_reserve(d, &cache[s], 64) < 0)
            abort();
    }
    for (int i = 0; i < n; i++) {
        row_cache[i] = &cache[pc.seq[i]];
        row_kv[i] = pg.kvp[pc.seq[i]];
    }
    if (ds_model_forward(m, ctx, &cpu_pool, &bc) < 0 || ds_cuda_forward(t, &gpu_pool, &bg) < 0 ||
        ds_draft_add_context(d, threads, n, feats, row_cache, pc.pos, &scr) < 0 ||
        ds_cuda_draft_context(gd, &gpu_pool, n, pc.rows, row_kv, pc.pos) < 0) {
        tap(false, "%s: context: %s", draft_rel, ds_errdetail());
        r = -1;
    }
    int32_t anchor[S], start[S], prev[S], gids[S];
    float zc[S], zg[S];
    for (int s = 0; s < S && r == 0; s++) {
        cache[s].len = lens[s];
        anchor[s] = (int32_t)(rnd() % (uint32_t)V);
        start[s] = lens[s];
        prev[s] = anchor[s];
    }
    if (r == 0 && (ds_draft_block(d, threads, S, caches, anchor, start, h, U, &scr) < 0 ||
                   ds_cuda_draft_block(gd, &gpu_pool, S, pg.kvp, anchor, start) < 0)) {
        tap(false, "%s: block: %s", draft_rel, ds_errdetail());
        r = -1;
    }
    for (int k = 0; k < g && r == 0; k++) {
        if (ds_draft_markov_step(d, threads, S, prev, U + (size_t)k * V, g * V, h + (size_t)k * H, g * H, state, corr,
                                 zc, &scr) < 0 ||
            ds_cuda_draft_step(gd, k, prev, gids, zg, lg) < 0) {
            tap(false, "%s: Markov position %d: %s", draft_rel, k, ds_errdetail());
            r = -1;
            break;
        }
        double el = norm_err(lg, corr, (size_t)S * V);
        e_logits = el > e_logits ? el : e_logits;
        for (int s = 0; s < S; s++) {
            if (isnan(zc[s]) != isnan(zg[s])) {
                e_conf = INFINITY;
            } else if (!isnan(zc[s])) {
                double ez = fabs((double)zg[s] - zc[s]) / (fabs(zc[s]) > 1 ? fabs(zc[s]) : 1);
                e_conf = ez > e_conf ? ez : e_conf;
            }
            int best = 0;
            for (int v = 1; v < V; v++)
                if (corr[(size_t)s * V + v] > corr[(size_t)s * V + best])
                    best = v;
            agree += gids[s] == best;
            total++;
            prev[s] = best;   /* both follow the CPU's drafts */
        }
    }
    if (r == 0) {
        printf("# %s: corrected logits normalized max error %.3g, confidence %.3g, argmax agrees on %d of %d\n",
               draft_rel, e_logits, e_conf, agree, total);
        tap(e_logits < bound && e_conf < bound,
            "%s: GPU draft (bf16) vs CPU draft (f32): context, block and %d Markov positions within %.0e", draft_rel,
            g, bound);
    }
    /* the greedy phase chained on the device (eager, captured, replayed) gives
     * the step-by-step chain's drafts and confidences, bit for bit */
    int32_t chain[S * 16], fused[S * 16];
    float zchain[S * 16], zfused[S * 16], pchain[S * 16], pfused[S * 16];
    for (int s = 0; s < S; s++)
        prev[s] = anchor[s];
    if (r == 0 && ds_cuda_draft_block(gd, &gpu_pool, S, pg.kvp, anchor, start) < 0)
        r = -1;
    for (int k = 0; k < g && r == 0; k++) {
        if (ds_cuda_draft_step(gd, k, prev, gids, zg, lg) < 0)
            r = -1;
        for (int s = 0; s < S && r == 0; s++) {
            chain[s * g + k] = prev[s] = gids[s];
            zchain[s * g + k] = zg[s];
            /* the argmax's probability at T = 1 from the GPU's corrected logits, in double on the host */
            const float *row = lg + (size_t)s * V;
            double sum = 0;
            for (int v = 0; v < V; v++)
                sum += exp((double)row[v] - row[gids[s]]);
            pchain[s * g + k] = (float)(1 / sum);
        }
    }
    int same_runs = 0;
    double e_p = 0;
    for (int run = 0; run < 3 && r == 0; run++) {
        if (ds_cuda_draft_greedy(gd, &gpu_pool, S, pg.kvp, anchor, start, fused, zfused, pfused) < 0) {
            r = -1;
            break;
        }
        for (int i = 0; i < S * g; i++)
            e_p = fmax(e_p, isnan(pfused[i]) ? INFINITY : fabs((double)pfused[i] - pchain[i]) / pchain[i]);
        bool same = !memcmp(chain, fused, (size_t)S * g * 4);
        for (int i = 0; i < S * g; i++)
            same &= (isnan(zchain[i]) && isnan(zfused[i])) || !memcmp(&zchain[i], &zfused[i], 4);
        same_runs += same;
    }
    if (r < 0)
        tap(false, "%s: greedy chain: %s", draft_rel, ds_errdetail());
    else
        tap(same_runs == 3, "%s: greedy phase chained on the device = the step-by-step chain (%d of 3 runs)",
            draft_rel, same_runs);
    if (r == 0) {
        printf("# %s: the draft's probability of its argmax, device vs host from the same logits: max relative "
               "error %.3g\n", draft_rel, e_p);
        tap(e_p < 1e-4, "%s: greedy phase's draft probabilities = softmax of the GPU's logits within 1e-4",
            draft_rel);
    }
    for (int s = 0; s < S; s++)
        ds_draft_cache_done(&cache[s]);
    ds_scratch_done(&scr);
    free(lc), free(feats), free(h), free(U), free(corr), free(lg), free(state);
    release_pass(&cpu_pool, &pc, S);
    release_pass(&gpu_pool, &pg, S);
    ds_forward_ctx_free(ctx);
    ds_pool_free(threads);
    ds_kv_pool_done(&cpu_pool);
    ds_kv_pool_done(&gpu_pool);
    ds_cuda_draft_free(gd);
    ds_cuda_target_free(t);
    ds_draft_free(d);
    ds_model_free(m);
}

/* Part 4: run n_prompts prompts at the given concurrency and mode; outputs go to out[i].
 * released non-NULL: release the draft's host weights once the engine exists, and say how many bytes. */
static int engine_gemm_ranges;   /* run_engine's ds_engine_opts.gemm_ranges */

static int run_engine(struct ds_model *m, struct ds_draft *d, const char *mode, int conc, int n_prompts,
                      int32_t (*prompts)[64], const int *plen, int max_tokens, int32_t (*out)[64], int *out_n,
                      double *tau, size_t *released)
{
    struct ds_spec_mode spec;
    if (ds_spec_mode_parse(mode, &spec) < 0)
        return -1;
    struct ds_engine_opts o = {.backend = DS_BACKEND_CUDA, .cuda_graphs = true, .max_seqs = conc,
                               .max_context = 256, .spec = spec, .gemm_ranges = engine_gemm_ranges};
    struct ds_engine *e = NULL;
    if (ds_engine_new(m, spec.kind == DS_SPEC_NONE ? NULL : d, &o, &e) < 0)
        return -1;
    if (released)
        *released = ds_engine_release_draft_weights(e);
    if ((spec.kind == DS_SPEC_DSPARK || spec.kind == DS_SPEC_DSPARK_ASYNC) && ds_engine_profile_sps(e, 64, 2) < 0)
        return -1;
    for (int i = 0; i < n_prompts; i++) {
        struct ds_request rq = {.prompt = prompts[i], .n_prompt = plen[i], .max_tokens = max_tokens,
                                .sampling = {.temperature = 0, .top_p = 1}, .stop_ids = NULL, .n_stop_ids = 0,
                                .user = (void *)(intptr_t)i};
        int32_t none = -1;
        rq.stop_ids = &none;   /* no stop id: every sequence runs max_tokens */
        rq.n_stop_ids = 1;
        int id;
        if (ds_engine_submit(e, &rq, &id) < 0)
            return -1;
    }
    long acc = 0, rounds = 0;
    while (ds_engine_active(e) > 0) {
        if (ds_engine_step(e) < 0)
            return -1;
        struct ds_result *res[64];
        int k;
        while ((k = ds_engine_take_finished(e, res, 64)) > 0)
            for (int j = 0; j < k; j++) {
                int i = (int)(intptr_t)res[j]->user;
                out_n[i] = res[j]->n_ids < 64 ? res[j]->n_ids : 64;
                memcpy(out[i], res[j]->ids, (size_t)out_n[i] * 4);
                acc += res[j]->stats.num_accepted_tokens;
                rounds += res[j]->stats.rounds;
                ds_result_free(res[j]);
            }
    }
    *tau = rounds ? 1.0 + (double)acc / rounds : 1.0;
    ds_engine_free(e);
    return 0;
}

/* The bundled target (NULL m: the one given) and draft; a failing check when they do not load. */
static bool load_bundled_pair(struct ds_model **m, struct ds_draft **d)
{
    struct ds_model_opts mo = {0};
    if ((!*m && ds_model_load(src_path("models/dspark-tiny-target"), &mo, m) < 0) ||
        ds_draft_load(src_path("models/dspark-tiny-draft"), *m, d) < 0) {
        tap(false, "load the bundled pair: %s", ds_errdetail());
        return false;
    }
    return true;
}

static void check_lossless(bool quick)
{
    struct ds_model *m = NULL;
    struct ds_draft *d = NULL;
    if (!load_bundled_pair(&m, &d))
        return;
    enum { N = 256, MAXT = 40 };
    static int32_t prompts[N][64], base[N][64], got[N][64];
    static int plen[N], base_n[N], got_n[N];
    /* prompts: a common code-like prefix repeated with variations, so drafts get accepted */
    for (int i = 0; i < N; i++) {
        plen[i] = 6 + (int)(rnd() % 40);
        for (int k = 0; k < plen[i]; k++)
            prompts[i][k] = k < 4 ? 100 + (i % 7) * 13 + k : (int32_t)(rnd() % (uint32_t)m->cfg.vocab_size);
    }
    const char *modes[] = {"fixed:1", "fixed:4", "fixed:7", "threshold:0.5", "dspark", "dspark-async"};
    const int concs[] = {1, 32, 256};
    for (int ci = 0; ci < 3; ci++) {
        int conc = concs[ci];
        if (quick && conc > 1)
            continue;
        int n = conc == 1 ? 8 : conc;
        double tau;
        if (run_engine(m, d, "none", conc, n, prompts, plen, MAXT, base, base_n, &tau, NULL) < 0) {
            tap(false, "concurrency %d, none: %s", conc, ds_errdetail());
            continue;
        }
        for (size_t mi = 0; mi < sizeof modes / sizeof modes[0]; mi++) {
            memset(got_n, 0, sizeof got_n);
            if (run_engine(m, d, modes[mi], conc, n, prompts, plen, MAXT, got, got_n, &tau, NULL) < 0) {
                tap(false, "concurrency %d, %s: %s", conc, modes[mi], ds_errdetail());
                continue;
            }
            int same = 0, first_bad = -1;
            for (int i = 0; i < n; i++) {
                bool eq = got_n[i] == base_n[i] && base_n[i] == MAXT && !memcmp(got[i], base[i], (size_t)MAXT * 4);
                same += eq;
                if (!eq && first_bad < 0)
                    first_bad = i;
            }
            if (first_bad >= 0)
                printf("# first differing sequence %d (%d vs %d tokens)\n", first_bad, got_n[first_bad],
                       base_n[first_bad]);
            tap(same == n, "GPU greedy, concurrency %d, %s: %d of %d outputs equal target-only (tau %.2f)", conc,
                modes[mi], same, n, tau);
        }
        if (conc != 32 && !(quick && conc == 1))
            continue;
        /* the draft's host weights released once its GPU copy serves: same outputs, and the draft
         * refuses another engine */
        struct ds_draft *d2 = NULL;
        size_t released = 0;
        memset(got_n, 0, sizeof got_n);
        if (!load_bundled_pair(&m, &d2))
            continue;
        if (run_engine(m, d2, "dspark", conc, n, prompts, plen, MAXT, got, got_n, &tau, &released) < 0) {
            tap(false, "concurrency %d, dspark with the draft's host weights released: %s", conc, ds_errdetail());
        } else {
            int same = 0;
            for (int i = 0; i < n; i++)
                same += got_n[i] == base_n[i] && !memcmp(got[i], base[i], (size_t)MAXT * 4);
            struct ds_engine_opts o = {.backend = DS_BACKEND_CUDA, .max_seqs = 4, .max_context = 256};
            struct ds_engine *e2 = NULL;
            int r2 = ds_engine_new(m, d2, &o, &e2);
            tap(released > 0 && same == n && r2 == -DS_EINVAL && strstr(ds_errdetail(), "released"),
                "concurrency %d, dspark with the draft's host weights released (%zu bytes): %d of %d outputs "
                "equal target-only; another engine refuses the draft (%d: %s)", conc, released, same, n, r2,
                ds_errdetail());
            ds_engine_free(e2);
        }
        ds_draft_free(d2);
    }
    /* the target's products in fewer k ranges (down's 3 become 2: other bits, check_fewer_ranges): speculation
     * still gives what the target alone gives with them */
    engine_gemm_ranges = 2;
    int n = quick ? 8 : 32, conc = quick ? 1 : 32;
    double tau;
    if (run_engine(m, d, "none", conc, n, prompts, plen, MAXT, base, base_n, &tau, NULL) < 0 ||
        run_engine(m, d, "dspark", conc, n, prompts, plen, MAXT, got, got_n, &tau, NULL) < 0) {
        tap(false, "the target's k in 2 ranges: %s", ds_errdetail());
    } else {
        int same = 0;
        for (int i = 0; i < n; i++)
            same += got_n[i] == MAXT && base_n[i] == MAXT && !memcmp(got[i], base[i], (size_t)MAXT * 4);
        tap(same == n, "GPU greedy, concurrency %d, dspark, the target's k in at most 2 ranges: %d of %d outputs "
            "equal target-only's (tau %.2f)", conc, same, n, tau);
    }
    engine_gemm_ranges = 0;
    ds_draft_free(d);
    ds_model_free(m);
}

/* Part 5: sampled rounds with the draws on the GPU and on the host. */
enum { SN = 32, SMAXT = 40 };

struct sampled_run {
    int32_t out[SN][64];
    int n_out[SN];
    long accepted, drafted, rounds;
    uint64_t logits_bytes;           /* full-vocabulary logits copied to the host during the run */
    uint64_t verify_rows, distribution_rows;   /* ds_cuda_verify_rows at the end */
};

static int run_sampled(struct ds_model *m, struct ds_draft *d, bool host, int max_seqs, int32_t (*prompts)[64],
                       const int *plen, const struct ds_sampling *smp, struct sampled_run *res)
{
    struct ds_engine_opts o = {.backend = DS_BACKEND_CUDA, .cuda_graphs = true, .cuda_host_sampling = host,
                               .max_seqs = max_seqs, .max_context = 256, .spec = {.kind = DS_SPEC_DSPARK}};
    struct ds_engine *e = NULL;
    memset(res, 0, sizeof *res);
    if (ds_engine_new(m, d, &o, &e) < 0)
        return -1;
    /* a flat SPS(B): verifying one more draft never costs, so the schedule
     * verifies every draft whatever the timings and both runs draw the same
     * positions with the same uniforms */
    int b[2] = {1, 1 << 20};
    double sps[2] = {1.0, 1.0};
    struct ds_sps flat = {.n = 2, .b = b, .sps = sps};
    int r = ds_engine_set_sps(e, &flat);
    uint64_t before = ds_cuda_logits_to_host(ds_engine_cuda_target(e));
    for (int i = 0; i < SN && r == 0; i++) {
        int32_t none = -1;   /* no stop id: every sequence runs SMAXT tokens */
        struct ds_request rq = {.prompt = prompts[i / 2], .n_prompt = plen[i / 2], .max_tokens = SMAXT,
                                .sampling = smp[i], .stop_ids = &none, .n_stop_ids = 1,
                                .user = (void *)(intptr_t)i};
        int id;
        r = ds_engine_submit(e, &rq, &id);
    }
    while (r == 0 && ds_engine_active(e) > 0) {
        if ((r = ds_engine_step(e)) < 0)
            break;
        struct ds_result *done[SN];
        int k;
        while ((k = ds_engine_take_finished(e, done, SN)) > 0)
            for (int j = 0; j < k; j++) {
                int i = (int)(intptr_t)done[j]->user;
                res->n_out[i] = done[j]->n_ids < 64 ? done[j]->n_ids : 64;
                memcpy(res->out[i], done[j]->ids, (size_t)res->n_out[i] * 4);
                res->accepted += done[j]->stats.num_accepted_tokens;
                res->drafted += done[j]->stats.num_draft_tokens;
                res->rounds += done[j]->stats.rounds;
                ds_result_free(done[j]);
            }
    }
    res->logits_bytes = ds_cuda_logits_to_host(ds_engine_cuda_target(e)) - before;
    ds_cuda_verify_rows(ds_engine_cuda_target(e), &res->verify_rows, &res->distribution_rows);
    ds_engine_free(e);
    return r;
}

static int same_outputs(const struct sampled_run *a, const struct sampled_run *b, int *first_bad)
{
    int same = 0;
    *first_bad = -1;
    for (int i = 0; i < SN; i++) {
        bool eq = a->n_out[i] == b->n_out[i] && !memcmp(a->out[i], b->out[i], (size_t)a->n_out[i] * 4);
        same += eq;
        if (!eq && *first_bad < 0)
            *first_bad = i;
    }
    return same;
}

static void check_sampled_case(struct ds_model *m, struct ds_draft *d, int32_t (*prompts)[64], const int *plen,
                               const char *name, float temperature, float top_p, int top_k, bool with_greedy,
                               int max_seqs)
{
    /* sequences 2j and 2j + 1 share prompt j; with_greedy: pairs j % 4 == 0
     * decode greedily (else no row is greedy, and the draft's sampled phase
     * takes no argmax) */
    struct ds_sampling smp[SN];
    for (int i = 0; i < SN; i++) {
        bool greedy = with_greedy && (i / 2) % 4 == 0;
        smp[i] = (struct ds_sampling){.temperature = greedy ? 0.0f : temperature, .top_p = top_p, .top_k = top_k,
                                      .seed = 7001 + 13 * (uint64_t)i};
    }
    static struct sampled_run dev, host, again;
    if (run_sampled(m, d, false, max_seqs, prompts, plen, smp, &dev) < 0 ||
        run_sampled(m, d, true, max_seqs, prompts, plen, smp, &host) < 0 ||
        run_sampled(m, d, false, max_seqs, prompts, plen, smp, &again) < 0) {
        tap(false, "sampled dspark, %s: %s", name, ds_errdetail());
        return;
    }
    int bad, same = same_outputs(&dev, &host, &bad);
    if (bad >= 0) {
        int k = 0;
        while (k < dev.n_out[bad] && k < host.n_out[bad] && dev.out[bad][k] == host.out[bad][k])
            k++;
        printf("# %s: sequence %d first differs at token %d of %d (GPU draws %d, host draws %d)\n", name, bad, k,
               dev.n_out[bad], k < dev.n_out[bad] ? dev.out[bad][k] : -1, k < host.n_out[bad] ? host.out[bad][k] : -1);
    }
    printf("# %s: GPU draws accepted %ld of %ld drafts in %ld rounds, host draws %ld of %ld in %ld\n", name,
           dev.accepted, dev.drafted, dev.rounds, host.accepted, host.drafted, host.rounds);
    /* the probabilities agree bit for bit but where exp rounding (CUDA's expf
     * within 2 ulp, glibc's within 0.502) differs by an ulp or two, and
     * draws sum exactly where the host sums in double: a token differs only
     * when a uniform lands within ~1e-7 of a threshold (expected well under
     * once per run); one such event makes the rest of its sequence differ */
    tap(same >= SN - 1, "sampled dspark, %s: GPU draws = host draws from the same GPU logits for %d of %d sequences "
        "(at least %d)", name, same, SN, SN - 1);
    bool full = true;
    for (int i = 0; i < SN; i++)
        full &= dev.n_out[i] == SMAXT && host.n_out[i] == SMAXT;
    tap(full && dev.accepted > 0 && host.accepted > 0 && dev.rounds > 0 && dev.accepted < dev.drafted,
        "sampled dspark, %s: every sequence ran %d tokens, drafts accepted (GPU %ld, host %ld of %ld drafted)", name,
        SMAXT, dev.accepted, host.accepted, dev.drafted);
    tap(dev.logits_bytes == 0 && again.logits_bytes == 0 && host.logits_bytes > 0,
        "sampled dspark, %s: no logits copied to the host with GPU draws (%llu bytes; host draws: %llu)", name,
        (unsigned long long)dev.logits_bytes, (unsigned long long)host.logits_bytes);
    /* verifies of more than 32 rows (at most 8 per sequence here) screen their
     * drafts (ds_k_spec_screen), top-k rows too, and compute fewer
     * distributions; smaller ones compute every row's */
    bool screened = max_seqs * 8 > 32;
    tap(dev.verify_rows > 0 &&
            (screened ? dev.distribution_rows < dev.verify_rows : dev.distribution_rows == dev.verify_rows),
        "sampled dspark, %s: %s: the distribution of %llu of %llu verified rows", name,
        screened ? "screened verifies" : "unscreened verifies", (unsigned long long)dev.distribution_rows,
        (unsigned long long)dev.verify_rows);
    int replay = same_outputs(&dev, &again, &bad);
    tap(replay == SN, "sampled dspark, %s: a second GPU run replays the same tokens (%d of %d)", name, replay, SN);
    int parted = 0, pairs = 0, greedy_same = 0, greedy_pairs = 0;
    for (int j = 0; j < SN / 2; j++) {
        bool eq = !memcmp(dev.out[2 * j], dev.out[2 * j + 1], (size_t)SMAXT * 4);
        if (with_greedy && j % 4 == 0) {
            greedy_pairs++;
            greedy_same += eq;
        } else {
            pairs++;
            parted += !eq;
        }
    }
    tap(greedy_same == greedy_pairs && 4 * parted >= pairs,
        "sampled dspark, %s: one prompt, two seeds: %d of %d sampled pairs part (at least a quarter), %d of %d greedy "
        "pairs agree", name, parted, pairs, greedy_same, greedy_pairs);
}

static void check_sampled(void)
{
    struct ds_model *m = NULL;
    struct ds_draft *d = NULL;
    if (!load_bundled_pair(&m, &d))
        return;
    static int32_t prompts[SN / 2][64];
    static int plen[SN / 2];
    for (int i = 0; i < SN / 2; i++) {
        plen[i] = 6 + (int)(rnd() % 30);
        for (int k = 0; k < plen[i]; k++)
            prompts[i][k] = k < 4 ? 100 + (i % 7) * 13 + k : (int32_t)(rnd() % (uint32_t)m->cfg.vocab_size);
    }
    check_sampled_case(m, d, prompts, plen, "T 0.9, top-p 0.9", 0.9f, 0.9f, 0, true, SN);
    check_sampled_case(m, d, prompts, plen, "T 1, top-k 20", 1.0f, 1.0f, 20, true, SN);
    check_sampled_case(m, d, prompts, plen, "T 0.8, top-p 0.95, no greedy rows", 0.8f, 0.95f, 0, false, SN);
    check_sampled_case(m, d, prompts, plen, "T 1.1, top-p 0.9, 3 at a time", 1.1f, 0.9f, 0, true, 3);
    ds_draft_free(d);
    ds_model_free(m);
}

int main(void)
{
    if (!ds_cuda_available()) {
        char why[256];
        ds_cuda_describe(0, why, sizeof why);
        printf("1..0 # SKIP %s\n", why);
        return 77;
    }
    char dev[256];
    ds_cuda_describe(0, dev, sizeof dev);
    printf("# device 0: %s\n", dev);
    bool quick = getenv("DS_TEST_QUICK") && atoi(getenv("DS_TEST_QUICK"));
    check_forward("models/dspark-tiny-target", 3e-2);
    check_forward("tests/data/models/tiny-tied-gqa4", 3e-2);
    check_forward("tests/data/models/tiny-untied-gqa2-hd", 3e-2);
    check_forward("tests/data/models/tiny-mha", 3e-2);
    check_direct_load("models/dspark-tiny-target");
    check_direct_load("tests/data/models/tiny-untied-gqa2-hd");
    check_fewer_ranges();
    static const char *const drafts[] = {"draft-vanilla", "draft-gated", "draft-rnn", "draft-vanilla-noconf",
                                         "draft-dflash", "draft-m3-noembed"};
    for (size_t i = 0; i < sizeof drafts / sizeof drafts[0]; i++) {
        char rel[128];
        snprintf(rel, sizeof rel, "tests/data/drafts/%s", drafts[i]);
        check_draft("tests/data/models/pair-target", rel, 3e-2);
    }
    check_draft("models/dspark-tiny-target", "models/dspark-tiny-draft", 3e-2);
    check_lossless(quick);
    check_sampled();
    printf("1..%d\n", n_test);
    return n_failed ? 1 : 0;
}
