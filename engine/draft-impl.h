/* draft-impl.h: the DSpark draft's private structures (draft.c) and the
 * per-sequence context cache that spec.c drives. */
#ifndef DS_DRAFT_IMPL_H
#define DS_DRAFT_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "dspark/ds-config.h"
#include "dspark/ds-draft.h"
#include "dspark/ds-engine.h"
#include "dspark/ds-gemm.h"
#include "dspark/ds-sampler.h"

#define DS_STS_MAX 8

struct ds_draft_layer {
    float *attn_norm, *ffn_norm;     /* [H] */
    float *q_norm, *k_norm;          /* [hd] */
    struct ds_mat qkv;               /* [(nH + 2 nKV) hd, H] block projections */
    struct ds_mat o;                 /* [H, nH hd] */
    struct ds_mat gate_up;           /* [2 I, H] */
    struct ds_mat down;              /* [H, I] */
};

struct ds_draft {
    struct ds_dspark_config cfg;     /* cfg.base: sizes; cfg.base.num_hidden_layers = draft layers */
    char dir[4096];
    char checksum[17];
    int gamma, H, V, m, r, n_layers, nH, nKV, hd, I;
    const float *embed;              /* [V, H] (the target's, or own_embed) */
    float *own_embed;                /* [V, H] or NULL */
    const struct ds_mat *lm_head;    /* [V, H] (the target's, or &own_lm_head) */
    struct ds_mat own_lm_head;
    struct ds_mat fc;                /* [H, m H] */
    float *hidden_norm;              /* [H] */
    struct ds_draft_layer *layers;   /* [n_layers] */
    struct ds_mat ctx_kv;            /* [n_layers * 2 * nKV hd, H]: per layer k_proj then v_proj */
    float *final_norm;               /* [H] */
    float *inv_freq;                 /* [hd / 2] */
    /* Markov head (r > 0) */
    float *w1;                       /* [V, r] embedding table */
    struct ds_mat w2;                /* [V, r] */
    struct ds_mat gate;              /* gated: [r, H + r] */
    float *gate_bias;                /* [r] */
    struct ds_mat joint;             /* rnn: [3 r, 2 r + H] */
    float *joint_bias;               /* [3 r] */
    /* confidence head */
    float *conf_w;                   /* [H + r] or [H] */
    float conf_b;
    bool released;                   /* host weights freed (ds_draft_release_weights) */
    /* STS: per-position temperatures for some sampling temperatures */
    int n_sts;
    float sts_at[DS_STS_MAX];        /* sampling temperature of each set */
    float sts_t[DS_STS_MAX][DS_MAX_BLOCK]; /* [n_sts, gamma] */
    bool sts_has_map[DS_STS_MAX];    /* set i also maps (z, p) to a confidence */
    float sts_map[DS_STS_MAX][DS_MAX_BLOCK][3]; /* [n_sts, gamma, (alpha, beta, gamma)] */
};

/* Context cache of one sequence: K/V of every committed position, all layers. */
struct ds_draft_cache {
    float *k, *v;                    /* [cap, n_layers, nKV hd] post-norm, post-RoPE keys; values */
    int len, cap;
};

#endif
