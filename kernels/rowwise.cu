/* rowwise.cu: per-row kernels of the forward pass: embedding gather, RMSNorm
 * (plain and fused with the residual add, f32 or bf16 out), per-head q/k
 * RMSNorm with RoPE (and the KV cache append in the same launch), SwiGLU,
 * bias add, argmax, and random fills for benchmarks.
 * One block per row with a fixed block size (q/k norm: one warp per head,
 * following a fixed 128-thread order; argmax: a cluster of blocks per row, its
 * slices fixed by the row's length), so a row's reductions always run in the
 * same order whatever the batch. */
#include <math.h>
#include <stdint.h>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cluster.cuh"
#include "kernels.h"
#include "pdl.cuh"
#include "rowmath.cuh"

/* Sum over the block, the same value in every thread; fixed order: a butterfly
 * within each warp, then the warps' sums in warp order. red holds 32 floats. */
__device__ static float block_sum(float v, float *red)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();                 /* red may still be read by an earlier call */
    if ((threadIdx.x & 31) == 0)
        red[w] = v;
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < nw; i++)
        s += red[i];
    return s;
}

/* ---- embedding ---- */
__global__ static void embed_f32_kernel(const float *table, const int32_t *tokens, int H, int V, float *out)
{
    int t = blockIdx.x;
    int id = tokens[t];
    float *o = out + (size_t)t * H;
    if (id < 0 || id >= V) {
        for (int i = threadIdx.x; i < H; i += blockDim.x)
            o[i] = 0.0f;
        return;
    }
    const float *row = table + (size_t)id * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        o[i] = row[i];
}

__global__ static void embed_bf16_kernel(const uint16_t *table, const int32_t *tokens, int H, int V, float *out)
{
    int t = blockIdx.x;
    int id = tokens[t];
    float *o = out + (size_t)t * H;
    if (id < 0 || id >= V) {
        for (int i = threadIdx.x; i < H; i += blockDim.x)
            o[i] = 0.0f;
        return;
    }
    const uint16_t *row = table + (size_t)id * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        o[i] = __uint_as_float((uint32_t)row[i] << 16);
}

extern "C" cudaError_t ds_k_embed_f32(const float *table, const int32_t *tokens, int n, int H, int V, float *out,
                                      cudaStream_t stream)
{
    if (n < 0 || H <= 0 || V <= 0)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    embed_f32_kernel<<<n, ROW_THREADS, 0, stream>>>(table, tokens, H, V, out);
    return cudaGetLastError();
}

extern "C" cudaError_t ds_k_embed_bf16(const uint16_t *table, const int32_t *tokens, int n, int H, int V,
                                       float *out, cudaStream_t stream)
{
    if (n < 0 || H <= 0 || V <= 0)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    embed_bf16_kernel<<<n, ROW_THREADS, 0, stream>>>(table, tokens, H, V, out);
    return cudaGetLastError();
}

/* ---- RMSNorm ---- */
/* This thread's part of a row's sum of squares: float4 chunks i, i + blockDim,
 * ... when H % 4 == 0 (four at a time, so that their loads overlap), else
 * single elements; either way the same order for every row of a tensor. */
__device__ static float row_sumsq(const float *xr, int H)
{
    float ss = 0.0f;
    if ((H & 3) == 0) {
        const float4 *x4 = (const float4 *)xr;
#pragma unroll 4
        for (int i = threadIdx.x; i < H / 4; i += blockDim.x) {
            float4 v = x4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < H; i += blockDim.x)
            ss += xr[i] * xr[i];
    }
    return ss;
}

__global__ static void rmsnorm_kernel(const float *x, const float *w, int H, float eps, float *out)
{
    __shared__ float red[32];
    const float *xr = x + (size_t)blockIdx.x * H;
    float *o = out + (size_t)blockIdx.x * H;
    float scale = rms_scale(block_sum(row_sumsq(xr, H), red), H, eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        o[i] = w[i] * (xr[i] * scale);
}

__global__ static void add_rmsnorm_kernel(float *x, const float *y, const float *w, int H, float eps, float *out)
{
    __shared__ float red[32];
    float *xr = x + (size_t)blockIdx.x * H;
    const float *yr = y + (size_t)blockIdx.x * H;
    float *o = out + (size_t)blockIdx.x * H;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float v = xr[i] + yr[i];
        xr[i] = v;
        ss += v * v;
    }
    float scale = rms_scale(block_sum(ss, red), H, eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        o[i] = w[i] * (xr[i] * scale);
}

/* The float4 paths need 16-byte aligned rows when H % 4 == 0. */
static bool rows_aligned(const void *x, const void *w, int H)
{
    return (H & 3) || !(((uintptr_t)x | (uintptr_t)w) & 15);
}

extern "C" cudaError_t ds_k_rmsnorm(const float *x, const float *w, int n, int H, float eps, float *out,
                                    cudaStream_t stream)
{
    if (n < 0 || H <= 0 || !rows_aligned(x, w, H))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    rmsnorm_kernel<<<n, ROW_THREADS, 0, stream>>>(x, w, H, eps, out);
    return cudaGetLastError();
}

extern "C" cudaError_t ds_k_add_rmsnorm(float *x, const float *y, const float *w, int n, int H, float eps,
                                        float *out, cudaStream_t stream)
{
    if (n < 0 || H <= 0)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    add_rmsnorm_kernel<<<n, ROW_THREADS, 0, stream>>>(x, y, w, H, eps, out);
    return cudaGetLastError();
}

/* ---- per-head q/k RMSNorm + RoPE ---- */
#define HEAD_THREADS 128   /* a head's sum of squares follows block_sum's order over this many threads */

/* Where ds_k_kv_append writes token t's KV heads: the slot of position pos[t]
 * of sequence seq[t] (NULL caches: nowhere). */
struct kv_slots {
    const float *v;   /* [n, ldv] holding [nKV, hd] */
    int ldv;
    const int32_t *seq, *page_table;
    int max_pages, page_size;
    __nv_bfloat16 *k_cache, *v_cache;   /* [n_pages, page_size, nKV, hd] */
    /* k heads in layers of nKV (1 but for the draft's context rows): layer l's k and v heads at l ld_layer
     * further in their rows, its k norm weights at k_norm + l hd, its caches at l cache_layer further */
    int layers, ld_layer;
    size_t cache_layer;
};

/* Block (t, y), warp w: head h = y W + w (W warps a block, qk_warps); heads
 * 0..nH-1 are q's, nH..nH+nKV-1 are k's (and on, one run of nKV a layer); a k
 * head also goes to the cache after RoPE, with its v head, when there is one. The head's sum of squares
 * is block_sum's over HEAD_THREADS threads, emulated in the warp: virtual
 * thread v < HEAD_THREADS sums elements v, v + HEAD_THREADS, ... in turn, each
 * 32 of them by a butterfly (lane 0's value), then those sums in order. The
 * token's rotations are computed once a block into shared memory. (One block
 * per (token, head) was tens of thousands of tiny blocks at a verification
 * pass, with each block computing its token's rotations again.) LAYERS: k
 * heads of kv.layers layers (else one, and none of the layer arithmetic). */
template <bool LAYERS>
__global__ static void qk_norm_rope_kernel(float *q, int ldq, float *k, int ldk, const float *q_norm,
                                           const float *k_norm, const float *inv_freq, const int32_t *pos,
                                           int nH, int nKV, int hd, float eps, struct kv_slots kv)
{
    extern __shared__ float smem_qk[];   /* cos [hd / 2], sin [hd / 2], then per warp [hd] */
    int t = blockIdx.x, W = (int)(blockDim.x >> 5), w = (int)(threadIdx.x >> 5), lane = threadIdx.x & 31;
    int h = (int)blockIdx.y * W + w, half = hd / 2;
    float *cs = smem_qk, *sn = cs + half, *buf = sn + half + (size_t)w * hd;
    /* the rotations first: no kernel writes pos or inv_freq, so they overlap the kernel before */
    float p = (float)pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float angle = p * inv_freq[i];
        double sd, cd;
        sincos((double)angle, &sd, &cd);
        cs[i] = (float)cd;
        sn[i] = (float)sd;
    }
    pdl_enter();
    __syncthreads();
    if (h >= nH + nKV * (LAYERS ? kv.layers : 1))
        return;
    float *x;
    const float *wn;
    int layer = 0, kh = h - nH;   /* a k head's layer, and its head within the layer */
    if (h < nH) {
        x = q + (size_t)t * ldq + (size_t)h * hd;
        wn = q_norm;
    } else {
        if (LAYERS) {
            layer = kh / nKV;
            kh -= layer * nKV;
        }
        x = k + (size_t)t * ldk + (size_t)layer * kv.ld_layer + (size_t)kh * hd;
        wn = k_norm + (size_t)layer * hd;
    }
#pragma unroll 4
    for (int i = lane; i < hd; i += 32)   /* every load in flight at once */
        buf[i] = x[i];
    __syncwarp();
    float total = 0.0f;
#pragma unroll
    for (int vw = 0; vw < HEAD_THREADS / 32; vw++) {
        float ss = 0.0f;
        for (int i = vw * 32 + lane; i < hd; i += HEAD_THREADS) {
            float v = buf[i];
            ss += v * v;
        }
        for (int o = 16; o > 0; o >>= 1)
            ss += __shfl_xor_sync(0xffffffffu, ss, o);
        total += __shfl_sync(0xffffffffu, ss, 0);
    }
    float scale = rms_scale(total, hd, eps);
    __syncwarp();
    for (int i = lane; i < hd; i += 32)
        buf[i] = wn[i] * (buf[i] * scale);
    __syncwarp();
    __nv_bfloat16 *kc = NULL, *vc = NULL;
    if (h >= nH && kv.k_cache) {
        int slot = pos[t];
        int page = kv.page_table[(size_t)kv.seq[t] * kv.max_pages + slot / kv.page_size];
        size_t dst = (size_t)layer * kv.cache_layer +
                     ((size_t)page * kv.page_size + slot % kv.page_size) * ((size_t)nKV * hd) + (size_t)kh * hd;
        kc = kv.k_cache + dst;
        vc = kv.v_cache + dst;
        const float *vr = kv.v + (size_t)t * kv.ldv + (size_t)layer * kv.ld_layer + (size_t)kh * hd;
        for (int i = lane; i < hd; i += 32)
            vc[i] = __float2bfloat16_rn(vr[i]);
    }
    for (int i = lane; i < half; i += 32) {
        float cf = cs[i], sf = sn[i];
        float a = buf[i], b = buf[i + half];
        float ra = a * cf - b * sf, rb = b * cf + a * sf;
        x[i] = ra;
        x[i + half] = rb;
        if (kc) {
            kc[i] = __float2bfloat16_rn(ra);
            kc[i + half] = __float2bfloat16_rn(rb);
        }
    }
}

/* Warps (heads) per block of qk_norm_rope_kernel: 8, fewer for heads over 128 wide (shared memory). One
 * head a block for passes of at most 16 tokens was slower at one token (bench/RESULTS.md). */
static int qk_warps(int hd)
{
    int w = 8 * 128 / hd;
    return w < 1 ? 1 : w > 8 ? 8 : w;
}

static bool qk_norm_rope_ok(int n, int ldq, int ldk, int nH, int nKV, int hd)
{
    return n >= 0 && nH >= 0 && nKV >= 0 && nH + nKV <= 65535 && hd > 0 && hd % 2 == 0 && hd <= 4096 &&
           ldq >= nH * hd && ldk >= nKV * hd;
}

static bool kv_slots_ok(int ldv, int nKV, int hd, int max_pages, int page_size, const uint16_t *k_cache,
                        const uint16_t *v_cache)
{
    return nKV > 0 && ldv >= nKV * hd && max_pages > 0 && page_size > 0 && k_cache && v_cache;
}

static cudaError_t qk_norm_rope_launch(float *q, int ldq, float *k, int ldk, const float *q_norm, const float *k_norm,
                                       const float *inv_freq, const int32_t *pos, int n, int nH, int nKV, int hd,
                                       float eps, struct kv_slots kv, cudaStream_t stream)
{
    if (n == 0 || nH + nKV == 0)
        return cudaSuccess;
    int W = qk_warps(hd);
    dim3 grid((unsigned)n, (unsigned)((nH + nKV * kv.layers + W - 1) / W));
    size_t smem = ((size_t)hd + (size_t)W * hd) * sizeof(float);   /* the rotations, then a head per warp */
    return pdl_launch(kv.layers > 1 ? qk_norm_rope_kernel<true> : qk_norm_rope_kernel<false>, grid,
                      dim3((unsigned)(W * 32)), smem, stream, q, ldq, k, ldk, q_norm, k_norm, inv_freq, pos, nH, nKV,
                      hd, eps, kv);
}

extern "C" cudaError_t ds_k_qk_norm_rope(float *q, int ldq, float *k, int ldk, const float *q_norm,
                                         const float *k_norm, const float *inv_freq, const int32_t *pos, int n,
                                         int nH, int nKV, int hd, float eps, cudaStream_t stream)
{
    if (!qk_norm_rope_ok(n, ldq, ldk, nH, nKV, hd))
        return cudaErrorInvalidValue;
    struct kv_slots none = {};
    none.layers = 1;
    return qk_norm_rope_launch(q, ldq, k, ldk, q_norm, k_norm, inv_freq, pos, n, nH, nKV, hd, eps, none, stream);
}

extern "C" cudaError_t ds_k_qk_norm_rope_append_bf16(float *q, int ldq, float *k, int ldk, const float *v, int ldv,
                                                     const float *q_norm, const float *k_norm, const float *inv_freq,
                                                     const int32_t *pos, const int32_t *seq,
                                                     const int32_t *page_table, int max_pages, int page_size, int n,
                                                     int nH, int nKV, int hd, float eps, uint16_t *k_cache,
                                                     uint16_t *v_cache, cudaStream_t stream)
{
    if (!qk_norm_rope_ok(n, ldq, ldk, nH, nKV, hd) || !kv_slots_ok(ldv, nKV, hd, max_pages, page_size, k_cache, v_cache))
        return cudaErrorInvalidValue;
    struct kv_slots kv = {v, ldv, seq, page_table, max_pages, page_size, (__nv_bfloat16 *)k_cache,
                          (__nv_bfloat16 *)v_cache, 1, 0, 0};
    return qk_norm_rope_launch(q, ldq, k, ldk, q_norm, k_norm, inv_freq, pos, n, nH, nKV, hd, eps, kv, stream);
}

extern "C" cudaError_t ds_k_k_norm_rope_append_layers_bf16(float *k, const float *v, int ld, int layers, int ld_layer,
                                                          const float *k_norms, const float *inv_freq,
                                                          const int32_t *pos, const int32_t *seq,
                                                          const int32_t *page_table, int max_pages, int page_size,
                                                          int n, int nKV, int hd, float eps, uint16_t *k_cache,
                                                          uint16_t *v_cache, size_t cache_layer, cudaStream_t stream)
{
    if (!qk_norm_rope_ok(n, 0, ld, 0, nKV, hd) || !kv_slots_ok(ld, nKV, hd, max_pages, page_size, k_cache, v_cache) ||
        layers <= 0 || (long long)nKV * layers > 65535 || ld_layer < 0 ||
        (long long)(layers - 1) * ld_layer + nKV * hd > ld)
        return cudaErrorInvalidValue;
    struct kv_slots kv = {v, ld, seq, page_table, max_pages, page_size, (__nv_bfloat16 *)k_cache,
                          (__nv_bfloat16 *)v_cache, layers, ld_layer, cache_layer};
    return qk_norm_rope_launch(k, 0, k, ld, k_norms, k_norms, inv_freq, pos, n, 0, nKV, hd, eps, kv, stream);
}

/* ---- SwiGLU ---- */
__global__ static void swiglu_kernel(const float *gu, int I, float *out)
{
    const float *g = gu + (size_t)blockIdx.y * 2 * I, *u = g + I;
    float *o = out + (size_t)blockIdx.y * I;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < I) {
        o[i] = silu_mul(g[i], u[i]);
    }
}

extern "C" cudaError_t ds_k_swiglu(const float *gu, int n, int I, float *out, cudaStream_t stream)
{
    if (n < 0 || I <= 0 || n > 65535)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    dim3 grid((unsigned)((I + ROW_THREADS - 1) / ROW_THREADS), (unsigned)n);
    swiglu_kernel<<<grid, ROW_THREADS, 0, stream>>>(gu, I, out);
    return cudaGetLastError();
}

/* ---- argmax ---- */
/* A row is cut into ARGMAX_CLUSTER contiguous slices of equal length (a
 * multiple of 4, fixed by V alone), one block each, in one cluster: the
 * blocks exchange their best (and sums) through distributed shared memory and
 * combine them in rank order. One block a row left most of the GPU idle for
 * small batches (a row of Qwen3's vocabulary took ~114 us at 64 rows). */
#define ARGMAX_CLUSTER 8
#define ARGMAX_THREADS 512

/* (bv, bi) becomes the better of itself and (v, i): larger value, then lower index. */
__device__ static void better(float &bv, int &bi, float v, int i)
{
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

/* What a block of a row's cluster publishes. */
struct argmax_part {
    float v;
    int i;
    float sum;
};

/* f(value, index) for every element of row[from, to), four at a time where the row allows (from is a
 * multiple of 4), each thread taking every ARGMAX_THREADS-th group in increasing order. */
template <class F> __device__ static void slice_each(const float *row, int from, int to, F f)
{
    const int T = ARGMAX_THREADS;
    int j = from + (int)threadIdx.x;
    if (((uintptr_t)row & 15) == 0) {
        const float4 *r4 = (const float4 *)(row + from);
        int n4 = (to - from) / 4, i4 = (int)threadIdx.x;
        for (; i4 + 3 * T < n4; i4 += 4 * T) {   /* four 16-byte reads in flight a thread */
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++)
                v[u] = r4[i4 + u * T];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int i = from + 4 * (i4 + u * T);
                f(v[u].x, i), f(v[u].y, i + 1), f(v[u].z, i + 2), f(v[u].w, i + 3);
            }
        }
        for (; i4 < n4; i4 += T) {
            float4 v = r4[i4];
            int i = from + 4 * i4;
            f(v.x, i), f(v.y, i + 1), f(v.z, i + 2), f(v.w, i + 3);
        }
        j = from + 4 * n4 + (int)threadIdx.x;
    }
    for (; j < to; j += T)
        f(row[j], j);
}

/* The argmax of each row; with p, also p[row] = softmax(row)[argmax] = 1 / Σ exp(x - max), the sum in a
 * fixed order (each thread's elements, the lanes' butterfly, the warps in order, the slices in order).
 * Grid: ARGMAX_CLUSTER blocks a row, in clusters of that size. */
__global__ static void __launch_bounds__(ARGMAX_THREADS) argmax_kernel(const float *x, int ldx, int V, int32_t *out,
                                                                       float *p)
{
    namespace cg = cooperative_groups;
    cg::cluster_group cl = cg::this_cluster();
    __shared__ float sv[ARGMAX_THREADS / 32];
    __shared__ int si[ARGMAX_THREADS / 32];
    __shared__ struct argmax_part part;
    int r = (int)(blockIdx.x / ARGMAX_CLUSTER), rank = (int)cl.block_rank();
    const float *row = x + (size_t)r * ldx;
    int len = ((V + ARGMAX_CLUSTER - 1) / ARGMAX_CLUSTER + 3) & ~3;
    int from = rank * len < V ? rank * len : V, to = from + len < V ? from + len : V;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    slice_each(row, from, to, [&](float v, int i) { better(bv, bi, v, i); });
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        better(bv, bi, ov, oi);
    }
    if ((threadIdx.x & 31) == 0) {
        sv[threadIdx.x >> 5] = bv;
        si[threadIdx.x >> 5] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < ARGMAX_THREADS / 32; w++)
            better(bv, bi, sv[w], si[w]);
        part.v = bv;
        part.i = bi;
    }
    cl.sync();   /* every slice's best published */
    float mv = -INFINITY;
    int mi = 0x7fffffff;
    for (int b = 0; b < ARGMAX_CLUSTER; b++) {
        const struct argmax_part *o = cl.map_shared_rank(&part, b);
        better(mv, mi, o->v, o->i);
    }
    /* a row of -inf (or NaN) only: no candidate beat the start value */
    if (rank == 0 && threadIdx.x == 0)
        out[r] = mi == 0x7fffffff ? 0 : mi;
    if (p) {
        float mx = mi == 0x7fffffff ? NAN : mv, sum = 0.0f;
        slice_each(row, from, to, [&](float v, int) { sum += expf(v - mx); });
        for (int o = 16; o > 0; o >>= 1)
            sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if ((threadIdx.x & 31) == 0)   /* thread 0 read sv before the cluster barrier above */
            sv[threadIdx.x >> 5] = sum;
        __syncthreads();
        if (threadIdx.x == 0) {
            float total = sv[0];
            for (int w = 1; w < ARGMAX_THREADS / 32; w++)
                total += sv[w];
            part.sum = total;
        }
        cl.sync();   /* every slice's sum published */
        if (rank == 0 && threadIdx.x == 0) {
            float total = 0.0f;
            for (int b = 0; b < ARGMAX_CLUSTER; b++)
                total += cl.map_shared_rank(&part, b)->sum;
            p[r] = 1.0f / total;   /* NaN for a row without a maximum */
        }
    }
    cl.sync();   /* no block leaves while another may still read its part */
}

static cudaError_t argmax_launch(const float *x, int ldx, int n, int V, int32_t *out, float *p, cudaStream_t stream)
{
    if (n < 0 || V <= 0 || ldx < V)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    if (n > INT32_MAX / ARGMAX_CLUSTER)
        return cudaErrorInvalidValue;
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t cfg =
        cluster_config(ARGMAX_CLUSTER, (unsigned)(n * ARGMAX_CLUSTER), ARGMAX_THREADS, 0, stream, &attr);
    return cudaLaunchKernelEx(&cfg, argmax_kernel, x, ldx, V, out, p);
}

extern "C" cudaError_t ds_k_argmax(const float *x, int ldx, int n, int V, int32_t *out, cudaStream_t stream)
{
    return argmax_launch(x, ldx, n, V, out, NULL, stream);
}

extern "C" cudaError_t ds_k_argmax_prob(const float *x, int ldx, int n, int V, int32_t *out, float *p,
                                        cudaStream_t stream)
{
    return p ? argmax_launch(x, ldx, n, V, out, p, stream) : cudaErrorInvalidValue;
}

/* ---- bf16 outputs (inputs of the bf16 products) ---- */
/* out[i] = rmsnorm(x[rows[i]]) as bf16; rows NULL means row i. */
__global__ static void rmsnorm_bf16_kernel(const float *x, const int32_t *rows, const float *w, int H, float eps,
                                           __nv_bfloat16 *out)
{
    __shared__ float red[32];
    pdl_enter();
    int src = rows ? rows[blockIdx.x] : (int)blockIdx.x;
    const float *xr = x + (size_t)src * H;
    __nv_bfloat16 *o = out + (size_t)blockIdx.x * H;
    if ((H & 3) == 0) {   /* the order and arithmetic of the products that normalize their x (gemm.cu) */
        float scale = rms_scale(row_sumsq4<ROW_THREADS>(xr, H, red), H, eps);
        const float4 *x4 = (const float4 *)xr, *w4 = (const float4 *)w;
        __nv_bfloat162 *o2 = (__nv_bfloat162 *)o;
#pragma unroll 4
        for (int i = threadIdx.x; i < H / 4; i += blockDim.x)
            rms_bf16x4(x4[i], w4[i], scale, o2 + 2 * i);
        return;
    }
    float scale = rms_scale(block_sum(row_sumsq(xr, H), red), H, eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        o[i] = __float2bfloat16_rn(w[i] * (xr[i] * scale));
}

extern "C" cudaError_t ds_k_rmsnorm_bf16(const float *x, const int32_t *rows, const float *w, int n, int H,
                                         float eps, uint16_t *out, cudaStream_t stream)
{
    if (n < 0 || H <= 0 || !rows_aligned(x, w, H) || ((H & 3) == 0 && ((uintptr_t)out & 7)))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    return pdl_launch(rmsnorm_bf16_kernel, dim3((unsigned)n), dim3(ROW_THREADS), 0, stream, x, rows, w, H, eps,
                      (__nv_bfloat16 *)out);
}

/* W consecutive elements of a row a thread (W = 4: I a multiple of 4 and gu 16-byte aligned, out 8-byte
 * aligned; the same values either way), 32-bit indices (ds_k_swiglu_bf16 keeps n I under 2^31). */
template <int W> struct __align__(2 * W) swiglu_bf16s {
    __nv_bfloat16 v[W];
};
template <int W>
__global__ static void swiglu_bf16_kernel(const float *gu, unsigned I, unsigned groups, __nv_bfloat16 *out)
{
    pdl_enter();
    unsigned idx = blockIdx.x * blockDim.x + threadIdx.x, per_row = I / W;
    if (idx >= groups)
        return;
    unsigned t = idx / per_row, i = idx % per_row * W;
    const float *g = gu + (size_t)t * 2 * I + i;
    f32s<W> gv = *(const f32s<W> *)g, uv = *(const f32s<W> *)(g + I);
    swiglu_bf16s<W> o;
#pragma unroll
    for (int c = 0; c < W; c++)
        o.v[c] = __float2bfloat16_rn(silu_mul(gv.v[c], uv.v[c]));
    *(swiglu_bf16s<W> *)(out + (size_t)t * I + i) = o;
}

extern "C" cudaError_t ds_k_swiglu_bf16(const float *gu, int n, int I, uint16_t *out, cudaStream_t stream)
{
    if (n < 0 || I <= 0 || (size_t)n * I > 0x7fffffffu)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    unsigned total = (unsigned)((size_t)n * I);
    if (I % 4 == 0 && (uintptr_t)gu % 16 == 0 && (uintptr_t)out % 8 == 0)
        return pdl_launch(swiglu_bf16_kernel<4>, dim3((total / 4 + 255) / 256), dim3(256), 0, stream, gu,
                          (unsigned)I, total / 4, (__nv_bfloat16 *)out);
    return pdl_launch(swiglu_bf16_kernel<1>, dim3((total + 255) / 256), dim3(256), 0, stream, gu, (unsigned)I, total,
                      (__nv_bfloat16 *)out);
}

__global__ static void add_bias_kernel(float *y, int ldy, const float *bias, int N, size_t total)
{
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total)
        return;
    size_t t = idx / N, i = idx % N;
    y[t * ldy + i] += bias[i];
}

extern "C" cudaError_t ds_k_add_bias(float *y, int ldy, const float *bias, int n, int N, cudaStream_t stream)
{
    if (n < 0 || N <= 0 || ldy < N)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    size_t total = (size_t)n * N;
    add_bias_kernel<<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(y, ldy, bias, N, total);
    return cudaGetLastError();
}

/* ---- random fills (benchmarks on random weights) ---- */
__device__ static float hash_uniform(uint64_t seed, size_t i)
{
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);   /* [0, 1) */
}

__global__ static void fill_bf16_kernel(__nv_bfloat16 *out, size_t n, uint64_t seed, float center, float scale)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(center + scale * (2.0f * hash_uniform(seed, i) - 1.0f));
}

__global__ static void fill_f32_kernel(float *out, size_t n, uint64_t seed, float center, float scale)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = center + scale * (2.0f * hash_uniform(seed, i) - 1.0f);
}

extern "C" cudaError_t ds_k_fill_uniform_bf16(uint16_t *out, size_t n, uint64_t seed, float center, float scale,
                                              cudaStream_t stream)
{
    if (n == 0)
        return cudaSuccess;
    fill_bf16_kernel<<<1024, 256, 0, stream>>>((__nv_bfloat16 *)out, n, seed, center, scale);
    return cudaGetLastError();
}

extern "C" cudaError_t ds_k_fill_uniform_f32(float *out, size_t n, uint64_t seed, float center, float scale,
                                             cudaStream_t stream)
{
    if (n == 0)
        return cudaSuccess;
    fill_f32_kernel<<<1024, 256, 0, stream>>>(out, n, seed, center, scale);
    return cudaGetLastError();
}
