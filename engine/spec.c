/* spec.c: the speculative round (dspark-spec.md §2–§5).
 *
 * One round: (1) every decoding sequence with speculation runs the draft block
 * from its anchor; the Markov head samples drafts d_1..d_γ left to right with
 * their distributions q_k and confidences c_k; (2) the scheduler picks ℓ_r;
 * (3) one target pass verifies [x_0, d_1..d_ℓ] of every sequence together with
 * the prefill chunks of new sequences, capturing the draft's features;
 * (4) chain accept/reject (greedy: d_i == argmax; sampled: u < p/q with the
 * residual on rejection), commit a+1 tokens, roll back the rest; (5) the
 * features of the committed tokens extend each draft context.
 *
 * On the CUDA backend sampled rows stay on the GPU (unless the engine was
 * asked to sample on the host): the draft draws its tokens there and keeps
 * their distributions q, and the target's rows are accepted or rejected there
 * from the logits the pass left (ds_cuda_draft_sample, ds_cuda_sample); the
 * host sees token ids and counts only. The host path below is the CPU
 * backend's, with the same uniforms, so both give the same tokens up to
 * float rounding. With the GPU draft, (5) comes before (4): every verified
 * row extends the contexts, queued behind the pass, so that work runs while
 * the acceptance is decided (collect_all_ctx_rows says why rows of rejected
 * drafts do no harm). */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-cuda.h"
#include "dspark/ds-draft.h"
#include "dspark/ds-model.h"
#include "dspark/ds-sched.h"
#include "draft-ops.h"
#include "engine-impl.h"

struct ds_spec_seq {
    struct ds_draft_cache cache;
    float a_hist[2][DS_MAX_BLOCK];   /* survivals of the last two rounds (async capacity) */
    int n_hist;                      /* rounds recorded, capped at 2 */
    float sts[DS_MAX_BLOCK];         /* STS temperatures for this sequence's sampling temperature */
    float map[DS_MAX_BLOCK][3];      /* and the (z, p) map of that set, where it has one */
    bool has_map;
};

struct ds_spec {
    struct ds_draft_scratch scratch;
    double prior_a[DS_MAX_BLOCK];    /* running mean survival per position (async prior) */
    long prior_n;
    FILE *trace;
    long round;
    double draft_s_per_seq;          /* EMA of the draft phase's time per drafting sequence */
    bool pause;                      /* this round the scheduled modes skip drafting */
    /* per-round buffers */
    float *h, *U, *q, *z, *corr, *state, *feat_rows;
    float *dprob;                    /* [R, γ] the draft's own probability of each draft (traces only) */
    float *gpu_p;                    /* [R, γ] the GPU's probability of each greedy draft (NaN: sampled) */
    size_t cap_h, cap_U, cap_q, cap_z, cap_gpu_p, cap_dprob, cap_corr, cap_state, cap_feat;
    int32_t *idx, *anchor, *start, *drafts, *prev, *ids, *len, *cap, *row0, *pos_rows, *ctx_tok;
    struct ds_sampling *samp;        /* [cap_r] the drafting sequences' sampling (GPU draft) */
    struct ds_draft_cache **caches;
    struct ds_kv_seq **kvs;          /* [cap_r] the drafting sequences' KV (GPU draft) */
    struct ds_seq **ctx_seq;         /* [cap_ctx] the sequence of each context row */
    int cap_ctx;
    int cap_r;
    float *a, *c;
};

static struct ds_sps effective_sps(const struct ds_engine *e, int R);

static void *grow(void *p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return p;
    p = ds_xrealloc(p, need * elem);
    *cap = need;
    return p;
}

void ds_engine_set_trace(struct ds_engine *e, FILE *f)
{
    if (e->spec)
        e->spec->trace = f;
}

size_t ds_engine_release_draft_weights(struct ds_engine *e)
{
    return e && e->cuda_draft ? ds_draft_release_weights(e->draft) : 0;
}

int ds_spec_init(struct ds_engine *e)
{
    e->spec = ds_xcalloc(1, sizeof *e->spec);
    if (e->gamma > DS_MAX_BLOCK)
        return ds_seterr(DS_ENOTSUP, "draft block size %d exceeds %d", e->gamma, DS_MAX_BLOCK);
    return 0;
}

void ds_spec_done(struct ds_engine *e)
{
    struct ds_spec *sp = e->spec;
    if (!sp)
        return;
    ds_scratch_done(&sp->scratch);
    free(sp->h), free(sp->U), free(sp->q), free(sp->z), free(sp->gpu_p), free(sp->dprob), free(sp->corr), free(sp->state);
    free(sp->feat_rows);
    free(sp->idx), free(sp->anchor), free(sp->start), free(sp->drafts), free(sp->prev), free(sp->ids), free(sp->len);
    free(sp->cap), free(sp->row0), free(sp->pos_rows), free(sp->ctx_tok), free(sp->caches), free(sp->kvs);
    free(sp->ctx_seq), free(sp->a), free(sp->c), free(sp->samp);
    free(sp);
    e->spec = NULL;
}

void ds_spec_seq_done(struct ds_engine *e, struct ds_seq *s)
{
    (void)e;
    if (!s->draft)
        return;
    ds_draft_cache_done(&s->draft->cache);
    free(s->draft);
    s->draft = NULL;
}

/* Set the engine's SPS table (copied). */
int ds_engine_set_sps(struct ds_engine *e, const struct ds_sps *t)
{
    if (t->n <= 0)
        return ds_seterr(DS_EINVAL, "the SPS table is empty");
    ds_sps_done(&e->sps);
    e->sps.n = t->n;
    e->sps.b = ds_xmalloc((size_t)t->n * sizeof(int));
    e->sps.sps = ds_xmalloc((size_t)t->n * sizeof(double));
    memcpy(e->sps.b, t->b, (size_t)t->n * sizeof(int));
    memcpy(e->sps.sps, t->sps, (size_t)t->n * sizeof(double));
    return 0;
}

const struct ds_sps *ds_engine_sps(const struct ds_engine *e)
{
    return &e->sps;
}

static int seq_draft_state(struct ds_engine *e, struct ds_seq *s)
{
    if (s->draft)
        return 0;
    s->draft = ds_xcalloc(1, sizeof *s->draft);
    s->draft->has_map = ds_draft_sts(e->draft, s->sampling.temperature, s->draft->sts, s->draft->map);
    if (e->cuda_draft)
        return 0;   /* the context lives in the GPU pages of the sequence's KV */
    return ds_draft_cache_reserve(e->draft, &s->draft->cache, s->cap + 1);
}

static bool uses_draft(const struct ds_seq *s)
{
    return s->spec.kind != DS_SPEC_NONE;
}

static bool scheduled(const struct ds_seq *s)
{
    return s->spec.kind == DS_SPEC_DSPARK || s->spec.kind == DS_SPEC_DSPARK_ASYNC;
}

/* Drafts this round: speculating, and not paused (a paused sequence decodes
 * one token but its draft context still grows). */
static bool drafts_now(const struct ds_engine *e, const struct ds_seq *s)
{
    return uses_draft(s) && !(e->spec->pause && scheduled(s));
}

#define PROBE_EVERY 16

/* Is drafting worth it this round for the scheduled sequences? Compares the best
 * fixed length's Θ (survivals and draft time of earlier rounds) with plain
 * decoding, and re-probes every PROBE_EVERY rounds. Independent of this round's
 * drafts, so lossless either way. */
static bool pause_drafting(struct ds_engine *e, int extra)
{
    struct ds_spec *sp = e->spec;
    int R = 0;
    for (int i = 0; i < e->n_seqs; i++)
        R += e->seqs[i]->state == DS_SEQ_DECODE && scheduled(e->seqs[i]);
    if (R == 0 || sp->prior_n == 0 || sp->draft_s_per_seq <= 0 || sp->round++ % PROBE_EVERY == 0)
        return false;
    struct ds_sps eff = effective_sps(e, R);
    int L = ds_sched_best_fixed(sp->prior_a, R, e->gamma, extra, &eff);
    double tau = R;
    for (int j = 0; j < L; j++)
        tau += R * sp->prior_a[j];
    double with = tau * ds_sps_at(&eff, extra + R * (1 + L)), without = R * ds_sps_at(&e->sps, extra + R);
    ds_sps_done(&eff);
    return without >= with;
}

static float sigmoid(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

/* A JSON array of n floats, null where not finite. */
static void put_floats(FILE *f, const float *x, int n)
{
    fputc('[', f);
    for (int k = 0; k < n; k++) {
        if (isfinite(x[k]))
            fprintf(f, "%s%.9g", k ? "," : "", x[k]);
        else
            fprintf(f, "%snull", k ? "," : "");
    }
    fputc(']', f);
}

static void trace_round(struct ds_engine *e, const struct ds_seq *s, long round, int start, int32_t anchor,
                        const int32_t *drafts, const float *z, const float *dprob, const float *survival, int len,
                        int accepted, const int32_t *committed, int n_committed)
{
    FILE *f = e->spec->trace;
    fprintf(f, "{\"seq\":%d,\"round\":%ld,\"start\":%d,\"anchor\":%d,\"temperature\":%g,\"drafts\":[", s->id, round,
            start, anchor, s->sampling.temperature);
    for (int k = 0; k < e->gamma; k++)
        fprintf(f, "%s%d", k ? "," : "", drafts[k]);
    fprintf(f, "],\"confidence\":");
    put_floats(f, z, e->gamma);
    fprintf(f, ",\"draft_prob\":");
    put_floats(f, dprob, e->gamma);
    fprintf(f, ",\"survival\":");
    put_floats(f, survival, e->gamma);
    fprintf(f, ",\"verify_len\":%d,\"accepted\":%d,\"committed\":[", len, accepted);
    for (int i = 0; i < n_committed; i++)
        fprintf(f, "%s%d", i ? "," : "", committed[i]);
    fprintf(f, "]}\n");
}

/* softmax(x)[j] at temperature 1, computed stably. */
static float prob_of(const float *x /* [n] */, int n, int32_t j)
{
    float mx = x[0];
    for (int v = 1; v < n; v++)
        if (x[v] > mx)
            mx = x[v];
    double sum = 0;
    for (int v = 0; v < n; v++)
        sum += exp((double)(x[v] - mx));
    return (float)(exp((double)(x[j] - mx)) / sum);
}

/* The calibrated confidence of a draft from its raw logit zk and the draft's
 * probability pk of it (NaN where unknown): the set's (z, p) map where it has
 * one and pk is known, else σ(zk / T_k). */
static float calibrated(const struct ds_spec_seq *ds, int k, float zk, float pk)
{
    if (!isfinite(zk))
        return 1.0f;
    if (ds->has_map && isfinite(pk)) {
        double p = fmin(fmax((double)pk, 1e-6), 1 - 1e-6);
        const float *m = ds->map[k];
        return sigmoid(m[0] * zk + m[1] * (float)log(p / (1 - p)) + m[2]);
    }
    return sigmoid(zk / ds->sts[k]);
}

/* Draft k of block i: the token the GPU chose (lg NULL: its argmax or its
 * draw, with gpu_pk its probability where the GPU gave one), else the argmax
 * for greedy rows (argmax_id when the GPU gave it, else from lg), else a draw
 * from the corrected logits lg (q keeps the distribution); records it with its
 * calibrated confidence and prefix survival, and the draft's probability of it
 * at temperature 1 (from lg when tracing or when a (z, p) map needs it; NaN
 * where unknown). */
static int32_t pick_draft(struct ds_engine *e, int i, int k, const float *lg, int32_t argmax_id, float zk,
                          float gpu_pk)
{
    struct ds_spec *sp = e->spec;
    struct ds_seq *s = e->seqs[sp->idx[i]];
    int g = e->gamma, V = e->target->cfg.vocab_size;
    int32_t dk;
    if (!lg) {
        dk = argmax_id;
    } else if (ds_sampling_is_greedy(&s->sampling)) {
        dk = argmax_id >= 0 ? argmax_id : ds_argmax(lg, V);
    } else {
        float *q = sp->q + ((size_t)i * g + k) * V;
        ds_probs(lg, V, &s->sampling, q, e->scratch);
        dk = ds_sample_probs(q, V, ds_uniform(s->sampling.seed, (uint64_t)(sp->start[i] + k + 1), DS_SLOT_DRAFT));
    }
    sp->drafts[(size_t)i * g + k] = dk;
    sp->z[(size_t)i * g + k] = zk;
    float pk = !lg ? gpu_pk : sp->trace || s->draft->has_map ? prob_of(lg, V, dk) : NAN;
    if (sp->trace)
        sp->dprob[(size_t)i * g + k] = pk;
    float ck = calibrated(s->draft, k, zk, pk);
    sp->c[(size_t)i * g + k] = ck;
    sp->a[(size_t)i * g + k] = (k == 0 ? 1.0f : sp->a[(size_t)i * g + k - 1]) * ck;
    return dk;
}

/* The draft phase on the CPU: blocks, then the Markov positions left to right. */
static int draft_cpu(struct ds_engine *e, int R)
{
    struct ds_spec *sp = e->spec;
    const struct ds_draft *d = e->draft;
    int g = e->gamma, V = e->target->cfg.vocab_size, H = e->target->cfg.hidden_size, r;
    if ((r = ds_draft_block(d, e->pool, R, sp->caches, sp->anchor, sp->start, sp->h, sp->U, &sp->scratch)) < 0)
        return r;
    memset(sp->state, 0, (size_t)R * (d->r + 1) * sizeof(float));
    float *zk = ds_xmalloc((size_t)R * sizeof(float));
    for (int i = 0; i < R; i++)
        sp->prev[i] = sp->anchor[i];
    for (int k = 0; k < g && r == 0; k++) {
        r = ds_draft_markov_step(d, e->pool, R, sp->prev, sp->U + (size_t)k * V, g * V, sp->h + (size_t)k * H, g * H,
                                 sp->state, sp->corr, zk, &sp->scratch);
        for (int i = 0; i < R && r == 0; i++)
            sp->prev[i] = pick_draft(e, i, k, sp->corr + (size_t)i * V, -1, zk[i], NAN);
    }
    free(zk);
    return r;
}

/* The draft phase on the GPU: one graph and one copy back of drafts and
 * confidences, drawing sampled rows' drafts there too (their q stay for the
 * acceptance); only with host sampling do the corrected logits of every
 * position come to the host. */
static int draft_cuda(struct ds_engine *e, int R)
{
    struct ds_spec *sp = e->spec;
    int g = e->gamma, V = e->target->cfg.vocab_size, r;
    bool sampled = false;
    for (int i = 0; i < R; i++) {
        struct ds_seq *s = e->seqs[sp->idx[i]];
        sp->kvs[i] = &s->kv;
        sp->samp[i] = s->sampling;
        sampled |= !ds_sampling_is_greedy(&s->sampling);
    }
    if (!sampled || e->device_sampling) {
        /* the γ positions chain on the device, one copy back into drafts and z */
        if (!sampled)
            r = ds_cuda_draft_greedy(e->cuda_draft, &e->kv, R, sp->kvs, sp->anchor, sp->start, sp->drafts, sp->z,
                                     sp->gpu_p);
        else
            r = ds_cuda_draft_sample(e->cuda_draft, &e->kv, R, sp->kvs, sp->anchor, sp->start, sp->samp, sp->drafts,
                                     sp->z, sp->gpu_p);
        for (int i = 0; i < R && r == 0; i++)
            for (int k = 0; k < g; k++)
                pick_draft(e, i, k, NULL, sp->drafts[(size_t)i * g + k], sp->z[(size_t)i * g + k],
                           sp->gpu_p[(size_t)i * g + k]);
        return r;
    }
    if ((r = ds_cuda_draft_block(e->cuda_draft, &e->kv, R, sp->kvs, sp->anchor, sp->start)) < 0)
        return r;
    float *zk = ds_xmalloc((size_t)R * sizeof(float));
    for (int i = 0; i < R; i++)
        sp->prev[i] = sp->anchor[i];
    for (int k = 0; k < g && r == 0; k++) {
        r = ds_cuda_draft_step(e->cuda_draft, k, sp->prev, sp->ids, zk, sp->corr);
        for (int i = 0; i < R && r == 0; i++)
            sp->prev[i] = pick_draft(e, i, k, sp->corr + (size_t)i * V, sp->ids[i], zk[i], NAN);
    }
    free(zk);
    return r;
}

/* A context row for the draft: batch row tok of the pass is position pos of s. */
static void add_ctx_row(struct ds_spec *sp, int *n_ctx, int tok, struct ds_seq *s, int pos)
{
    sp->ctx_tok[*n_ctx] = tok;
    sp->pos_rows[*n_ctx] = pos;
    sp->ctx_seq[*n_ctx] = s;
    (*n_ctx)++;
}

/* Extend the draft contexts with the collected rows (their features are the pass's captures). */
static int extend_contexts(struct ds_engine *e, int n_ctx)
{
    struct ds_spec *sp = e->spec;
    int r;
    if (n_ctx == 0)
        return 0;
    if (e->cuda_draft) {
        struct ds_kv_seq **kv = ds_xmalloc((size_t)n_ctx * sizeof *kv);
        for (int t = 0; t < n_ctx; t++)
            kv[t] = &sp->ctx_seq[t]->kv;
        r = ds_cuda_draft_context(e->cuda_draft, &e->kv, n_ctx, sp->ctx_tok, kv, sp->pos_rows);
        free(kv);
        return r;
    }
    size_t feat_w = (size_t)e->draft->m * e->target->cfg.hidden_size;
    struct ds_draft_cache **caches = ds_xmalloc((size_t)n_ctx * sizeof *caches);
    sp->feat_rows = grow(sp->feat_rows, &sp->cap_feat, (size_t)n_ctx * feat_w, sizeof(float));
    for (int t = 0; t < n_ctx; t++) {
        memcpy(sp->feat_rows + (size_t)t * feat_w, e->captured + (size_t)sp->ctx_tok[t] * feat_w,
               feat_w * sizeof(float));
        caches[t] = &sp->ctx_seq[t]->draft->cache;
    }
    r = ds_draft_add_context(e->draft, e->pool, n_ctx, sp->feat_rows, caches, sp->pos_rows, &sp->scratch);
    for (int t = 0; t < n_ctx && r == 0; t++)
        if (caches[t]->len < sp->pos_rows[t] + 1)
            caches[t]->len = sp->pos_rows[t] + 1;
    free(caches);
    return r;
}

/* Choose ℓ for every drafting sequence (indices idx[0..R)), given the pass's other tokens. */
/* The round's cost is the draft phase (fixed for the round: R blocks) plus the
 * target pass at B tokens; the schedulers see SPS_eff(B) = 1 / (T_draft + T(B)).
 * T_draft comes from earlier rounds, never from this round's drafts. */
static struct ds_sps effective_sps(const struct ds_engine *e, int R)
{
    const struct ds_sps *t = &e->sps;
    struct ds_sps eff = {.n = t->n, .b = ds_xmalloc((size_t)(t->n + 1) * sizeof(int)),
                         .sps = ds_xmalloc((size_t)(t->n + 1) * sizeof(double))};
    double fixed = e->spec->draft_s_per_seq * R;
    for (int i = 0; i < t->n; i++) {
        eff.b[i] = t->b[i];
        eff.sps[i] = 1.0 / (fixed + 1.0 / t->sps[i]);
    }
    return eff;
}

static void schedule(struct ds_engine *e, int R, int extra)
{
    struct ds_spec *sp = e->spec;
    int g = e->gamma;
    struct ds_sps eff = effective_sps(e, R);
    /* fixed, threshold and none first: their tokens are part of the others' pass */
    int n_sched = 0, n_async = 0;
    for (int i = 0; i < R; i++) {
        struct ds_seq *s = e->seqs[sp->idx[i]];
        switch (s->spec.kind) {
        case DS_SPEC_FIXED:
            sp->len[i] = s->spec.fixed_len < sp->cap[i] ? s->spec.fixed_len : sp->cap[i];
            extra += 1 + sp->len[i];
            break;
        case DS_SPEC_THRESHOLD:
            ds_sched_threshold(sp->c + (size_t)i * g, 1, g, &sp->cap[i], s->spec.threshold, &sp->len[i]);
            extra += 1 + sp->len[i];
            break;
        case DS_SPEC_DSPARK: n_sched++; break;
        case DS_SPEC_DSPARK_ASYNC: n_async++; break;
        case DS_SPEC_NONE: sp->len[i] = 0; extra += 1; break;
        }
    }
    /* gather the scheduled sequences' rows contiguously */
    for (int pass = 0; pass < 2; pass++) {
        enum ds_spec_kind kind = pass == 0 ? DS_SPEC_DSPARK : DS_SPEC_DSPARK_ASYNC;
        int n = pass == 0 ? n_sched : n_async;
        if (n == 0)
            continue;
        float *a = ds_xmalloc((size_t)n * g * sizeof(float)), *old = ds_xmalloc((size_t)n * g * sizeof(float));
        int *cap = ds_xmalloc((size_t)n * sizeof(int)), *len = ds_xmalloc((size_t)n * sizeof(int));
        int *map = ds_xmalloc((size_t)n * sizeof(int)), k = 0, have_old = 0;
        for (int i = 0; i < R; i++) {
            struct ds_seq *s = e->seqs[sp->idx[i]];
            if (s->spec.kind != kind)
                continue;
            memcpy(a + (size_t)k * g, sp->a + (size_t)i * g, (size_t)g * sizeof(float));
            cap[k] = sp->cap[i];
            /* two rounds old: the older entry of the history, else the per-position prior */
            struct ds_spec_seq *d = s->draft;
            for (int j = 0; j < g; j++)
                old[(size_t)k * g + j] = d->n_hist >= 2 ? d->a_hist[0][j] : (float)sp->prior_a[j];
            have_old += d->n_hist >= 2;
            map[k++] = i;
        }
        int other = extra;
        /* the other group's tokens (when both kinds run) count at full length */
        if (pass == 0 && n_async > 0)
            other += n_async * (1 + g);
        if (kind == DS_SPEC_DSPARK) {
            /* Algorithm 1 from the best fixed length of past rounds: step-shaped cost
             * curves make its early stop quit too soon otherwise */
            int floor_len = sp->prior_n > 0 ? ds_sched_best_fixed(sp->prior_a, n, g, other, &eff) : 0;
            ds_sched_dspark_from(a, n, g, cap, other, &eff, floor_len, len);
        } else {
            int K = n * g;
            if (have_old > 0 && sp->prior_n > 0)
                K = ds_sched_capacity(old, n, g, cap, other, &eff);
            ds_sched_topk(a, n, g, cap, K, len);
        }
        for (int i = 0; i < n; i++) {
            sp->len[map[i]] = len[i];
            extra += 1 + len[i];
        }
        free(a), free(old), free(cap), free(len), free(map);
    }
    ds_sps_done(&eff);
}

/* Greedy acceptance: drafts equal to the target's argmax, then the argmax. */
static void accept_greedy(const struct ds_engine *e, int row, int len, const int32_t *dr, int *ret_a,
                          int32_t *ret_next)
{
    int a = 0;
    while (a < len && dr[a] == e->argmax[row + a])
        a++;
    *ret_a = a;
    *ret_next = e->argmax[row + a];
}

/* Sampled acceptance on the host from the pass's logits rows row..row+len and
 * the drafts' distributions q [len, V]: draft k is accepted while
 * u · max(q[d_k], 1e-8) < p[d_k]; a rejection draws the correction from the
 * residual, all accepted draw the bonus from p. Uniforms are keyed by the
 * position of the token drawn. */
static void accept_sampled(struct ds_engine *e, struct ds_seq *s, int row, int len, const int32_t *dr,
                           const float *q, int *ret_a, int32_t *ret_next)
{
    int V = e->target->cfg.vocab_size, start = s->kv.len, a = 0;
    float *p = e->probs, *tmp = e->probs + V;
    uint64_t seed = s->sampling.seed;
    int32_t next = -1;
    for (int k = 0; k <= len; k++) {
        uint64_t pos = (uint64_t)(start + k + 1);
        ds_probs(e->logits + (size_t)(row + k) * V, V, &s->sampling, p, e->scratch);
        if (k == len) {
            next = ds_sample_probs(p, V, ds_uniform(seed, pos, DS_SLOT_TARGET));
            break;
        }
        const float *qk = q + (size_t)k * V;
        float pq = p[dr[k]], qq = qk[dr[k]] > 1e-8f ? qk[dr[k]] : 1e-8f;
        if (ds_uniform(seed, pos, DS_SLOT_ACCEPT) * qq < pq) {
            a++;
            continue;
        }
        next = ds_sample_residual(p, qk, V, ds_uniform(seed, pos, DS_SLOT_TARGET), tmp);
        break;
    }
    *ret_a = a;
    *ret_next = next;
}

/* Device sampling: the draws of the pass's sampled rows, on the GPU in one go
 * (rows in batch order: sequence by sequence). */
static int device_draws(struct ds_engine *e, const int *seq_row, int n_rows)
{
    struct ds_spec *sp = e->spec;
    int ri = 0;
    ds_draws_begin(e, n_rows);
    for (int i = 0; i < e->n_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        if (s->state == DS_SEQ_PREFILL && s->chunk > 0) {
            int dr = ds_prefill_draw_row(s, seq_row[i]);
            if (dr >= 0)
                ds_draw_plain(e, s, dr);
        } else if (s->state == DS_SEQ_DECODE && !drafts_now(e, s)) {
            ds_draw_plain(e, s, seq_row[i]);
        } else if (s->state == DS_SEQ_DECODE) {
            if (!ds_sampling_is_greedy(&s->sampling))
                ds_draw_chain(e, s, seq_row[i], sp->len[ri], sp->drafts + (size_t)ri * e->gamma, ri);
            ri++;
        }
    }
    return ds_draws_run(e);
}

/* The context rows of s that wait for no acceptance, from batch row tok on:
 * its prefill chunk's (a prefilling s), or its token of a target-only round
 * (a decoding one); none without a draft. */
static int plain_ctx_rows(struct ds_engine *e, struct ds_seq *s, int tok, int *n_ctx)
{
    int r;
    if (!uses_draft(s))
        return 0;
    if (s->state != DS_SEQ_PREFILL) {
        add_ctx_row(e->spec, n_ctx, tok, s, s->kv.len);
        return 0;
    }
    if ((r = seq_draft_state(e, s)) < 0)
        return r;
    for (int k = 0; k < s->chunk; k++)
        add_ctx_row(e->spec, n_ctx, tok + k, s, s->kv.len + k);
    return 0;
}

/* Before the acceptance (the GPU draft): the context rows of the pass's
 * prefill chunks, its plain decode tokens, and every row of each verified
 * chain. Rows past what the chain commits hold features of rejected drafts;
 * the sequence's next block writes its own keys and values over those
 * positions (ℓ ≤ γ and a round commits at least one token) before any block
 * reads them, and later rounds' context rows replace them in turn. */
static int collect_all_ctx_rows(struct ds_engine *e, const int *seq_tok, int *n_ctx)
{
    struct ds_spec *sp = e->spec;
    int ri = 0, r;
    for (int i = 0; i < e->n_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        int tok = seq_tok[i];
        if ((s->state == DS_SEQ_PREFILL && s->chunk > 0) || (s->state == DS_SEQ_DECODE && !drafts_now(e, s))) {
            if ((r = plain_ctx_rows(e, s, tok, n_ctx)) < 0)
                return r;
        } else if (s->state == DS_SEQ_DECODE) {
            for (int k = 0; k <= sp->len[ri]; k++)
                add_ctx_row(sp, n_ctx, tok + k, s, s->kv.len + k);
            ri++;
        }
    }
    return 0;
}

int ds_spec_round(struct ds_engine *e)
{
    struct ds_spec *sp = e->spec;
    const struct ds_draft *d = e->draft;
    int g = e->gamma, V = e->target->cfg.vocab_size, H = e->target->cfg.hidden_size, m = d->m, r;
    int n_prefill;
    ds_plan_prefill(e, &n_prefill);

    /* sequences in this round */
    int n_dec = 0;
    for (int i = 0; i < e->n_seqs; i++)
        n_dec += e->seqs[i]->state == DS_SEQ_DECODE;
    if (n_dec + n_prefill == 0)
        return 0;
    if (e->n_seqs > sp->cap_r) {
        int c = e->n_seqs;
        sp->cap_r = c;
        sp->idx = ds_xrealloc(sp->idx, (size_t)c * sizeof(int32_t));
        sp->anchor = ds_xrealloc(sp->anchor, (size_t)c * sizeof(int32_t));
        sp->start = ds_xrealloc(sp->start, (size_t)c * sizeof(int32_t));
        sp->drafts = ds_xrealloc(sp->drafts, (size_t)c * g * sizeof(int32_t));
        sp->prev = ds_xrealloc(sp->prev, (size_t)c * sizeof(int32_t));
        sp->ids = ds_xrealloc(sp->ids, (size_t)c * sizeof(int32_t));
        sp->kvs = ds_xrealloc(sp->kvs, (size_t)c * sizeof(*sp->kvs));
        sp->len = ds_xrealloc(sp->len, (size_t)c * sizeof(int32_t));
        sp->cap = ds_xrealloc(sp->cap, (size_t)c * sizeof(int32_t));
        sp->row0 = ds_xrealloc(sp->row0, (size_t)c * sizeof(int32_t));
        sp->caches = ds_xrealloc(sp->caches, (size_t)c * sizeof(*sp->caches));
        sp->a = ds_xrealloc(sp->a, (size_t)c * g * sizeof(float));
        sp->c = ds_xrealloc(sp->c, (size_t)c * g * sizeof(float));
        sp->samp = ds_xrealloc(sp->samp, (size_t)c * sizeof(*sp->samp));
    }
    if (e->n_seqs > e->cap_bkv) {
        e->cap_bkv = e->n_seqs;
        e->b_kv = ds_xrealloc(e->b_kv, (size_t)e->cap_bkv * sizeof *e->b_kv);
    }

    /* (1) draft every decoding sequence that speculates */
    {
        int others = n_prefill;
        for (int i = 0; i < e->n_seqs; i++)
            others += e->seqs[i]->state == DS_SEQ_DECODE && !scheduled(e->seqs[i]);
        sp->pause = pause_drafting(e, others);
    }
    int R = 0;
    for (int i = 0; i < e->n_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        if (s->state != DS_SEQ_DECODE || !drafts_now(e, s))
            continue;
        sp->idx[R] = i;
        sp->anchor[R] = s->tokens[s->kv.len];
        sp->start[R] = s->kv.len;
        sp->caches[R] = &s->draft->cache;
        /* never verify more than can be emitted: a+1 tokens commit at most ℓ+1 */
        int left = s->max_tokens - (s->n_tokens - s->n_prompt);
        sp->cap[R] = left - 1 < g ? (left - 1 > 0 ? left - 1 : 0) : g;
        R++;
    }
    if (!e->cuda_draft) {   /* the GPU draft keeps its states and base logits on the device */
        sp->h = grow(sp->h, &sp->cap_h, (size_t)R * g * H + 1, sizeof(float));
        sp->U = grow(sp->U, &sp->cap_U, (size_t)R * g * V + 1, sizeof(float));
    }
    if (!e->device_sampling) {   /* q and the corrected logits on the host */
        sp->q = grow(sp->q, &sp->cap_q, (size_t)R * g * V + 1, sizeof(float));
        sp->corr = grow(sp->corr, &sp->cap_corr, (size_t)R * V + 1, sizeof(float));
    }
    sp->z = grow(sp->z, &sp->cap_z, (size_t)R * g + 1, sizeof(float));
    sp->gpu_p = grow(sp->gpu_p, &sp->cap_gpu_p, (size_t)R * g + 1, sizeof(float));
    if (sp->trace)
        sp->dprob = grow(sp->dprob, &sp->cap_dprob, (size_t)R * g + 1, sizeof(float));
    sp->state = grow(sp->state, &sp->cap_state, (size_t)R * (d->r + 1) + 1, sizeof(float));
    ds_engine_ensure_probs(e);
    double t_draft = ds_now();
    if (R > 0 && (r = (e->cuda_draft ? draft_cuda : draft_cpu)(e, R)) < 0)
        return r;
    if (R > 0) {
        e->time.draft_s += ds_now() - t_draft;
        e->time.drafting_steps++;
        e->last_drafting = R;
    }

    /* (2) verification lengths (priced with the draft time of earlier rounds) */
    int extra = n_prefill;
    for (int i = 0; i < e->n_seqs; i++)
        extra += e->seqs[i]->state == DS_SEQ_DECODE && !drafts_now(e, e->seqs[i]);
    schedule(e, R, extra);
    if (R > 0) {
        double per = (ds_now() - t_draft) / R;
        sp->draft_s_per_seq = sp->draft_s_per_seq > 0 ? 0.8 * sp->draft_s_per_seq + 0.2 * per : per;
    }

    /* (3) one target pass: prefill chunks, plain decode tokens, verification blocks */
    int n_tok = n_prefill;
    for (int i = 0; i < e->n_seqs; i++)
        if (e->seqs[i]->state == DS_SEQ_DECODE && !drafts_now(e, e->seqs[i]))
            n_tok++;
    for (int i = 0; i < R; i++)
        n_tok += 1 + sp->len[i];
    if ((r = ds_engine_ensure_batch(e, n_tok, n_tok, m)) < 0)
        return r;
    int nt = 0, nrows = 0, ri = 0;
    int *seq_row = ds_xmalloc((size_t)e->n_seqs * sizeof(int)), *seq_tok = ds_xmalloc((size_t)e->n_seqs * sizeof(int));
    for (int i = 0; i < e->n_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        e->b_kv[i] = &s->kv;
        seq_row[i] = nrows;
        seq_tok[i] = nt;
        if (s->state == DS_SEQ_PREFILL && s->chunk > 0) {
            ds_batch_add_prefill(e, s, i, &nt, &nrows);
        } else if (s->state == DS_SEQ_DECODE) {
            int len = 0;
            const int32_t *dr = NULL;
            if (drafts_now(e, s)) {
                len = sp->len[ri];
                dr = sp->drafts + (size_t)ri * g;
                ri++;
            }
            for (int k = 0; k <= len; k++) {
                e->b_tokens[nt] = k == 0 ? s->tokens[s->kv.len] : dr[k - 1];
                e->b_pos[nt] = s->kv.len + k;
                e->b_seq[nt] = i;
                e->b_rows[nrows++] = nt;
                nt++;
            }
        }
    }
    static const int32_t none_layers[1] = {0};
    struct ds_batch b = {
        .n_tokens = nt, .tokens = e->b_tokens, .pos = e->b_pos, .seq = e->b_seq, .kv = e->b_kv,
        .n_logits = nrows, .logit_rows = e->b_rows, .logits = e->logits, .argmax = e->argmax,
        .n_capture = m, .capture_layers = m ? d->cfg.target_layer_ids : none_layers,
        .captured = e->cuda_draft ? NULL : e->captured,   /* the GPU draft reads them on the device */
    };
    if ((r = ds_engine_forward(e, &b)) < 0)
        goto out;
    int n_ctx = 0;
    if (nt + 1 > sp->cap_ctx) {
        sp->cap_ctx = nt + 1;
        sp->pos_rows = ds_xrealloc(sp->pos_rows, (size_t)sp->cap_ctx * sizeof(int32_t));
        sp->ctx_tok = ds_xrealloc(sp->ctx_tok, (size_t)sp->cap_ctx * sizeof(int32_t));
        sp->ctx_seq = ds_xrealloc(sp->ctx_seq, (size_t)sp->cap_ctx * sizeof(*sp->ctx_seq));
    }
    /* (5) first on the GPU: the draft contexts gain every row the pass verified
     * (queued behind it, so they run while the acceptance is decided) */
    bool ctx_first = e->cuda_draft != NULL;
    if (ctx_first && ((r = collect_all_ctx_rows(e, seq_tok, &n_ctx)) < 0 || (r = extend_contexts(e, n_ctx)) < 0))
        goto out;
    if (e->device_sampling && (r = device_draws(e, seq_row, nrows)) < 0)
        goto out;

    /* (4) prefill bookkeeping and acceptance; collect context rows for (5) on the CPU */
    n_ctx = 0;
    int32_t committed[DS_MAX_BLOCK + 1];
    ri = 0;
    for (int i = 0; i < e->n_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        int row = seq_row[i], tok = seq_tok[i];
        if (s->state == DS_SEQ_PREFILL && s->chunk > 0) {
            if (!ctx_first && (r = plain_ctx_rows(e, s, tok, &n_ctx)) < 0)
                goto out;
            ds_finish_prefill(e, s, &row);
            continue;
        }
        if (s->state != DS_SEQ_DECODE)
            continue;
        if (!drafts_now(e, s)) {
            /* target-only this round: a sequence without speculation, or a paused one,
             * whose anchor still joins its draft context */
            if (!ctx_first && (r = plain_ctx_rows(e, s, tok, &n_ctx)) < 0)
                goto out;
            ds_seq_decode_one(e, s, row);
            continue;
        }
        int len = sp->len[ri], start = s->kv.len;
        const int32_t *dr = sp->drafts + (size_t)ri * g;
        int a;
        int32_t next;
        if (ds_sampling_is_greedy(&s->sampling)) {
            accept_greedy(e, row, len, dr, &a, &next);
        } else if (e->device_sampling) {
            int di = e->row_draw[row];   /* accepted and drawn on the GPU */
            a = e->draw_acc[di];
            next = e->draw_next[di];
        } else {
            accept_sampled(e, s, row, len, dr, sp->q + (size_t)ri * g * V, &a, &next);
        }
        /* emit accepted drafts, then the correction or bonus; a stop ends it early */
        int n_emit = 0, acc_emitted = 0;
        bool finished = false;
        for (int k = 0; k < a && !finished; k++) {
            committed[n_emit++] = dr[k];
            acc_emitted++;
            finished = ds_seq_emit(e, s, dr[k]);
        }
        if (!finished) {
            committed[n_emit++] = next;
            ds_seq_emit(e, s, next);
        }
        /* statistics */
        s->stats.rounds++;
        s->stats.num_draft_tokens += g;
        s->stats.num_verified_tokens += len;
        s->stats.num_accepted_tokens += acc_emitted;
        s->emitted_in_rounds += n_emit;
        for (int k = 0; k < len; k++) {
            s->stats.verified_by_position[k]++;
            if (k <= a)
                s->stats.reached_by_position[k]++;
            if (k < a)
                s->stats.accepted_by_position[k]++;
        }
        if (sp->trace)
            trace_round(e, s, s->stats.rounds, start, sp->anchor[ri], dr, sp->z + (size_t)ri * g,
                        sp->dprob + (size_t)ri * g, sp->a + (size_t)ri * g, len, a, committed, n_emit);
        /* async history and prior */
        struct ds_spec_seq *ds = s->draft;
        memmove(ds->a_hist[0], ds->a_hist[1], sizeof ds->a_hist[0]);
        memcpy(ds->a_hist[1], sp->a + (size_t)ri * g, (size_t)g * sizeof(float));
        ds->n_hist = ds->n_hist < 2 ? ds->n_hist + 1 : 2;
        sp->prior_n++;
        for (int k = 0; k < g; k++)
            sp->prior_a[k] += (sp->a[(size_t)ri * g + k] - sp->prior_a[k]) / (double)sp->prior_n;
        /* (5) commit: the target keeps x_0 and the accepted drafts; the draft context gains their features */
        int keep = 1 + acc_emitted;
        s->kv.len = start + keep;
        if (s->state != DS_SEQ_DONE && !ctx_first)
            for (int k = 0; k < keep; k++)
                add_ctx_row(sp, &n_ctx, tok + k, s, start + k);
        ri++;
    }
    r = extend_contexts(e, n_ctx);
out:
    free(seq_row);
    free(seq_tok);
    return r;
}

/* ---- SPS(B) profiling ---- */
static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

int ds_engine_profile_sps(struct ds_engine *e, int context, int reps)
{
    int g = e->gamma > 0 ? e->gamma : 1, R_max = e->opts.max_seqs, r = 0;
    int B_max = R_max * (1 + g);
    if (reps <= 0)
        reps = 3;
    if (context <= 0)
        context = 64;
    /* (a sequence holds at most max_context + γ + 1 positions: a profile past
     * them would not fit one, nor be a context the engine runs at) */
    if (context > e->opts.max_context - 1)
        context = e->opts.max_context > 1 ? e->opts.max_context - 1 : 1;
    /* token counts: 1..8 one by one, then about 12% apart */
    int grid[256], n = 0;
    for (int b = 1; b <= B_max && n < 256; b = b < 8 ? b + 1 : b + (b + 7) / 8)
        grid[n++] = b;
    if (grid[n - 1] != B_max && n < 256)
        grid[n++] = B_max;
    int R = R_max;
    struct ds_kv_seq *seqs = ds_xcalloc((size_t)R, sizeof *seqs);
    struct ds_kv_seq **kv = ds_xcalloc((size_t)R, sizeof *kv);
    int per = context + g + 2, got = 0;
    for (int i = 0; i < R; i++) {
        if (ds_kv_reserve(&e->kv, &seqs[i], per) < 0)
            break;
        seqs[i].len = context;
        kv[i] = &seqs[i];
        got++;
    }
    if (got == 0) {
        free(seqs), free(kv);
        return ds_seterr(DS_ELIMIT, "no KV room to profile the step time");
    }
    R = got;
    int32_t *tok = ds_xmalloc((size_t)B_max * sizeof(int32_t)), *pos = ds_xmalloc((size_t)B_max * sizeof(int32_t));
    int32_t *sq = ds_xmalloc((size_t)B_max * sizeof(int32_t)), *rows = ds_xmalloc((size_t)B_max * sizeof(int32_t));
    int32_t *ids = ds_xmalloc((size_t)B_max * sizeof(int32_t));   /* as greedy rounds ask (logits stay on a GPU) */
    /* (on the GPU the ids are enough: the logits stay there) */
    float *logits = e->cuda ? NULL : malloc((size_t)B_max * e->target->cfg.vocab_size * sizeof(float));
    struct ds_sps t = {.n = 0, .b = ds_xmalloc((size_t)n * sizeof(int)), .sps = ds_xmalloc((size_t)n * sizeof(double))};
    double times[16];
    if (!logits && !e->cuda) {
        r = ds_seterr(DS_ENOMEM, "out of memory while profiling");
        goto out;
    }
    for (int gi = 0; gi < n; gi++) {
        int B = grid[gi], nseq = B < R ? B : R;
        /* spread B tokens over nseq sequences, each a block of consecutive positions */
        int k = 0;
        for (int s = 0; s < nseq; s++) {
            int cnt = B / nseq + (s < B % nseq);
            if (cnt > g + 1)
                cnt = g + 1;
            for (int c = 0; c < cnt && k < B; c++, k++) {
                tok[k] = (7 * k + 3) % e->target->cfg.vocab_size;
                pos[k] = context + c;
                sq[k] = s;
                rows[k] = k;
            }
        }
        struct ds_batch b = {.n_tokens = k, .tokens = tok, .pos = pos, .seq = sq, .kv = kv, .n_logits = k,
                             .logit_rows = rows, .logits = logits, .argmax = ids};
        int nr = reps < 16 ? reps : 16;
        for (int rep = 0; rep <= nr; rep++) {
            double t0 = ds_now();
            if ((r = ds_engine_forward(e, &b)) < 0)
                goto out;
            if (rep > 0)
                times[rep - 1] = ds_now() - t0; /* the first run warms caches */
        }
        qsort(times, (size_t)nr, sizeof *times, cmp_double);
        t.b[t.n] = k;
        t.sps[t.n++] = 1.0 / times[nr / 2];
        if (gi + 1 < n && grid[gi + 1] <= k)
            break;
    }
    ds_sps_monotone(&t);
    r = ds_engine_set_sps(e, &t);
    if (r == 0)
        r = context;
    e->time = (struct ds_engine_time){0};   /* the profile's passes are not the engine's rounds */
out:
    ds_sps_done(&t);
    for (int i = 0; i < got; i++)
        ds_kv_release(&e->kv, &seqs[i]);
    free(seqs), free(kv), free(tok), free(pos), free(sq), free(rows), free(logits), free(ids);
    return r;
}
