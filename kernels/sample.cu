/* sample.cu: sampling on the device with explicit uniforms: the sampling
 * distribution of a row of logits (ds_probs), inverse-CDF draws
 * (ds_sample_probs), the residual draw norm(max(0, p - q)), and the chain
 * accept/reject of one speculative round per sequence.
 *
 * One block of SAMPLE_THREADS threads per row (or per sequence); the sampling
 * distribution spreads a row over a cluster of up to 8 blocks when there are
 * few rows (each block takes a contiguous slice; the blocks combine their
 * partial results through distributed shared memory, in rank order, so the
 * result does not depend on scheduling). Nothing is sorted: the top-k and top-p cuts find the value of the last kept token by a
 * search over the bit patterns of the probabilities (non-negative floats order
 * like their bits), SEARCH_WAYS - 1 thresholds per pass over the row, then keep
 * every larger value and, of the tokens equal to it, the lowest ids (the
 * ranking's tie rule).
 *
 * Masses are summed as 2^-60 fixed-point integers, so a sum is exact and
 * independent of the order of its terms: cuts and draws depend only on the
 * row. The exponentials are exp in double rounded to float (correctly rounded
 * but for rare double-rounding cases), so the probabilities equal the CPU's
 * expf-based ones bit for bit nearly always; where glibc's expf (within 0.502
 * ulp) rounds the other way, they differ by one ulp. */
#include <math.h>
#include <stdint.h>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "kernels.h"

#define SAMPLE_THREADS 1024
#define N_WARPS (SAMPLE_THREADS / 32)
#define SEARCH_WAYS 16
#define MAX_CLUSTER 8                   /* blocks per row at most (the portable cluster size) */
#define FULL_MASK 0xffffffffu
#define FX_ONE 1152921504606846976.0   /* 2^60: the fixed-point unit of masses */
#define GREEDY_TEMPERATURE 1e-5f        /* DS_GREEDY_TEMPERATURE */
#define RESIDUAL_MIN_MASS 1e-8          /* below it the residual draw falls back to p */
#define MIN_DRAFT_PROB 1e-8f            /* the acceptance test's floor under q */

/* A probability as a 2^-60 fixed-point integer (rows sum to well under 8). */
__device__ static inline uint64_t to_fx(float p)
{
    return p > 0.0f ? __double2ull_rz((double)p * FX_ONE) : 0;
}

__device__ static inline int lane_id(void)
{
    return threadIdx.x & 31;
}

__device__ static inline int warp_id(void)
{
    return threadIdx.x >> 5;
}

/* Each warp owns one contiguous segment of the row (a multiple of 32 long), walked 32 at a time. */
__device__ static inline int segment_len(int V)
{
    return ((V + N_WARPS - 1) / N_WARPS + 31) & ~31;
}

/* ---- block reductions (every thread gets the result) ---- */
/* A sum in a fixed order (butterflies in each warp, then the warps in order), so
 * a double sum does not depend on scheduling; T is uint64_t or double. */
template <typename T> __device__ static T block_sum(T v, T *red /* [N_WARPS] */)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if (lane_id() == 0)
        red[warp_id()] = v;
    __syncthreads();
    T s = 0;
    for (int i = 0; i < N_WARPS; i++)
        s += red[i];
    return s;
}

/* (bv, bi) becomes the better of itself and (v, i): larger value, then lower index. */
__device__ static inline void better(float &bv, int &bi, float v, int i)
{
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

/* ---- the sampling distribution ---- */
namespace cg = cooperative_groups;

/* What the blocks of a cluster exchange, twice over: exchange i uses set i % 2,
 * so one cluster barrier per exchange suffices (a block writes set i % 2 again
 * only after every block has passed exchange i + 1, so done reading i). */
struct probs_xchg {
    uint64_t u[2][SEARCH_WAYS];
    double d[2];
    float fv[2];
    int fi[2];
};

struct probs_smem {
    uint64_t red[N_WARPS * SEARCH_WAYS];
    double red_d[N_WARPS];
    float sv[N_WARPS];
    int si[N_WARPS];
    uint32_t th[SEARCH_WAYS];
    uint64_t f[SEARCH_WAYS];
    uint32_t lo, hi;
    uint64_t f_lo, f_hi1;
    int warp_eq[N_WARPS];
    struct probs_xchg x;
    int par;   /* the set of x the next exchange uses (thread 0's; read after a barrier) */
    int from, to;   /* this block's slice of the row */
};

/* Publish the block's values v[0..n) (threads 0..n-1 hold them) and return, to
 * thread j < n, the sum over the cluster's blocks in rank order. Every thread
 * of every block of the cluster must call it. */
__device__ static uint64_t cluster_sum_u64(uint64_t v, int n, struct probs_smem *sm)
{
    cg::cluster_group cl = cg::this_cluster();
    int p = sm->par;
    if ((int)threadIdx.x < n)
        sm->x.u[p][threadIdx.x] = v;
    cl.sync();
    uint64_t s = 0;
    if ((int)threadIdx.x < n)
        for (unsigned b = 0; b < cl.num_blocks(); b++)
            s += cl.map_shared_rank(sm, b)->x.u[p][threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0)
        sm->par = p ^ 1;
    __syncthreads();
    return s;
}

/* The same for one double (thread 0's), the sum returned to every thread. */
__device__ static double cluster_sum_d(double v, struct probs_smem *sm)
{
    cg::cluster_group cl = cg::this_cluster();
    int p = sm->par;
    if (threadIdx.x == 0)
        sm->x.d[p] = v;
    cl.sync();
    double s = 0;
    for (unsigned b = 0; b < cl.num_blocks(); b++)
        s += cl.map_shared_rank(sm, b)->x.d[p];
    __syncthreads();
    if (threadIdx.x == 0)
        sm->par = p ^ 1;
    __syncthreads();
    return s;
}

/* Σ v over the block, then over the cluster; every thread gets it. */
__device__ static uint64_t row_sum_all(uint64_t v, struct probs_smem *sm)
{
    uint64_t s = cluster_sum_u64(block_sum(v, sm->red), 1, sm);
    if (threadIdx.x == 0)
        sm->red[0] = s;
    __syncthreads();
    s = sm->red[0];
    __syncthreads();
    return s;
}

/* F(t) = Σ w_i over the tokens whose bits are >= t, for t = th[1..SEARCH_WAYS) into
 * sm->f[1..]; w_i is 1 (count) or p_i in fixed point (mass). Integer sums: exact.
 * Only the tokens between th[1] and the search's hi are visited: the ones below
 * count for no threshold, and the ones above count for all, with the weight
 * F(hi + 1) = sm->f_hi1 the search already knows (so each pass gets cheaper as
 * the range narrows). */
__device__ static void eval_thresholds(const float *p, bool by_mass, struct probs_smem *sm)
{
    uint32_t th[SEARCH_WAYS - 1];
    uint64_t acc[SEARCH_WAYS - 1];
#pragma unroll
    for (int j = 0; j < SEARCH_WAYS - 1; j++) {
        th[j] = sm->th[j + 1];
        acc[j] = 0;
    }
    uint32_t lo1 = th[0], hi = sm->hi;
    for (int i = sm->from + threadIdx.x; i < sm->to; i += blockDim.x) {
        float v = p[i];
        uint32_t b = __float_as_uint(v);
        if (b < lo1 || b > hi)
            continue;
        uint64_t w = by_mass ? to_fx(v) : 1;
#pragma unroll
        for (int j = 0; j < SEARCH_WAYS - 1; j++)
            if (b >= th[j])
                acc[j] += w;
    }
#pragma unroll
    for (int j = 0; j < SEARCH_WAYS - 1; j++)
        for (int o = 16; o > 0; o >>= 1)
            acc[j] += __shfl_xor_sync(FULL_MASK, acc[j], o);
    __syncthreads();
    if (lane_id() == 0)
#pragma unroll
        for (int j = 0; j < SEARCH_WAYS - 1; j++)
            sm->red[warp_id() * SEARCH_WAYS + j] = acc[j];
    __syncthreads();
    uint64_t s = 0;
    if (threadIdx.x < SEARCH_WAYS - 1)
        for (int w = 0; w < N_WARPS; w++)
            s += sm->red[w * SEARCH_WAYS + threadIdx.x];
    s = cluster_sum_u64(s, SEARCH_WAYS - 1, sm);
    if (threadIdx.x < SEARCH_WAYS - 1)
        sm->f[threadIdx.x + 1] = s + sm->f_hi1;
    __syncthreads();
}

/* F at a single threshold t. */
__device__ static uint64_t eval_one(const float *p, uint32_t t, bool by_mass, struct probs_smem *sm)
{
    uint64_t acc = 0;
    for (int i = sm->from + threadIdx.x; i < sm->to; i += blockDim.x) {
        float v = p[i];
        if (__float_as_uint(v) >= t)
            acc += by_mass ? to_fx(v) : 1;
    }
    return row_sum_all(acc, sm);
}

/* The largest bit pattern u with F(u) >= target, given F(lo) = f_lo >= target and
 * F(hi + 1) = f_hi1 < target (so u is the value of a token of the row). Returns u;
 * *ret_above = F(u + 1), the weight of the tokens strictly above u. Every block
 * of the cluster takes the same steps (the same sums, the same rule). */
__device__ static uint32_t search(const float *p, uint32_t lo, uint64_t f_lo, uint32_t hi, uint64_t f_hi1,
                                  uint64_t target, bool by_mass, struct probs_smem *sm, uint64_t *ret_above)
{
    if (threadIdx.x == 0) {
        sm->lo = lo, sm->hi = hi, sm->f_lo = f_lo, sm->f_hi1 = f_hi1;
    }
    __syncthreads();
    while (sm->lo < sm->hi) {
        uint64_t size = (uint64_t)sm->hi - sm->lo + 1;
        int n_th = size < SEARCH_WAYS ? (int)size : SEARCH_WAYS;
        if (threadIdx.x < SEARCH_WAYS)
            sm->th[threadIdx.x] = (int)threadIdx.x < n_th ? sm->lo + (uint32_t)(size * threadIdx.x / n_th)
                                                          : 0xffffffffu;
        __syncthreads();
        eval_thresholds(p, by_mass, sm);
        if (threadIdx.x == 0) {
            int j = 0;   /* the last threshold still reaching the target */
            for (int k = 1; k < n_th; k++)
                if (sm->f[k] >= target)
                    j = k;
            uint64_t f_j = j ? sm->f[j] : sm->f_lo;
            if (j + 1 < n_th) {
                sm->hi = sm->th[j + 1] - 1;
                sm->f_hi1 = sm->f[j + 1];
            }
            sm->lo = sm->th[j];
            sm->f_lo = f_j;
        }
        __syncthreads();
    }
    uint32_t u = sm->lo;
    *ret_above = sm->f_hi1;
    __syncthreads();   /* sm is reused by the caller */
    return u;
}

/* Keep the tokens above value bits u and the first m (in index order) equal to it,
 * scaled by renorm; zero the rest. Two passes over the block's slice, each warp
 * walking its own contiguous segment; the blocks before this one in the cluster
 * (the slices before this one) pass on their count of equal tokens. */
__device__ static void write_kept(float *o, uint32_t u, uint64_t m, float renorm, struct probs_smem *sm)
{
    int seg = segment_len(sm->to - sm->from), w = warp_id(), lane = lane_id();
    int from = sm->from + w * seg, to = from + seg < sm->to ? from + seg : sm->to;
    int n_eq = 0;
    for (int base = from; base < to; base += 32) {
        int i = base + lane;
        n_eq += __popc(__ballot_sync(FULL_MASK, i < to && __float_as_uint(o[i]) == u));
    }
    if (lane == 0)
        sm->warp_eq[w] = n_eq;
    __syncthreads();
    uint64_t block_eq = 0;
    for (int k = 0; k < N_WARPS; k++)
        block_eq += (uint64_t)sm->warp_eq[k];
    /* equal tokens in the slices before this block's */
    cg::cluster_group cl = cg::this_cluster();
    int p = sm->par;
    if (threadIdx.x == 0)
        sm->x.u[p][0] = block_eq;
    cl.sync();
    uint64_t rank = 0;
    for (unsigned b = 0; b < cl.block_rank(); b++)
        rank += cl.map_shared_rank(sm, b)->x.u[p][0];
    for (int k = 0; k < w; k++)
        rank += (uint64_t)sm->warp_eq[k];
    for (int base = from; base < to; base += 32) {
        int i = base + lane;
        uint32_t b = i < to ? __float_as_uint(o[i]) : 0;
        bool eq = i < to && b == u;
        unsigned bal = __ballot_sync(FULL_MASK, eq);
        uint64_t my_rank = rank + (uint64_t)__popc(bal & ((1u << lane) - 1u));
        if (i < to) {
            bool keep = b > u || (eq && my_rank < m);
            o[i] = keep ? __fmul_rn(o[i], renorm) : 0.0f;
        }
        rank += (uint64_t)__popc(bal);
    }
    __syncthreads();
    if (threadIdx.x == 0)
        sm->par = p ^ 1;
    __syncthreads();
}

/* The first maximum of the row (ds_argmax: index 0 when nothing beats -inf),
 * over the cluster; every thread gets it. */
__device__ static int row_argmax(const float *x, struct probs_smem *sm, float *ret_max)
{
    float x0 = x[0];   /* read before the barrier below: after it, x may be overwritten */
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = sm->from + threadIdx.x; i < sm->to; i += blockDim.x)
        better(bv, bi, x[i], i);
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        better(bv, bi, ov, oi);
    }
    __syncthreads();
    if (lane_id() == 0) {
        sm->sv[warp_id()] = bv;
        sm->si[warp_id()] = bi;
    }
    __syncthreads();
    cg::cluster_group cl = cg::this_cluster();
    int p = sm->par;
    if (threadIdx.x == 0) {
        bv = sm->sv[0];
        bi = sm->si[0];
        for (int w = 1; w < N_WARPS; w++)
            better(bv, bi, sm->sv[w], sm->si[w]);
        sm->x.fv[p] = bv;
        sm->x.fi[p] = bi;
    }
    cl.sync();
    bv = -INFINITY;
    bi = 0x7fffffff;
    for (unsigned b = 0; b < cl.num_blocks(); b++) {
        const struct probs_smem *r = cl.map_shared_rank(sm, b);
        better(bv, bi, r->x.fv[p], r->x.fi[p]);
    }
    if (bi == 0x7fffffff) {
        bi = 0;
        bv = x0;
    }
    __syncthreads();
    if (threadIdx.x == 0)
        sm->par = p ^ 1;
    __syncthreads();
    *ret_max = bv;
    return bi;
}

/* One row per cluster (gridDim.x = rows × cluster size). */
__global__ static void __launch_bounds__(SAMPLE_THREADS)
    probs_kernel(const float *x, int ldx, const int32_t *rows, const struct ds_k_sampling *params, int V, float *out,
                 int ldo)
{
    __shared__ struct probs_smem sm;
    cg::cluster_group cl = cg::this_cluster();
    int c = (int)cl.num_blocks(), row = blockIdx.x / c;
    if (threadIdx.x == 0) {
        int len = ((V + c - 1) / c + 31) & ~31;
        int from = (int)cl.block_rank() * len;
        sm.from = from < V ? from : V;
        sm.to = from + len < V ? from + len : V;
        sm.par = 0;
    }
    __syncthreads();
    size_t r = rows ? (size_t)rows[row] : (size_t)row;
    const float *xr = x + r * ldx;
    float *o = out + r * ldo;
    struct ds_k_sampling s = params[row];
    float mx;
    int imax = row_argmax(xr, &sm, &mx);   /* every read of x is done: out may be x (slices are disjoint) */
    if (s.temperature < GREEDY_TEMPERATURE) {
        for (int i = sm.from + threadIdx.x; i < sm.to; i += blockDim.x)
            o[i] = i == imax ? 1.0f : 0.0f;
        cl.sync();   /* no block leaves while another may read its shared memory */
        return;
    }
    /* softmax(x / T): the CPU's float operations, exp rounded from double */
    float inv_t = 1.0f / s.temperature;
    double sum = 0;
    for (int i = sm.from + threadIdx.x; i < sm.to; i += blockDim.x) {
        float e = (float)exp((double)__fmul_rn(__fsub_rn(xr[i], mx), inv_t));
        o[i] = e;
        sum += e;
    }
    sum = cluster_sum_d(block_sum(sum, sm.red_d), &sm);
    float inv = (float)(1.0 / sum);
    bool cut_k = s.top_k > 0 && s.top_k < V, cut_p = s.top_p > 0 && s.top_p < 1;
    uint64_t total = 0;
    for (int i = sm.from + threadIdx.x; i < sm.to; i += blockDim.x) {
        float v = __fmul_rn(o[i], inv);
        o[i] = v;
        total += to_fx(v);
    }
    if (!cut_k && !cut_p) {
        cl.sync();
        return;
    }
    total = row_sum_all(total, &sm);   /* also makes the slice's writes visible to the block */
    uint32_t top = __float_as_uint(__fmul_rn(1.0f, inv));   /* the largest probability: exp(0) · inv */
    uint32_t u = 0;        /* value (bits) of the last kept token in the ranking */
    uint64_t m = 0;        /* tokens kept among those equal to it (lowest ids) */
    uint64_t kept = total; /* kept mass */
    uint64_t f_lo = total; /* mass of the candidates (the top-k set, else every token) */
    uint32_t lo = 0;
    if (cut_k) {
        uint64_t above;
        u = search(o, 0, (uint64_t)V, top, 0, (uint64_t)s.top_k, false, &sm, &above);
        m = (uint64_t)s.top_k - above;
        uint64_t mass_above = eval_one(o, u + 1, true, &sm);
        kept = mass_above + m * to_fx(__uint_as_float(u));
        lo = u;
        f_lo = kept;
    }
    if (cut_p) {
        /* the smallest prefix of the ranking whose mass reaches top_p of the candidates' */
        uint64_t target = (uint64_t)ceil((double)s.top_p * (double)f_lo);
        if (target < 1)
            target = 1;
        uint64_t above;
        uint32_t up = search(o, lo, f_lo, top, 0, target, true, &sm, &above);
        uint64_t v = to_fx(__uint_as_float(up));
        uint64_t need = v > 0 ? (target - above + v - 1) / v : 1;
        if (need < 1)
            need = 1;
        if (cut_k && up == u && need > m)
            need = m;
        u = up;
        m = need;
        kept = above + m * v;
    }
    float renorm = (float)(1.0 / ((double)kept / FX_ONE));
    write_kept(o, u, m, renorm, &sm);
    cl.sync();
}

/* Blocks per row: spread few rows over the GPU, up to MAX_CLUSTER blocks each. */
static int probs_cluster_size(int n)
{
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return 1;
    int c = 1;
    while (c < MAX_CLUSTER && (long)n * c * 2 <= sms)
        c *= 2;
    return c;
}

extern "C" cudaError_t ds_k_sampling_probs(const float *x, int ldx, const int32_t *rows,
                                           const struct ds_k_sampling *params, int n, int V, float *out, int ldo,
                                           cudaStream_t stream)
{
    if (n < 0 || V <= 0 || ldx < V || ldo < V)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    int c = probs_cluster_size(n);
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = (unsigned)c;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)(n * c));
    cfg.blockDim = dim3(SAMPLE_THREADS);
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, probs_kernel, x, ldx, rows, params, V, out, ldo);
}

/* ---- draws ---- */
struct draw_smem {
    uint64_t warp_sum[N_WARPS];
    int result;
};

/* Weight of token i: p_i, or max(0, p_i - q_i) (as the CPU computes it) when q is given. */
__device__ static inline uint64_t weight(const float *p, const float *q, int i)
{
    if (!q)
        return to_fx(p[i]);
    float r = __fsub_rn(p[i], q[i]);
    return to_fx(r > 0.0f ? r : 0.0f);
}

/* Σ of the weights; every thread gets it (and sm->warp_sum holds each warp segment's share). */
__device__ static uint64_t draw_mass(const float *p, const float *q, int V, struct draw_smem *sm)
{
    int seg = segment_len(V), w = warp_id(), lane = lane_id();
    int from = w * seg, to = from + seg < V ? from + seg : V;
    uint64_t acc = 0;
    for (int i = from + lane; i < to; i += 32)
        acc += weight(p, q, i);
    for (int o = 16; o > 0; o >>= 1)
        acc += __shfl_xor_sync(FULL_MASK, acc, o);
    __syncthreads();
    if (lane == 0)
        sm->warp_sum[w] = acc;
    __syncthreads();
    uint64_t total = 0;
    for (int k = 0; k < N_WARPS; k++)
        total += sm->warp_sum[k];
    return total;
}

/* The first i in index order whose running sum of weights exceeds u · total
 * (ds_sample_probs); total comes from draw_mass with the same p and q. A row of
 * zero mass gives its last positive token, else 0. Every thread gets the result. */
__device__ static int draw_from(const float *p, const float *q, int V, float u, uint64_t total, struct draw_smem *sm)
{
    int seg = segment_len(V), w = warp_id(), lane = lane_id();
    int from = w * seg, to = from + seg < V ? from + seg : V;
    if (threadIdx.x == 0)
        sm->result = -1;
    __syncthreads();
    if (total == 0) {
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float v = q ? __fsub_rn(p[i], q[i]) : p[i];
            if (v > 0.0f)
                atomicMax(&sm->result, i);
        }
        __syncthreads();
        int res = sm->result < 0 ? 0 : sm->result;
        __syncthreads();
        return res;
    }
    /* target = floor(u · total), exactly: u is taken as a 32-bit fraction (24 bits for ds_uniform) */
    uint64_t uf = (uint64_t)((double)(u > 0.0f ? u : 0.0f) * 4294967296.0);
    if (uf > 0xffffffffull)
        uf = 0xffffffffull;
    uint64_t target = (total >> 32) * uf + (((total & 0xffffffffull) * uf) >> 32);
    uint64_t before = 0;
    for (int k = 0; k < w; k++)
        before += sm->warp_sum[k];
    /* exactly one warp's segment holds the crossing: before <= target < before + its sum */
    if (before <= target && target < before + sm->warp_sum[w]) {
        uint64_t run = before;
        for (int base = from; base < to; base += 32) {
            int i = base + lane;
            uint64_t x = i < to ? weight(p, q, i) : 0, incl = x;
            for (int o = 1; o < 32; o <<= 1) {
                uint64_t y = __shfl_up_sync(FULL_MASK, incl, o);
                if (lane >= o)
                    incl += y;
            }
            unsigned hit = __ballot_sync(FULL_MASK, i < to && run + incl > target);
            if (hit) {
                if (lane == 0)
                    sm->result = base + __ffs(hit) - 1;
                break;
            }
            run += __shfl_sync(FULL_MASK, incl, 31);
        }
    }
    __syncthreads();
    int res = sm->result < 0 ? 0 : sm->result;
    __syncthreads();
    return res;
}

/* The correction token: a draw from norm(max(0, p - q)), or from p when that mass is at most 1e-8. */
__device__ static int draw_residual(const float *p, const float *q, int V, float u, struct draw_smem *sm)
{
    uint64_t mass = draw_mass(p, q, V, sm);
    if ((double)mass / FX_ONE > RESIDUAL_MIN_MASS)
        return draw_from(p, q, V, u, mass, sm);
    __syncthreads();
    uint64_t total = draw_mass(p, NULL, V, sm);
    return draw_from(p, NULL, V, u, total, sm);
}

__global__ static void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(const float *probs, int ldp, const int32_t *rows, const float *u, int V, int32_t *out)
{
    __shared__ struct draw_smem sm;
    size_t r = rows ? (size_t)rows[blockIdx.x] : blockIdx.x;
    const float *p = probs + r * ldp;
    uint64_t total = draw_mass(p, NULL, V, &sm);
    int id = draw_from(p, NULL, V, u[blockIdx.x], total, &sm);
    if (threadIdx.x == 0)
        out[blockIdx.x] = id;
}

extern "C" cudaError_t ds_k_sample(const float *probs, int ldp, const int32_t *rows, const float *u, int n, int V,
                                   int32_t *out, cudaStream_t stream)
{
    if (n < 0 || V <= 0 || ldp < V)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    sample_kernel<<<n, SAMPLE_THREADS, 0, stream>>>(probs, ldp, rows, u, V, out);
    return cudaGetLastError();
}

__global__ static void __launch_bounds__(SAMPLE_THREADS)
    residual_kernel(const float *p, int ldp, const float *q, int ldq, const float *u, int V, int32_t *out)
{
    __shared__ struct draw_smem sm;
    int id = draw_residual(p + (size_t)blockIdx.x * ldp, q + (size_t)blockIdx.x * ldq, V, u[blockIdx.x], &sm);
    if (threadIdx.x == 0)
        out[blockIdx.x] = id;
}

extern "C" cudaError_t ds_k_sample_residual(const float *p, int ldp, const float *q, int ldq, const float *u, int n,
                                            int V, int32_t *out, cudaStream_t stream)
{
    if (n < 0 || V <= 0 || ldp < V || ldq < V)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    residual_kernel<<<n, SAMPLE_THREADS, 0, stream>>>(p, ldp, q, ldq, u, V, out);
    return cudaGetLastError();
}

/* ---- chain accept/reject ---- */
/* One block per chain: draft k is accepted when u_accept[k] · max(q_k[d_k], 1e-8) < p_k[d_k];
 * the first rejection draws the correction from the residual of p_k and q_k;
 * with every draft accepted the bonus comes from p_len. A draft id outside the
 * vocabulary is rejected. */
__global__ static void __launch_bounds__(SAMPLE_THREADS)
    accept_kernel(const float *p, int ldp, const float *q, int ldq, const struct ds_k_chain *chains, int V,
                  int32_t *accepted, int32_t *next)
{
    __shared__ struct draw_smem sm;
    const struct ds_k_chain *c = &chains[blockIdx.x];
    int len = c->len < 0 || !q ? 0 : c->len > DS_K_MAX_CHAIN ? DS_K_MAX_CHAIN : c->len;
    int a = 0, tok = 0;
    for (int k = 0; k <= len; k++) {
        const float *pk = p + (size_t)(c->p_row + k) * ldp;
        if (k < len) {
            const float *qk = q + (size_t)(c->q_row + k) * ldq;
            int d = c->drafts[k];
            if (d >= 0 && d < V) {
                float pq = pk[d], qq = qk[d] > MIN_DRAFT_PROB ? qk[d] : MIN_DRAFT_PROB;
                if (__fmul_rn(c->u_accept[k], qq) < pq) {
                    a++;
                    continue;
                }
            }
            tok = draw_residual(pk, qk, V, c->u_target[k], &sm);
        } else {
            uint64_t total = draw_mass(pk, NULL, V, &sm);
            tok = draw_from(pk, NULL, V, c->u_target[k], total, &sm);
        }
        break;
    }
    if (threadIdx.x == 0) {
        accepted[blockIdx.x] = a;
        next[blockIdx.x] = tok;
    }
}

extern "C" cudaError_t ds_k_spec_accept(const float *p, int ldp, const float *q, int ldq,
                                        const struct ds_k_chain *chains, int n, int V, int32_t *accepted,
                                        int32_t *next, cudaStream_t stream)
{
    if (n < 0 || V <= 0 || ldp < V || (q && ldq < V))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    accept_kernel<<<n, SAMPLE_THREADS, 0, stream>>>(p, ldp, q, ldq, chains, V, accepted, next);
    return cudaGetLastError();
}
