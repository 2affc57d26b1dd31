/* attention.cu: the paged KV cache append and causal attention over a
 * flattened ragged batch.
 *
 * Attention runs one block of ATT_WARPS warps per (token, query head). Warp w
 * takes positions w, w + ATT_WARPS, ... in increasing order with an online
 * softmax; each lane holds hd / 32 elements of q, of the running value sum
 * and of every K/V row it reads (element d = lane + 32 r, so a warp reads a
 * row in coalesced 128-byte pieces). The warps' partial results are merged
 * in warp order. The order depends only on the token's position and hd, so a
 * token's output does not depend on the rest of the batch. */
#include <math.h>
#include <stdint.h>

#include <cuda_runtime.h>

#include "kernels.h"

#define ATT_WARPS 4

/* ---- KV append ---- */
__global__ static void kv_append_kernel(const float *k, int ldk, const float *v, int ldv, const int32_t *seq,
                                        const int32_t *pos, const int32_t *page_table, int max_pages,
                                        int page_size, int row, float *k_cache, float *v_cache)
{
    int t = blockIdx.x;
    int p = pos[t];
    int page = page_table[(size_t)seq[t] * max_pages + p / page_size];
    size_t dst = ((size_t)page * page_size + p % page_size) * row;
    const float *kr = k + (size_t)t * ldk, *vr = v + (size_t)t * ldv;
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
        k_cache[dst + i] = kr[i];
        v_cache[dst + i] = vr[i];
    }
}

extern "C" cudaError_t ds_k_kv_append(const float *k, int ldk, const float *v, int ldv, const int32_t *seq,
                                      const int32_t *pos, const int32_t *page_table, int max_pages, int page_size,
                                      int n, int nKV, int hd, float *k_cache, float *v_cache, cudaStream_t stream)
{
    if (n < 0 || nKV <= 0 || hd <= 0 || page_size <= 0 || max_pages <= 0 || ldk < nKV * hd || ldv < nKV * hd)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    kv_append_kernel<<<n, 256, 0, stream>>>(k, ldk, v, ldv, seq, pos, page_table, max_pages, page_size, nKV * hd,
                                            k_cache, v_cache);
    return cudaGetLastError();
}

/* ---- attention ---- */
template <int R>   /* R = hd / 32 elements per lane */
__global__ static void __launch_bounds__(ATT_WARPS * 32)
attention_kernel(const float *q, int ldq, const float *k_cache, const float *v_cache, const int32_t *seq,
                 const int32_t *pos, const int32_t *page_table, int max_pages, int page_size, int nH, int nKV,
                 float scale, float *out)
{
    const int hd = R * 32;
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][R * 32];
    int t = blockIdx.x, h = blockIdx.y;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int g = h / (nH / nKV);
    int last = pos[t];
    const int32_t *pages = page_table + (size_t)seq[t] * max_pages;
    size_t row = (size_t)nKV * hd;

    float qr[R], acc[R];
    const float *qh = q + (size_t)t * ldq + (size_t)h * hd;
#pragma unroll
    for (int r = 0; r < R; r++) {
        qr[r] = qh[lane + 32 * r];
        acc[r] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = w; j <= last; j += ATT_WARPS) {
        size_t off = ((size_t)pages[j / page_size] * page_size + j % page_size) * row + (size_t)g * hd;
        const float *kr = k_cache + off, *vr = v_cache + off;
        float kv[R], vv[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            kv[r] = kr[lane + 32 * r];
            vv[r] = vr[lane + 32 * r];
        }
        float s = 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++)
            s += qr[r] * kv[r];
        for (int o = 16; o > 0; o >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, o);
        s *= scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[r] = acc[r] * corr + p * vv[r];
        m = mn;
    }
    if (lane == 0) {
        sm[w] = m;
        sl[w] = l;
    }
#pragma unroll
    for (int r = 0; r < R; r++)
        sacc[w][lane + 32 * r] = acc[r];
    __syncthreads();

    /* merge in warp order; warp 0 always holds position 0, so M is finite */
    float M = sm[0];
    for (int i = 1; i < ATT_WARPS; i++)
        M = fmaxf(M, sm[i]);
    float L = 0.0f, f[ATT_WARPS];
#pragma unroll
    for (int i = 0; i < ATT_WARPS; i++) {
        f[i] = sl[i] > 0.0f ? expf(sm[i] - M) : 0.0f;
        L += sl[i] * f[i];
    }
    float inv = 1.0f / L;
    float *oh = out + ((size_t)t * nH + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_WARPS; i++)
            sum += sacc[i][d] * f[i];
        oh[d] = sum * inv;
    }
}

extern "C" cudaError_t ds_k_attention(const float *q, int ldq, const float *k_cache, const float *v_cache,
                                      const int32_t *seq, const int32_t *pos, const int32_t *page_table,
                                      int max_pages, int page_size, int n, int nH, int nKV, int hd, float scale,
                                      float *out, cudaStream_t stream)
{
    if (n < 0 || nH <= 0 || nKV <= 0 || nH % nKV || nH > 65535 || page_size <= 0 || max_pages <= 0 ||
        ldq < nH * hd)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    dim3 grid((unsigned)n, (unsigned)nH), block(ATT_WARPS * 32);
    switch (hd) {
    case 32:
        attention_kernel<1><<<grid, block, 0, stream>>>(q, ldq, k_cache, v_cache, seq, pos, page_table, max_pages,
                                                        page_size, nH, nKV, scale, out);
        break;
    case 64:
        attention_kernel<2><<<grid, block, 0, stream>>>(q, ldq, k_cache, v_cache, seq, pos, page_table, max_pages,
                                                        page_size, nH, nKV, scale, out);
        break;
    case 128:
        attention_kernel<4><<<grid, block, 0, stream>>>(q, ldq, k_cache, v_cache, seq, pos, page_table, max_pages,
                                                        page_size, nH, nKV, scale, out);
        break;
    case 256:
        attention_kernel<8><<<grid, block, 0, stream>>>(q, ldq, k_cache, v_cache, seq, pos, page_table, max_pages,
                                                        page_size, nH, nKV, scale, out);
        break;
    default:
        return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}
