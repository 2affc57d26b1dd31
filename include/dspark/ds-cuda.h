/* ds-cuda.h: the CUDA backend of the target model: bf16 weights and a bf16
 * paged KV cache on one GPU, and the same forward pass as ds_model_forward
 * (a flattened ragged batch, logits for chosen rows, captured layer outputs).
 *
 * The host keeps the page bookkeeping (struct ds_kv_pool made with
 * ds_kv_pool_init_pages, the sequences' page lists); the device holds the K/V
 * rows of those pages. Every product is batch-invariant by default (the
 * in-house bf16 kernels, and cuBLASLt algorithms that give their bits), so a
 * token's logits do not depend on the rest of its pass (lossless speculation
 * at bf16 needs that); `cublas` trades that for cuBLAS's fastest algorithms.
 * Available only in builds configured --with-cuda; elsewhere every function
 * fails with DS_ENOTSUP. */
#ifndef DS_CUDA_H
#define DS_CUDA_H

#include <stdbool.h>
#include <stdint.h>

#include "dspark/ds-config.h"
#include "dspark/ds-draft.h"
#include "dspark/ds-err.h"
#include "dspark/ds-model.h"
#include "dspark/ds-sampler.h"

struct ds_cuda_target;
struct ds_cuda_draft;
struct ds_engine;

struct ds_cuda_opts {
    int device;              /* CUDA device index */
    bool cublas;             /* products through cuBLAS (not batch-invariant) */
    bool kernels_only;       /* invariant products through the in-house kernels alone, never cuBLASLt
                              * (the same bits, slower: for comparisons) */
    bool graphs;             /* replay CUDA graphs of earlier passes with the same shape */
    int max_ranges;          /* products split k into at most this many ranges (0: as many as decoding's
                              * one row fills the GPU with); fewer: faster large passes, slower small ones */
};

/* True when this build has the backend and a CUDA device is present. */
bool ds_cuda_available(void);
/* "NVIDIA H200, 139.8 GiB, sm_90" or the reason there is none. */
void ds_cuda_describe(int device, char *buf, size_t cap);

/* Upload a loaded model, its weights rounded to bf16. */
int ds_cuda_target_new(const struct ds_model *m, const struct ds_cuda_opts *o, struct ds_cuda_target **ret)
    DS_MUSTCHECK;
/* A model of the given shape with random bf16 weights made on the device (benchmarks). */
int ds_cuda_target_new_random(const struct ds_qwen3_config *cfg, uint64_t seed, const struct ds_cuda_opts *o,
                              struct ds_cuda_target **ret) DS_MUSTCHECK;
struct ds_cuda_target *ds_cuda_target_free(struct ds_cuda_target *t);

/* Switch the products between batch-invariant and cuBLAS, and the invariant ones between
 * cuBLASLt-where-it-serves and the kernels alone (drops captured graphs). */
int ds_cuda_set_products(struct ds_cuda_target *t, bool cublas, bool kernels_only) DS_MUSTCHECK;
/* Passes of at least min_rows rows (0: none; negative: the default) run a split product's k ranges one after another through
 * cuBLASLt instead of as one batch (the same bits; benchmarks compare the two). Drops captured graphs. */
void ds_cuda_set_in_turn_rows(struct ds_cuda_target *t, int min_rows);

/* Bytes of the weights on the device, and of one KV page (K and V, every layer). */
size_t ds_cuda_weight_bytes(const struct ds_cuda_target *t);
size_t ds_cuda_page_bytes(const struct ds_cuda_target *t, int page_size);
/* Pages that fraction of the device's free memory holds, leaving room for the
 * activations of passes of up to max_tokens tokens; each page also costs
 * extra_page_bytes (the draft's context cache: ds_cuda_draft_page_bytes). */
long ds_cuda_pages_for_memory(const struct ds_cuda_target *t, int page_size, double fraction, int max_tokens,
                              size_t extra_page_bytes);
/* Allocate the device KV cache: n_pages pages of page_size positions; a
 * sequence may hold at most max_pages_per_seq pages. */
int ds_cuda_kv_alloc(struct ds_cuda_target *t, int n_pages, int page_size, int max_pages_per_seq) DS_MUSTCHECK;
/* Allocate the activations of passes of up to max_tokens tokens over up to
 * max_seqs sequences with n_capture captured layers now, so that later passes
 * allocate nothing (larger passes still grow the buffers). */
int ds_cuda_reserve(struct ds_cuda_target *t, int max_tokens, int max_seqs, int n_capture) DS_MUSTCHECK;
/* Fill the whole KV cache with random values (benchmarks: no timing on zeros). */
int ds_cuda_kv_fill_random(struct ds_cuda_target *t, uint64_t seed) DS_MUSTCHECK;

/* ds_model_forward on the GPU: pool is the host bookkeeping of the device
 * cache. Logits, their argmax and captures are copied to b->logits,
 * b->argmax and b->captured (b->logits NULL: computed on the device and not
 * copied, so greedy passes, and sampled ones drawn with ds_cuda_sample, move
 * only token ids). It returns once those copies are on the host; a pass that
 * copies nothing may return while it still runs on the GPU, ordered before
 * whatever t runs next (ds_cuda_sync waits for it). */
int ds_cuda_forward(struct ds_cuda_target *t, const struct ds_kv_pool *pool, const struct ds_batch *b)
    DS_MUSTCHECK;
/* Wait until everything t's stream holds (passes, the draft's work) has run. */
int ds_cuda_sync(struct ds_cuda_target *t) DS_MUSTCHECK;

/* One sequence's draws from the logits of the last pass: a plain draw (len 0)
 * or the verification of len drafts (the chain of spec.c: accept draft k while
 * u_accept · max(q[d_k], 1e-8) < p[d_k], a rejection draws the correction from
 * norm(max(0, p - q)), all accepted draws the bonus from p). p is the sampling
 * distribution of logits rows row .. row + len; q comes from the draft's last
 * ds_cuda_draft_sample, block row q_block. The uniforms are ds_uniform(seed,
 * position + k, DS_SLOT_ACCEPT / DS_SLOT_TARGET) for the token drawn at row
 * row + k. */
struct ds_cuda_chain {
    int row;                     /* first logits row of the last pass */
    int len;                     /* drafts to verify, 0..DS_MAX_BLOCK */
    const int32_t *drafts;       /* [len] (host) */
    int q_block;                 /* the drafts' block row in the draft's last sampled phase */
    struct ds_sampling sampling;
    uint64_t position;           /* position of the token drawn from row `row` */
};

/* Draw n chains on the GPU from the logits the last ds_cuda_forward left
 * there (the rows are turned into probabilities in place): accepted[i] drafts
 * of chain i are accepted and next[i] follows them. g is the draft whose q
 * the chains verify (NULL when every len is 0). Only ids cross to the host. */
int ds_cuda_sample(struct ds_cuda_target *t, const struct ds_cuda_draft *g, int n, const struct ds_cuda_chain *c,
                   int32_t *accepted /* [n] */, int32_t *next /* [n] */) DS_MUSTCHECK;

/* Bytes of full-vocabulary logits copied from the GPU to the host so far by
 * t's passes and its draft's steps (tests: steady-state sampling copies none). */
uint64_t ds_cuda_logits_to_host(const struct ds_cuda_target *t);
/* Rows ds_cuda_sample has verified so far (a chain's drafts and its bonus)
 * and, of them, those whose whole sampling distribution it computed (the rest
 * were settled by the screen's bounds). */
void ds_cuda_verify_rows(const struct ds_cuda_target *t, uint64_t *rows, uint64_t *distributions);
/* The engine's CUDA target (NULL on the CPU backend). */
struct ds_cuda_target *ds_engine_cuda_target(struct ds_engine *e);

/* Time the device part of a pass of batch b (metadata uploaded once, then
 * reps passes, each as one CUDA graph replay when graph is true): the median
 * milliseconds per pass go to *ret_ms. */
int ds_cuda_time_forward(struct ds_cuda_target *t, const struct ds_kv_pool *pool, const struct ds_batch *b, int reps,
                         bool graph, double *ret_ms) DS_MUSTCHECK;
/* ---- the DSpark draft on the target's GPU ----
 * The draft's context cache is paged like the target's and uses the same page
 * tables (the same positions, its own rows), so a sequence's KV reservation
 * covers both. Draft work runs on the target's stream. */

/* Bytes of one page of the draft's context cache (K and V, every draft layer). */
size_t ds_cuda_draft_page_bytes(const struct ds_draft *d, int page_size);
/* Upload a loaded draft next to target t (after ds_cuda_kv_alloc and
 * ds_cuda_reserve), for blocks of up to max_seqs sequences. The draft shares
 * t's embedding and head when it shares the host model's. */
int ds_cuda_draft_new(struct ds_cuda_target *t, const struct ds_draft *d, int max_seqs, struct ds_cuda_draft **ret)
    DS_MUSTCHECK;
/* A draft of the given shape with random bf16 weights made on the device,
 * sharing t's embedding and head (benchmarks). */
int ds_cuda_draft_new_random(struct ds_cuda_target *t, const struct ds_dspark_config *cfg, uint64_t seed,
                             int max_seqs, struct ds_cuda_draft **ret) DS_MUSTCHECK;
struct ds_cuda_draft *ds_cuda_draft_free(struct ds_cuda_draft *g);
/* Extend draft contexts with n rows of the last target pass (which captured
 * the draft's layers): batch row rows[i] is position pos[i] of sequence kv[i].
 * Returns once the work is queued on t's stream (the next call that needs
 * it waits there; ds_cuda_sync waits for it). A position past what a round
 * commits may be written too: the sequence's next block writes its own keys
 * and values there before anything reads them. */
int ds_cuda_draft_context(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int n, const int32_t *rows /* [n] */,
                          struct ds_kv_seq *const *kv /* [n] */, const int32_t *pos /* [n] */) DS_MUSTCHECK;
/* Run the draft blocks of R sequences: anchor[i] at position start[i] (its
 * context length) then γ−1 masks. The states and base logits stay on the GPU
 * for ds_cuda_draft_step. */
int ds_cuda_draft_block(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R,
                        struct ds_kv_seq *const *kv /* [R] */, const int32_t *anchor /* [R] */,
                        const int32_t *start /* [R] */) DS_MUSTCHECK;
/* Markov position k (0-based) of the last blocks, given the token before it
 * (prev: the anchor for k = 0, then the chosen drafts): ids gets the argmax of
 * the corrected logits, z the raw confidence logits (NaN without a confidence
 * head; z may be NULL), logits the corrected logits (NULL: they stay on the GPU).
 * Only after ds_cuda_draft_block: a greedy or sampled phase below consumes its
 * blocks' base logits (each position is corrected in place), and DS_EINVAL
 * refuses a step after one. */
int ds_cuda_draft_step(struct ds_cuda_draft *g, int k, const int32_t *prev /* [R] */, int32_t *ids /* [R] */,
                       float *z /* [R] */, float *logits /* [R, V] */) DS_MUSTCHECK;

/* ds_cuda_draft_block and all γ positions for rows that all decode greedily,
 * each position's argmax feeding the next on the device (one CUDA graph per
 * R, replayed from the shape's second round): drafts [R, γ], z [R, γ] (NaN
 * without a confidence head) and p [R, γ], the draft's probability of each
 * draft at temperature 1, come back in one copy (z, p may be NULL). */
int ds_cuda_draft_greedy(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R,
                         struct ds_kv_seq *const *kv /* [R] */, const int32_t *anchor /* [R] */,
                         const int32_t *start /* [R] */, int32_t *drafts /* [R, γ] */, float *z /* [R, γ] */,
                         float *p /* [R, γ] */) DS_MUSTCHECK;

/* The draft phase for rows that may sample: ds_cuda_draft_block and the γ
 * positions chained on the device, row i drawing position k from the sampling
 * distribution q of its corrected logits (s[i]; greedy rows: the argmax) with
 * the uniform ds_uniform(s[i].seed, start[i] + k + 1, DS_SLOT_DRAFT). The q
 * stay on the GPU (in the block's base-logit rows, which they replace) for
 * ds_cuda_sample; drafts [R, γ], z [R, γ] and p [R, γ] (as ds_cuda_draft_greedy;
 * NaN for the rows that sample) come back in one copy (one CUDA graph per R,
 * as ds_cuda_draft_greedy). */
int ds_cuda_draft_sample(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R,
                         struct ds_kv_seq *const *kv /* [R] */, const int32_t *anchor /* [R] */,
                         const int32_t *start /* [R] */, const struct ds_sampling *s /* [R] */,
                         int32_t *drafts /* [R, γ] */, float *z /* [R, γ] */, float *p /* [R, γ] */) DS_MUSTCHECK;

/* Device-to-device copy bandwidth in bytes per second (bytes read + written),
 * over a buffer of the given size; the median of reps copies. */
int ds_cuda_copy_bandwidth(size_t bytes, int reps, double *ret_bps) DS_MUSTCHECK;

#endif
