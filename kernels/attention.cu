/* attention.cu: the paged KV cache append and causal attention over a
 * flattened ragged batch.
 *
 * Attention works on runs: up to ATT_QUERIES / G consecutive batch rows of
 * one sequence (G = query heads per KV head), computed by the host. A block
 * takes one run, one KV head and one of ATT_SPLIT position groups: the
 * positions fall into tiles of ATT_TILE, and block z takes tiles z, z + S,
 * z + 2 S, ... in increasing order. It loads each tile's K and V rows once
 * (cp.async, the next tile while the current one is used) into shared memory
 * for all the run's G x tokens queries (the rows that a verification block's
 * tokens and a GQA group's heads share), and one warp carries each query
 * through the tile: lane j scores position j (a dot product in four
 * interleaved partial sums over d), an online softmax over the tile in lane
 * order, and the value sum in position order. A second kernel merges the
 * groups' partial results in group order. So every query's arithmetic depends
 * only on its own position, q and the cache rows, never on which other
 * queries share its block or pass; and the launch shape depends only on the
 * batch size, so a captured graph stays valid while contexts grow. */
#include <math.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels.h"


template <typename T> __device__ static inline T from_f32(float v);
template <> __device__ inline float from_f32<float>(float v)
{
    return v;
}
template <> __device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

/* ---- KV append ---- */
template <typename KV>
__global__ static void kv_append_kernel(const float *k, int ldk, const float *v, int ldv, const int32_t *seq,
                                        const int32_t *pos, const int32_t *page_table, int max_pages,
                                        int page_size, int row, int hd, KV *k_cache, KV *v_cache)
{
    int t = blockIdx.x, h = blockIdx.y;   /* one block per (token, KV head) */
    int p = pos[t];
    int page = page_table[(size_t)seq[t] * max_pages + p / page_size];
    size_t dst = ((size_t)page * page_size + p % page_size) * row + (size_t)h * hd;
    const float *kr = k + (size_t)t * ldk + (size_t)h * hd, *vr = v + (size_t)t * ldv + (size_t)h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        k_cache[dst + i] = from_f32<KV>(kr[i]);
        v_cache[dst + i] = from_f32<KV>(vr[i]);
    }
}

static bool kv_append_ok(int n, int ldk, int ldv, int max_pages, int page_size, int nKV, int hd)
{
    return n >= 0 && nKV > 0 && nKV <= 65535 && hd > 0 && page_size > 0 && max_pages > 0 && ldk >= nKV * hd &&
           ldv >= nKV * hd;
}

extern "C" cudaError_t ds_k_kv_append(const float *k, int ldk, const float *v, int ldv, const int32_t *seq,
                                      const int32_t *pos, const int32_t *page_table, int max_pages, int page_size,
                                      int n, int nKV, int hd, float *k_cache, float *v_cache, cudaStream_t stream)
{
    if (!kv_append_ok(n, ldk, ldv, max_pages, page_size, nKV, hd))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    kv_append_kernel<float><<<dim3((unsigned)n, (unsigned)nKV), 128, 0, stream>>>(
        k, ldk, v, ldv, seq, pos, page_table, max_pages, page_size, nKV * hd, hd, k_cache, v_cache);
    return cudaGetLastError();
}

extern "C" cudaError_t ds_k_kv_append_bf16(const float *k, int ldk, const float *v, int ldv, const int32_t *seq,
                                           const int32_t *pos, const int32_t *page_table, int max_pages,
                                           int page_size, int n, int nKV, int hd, uint16_t *k_cache,
                                           uint16_t *v_cache, cudaStream_t stream)
{
    if (!kv_append_ok(n, ldk, ldv, max_pages, page_size, nKV, hd))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    kv_append_kernel<__nv_bfloat16><<<dim3((unsigned)n, (unsigned)nKV), 128, 0, stream>>>(
        k, ldk, v, ldv, seq, pos, page_table, max_pages, page_size, nKV * hd, hd, (__nv_bfloat16 *)k_cache,
        (__nv_bfloat16 *)v_cache);
    return cudaGetLastError();
}

/* ---- attention ---- */
#define ATT_TILE 32                 /* positions per tile: one per lane */
#define ATT_SPLIT 8                 /* position groups per (run, KV head) */
#define ATT_QUERIES 32              /* queries per block at most */
/* Warps per block: 8 for passes of few blocks (a few tokens, or a few
 * verification blocks whose runs hold more than 16 queries): each block then
 * loads its tiles and carries its queries faster; else 4, so that more blocks
 * fit an SM (measured on an H200, bench/RESULTS.md). One warp carries
 * ATT_QUERIES / W queries; which warp carries a query never changes its
 * arithmetic. */
#define ATT_WIDE_QUERIES 16
#define ATT_WIDE_TOKENS 64
#define ATT_FEW_TOKENS 4

extern "C" size_t ds_k_attention_workspace(int n, int nH, int hd)
{
    /* per (token, head, group): the running max, the sum of weights and hd sums */
    return (size_t)n * nH * ATT_SPLIT * (hd + 2);
}

extern "C" int ds_k_attention_runs(const int32_t *seq, int n, int nH, int nKV, int32_t *run_start, int32_t *run_len,
                                   int *ret_longest)
{
    int longest = 0;
    int group = nH / nKV, cap = ATT_QUERIES / (group > 0 ? group : 1), n_runs = 0;
    if (cap < 1)
        cap = 1;
    for (int t = 0; t < n;) {
        int len = 1;
        while (t + len < n && len < cap && seq[t + len] == seq[t])
            len++;
        run_start[n_runs] = t;
        run_len[n_runs++] = len;
        longest = len > longest ? len : longest;
        t += len;
    }
    if (ret_longest)
        *ret_longest = longest;
    return n_runs;
}

__device__ static inline void cp_async16(void *smem, const void *gmem)
{
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

/* Eight consecutive values of a row in shared memory as f32. */
__device__ static inline void unpack8(const float *p, float (&v)[8])
{
    float4 a = *(const float4 *)p, b = *(const float4 *)(p + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ static inline void unpack8(const __nv_bfloat16 *p, float (&v)[8])
{
    uint4 u = *(const uint4 *)p;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}
__device__ static inline float to_float(float v)
{
    return v;
}
__device__ static inline float to_float(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

/* Shared memory of one block: two stages of K and V tiles, then the queries. */
template <typename KV> struct AttSmem {
    static __host__ __device__ int ldk(int hd) { return hd + 16 / (int)sizeof(KV); }   /* padded rows */
    static __host__ __device__ size_t stage(int hd) { return (size_t)ATT_TILE * (ldk(hd) + hd); }
    static __host__ __device__ size_t bytes(int hd)
    {
        return 2 * stage(hd) * sizeof(KV) + (size_t)ATT_QUERIES * hd * sizeof(float);
    }
};

/* Block (run, KV head g, group z). Writes ws[((t nH + h) S + z)] = (m, l, acc[hd]), unnormalized. */
template <typename KV, int R, int W>   /* R = ceil(hd / 32) value elements per lane; W warps */
__global__ static void __launch_bounds__(W * 32)
attention_part_kernel(const float *q, int ldq, const KV *k_cache, const KV *v_cache, const int32_t *seq,
                      const int32_t *pos, const int32_t *run_start, const int32_t *run_len, const int32_t *n_runs,
                      const int32_t *page_table, int max_pages, int page_size, int nH, int nKV, int hd, float scale,
                      float *ws)
{
    extern __shared__ __align__(16) unsigned char att_smem[];
    typedef AttSmem<KV> L;
    const int ldk = L::ldk(hd);
    KV *stage0 = (KV *)att_smem;                                  /* [2][K: ATT_TILE x ldk, V: ATT_TILE x hd] */
    float *Qs = (float *)(stage0 + 2 * L::stage(hd));             /* [ATT_QUERIES, hd] */
    int run = blockIdx.x, g = blockIdx.y, z = blockIdx.z;
    if (run >= *n_runs)
        return;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int G = nH / nKV, t0 = run_start[run], ntok = run_len[run], nq = G * ntok;
    const int32_t *pages = page_table + (size_t)seq[t0] * max_pages;
    size_t row = (size_t)nKV * hd;
    int last = 0;
    for (int i = 0; i < ntok; i++)
        last = max(last, pos[t0 + i]);
    const int cpr = hd * (int)sizeof(KV) / 16;   /* 16-byte chunks per row */

    /* start loading tile `tile` into stage st: every thread issues its chunks */
    auto prefetch = [&](int tile, int st) {
        KV *Ks = stage0 + st * L::stage(hd), *Vs = Ks + ATT_TILE * ldk;
        int j0 = tile * ATT_TILE;
        for (int c = threadIdx.x; c < 2 * ATT_TILE * cpr; c += blockDim.x) {
            int kv = c / (ATT_TILE * cpr), rem = c % (ATT_TILE * cpr), jj = rem / cpr, ch = rem % cpr;
            int j = j0 + jj <= last ? j0 + jj : last;   /* past the end: a valid row, masked below */
            size_t off = ((size_t)pages[j / page_size] * page_size + j % page_size) * row + (size_t)g * hd;
            const KV *src = (kv ? v_cache : k_cache) + off;
            KV *dst = kv ? Vs + jj * hd : Ks + jj * ldk;
            cp_async16(dst + ch * (16 / sizeof(KV)), src + ch * (16 / sizeof(KV)));
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

    int tile = z;
    if (tile * ATT_TILE <= last)
        prefetch(tile, 0);
    /* queries: qi = token * G + head in group, scaled */
    for (int i = threadIdx.x; i < nq * hd; i += blockDim.x) {
        int qi = i / hd, d = i % hd;
        int t = t0 + qi / G, h = g * G + qi % G;
        Qs[qi * hd + d] = q[(size_t)t * ldq + (size_t)h * hd + d] * scale;
    }
    float m[(ATT_QUERIES / W)], l[(ATT_QUERIES / W)], acc[(ATT_QUERIES / W)][R];
    int qpos[(ATT_QUERIES / W)];
#pragma unroll
    for (int k = 0; k < (ATT_QUERIES / W); k++) {
        int qi = w + k * W;
        qpos[k] = qi < nq ? pos[t0 + qi / G] : -1;
        m[k] = -INFINITY;
        l[k] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[k][r] = 0.0f;
    }
    for (int it = 0; tile * ATT_TILE <= last; tile += ATT_SPLIT, it++) {
        int j0 = tile * ATT_TILE, next = tile + ATT_SPLIT;
        bool more = next * ATT_TILE <= last;
        if (more)
            prefetch(next, (it + 1) & 1);
        if (more)
            asm volatile("cp.async.wait_group 1;\n" ::);
        else
            asm volatile("cp.async.wait_group 0;\n" ::);
        __syncthreads();                          /* this tile (and Qs) visible to all */
        const KV *Ks = stage0 + (it & 1) * L::stage(hd), *Vs = Ks + ATT_TILE * ldk;
#pragma unroll
        for (int k = 0; k < (ATT_QUERIES / W); k++) {
            int qi = w + k * W;
            if (qi >= nq || j0 > qpos[k])         /* no position of this tile is visible to the query */
                continue;
            const float *qv = Qs + qi * hd;
            const KV *kr = Ks + lane * ldk;
            /* four partial sums over d mod 4, added in a fixed tree */
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            for (int d = 0; d < hd; d += 8) {
                float kv8[8], qv8[8];
                unpack8(kr + d, kv8);
                unpack8(qv + d, qv8);
                s0 += qv8[0] * kv8[0];
                s1 += qv8[1] * kv8[1];
                s2 += qv8[2] * kv8[2];
                s3 += qv8[3] * kv8[3];
                s0 += qv8[4] * kv8[4];
                s1 += qv8[5] * kv8[5];
                s2 += qv8[6] * kv8[6];
                s3 += qv8[7] * kv8[7];
            }
            float s = (s0 + s1) + (s2 + s3);
            bool valid = j0 + lane <= qpos[k];
            float mt = valid ? s : -INFINITY;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
                mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            float mn = fmaxf(m[k], mt);
            float corr = expf(m[k] - mn);
            float p = valid ? expf(s - mn) : 0.0f;
            float ps = p;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
                ps += __shfl_xor_sync(0xffffffffu, ps, o);
            l[k] = l[k] * corr + ps;
#pragma unroll
            for (int r = 0; r < R; r++)
                acc[k][r] *= corr;
            for (int jj = 0; jj < ATT_TILE; jj++) {
                float pj = __shfl_sync(0xffffffffu, p, jj);
                const KV *vr = Vs + jj * hd;
#pragma unroll
                for (int r = 0; r < R; r++) {
                    int d = lane + 32 * r;
                    if (d < hd)
                        acc[k][r] += pj * to_float(vr[d]);
                }
            }
            m[k] = mn;
        }
        __syncthreads();                          /* the stage is free for the tile after next */
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
#pragma unroll
    for (int k = 0; k < (ATT_QUERIES / W); k++) {
        int qi = w + k * W;
        if (qi >= nq)
            continue;
        int t = t0 + qi / G, h = g * G + qi % G;
        float *out = ws + (((size_t)t * nH + h) * ATT_SPLIT + z) * (hd + 2);
        if (lane == 0) {
            out[0] = m[k];
            out[1] = l[k];
        }
        if (l[k] == 0.0f)
            continue;                             /* no visible position here: the merge skips the group */
#pragma unroll
        for (int r = 0; r < R; r++) {
            int d = lane + 32 * r;
            if (d < hd)
                out[2 + d] = acc[k][r];
        }
    }
}

/* Merge the ATT_SPLIT partials of (token, head) in group order. */
template <typename OUT>
__global__ static void attention_merge_kernel(const float *ws, int nH, int hd, OUT *out)
{
    int t = blockIdx.x, h = blockIdx.y;
    const float *part = ws + ((size_t)t * nH + h) * ATT_SPLIT * (hd + 2);
    float M = -INFINITY;
    for (int z = 0; z < ATT_SPLIT; z++)
        if (part[z * (hd + 2) + 1] > 0.0f)
            M = fmaxf(M, part[z * (hd + 2)]);
    float f[ATT_SPLIT], L = 0.0f;
#pragma unroll
    for (int z = 0; z < ATT_SPLIT; z++) {
        float lz = part[z * (hd + 2) + 1];
        f[z] = lz > 0.0f ? expf(part[z * (hd + 2)] - M) : 0.0f;
        L += lz * f[z];
    }
    float inv = 1.0f / L;
    OUT *oh = out + ((size_t)t * nH + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float sum = 0.0f;
#pragma unroll
        for (int z = 0; z < ATT_SPLIT; z++)
            if (f[z] > 0.0f)                       /* empty groups wrote no values */
                sum += part[z * (hd + 2) + 2 + d] * f[z];
        oh[d] = from_f32<OUT>(sum * inv);
    }
}

/* Allow the largest head_dim's shared memory, once per kernel instance. */
template <typename KV, int RR, int W> static cudaError_t smem_attr(void)
{
    static bool done;
    if (done)
        return cudaSuccess;
    cudaError_t e = cudaFuncSetAttribute(attention_part_kernel<KV, RR, W>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)AttSmem<KV>::bytes(256));
    done = e == cudaSuccess;
    return e;
}

template <typename KV, int W>
static cudaError_t launch_part(const float *q, int ldq, const KV *k_cache, const KV *v_cache, const int32_t *seq,
                               const int32_t *pos, const int32_t *run_start, const int32_t *run_len,
                               const int32_t *n_runs, const int32_t *page_table, int max_pages, int page_size, int n,
                               int nH, int nKV, int hd, float scale, float *ws, cudaStream_t stream)
{
    size_t smem = AttSmem<KV>::bytes(hd);
    dim3 grid((unsigned)n, (unsigned)nKV, ATT_SPLIT), block(W * 32);
    cudaError_t e = cudaSuccess;
#define ATT_CASE(RR)                                                                                           \
    case RR:                                                                                                   \
        e = smem_attr<KV, RR, W>();                                                                            \
        if (e != cudaSuccess)                                                                                  \
            return e;                                                                                          \
        attention_part_kernel<KV, RR, W><<<grid, block, smem, stream>>>(q, ldq, k_cache, v_cache, seq, pos,     \
                                                                        run_start, run_len, n_runs, page_table, \
                                                                        max_pages, page_size, nH, nKV, hd,      \
                                                                        scale, ws);                             \
        break;
    switch ((hd + 31) / 32) {
        ATT_CASE(1)
        ATT_CASE(2)
        ATT_CASE(3)
        ATT_CASE(4)
        ATT_CASE(5)
        ATT_CASE(6)
        ATT_CASE(7)
        ATT_CASE(8)
    }
#undef ATT_CASE
    return e;
}

template <typename KV, typename OUT>
static cudaError_t attention_launch(const float *q, int ldq, const KV *k_cache, const KV *v_cache,
                                    const int32_t *seq, const int32_t *pos, const int32_t *run_start,
                                    const int32_t *run_len, const int32_t *n_runs, int longest,
                                    const int32_t *page_table, int max_pages, int page_size, int n, int nH, int nKV,
                                    int hd, float scale, float *ws, OUT *out, cudaStream_t stream)
{
    bool wide = (longest * (nH / (nKV > 0 ? nKV : 1)) > ATT_WIDE_QUERIES && n <= ATT_WIDE_TOKENS) ||
                n <= ATT_FEW_TOKENS;
    if (n < 0 || nH <= 0 || nKV <= 0 || nH % nKV || nH / nKV > ATT_QUERIES || nKV > 65535 || page_size <= 0 ||
        max_pages <= 0 || hd <= 0 || hd > 256 || hd % 8 || ldq < nH * hd || !ws)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    cudaError_t e = wide ? launch_part<KV, 8>(q, ldq, k_cache, v_cache, seq, pos, run_start, run_len, n_runs,
                                              page_table, max_pages, page_size, n, nH, nKV, hd, scale, ws, stream)
                         : launch_part<KV, 4>(q, ldq, k_cache, v_cache, seq, pos, run_start, run_len, n_runs,
                                              page_table, max_pages, page_size, n, nH, nKV, hd, scale, ws, stream);
    if (e != cudaSuccess)
        return e;
    e = cudaGetLastError();
    if (e != cudaSuccess)
        return e;
    attention_merge_kernel<OUT><<<dim3((unsigned)n, (unsigned)nH), 128, 0, stream>>>(ws, nH, hd, out);
    return cudaGetLastError();
}

extern "C" cudaError_t ds_k_attention(const float *q, int ldq, const float *k_cache, const float *v_cache,
                                      const int32_t *seq, const int32_t *pos, const int32_t *run_start,
                                      const int32_t *run_len, const int32_t *n_runs, int longest,
                                      const int32_t *page_table, int max_pages, int page_size, int n, int nH, int nKV,
                                      int hd, float scale, float *ws, float *out, cudaStream_t stream)
{
    return attention_launch<float, float>(q, ldq, k_cache, v_cache, seq, pos, run_start, run_len, n_runs, longest,
                                          page_table, max_pages, page_size, n, nH, nKV, hd, scale, ws, out, stream);
}

extern "C" cudaError_t ds_k_attention_bf16(const float *q, int ldq, const uint16_t *k_cache,
                                           const uint16_t *v_cache, const int32_t *seq, const int32_t *pos,
                                           const int32_t *run_start, const int32_t *run_len, const int32_t *n_runs,
                                           int longest, const int32_t *page_table, int max_pages, int page_size,
                                           int n, int nH, int nKV, int hd, float scale, float *ws, uint16_t *out,
                                           cudaStream_t stream)
{
    return attention_launch<__nv_bfloat16, __nv_bfloat16>(
        q, ldq, (const __nv_bfloat16 *)k_cache, (const __nv_bfloat16 *)v_cache, seq, pos, run_start, run_len, n_runs,
        longest, page_table, max_pages, page_size, n, nH, nKV, hd, scale, ws, (__nv_bfloat16 *)out, stream);
}
