/* draft.c: the DSpark / DFlash draft on the CPU backend (dspark-spec.md §1–§3).
 *
 * Context: the target's captured layer outputs F_p [m H] become
 * C_p = hidden_norm(fc · F_p); each draft layer projects C_p to context K/V
 * (k_norm and RoPE at p on the keys; no input_layernorm), kept in a
 * per-sequence cache that holds committed positions only.
 * Block: γ slots (anchor embedding, then the mask embedding) at positions
 * start..start+γ−1 run through the layers with non-causal attention over the
 * context plus the block; the final norm gives h and the LM head the base
 * logits U. The Markov head then corrects U left to right from the previous
 * token, and the confidence head scores each position. */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dspark/ds-model.h"
#include "draft-impl.h"
#include "draft-ops.h"
#include "load-util.h"

/* The draft's copy of a [V, H] table equals the target's? */
static bool same_table(const struct ds_tensor *t, const float *target, int64_t V, int64_t H)
{
    float *row = ds_xmalloc((size_t)H * sizeof(float));
    bool same = true;
    for (int64_t i = 0; i < V && same; i++) {
        ds_tensor_to_f32(t, (size_t)(i * H), (size_t)H, row);
        same = memcmp(row, target + i * H, (size_t)H * sizeof(float)) == 0;
    }
    free(row);
    return same;
}

static bool same_lm_head(const struct ds_tensor *t, const struct ds_mat *target, int64_t V, int64_t H)
{
    float *a = ds_xmalloc((size_t)H * sizeof(float)), *b = ds_xmalloc((size_t)H * sizeof(float));
    bool same = true;
    for (int64_t i = 0; i < V && same; i++) {
        ds_tensor_to_f32(t, (size_t)(i * H), (size_t)H, a);
        ds_mat_row(target, (int)i, b);
        same = memcmp(a, b, (size_t)H * sizeof(float)) == 0;
    }
    free(a);
    free(b);
    return same;
}

/* The optional "maps" of sts.json: for a set of "temperatures", γ triples (α, β, γ0) with which
 * c_k = σ(α z_k + β logit(p_k) + γ0), p_k the draft's probability of its token at T = 1. */
static int load_sts_maps(struct ds_draft *d, json_t *maps, const char *path)
{
    const char *key;
    json_t *arr;
    json_object_foreach(maps, key, arr)
    {
        char *end;
        double at = strtod(key, &end);
        int set = -1;
        for (int i = 0; i < d->n_sts && end != key && !*end; i++)
            if (fabs(d->sts_at[i] - at) < 1e-6)
                set = i;
        if (set < 0)
            return ds_seterr(DS_EFORMAT, "file '%s': map '%s' has no set of temperatures of the same key", path,
                             key);
        if (!json_is_array(arr) || (int)json_array_size(arr) != d->gamma)
            return ds_seterr(DS_EFORMAT, "file '%s': map '%s' must hold %d triples", path, key, d->gamma);
        for (int k = 0; k < d->gamma; k++) {
            json_t *t = json_array_get(arr, (size_t)k);
            if (!json_is_array(t) || json_array_size(t) != 3)
                return ds_seterr(DS_EFORMAT, "file '%s': map '%s' position %d must be [alpha, beta, gamma]", path,
                                 key, k + 1);
            for (int j = 0; j < 3; j++) {
                json_t *v = json_array_get(t, (size_t)j);
                if (!json_is_number(v) || !isfinite(json_number_value(v)))
                    return ds_seterr(DS_EFORMAT, "file '%s': map '%s' position %d holds a non-number", path, key,
                                     k + 1);
                d->sts_map[set][k][j] = (float)json_number_value(v);
            }
        }
        d->sts_has_map[set] = true;
    }
    return 0;
}

/* sts.json beside the checkpoint: {"temperatures": {"0": [γ floats], "1": [...]}, optional "maps"} */
static int load_sts(struct ds_draft *d, const char *dir)
{
    char path[4200];
    struct stat sb;
    snprintf(path, sizeof path, "%s/sts.json", dir);
    if (stat(path, &sb) != 0)
        return 0;
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return ds_seterr(DS_EFORMAT, "file '%s': %s (line %d)", path, jerr.text, jerr.line);
    json_t *temps = json_object_get(root, "temperatures");
    int r = 0;
    if (!json_is_object(temps)) {
        r = ds_seterr(DS_EFORMAT, "file '%s': \"temperatures\" must be an object", path);
        goto out;
    }
    const char *key;
    json_t *arr;
    json_object_foreach(temps, key, arr)
    {
        char *end;
        double at = strtod(key, &end);
        if (end == key || *end || !(at >= 0) || !isfinite(at) || !json_is_array(arr) ||
            (int)json_array_size(arr) != d->gamma) {
            r = ds_seterr(DS_EFORMAT, "file '%s': entry '%s' must map a temperature to %d numbers", path, key,
                          d->gamma);
            goto out;
        }
        for (int i = 0; i < d->n_sts; i++)
            if (fabsf(d->sts_at[i] - (float)at) < 1e-6f) {   /* ("0" and "0.0") */
                r = ds_seterr(DS_EFORMAT, "file '%s': temperature %s has two sets", path, key);
                goto out;
            }
        if (d->n_sts == DS_STS_MAX) {   /* (they were dropped past the limit, a map of theirs then refused) */
            r = ds_seterr(DS_EFORMAT, "file '%s': more than %d sets of temperatures", path, DS_STS_MAX);
            goto out;
        }
        for (int k = 0; k < d->gamma; k++) {
            double t = json_number_value(json_array_get(arr, (size_t)k));
            if (!(t > 0) || !isfinite(t)) {
                r = ds_seterr(DS_EFORMAT, "file '%s': temperature %d of set '%s' must be positive", path, k + 1,
                              key);
                goto out;
            }
            d->sts_t[d->n_sts][k] = (float)t;
        }
        d->sts_at[d->n_sts++] = (float)at;
    }
    json_t *maps = json_object_get(root, "maps");
    if (maps && !json_is_object(maps))
        r = ds_seterr(DS_EFORMAT, "file '%s': \"maps\" must be an object", path);
    else if (maps)
        r = load_sts_maps(d, maps, path);
out:
    json_decref(root);
    return r;
}

int ds_draft_load(const char *dir, const struct ds_model *target, struct ds_draft **ret)
{
    struct ds_draft *d = ds_xcalloc(1, sizeof *d);
    struct ds_st *st = NULL;
    int r;
    snprintf(d->dir, sizeof d->dir, "%s", dir);
    if ((r = ds_dspark_config_load(dir, &d->cfg)) < 0 || (r = ds_dspark_config_check(&d->cfg, &target->cfg)) < 0)
        goto fail;
    const struct ds_qwen3_config *c = &d->cfg.base;
    d->gamma = d->cfg.block_size;
    if (d->gamma > DS_MAX_BLOCK) {
        r = ds_seterr(DS_ENOTSUP, "block_size %d is larger than %d", d->gamma, DS_MAX_BLOCK);
        goto fail;
    }
    d->H = c->hidden_size;
    d->V = c->vocab_size;
    d->m = d->cfg.n_target_layers;
    d->r = d->cfg.markov_rank;
    d->n_layers = c->num_hidden_layers;
    d->nH = c->num_attention_heads;
    d->nKV = c->num_key_value_heads;
    d->hd = c->head_dim;
    d->I = c->intermediate_size;
    if ((r = ds_st_open_dir(dir, &st)) < 0)
        goto fail;
    int64_t H = d->H, V = d->V, hd = d->hd, rk = d->r;
    const struct ds_tensor *t;
    /* embedding and LM head: the target's unless the draft carries different ones */
    d->embed = target->embed;
    d->lm_head = &target->lm_head;
    if ((t = ds_st_find(st, "embed_tokens.weight"))) {
        int64_t shape[2] = {V, H};
        if ((r = ds_st_get(st, "embed_tokens.weight", 2, shape, &t)) < 0)
            goto fail;
        if (!same_table(t, target->embed, V, H)) {
            d->own_embed = ds_xmalloc((size_t)(V * H) * sizeof(float));
            ds_tensor_to_f32(t, 0, (size_t)(V * H), d->own_embed);
            d->embed = d->own_embed;
        }
    }
    if ((t = ds_st_find(st, "lm_head.weight"))) {
        int64_t shape[2] = {V, H};
        if ((r = ds_st_get(st, "lm_head.weight", 2, shape, &t)) < 0)
            goto fail;
        if (!same_lm_head(t, &target->lm_head, V, H)) {
            if ((r = ds_mat_from_tensor(&d->own_lm_head, t, 0, (int)V)) < 0)
                goto fail;
            d->lm_head = &d->own_lm_head;
        }
    }
    if ((r = ds_load_mat(st, "fc.weight", H, (int64_t)d->m * H, &d->fc)) < 0 ||
        (r = ds_load_vec(st, "hidden_norm.weight", H, &d->hidden_norm)) < 0 || (r = ds_load_vec(st, "norm.weight", H, &d->final_norm)) < 0)
        goto fail;
    if ((r = ds_st_check_layers(st, "layers.", d->n_layers, "config.json's num_hidden_layers")) < 0)
        goto fail;
    d->layers = ds_xcalloc((size_t)d->n_layers, sizeof *d->layers);
    char (*kvnames)[160] = ds_xcalloc((size_t)(2 * d->n_layers), 160);
    int64_t *kvrows = ds_xcalloc((size_t)(2 * d->n_layers), sizeof(int64_t));
    for (int i = 0; i < d->n_layers && r == 0; i++) {
        struct ds_draft_layer *l = &d->layers[i];
        char n[3][160];
#define NM(buf, s) snprintf(buf, sizeof buf, "layers.%d.%s", i, s)
        NM(n[0], "input_layernorm.weight");
        NM(n[1], "post_attention_layernorm.weight");
        if ((r = ds_load_vec(st, n[0], H, &l->attn_norm)) < 0 || (r = ds_load_vec(st, n[1], H, &l->ffn_norm)) < 0)
            break;
        NM(n[0], "self_attn.q_norm.weight");
        NM(n[1], "self_attn.k_norm.weight");
        if ((r = ds_load_vec(st, n[0], hd, &l->q_norm)) < 0 || (r = ds_load_vec(st, n[1], hd, &l->k_norm)) < 0)
            break;
        NM(n[0], "self_attn.q_proj.weight");
        NM(n[1], "self_attn.k_proj.weight");
        NM(n[2], "self_attn.v_proj.weight");
        int64_t rows[3] = {(int64_t)d->nH * hd, (int64_t)d->nKV * hd, (int64_t)d->nKV * hd};
        const char *qkv[3] = {n[0], n[1], n[2]};
        if ((r = ds_load_stacked(st, qkv, rows, 3, H, &l->qkv)) < 0)
            break;
        memcpy(kvnames[2 * i], n[1], 160);
        memcpy(kvnames[2 * i + 1], n[2], 160);
        kvrows[2 * i] = kvrows[2 * i + 1] = (int64_t)d->nKV * hd;
        NM(n[0], "self_attn.o_proj.weight");
        if ((r = ds_load_mat(st, n[0], H, (int64_t)d->nH * hd, &l->o)) < 0)
            break;
        NM(n[0], "mlp.gate_proj.weight");
        NM(n[1], "mlp.up_proj.weight");
        int64_t gu[2] = {d->I, d->I};
        const char *gun[2] = {n[0], n[1]};
        if ((r = ds_load_stacked(st, gun, gu, 2, H, &l->gate_up)) < 0)
            break;
        NM(n[0], "mlp.down_proj.weight");
        if ((r = ds_load_mat(st, n[0], H, d->I, &l->down)) < 0)
            break;
#undef NM
    }
    if (r == 0) {
        const char **kvp = ds_xcalloc((size_t)(2 * d->n_layers), sizeof *kvp);
        for (int i = 0; i < 2 * d->n_layers; i++)
            kvp[i] = kvnames[i];
        r = ds_load_stacked(st, kvp, kvrows, 2 * d->n_layers, H, &d->ctx_kv);
        free(kvp);
    }
    free(kvnames);
    free(kvrows);
    if (r < 0)
        goto fail;
    if (rk > 0) {
        const struct ds_tensor *w1;
        int64_t shape[2] = {V, rk};
        if ((r = ds_st_get(st, "markov_head.markov_w1.weight", 2, shape, &w1)) < 0)
            goto fail;
        d->w1 = ds_xmalloc((size_t)(V * rk) * sizeof(float));
        ds_tensor_to_f32(w1, 0, (size_t)(V * rk), d->w1);
        if ((r = ds_load_mat(st, "markov_head.markov_w2.weight", V, rk, &d->w2)) < 0)
            goto fail;
        if (d->cfg.markov_head == DS_MARKOV_GATED) {
            if ((r = ds_load_mat(st, "markov_head.gate_proj.weight", rk, H + rk, &d->gate)) < 0 ||
                (r = ds_load_vec(st, "markov_head.gate_proj.bias", rk, &d->gate_bias)) < 0)
                goto fail;
        } else if (d->cfg.markov_head == DS_MARKOV_RNN) {
            if ((r = ds_load_mat(st, "markov_head.joint_proj.weight", 3 * rk, 2 * rk + H, &d->joint)) < 0 ||
                (r = ds_load_vec(st, "markov_head.joint_proj.bias", 3 * rk, &d->joint_bias)) < 0)
                goto fail;
        }
    }
    if (d->cfg.enable_confidence_head) {
        int64_t in = H + (d->cfg.confidence_head_with_markov && rk > 0 ? rk : 0);
        int64_t shape[2] = {1, in}, one = 1;
        const struct ds_tensor *w, *b;
        if ((r = ds_st_get(st, "confidence_head.proj.weight", 2, shape, &w)) < 0 ||
            (r = ds_st_get(st, "confidence_head.proj.bias", 1, &one, &b)) < 0)
            goto fail;
        d->conf_w = ds_xmalloc((size_t)in * sizeof(float));
        ds_tensor_to_f32(w, 0, (size_t)in, d->conf_w);
        ds_tensor_to_f32(b, 0, 1, &d->conf_b);
    }
    d->inv_freq = ds_xmalloc((size_t)(hd / 2) * sizeof(float));
    for (int i = 0; i < hd / 2; i++)
        d->inv_freq[i] = 1.0f / powf((float)c->rope_theta, (float)(2 * i) / (float)hd);
    if ((r = load_sts(d, dir)) < 0)
        goto fail;
    ds_st_checksum(st, d->checksum);
    ds_st_free(st);
    *ret = d;
    return 0;
fail:
    ds_prefixerr(r, "draft '%s'", dir);
    ds_st_free(st);
    ds_draft_free(d);
    return r;
}

static size_t mat_bytes(const struct ds_mat *m)
{
    return m->panels ? (size_t)((m->n + m->nr - 1) / m->nr) * m->k * m->nr * sizeof(float) : 0;
}

/* The weights a pass needs (everything but the configuration, the small
 * vectors and the calibration); *bytes gets their size. */
static void free_weights(struct ds_draft *d, size_t *bytes)
{
    size_t b = 0;
    if (d->layers)
        for (int i = 0; i < d->n_layers; i++) {
            struct ds_draft_layer *l = &d->layers[i];
            b += mat_bytes(&l->qkv) + mat_bytes(&l->o) + mat_bytes(&l->gate_up) + mat_bytes(&l->down);
            ds_mat_done(&l->qkv), ds_mat_done(&l->o), ds_mat_done(&l->gate_up), ds_mat_done(&l->down);
        }
    if (d->own_embed)
        b += (size_t)d->V * d->H * sizeof(float);
    free(d->own_embed);
    d->own_embed = NULL;
    b += mat_bytes(&d->own_lm_head) + mat_bytes(&d->fc) + mat_bytes(&d->ctx_kv) + mat_bytes(&d->w2) +
         mat_bytes(&d->gate) + mat_bytes(&d->joint);
    ds_mat_done(&d->own_lm_head);
    ds_mat_done(&d->fc);
    ds_mat_done(&d->ctx_kv);
    if (d->w1)
        b += (size_t)d->V * d->r * sizeof(float);
    free(d->w1);
    d->w1 = NULL;
    ds_mat_done(&d->w2);
    ds_mat_done(&d->gate);
    ds_mat_done(&d->joint);
    *bytes = b;
}

size_t ds_draft_release_weights(struct ds_draft *d)
{
    size_t b = 0;
    if (d && !d->released) {
        free_weights(d, &b);
        d->embed = NULL;
        d->lm_head = NULL;
        d->released = true;
    }
    return b;
}

int ds_draft_check_weights(const struct ds_draft *d)
{
    if (d->released)
        return ds_seterr(DS_EINVAL, "draft '%s': its host weights were released to run from a GPU copy; load "
                                    "it again for another engine", d->dir);
    return 0;
}

struct ds_draft *ds_draft_free(struct ds_draft *d)
{
    if (!d)
        return NULL;
    size_t unused;
    free_weights(d, &unused);
    if (d->layers)
        for (int i = 0; i < d->n_layers; i++) {
            struct ds_draft_layer *l = &d->layers[i];
            free(l->attn_norm), free(l->ffn_norm), free(l->q_norm), free(l->k_norm);
        }
    free(d->layers);
    free(d->hidden_norm);
    free(d->final_norm);
    free(d->inv_freq);
    free(d->gate_bias);
    free(d->joint_bias);
    free(d->conf_w);
    free(d);
    return NULL;
}

const struct ds_dspark_config *ds_draft_config(const struct ds_draft *d)
{
    return &d->cfg;
}

const char *ds_draft_checksum(const struct ds_draft *d)
{
    return d->checksum;
}

int ds_draft_block_size(const struct ds_draft *d)
{
    return d->gamma;
}

/* ---- context cache ---- */
int ds_draft_cache_reserve(const struct ds_draft *d, struct ds_draft_cache *c, int cap)
{
    if (cap <= c->cap)
        return 0;
    size_t row = (size_t)d->n_layers * d->nKV * d->hd;
    float *k = realloc(c->k, (size_t)cap * row * sizeof(float));
    if (!k)
        return ds_seterr(DS_ENOMEM, "could not allocate the draft context cache (%d positions)", cap);
    c->k = k;
    float *v = realloc(c->v, (size_t)cap * row * sizeof(float));
    if (!v)
        return ds_seterr(DS_ENOMEM, "could not allocate the draft context cache (%d positions)", cap);
    c->v = v;
    c->cap = cap;
    return 0;
}

void ds_draft_cache_done(struct ds_draft_cache *c)
{
    free(c->k);
    free(c->v);
    memset(c, 0, sizeof *c);
}

struct ctx_job {
    const struct ds_draft *d;
    float *kv;                       /* [n, n_layers * 2 * nKV hd] */
    struct ds_draft_cache *const *caches;
    const int32_t *pos;
};

static void ctx_task(void *arg, int t, int thread)
{
    (void)thread;
    const struct ctx_job *j = arg;
    const struct ds_draft *d = j->d;
    size_t kvw = (size_t)d->nKV * d->hd, row = (size_t)d->n_layers * kvw;
    float *src = j->kv + (size_t)t * 2 * row;
    struct ds_draft_cache *c = j->caches[t];
    int p = j->pos[t];
    float eps = (float)d->cfg.base.rms_norm_eps;
    for (int l = 0; l < d->n_layers; l++) {
        float *k = src + (size_t)l * 2 * kvw, *v = k + kvw;
        for (int h = 0; h < d->nKV; h++)
            ds_rmsnorm(k + (size_t)h * d->hd, d->layers[l].k_norm, d->hd, eps, k + (size_t)h * d->hd);
        ds_rope(k, d->nKV, d->hd, d->inv_freq, p);
        memcpy(c->k + (size_t)p * row + (size_t)l * kvw, k, kvw * sizeof(float));
        memcpy(c->v + (size_t)p * row + (size_t)l * kvw, v, kvw * sizeof(float));
    }
}

int ds_draft_add_context(const struct ds_draft *d, struct ds_pool *pool, int n, const float *feats,
                         struct ds_draft_cache *const *caches, const int32_t *pos, struct ds_draft_scratch *s)
{
    if (n <= 0)
        return 0;
    int r = ds_draft_check_weights(d);
    if (r < 0)
        return r;
    int H = d->H;
    size_t kvrow = (size_t)2 * d->n_layers * d->nKV * d->hd;
    float *fc = ds_scratch(s, 0, (size_t)n * H), *cn = ds_scratch(s, 1, (size_t)n * H);
    float *kv = ds_scratch(s, 2, (size_t)n * kvrow);
    if (!fc || !cn || !kv)
        return ds_seterr(DS_ENOMEM, "out of memory for %d draft context rows", n);
    for (int t = 0; t < n; t++)
        if (pos[t] >= caches[t]->cap)
            return ds_seterr(DS_EINVAL, "draft context position %d is past the cache (%d)", pos[t], caches[t]->cap);
    ds_gemm(pool, &d->fc, feats, d->m * H, n, fc, H, false);
    for (int t = 0; t < n; t++)
        ds_rmsnorm(fc + (size_t)t * H, d->hidden_norm, H, (float)d->cfg.base.rms_norm_eps, cn + (size_t)t * H);
    ds_gemm(pool, &d->ctx_kv, cn, H, n, kv, (int)kvrow, false);
    struct ctx_job j = {.d = d, .kv = kv, .caches = caches, .pos = pos};
    ds_pool_run(pool, n, ctx_task, &j);
    return 0;
}

/* ---- block forward ---- */
struct blk_job {
    const struct ds_draft *d;
    int layer;
    float *x, *xn, *qkv, *attn, *gu, *act;   /* [R γ, ...] */
    struct ds_draft_cache *const *caches;
    const int32_t *start;
    float *scores;                           /* [threads, cap_ctx] */
    int cap_ctx;
};

static void blk_qk_task(void *arg, int row, int thread)
{
    (void)thread;
    const struct blk_job *j = arg;
    const struct ds_draft *d = j->d;
    const struct ds_draft_layer *l = &d->layers[j->layer];
    int width = (d->nH + 2 * d->nKV) * d->hd, g = d->gamma;
    float *q = j->qkv + (size_t)row * width, *k = q + (size_t)d->nH * d->hd;
    float eps = (float)d->cfg.base.rms_norm_eps;
    for (int h = 0; h < d->nH; h++)
        ds_rmsnorm(q + (size_t)h * d->hd, l->q_norm, d->hd, eps, q + (size_t)h * d->hd);
    for (int h = 0; h < d->nKV; h++)
        ds_rmsnorm(k + (size_t)h * d->hd, l->k_norm, d->hd, eps, k + (size_t)h * d->hd);
    int pos = j->start[row / g] + row % g;
    ds_rope(q, d->nH, d->hd, d->inv_freq, pos);
    ds_rope(k, d->nKV, d->hd, d->inv_freq, pos);
}

/* task = (block row, kv group): non-causal attention over context + block. */
static void blk_attn_task(void *arg, int task, int thread)
{
    const struct blk_job *j = arg;
    const struct ds_draft *d = j->d;
    int g = d->gamma, hd = d->hd, nH = d->nH, nKV = d->nKV, group = nH / nKV;
    int row = task / nKV, kvh = task % nKV, seq = row / g;
    int width = (nH + 2 * nKV) * hd;
    const struct ds_draft_cache *c = j->caches[seq];
    int n_ctx = j->start[seq];
    size_t crow = (size_t)d->n_layers * nKV * hd, loff = (size_t)j->layer * nKV * hd + (size_t)kvh * hd;
    const float *blk = j->qkv + (size_t)seq * g * width;   /* this sequence's γ rows */
    float *scores = j->scores + (size_t)thread * j->cap_ctx;
    float scale = 1.0f / sqrtf((float)hd);
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        const float *q = j->qkv + (size_t)row * width + (size_t)h * hd;
        float mx = -INFINITY;
        int n = 0;
        for (int p = 0; p < n_ctx; p++, n++) {
            scores[n] = ds_dot(q, c->k + (size_t)p * crow + loff, hd) * scale;
            mx = scores[n] > mx ? scores[n] : mx;
        }
        for (int b = 0; b < g; b++, n++) {
            const float *kb = blk + (size_t)b * width + (size_t)nH * hd + (size_t)kvh * hd;
            scores[n] = ds_dot(q, kb, hd) * scale;
            mx = scores[n] > mx ? scores[n] : mx;
        }
        float sum = 0;
        for (int i = 0; i < n; i++) {
            scores[i] = expf(scores[i] - mx);
            sum += scores[i];
        }
        float inv = 1.0f / sum, *out = j->attn + (size_t)row * nH * hd + (size_t)h * hd;
        for (int e = 0; e < hd; e++)
            out[e] = 0;
        for (int p = 0; p < n_ctx; p++) {
            const float *v = c->v + (size_t)p * crow + loff;
            float w = scores[p] * inv;
            for (int e = 0; e < hd; e++)
                out[e] += w * v[e];
        }
        for (int b = 0; b < g; b++) {
            const float *v = blk + (size_t)b * width + (size_t)(nH + nKV) * hd + (size_t)kvh * hd;
            float w = scores[n_ctx + b] * inv;
            for (int e = 0; e < hd; e++)
                out[e] += w * v[e];
        }
    }
}

int ds_draft_block(const struct ds_draft *d, struct ds_pool *pool, int R, struct ds_draft_cache *const *caches,
                   const int32_t *anchor, const int32_t *start, float *h_out, float *U_out,
                   struct ds_draft_scratch *s)
{
    int g = d->gamma, n = R * g, H = d->H, hd = d->hd;
    int width = (d->nH + 2 * d->nKV) * hd;
    if (R <= 0)
        return 0;
    int rc = ds_draft_check_weights(d);
    if (rc < 0)
        return rc;
    int max_ctx = 0;
    for (int i = 0; i < R; i++)
        max_ctx = start[i] > max_ctx ? start[i] : max_ctx;
    int cap_ctx = max_ctx + g;
    struct blk_job j = {
        .d = d, .caches = caches, .start = start, .cap_ctx = cap_ctx,
        .x = ds_scratch(s, 0, (size_t)n * H), .xn = ds_scratch(s, 1, (size_t)n * H),
        .qkv = ds_scratch(s, 2, (size_t)n * width), .attn = ds_scratch(s, 3, (size_t)n * d->nH * hd),
        .gu = ds_scratch(s, 4, (size_t)n * 2 * d->I), .act = ds_scratch(s, 5, (size_t)n * d->I),
        .scores = ds_scratch(s, 6, (size_t)ds_pool_threads(pool) * cap_ctx),
    };
    float *proj = ds_scratch(s, 7, (size_t)n * H);
    if (!j.x || !j.xn || !j.qkv || !j.attn || !j.gu || !j.act || !j.scores || !proj)
        return ds_seterr(DS_ENOMEM, "out of memory for a draft block of %d rows", n);
    for (int i = 0; i < R; i++) {
        if (start[i] > caches[i]->len)
            return ds_seterr(DS_EINVAL, "draft context holds %d positions, block starts at %d", caches[i]->len,
                             start[i]);
        for (int k = 0; k < g; k++) {
            int32_t tok = k == 0 ? anchor[i] : d->cfg.mask_token_id;
            memcpy(j.x + ((size_t)i * g + k) * H, d->embed + (size_t)tok * H, (size_t)H * sizeof(float));
        }
    }
    float eps = (float)d->cfg.base.rms_norm_eps;
    for (int l = 0; l < d->n_layers; l++) {
        const struct ds_draft_layer *L = &d->layers[l];
        j.layer = l;
        for (int t = 0; t < n; t++)
            ds_rmsnorm(j.x + (size_t)t * H, L->attn_norm, H, eps, j.xn + (size_t)t * H);
        ds_gemm(pool, &L->qkv, j.xn, H, n, j.qkv, width, false);
        ds_pool_run(pool, n, blk_qk_task, &j);
        ds_pool_run(pool, n * d->nKV, blk_attn_task, &j);
        ds_gemm(pool, &L->o, j.attn, d->nH * hd, n, proj, H, false);
        for (size_t i = 0; i < (size_t)n * H; i++)
            j.x[i] += proj[i];
        for (int t = 0; t < n; t++)
            ds_rmsnorm(j.x + (size_t)t * H, L->ffn_norm, H, eps, j.xn + (size_t)t * H);
        ds_gemm(pool, &L->gate_up, j.xn, H, n, j.gu, 2 * d->I, false);
        for (int t = 0; t < n; t++) {
            const float *gt = j.gu + (size_t)t * 2 * d->I, *up = gt + d->I;
            float *a = j.act + (size_t)t * d->I;
            for (int i = 0; i < d->I; i++)
                a[i] = gt[i] / (1.0f + expf(-gt[i])) * up[i];
        }
        ds_gemm(pool, &L->down, j.act, d->I, n, proj, H, false);
        for (size_t i = 0; i < (size_t)n * H; i++)
            j.x[i] += proj[i];
    }
    for (int t = 0; t < n; t++)
        ds_rmsnorm(j.x + (size_t)t * H, d->final_norm, H, eps, h_out + (size_t)t * H);
    ds_gemm(pool, d->lm_head, h_out, H, n, U_out, d->V, false);
    return 0;
}

/* ---- Markov head and confidence, one position for R sequences ---- */
static float sigmoidf(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

int ds_draft_markov_step(const struct ds_draft *d, struct ds_pool *pool, int R, const int32_t *prev,
                         const float *U, int ldU, const float *h, int ldh, float *state, float *logits,
                         float *z, struct ds_draft_scratch *s)
{
    int V = d->V, H = d->H, rk = d->r;
    int rc = ds_draft_check_weights(d);
    if (rc < 0)
        return rc;
    if (rk > 0) {
        float *in = ds_scratch(s, 8, (size_t)R * (2 * rk + H)), *mid = ds_scratch(s, 9, (size_t)R * 3 * rk);
        float *corr = ds_scratch(s, 10, (size_t)R * rk);
        if (!in || !mid || !corr)
            return ds_seterr(DS_ENOMEM, "out of memory for the Markov head");
        for (int i = 0; i < R; i++) {
            const float *e = d->w1 + (size_t)prev[i] * rk;
            float *c = corr + (size_t)i * rk;
            if (d->cfg.markov_head == DS_MARKOV_VANILLA)
                memcpy(c, e, (size_t)rk * sizeof(float));
        }
        if (d->cfg.markov_head == DS_MARKOV_GATED) {
            for (int i = 0; i < R; i++) {
                float *row = in + (size_t)i * (H + rk);
                memcpy(row, h + (size_t)i * ldh, (size_t)H * sizeof(float));
                memcpy(row + H, d->w1 + (size_t)prev[i] * rk, (size_t)rk * sizeof(float));
            }
            ds_gemm(pool, &d->gate, in, H + rk, R, mid, rk, false);
            for (int i = 0; i < R; i++)
                for (int q = 0; q < rk; q++) {
                    float gt = sigmoidf(mid[(size_t)i * rk + q] + d->gate_bias[q]);
                    corr[(size_t)i * rk + q] = gt * d->w1[(size_t)prev[i] * rk + q];
                }
        } else if (d->cfg.markov_head == DS_MARKOV_RNN) {
            int w = 2 * rk + H;
            for (int i = 0; i < R; i++) {
                float *row = in + (size_t)i * w;
                memcpy(row, state + (size_t)i * rk, (size_t)rk * sizeof(float));
                memcpy(row + rk, d->w1 + (size_t)prev[i] * rk, (size_t)rk * sizeof(float));
                memcpy(row + 2 * rk, h + (size_t)i * ldh, (size_t)H * sizeof(float));
            }
            ds_gemm(pool, &d->joint, in, w, R, mid, 3 * rk, false);
            for (int i = 0; i < R; i++) {
                float *m3 = mid + (size_t)i * 3 * rk, *st = state + (size_t)i * rk;
                for (int q = 0; q < rk; q++) {
                    float gr = sigmoidf(m3[q] + d->joint_bias[q]);
                    float cr = tanhf(m3[rk + q] + d->joint_bias[rk + q]);
                    float orr = tanhf(m3[2 * rk + q] + d->joint_bias[2 * rk + q]);
                    st[q] = gr * st[q] + (1.0f - gr) * cr;
                    corr[(size_t)i * rk + q] = orr;
                }
            }
        }
        ds_gemm(pool, &d->w2, corr, rk, R, logits, V, false);
        for (int i = 0; i < R; i++)
            for (int v = 0; v < V; v++)
                logits[(size_t)i * V + v] += U[(size_t)i * ldU + v];
    } else {
        for (int i = 0; i < R; i++)
            memcpy(logits + (size_t)i * V, U + (size_t)i * ldU, (size_t)V * sizeof(float));
    }
    if (z) {
        for (int i = 0; i < R; i++) {
            if (!d->conf_w) {
                z[i] = NAN;
                continue;
            }
            float acc = ds_dot(d->conf_w, h + (size_t)i * ldh, H);
            if (rk > 0 && d->cfg.confidence_head_with_markov)
                acc += ds_dot(d->conf_w + H, d->w1 + (size_t)prev[i] * rk, rk);
            z[i] = acc + d->conf_b;
        }
    }
    return 0;
}

/* Per-position STS temperatures for a sampling temperature: the set measured
 * at the nearest temperature, or all ones when the draft ships none; true
 * (and the set's map in out_map) when that set also has a (z, p) map. */
bool ds_draft_sts(const struct ds_draft *d, float sampling_t, float *out_t, float (*out_map)[3])
{
    int best = -1;
    float dist = INFINITY;
    for (int i = 0; i < d->n_sts; i++) {
        float dd = fabsf(d->sts_at[i] - sampling_t);
        if (dd < dist) {
            dist = dd;
            best = i;
        }
    }
    for (int k = 0; k < d->gamma; k++)
        out_t[k] = best >= 0 ? d->sts_t[best][k] : 1.0f;
    if (best < 0 || !d->sts_has_map[best])
        return false;
    memcpy(out_map, d->sts_map[best], (size_t)d->gamma * sizeof *out_map);
    return true;
}

/* ---- scratch ---- */
float *ds_scratch(struct ds_draft_scratch *s, int slot, size_t n)
{
    if (n > s->cap[slot]) {
        float *p = realloc(s->buf[slot], n * sizeof(float));
        if (!p)
            return NULL;
        s->buf[slot] = p;
        s->cap[slot] = n;
    }
    return s->buf[slot];
}

void ds_scratch_done(struct ds_draft_scratch *s)
{
    for (int i = 0; i < DS_SCRATCH_SLOTS; i++)
        free(s->buf[i]);
    memset(s, 0, sizeof *s);
}
