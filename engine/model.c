/* model.c: loading a Hugging Face Qwen3ForCausalLM directory for the CPU backend.
 *
 * Weights are converted to f32 at load: norms and the embedding as plain
 * arrays, projections packed for ds_gemm (q/k/v stacked into one matrix and
 * gate/up into another, so each layer runs three products and one attention).
 * Tensor names are those of transformers' Qwen3 ("model.layers.N.self_attn.q_proj.weight"). */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dspark/ds-model.h"
#include "dspark/ds-tokenizer.h"
#include "load-util.h"

int ds_load_f32(const struct ds_st *st, const char *name, int ndim, const int64_t *shape, float **ret)
{
    const struct ds_tensor *t;
    int r = ds_st_get(st, name, ndim, shape, &t);
    if (r < 0)
        return r;
    float *a = malloc((size_t)t->numel * sizeof(float));
    if (!a)
        return ds_seterr(DS_ENOMEM, "tensor '%s': could not allocate %lld floats", name, (long long)t->numel);
    ds_tensor_to_f32(t, 0, (size_t)t->numel, a);
    *ret = a;
    return 0;
}

int ds_load_vec(const struct ds_st *st, const char *name, int64_t n, float **ret)
{
    return ds_load_f32(st, name, 1, &n, ret);
}

int ds_load_concat(const struct ds_st *st, const char *const *names, const int64_t *lens, int n, float **ret)
{
    int64_t total = 0;
    for (int i = 0; i < n; i++)
        total += lens[i];
    float *all = ds_xmalloc((size_t)(total > 0 ? total : 1) * sizeof(float));
    int64_t at = 0;
    for (int i = 0; i < n; i++) {
        float *part = NULL;
        int r = ds_load_vec(st, names[i], lens[i], &part);
        if (r < 0) {
            free(all);
            return r;
        }
        memcpy(all + at, part, (size_t)lens[i] * sizeof(float));
        free(part);
        at += lens[i];
    }
    *ret = all;
    return 0;
}

int ds_load_mat(const struct ds_st *st, const char *name, int64_t rows, int64_t cols, struct ds_mat *m)
{
    const struct ds_tensor *t;
    int64_t shape[2] = {rows, cols};
    int r = ds_st_get(st, name, 2, shape, &t);
    if (r < 0)
        return r;
    return ds_mat_from_tensor(m, t, 0, (int)rows);
}

int ds_load_stacked(const struct ds_st *st, const char *const *names, const int64_t *rows, int n, int64_t cols,
                    struct ds_mat *out)
{
    struct ds_mat *parts = ds_xcalloc((size_t)n, sizeof *parts);
    int r = 0;
    for (int i = 0; i < n && r == 0; i++)
        r = ds_load_mat(st, names[i], rows[i], cols, &parts[i]);
    if (r == 0)
        r = ds_mat_concat(out, parts, n);
    for (int i = 0; i < n; i++)
        ds_mat_done(&parts[i]);
    free(parts);
    return r;
}

/* A cheap identity for the weights: FNV-1a over tensor names, dtypes, shapes and
 * the first 4 KiB of each tensor's data (not a cryptographic digest). */
void ds_st_checksum(const struct ds_st *st, char out[17])
{
    uint64_t h = 1469598103934665603ull;
#define MIX(p, n)                                                                         \
    for (size_t z_ = 0; z_ < (n); z_++) {                                                 \
        h ^= ((const unsigned char *)(p))[z_];                                            \
        h *= 1099511628211ull;                                                            \
    }
    for (size_t i = 0; i < ds_st_count(st); i++) {
        const struct ds_tensor *t = ds_st_at(st, i);
        MIX(t->name, strlen(t->name));
        MIX(&t->dtype, sizeof t->dtype);
        MIX(t->shape, sizeof(int64_t) * (size_t)t->ndim);
        MIX(t->data, t->nbytes < 4096 ? t->nbytes : 4096);
    }
#undef MIX
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

static int load_layer(const struct ds_st *st, const struct ds_qwen3_config *c, int i, struct ds_layer *l)
{
    char n[4][160];
    int64_t H = c->hidden_size, I = c->intermediate_size, hd = c->head_dim;
    int64_t q_rows = (int64_t)c->num_attention_heads * hd, kv_rows = (int64_t)c->num_key_value_heads * hd;
    int r;
#define NAME(buf, suffix) snprintf(buf, sizeof buf, "model.layers.%d.%s", i, suffix)
    NAME(n[0], "input_layernorm.weight");
    if ((r = ds_load_vec(st, n[0], H, &l->attn_norm)) < 0)
        return r;
    NAME(n[0], "post_attention_layernorm.weight");
    if ((r = ds_load_vec(st, n[0], H, &l->ffn_norm)) < 0)
        return r;
    NAME(n[0], "self_attn.q_norm.weight");
    if ((r = ds_load_vec(st, n[0], hd, &l->q_norm)) < 0)
        return r;
    NAME(n[0], "self_attn.k_norm.weight");
    if ((r = ds_load_vec(st, n[0], hd, &l->k_norm)) < 0)
        return r;
    NAME(n[0], "self_attn.q_proj.weight");
    NAME(n[1], "self_attn.k_proj.weight");
    NAME(n[2], "self_attn.v_proj.weight");
    const char *qkv[3] = {n[0], n[1], n[2]};
    int64_t qkv_rows[3] = {q_rows, kv_rows, kv_rows};
    if ((r = ds_load_stacked(st, qkv, qkv_rows, 3, H, &l->qkv)) < 0)
        return r;
    NAME(n[0], "self_attn.o_proj.weight");
    if ((r = ds_load_mat(st, n[0], H, q_rows, &l->o)) < 0)
        return r;
    NAME(n[0], "mlp.gate_proj.weight");
    NAME(n[1], "mlp.up_proj.weight");
    const char *gu[2] = {n[0], n[1]};
    int64_t gu_rows[2] = {I, I};
    if ((r = ds_load_stacked(st, gu, gu_rows, 2, H, &l->gate_up)) < 0)
        return r;
    NAME(n[0], "mlp.down_proj.weight");
    if ((r = ds_load_mat(st, n[0], H, I, &l->down)) < 0)
        return r;
    if (c->attention_bias) {
        NAME(n[0], "self_attn.q_proj.bias");
        NAME(n[1], "self_attn.k_proj.bias");
        NAME(n[2], "self_attn.v_proj.bias");
        if ((r = ds_load_concat(st, qkv, qkv_rows, 3, &l->qkv_bias)) < 0)
            return r;
        NAME(n[0], "self_attn.o_proj.bias");
        if ((r = ds_load_vec(st, n[0], H, &l->o_bias)) < 0)
            return r;
    }
#undef NAME
    return 0;
}


int ds_model_load(const char *dir, const struct ds_model_opts *opts, struct ds_model **ret)
{
    struct ds_model *m = ds_xcalloc(1, sizeof *m);
    struct ds_st *st = NULL;
    int r;
    snprintf(m->dir, sizeof m->dir, "%s", dir);
    if ((r = ds_qwen3_config_load(dir, &m->cfg)) < 0)
        goto fail;
    if ((r = ds_generation_config_load(dir, &m->gen)) < 0)
        goto fail;
    /* (they replace config.json's: one past the vocabulary would end no generation) */
    for (int i = 0; i < m->gen.n_eos; i++)
        if (m->gen.eos_token_id[i] >= m->cfg.vocab_size) {
            r = ds_seterr(DS_EFORMAT, "file 'generation_config.json': eos_token_id %d is outside the vocabulary "
                          "of %d (config.json's vocab_size)", m->gen.eos_token_id[i], m->cfg.vocab_size);
            goto fail;
        }
    if ((r = ds_st_open_dir(dir, &st)) < 0)
        goto fail;
    const struct ds_qwen3_config *c = &m->cfg;
    int64_t V = c->vocab_size, H = c->hidden_size;
    int64_t embed_shape[2] = {V, H};
    if ((r = ds_load_f32(st, "model.embed_tokens.weight", 2, embed_shape, &m->embed)) < 0)
        goto fail;
    if ((r = ds_st_check_layers(st, "model.layers.", c->num_hidden_layers, "config.json's num_hidden_layers")) < 0)
        goto fail;
    if (!opts || !opts->skip_layers) {
        m->layers = ds_xcalloc((size_t)c->num_hidden_layers, sizeof *m->layers);
        for (int i = 0; i < c->num_hidden_layers; i++)
            if ((r = load_layer(st, c, i, &m->layers[i])) < 0)
                goto fail;
    }
    if ((r = ds_load_vec(st, "model.norm.weight", H, &m->final_norm)) < 0)
        goto fail;
    if (c->tie_word_embeddings) {
        r = ds_mat_from_f32(&m->lm_head, m->embed, (int)V, (int)H);
    } else {
        r = ds_load_mat(st, "lm_head.weight", V, H, &m->lm_head);
    }
    if (r < 0)
        goto fail;
    m->inv_freq = ds_xmalloc((size_t)(c->head_dim / 2) * sizeof(float));
    for (int i = 0; i < c->head_dim / 2; i++) {
        /* as transformers: 1 / theta^(arange(0, hd, 2) / hd), computed in f32 */
        float expo = (float)(2 * i) / (float)c->head_dim;
        m->inv_freq[i] = 1.0f / powf((float)c->rope_theta, expo);
    }
    ds_st_checksum(st, m->checksum);
    if (opts && opts->load_tokenizer) {
        char path[4200];
        struct stat sb;
        snprintf(path, sizeof path, "%s/tokenizer.json", dir);
        if (stat(path, &sb) == 0 && (r = ds_tokenizer_load(path, &m->tok)) < 0)
            goto fail;
        /* (the model has no row for a larger id: a prompt holding one failed at submit) */
        if (m->tok && ds_tokenizer_vocab_size(m->tok) > m->cfg.vocab_size) {
            r = ds_seterr(DS_EFORMAT, "file 'tokenizer.json': its ids go up to %d, past config.json's vocab_size "
                          "of %d", ds_tokenizer_vocab_size(m->tok) - 1, m->cfg.vocab_size);
            goto fail;
        }
    }
    ds_st_free(st);
    *ret = m;
    return 0;
fail:
    ds_prefixerr(r, "model '%s'", dir);
    ds_st_free(st);
    ds_model_free(m);
    return r;
}

struct ds_model *ds_model_free(struct ds_model *m)
{
    if (!m)
        return NULL;
    if (m->layers) {
        for (int i = 0; i < m->cfg.num_hidden_layers; i++) {
            struct ds_layer *l = &m->layers[i];
            free(l->attn_norm);
            free(l->ffn_norm);
            free(l->q_norm);
            free(l->k_norm);
            free(l->qkv_bias);
            free(l->o_bias);
            ds_mat_done(&l->qkv);
            ds_mat_done(&l->o);
            ds_mat_done(&l->gate_up);
            ds_mat_done(&l->down);
        }
        free(m->layers);
    }
    free(m->embed);
    free(m->final_norm);
    ds_mat_done(&m->lm_head);
    free(m->inv_freq);
    ds_tokenizer_free(m->tok);
    free(m);
    return NULL;
}
