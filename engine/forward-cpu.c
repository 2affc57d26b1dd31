/* forward-cpu.c: the Qwen3 forward pass over a flattened ragged batch, on the CPU.
 *
 * Per layer: RMSNorm → one q/k/v product → per-head q/k RMSNorm and RoPE → K/V
 * written to each token's page → causal attention of each token over its own
 * sequence's positions 0..pos → o_proj + residual → RMSNorm → gate/up product →
 * SwiGLU → down product + residual. All reductions run in a fixed order per
 * token (products in ds_gemm, attention and norms in plain loops), so results
 * do not depend on the batch. f32 throughout, as transformers does in f32. */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-model.h"

struct ds_forward_ctx {
    struct ds_pool *pool;
    int cap_tokens;              /* rows the buffers below hold */
    float *x;                    /* [cap, H] residual stream */
    float *xn;                   /* [cap, H] normed input of a block */
    float *qkv;                  /* [cap, (nH + 2 nKV) hd] */
    float *attn;                 /* [cap, nH hd] attention output */
    float *proj;                 /* [cap, H] o_proj / down output */
    float *gu;                   /* [cap, 2 I] gate and up */
    float *act;                  /* [cap, I] SwiGLU */
    float *scores;               /* [threads, cap_ctx] attention scores */
    int cap_ctx;
    float *rows;                 /* [n_logits, H] normed rows for the head */
    int cap_rows;
};

int ds_forward_ctx_new(const struct ds_model *model, struct ds_pool *pool, struct ds_forward_ctx **ret)
{
    (void)model;
    struct ds_forward_ctx *c = ds_xcalloc(1, sizeof *c);
    c->pool = pool;
    *ret = c;
    return 0;
}

struct ds_forward_ctx *ds_forward_ctx_free(struct ds_forward_ctx *c)
{
    if (!c)
        return NULL;
    free(c->x);
    free(c->xn);
    free(c->qkv);
    free(c->attn);
    free(c->proj);
    free(c->gu);
    free(c->act);
    free(c->scores);
    free(c->rows);
    free(c);
    return NULL;
}

static int grow(float **p, size_t n)
{
    float *q = realloc(*p, n * sizeof(float));
    if (!q)
        return ds_seterr(DS_ENOMEM, "could not allocate %zu MB of activations", (n * sizeof(float)) >> 20);
    *p = q;
    return 0;
}

static int ensure_capacity(struct ds_forward_ctx *c, const struct ds_qwen3_config *cfg, int n, int ctx_len,
                           int n_rows)
{
    int r = 0;
    size_t H = cfg->hidden_size, hd = cfg->head_dim, I = cfg->intermediate_size;
    size_t qkv = (cfg->num_attention_heads + 2 * (size_t)cfg->num_key_value_heads) * hd;
    if (n > c->cap_tokens) {
        size_t cap = n;
        if ((r = grow(&c->x, cap * H)) || (r = grow(&c->xn, cap * H)) || (r = grow(&c->qkv, cap * qkv)) ||
            (r = grow(&c->attn, cap * cfg->num_attention_heads * hd)) || (r = grow(&c->proj, cap * H)) ||
            (r = grow(&c->gu, cap * 2 * I)) || (r = grow(&c->act, cap * I)))
            return r;
        c->cap_tokens = n;
    }
    if (ctx_len > c->cap_ctx) {
        if ((r = grow(&c->scores, (size_t)ds_pool_threads(c->pool) * ctx_len)))
            return r;
        c->cap_ctx = ctx_len;
    }
    if (n_rows > c->cap_rows) {
        if ((r = grow(&c->rows, (size_t)n_rows * H)))
            return r;
        c->cap_rows = n_rows;
    }
    return 0;
}

float ds_dot(const float *a, const float *b, int n)
{
    /* 16 independent lanes, then a fixed reduction tree: vectorizable, and the
     * same order for a given n everywhere */
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++)
            acc[l] += a[i + l] * b[i + l];
    float tail = 0;
    for (; i < n; i++)
        tail += a[i] * b[i];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++)
            acc[l] += acc[l + w];
    return acc[0] + tail;
}

void ds_rmsnorm(const float *x, const float *w, int n, float eps, float *out)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++)
        out[i] = w[i] * (x[i] * scale);
}

void ds_rope(float *x, int n_heads, int hd, const float *inv_freq, int pos)
{
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float angle = (float)pos * inv_freq[i];
        float c = (float)cos((double)angle), s = (float)sin((double)angle);
        for (int h = 0; h < n_heads; h++) {
            float *v = x + (size_t)h * hd;
            float a = v[i], b = v[i + half];
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    }
}

/* ---- per-token steps, run as pool tasks ---- */
struct pass {
    const struct ds_model *m;
    struct ds_forward_ctx *c;
    struct ds_kv_pool *pool;
    const struct ds_batch *b;
    const struct ds_layer *l;
    int layer;
};

static void norm_task(void *ctx, int t, int thread)
{
    (void)thread;
    const struct pass *p = ctx;
    int H = p->m->cfg.hidden_size;
    ds_rmsnorm(p->c->x + (size_t)t * H, p->layer < 0 ? p->m->final_norm : p->l->attn_norm, H,
               (float)p->m->cfg.rms_norm_eps, p->c->xn + (size_t)t * H);
}

static void ffn_norm_task(void *ctx, int t, int thread)
{
    (void)thread;
    const struct pass *p = ctx;
    int H = p->m->cfg.hidden_size;
    ds_rmsnorm(p->c->x + (size_t)t * H, p->l->ffn_norm, H, (float)p->m->cfg.rms_norm_eps,
               p->c->xn + (size_t)t * H);
}

/* q/k norms, RoPE, and the K/V write into the token's page. */
static void qk_task(void *ctx, int t, int thread)
{
    (void)thread;
    const struct pass *p = ctx;
    const struct ds_qwen3_config *cfg = &p->m->cfg;
    int hd = cfg->head_dim, nH = cfg->num_attention_heads, nKV = cfg->num_key_value_heads;
    int width = (nH + 2 * nKV) * hd;
    float *row = p->c->qkv + (size_t)t * width;
    if (p->l->qkv_bias)
        for (int i = 0; i < width; i++)
            row[i] += p->l->qkv_bias[i];
    float *q = row, *k = row + (size_t)nH * hd, *v = k + (size_t)nKV * hd;
    float eps = (float)cfg->rms_norm_eps;
    for (int h = 0; h < nH; h++)
        ds_rmsnorm(q + (size_t)h * hd, p->l->q_norm, hd, eps, q + (size_t)h * hd);
    for (int h = 0; h < nKV; h++)
        ds_rmsnorm(k + (size_t)h * hd, p->l->k_norm, hd, eps, k + (size_t)h * hd);
    int pos = p->b->pos[t];
    ds_rope(q, nH, hd, p->m->inv_freq, pos);
    ds_rope(k, nKV, hd, p->m->inv_freq, pos);
    const struct ds_kv_seq *seq = p->b->kv[p->b->seq[t]];
    memcpy(ds_kv_at(p->pool, p->pool->k, seq, p->layer, pos), k, (size_t)nKV * hd * sizeof(float));
    memcpy(ds_kv_at(p->pool, p->pool->v, seq, p->layer, pos), v, (size_t)nKV * hd * sizeof(float));
}

/* Causal attention of token t (task = t * nKV + group) over positions 0..pos of its sequence. */
static void attn_task(void *ctx, int task, int thread)
{
    const struct pass *p = ctx;
    const struct ds_qwen3_config *cfg = &p->m->cfg;
    int hd = cfg->head_dim, nH = cfg->num_attention_heads, nKV = cfg->num_key_value_heads;
    int group = nH / nKV;
    int t = task / nKV, g = task % nKV;
    int width = (nH + 2 * nKV) * hd;
    int pos = p->b->pos[t];
    const struct ds_kv_seq *seq = p->b->kv[p->b->seq[t]];
    float *scores = p->c->scores + (size_t)thread * p->c->cap_ctx;
    float scale = 1.0f / sqrtf((float)hd);
    for (int h = g * group; h < (g + 1) * group; h++) {
        const float *q = p->c->qkv + (size_t)t * width + (size_t)h * hd;
        float *out = p->c->attn + (size_t)t * nH * hd + (size_t)h * hd;
        float mx = -INFINITY;
        for (int j = 0; j <= pos; j++) {
            const float *kr = ds_kv_at(p->pool, p->pool->k, seq, p->layer, j) + (size_t)g * hd;
            float s = ds_dot(q, kr, hd) * scale;
            scores[j] = s;
            if (s > mx)
                mx = s;
        }
        float sum = 0;
        for (int j = 0; j <= pos; j++) {
            scores[j] = expf(scores[j] - mx);
            sum += scores[j];
        }
        float inv = 1.0f / sum;
        for (int d = 0; d < hd; d++)
            out[d] = 0;
        for (int j = 0; j <= pos; j++) {
            const float *vr = ds_kv_at(p->pool, p->pool->v, seq, p->layer, j) + (size_t)g * hd;
            float w = scores[j] * inv;
            for (int d = 0; d < hd; d++)
                out[d] += w * vr[d];
        }
    }
}

static void swiglu_task(void *ctx, int t, int thread)
{
    (void)thread;
    const struct pass *p = ctx;
    int I = p->m->cfg.intermediate_size;
    const float *g = p->c->gu + (size_t)t * 2 * I, *u = g + I;
    float *a = p->c->act + (size_t)t * I;
    for (int i = 0; i < I; i++)
        a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void add_rows(float *x, const float *y, const float *bias, int n, int H)
{
    for (int t = 0; t < n; t++)
        for (int i = 0; i < H; i++)
            x[(size_t)t * H + i] += y[(size_t)t * H + i] + (bias ? bias[i] : 0.0f);
}

static void capture(const struct ds_batch *b, int layer, const float *x, int H)
{
    if (!b->captured)
        return;
    for (int c = 0; c < b->n_capture; c++) {
        if (b->capture_layers[c] != layer)
            continue;
        for (int t = 0; t < b->n_tokens; t++)
            memcpy(b->captured + ((size_t)t * b->n_capture + c) * H, x + (size_t)t * H, (size_t)H * sizeof(float));
    }
}

int ds_model_forward(const struct ds_model *m, struct ds_forward_ctx *c, struct ds_kv_pool *pool,
                     const struct ds_batch *b)
{
    const struct ds_qwen3_config *cfg = &m->cfg;
    int n = b->n_tokens, H = cfg->hidden_size, V = cfg->vocab_size;
    int hd = cfg->head_dim, nH = cfg->num_attention_heads, nKV = cfg->num_key_value_heads;
    if (n <= 0)
        return 0;
    if (!m->layers)
        return ds_seterr(DS_EINVAL, "model '%s' was loaded without its layers (for the GPU): the CPU cannot run it",
                         m->dir);
    int max_pos = 0;
    for (int t = 0; t < n; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= V)
            return ds_seterr(DS_EINVAL, "token id %d at batch row %d is outside the vocabulary (%d)",
                             b->tokens[t], t, V);
        const struct ds_kv_seq *s = b->kv[b->seq[t]];
        if (b->pos[t] < 0 || ds_kv_pages_for(pool, b->pos[t] + 1) > s->n_pages)
            return ds_seterr(DS_EINVAL, "position %d at batch row %d has no KV page reserved", b->pos[t], t);
        if (b->pos[t] > max_pos)
            max_pos = b->pos[t];
    }
    int r = ensure_capacity(c, cfg, n, max_pos + 1, b->n_logits);
    if (r < 0)
        return r;
    for (int t = 0; t < n; t++)
        memcpy(c->x + (size_t)t * H, m->embed + (size_t)b->tokens[t] * H, (size_t)H * sizeof(float));
    capture(b, -1, c->x, H);

    struct pass p = {.m = m, .c = c, .pool = pool, .b = b};
    /* per-token steps are worth threads only for enough work */
    struct ds_pool *tp = (size_t)n * H >= 16384 ? c->pool : NULL;
    for (int li = 0; li < cfg->num_hidden_layers; li++) {
        p.l = &m->layers[li];
        p.layer = li;
        ds_pool_run(tp, n, norm_task, &p);
        ds_gemm(c->pool, &p.l->qkv, c->xn, H, n, c->qkv, p.l->qkv.n, false);
        ds_pool_run(tp, n, qk_task, &p);
        ds_pool_run((size_t)n * (max_pos + 1) * nH * hd >= 65536 ? c->pool : NULL, n * nKV, attn_task, &p);
        ds_gemm(c->pool, &p.l->o, c->attn, nH * hd, n, c->proj, H, false);
        add_rows(c->x, c->proj, p.l->o_bias, n, H);
        ds_pool_run(tp, n, ffn_norm_task, &p);
        ds_gemm(c->pool, &p.l->gate_up, c->xn, H, n, c->gu, 2 * cfg->intermediate_size, false);
        ds_pool_run(tp, n, swiglu_task, &p);
        ds_gemm(c->pool, &p.l->down, c->act, cfg->intermediate_size, n, c->proj, H, false);
        add_rows(c->x, c->proj, NULL, n, H);
        capture(b, li, c->x, H);
    }
    if (b->n_logits > 0) {
        for (int i = 0; i < b->n_logits; i++) {
            int t = b->logit_rows[i];
            if (t < 0 || t >= n)
                return ds_seterr(DS_EINVAL, "logit row %d is outside the batch of %d tokens", t, n);
            ds_rmsnorm(c->x + (size_t)t * H, m->final_norm, H, (float)cfg->rms_norm_eps, c->rows + (size_t)i * H);
        }
        ds_gemm(c->pool, &m->lm_head, c->rows, H, b->n_logits, b->logits, V, false);
    }
    return 0;
}
