/* kernels.h: C-callable launchers of the CUDA kernels (f32 for now).
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

/* out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps), per row; out may equal x. */
cudaError_t ds_k_rmsnorm(const float *x /* [n, H] */, const float *w /* [H] */, int n, int H, float eps,
                         float *out /* [n, H] */, cudaStream_t stream);
/* x[t] += y[t], then out[t] = rmsnorm(x[t]) as above (the residual add fused with the next norm). */
cudaError_t ds_k_add_rmsnorm(float *x /* [n, H] in/out */, const float *y /* [n, H] */, const float *w /* [H] */,
                             int n, int H, float eps, float *out /* [n, H] */, cudaStream_t stream);

/* In place, per token t and head: RMSNorm over head_dim with q_norm (k_norm),
 * then rotate-half RoPE at position pos[t]: for i < hd/2, angle = pos * inv_freq[i],
 * (a, b) = (x[i], x[i + hd/2]) becomes (a cos - b sin, b cos + a sin).
 * Head h of token t starts at q + t * ldq + h * hd (k likewise with ldk), so
 * q and k may point into one fused qkv row. hd must be even. */
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
 * sum accumulate in f32 with an online softmax in a fixed order. One block
 * per (token, head); hd must be 32, 64, 128 or 256. */
cudaError_t ds_k_attention(const float *q /* [n, ldq] holding [nH, hd] */, int ldq,
                           const float *k_cache /* [n_pages, page_size, nKV, hd] */,
                           const float *v_cache /* [n_pages, page_size, nKV, hd] */,
                           const int32_t *seq /* [n] */, const int32_t *pos /* [n] */,
                           const int32_t *page_table /* [n_seqs, max_pages] */, int max_pages, int page_size,
                           int n, int nH, int nKV, int hd, float scale, float *out /* [n, nH * hd] */,
                           cudaStream_t stream);

/* out[t, i] = silu(gate[t, i]) * up[t, i], with gu[t] = [gate (I), up (I)]. */
cudaError_t ds_k_swiglu(const float *gu /* [n, 2 I] */, int n, int I, float *out /* [n, I] */,
                        cudaStream_t stream);

/* out[t] = the index of the largest x[t, i]; ties go to the lowest index
 * (rows holding NaN give an unspecified index). */
cudaError_t ds_k_argmax(const float *x /* [n, V] */, int n, int V, int32_t *out /* [n] */, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
