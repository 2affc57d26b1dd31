/* cuda-impl.h: the CUDA backend's private structures and helpers, shared by
 * the target (forward-cuda.c) and the draft (draft-cuda.c). */
#ifndef DS_CUDA_IMPL_H
#define DS_CUDA_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "dspark/ds-cuda.h"
#include "dspark/ds-gemm.h"

#define CK(call)                                                                                               \
    do {                                                                                                       \
        cudaError_t e_ = (call);                                                                               \
        if (e_ != cudaSuccess)                                                                                 \
            return ds_seterr(DS_ECUDA, "%s: %s (%s:%d)", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
    } while (0)

struct cu_mat {
    uint16_t *w;          /* [n, k] bf16, row-major */
    int n, k;
    int split;            /* k split of the invariant product */
};

struct cu_layer {
    float *attn_norm, *ffn_norm;  /* [H] */
    float *q_norm, *k_norm;       /* [hd] */
    float *qkv_bias;              /* [(nH + 2 nKV) hd] or NULL */
    float *o_bias;                /* [H] or NULL */
    struct cu_mat qkv, o, gate_up, down;
};

#define GRAPH_SLOTS 32
/* offset of the page table in the metadata of passes of up to cap tokens */
#define META_PAGES(cap) (6 * (size_t)(cap) + 1)

struct graph_slot {
    int n_tokens, n_logits, n_capture, att_longest;
    bool argmax;
    int capture_layers[8];
    cudaGraphExec_t exec;         /* NULL until the shape's second pass */
    long last_use;                /* 0: free slot */
};

struct ds_cuda_target {
    struct ds_qwen3_config cfg;
    struct ds_cuda_opts opts;
    int n_sm;
    cudaStream_t stream;
    cudaEvent_t meta_sent;        /* after the last pass's metadata copy: h_meta may be rewritten */
    cublasHandle_t cublas;
    void *cublas_ws;
    struct ds_k_gemm_lt *lt;      /* cuBLASLt for the invariant products; NULL: the kernels alone */
    size_t weight_bytes;
    uint16_t *embed;              /* [V, H] bf16 */
    struct cu_layer *layers;      /* [L] */
    float *final_norm;            /* [H] */
    struct cu_mat lm_head;        /* [V, H] (shares embed when tied) */
    float *inv_freq;              /* [hd / 2] */
    /* KV cache */
    uint16_t *k_cache, *v_cache;  /* [L, n_pages, page_size, nKV, hd] bf16 */
    int n_pages, page_size, max_pages;
    /* activations, for passes of up to cap_tokens tokens, cap_rows logits, cap_seqs sequences */
    int cap_tokens, cap_rows, cap_seqs, cap_capture;
    float *x;                     /* [cap_tokens, H] residual stream */
    uint16_t *xn;                 /* [cap_tokens, max(H, I)] bf16 input of a product */
    float *qkv;                   /* [cap_tokens, (nH + 2 nKV) hd] */
    uint16_t *attn;               /* [cap_tokens, nH hd] bf16 */
    float *gu;                    /* [cap_tokens, 2 I] */
    float *ws;                    /* split-k partials */
    float *att_ws;                /* attention partials */
    size_t ws_floats;
    uint16_t *rows;               /* [cap_rows, H] normed rows for the head */
    float *logits;                /* [cap_rows, V] */
    int32_t *ids;                 /* [cap_rows] argmax of each logits row */
    float *captured;              /* [cap_tokens, cap_capture, H] */
    int32_t *meta;                /* device: tokens, pos, seq, rows, run starts, run lengths [cap_tokens each],
                                   * the run count [1], pages [cap_seqs, max_pages] */
    int32_t *h_meta;              /* pinned host copy */
    size_t meta_ints;
    int att_longest;              /* the longest attention run of the uploaded pass (picks a block shape) */
    struct graph_slot graphs[GRAPH_SLOTS];
    long uses;
    int last_rows;                /* logits rows of the last pass */
    uint64_t logits_to_host;      /* bytes of logits rows copied to the host (passes and draft steps) */
    uint64_t verify_rows;         /* rows the device verifies have sampled (one per chain and draft, and the bonus) */
    uint64_t distribution_rows;   /* ... of them, those whose whole distribution the accept needed */
    /* device sampling, for up to cap_rows rows and chains (samp_layout): rows [cap_rows] int32
     * and params [cap_rows] ds_k_sampling of the distributions to compute; chains [cap_rows]
     * ds_k_chain and chain_params [cap_rows] ds_k_sampling; the screen's status [cap_rows,
     * DS_K_MAX_CHAIN] uint8; n_rows [1] int32; accepted and next [cap_rows] int32 */
    void *samp, *h_samp;          /* device, pinned host */
};

/* cudaMalloc with a message naming what the memory is for (bytes 0: NULL). */
int ds_cu_alloc(void *ptr, size_t bytes, const char *what) DS_MUSTCHECK;
/* Allocate n floats on the device and copy src there. */
int ds_cu_upload_f32(float **dst, const float *src, size_t n, const char *what) DS_MUSTCHECK;
/* Unpack a host panel matrix into bf16 rows on the device. */
int ds_cu_upload_mat(struct ds_cuda_target *t, struct cu_mat *dm, const struct ds_mat *hm, const char *what)
    DS_MUSTCHECK;
/* Round n floats to bf16 and upload them (counted in t's weight bytes). */
int ds_cu_upload_bf16(struct ds_cuda_target *t, uint16_t **dst, const float *src, size_t n, const char *what)
    DS_MUSTCHECK;
/* Random device weights for benchmarks: an [n, k] bf16 matrix uniform in ±1/√k (counted in
 * t's weight bytes), or n floats center ± scale. */
int ds_cu_random_mat(struct ds_cuda_target *t, struct cu_mat *dm, int n, int k, uint64_t seed, const char *what)
    DS_MUSTCHECK;
int ds_cu_random_vec(struct ds_cuda_target *t, float **dst, size_t n, uint64_t seed, float center, float scale,
                     const char *what) DS_MUSTCHECK;
/* Free a layer's device arrays (its struct stays). */
void ds_cu_layer_free(struct cu_layer *l);
/* y[M, m->n] (+)= x[M, m->k] · m^T on t's stream: the invariant product (split-k
 * partials in ws, ds_k_gemm_workspace floats), or cuBLAS when t asks for it. */
int ds_cu_gemm(struct ds_cuda_target *t, float *ws, const struct cu_mat *m, const uint16_t *x, int ldx, int M, float *y,
               int ldy, bool accumulate) DS_MUSTCHECK;
struct ds_k_x;
/* The same on a made x (kernels.h's ds_k_x: rows normalized or SwiGLU'd on the way in). */
int ds_cu_gemm_x(struct ds_cuda_target *t, float *ws, const struct cu_mat *m, const struct ds_k_x *x, int M, float *y,
                 int ldy, bool accumulate) DS_MUSTCHECK;

/* One transformer layer's pass over n tokens, for the target and the draft
 * alike: the buffers and the pass's device metadata (attention positions att_pos
 * may differ from the RoPE/cache positions pos: the draft block attends up to
 * its last row). */
struct cu_layer_pass {
    int n, H, I, nH, nKV, hd;
    float eps;
    float *x;                      /* [n, H] residual stream */
    uint16_t *xn;                  /* [n, max(H, I)] */
    float *qkv;                    /* [n, (nH + 2 nKV) hd] */
    uint16_t *attn;                /* [n, nH hd] */
    float *gu;                     /* [n, 2 I] (may be qkv's buffer) */
    float *ws, *att_ws;            /* product and attention workspaces */
    const float *inv_freq;         /* [hd / 2] */
    const int32_t *seq, *pos, *att_pos, *run_start, *run_len, *n_runs, *pages;   /* device metadata */
    int att_longest;
};
/* The layer's kernels on t's stream; its K/V go to the caches kc/vc (t's page layout). */
int ds_cu_enqueue_layer(struct ds_cuda_target *t, const struct cu_layer *l, uint16_t *kc, uint16_t *vc,
                        const struct cu_layer_pass *p) DS_MUSTCHECK;

/* The draft distributions of the draft's last ds_cuda_draft_sample: rows
 * [blocks, γ, V] (NULL when the last phase did not sample); *ret_blocks and
 * *ret_gamma give the shape. */
const float *ds_cu_draft_q(const struct ds_cuda_draft *g, int *ret_blocks, int *ret_gamma);

/* Capture what enqueue(arg) puts on stream as a CUDA graph, ready to launch. */
int ds_cu_capture(cudaStream_t stream, int (*enqueue)(void *arg), void *arg, cudaGraphExec_t *ret) DS_MUSTCHECK;

#endif
