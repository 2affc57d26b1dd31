/* attention.cu: the paged KV cache append and causal attention over a
 * flattened ragged batch: a scalar f32 kernel (any head_dim, f32 or bf16
 * caches) and, further down, a tensor-core kernel that bf16 caches with
 * head_dim 64 or 128 take.
 *
 * Attention works on runs: up to ATT_QUERIES / G consecutive batch rows of
 * one sequence (G = query heads per KV head), computed by the host. A block
 * takes one run, one KV head and one of ATT_SCALAR_SPLIT position groups:
 * the positions fall into tiles of ATT_TILE, and block z takes tiles z, z + S,
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
#include "pdl.cuh"


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
    pdl_enter();
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
    return pdl_launch(kv_append_kernel<__nv_bfloat16>, dim3((unsigned)n, (unsigned)nKV), dim3(128), 0, stream, k,
                      ldk, v, ldv, seq, pos, page_table, max_pages, page_size, nKV * hd, hd,
                      (__nv_bfloat16 *)k_cache, (__nv_bfloat16 *)v_cache);
}

/* ---- attention ---- */
#define ATT_TILE 32                 /* positions per tile: one per lane */
/* Position groups per (run, KV head): the partials the merge takes for each (token, head). The
 * tensor-core kernel uses all of them (a group per 256 positions up to S x 256); the scalar kernel
 * the first ATT_SCALAR_SPLIT. A fixed count, never chosen per pass: a row's arithmetic must not depend
 * on its batch. A power of two from 8 to 32 (the merge holds a group per lane). Built with
 * -DATT_SPLIT=16, a single sequence past 4,096 positions fills the GPU better (a 4B step at 32,768
 * positions 21 % faster), while a verify block of 8 at 1,024 positions and four sequences at 32,768
 * are 1-4 % slower (bench/RESULTS.md); contexts up to 2,048 keep their bits. */
#ifndef ATT_SPLIT
#define ATT_SPLIT 8
#endif
#define ATT_SCALAR_SPLIT 8
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

/* Block (run, KV head g, group z < ATT_SCALAR_SPLIT): where the group holds a position of the run, writes
 * ws[((t nH + h) S + z)] = (m, l, acc[hd]), unnormalized, for each of the run's rows. */
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
    if (tile * ATT_TILE > last)
        return;                                   /* no visible position: the merge never reads this group */
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
    for (int it = 0; tile * ATT_TILE <= last; tile += ATT_SCALAR_SPLIT, it++) {
        int j0 = tile * ATT_TILE, next = tile + ATT_SCALAR_SPLIT;
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
            continue;                             /* no visible position here: the merge does not read the group */
#pragma unroll
        for (int r = 0; r < R; r++) {
            int d = lane + 32 * r;
            if (d < hd)
                out[2 + d] = acc[k][r];
        }
    }
}

/* Merge the position groups' partials of (token, head) in group order: one
 * warp per (token, head), MERGE_HEADS heads a block (one block per (token,
 * head) was tens of thousands of tiny blocks at a verification pass, bound by
 * their scheduling). Group z's first position is z x group_positions, so a
 * row at position p reads groups 0 .. p / group_positions (each holds a
 * position it sees) and no other (their partials may never have been
 * written). Lane z holds group z's max, sum and factor; lane j then takes
 * elements j, j + 32, ...; each element's arithmetic is the same whatever
 * the lane. */
#define MERGE_HEADS 8
#define MERGE_LOADS 8   /* groups whose values a lane loads together */
static_assert(ATT_SPLIT >= ATT_SCALAR_SPLIT && ATT_SPLIT <= 32 && (ATT_SPLIT & (ATT_SPLIT - 1)) == 0,
              "the scalar kernel's groups fit; a group per lane; a power of two");
template <typename OUT>
__global__ static void __launch_bounds__(MERGE_HEADS * 32)
attention_merge_kernel(const float *ws, const int32_t *pos, int nH, int hd, int groups, int group_positions, OUT *out)
{
    pdl_enter();
    int t = blockIdx.x, h = (int)(blockIdx.y * MERGE_HEADS + (threadIdx.x >> 5)), lane = threadIdx.x & 31;
    if (h >= nH)
        return;
    const float *part = ws + ((size_t)t * nH + h) * ATT_SPLIT * (hd + 2);
    float v[4][MERGE_LOADS];   /* elements lane + 32 j of groups z0 .. z0 + MERGE_LOADS - 1 */
    auto load_values = [&](int d0, int z0, int nz) {
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int k = 0; k < MERGE_LOADS; k++) {
                int d = d0 + lane + 32 * j, z = z0 + k;
                v[j][k] = d < hd && z < nz ? part[z * (hd + 2) + 2 + d] : 0.0f;
            }
    };
    int p = pos[t], nz = p < 0 ? 0 : min(groups, p / group_positions + 1);
    float Mz = lane < nz ? part[lane * (hd + 2)] : -INFINITY, Lz = lane < nz ? part[lane * (hd + 2) + 1] : 0.0f;
    load_values(0, 0, nz);
    float M = Mz;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float f = lane < nz ? expf(Mz - M) : 0.0f, L = 0.0f;
    for (int z = 0; z < nz; z++)
        L += __shfl_sync(0xffffffffu, Lz, z) * __shfl_sync(0xffffffffu, f, z);
    float inv = 1.0f / L;
    OUT *oh = out + ((size_t)t * nH + h) * hd;
    for (int d0 = 0; d0 < hd; d0 += 4 * 32) {   /* four elements a lane, a few groups' loads issued together */
        float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int z0 = 0; z0 < nz; z0 += MERGE_LOADS) {
            if (d0 > 0 || z0 > 0)
                load_values(d0, z0, nz);
#pragma unroll
            for (int k = 0; k < MERGE_LOADS; k++) {
                float fz = __shfl_sync(0xffffffffu, f, (z0 + k) & 31);
                if (z0 + k < nz && fz > 0.0f)
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        sum[j] += v[j][k] * fz;
            }
        }
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (d0 + lane + 32 * j < hd)
                oh[d0 + lane + 32 * j] = from_f32<OUT>(sum[j] * inv);
    }
}

/* ---- tensor-core attention over a bf16 cache ----
 * The same items (run, KV head g, group z; here ordered with z fastest, a
 * block taking a contiguous share) and the same layout of partials as
 * attention_part_kernel, for head_dim 64 or 128. Positions fall into tiles of
 * MMA_TILE; group z takes runs of MMA_RUN_TILES consecutive tiles (group_tile)
 * in increasing order (two in flight: cp.async into two stages). A block has
 * MMA_SLICES warps per m16 tile of queries (MT tiles: up to MT x 16 rows, token
 * x GQA head); warp w takes tile w / MMA_SLICES, and always positions
 * 16 s .. 16 s + 15 of each position tile (its slice s = w % MMA_SLICES).
 * Its 16 queries are scored against those 16 positions by
 * mma.sync (bf16 in, f32 accumulation, k = head_dim in increasing 16-wide
 * steps); q is split into a bf16 high part and a bf16 remainder, each with its
 * own product, so the scores keep about 16 bits of q. Each warp keeps its own
 * online softmax over its positions, and the value sum P V takes P split the
 * same way. Its reference max for a row moves only when a tile's scores pass
 * it by more than MMA_MAX_SLACK, so the weights exp(s - max) stay under e^8 and
 * the sums are rescaled a few times an item instead of at almost every tile.
 * At the end the block merges a row's four slices in slice order. A row's
 * arithmetic depends only on its own q, position and the cache rows: which
 * other rows share its m16 tile never enters, so the result is batch-invariant
 * like the scalar kernel's (not bit-equal to it). */
#define MMA_TILE 64                 /* positions per tile: 16 per slice */
#define MMA_SLICES 4                /* position slices of a tile: warps per m16 tile of queries */
#define MMA_RUN_TILES 4             /* consecutive tiles of a group (see group_tile) */
#define MMA_GROUP_POSITIONS (MMA_RUN_TILES * MMA_TILE)   /* group z's first position: z x this */
/* How far a row's scores may pass its reference max before it moves (natural log units): the o
 * rescale (16 n8 tiles a lane) had run at 96 % of tiles; with the slack, a q 8 pass is 2-4 % faster
 * (bench/RESULTS.md). The same arithmetic for every row whatever its batch. */
#define MMA_MAX_SLACK 8.0f

/* The i-th tile of position group z: the groups take runs of MMA_RUN_TILES
 * consecutive tiles in turn (group z the z-th run, then the (z + S)-th, ...),
 * so that at short contexts the first groups hold several tiles each and the
 * last ones none, rather than every group one or two. */
__device__ static inline int group_tile(int z, int i)
{
    return ((i / MMA_RUN_TILES) * ATT_SPLIT + z) * MMA_RUN_TILES + i % MMA_RUN_TILES;
}

__device__ static inline void ldmatrix_x4(unsigned (&r)[4], const void *p)
{
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ static inline void ldmatrix_x4_trans(unsigned (&r)[4], const void *p)
{
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
/* d (16 x 8, f32) += a (16 x 16, bf16, row-major) . b (16 x 8, bf16, column-major) */
__device__ static inline void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
/* Two f32 as a bf16 pair (low half first) and what rounding left of them. */
__device__ static inline void split_bf16x2(float x, float y, unsigned &hi, unsigned &lo)
{
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    float2 hf = __bfloat1622float2(h);
    __nv_bfloat162 l = __floats2bfloat162_rn(x - hf.x, y - hf.y);
    hi = *(unsigned *)&h;
    lo = *(unsigned *)&l;
}

/* Shared rows of HD bf16 with their 16-byte chunks swizzled (chunk c of row r at c ^ (r & 7)), so
 * that ldmatrix's eight rows at one column hit distinct banks without padding. col: a multiple of 8. */
template <int HD> __device__ static inline int swz(int r, int col)
{
    return r * HD + (((col >> 3) ^ (r & 7)) << 3);
}

template <int HD, int MT> struct MmaSmem {
    static constexpr int STAGE = 2 * MMA_TILE * HD;         /* K then V, bf16 elements */
    static constexpr int ROWS = MT * 16;
    static constexpr int THREADS = MMA_SLICES * MT * 32;   /* a warp per (m16 tile, slice) */
    static constexpr size_t PIPE = 2 * STAGE * 2;           /* two stages, bytes */
    /* per slice O (rows of OLD: 8 floats of padding, so that the rows' stores hit distinct banks), m, l; then
     * per row its sum and a factor per slice (f32) */
    static constexpr int OLD = HD + 8;
    static constexpr size_t MERGE = ((size_t)MMA_SLICES * ROWS * (OLD + 2) + ROWS + ROWS * MMA_SLICES) * 4;
    static constexpr size_t MAIN = PIPE > MERGE ? PIPE : MERGE;
    static constexpr size_t BYTES = MAIN + 2 * (size_t)ROWS * HD * 2 + ROWS * 4;   /* + q high, q low, positions */
};

/* The position group of slot s of a (run, g)'s items: s bit-reversed (0, S / 2, S / 4, 3 S / 4, ...).
 * The first groups hold the most tiles (at short contexts the last ones none), and a block that takes
 * a run of neighbouring items takes groups spread over the whole range, so the full ones spread over
 * the blocks (the order of work, never the arithmetic). */
__device__ static inline int slot_group(int slot)
{
    return (int)(__brev((unsigned)slot) >> (32 - __builtin_ctz(ATT_SPLIT)));
}

/* Ask L2 for the cache rows of the first two tiles of the block's first item (run, KV head g, group z),
 * one request per 128-byte line, before the kernel waits for the one before it: the metadata that
 * addresses them only host copies write, and L2 is where every SM's writes meet, so a row that the
 * append before is still writing is fetched again, or updated in place, by then. Not inlined: the item
 * loop's code stays as it is without it (inlined, the loop at R 64, q 8 measured up to 1 % slower). */
template <int HD>
__device__ static __noinline__ void warm_first_tiles(const __nv_bfloat16 *k_cache, const __nv_bfloat16 *v_cache,
                                                     const int32_t *seq, const int32_t *pos, const int32_t *run_start,
                                                     const int32_t *run_len, const int32_t *page_table,
                                                     int max_pages, int page_size, int page_shift, int nKV, int item)
{
    constexpr int LINES = HD * 2 / 128;   /* 128-byte lines of a row's head */
    int z = slot_group(item % ATT_SPLIT), g = item / ATT_SPLIT % nKV, run = item / (nKV * ATT_SPLIT);
    int t0 = run_start[run], ntok = run_len[run], last = 0;
    for (int i = 0; i < ntok; i++)
        last = max(last, pos[t0 + i]);
    const int32_t *pages = page_table + (size_t)seq[t0] * max_pages;
    for (int i = threadIdx.x; i < 2 * MMA_TILE * LINES; i += blockDim.x) {
        int j = group_tile(z, i / (MMA_TILE * LINES)) * MMA_TILE + i / LINES % MMA_TILE;
        if (j > last)
            continue;
        int pg = page_shift >= 0 ? j >> page_shift : j / page_size;
        size_t off = ((size_t)pages[pg] * page_size + (j - pg * page_size)) * nKV * HD + (size_t)g * HD +
                     (i % LINES) * 64;
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(k_cache + off));
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(v_cache + off));
    }
}

template <int HD, int MT>
__global__ static void __launch_bounds__(MmaSmem<HD, MT>::THREADS, 2)
attention_mma_kernel(const float *q, int ldq, const __nv_bfloat16 *k_cache, const __nv_bfloat16 *v_cache,
                     const int32_t *seq, const int32_t *pos, const int32_t *run_start, const int32_t *run_len,
                     const int32_t *n_runs, const int32_t *page_table, int max_pages, int page_size, int page_shift,
                     int nH, int nKV, float scale, float *ws)
{
    typedef MmaSmem<HD, MT> L;
    constexpr int ROWS = L::ROWS, NT = HD / 8;   /* NT: n8 tiles of a value row */
    extern __shared__ __align__(16) unsigned char att_smem[];
    __nv_bfloat16 *stage0 = (__nv_bfloat16 *)att_smem;                 /* [2][K: TILE x HD, V: TILE x HD] */
    __nv_bfloat16 *q_hi = (__nv_bfloat16 *)(att_smem + L::MAIN);       /* [ROWS, HD] */
    __nv_bfloat16 *q_lo = q_hi + ROWS * HD;                             /* [ROWS, HD] */
    int *qpos_s = (int *)(q_lo + ROWS * HD);                            /* [ROWS] (all swizzled rows) */
    /* Items (run, KV head g, group z) in one flat order, group fastest, then KV head, then run. The
     * grid holds only as many blocks as fit the GPU at once (the launch shape depends on the pass's
     * token count, while its runs, at most one per token, are often far fewer, and blocks for
     * absent runs would cost their scheduling), and block b takes a contiguous share of the items,
     * so that consecutive items of a block are mostly the groups of one (run, g): their queries
     * are loaded once. */
    int n_items = *n_runs * nKV * ATT_SPLIT;
    int share = (n_items + (int)gridDim.x - 1) / (int)gridDim.x;
    int item_end = min(n_items, ((int)blockIdx.x + 1) * share);
    if ((int)blockIdx.x * share < item_end)
        warm_first_tiles<HD>(k_cache, v_cache, seq, pos, run_start, run_len, page_table, max_pages, page_size,
                             page_shift, nKV, (int)blockIdx.x * share);
    pdl_enter();
    int q_pair = -1;   /* the (run, g) whose queries q_hi, q_lo and qpos_s hold */
    int m_run = -1, t0 = 0, ntok = 0, last = 0;   /* the run whose first token, length and last position these are */
    const int32_t *pages = page_table;            /* its sequence's pages */
    int pair = -1, g = 0, groups = 0;   /* the (run, g) of the items, and how many of its groups hold a position */
    for (int item = (int)blockIdx.x * share; item < item_end; item++) {
        if (item / ATT_SPLIT != pair) {   /* once for a block's consecutive items of one (run, g) */
            pair = item / ATT_SPLIT;
            g = pair % nKV;
            int run = pair / nKV;
            if (run != m_run) {   /* once for its consecutive items of one run (its KV heads and groups) */
                m_run = run;
                t0 = run_start[run];
                ntok = run_len[run];
                pages = page_table + (size_t)seq[t0] * max_pages;
                last = 0;
                for (int i = 0; i < ntok; i++)
                    last = max(last, pos[t0 + i]);
            }
            groups = min(ATT_SPLIT, last / MMA_GROUP_POSITIONS + 1);
        }
        int z = slot_group(item % ATT_SPLIT);
        if (z >= groups)
            continue;   /* no position of this group is visible: the merge never reads its partials */
        int lane = threadIdx.x & 31, w = threadIdx.x >> 5, gr = lane >> 2, tq = lane & 3;
        int mt = w / MMA_SLICES, sl = w % MMA_SLICES;   /* this warp's m16 tile and position slice */
        int G = nH / nKV, nq = G * ntok;
        size_t row = (size_t)nKV * HD;
        constexpr int THREADS = L::THREADS, CPR = HD / 8;    /* CPR: 16-byte chunks per row */
        constexpr int RPI = THREADS / CPR, ITER = MMA_TILE / RPI;   /* rows per step, steps per tile */

        /* start loading tile `tile` into stage st: thread x copies chunk x % CPR of rows x / CPR + RPI i,
         * all its page-table reads first (they would serialize between the copies) */
        auto prefetch = [&](int tile, int st) {
            __nv_bfloat16 *Ks = stage0 + st * L::STAGE, *Vs = Ks + MMA_TILE * HD;
            int j0 = tile * MMA_TILE, ch = threadIdx.x % CPR, r0 = threadIdx.x / CPR;
            size_t off[ITER];
#pragma unroll
            for (int i = 0; i < ITER; i++) {
                int j = min(j0 + r0 + RPI * i, last);   /* past the end: a valid row, masked below */
                int pg = page_shift >= 0 ? j >> page_shift : j / page_size;
                off[i] = ((size_t)pages[pg] * page_size + (j - pg * page_size)) * row + (size_t)g * HD + ch * 8;
            }
#pragma unroll
            for (int i = 0; i < ITER; i++) {
                int jj = r0 + RPI * i;
                cp_async16(Ks + swz<HD>(jj, ch * 8), k_cache + off[i]);
                cp_async16(Vs + swz<HD>(jj, ch * 8), v_cache + off[i]);
            }
            asm volatile("cp.async.commit_group;\n" ::);
        };

        /* two tiles in flight: the first two now, tile i + 2 once tile i is done */
        int tile = group_tile(z, 0);
        if (tile * MMA_TILE <= last)
            prefetch(tile, 0);
        if (group_tile(z, 1) * MMA_TILE <= last)
            prefetch(group_tile(z, 1), 1);
        /* the queries, four elements a thread at a time (ldq and HD are multiples of 4); the previous
         * item's when it had the same (run, g) (nothing else writes q_hi, q_lo or qpos_s) */
        bool new_q = q_pair != pair;
        q_pair = pair;
#pragma unroll 4
        for (int i = threadIdx.x; new_q && i < ROWS * HD / 4; i += THREADS) {
            int qi = i / (HD / 4), d = i % (HD / 4) * 4;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (qi < nq)
                v = *(const float4 *)(q + (size_t)(t0 + qi / G) * ldq + (size_t)(g * G + qi % G) * HD + d);
            unsigned h[2], l[2];
            split_bf16x2(v.x * scale, v.y * scale, h[0], l[0]);
            split_bf16x2(v.z * scale, v.w * scale, h[1], l[1]);
            int at = swz<HD>(qi, d & ~7) + (d & 7);
            *(uint2 *)(q_hi + at) = make_uint2(h[0], h[1]);
            *(uint2 *)(q_lo + at) = make_uint2(l[0], l[1]);
        }
        for (int i = threadIdx.x; new_q && i < ROWS; i += blockDim.x)
            qpos_s[i] = i < nq ? pos[t0 + i / G] : -1;

        float o[NT][4], m[2], l[2];
#pragma unroll
        for (int r = 0; r < 2; r++)
            m[r] = -INFINITY, l[r] = 0.0f;
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int c = 0; c < 4; c++)
                o[n][c] = 0.0f;
        int pw = 16 * sl;   /* this warp's first position within a tile */
        bool rows_here = mt * 16 < nq;   /* else this warp's m16 tile holds no query of the run */
        for (int it = 0; (tile = group_tile(z, it)) * MMA_TILE <= last; it++) {
            int j0 = tile * MMA_TILE;
            if (group_tile(z, it + 1) * MMA_TILE <= last)   /* the next tile's copies were issued after this one's */
                asm volatile("cp.async.wait_group 1;\n" ::);
            else
                asm volatile("cp.async.wait_group 0;\n" ::);
            __syncthreads();   /* this tile (and the queries) visible to all */
            const __nv_bfloat16 *Ks = stage0 + (it & 1) * L::STAGE, *Vs = Ks + MMA_TILE * HD;
            /* else every position of this warp's slice is past every query */
            if (rows_here && j0 + pw <= last) {
                /* scores s[j][c]: rows gr (c 0, 1) and gr + 8 (c 2, 3), positions pw + 8 j + 2 tq + (c & 1) */
                float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++) {
                    unsigned kb[4], a[4];
                    ldmatrix_x4(kb, Ks + swz<HD>(pw + (lane & 7) + 8 * (lane >> 4), 16 * kk + 8 * ((lane >> 3) & 1)));
                    const int qa = swz<HD>(mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1), 16 * kk + 8 * (lane >> 4));
                    ldmatrix_x4(a, q_hi + qa);
                    mma_bf16(s[0], a, kb[0], kb[1]);
                    mma_bf16(s[1], a, kb[2], kb[3]);
                    ldmatrix_x4(a, q_lo + qa);
                    mma_bf16(s[0], a, kb[0], kb[1]);
                    mma_bf16(s[1], a, kb[2], kb[3]);
                }
                float p[2][4];
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    int qp = qpos_s[mt * 16 + gr + 8 * r];
                    float x[4];
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        int j = j0 + pw + 8 * (c >> 1) + 2 * tq + (c & 1);
                        x[c] = j <= qp ? s[c >> 1][2 * r + (c & 1)] : -INFINITY;
                    }
                    float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    /* the reference max moves only past MMA_MAX_SLACK (see above); o and l are still 0 before
                     * the row's first visible position, so they need no factor then */
                    float mn = mx > m[r] + MMA_MAX_SLACK ? mx : m[r];
                    float corr = m[r] == -INFINITY || mn == m[r] ? 1.0f : expf(m[r] - mn);
#pragma unroll
                    for (int c = 0; c < 4; c++)
                        p[c >> 1][2 * r + (c & 1)] = x[c] == -INFINITY ? 0.0f : expf(x[c] - mn);
                    float ps = (p[0][2 * r] + p[0][2 * r + 1]) + (p[1][2 * r] + p[1][2 * r + 1]);
                    ps += __shfl_xor_sync(0xffffffffu, ps, 1);
                    ps += __shfl_xor_sync(0xffffffffu, ps, 2);
                    l[r] = l[r] * corr + ps;
                    m[r] = mn;
                    if (__any_sync(0xffffffffu, corr != 1.0f))   /* x 1 changes nothing: skip it */
#pragma unroll
                        for (int n = 0; n < NT; n++) {
                            o[n][2 * r] *= corr;
                            o[n][2 * r + 1] *= corr;
                        }
                }
                /* P as the A operand (rows x 16 positions): the score tiles' layout is the A layout */
                unsigned ph[4], pl[4];
                split_bf16x2(p[0][0], p[0][1], ph[0], pl[0]);
                split_bf16x2(p[0][2], p[0][3], ph[1], pl[1]);
                split_bf16x2(p[1][0], p[1][1], ph[2], pl[2]);
                split_bf16x2(p[1][2], p[1][3], ph[3], pl[3]);
#pragma unroll
                for (int np = 0; np < HD / 16; np++) {
                    unsigned vb[4];
                    ldmatrix_x4_trans(vb, Vs + swz<HD>(pw + (lane & 7) + 8 * ((lane >> 3) & 1), 16 * np + 8 * (lane >> 4)));
                    mma_bf16(o[2 * np], ph, vb[0], vb[1]);
                    mma_bf16(o[2 * np], pl, vb[0], vb[1]);
                    mma_bf16(o[2 * np + 1], ph, vb[2], vb[3]);
                    mma_bf16(o[2 * np + 1], pl, vb[2], vb[3]);
                }
            }
            __syncthreads();   /* the stage is free: the tile after next goes there */
            if (group_tile(z, it + 2) * MMA_TILE <= last)
                prefetch(group_tile(z, it + 2), it & 1);
        }
        asm volatile("cp.async.wait_group 0;\n" ::);
        __syncthreads();

        /* merge the slices in slice order: per slice O [ROWS, OLD], then m [ROWS], l [ROWS] */
        constexpr int OLD = L::OLD;
        float *ow = (float *)att_smem, *mw = ow + MMA_SLICES * ROWS * OLD, *lw = mw + MMA_SLICES * ROWS;
        float *fw = lw + (MMA_SLICES + 1) * ROWS;   /* [ROWS][MMA_SLICES]; lw's last ROWS: each row's sum */
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int qr = mt * 16 + gr + 8 * r;
            float *dst = ow + ((size_t)sl * ROWS + qr) * OLD;
#pragma unroll
            for (int n = 0; n < NT; n++)
                *(float2 *)(dst + 8 * n + 2 * tq) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
            if (tq == 0) {
                mw[sl * ROWS + qr] = m[r];
                lw[sl * ROWS + qr] = l[r];
            }
        }
        __syncthreads();
        /* per row: its max and sum, and each slice's factor (0 for a slice that saw none of its positions) */
        for (int qi = threadIdx.x; qi < nq; qi += blockDim.x) {
            float M = -INFINITY;
            for (int v = 0; v < MMA_SLICES; v++)
                if (lw[v * ROWS + qi] > 0.0f)
                    M = fmaxf(M, mw[v * ROWS + qi]);
            float Lsum = 0.0f;
            for (int v = 0; v < MMA_SLICES; v++) {
                float lv = lw[v * ROWS + qi], f = 0.0f;
                if (lv > 0.0f) {
                    f = expf(mw[v * ROWS + qi] - M);
                    Lsum += lv * f;
                }
                fw[qi * MMA_SLICES + v] = f;
            }
            int t = t0 + qi / G, h = g * G + qi % G;
            float *out = ws + (((size_t)t * nH + h) * ATT_SPLIT + z) * (HD + 2);
            out[0] = M;
            out[1] = Lsum;
            lw[MMA_SLICES * ROWS + qi] = Lsum;
        }
        __syncthreads();
        /* the values, four elements a thread at a time, added in slice order */
        for (int i = threadIdx.x; i < nq * HD / 4; i += blockDim.x) {
            int qi = i / (HD / 4), d = i % (HD / 4) * 4;
            if (!(lw[MMA_SLICES * ROWS + qi] > 0.0f))
                continue;   /* no visible position here: the merge does not read the group */
            float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int v = 0; v < MMA_SLICES; v++)
                if (lw[v * ROWS + qi] > 0.0f) {
                    float f = fw[qi * MMA_SLICES + v];
                    float4 ov = *(const float4 *)(ow + ((size_t)v * ROWS + qi) * OLD + d);
                    acc.x += ov.x * f;
                    acc.y += ov.y * f;
                    acc.z += ov.z * f;
                    acc.w += ov.w * f;
                }
            int t = t0 + qi / G, h = g * G + qi % G;
            float *out = ws + (((size_t)t * nH + h) * ATT_SPLIT + z) * (HD + 2) + 2 + d;
            *(float2 *)out = make_float2(acc.x, acc.y);   /* rows of HD + 2 floats: 8-byte aligned */
            *(float2 *)(out + 2) = make_float2(acc.z, acc.w);
        }
        __syncthreads();   /* the merge's shared rows are the next item's stages */
    }
}

/* Allow kernel instance K `bytes` of dynamic shared memory, once (the attribute stays with the function). */
template <auto K> static cudaError_t allow_smem_once(int bytes)
{
    static bool done;
    if (done)
        return cudaSuccess;
    cudaError_t e = cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    done = e == cudaSuccess;
    return e;
}

template <int HD, int MT>
static cudaError_t launch_mma(const float *q, int ldq, const __nv_bfloat16 *k_cache, const __nv_bfloat16 *v_cache,
                              const int32_t *seq, const int32_t *pos, const int32_t *run_start,
                              const int32_t *run_len, const int32_t *n_runs, const int32_t *page_table,
                              int max_pages, int page_size, int n, int nH, int nKV, float scale, float *ws,
                              cudaStream_t stream)
{
    size_t smem = MmaSmem<HD, MT>::BYTES;
    cudaError_t e = allow_smem_once<attention_mma_kernel<HD, MT>>((int)smem);
    if (e != cudaSuccess)
        return e;
    static int resident;   /* blocks that fit the GPU at once */
    if (!resident) {
        int dev = 0, sms = 0, per_sm = 0;
        if ((e = cudaGetDevice(&dev)) != cudaSuccess ||
            (e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess ||
            (e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, attention_mma_kernel<HD, MT>, MmaSmem<HD, MT>::THREADS,
                                                               smem)) != cudaSuccess)
            return e;
        resident = sms * (per_sm > 0 ? per_sm : 1);
    }
    long items = (long)n * nKV * ATT_SPLIT;   /* at most one run per token */
    unsigned grid = (unsigned)(items < resident ? items : resident);
    int page_shift = -1;   /* pages of 2^s positions: shifts instead of divisions */
    for (int sh = 0; sh < 31; sh++)
        if (page_size == 1 << sh)
            page_shift = sh;
    return pdl_launch(attention_mma_kernel<HD, MT>, dim3(grid), dim3(MmaSmem<HD, MT>::THREADS), smem, stream, q, ldq, k_cache,
                      v_cache, seq, pos, run_start, run_len, n_runs, page_table, max_pages, page_size, page_shift, nH,
                      nKV, scale, ws);
}

/* The tensor-core kernel where it applies (head_dim 64 or 128, q 16-byte aligned with ldq a multiple of
 * 4); else cudaErrorNotSupported. Blocks carry one m16 tile of queries when every run has at most 16,
 * else two. */
static cudaError_t launch_mma_part(const float *q, int ldq, const __nv_bfloat16 *k_cache,
                                   const __nv_bfloat16 *v_cache, const int32_t *seq, const int32_t *pos,
                                   const int32_t *run_start, const int32_t *run_len, const int32_t *n_runs,
                                   int longest, const int32_t *page_table, int max_pages, int page_size, int n,
                                   int nH, int nKV, int hd, float scale, float *ws, cudaStream_t stream)
{
    if (ldq % 4 || (uintptr_t)q % 16)
        return cudaErrorNotSupported;   /* the queries are read as float4 */
    bool two = longest * (nH / nKV) > 16;
#define MMA_CASE(HD)                                                                                             \
    if (hd == HD)                                                                                                \
        return two ? launch_mma<HD, 2>(q, ldq, k_cache, v_cache, seq, pos, run_start, run_len, n_runs,          \
                                       page_table, max_pages, page_size, n, nH, nKV, scale, ws, stream)          \
                   : launch_mma<HD, 1>(q, ldq, k_cache, v_cache, seq, pos, run_start, run_len, n_runs,          \
                                       page_table, max_pages, page_size, n, nH, nKV, scale, ws, stream);
    MMA_CASE(64)
    MMA_CASE(128)
#undef MMA_CASE
    return cudaErrorNotSupported;
}

template <typename KV, int W>
static cudaError_t launch_part(const float *q, int ldq, const KV *k_cache, const KV *v_cache, const int32_t *seq,
                               const int32_t *pos, const int32_t *run_start, const int32_t *run_len,
                               const int32_t *n_runs, const int32_t *page_table, int max_pages, int page_size, int n,
                               int nH, int nKV, int hd, float scale, float *ws, cudaStream_t stream)
{
    size_t smem = AttSmem<KV>::bytes(hd);
    dim3 grid((unsigned)n, (unsigned)nKV, ATT_SCALAR_SPLIT), block(W * 32);
    cudaError_t e = cudaSuccess;
#define ATT_CASE(RR)                                                                                           \
    case RR:                                                                                                   \
        e = allow_smem_once<attention_part_kernel<KV, RR, W>>((int)AttSmem<KV>::bytes(256)); /* largest hd */ \
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

/* The tensor-core kernel for bf16 caches where it applies; cudaErrorNotSupported otherwise. */
static cudaError_t try_mma_part(const float *, int, const float *, const float *, const int32_t *, const int32_t *,
                                const int32_t *, const int32_t *, const int32_t *, int, const int32_t *, int, int,
                                int, int, int, int, float, float *, cudaStream_t)
{
    return cudaErrorNotSupported;
}
static cudaError_t try_mma_part(const float *q, int ldq, const __nv_bfloat16 *k_cache, const __nv_bfloat16 *v_cache,
                                const int32_t *seq, const int32_t *pos, const int32_t *run_start,
                                const int32_t *run_len, const int32_t *n_runs, int longest, const int32_t *page_table,
                                int max_pages, int page_size, int n, int nH, int nKV, int hd, float scale, float *ws,
                                cudaStream_t stream)
{
    return launch_mma_part(q, ldq, k_cache, v_cache, seq, pos, run_start, run_len, n_runs, longest, page_table,
                           max_pages, page_size, n, nH, nKV, hd, scale, ws, stream);
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
    cudaError_t e = try_mma_part(q, ldq, k_cache, v_cache, seq, pos, run_start, run_len, n_runs, longest, page_table,
                                 max_pages, page_size, n, nH, nKV, hd, scale, ws, stream);
    /* the groups the part kernel filled, and the positions between their first ones */
    int groups = ATT_SPLIT, group_positions = MMA_GROUP_POSITIONS;
    if (e == cudaErrorNotSupported) {
        groups = ATT_SCALAR_SPLIT;
        group_positions = ATT_TILE;
        e = wide ? launch_part<KV, 8>(q, ldq, k_cache, v_cache, seq, pos, run_start, run_len, n_runs,
                                      page_table, max_pages, page_size, n, nH, nKV, hd, scale, ws, stream)
                 : launch_part<KV, 4>(q, ldq, k_cache, v_cache, seq, pos, run_start, run_len, n_runs,
                                      page_table, max_pages, page_size, n, nH, nKV, hd, scale, ws, stream);
    }
    if (e != cudaSuccess)
        return e;
    e = cudaGetLastError();
    if (e != cudaSuccess)
        return e;
    return pdl_launch(attention_merge_kernel<OUT>, dim3((unsigned)n, (unsigned)((nH + MERGE_HEADS - 1) / MERGE_HEADS)),
                      dim3(MERGE_HEADS * 32), 0, stream, ws, pos, nH, hd, groups, group_positions, out);
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
