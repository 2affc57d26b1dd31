/* sample.cu: sampling on the device with explicit uniforms: the sampling
 * distribution of a row of logits (ds_probs), inverse-CDF draws
 * (ds_sample_probs), the residual draw norm(max(0, p - q)), and the chain
 * accept/reject of one speculative round per sequence.
 *
 * One block of SAMPLE_THREADS threads per row (or per sequence). Nothing is
 * sorted: the top-k and top-p cuts find the value of the last kept token by a
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

#include <cuda_runtime.h>

#include "kernels.h"

#define SAMPLE_THREADS 1024
#define N_WARPS (SAMPLE_THREADS / 32)
#define SEARCH_WAYS 16
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

/* The first maximum of x[0..V) (ds_argmax: index 0 when nothing beats -inf). */
__device__ static int block_argmax(const float *x, int V, float *sv /* [N_WARPS] */, int *si /* [N_WARPS] */,
                                   float *ret_max)
{
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        better(bv, bi, x[i], i);
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        better(bv, bi, ov, oi);
    }
    __syncthreads();
    if (lane_id() == 0) {
        sv[warp_id()] = bv;
        si[warp_id()] = bi;
    }
    __syncthreads();
    bv = sv[0];
    bi = si[0];
    for (int w = 1; w < N_WARPS; w++)
        better(bv, bi, sv[w], si[w]);
    if (bi == 0x7fffffff) {
        bi = 0;
        bv = x[0];
    }
    *ret_max = bv;
    return bi;
}

/* ---- the sampling distribution ---- */
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
};

/* F(t) = Σ w_i over the tokens whose bits are >= t, for t = th[1..SEARCH_WAYS) into
 * sm->f[1..]; w_i is 1 (count) or p_i in fixed point (mass). Integer sums: exact.
 * Only the tokens between th[1] and the search's hi are visited: the ones below
 * count for no threshold, and the ones above count for all, with the weight
 * F(hi + 1) = sm->f_hi1 the search already knows (so each pass gets cheaper as
 * the range narrows). */
__device__ static void eval_thresholds(const float *p, int V, bool by_mass, struct probs_smem *sm)
{
    uint32_t th[SEARCH_WAYS - 1];
    uint64_t acc[SEARCH_WAYS - 1];
#pragma unroll
    for (int j = 0; j < SEARCH_WAYS - 1; j++) {
        th[j] = sm->th[j + 1];
        acc[j] = 0;
    }
    uint32_t lo1 = th[0], hi = sm->hi;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
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
    if (threadIdx.x < SEARCH_WAYS - 1) {
        uint64_t s = 0;
        for (int w = 0; w < N_WARPS; w++)
            s += sm->red[w * SEARCH_WAYS + threadIdx.x];
        sm->f[threadIdx.x + 1] = s + sm->f_hi1;
    }
    __syncthreads();
}

/* F at a single threshold t. */
__device__ static uint64_t eval_one(const float *p, int V, uint32_t t, bool by_mass, struct probs_smem *sm)
{
    uint64_t acc = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float v = p[i];
        if (__float_as_uint(v) >= t)
            acc += by_mass ? to_fx(v) : 1;
    }
    return block_sum(acc, sm->red);
}

/* The largest bit pattern u with F(u) >= target, given F(lo) = f_lo >= target and
 * F(hi + 1) = f_hi1 < target (so u is the value of a token of the row). Returns u;
 * *ret_above = F(u + 1), the weight of the tokens strictly above u. */
__device__ static uint32_t search(const float *p, int V, uint32_t lo, uint64_t f_lo, uint32_t hi, uint64_t f_hi1,
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
        eval_thresholds(p, V, by_mass, sm);
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
 * scaled by renorm; zero the rest. Two passes in the warp-segment layout. */
__device__ static void write_kept(float *o, int V, uint32_t u, uint64_t m, float renorm, struct probs_smem *sm)
{
    int seg = segment_len(V), w = warp_id(), lane = lane_id();
    int from = w * seg, to = from + seg < V ? from + seg : V;
    int n_eq = 0;
    for (int base = from; base < to; base += 32) {
        int i = base + lane;
        n_eq += __popc(__ballot_sync(FULL_MASK, i < to && __float_as_uint(o[i]) == u));
    }
    if (lane == 0)
        sm->warp_eq[w] = n_eq;
    __syncthreads();
    uint64_t rank = 0;   /* equal tokens before this warp's segment */
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
}

__global__ static void __launch_bounds__(SAMPLE_THREADS)
    probs_kernel(const float *x, int ldx, const int32_t *rows, const struct ds_k_sampling *params, int V, float *out,
                 int ldo)
{
    __shared__ struct probs_smem sm;
    size_t r = rows ? (size_t)rows[blockIdx.x] : blockIdx.x;
    const float *xr = x + r * ldx;
    float *o = out + r * ldo;
    struct ds_k_sampling s = params[blockIdx.x];
    float mx;
    int imax = block_argmax(xr, V, sm.sv, sm.si, &mx);
    __syncthreads();   /* every read of x is done: out may be x */
    if (s.temperature < GREEDY_TEMPERATURE) {
        for (int i = threadIdx.x; i < V; i += blockDim.x)
            o[i] = i == imax ? 1.0f : 0.0f;
        return;
    }
    /* softmax(x / T): the CPU's float operations, exp rounded from double */
    float inv_t = 1.0f / s.temperature;
    double sum = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float e = (float)exp((double)__fmul_rn(__fsub_rn(xr[i], mx), inv_t));
        o[i] = e;
        sum += e;
    }
    sum = block_sum(sum, sm.red_d);
    float inv = (float)(1.0 / sum);
    bool cut_k = s.top_k > 0 && s.top_k < V, cut_p = s.top_p > 0 && s.top_p < 1;
    uint64_t total = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float v = __fmul_rn(o[i], inv);
        o[i] = v;
        total += to_fx(v);
    }
    if (!cut_k && !cut_p)
        return;
    total = block_sum(total, sm.red);   /* also makes the row's writes visible to the block */
    uint32_t top = __float_as_uint(__fmul_rn(1.0f, inv));   /* the largest probability: exp(0) · inv */
    uint32_t u = 0;        /* value (bits) of the last kept token in the ranking */
    uint64_t m = 0;        /* tokens kept among those equal to it (lowest ids) */
    uint64_t kept = total; /* kept mass */
    uint64_t f_lo = total; /* mass of the candidates (the top-k set, else every token) */
    uint32_t lo = 0;
    if (cut_k) {
        uint64_t above;
        u = search(o, V, 0, (uint64_t)V, top, 0, (uint64_t)s.top_k, false, &sm, &above);
        m = (uint64_t)s.top_k - above;
        uint64_t mass_above = eval_one(o, V, u + 1, true, &sm);
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
        uint32_t up = search(o, V, lo, f_lo, top, 0, target, true, &sm, &above);
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
    write_kept(o, V, u, m, renorm, &sm);
}

extern "C" cudaError_t ds_k_sampling_probs(const float *x, int ldx, const int32_t *rows,
                                           const struct ds_k_sampling *params, int n, int V, float *out, int ldo,
                                           cudaStream_t stream)
{
    if (n < 0 || V <= 0 || ldx < V || ldo < V)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    probs_kernel<<<n, SAMPLE_THREADS, 0, stream>>>(x, ldx, rows, params, V, out, ldo);
    return cudaGetLastError();
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
