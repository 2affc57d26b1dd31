/* ds-model.h: the Qwen3 target model on the CPU backend: loading a Hugging Face
 * directory, the paged KV cache, and one forward pass over a flattened ragged
 * batch of tokens from many sequences.
 *
 * A pass takes tokens from any number of sequences at once (prefill chunks,
 * single decode tokens and verification blocks together). Token t belongs to
 * sequence seq[t] at absolute position pos[t]; the tokens of one sequence in a
 * pass must have consecutive positions starting at that sequence's cached
 * length. Attention is causal per sequence over its cache plus its own tokens
 * of the pass. Every per-token computation is batch-invariant: a token's
 * logits and captured features are bit-identical whatever else shares the pass. */
#ifndef DS_MODEL_H
#define DS_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "dspark/ds-config.h"
#include "dspark/ds-err.h"
#include "dspark/ds-gemm.h"
#include "dspark/ds-safetensors.h"

struct ds_tokenizer;

/* ---- paged KV cache ---- */
struct ds_kv_pool {
    int n_layers, n_kv_heads, head_dim;
    int page_size;        /* positions per page */
    int n_pages;
    float *k;             /* [n_layers, n_pages, page_size, n_kv_heads, head_dim] */
    float *v;             /* same shape as k */
    int32_t *free_pages;  /* [n_pages] stack of free page ids */
    int n_free;
};

/* One sequence's view of the pool: page ids for positions 0, page_size, ... */
struct ds_kv_seq {
    int32_t *pages;       /* [cap] */
    int n_pages, cap;
    int len;              /* positions whose K/V are committed */
};

int ds_kv_pool_init(struct ds_kv_pool *pool, int n_layers, int n_kv_heads, int head_dim, int page_size,
                    int n_pages) DS_MUSTCHECK;
/* The page bookkeeping alone (k and v stay NULL): the rows live elsewhere (the GPU). */
int ds_kv_pool_init_pages(struct ds_kv_pool *pool, int n_layers, int n_kv_heads, int head_dim, int page_size,
                          int n_pages) DS_MUSTCHECK;
void ds_kv_pool_done(struct ds_kv_pool *pool);
/* Make room for positions < n (DS_ELIMIT when the pool is out of pages; nothing changes then). */
int ds_kv_reserve(struct ds_kv_pool *pool, struct ds_kv_seq *seq, int n) DS_MUSTCHECK;
/* Keep positions < len (rollback of rejected tokens); pages past the need go back to the pool. */
void ds_kv_truncate(struct ds_kv_pool *pool, struct ds_kv_seq *seq, int len);
/* Give every page back and reset the sequence. */
void ds_kv_release(struct ds_kv_pool *pool, struct ds_kv_seq *seq);
/* Pages needed to hold n positions. */
int ds_kv_pages_for(const struct ds_kv_pool *pool, int n);
/* Address of the K (or V) row of one position: [n_kv_heads, head_dim]. */
static inline float *ds_kv_at(const struct ds_kv_pool *pool, float *base, const struct ds_kv_seq *seq,
                              int layer, int pos)
{
    int page = seq->pages[pos / pool->page_size], slot = pos % pool->page_size;
    size_t row = (size_t)pool->n_kv_heads * pool->head_dim;
    return base + (((size_t)layer * pool->n_pages + page) * pool->page_size + slot) * row;
}

/* ---- model ---- */
struct ds_layer {
    float *attn_norm;            /* [H] input_layernorm */
    float *ffn_norm;             /* [H] post_attention_layernorm */
    float *q_norm, *k_norm;      /* [hd] per-head RMSNorm weights */
    float *qkv_bias;             /* [(nH + 2 nKV) hd] or NULL (attention_bias) */
    float *o_bias;               /* [H] or NULL */
    struct ds_mat qkv;           /* [(nH + 2 nKV) hd, H]: q_proj, k_proj, v_proj stacked */
    struct ds_mat o;             /* [H, nH hd] */
    struct ds_mat gate_up;       /* [2 I, H]: gate_proj, up_proj stacked */
    struct ds_mat down;          /* [H, I] */
};

struct ds_model {
    struct ds_qwen3_config cfg;
    struct ds_generation_config gen;
    char dir[4096];
    char checksum[17];           /* hex of a 64-bit hash over the weight files' headers and sizes */
    float *embed;                /* [V, H] token embeddings */
    struct ds_layer *layers;     /* [L], NULL when loaded with skip_layers */
    float *final_norm;           /* [H] */
    struct ds_mat lm_head;       /* [V, H] (the embedding when tied) */
    float *inv_freq;             /* [hd / 2] RoPE inverse frequencies */
    struct ds_tokenizer *tok;    /* NULL when the directory has no tokenizer.json */
};

struct ds_model_opts {
    bool load_tokenizer;         /* load DIR/tokenizer.json when present */
    bool skip_layers;            /* leave the transformer layers in the files (layers stays NULL): the
                                  * CUDA backend reads them from there; ds_model_forward refuses */
};

int ds_model_load(const char *dir, const struct ds_model_opts *opts, struct ds_model **ret) DS_MUSTCHECK;
struct ds_model *ds_model_free(struct ds_model *model);

/* ---- forward ---- */
struct ds_batch {
    int n_tokens;
    const int32_t *tokens;       /* [n_tokens] */
    const int32_t *pos;          /* [n_tokens] absolute positions */
    const int32_t *seq;          /* [n_tokens] index into kv */
    struct ds_kv_seq **kv;       /* [n_seqs] caches, reserved up to every pos + 1 */
    int n_logits;
    const int32_t *logit_rows;   /* [n_logits] token indices whose logits are wanted */
    float *logits;               /* [n_logits, V] out (CUDA: NULL keeps them on the device) */
    int32_t *argmax;             /* [n_logits] out: each row's largest logit (first on ties), or NULL */
    int n_capture;
    const int32_t *capture_layers; /* [n_capture] layer ids, -1 = embedding output */
    float *captured;             /* [n_tokens, n_capture * H] out (residual after each layer), or NULL */
};

/* Scratch memory and threads for forward passes; one per thread that runs passes. */
struct ds_forward_ctx;
int ds_forward_ctx_new(const struct ds_model *model, struct ds_pool *pool, struct ds_forward_ctx **ret) DS_MUSTCHECK;
struct ds_forward_ctx *ds_forward_ctx_free(struct ds_forward_ctx *ctx);

/* Run the target over the batch: writes K/V of every token into its sequence's
 * pages (the caller moves kv->len afterwards), fills logits and captures. */
int ds_model_forward(const struct ds_model *model, struct ds_forward_ctx *ctx, struct ds_kv_pool *pool,
                     const struct ds_batch *batch) DS_MUSTCHECK;

/* Shared numeric helpers (also used by the draft). */
float ds_dot(const float *a /* [n] */, const float *b /* [n] */, int n);
void ds_rmsnorm(const float *x /* [n] */, const float *w /* [n] */, int n, float eps, float *out /* [n] */);
void ds_rope(float *x /* [n_heads, hd] */, int n_heads, int hd, const float *inv_freq /* [hd/2] */, int pos);

#endif
