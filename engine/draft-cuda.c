/* draft-cuda.c: the DSpark draft on the target's GPU (the CUDA backend).
 *
 * The same operations as draft.c, with bf16 weights:
 *   context rows: captured target features → fc → hidden norm → every layer's
 *     k/v projection → k norm + RoPE → the draft's paged context cache;
 *   a block: anchor + γ−1 masks through the draft layers; its own K/V are
 *     written at positions start..start+γ−1 of the same pages and every block
 *     row attends to all positions up to start+γ−1 (non-causal); the context
 *     rows of accepted tokens overwrite those slots later;
 *   a Markov position: corrected logits U_k + W2·m(prev, h_k, state), their
 *     argmax and the confidence logit, for every block at once;
 *   a greedy draft phase: the block and all γ positions, each argmax feeding
 *     the next on the device, captured as one CUDA graph per block count;
 *   a sampled draft phase: the same, each position's corrected logits turned
 *     into the row's sampling distribution q (kernels/sample.cu), written over
 *     that position's base logits (read once, so free), and the draft drawn
 *     from q with an uploaded uniform; q stays for the target's acceptance.
 * The context cache shares the target's page tables, so the engine's KV
 * reservation of a sequence covers both. Any draft keeps speculation lossless,
 * so the draft's numerics need only be close to draft.c's, not equal. */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "dspark/ds-cuda.h"
#include "cuda-impl.h"
#include "draft-impl.h"
#include "draft-ops.h"
#include "dspark/ds-sampler.h"
#include "kernels.h"

/* metadata slots of passes of up to cap rows: tokens, pos, attention pos, seq,
 * run starts, run lengths, anchors [cap each], the run count [1], then the page
 * table [max_seqs, max_pages] and the previous tokens [max_seqs γ] */
enum { M_TOK, M_POS, M_ATT_POS, M_SEQ, M_RUN_START, M_RUN_LEN, M_ANCHOR, M_SLOTS };

#define DRAFT_GRAPHS 32

struct draft_graph {
    int R;                           /* blocks */
    bool sampled;                    /* the sampled phase (else the greedy one) */
    bool argmax;                     /* its positions take the argmax (greedy rows need it) */
    cudaGraphExec_t exec;            /* NULL until the shape's second round */
    long last_use;                   /* 0: free slot */
};

struct ds_cuda_draft {
    struct ds_cuda_target *t;        /* the GPU, its stream and page geometry */
    struct ds_dspark_config cfg;
    float conf_b;                    /* the confidence head's bias */
    int g, H, V, m, r, L, nH, nKV, hd, I, max_seqs;
    const uint16_t *embed;           /* [V, H] bf16: t's or own_embed */
    uint16_t *own_embed;
    const struct cu_mat *head;       /* [V, H]: t's or &own_head */
    struct cu_mat own_head;
    struct cu_mat fc;                /* [H, m H] */
    struct cu_mat ctx_kv;            /* [L 2 nKV hd, H]: per layer k_proj then v_proj */
    struct cu_mat w2;                /* [V, r] */
    struct cu_mat gate;              /* gated head: [r, H + r] */
    struct cu_mat joint;             /* rnn head: [3 r, 2 r + H] */
    float *hidden_norm, *final_norm; /* [H] */
    float *inv_freq;                 /* [hd / 2] */
    float *gate_bias, *joint_bias;   /* [r], [3 r] */
    float *conf_w;                   /* [H + r] or [H] */
    uint16_t *w1;                    /* [V, r] */
    struct cu_layer *layers;         /* [L] (no biases) */
    float *k_norms;                  /* [L, hd] the layers' k norm weights together (the context rows' launch) */
    uint16_t *k_cache, *v_cache;     /* [L, n_pages, page_size, nKV, hd] */
    /* activations: blocks of up to max_seqs sequences, context passes of up to cap_rows rows */
    int cap_rows;
    float *x;                        /* [cap_rows, H] */
    uint16_t *xn;                    /* [cap_rows, max(H, I, m H)] */
    float *wide;                     /* [cap_rows, max((nH + 2 nKV) hd, 2 I, L 2 nKV hd)] */
    uint16_t *attn;                  /* [cap_rows, nH hd] */
    float *ws, *att_ws;              /* product and attention workspaces */
    float *h;                        /* [max_seqs γ, H] final-normed block states */
    uint16_t *hb;                    /* [max_seqs γ, H] the same in bf16 */
    float *U;                        /* [max_seqs γ, V] base logits; after a sampled phase, each position's q */
    float *logits;                   /* [max_seqs, V] corrected logits of one position */
    int32_t *ids;                    /* [max_seqs] their argmax */
    float *z;                        /* [max_seqs] confidence logits */
    float *state;                    /* [max_seqs, r] rnn state */
    uint16_t *m_in;                  /* [max_seqs, 2 r + H] Markov head input */
    float *mid;                      /* [max_seqs, 3 r] */
    uint16_t *corr;                  /* [max_seqs, r] Markov correction input of W2 */
    int32_t *meta, *h_meta;          /* device, pinned host */
    cudaEvent_t meta_sent;           /* after the last copy of h_meta to meta: h_meta may be rewritten */
    size_t meta_ints;
    struct ds_kv_seq **row_kv;       /* [max_seqs] the sequences of a context pass's page table */
    int att_longest;                 /* the longest attention run of the blocks (picks a block shape) */
    int32_t *ids_all;                /* [γ, max_seqs] a phase's drafts, position-major */
    float *z_all;                    /* [γ, max_seqs] their confidence logits */
    float *p_all;                    /* [γ, max_seqs] the probability of each argmax (T = 1) */
    float *h_z, *h_p;                /* pinned [γ, max_seqs] */
    struct ds_k_sampling *samp, *h_samp; /* [max_seqs] sampling parameters (device, pinned) */
    float *u, *h_u;                  /* [γ, max_seqs] the draws' uniforms (device, pinned) */
    bool q_ready;                    /* U holds the last phase's q: [R, γ, V] */
    bool base_ready;                 /* U holds ds_cuda_draft_block's base logits (a phase overwrites them) */
    cudaStream_t side;               /* a phase's confidence heads, beside its positions' products */
    cudaEvent_t forked, joined;      /* the side branch's start (each position) and end (the phase) */
    struct draft_graph graphs[DRAFT_GRAPHS];
    long uses;
    int R;                           /* blocks of the last ds_cuda_draft_block */
};

static size_t meta_pages(const struct ds_cuda_draft *g)
{
    return (size_t)M_SLOTS * g->cap_rows + 1;
}

static size_t meta_prev(const struct ds_cuda_draft *g)
{
    return meta_pages(g) + (size_t)g->max_seqs * g->t->max_pages;
}

/* bf16 K and V of every draft layer for page_size positions */
static size_t kv_page_bytes(int layers, int nKV, int hd, int page_size)
{
    return 2ull * layers * page_size * nKV * hd * 2;
}

size_t ds_cuda_draft_page_bytes(const struct ds_draft *d, int page_size)
{
    return kv_page_bytes(d->n_layers, d->nKV, d->hd, page_size);
}

struct ds_cuda_draft *ds_cuda_draft_free(struct ds_cuda_draft *g)
{
    if (!g)
        return NULL;
    cudaStreamSynchronize(g->t->stream);
    if (g->layers) {
        for (int i = 0; i < g->L; i++)
            ds_cu_layer_free(&g->layers[i]);
        free(g->layers);
    }
    void *bufs[] = {g->own_embed, g->own_head.w, g->fc.w, g->ctx_kv.w, g->w2.w, g->gate.w, g->joint.w,
                    g->hidden_norm, g->final_norm, g->inv_freq, g->gate_bias, g->joint_bias, g->conf_w, g->w1,
                    g->k_cache, g->v_cache, g->x, g->xn, g->wide, g->attn, g->ws, g->att_ws, g->h, g->hb, g->U,
                    g->logits, g->ids, g->z, g->state, g->m_in, g->mid, g->corr, g->meta, g->k_norms};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        cudaFree(bufs[i]);
    cudaFreeHost(g->h_meta);
    cudaFreeHost(g->h_z);
    cudaFreeHost(g->h_p);
    cudaFreeHost(g->h_samp);
    cudaFreeHost(g->h_u);
    cudaFree(g->ids_all);
    cudaFree(g->z_all);
    cudaFree(g->p_all);
    cudaFree(g->samp);
    cudaFree(g->u);
    for (int i = 0; i < DRAFT_GRAPHS; i++)
        if (g->graphs[i].exec)
            cudaGraphExecDestroy(g->graphs[i].exec);
    if (g->side)
        cudaStreamDestroy(g->side);
    cudaEvent_t events[] = {g->forked, g->joined, g->meta_sent};
    for (size_t i = 0; i < sizeof events / sizeof events[0]; i++)
        if (events[i])
            cudaEventDestroy(events[i]);
    free(g->row_kv);
    free(g);
    return NULL;
}

static int upload_weights(struct ds_cuda_draft *g, const struct ds_draft *d)
{
    struct ds_cuda_target *t = g->t;
    int H = g->H, hd = g->hd, r;
    for (int i = 0; i < g->L; i++) {
        const struct ds_draft_layer *hl = &d->layers[i];
        struct cu_layer *dl = &g->layers[i];
        if ((r = ds_cu_upload_f32(&dl->attn_norm, hl->attn_norm, (size_t)H, "draft norm weights")) < 0 ||
            (r = ds_cu_upload_f32(&dl->ffn_norm, hl->ffn_norm, (size_t)H, "draft norm weights")) < 0 ||
            (r = ds_cu_upload_f32(&dl->q_norm, hl->q_norm, (size_t)hd, "draft norm weights")) < 0 ||
            (r = ds_cu_upload_f32(&dl->k_norm, hl->k_norm, (size_t)hd, "draft norm weights")) < 0 ||
            (r = ds_cu_upload_mat(t, &dl->qkv, &hl->qkv, "draft q/k/v projections")) < 0 ||
            (r = ds_cu_upload_mat(t, &dl->o, &hl->o, "draft o projections")) < 0 ||
            (r = ds_cu_upload_mat(t, &dl->gate_up, &hl->gate_up, "draft gate/up projections")) < 0 ||
            (r = ds_cu_upload_mat(t, &dl->down, &hl->down, "draft down projections")) < 0)
            return r;
    }
    if ((r = ds_cu_upload_mat(t, &g->fc, &d->fc, "the draft's fc")) < 0 ||
        (r = ds_cu_upload_mat(t, &g->ctx_kv, &d->ctx_kv, "the draft's context projections")) < 0 ||
        (r = ds_cu_upload_f32(&g->hidden_norm, d->hidden_norm, (size_t)H, "draft norm weights")) < 0 ||
        (r = ds_cu_upload_f32(&g->final_norm, d->final_norm, (size_t)H, "draft norm weights")) < 0 ||
        (r = ds_cu_upload_f32(&g->inv_freq, d->inv_freq, (size_t)hd / 2, "RoPE frequencies")) < 0)
        return r;
    g->conf_b = d->conf_b;
    if (g->r > 0) {
        if ((r = ds_cu_upload_bf16(t, &g->w1, d->w1, (size_t)g->V * g->r, "the Markov embedding")) < 0 ||
            (r = ds_cu_upload_mat(t, &g->w2, &d->w2, "the Markov output")) < 0)
            return r;
        if (d->cfg.markov_head == DS_MARKOV_GATED &&
            ((r = ds_cu_upload_mat(t, &g->gate, &d->gate, "the Markov gate")) < 0 ||
             (r = ds_cu_upload_f32(&g->gate_bias, d->gate_bias, (size_t)g->r, "the Markov gate")) < 0))
            return r;
        if (d->cfg.markov_head == DS_MARKOV_RNN &&
            ((r = ds_cu_upload_mat(t, &g->joint, &d->joint, "the Markov rnn")) < 0 ||
             (r = ds_cu_upload_f32(&g->joint_bias, d->joint_bias, 3 * (size_t)g->r, "the Markov rnn")) < 0))
            return r;
    }
    if (d->conf_w) {
        size_t in = (size_t)H + (d->cfg.confidence_head_with_markov && g->r > 0 ? g->r : 0);
        if ((r = ds_cu_upload_f32(&g->conf_w, d->conf_w, in, "the confidence head")) < 0)
            return r;
    }
    /* the target's embedding and head when the draft shares them */
    if (d->own_embed) {
        if ((r = ds_cu_upload_bf16(t, &g->own_embed, d->own_embed, (size_t)g->V * H, "the draft's embedding")) < 0)
            return r;
        g->embed = g->own_embed;
    } else {
        g->embed = t->embed;
    }
    if (d->lm_head == &d->own_lm_head) {
        if ((r = ds_cu_upload_mat(t, &g->own_head, &d->own_lm_head, "the draft's head")) < 0)
            return r;
        g->head = &g->own_head;
    } else {
        g->head = &t->lm_head;
    }
    return 0;
}

static size_t max3(size_t a, size_t b, size_t c)
{
    size_t m = a > b ? a : b;
    return m > c ? m : c;
}

static size_t max2(size_t a, size_t b)
{
    return a > b ? a : b;
}

static int alloc_activations(struct ds_cuda_draft *g)
{
    size_t cr = (size_t)g->cap_rows, S = (size_t)g->max_seqs, B = S * g->g;
    size_t H = g->H, V = g->V, r = g->r, hd = g->hd;
    size_t kvw = (size_t)g->nKV * hd, qkvw = ((size_t)g->nH + 2 * g->nKV) * hd;
    size_t in_w = max3(H, g->I, (size_t)g->m * H), wide_w = max3(qkvw, 2 * (size_t)g->I, 2 * g->L * kvw);
    /* split-k workspace of the largest product */
    size_t ws = 0;
    const struct cu_mat *row_mats[] = {&g->fc, &g->ctx_kv};
    for (int i = 0; i < 2; i++)
        ws = max2(ws, ds_k_gemm_workspace((int)cr, row_mats[i]->n, row_mats[i]->split));
    for (int i = 0; i < g->L; i++) {
        const struct cu_mat *ms[4] = {&g->layers[i].qkv, &g->layers[i].o, &g->layers[i].gate_up,
                                      &g->layers[i].down};
        for (int j = 0; j < 4; j++)
            ws = max2(ws, ds_k_gemm_workspace((int)cr, ms[j]->n, ms[j]->split));
    }
    ws = max2(ws, ds_k_gemm_workspace((int)B, g->head->n, g->head->split));
    const struct cu_mat *heads[] = {&g->w2, &g->gate, &g->joint};
    for (int i = 0; i < 3; i++)
        if (heads[i]->w)
            ws = max2(ws, ds_k_gemm_workspace((int)S, heads[i]->n, heads[i]->split));
    g->meta_ints = meta_prev(g) + S * g->g;
    size_t rk = r > 0 ? r : 1;
    int e;
    if ((e = ds_cu_alloc(&g->x, cr * H * 4, "draft activations")) < 0 ||
        (e = ds_cu_alloc(&g->xn, cr * in_w * 2, "draft activations")) < 0 ||
        (e = ds_cu_alloc(&g->wide, cr * wide_w * 4, "draft activations")) < 0 ||
        (e = ds_cu_alloc(&g->attn, cr * g->nH * hd * 2, "draft activations")) < 0 ||
        (e = ds_cu_alloc(&g->ws, (ws > 0 ? ws : 1) * 4, "the draft's product workspace")) < 0 ||
        (e = ds_cu_alloc(&g->att_ws, ds_k_attention_workspace((int)cr, g->nH, g->hd) * 4,
                         "the draft's attention workspace")) < 0 ||
        (e = ds_cu_alloc(&g->h, B * H * 4, "draft states")) < 0 ||
        (e = ds_cu_alloc(&g->hb, B * H * 2, "draft states")) < 0 ||
        (e = ds_cu_alloc(&g->U, B * V * 4, "draft logits")) < 0 ||
        (e = ds_cu_alloc(&g->logits, S * V * 4, "draft logits")) < 0 ||
        (e = ds_cu_alloc(&g->ids, S * 4, "draft tokens")) < 0 ||
        (e = ds_cu_alloc(&g->z, S * 4, "draft confidences")) < 0 ||
        (e = ds_cu_alloc(&g->state, S * rk * 4, "the Markov state")) < 0 ||
        (e = ds_cu_alloc(&g->m_in, S * (2 * rk + H) * 2, "the Markov input")) < 0 ||
        (e = ds_cu_alloc(&g->mid, S * 3 * rk * 4, "the Markov head")) < 0 ||
        (e = ds_cu_alloc(&g->corr, S * rk * 2, "the Markov head")) < 0 ||
        (e = ds_cu_alloc(&g->meta, g->meta_ints * 4, "draft metadata")) < 0 ||
        (e = ds_cu_alloc(&g->ids_all, S * g->g * 4, "draft tokens")) < 0 ||
        (e = ds_cu_alloc(&g->z_all, S * g->g * 4, "draft confidences")) < 0 ||
        (e = ds_cu_alloc(&g->p_all, S * g->g * 4, "draft probabilities")) < 0 ||
        (e = ds_cu_alloc(&g->samp, S * sizeof *g->samp, "draft sampling parameters")) < 0 ||
        (e = ds_cu_alloc(&g->u, S * g->g * 4, "draft uniforms")) < 0)
        return e;
    CK(cudaMallocHost((void **)&g->h_meta, g->meta_ints * 4));
    CK(cudaMallocHost((void **)&g->h_samp, S * sizeof *g->h_samp));
    CK(cudaMallocHost((void **)&g->h_u, S * g->g * 4));
    CK(cudaMemset(g->ws, 0, (ws > 0 ? ws : 1) * 4));   /* the product's tile counters start at zero */
    CK(cudaMallocHost((void **)&g->h_z, S * g->g * 4));
    CK(cudaMallocHost((void **)&g->h_p, S * g->g * 4));
    CK(cudaStreamCreateWithFlags(&g->side, cudaStreamNonBlocking));
    CK(cudaEventCreateWithFlags(&g->forked, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&g->joined, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&g->meta_sent, cudaEventDisableTiming));
    return 0;
}

/* The shape from the config; checks what the kernels need. */
static int draft_init(struct ds_cuda_target *t, const struct ds_dspark_config *cfg, int max_seqs,
                      struct ds_cuda_draft **ret)
{
    const struct ds_qwen3_config *c = &cfg->base;
    if (!t->k_cache || t->cap_tokens == 0)
        return ds_seterr(DS_EINVAL, "allocate the target's GPU KV cache and activations before the draft's");
    if (c->hidden_size != t->cfg.hidden_size || c->vocab_size != t->cfg.vocab_size)
        return ds_seterr(DS_EINVAL, "the draft's hidden size or vocabulary differs from the target's");
    int mH = cfg->n_target_layers * c->hidden_size;
    if (c->hidden_size % 8 || c->intermediate_size % 8 || c->head_dim % 8 || c->head_dim > 256 || mH % 8 ||
        cfg->markov_rank % 8 || (c->num_attention_heads * c->head_dim) % 8)
        return ds_seterr(DS_ENOTSUP,
                         "the CUDA draft needs hidden size, intermediate size, head_dim (at most 256) and the "
                         "Markov rank in multiples of 8");
    if (max_seqs <= 0)
        return ds_seterr(DS_EINVAL, "max_seqs must be positive");
    struct ds_cuda_draft *g = ds_xcalloc(1, sizeof *g);
    g->t = t;
    g->cfg = *cfg;
    g->g = cfg->block_size;
    g->H = c->hidden_size;
    g->V = c->vocab_size;
    g->m = cfg->n_target_layers;
    g->r = cfg->markov_rank;
    g->L = c->num_hidden_layers;
    g->nH = c->num_attention_heads;
    g->nKV = c->num_key_value_heads;
    g->hd = c->head_dim;
    g->I = c->intermediate_size;
    g->max_seqs = max_seqs;
    g->row_kv = ds_xcalloc((size_t)max_seqs, sizeof *g->row_kv);
    g->cap_rows = t->cap_tokens > max_seqs * g->g ? t->cap_tokens : max_seqs * g->g;
    g->layers = ds_xcalloc((size_t)g->L, sizeof *g->layers);
    *ret = g;
    return 0;
}

/* The most k ranges of a draft layer's products. The target's ranges are sized for decoding's one row;
 * a draft block has γ rows, so its products take cuBLASLt's batched ranges at every batch size, and each
 * range more is a partial of every row to write and add. At most 2 made the sampled 4B and 8B rounds
 * faster at 1, 8 and 64 blocks alike (1 was slow at 8 blocks; bench/RESULTS.md, twenty-first round). A
 * constant, so a block's bits still do not depend on the batch. */
#define DRAFT_MAX_SPLIT 2

/* The context cache and the activations, once the weights are there. */
static int draft_finish(struct ds_cuda_draft *g)
{
    struct ds_cuda_target *t = g->t;
    size_t half = kv_page_bytes(g->L, g->nKV, g->hd, t->page_size) / 2 * (size_t)t->n_pages;
    int r;
    for (int l = 0; l < g->L; l++) {
        struct cu_layer *dl = &g->layers[l];
        struct cu_mat *ms[] = {&dl->qkv, &dl->o, &dl->gate_up, &dl->down};
        for (size_t i = 0; i < sizeof ms / sizeof *ms; i++)
            ms[i]->split = ds_k_gemm_split_at_most(ms[i]->split, ms[i]->k, DRAFT_MAX_SPLIT);
    }
    if ((r = ds_cu_alloc(&g->k_cache, half, "the draft's context cache")) < 0 ||
        (r = ds_cu_alloc(&g->v_cache, half, "the draft's context cache")) < 0)
        return r;
    CK(cudaMemset(g->k_cache, 0, half));   /* no stale bits, ever, in slots a block may read */
    CK(cudaMemset(g->v_cache, 0, half));
    if ((r = ds_cu_alloc(&g->k_norms, (size_t)g->L * g->hd * 4, "draft norm weights")) < 0)
        return r;
    for (int l = 0; l < g->L; l++)
        CK(cudaMemcpyAsync(g->k_norms + (size_t)l * g->hd, g->layers[l].k_norm, (size_t)g->hd * 4,
                           cudaMemcpyDeviceToDevice, g->t->stream));
    return alloc_activations(g);
}

int ds_cuda_draft_new(struct ds_cuda_target *t, const struct ds_draft *d, int max_seqs, struct ds_cuda_draft **ret)
{
    struct ds_cuda_draft *g = NULL;
    int r = ds_draft_check_weights(d);
    if (r < 0)
        return r;
    r = draft_init(t, &d->cfg, max_seqs, &g);
    if (r == 0 && (r = upload_weights(g, d)) == 0)
        r = draft_finish(g);
    if (r < 0) {
        ds_cuda_draft_free(g);
        return r;
    }
    *ret = g;
    return 0;
}

int ds_cuda_draft_new_random(struct ds_cuda_target *t, const struct ds_dspark_config *cfg, uint64_t seed,
                             int max_seqs, struct ds_cuda_draft **ret)
{
    struct ds_cuda_draft *g = NULL;
    int r = draft_init(t, cfg, max_seqs, &g);
    if (r < 0)
        return r;
    int H = g->H, hd = g->hd, I = g->I, V = g->V, rk = g->r, kvw = g->nKV * hd;
    uint64_t s = seed;
    const char *W = "random draft weights";
    for (int i = 0; i < g->L && r == 0; i++) {
        struct cu_layer *l = &g->layers[i];
        if ((r = ds_cu_random_vec(t, &l->attn_norm, (size_t)H, ++s, 1.0f, 0.1f, W)) < 0 ||
            (r = ds_cu_random_vec(t, &l->ffn_norm, (size_t)H, ++s, 1.0f, 0.1f, W)) < 0 ||
            (r = ds_cu_random_vec(t, &l->q_norm, (size_t)hd, ++s, 1.0f, 0.1f, W)) < 0 ||
            (r = ds_cu_random_vec(t, &l->k_norm, (size_t)hd, ++s, 1.0f, 0.1f, W)) < 0 ||
            (r = ds_cu_random_mat(t, &l->qkv, (g->nH + 2 * g->nKV) * hd, H, ++s, W)) < 0 ||
            (r = ds_cu_random_mat(t, &l->o, H, g->nH * hd, ++s, W)) < 0 ||
            (r = ds_cu_random_mat(t, &l->gate_up, 2 * I, H, ++s, W)) < 0 ||
            (r = ds_cu_random_mat(t, &l->down, H, I, ++s, W)) < 0)
            break;
    }
    if (r == 0 && ((r = ds_cu_random_mat(t, &g->fc, H, g->m * H, ++s, W)) < 0 ||
                   (r = ds_cu_random_mat(t, &g->ctx_kv, 2 * g->L * kvw, H, ++s, W)) < 0 ||
                   (r = ds_cu_random_vec(t, &g->hidden_norm, (size_t)H, ++s, 1.0f, 0.1f, W)) < 0 ||
                   (r = ds_cu_random_vec(t, &g->final_norm, (size_t)H, ++s, 1.0f, 0.1f, W)) < 0))
        goto out;
    if (r == 0 && rk > 0) {
        if ((r = ds_cu_alloc(&g->w1, (size_t)V * rk * 2, W)) < 0 ||
            (r = ds_cu_random_mat(t, &g->w2, V, rk, ++s, W)) < 0)
            goto out;
        CK(ds_k_fill_uniform_bf16(g->w1, (size_t)V * rk, ++s, 0.0f, 1.0f, t->stream));
        if (cfg->markov_head == DS_MARKOV_GATED &&
            ((r = ds_cu_random_mat(t, &g->gate, rk, H + rk, ++s, W)) < 0 ||
             (r = ds_cu_random_vec(t, &g->gate_bias, (size_t)rk, ++s, 0.0f, 0.1f, W)) < 0))
            goto out;
        if (cfg->markov_head == DS_MARKOV_RNN &&
            ((r = ds_cu_random_mat(t, &g->joint, 3 * rk, 2 * rk + H, ++s, W)) < 0 ||
             (r = ds_cu_random_vec(t, &g->joint_bias, 3 * (size_t)rk, ++s, 0.0f, 0.1f, W)) < 0))
            goto out;
    }
    if (r == 0 && cfg->enable_confidence_head) {
        size_t in = (size_t)H + (cfg->confidence_head_with_markov && rk > 0 ? rk : 0);
        r = ds_cu_random_vec(t, &g->conf_w, in, ++s, 0.0f, 0.05f, W);
    }
    if (r == 0) {
        /* inverse RoPE frequencies as the loader computes them */
        float *inv = ds_xmalloc((size_t)hd / 2 * sizeof(float));
        for (int i = 0; i < hd / 2; i++)
            inv[i] = 1.0f / powf((float)cfg->base.rope_theta, (float)(2 * i) / (float)hd);
        r = ds_cu_upload_f32(&g->inv_freq, inv, (size_t)hd / 2, "RoPE frequencies");
        free(inv);
    }
    g->embed = t->embed;
    g->head = &t->lm_head;
    if (r == 0)
        r = draft_finish(g);
    if (r == 0 && cudaStreamSynchronize(t->stream) != cudaSuccess)
        r = ds_seterr(DS_ECUDA, "making random draft weights failed");
out:
    if (r < 0) {
        ds_cuda_draft_free(g);
        return r;
    }
    *ret = g;
    return 0;
}

/* Row of kv in a context pass's page table (g->row_kv[0..*n_rows)), added when new; -1 when full. */
static int page_row(struct ds_cuda_draft *g, int *n_rows, struct ds_kv_seq *kv)
{
    for (int i = *n_rows - 1; i >= 0; i--)
        if (g->row_kv[i] == kv)
            return i;
    if (*n_rows == g->max_seqs)
        return -1;
    int32_t *pages = g->h_meta + meta_pages(g) + (size_t)*n_rows * g->t->max_pages;
    memcpy(pages, kv->pages, (size_t)kv->n_pages * 4);
    g->row_kv[*n_rows] = kv;
    return (*n_rows)++;
}

static int check_kv(const struct ds_cuda_draft *g, const struct ds_kv_pool *pool, const struct ds_kv_seq *kv, int pos)
{
    if (pool->page_size != g->t->page_size || pool->n_pages > g->t->n_pages)
        return ds_seterr(DS_EINVAL, "the KV bookkeeping does not match the GPU cache");
    if (pos < 0 || ds_kv_pages_for(pool, pos + 1) > kv->n_pages)
        return ds_seterr(DS_EINVAL, "draft position %d has no KV page reserved", pos);
    if (kv->n_pages > g->t->max_pages)
        return ds_seterr(DS_ELIMIT, "a sequence holds %d KV pages, more than the GPU page table allows",
                         kv->n_pages);
    return 0;
}

int ds_cuda_draft_context(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int n, const int32_t *rows,
                          struct ds_kv_seq *const *kv, const int32_t *pos)
{
    struct ds_cuda_target *t = g->t;
    int H = g->H, hd = g->hd, kvw = g->nKV * hd, ldkv = 2 * g->L * kvw, mH = g->m * H, cap = g->cap_rows, r;
    float eps = (float)g->cfg.base.rms_norm_eps;
    size_t layer_kv = (size_t)t->n_pages * t->page_size * kvw;
    const int32_t *d_rows = g->meta + M_TOK * cap, *d_pos = g->meta + M_POS * cap;
    const int32_t *d_seq = g->meta + M_SEQ * cap, *d_pages = g->meta + meta_pages(g);
    int32_t *h = g->h_meta;
    for (int at = 0; at < n; at += cap) {
        int nc = n - at < cap ? n - at : cap, n_rows = 0;
        CK(cudaEventSynchronize(g->meta_sent));   /* the last upload of the pinned metadata has been read */
        for (int i = 0; i < nc; i++) {
            if ((r = check_kv(g, pool, kv[at + i], pos[at + i])) < 0)
                return r;
            if (rows[at + i] < 0 || rows[at + i] >= t->cap_tokens)
                return ds_seterr(DS_EINVAL, "context row %d is outside the last pass", rows[at + i]);
            int pr = page_row(g, &n_rows, kv[at + i]);
            if (pr < 0)
                return ds_seterr(DS_ELIMIT, "draft context rows of more than %d sequences in one call", g->max_seqs);
            h[M_TOK * cap + i] = rows[at + i];
            h[M_POS * cap + i] = pos[at + i];
            h[M_SEQ * cap + i] = pr;
        }
        CK(cudaMemcpyAsync(g->meta, h, (meta_pages(g) + (size_t)n_rows * t->max_pages) * 4, cudaMemcpyHostToDevice,
                           t->stream));
        CK(cudaEventRecord(g->meta_sent, t->stream));
        CK(ds_k_gather_bf16(t->captured, mH, d_rows, nc, mH, g->xn, mH, t->stream));
        if ((r = ds_cu_gemm(t, g->ws, &g->fc, g->xn, mH, nc, g->x, H, false)) < 0)
            return r;
        CK(ds_k_rmsnorm_bf16(g->x, NULL, g->hidden_norm, nc, H, eps, g->xn, t->stream));
        if ((r = ds_cu_gemm(t, g->ws, &g->ctx_kv, g->xn, H, nc, g->wide, ldkv, false)) < 0)
            return r;
        CK(ds_k_k_norm_rope_append_layers_bf16(g->wide, g->wide + kvw, ldkv, g->L, 2 * kvw, g->k_norms, g->inv_freq,
                                               d_pos, d_seq, d_pages, t->max_pages, t->page_size, nc, g->nKV, hd, eps,
                                               g->k_cache, g->v_cache, layer_kv, t->stream));
    }
    return 0;
}

/* Check a block's sequences and write its metadata (pinned; uploaded by the caller). */
static int block_meta(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R, struct ds_kv_seq *const *kv,
                      const int32_t *anchor, const int32_t *start)
{
    struct ds_cuda_target *t = g->t;
    int gm = g->g, cap = g->cap_rows, r;
    if (R > g->max_seqs)
        return ds_seterr(DS_ELIMIT, "%d draft blocks, more than the %d the GPU draft was sized for", R, g->max_seqs);
    CK(cudaEventSynchronize(g->meta_sent));
    int32_t *h = g->h_meta;
    for (int i = 0; i < R; i++) {
        if ((r = check_kv(g, pool, kv[i], start[i] + gm - 1)) < 0)
            return r;
        if (anchor[i] < 0 || anchor[i] >= g->V)
            return ds_seterr(DS_EINVAL, "draft anchor %d is outside the vocabulary", anchor[i]);
        memcpy(h + meta_pages(g) + (size_t)i * t->max_pages, kv[i]->pages, (size_t)kv[i]->n_pages * 4);
        h[M_ANCHOR * cap + i] = anchor[i];
        for (int k = 0; k < gm; k++) {
            int row = i * gm + k;
            h[M_TOK * cap + row] = k == 0 ? anchor[i] : g->cfg.mask_token_id;
            h[M_POS * cap + row] = start[i] + k;
            h[M_ATT_POS * cap + row] = start[i] + gm - 1;   /* every block row sees the whole block */
            h[M_SEQ * cap + row] = i;
        }
    }
    h[M_SLOTS * cap] = ds_k_attention_runs(h + M_SEQ * cap, R * gm, g->nH, g->nKV, h + M_RUN_START * cap,
                                           h + M_RUN_LEN * cap, &g->att_longest);
    CK(cudaMemcpyAsync(g->meta, h, (meta_pages(g) + (size_t)R * t->max_pages) * 4, cudaMemcpyHostToDevice,
                       t->stream));
    CK(cudaEventRecord(g->meta_sent, t->stream));
    return 0;
}

/* The device part of R blocks (metadata uploaded): h, hb and U. Graph-capturable. */
static int enqueue_block(struct ds_cuda_draft *g, int R)
{
    struct ds_cuda_target *t = g->t;
    int gm = g->g, n = R * gm, H = g->H, hd = g->hd, nH = g->nH, nKV = g->nKV, I = g->I, V = g->V, r;
    int cap = g->cap_rows;
    float eps = (float)g->cfg.base.rms_norm_eps;
    size_t layer_kv = (size_t)t->n_pages * t->page_size * nKV * hd;
    const int32_t *d_tok = g->meta + M_TOK * cap, *d_pos = g->meta + M_POS * cap;
    const int32_t *d_att = g->meta + M_ATT_POS * cap, *d_seq = g->meta + M_SEQ * cap;
    const int32_t *d_rs = g->meta + M_RUN_START * cap, *d_rl = g->meta + M_RUN_LEN * cap;
    const int32_t *d_nr = g->meta + M_SLOTS * cap, *d_pages = g->meta + meta_pages(g);
    CK(ds_k_embed_bf16(g->embed, d_tok, n, H, V, g->x, t->stream));
    /* the block attends non-causally: every row up to its block's last position (att_pos) */
    struct cu_layer_pass lp = {.n = n, .H = H, .I = I, .nH = nH, .nKV = nKV, .hd = hd, .eps = eps, .x = g->x,
                               .xn = g->xn, .qkv = g->wide, .attn = g->attn, .gu = g->wide, .ws = g->ws,
                               .att_ws = g->att_ws, .inv_freq = g->inv_freq, .seq = d_seq, .pos = d_pos,
                               .att_pos = d_att, .run_start = d_rs, .run_len = d_rl, .n_runs = d_nr,
                               .pages = d_pages, .att_longest = g->att_longest};
    for (int l = 0; l < g->L; l++)
        if ((r = ds_cu_enqueue_layer(t, &g->layers[l], g->k_cache + (size_t)l * layer_kv,
                                     g->v_cache + (size_t)l * layer_kv, &lp)) < 0)
            return r;
    CK(ds_k_rmsnorm(g->x, g->final_norm, n, H, eps, g->h, t->stream));
    CK(ds_k_rmsnorm_bf16(g->x, NULL, g->final_norm, n, H, eps, g->hb, t->stream));
    if ((r = ds_cu_gemm(t, g->ws, g->head, g->hb, H, n, g->U, V, false)) < 0)
        return r;
    if (g->r > 0)
        CK(cudaMemsetAsync(g->state, 0, (size_t)R * g->r * 4, t->stream));
    return 0;
}

/* Where Markov position k's corrected logits are made: in place over the
 * block's base logits U[·, k] (a phase, which reads each position once), or
 * in g->logits from a copy of them (a step, which leaves U as it was).
 * Row i at logits + i ld. */
static float *step_logits(struct ds_cuda_draft *g, int k, bool in_place, int *ld)
{
    *ld = in_place ? g->g * g->V : g->V;
    return in_place ? g->U + (size_t)k * g->V : g->logits;
}

/* The device part of Markov position k for R blocks: corrected logits into
 * step_logits(g, k, in_place), with `argmax` their argmax into ids (and its
 * probability at T = 1 into p; NULL: none), the confidence logits into z
 * (NULL: none). prev [R] is on the device. In place (a phase), the confidence
 * head goes on g->side, after what the stream holds so far (prev), so it runs
 * beside the position's product and distribution; the phase joins it. Graph-capturable. */
static int enqueue_step(struct ds_cuda_draft *g, int R, int k, const int32_t *prev, bool in_place, bool argmax,
                        int32_t *ids, float *z, float *p)
{
    struct ds_cuda_target *t = g->t;
    const struct ds_dspark_config *cfg = &g->cfg;
    int gm = g->g, H = g->H, V = g->V, rk = g->r, r, ld;
    const float *hk = g->h + (size_t)k * H;   /* row i at hk + i γ H */
    if (g->conf_w && z) {
        bool with_markov = rk > 0 && cfg->confidence_head_with_markov;
        cudaStream_t conf_stream = in_place ? g->side : t->stream;
        if (in_place) {
            CK(cudaEventRecord(g->forked, t->stream));
            CK(cudaStreamWaitEvent(g->side, g->forked, 0));
        }
        CK(ds_k_confidence(hk, gm * H, g->conf_w, with_markov ? g->w1 : NULL, with_markov ? prev : NULL, R, H,
                           with_markov ? rk : 0, V, g->conf_b, z, conf_stream));
    }
    float *logits = step_logits(g, k, in_place, &ld);
    if (!in_place)
        CK(cudaMemcpy2DAsync(logits, (size_t)V * 4, g->U + (size_t)k * V, (size_t)gm * V * 4, (size_t)V * 4, R,
                             cudaMemcpyDeviceToDevice, t->stream));
    if (rk > 0) {
        if (cfg->markov_head == DS_MARKOV_GATED) {
            int w = H + rk;
            CK(ds_k_gather_bf16(hk, gm * H, NULL, R, H, g->m_in, w, t->stream));
            CK(ds_k_table_rows_bf16(g->w1, prev, R, rk, V, g->m_in + H, w, t->stream));
            if ((r = ds_cu_gemm(t, g->ws, &g->gate, g->m_in, w, R, g->mid, rk, false)) < 0)
                return r;
            CK(ds_k_markov_gated(g->mid, g->gate_bias, g->w1, prev, R, rk, V, g->corr, t->stream));
        } else if (cfg->markov_head == DS_MARKOV_RNN) {
            int w = 2 * rk + H;
            CK(ds_k_gather_bf16(g->state, rk, NULL, R, rk, g->m_in, w, t->stream));
            CK(ds_k_table_rows_bf16(g->w1, prev, R, rk, V, g->m_in + rk, w, t->stream));
            CK(ds_k_gather_bf16(hk, gm * H, NULL, R, H, g->m_in + 2 * rk, w, t->stream));
            if ((r = ds_cu_gemm(t, g->ws, &g->joint, g->m_in, w, R, g->mid, 3 * rk, false)) < 0)
                return r;
            CK(ds_k_markov_rnn(g->mid, g->joint_bias, g->state, R, rk, g->corr, t->stream));
        } else {
            CK(ds_k_table_rows_bf16(g->w1, prev, R, rk, V, g->corr, rk, t->stream));
        }
        if ((r = ds_cu_gemm(t, g->ws, &g->w2, g->corr, rk, R, logits, ld, true)) < 0)
            return r;
    }
    if (argmax && p)
        CK(ds_k_argmax_prob(logits, ld, R, V, ids, p, t->stream));
    else if (argmax)
        CK(ds_k_argmax(logits, ld, R, V, ids, t->stream));
    return 0;
}

int ds_cuda_draft_block(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R, struct ds_kv_seq *const *kv,
                        const int32_t *anchor, const int32_t *start)
{
    int r;
    if (R <= 0)
        return 0;
    g->q_ready = false;
    if ((r = block_meta(g, pool, R, kv, anchor, start)) < 0 || (r = enqueue_block(g, R)) < 0)
        return r;
    g->R = R;
    g->base_ready = true;
    return 0;
}

int ds_cuda_draft_step(struct ds_cuda_draft *g, int k, const int32_t *prev, int32_t *ids, float *z, float *logits)
{
    struct ds_cuda_target *t = g->t;
    int R = g->R, V = g->V, r;
    if (R <= 0 || !g->base_ready || k < 0 || k >= g->g)
        return ds_seterr(DS_EINVAL, "no draft block to continue at position %d", k);
    for (int i = 0; i < R; i++)
        if (prev[i] < 0 || prev[i] >= V)
            return ds_seterr(DS_EINVAL, "draft token %d is outside the vocabulary", prev[i]);
    int32_t *d_prev = g->meta + meta_prev(g);
    CK(cudaEventSynchronize(g->meta_sent));
    memcpy(g->h_meta + meta_prev(g), prev, (size_t)R * 4);
    CK(cudaMemcpyAsync(d_prev, g->h_meta + meta_prev(g), (size_t)R * 4, cudaMemcpyHostToDevice, t->stream));
    if ((r = enqueue_step(g, R, k, d_prev, false, true, g->ids, z ? g->z : NULL, NULL)) < 0)
        return r;
    CK(cudaMemcpyAsync(ids, g->ids, (size_t)R * 4, cudaMemcpyDeviceToHost, t->stream));
    if (g->conf_w && z)
        CK(cudaMemcpyAsync(z, g->z, (size_t)R * 4, cudaMemcpyDeviceToHost, t->stream));
    if (logits) {
        CK(cudaMemcpyAsync(logits, g->logits, (size_t)R * V * 4, cudaMemcpyDeviceToHost, t->stream));
        t->logits_to_host += (uint64_t)R * V * 4;
    }
    CK(cudaStreamSynchronize(t->stream));
    if (z && !g->conf_w)
        for (int i = 0; i < R; i++)
            z[i] = NAN;
    return 0;
}

/* Blocks and all γ positions on the device, each position's draft feeding the
 * next: the argmax (greedy), or (sampled) a draw with the uploaded uniform from
 * the row's sampling distribution q, which replaces that position's base
 * logits U[i, k]. Drafts and confidences go to ids_all and z_all. A sampled
 * phase without greedy rows skips the argmax (and its probability, p_all). */
static int enqueue_phase(struct ds_cuda_draft *g, int R, bool sampled, bool argmax)
{
    struct ds_cuda_target *t = g->t;
    int r = enqueue_block(g, R), gm = g->g, V = g->V, S = g->max_seqs;
    const int32_t *prev = g->meta + M_ANCHOR * g->cap_rows;
    for (int k = 0; k < gm && r == 0; k++) {
        int32_t *ids = g->ids_all + (size_t)k * S;
        r = enqueue_step(g, R, k, prev, true, argmax || !sampled, ids, g->conf_w ? g->z_all + (size_t)k * S : NULL,
                         g->p_all + (size_t)k * S);
        if (r == 0 && sampled) {
            int ld;
            float *q = step_logits(g, k, true, &ld);   /* the draw's q replaces the logits it is made from */
            CK(ds_k_sample_logits(q, ld, NULL, g->samp, R, V, q, ld, g->u + (size_t)k * S, ids, t->stream));
        }
        prev = ids;
    }
    if (g->conf_w) {   /* join the confidence heads' branch (a capture must end joined) */
        CK(cudaEventRecord(g->joined, g->side));
        CK(cudaStreamWaitEvent(t->stream, g->joined, 0));
    }
    return r;
}

struct phase_args {
    struct ds_cuda_draft *g;
    int R;
    bool sampled, argmax;
};

static int enqueue_phase_args(void *arg)
{
    const struct phase_args *a = arg;
    return enqueue_phase(a->g, a->R, a->sampled, a->argmax);
}

/* Run a draft phase whose metadata is uploaded (a shape seen before replays
 * its graph, captured on its second round) and copy drafts, z and p back. */
static int run_phase(struct ds_cuda_draft *g, int R, bool sampled, bool argmax, int32_t *drafts, float *z, float *p)
{
    struct ds_cuda_target *t = g->t;
    int gm = g->g, S = g->max_seqs, r;
    struct draft_graph *hit = NULL, *victim = &g->graphs[0];
    for (int i = 0; i < DRAFT_GRAPHS && t->opts.graphs; i++) {
        if (g->graphs[i].last_use && g->graphs[i].R == R && g->graphs[i].sampled == sampled &&
            g->graphs[i].argmax == argmax) {
            hit = &g->graphs[i];
            break;
        }
        if (g->graphs[i].last_use < victim->last_use)
            victim = &g->graphs[i];
    }
    if (!t->opts.graphs) {
        r = enqueue_phase(g, R, sampled, argmax);
    } else if (!hit) {
        if (victim->exec)
            cudaGraphExecDestroy(victim->exec);
        memset(victim, 0, sizeof *victim);
        victim->R = R;
        victim->sampled = sampled;
        victim->argmax = argmax;
        victim->last_use = ++g->uses;
        r = enqueue_phase(g, R, sampled, argmax);
    } else {
        hit->last_use = ++g->uses;
        if (!hit->exec) {
            struct phase_args a = {g, R, sampled, argmax};
            if ((r = ds_cu_capture(t->stream, enqueue_phase_args, &a, &hit->exec)) < 0)
                return r;
        }
        CK(cudaGraphLaunch(hit->exec, t->stream));
        r = 0;
    }
    if (r < 0)
        return r;
    int32_t *h_ids = g->h_meta + meta_prev(g);   /* [γ, S] staging, then [R, γ] out */
    CK(cudaMemcpyAsync(h_ids, g->ids_all, (size_t)gm * S * 4, cudaMemcpyDeviceToHost, t->stream));
    if (g->conf_w && z)
        CK(cudaMemcpyAsync(g->h_z, g->z_all, (size_t)gm * S * 4, cudaMemcpyDeviceToHost, t->stream));
    if (p)
        CK(cudaMemcpyAsync(g->h_p, g->p_all, (size_t)gm * S * 4, cudaMemcpyDeviceToHost, t->stream));
    CK(cudaStreamSynchronize(t->stream));
    for (int i = 0; i < R; i++)
        for (int k = 0; k < gm; k++) {
            int32_t id = h_ids[(size_t)k * S + i];
            drafts[(size_t)i * gm + k] = id >= 0 && id < g->V ? id : 0;   /* NaN logits: any token is a valid draft */
            if (z)
                z[(size_t)i * gm + k] = g->conf_w ? g->h_z[(size_t)k * S + i] : NAN;
            if (p)
                p[(size_t)i * gm + k] = g->h_p[(size_t)k * S + i];
        }
    g->R = R;
    g->q_ready = sampled;
    g->base_ready = false;
    return 0;
}

int ds_cuda_draft_greedy(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R, struct ds_kv_seq *const *kv,
                         const int32_t *anchor, const int32_t *start, int32_t *drafts, float *z, float *p)
{
    int r;
    if (R <= 0)
        return 0;
    g->q_ready = g->base_ready = false;
    if ((r = block_meta(g, pool, R, kv, anchor, start)) < 0)
        return r;
    return run_phase(g, R, false, true, drafts, z, p);
}

int ds_cuda_draft_sample(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R, struct ds_kv_seq *const *kv,
                         const int32_t *anchor, const int32_t *start, const struct ds_sampling *s, int32_t *drafts,
                         float *z, float *p)
{
    struct ds_cuda_target *t = g->t;
    int gm = g->g, S = g->max_seqs, r;
    if (R <= 0)
        return 0;
    g->q_ready = g->base_ready = false;
    if ((r = block_meta(g, pool, R, kv, anchor, start)) < 0)
        return r;
    for (int i = 0; i < R; i++) {
        g->h_samp[i] = (struct ds_k_sampling){.temperature = s[i].temperature, .top_p = s[i].top_p,
                                              .top_k = s[i].top_k};
        for (int k = 0; k < gm; k++)
            g->h_u[(size_t)k * S + i] = ds_uniform(s[i].seed, (uint64_t)(start[i] + k + 1), DS_SLOT_DRAFT);
    }
    CK(cudaMemcpyAsync(g->samp, g->h_samp, (size_t)R * sizeof *g->samp, cudaMemcpyHostToDevice, t->stream));
    CK(cudaMemcpyAsync(g->u, g->h_u, (size_t)gm * S * 4, cudaMemcpyHostToDevice, t->stream));
    bool any_greedy = false;   /* only greedy rows use the argmax's probability */
    for (int i = 0; i < R; i++)
        any_greedy |= ds_sampling_is_greedy(&s[i]);
    if ((r = run_phase(g, R, true, any_greedy, drafts, z, p)) < 0 || !p)
        return r;
    for (int i = 0; i < R; i++)   /* a drawn token's probability is not the argmax's */
        if (!ds_sampling_is_greedy(&s[i]))
            for (int k = 0; k < gm; k++)
                p[(size_t)i * gm + k] = NAN;
    return 0;
}

const float *ds_cu_draft_q(const struct ds_cuda_draft *g, int *ret_blocks, int *ret_gamma)
{
    *ret_blocks = g->q_ready ? g->R : 0;
    *ret_gamma = g->g;
    return g->q_ready ? g->U : NULL;
}
