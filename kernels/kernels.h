/* kernels.h: C-callable launchers of the CUDA kernels.
 *
 * bf16 tensors are passed as uint16_t pointers holding the raw bit patterns.
 *
 * Every launcher enqueues its work on the given stream and returns the launch
 * status (cudaSuccess, or cudaErrorInvalidValue for shapes it does not
 * support; nothing is launched then). All pointers are device pointers unless
 * said otherwise. Every reduction runs in a fixed order that depends only on
 * the row's own shape (hidden size, head_dim, context length), never on how
 * many rows share the launch: a row's result is bit-identical whatever else is
 * in the batch.
 *
 * Paged KV cache, one layer: k_cache and v_cache are
 * [n_pages, page_size, n_kv_heads, head_dim] (the CPU pool's layout with the
 * layer offset already applied). page_table is [n_seqs, max_pages]: row s holds
 * the page ids of sequence s for positions 0, page_size, 2 page_size, ... */
#ifndef DS_KERNELS_H
#define DS_KERNELS_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* out[t] = table[tokens[t]] as f32; ids outside [0, V) give a row of zeros. */
cudaError_t ds_k_embed_f32(const float *table /* [V, H] */, const int32_t *tokens /* [n] */, int n, int H, int V,
                           float *out /* [n, H] */, cudaStream_t stream);
/* The same from a bf16 table, given as raw 16-bit patterns. */
cudaError_t ds_k_embed_bf16(const uint16_t *table /* [V, H] */, const int32_t *tokens /* [n] */, int n, int H,
                            int V, float *out /* [n, H] */, cudaStream_t stream);

/* out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps), per row; out may equal x.
 * When H % 4 == 0, x and w must be 16-byte aligned (so must a bf16 out, to 8). */
cudaError_t ds_k_rmsnorm(const float *x /* [n, H] */, const float *w /* [H] */, int n, int H, float eps,
                         float *out /* [n, H] */, cudaStream_t stream);
/* x[t] += y[t], then out[t] = rmsnorm(x[t]) as above (the residual add fused with the next norm). */
cudaError_t ds_k_add_rmsnorm(float *x /* [n, H] in/out */, const float *y /* [n, H] */, const float *w /* [H] */,
                             int n, int H, float eps, float *out /* [n, H] */, cudaStream_t stream);

/* In place, per token t and head: RMSNorm over head_dim with q_norm (k_norm),
 * then rotate-half RoPE at position pos[t]: for i < hd/2, angle = pos * inv_freq[i],
 * (a, b) = (x[i], x[i + hd/2]) becomes (a cos - b sin, b cos + a sin).
 * Head h of token t starts at q + t * ldq + h * hd (k likewise with ldk), so
 * q and k may point into one fused qkv row. hd must be even. nH may be 0 (keys only). */
cudaError_t ds_k_qk_norm_rope(float *q /* [n, ldq] holding [nH, hd] */, int ldq,
                              float *k /* [n, ldk] holding [nKV, hd] */, int ldk,
                              const float *q_norm /* [hd] */, const float *k_norm /* [hd] */,
                              const float *inv_freq /* [hd / 2] */, const int32_t *pos /* [n] */, int n, int nH,
                              int nKV, int hd, float eps, cudaStream_t stream);

/* Copy each token's K and V rows into its slot: sequence seq[t], position pos[t]. */
cudaError_t ds_k_kv_append(const float *k /* [n, ldk] holding [nKV, hd] */, int ldk,
                           const float *v /* [n, ldv] holding [nKV, hd] */, int ldv,
                           const int32_t *seq /* [n] */, const int32_t *pos /* [n] */,
                           const int32_t *page_table /* [n_seqs, max_pages] */, int max_pages, int page_size,
                           int n, int nKV, int hd, float *k_cache /* [n_pages, page_size, nKV, hd] */,
                           float *v_cache /* [n_pages, page_size, nKV, hd] */, cudaStream_t stream);

/* Causal attention over a flattened ragged batch: token t of sequence seq[t]
 * at position pos[t] attends to positions 0..pos[t] of that sequence, read
 * from the paged cache (so append the batch's own K/V first). Query head h
 * uses KV head h / (nH / nKV). Scores are q.k * scale; softmax and the value
 * sum accumulate in f32 with an online softmax in a fixed order (see
 * attention.cu). The batch is cut into runs of consecutive rows of one
 * sequence by ds_k_attention_runs (on the host; *n_runs on the device; longest,
 * the longest run, only picks the block shape, never the arithmetic); hd at
 * most 256, nH / nKV at most 32; ws holds ds_k_attention_workspace(n, nH, hd)
 * floats. */
size_t ds_k_attention_workspace(int n, int nH, int hd);
/* Host: cut a batch into runs; returns their count (at most n) and the longest run's length
 * in *ret_longest (may be NULL). */
int ds_k_attention_runs(const int32_t *seq /* [n] */, int n, int nH, int nKV, int32_t *run_start /* [n] */,
                        int32_t *run_len /* [n] */, int *ret_longest);
cudaError_t ds_k_attention(const float *q /* [n, ldq] holding [nH, hd] */, int ldq,
                           const float *k_cache /* [n_pages, page_size, nKV, hd] */,
                           const float *v_cache /* [n_pages, page_size, nKV, hd] */,
                           const int32_t *seq /* [n] */, const int32_t *pos /* [n] */,
                           const int32_t *run_start /* [n_runs] */, const int32_t *run_len /* [n_runs] */,
                           const int32_t *n_runs /* [1] */, int longest,
                           const int32_t *page_table /* [n_seqs, max_pages] */, int max_pages, int page_size, int n,
                           int nH, int nKV, int hd, float scale, float *ws, float *out /* [n, nH * hd] */,
                           cudaStream_t stream);

/* out[t, i] = silu(gate[t, i]) * up[t, i], with gu[t] = [gate (I), up (I)]. */
cudaError_t ds_k_swiglu(const float *gu /* [n, 2 I] */, int n, int I, float *out /* [n, I] */,
                        cudaStream_t stream);

/* out[t] = the index of the largest x[t, i]; ties go to the lowest index
 * (rows holding NaN give an unspecified index). Row t starts at x + t ldx. */
cudaError_t ds_k_argmax(const float *x /* [n, ldx] */, int ldx, int n, int V, int32_t *out /* [n] */,
                        cudaStream_t stream);
/* ds_k_argmax, and p[t] = softmax(x[t])[out[t]] at temperature 1 (NaN for rows without a maximum). */
cudaError_t ds_k_argmax_prob(const float *x /* [n, ldx] */, int ldx, int n, int V, int32_t *out /* [n] */,
                             float *p /* [n] */, cudaStream_t stream);

/* ---- bf16 variants used by the CUDA backend ---- */
/* out[i] = rmsnorm(x[rows[i]]) rounded to bf16 (rows NULL: row i), the same
 * reduction order as ds_k_rmsnorm. */
cudaError_t ds_k_rmsnorm_bf16(const float *x /* [*, H] */, const int32_t *rows /* [n] or NULL */,
                              const float *w /* [H] */, int n, int H, float eps, uint16_t *out /* [n, H] */,
                              cudaStream_t stream);
/* SwiGLU as ds_k_swiglu, rounded to bf16 (n I below 2^31, else cudaErrorInvalidValue). */
cudaError_t ds_k_swiglu_bf16(const float *gu /* [n, 2 I] */, int n, int I, uint16_t *out /* [n, I] */,
                             cudaStream_t stream);
/* y[t, i] += bias[i]. */
cudaError_t ds_k_add_bias(float *y /* [n, ldy] */, int ldy, const float *bias /* [N] */, int n, int N,
                          cudaStream_t stream);
/* ds_k_qk_norm_rope, and in the same launch ds_k_kv_append_bf16 of the
 * rotated k heads and of the v heads: the same bits as the two launches. */
cudaError_t ds_k_qk_norm_rope_append_bf16(float *q /* [n, ldq] holding [nH, hd] */, int ldq,
                                          float *k /* [n, ldk] holding [nKV, hd] */, int ldk,
                                          const float *v /* [n, ldv] holding [nKV, hd] */, int ldv,
                                          const float *q_norm /* [hd] */, const float *k_norm /* [hd] */,
                                          const float *inv_freq /* [hd / 2] */, const int32_t *pos /* [n] */,
                                          const int32_t *seq /* [n] */,
                                          const int32_t *page_table /* [n_seqs, max_pages] */, int max_pages,
                                          int page_size, int n, int nH, int nKV, int hd, float eps,
                                          uint16_t *k_cache /* [n_pages, page_size, nKV, hd] */,
                                          uint16_t *v_cache /* [n_pages, page_size, nKV, hd] */,
                                          cudaStream_t stream);
/* ds_k_qk_norm_rope_append_bf16's keys-only form (nH 0) for several layers'
 * k and v heads in one launch, as the draft's context rows hold them: layer
 * l's [nKV, hd] k heads at k + l ld_layer in each row (its v heads at v + l
 * ld_layer), its norm weights at k_norms + l hd, its caches at k_cache and
 * v_cache + l cache_layer. Each layer's bits are those of its own launch. */
cudaError_t ds_k_k_norm_rope_append_layers_bf16(float *k /* [n, ld] */, const float *v /* [n, ld] */, int ld,
                                                int layers, int ld_layer, const float *k_norms /* [layers, hd] */,
                                                const float *inv_freq /* [hd / 2] */, const int32_t *pos /* [n] */,
                                                const int32_t *seq /* [n] */,
                                                const int32_t *page_table /* [n_seqs, max_pages] */, int max_pages,
                                                int page_size, int n, int nKV, int hd, float eps,
                                                uint16_t *k_cache /* [layers, cache_layer] */,
                                                uint16_t *v_cache /* [layers, cache_layer] */, size_t cache_layer,
                                                cudaStream_t stream);
/* ds_k_kv_append into a bf16 cache. */
cudaError_t ds_k_kv_append_bf16(const float *k /* [n, ldk] */, int ldk, const float *v /* [n, ldv] */, int ldv,
                                const int32_t *seq /* [n] */, const int32_t *pos /* [n] */,
                                const int32_t *page_table /* [n_seqs, max_pages] */, int max_pages, int page_size,
                                int n, int nKV, int hd, uint16_t *k_cache, uint16_t *v_cache, cudaStream_t stream);
/* ds_k_attention over a bf16 cache with a bf16 output. For head_dim 64 and 128
 * the scores and the value sum run on tensor cores (bf16 operands, q and the
 * softmax weights each split into a bf16 high part and remainder, f32
 * accumulation); other head_dims take the f32 kernel. Batch-invariant either
 * way, but not bit-equal to ds_k_attention. */
cudaError_t ds_k_attention_bf16(const float *q /* [n, ldq] */, int ldq, const uint16_t *k_cache,
                                const uint16_t *v_cache, const int32_t *seq /* [n] */, const int32_t *pos /* [n] */,
                                const int32_t *run_start /* [n_runs] */, const int32_t *run_len /* [n_runs] */,
                                const int32_t *n_runs /* [1] */, int longest,
                                const int32_t *page_table /* [n_seqs, max_pages] */, int max_pages, int page_size,
                                int n, int nH, int nKV, int hd, float scale, float *ws, uint16_t *out /* [n, nH * hd] */,
                                cudaStream_t stream);

/* ---- the draft's kernels (draft.cu) ---- */
/* out[i, 0:w] = x[rows[i], 0:w] rounded to bf16 (rows NULL: row i); out rows have stride ldo. */
cudaError_t ds_k_gather_bf16(const float *x /* [*, ldx] */, int ldx, const int32_t *rows /* [n] or NULL */, int n,
                             int w, uint16_t *out /* [n, ldo] */, int ldo, cudaStream_t stream);
/* out[i, 0:w] = table[ids[i]] (bf16 copied; ids outside [0, V) give zeros). */
cudaError_t ds_k_table_rows_bf16(const uint16_t *table /* [V, w] */, const int32_t *ids /* [n] */, int n, int w,
                                 int V, uint16_t *out /* [n, ldo] */, int ldo, cudaStream_t stream);
/* Gated Markov head: out[i] = sigmoid(mid[i] + bias) * w1[prev[i]], as bf16. */
cudaError_t ds_k_markov_gated(const float *mid /* [n, r] */, const float *bias /* [r] */,
                              const uint16_t *w1 /* [V, r] */, const int32_t *prev /* [n] */, int n, int r, int V,
                              uint16_t *out /* [n, r] */, cudaStream_t stream);
/* rnn Markov head, from mid = joint · [state; w1[prev]; h]: with g = sigmoid(mid[0:r] + b),
 * c = tanh(mid[r:2r] + b), o = tanh(mid[2r:3r] + b): state = g state + (1 - g) c, out = o (bf16). */
cudaError_t ds_k_markov_rnn(const float *mid /* [n, 3 r] */, const float *bias /* [3 r] */,
                            float *state /* [n, r] in/out */, int n, int r, uint16_t *out /* [n, r] */,
                            cudaStream_t stream);
/* Confidence logit z[i] = w[0:H]·h[i] + w[H:H+r]·w1[prev[i]] + b (r 0: no Markov input). */
cudaError_t ds_k_confidence(const float *h /* [n, ldh] */, int ldh, const float *w /* [H + r] */,
                            const uint16_t *w1 /* [V, r] or NULL */, const int32_t *prev /* [n] or NULL */, int n,
                            int H, int r, int V, float b, float *z /* [n] */, cudaStream_t stream);

/* ---- sampling with explicit uniforms (sample.cu) ---- */
/* Per-row sampling parameters, as struct ds_sampling: temperature < 1e-5 is
 * greedy; top_p in (0, 1] (1: off); top_k 0: off. */
struct ds_k_sampling {
    float temperature;
    float top_p;
    int32_t top_k;
};

/* out[r] = the sampling distribution of x[r] with params[i], for r = rows[i]
 * (rows NULL: r = i), exactly as ds_probs defines it: greedy gives a one-hot
 * at the first maximum; else softmax(x / T), cut to the top-k tokens, then to
 * the smallest prefix of the ranking (probability descending, ties to the
 * lower id) whose mass reaches top_p of theirs, renormalized. out may be x
 * (in place). A row is split over up to 8 blocks, each holding its slice in
 * shared memory: V up to about 400,000 on a GPU with 227 KB of it per block
 * (larger: cudaErrorInvalidValue); rows of non-finite logits give unspecified
 * probabilities. */
cudaError_t ds_k_sampling_probs(const float *x /* [*, ldx] */, int ldx, const int32_t *rows /* [n] or NULL */,
                                const struct ds_k_sampling *params /* [n] */, int n, int V,
                                float *out /* [*, ldo] */, int ldo, cudaStream_t stream);
/* out[i] = the first index j (index order) at which the running sum of
 * probs[r] passes u[i] · its total, for r = rows[i] (rows NULL: i): the draw
 * of ds_sample_probs. Rows are non-negative and sum to less than 8; sums are
 * exact 2^-60 fixed-point. A row of zero mass gives its last positive index, else 0. */
cudaError_t ds_k_sample(const float *probs /* [*, ldp] */, int ldp, const int32_t *rows /* [n] or NULL */,
                        const float *u /* [n] */, int n, int V, int32_t *out /* [n] */, cudaStream_t stream);
/* The blocks per row a launch of n rows of V takes (0: V too large); of its first
 * part when it goes as two launches. */
int ds_k_sampling_blocks_per_row(int n, int V);
/* For tests: later launches take c blocks per row wherever the slice fits
 * (0: the time model again); -1 when c is not 0 to 8. */
int ds_k_sampling_force_blocks_per_row(int c);
/* ds_k_sampling_probs and then ds_k_sample from each row written, with u[i]
 * for row i, in one launch: the same probabilities and the same ids. */
cudaError_t ds_k_sample_logits(const float *x /* [*, ldx] */, int ldx, const int32_t *rows /* [n] or NULL */,
                               const struct ds_k_sampling *params /* [n] */, int n, int V, float *out /* [*, ldo] */,
                               int ldo, const float *u /* [n] */, int32_t *ids /* [n] */, cudaStream_t stream);
/* out[i] = the draw with u[i] from norm(max(0, p[i] - q[i])), or from p[i]
 * when that mass is at most 1e-8 (the correction token of a rejection). */
cudaError_t ds_k_sample_residual(const float *p /* [n, ldp] */, int ldp, const float *q /* [n, ldq] */, int ldq,
                                 const float *u /* [n] */, int n, int V, int32_t *out /* [n] */,
                                 cudaStream_t stream);

#define DS_K_MAX_CHAIN 32   /* drafts verified per sequence and round, at most (DS_MAX_BLOCK) */

/* One sequence's verification: target distributions in rows p_row .. p_row + len
 * of p (row p_row + k follows draft k - 1; p_row + len gives the bonus), the
 * drafts' distributions in rows q_row .. q_row + len - 1 of q, and the uniforms
 * of each position (host-computed with ds_uniform). */
struct ds_k_chain {
    int32_t p_row;
    int32_t q_row;
    int32_t len;                            /* 0..DS_K_MAX_CHAIN */
    int32_t drafts[DS_K_MAX_CHAIN];
    float u_accept[DS_K_MAX_CHAIN];         /* DS_SLOT_ACCEPT */
    float u_target[DS_K_MAX_CHAIN + 1];     /* DS_SLOT_TARGET */
};

/* Before the distributions of a verify: for each chain i and draft k < len,
 * one pass over its logits row p_row + k of x (sampling params[i]) bounds
 * p[d_k] (ds_k_sampling_probs' value, whatever its rounding) closely enough
 * to tell whether the acceptance test below certainly accepts, certainly
 * rejects or may go either way: status[i · DS_K_MAX_CHAIN + k]. Then the rows
 * the accept can read (each uncertain one up to the first certain rejection,
 * whose residual needs p, or else the bonus row) go to rows and row_params in
 * chain order, their count to *n_rows. The distributions of those rows alone
 * and ds_k_spec_accept with status give the accepted counts and tokens that
 * every row's distribution gives. max_len: at least every chain's len. Rows
 * with top-k are bounded through the counts of tokens above the draft and
 * above levels below it (the top k's mass lies between what they hold). */
cudaError_t ds_k_spec_screen(const float *x /* [*, ldx] logits */, int ldx, const float *q /* [*, ldq] or NULL */,
                             int ldq, const struct ds_k_chain *chains /* [n] */,
                             const struct ds_k_sampling *params /* [n] */, int n, int max_len, int V,
                             uint8_t *status /* [n, DS_K_MAX_CHAIN] */, int32_t *rows /* [Σ (len + 1)] */,
                             struct ds_k_sampling *row_params /* [Σ (len + 1)] */, int32_t *n_rows /* [1] */,
                             cudaStream_t stream);

/* Chain accept/reject, one cluster of blocks per chain: for k = 0..len-1, draft k is
 * accepted while u_accept[k] · max(q[d_k], 1e-8) < p[d_k]; the first rejection
 * draws next from the residual (ds_k_sample_residual with u_target[k]); after
 * len acceptances next is drawn from row p_row + len with u_target[len].
 * accepted[i] gets the accepted count, next[i] the token that follows them. q
 * may be NULL when every len is 0. A draft id outside [0, V) is rejected.
 * status (ds_k_spec_screen's, or NULL): drafts it certainly accepts are
 * accepted without reading p. */
cudaError_t ds_k_spec_accept(const float *p /* [*, ldp] */, int ldp, const float *q /* [*, ldq] or NULL */, int ldq,
                             const struct ds_k_chain *chains /* [n] */, const uint8_t *status /* [n, DS_K_MAX_CHAIN] or NULL */,
                             int n, int V, int32_t *accepted /* [n] */, int32_t *next /* [n] */,
                             cudaStream_t stream);

/* ---- the batch-invariant bf16 product (gemm.cu) ---- */
/* The k split for an [N, K] weight on a GPU with n_sm multiprocessors; depends
 * on nothing else, so every batch size runs the same reduction. */
int ds_k_gemm_split(int N, int K, int n_sm);
/* A split of at most max_ranges k ranges for a weight K wide, ranges as ds_k_gemm_split makes them; split
 * itself when it has no more. For weights whose products never run decoding's one row (the draft's layers:
 * γ rows a block), where fewer partial sums cost less than the extra parallelism gives. */
int ds_k_gemm_split_at_most(int split, int K, int max_ranges);
/* f32 elements of workspace a product of M rows needs with that split (0 for
 * split 1). Zero a workspace once when it is allocated: it starts with tile
 * counters that every product leaves at zero again. Products sharing a
 * workspace must not run at the same time. */
size_t ds_k_gemm_workspace(int M, int N, int split);

/* cuBLASLt for the larger passes (a handle, a fixed workspace and the
 * algorithms chosen so far): the same bits as the kernels, faster. One per
 * stream of products; not for concurrent use. */
struct ds_k_gemm_lt;
cudaError_t ds_k_gemm_lt_create(struct ds_k_gemm_lt **lt);
void ds_k_gemm_lt_destroy(struct ds_k_gemm_lt *lt);
/* Products given to cuBLASLt so far (a batch of k ranges is one): tests check it served. */
size_t ds_k_gemm_lt_launches(const struct ds_k_gemm_lt *lt);
/* Questions asked of its heuristic so far: one per class of row counts (8 and under one each, then
 * 12, 16, 24, 32, 48, 64, ...) and problem, more only where the class's choice does not fit. */
size_t ds_k_gemm_lt_heuristics(const struct ds_k_gemm_lt *lt);
/* Passes of at least `rows` rows (0: none; negative: the default) run a split product's k ranges one after another, each adding
 * to y, instead of as one batch whose partials a second kernel sums: the same bits (the sums' order is
 * the same), less memory traffic where one range's product fills the GPU. The default is measured
 * (bench/RESULTS.md); benchmarks and tests set others. */
void ds_k_gemm_lt_set_in_turn_rows(struct ds_k_gemm_lt *lt, int rows);

/* y[m, n] = x[m, :]·w[n, :] (y += that when accumulate), f32 accumulation: a
 * chain per k range, the ranges' sums added in range order after y's own value
 * when accumulating.
 * K and ldx must be multiples of 8; split is ds_k_gemm_split's (or any count
 * up to 64 whose ranges of ⌈⌈K / 32⌉ / split⌉ chunks of 32 leave none
 * empty); ws holds ds_k_gemm_workspace(M, N, split) floats. lt: cuBLASLt for
 * the passes it serves best, or NULL for the in-house kernels alone; either
 * way the same bits. */
cudaError_t ds_k_gemm_bf16(struct ds_k_gemm_lt *lt, const uint16_t *x /* [M, ldx] */, int ldx,
                           const uint16_t *w /* [N, K] */, int M, int N, int K, int split, float *ws,
                           float *y /* [M, ldy] */, int ldy, int accumulate, cudaStream_t stream);

/* A product's bf16 x: given rows (DS_K_X_BF16: x, ldx), or rows made from f32
 * ones on the way in: DS_K_X_RMSNORM, x = rmsnorm(src) as ds_k_rmsnorm_bf16
 * makes it (src [M, K], norm_w [K], eps); DS_K_X_SWIGLU, x = SwiGLU(src) as
 * ds_k_swiglu_bf16 makes it (src [M, 2 K], gate then up). Made rows are
 * written to x ([M, K], ldx = K) unless the product makes them itself
 * (decoding's few rows, in shared memory): the same bits either way. */
enum ds_k_x_kind { DS_K_X_BF16, DS_K_X_RMSNORM, DS_K_X_SWIGLU };
struct ds_k_x {
    enum ds_k_x_kind kind;
    uint16_t *x;          /* [M, ldx] bf16 */
    int ldx;
    const float *src;
    const float *norm_w;
    float eps;
};
/* ds_k_gemm_bf16 on x; M rows of K. */
cudaError_t ds_k_gemm_bf16_x(struct ds_k_gemm_lt *lt, const struct ds_k_x *x, const uint16_t *w /* [N, K] */, int M,
                             int N, int K, int split, float *ws, float *y /* [M, ldy] */, int ldy, int accumulate,
                             cudaStream_t stream);
/* Write made rows into x->x (nothing for DS_K_X_BF16). */
cudaError_t ds_k_x_make(const struct ds_k_x *x, int M, int K, cudaStream_t stream);

/* ---- random fills: center + scale * u, u uniform in [-1, 1), from (seed, index) ---- */
cudaError_t ds_k_fill_uniform_bf16(uint16_t *out, size_t n, uint64_t seed, float center, float scale,
                                   cudaStream_t stream);
cudaError_t ds_k_fill_uniform_f32(float *out, size_t n, uint64_t seed, float center, float scale,
                                  cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
