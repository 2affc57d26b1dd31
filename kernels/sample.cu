/* sample.cu: sampling on the device with explicit uniforms: the sampling
 * distribution of a row of logits (ds_probs), inverse-CDF draws
 * (ds_sample_probs), the residual draw norm(max(0, p - q)), the chain
 * accept/reject of one speculative round per sequence, and the screen that
 * settles most of a round's drafts from bounds before any distribution.
 *
 * One block of SAMPLE_THREADS threads per row (or per sequence); the sampling
 * distribution spreads a row over a cluster of up to 8 blocks (each block takes
 * a contiguous slice, which it reads once into shared memory and works on
 * there, writing the result once; the blocks combine their partial results
 * through distributed shared memory, in rank order, so the result does not
 * depend on scheduling), and can draw from the row in the same launch.
 * A top-k of at most CAND_ROW tokens (and a top-p after it), or the top-p
 * alone of a peaked row, ranks the row's few candidates, those at or above a
 * bound that each thread's largest value gives (cut_from_candidates; a row
 * with too many candidates takes the radix select). Otherwise nothing is
 * sorted: the top-k and top-p cuts find the value of the last kept token by a
 * radix select over the bit patterns of the probabilities (non-negative
 * floats order like their bits): three levels, each a histogram of the next
 * 11, 10 and 10 bits of the tokens still in play (masses, and counts where the
 * search needs them; the first level is built while the row is normalized,
 * the others over the first level's chosen bin alone), then keep every larger
 * value and, of the tokens equal to it, the lowest ids (the ranking's tie
 * rule). A launch whose last wave of clusters would be partial can go as two,
 * the second in smaller slices (a time model decides), started while the
 * first runs (programmatic dependent launch).
 *
 * Masses are summed as 2^-60 fixed-point integers, so a sum is exact and
 * independent of the order of its terms: cuts and draws depend only on the
 * row. The exponentials are CUDA's expf (within 2 ulp; glibc's, which the CPU
 * uses, within 0.502), so 87-98 % of the probabilities have the CPU's bits
 * and the rest differ by an ulp or two (test-kernels bounds the difference).
 * exp in double rounded to float matched the CPU nearly always, but cost about
 * 18 us of a 64-row launch of Qwen3's vocabulary (bench/RESULTS.md). */
#include <math.h>
#include <stdint.h>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "cluster.cuh"
#include "pdl.cuh"
#include "kernels.h"

#define SAMPLE_THREADS 1024
#define N_WARPS (SAMPLE_THREADS / 32)
#define RADIX_BINS 1024                 /* bins of a radix level: one per thread */
static_assert(RADIX_BINS == SAMPLE_THREADS, "pick_bin gives each thread one bin");
#define MAX_CLUSTER 8                   /* blocks per row at most (the portable cluster size) */
#define CAND_BLOCK 512                  /* a cut's candidates a block holds at most (else the radix select) */
#define CAND_ROW 1024                   /* ... and a row: one a thread */
static_assert(CAND_ROW == SAMPLE_THREADS, "the candidates' ranks are one a thread");
static_assert(CAND_BLOCK * 8 == RADIX_BINS * 4 && CAND_ROW * 8 == 2 * RADIX_BINS * 4,
              "the candidate lists lie over the histogram's counts and masses");
#define FULL_MASK 0xffffffffu
#define FX_ONE 1152921504606846976.0   /* 2^60: the fixed-point unit of masses */
#define GREEDY_TEMPERATURE 1e-5f        /* DS_GREEDY_TEMPERATURE */
#define RESIDUAL_MIN_MASS 1e-8          /* below it the residual draw falls back to p */
#define MIN_DRAFT_PROB 1e-8f            /* the acceptance test's floor under q */

/* A probability as a 2^-60 fixed-point integer (rows sum to well under 8): p · 2^60 toward zero. The
 * product is exact in float (a power of two, and float's range reaches 2^68 · p), so one conversion from
 * float gives what (double)p · 2^60 would (saturated from p = 16 on, as that would be), without a second. */
__device__ static inline uint64_t to_fx(float p)
{
    return p > 0.0f ? __float2ull_rz(__fmul_rn(p, 0x1p60f)) : 0;
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

/* This warp's segment [*from, *to) of a row of n (empty past the row's end). */
__device__ static inline void warp_segment(int n, int *from, int *to)
{
    int seg = segment_len(n);
    *from = warp_id() * seg;
    *to = *from + seg < n ? *from + seg : n;
}

/* ---- block reductions (every thread gets the result) ---- */
/* Σ of a T over the warp, in butterflies (a fixed order). */
template <typename T> __device__ static inline T warp_sum(T v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

/* The largest int over the warp. */
__device__ static inline int warp_max(int v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = max(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

/* A sum in a fixed order (butterflies in each warp, then over the warps' sums,
 * lane w taking warp w's), so a double sum does not depend on scheduling; T is
 * uint64_t or double. */
template <typename T> __device__ static T block_sum(T v, T *red /* [N_WARPS] */)
{
    static_assert(N_WARPS == 32, "a lane for each warp's sum");
    v = warp_sum(v);
    __syncthreads();
    if (lane_id() == 0)
        red[warp_id()] = v;
    __syncthreads();
    return warp_sum(red[lane_id()]);
}

/* (bv, bi) becomes the better of itself and (v, i): larger value, then lower index. */
__device__ static inline void better(float &bv, int &bi, float v, int i)
{
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

/* Weight of token i: p_i, or max(0, p_i - q_i) (as the CPU computes it) when q is given. */
__device__ static inline uint64_t weight(const float *p, const float *q, int i)
{
    if (!q)
        return to_fx(p[i]);
    float r = __fsub_rn(p[i], q[i]);
    return to_fx(r > 0.0f ? r : 0.0f);
}

/* floor(u · total) exactly, u taken as a 32-bit fraction (24 bits for ds_uniform): the
 * running weight a draw must pass (ds_sample_probs). */
__device__ static inline uint64_t draw_target(float u, uint64_t total)
{
    uint64_t uf = (uint64_t)((double)(u > 0.0f ? u : 0.0f) * 4294967296.0);
    if (uf > 0xffffffffull)
        uf = 0xffffffffull;
    return (total >> 32) * uf + (((total & 0xffffffffull) * uf) >> 32);
}

/* The first i in [from, to) at which run plus the running weight (p, q) from
 * `from` exceeds target, or -1; the whole warp calls it and every lane gets
 * the answer. Four chunks of 32 at a time: their weights are read together,
 * each chunk's total decides whether the crossing is in it, and only that
 * chunk is scanned (integer sums: the same index as a scan of every chunk). */
__device__ static int warp_crossing(const float *p, const float *q, int from, int to, uint64_t run,
                                    uint64_t target)
{
    int lane = lane_id();
    for (int base = from; base < to; base += 4 * 32) {
        uint64_t w[4], t[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int i = base + 32 * u + lane;
            w[u] = i < to ? weight(p, q, i) : 0;
        }
#pragma unroll
        for (int u = 0; u < 4; u++)
            t[u] = warp_sum(w[u]);
        int u = 0;
        while (u < 4 && run + t[u] <= target) {
            run += t[u];
            u++;
        }
        if (u == 4)
            continue;
        uint64_t incl = 0;
#pragma unroll
        for (int v = 0; v < 4; v++)
            incl = v == u ? w[v] : incl;
        for (int o = 1; o < 32; o <<= 1) {
            uint64_t y = __shfl_up_sync(FULL_MASK, incl, o);
            if (lane >= o)
                incl += y;
        }
        int i = base + 32 * u + lane;
        unsigned hit = __ballot_sync(FULL_MASK, i < to && run + incl > target);
        return base + 32 * u + __ffs(hit) - 1;   /* the chunk's total passes target: some lane does */
    }
    return -1;
}

/* ---- the sampling distribution ---- */
namespace cg = cooperative_groups;

/* What the blocks of a cluster exchange, twice over: exchange i uses set i % 2,
 * so one cluster barrier per exchange suffices (a block writes set i % 2 again
 * only after every block has passed exchange i + 1, so done reading i). */
struct probs_xchg {
    uint64_t u[2], t[2];
    double d[2];
    float fv[2];
    int fi[2];
};

struct probs_smem {
    uint64_t red[N_WARPS];
    double red_d[N_WARPS];
    float sv[N_WARPS];
    int si[N_WARPS];
    /* (the cluster's sum of a level's histograms stays in registers, one bin a thread: the less static
     * shared memory, the larger the slice a block holds; 3 blocks per row fit Qwen3's vocabulary) */
    union {
        struct {
            unsigned hc[RADIX_BINS];                     /* a radix level's histogram of this block's slice: counts */
            unsigned hm_lo[RADIX_BINS], hm_hi[RADIX_BINS];   /* ... and masses (2^-60 fixed point) in two halves */
        } hist;
        struct {   /* a cut's candidates as keys (cut_from_candidates): this block's, then the row's */
            uint64_t own[CAND_BLOCK];   /* over hc */
            uint64_t all[CAND_ROW];     /* over hm_lo and hm_hi */
        } cand;
    };
    int n_own;                                   /* this block's candidates */
    int cut_rank;                                /* a rank the candidates' cuts pass on to every thread */
    uint64_t cut_mass;                           /* ... and a mass */
    uint64_t wc[N_WARPS], wm[N_WARPS];
    uint64_t pick_c, pick_m, pick_n;
    int pick;
    int warp_eq[N_WARPS];
    struct probs_xchg x;
    int par;   /* the set of x the next exchange uses (thread 0's; read after a barrier) */
    int from, to;   /* this block's slice of the row */
};

/* The end of an exchange that used set p of sm->x: once every thread of the
 * block has read it, the next exchange takes the other set. */
__device__ static void exchange_done(struct probs_smem *sm, int p)
{
    __syncthreads();
    if (threadIdx.x == 0)
        sm->par = p ^ 1;
    __syncthreads();
}

/* Publish the block's value v (thread 0's) in slot (sm->x.u or sm->x.d) and
 * return to every thread the sum over the cluster's blocks in rank order.
 * Every thread of every block of the cluster must call it. */
template <typename T> __device__ static T cluster_sum(T v, T (probs_xchg::*slot)[2], struct probs_smem *sm)
{
    cg::cluster_group cl = cg::this_cluster();
    int p = sm->par;
    if (threadIdx.x == 0)
        (sm->x.*slot)[p] = v;
    cl.sync();
    T s = 0;
    for (unsigned b = 0; b < cl.num_blocks(); b++)
        s += (cl.map_shared_rank(sm, b)->x.*slot)[p];
    exchange_done(sm, p);
    return s;
}

/* Σ v over the block, then over the cluster; every thread gets it. */
__device__ static uint64_t row_sum_all(uint64_t v, struct probs_smem *sm)
{
    return cluster_sum(block_sum(v, sm->red), &probs_xchg::u, sm);
}

/* Add mass w to a bin with 32-bit atomics (native in shared memory): the low
 * half, its carry and the high half. */
__device__ static inline void add_mass(struct probs_smem *sm, int bin, uint64_t w)
{
    unsigned lo = (unsigned)w, hi = (unsigned)(w >> 32);
    unsigned old = atomicAdd(&sm->hist.hm_lo[bin], lo);
    hi += old + lo < old;
    if (hi)
        atomicAdd(&sm->hist.hm_hi[bin], hi);
}

/* Add one token (when ok) of mass w to bin, and with `count` one to
 * the bin's count. When every token of the warp in play falls in one bin (a
 * flat or degenerate row), the warp adds once; otherwise each lane adds its
 * own. Integer sums: exact in any order. */
__device__ static void hist_add(bool ok, int bin, uint64_t w, bool count, struct probs_smem *sm)
{
    unsigned act = __ballot_sync(FULL_MASK, ok);
    if (!act)
        return;
    int first = __ffs(act) - 1;
    int b0 = __shfl_sync(FULL_MASK, bin, first);
    if (__all_sync(FULL_MASK, !ok || bin == b0)) {
        uint64_t sum = warp_sum(ok ? w : 0);
        if (lane_id() == first) {
            if (count)
                atomicAdd(&sm->hist.hc[b0], (unsigned)__popc(act));
            add_mass(sm, b0, sum);
        }
    } else if (ok) {
        if (count)
            atomicAdd(&sm->hist.hc[bin], 1u);
        add_mass(sm, bin, w);
    }
}

/* The first radix level's bin of value bits b (probabilities are at most 1: bits 30..20 at most 0x3f8). */
__device__ static inline int level0_bin(uint32_t b)
{
    return b >> 20 < RADIX_BINS ? (int)(b >> 20) : RADIX_BINS - 1;
}

/* Empty the block's histogram (thread t clears bin t). */
__device__ static inline void hist_clear(struct probs_smem *sm)
{
    sm->hist.hc[threadIdx.x] = 0;
    sm->hist.hm_lo[threadIdx.x] = 0;
    sm->hist.hm_hi[threadIdx.x] = 0;
}

/* The highest bin j of the level's histogram over the cluster with
 * above + Σ_{b >= j} weight(b) >= target, weight the masses (by_mass) or the
 * counts; *above_c and *above_m gain the bins above j, *ret_n gets bin j's
 * count. Thread t holds bin RADIX_BINS - 1 - t (count bc, mass bm), so the
 * sums from the top are a prefix scan. */
__device__ static int pick_bin(uint64_t bc, uint64_t bm, uint64_t target, bool by_mass, uint64_t *above_c,
                               uint64_t *above_m, uint64_t *ret_n, struct probs_smem *sm)
{
    int lane = lane_id(), w = warp_id(), bin = RADIX_BINS - 1 - (int)threadIdx.x;
    uint64_t c = bc, m = bm;
    for (int o = 1; o < 32; o <<= 1) {
        uint64_t yc = __shfl_up_sync(FULL_MASK, c, o), ym = __shfl_up_sync(FULL_MASK, m, o);
        if (lane >= o) {
            c += yc;
            m += ym;
        }
    }
    if (lane == 31) {
        sm->wc[w] = c;
        sm->wm[w] = m;
    }
    __syncthreads();
    c += warp_sum(lane < w ? sm->wc[lane] : (uint64_t)0);   /* the warps before this one */
    m += warp_sum(lane < w ? sm->wm[lane] : (uint64_t)0);
    /* c, m: the bins from the top down to this one; less this one: those above it */
    uint64_t c_above = c - bc, m_above = m - bm;
    uint64_t incl = *(by_mass ? above_m : above_c) + (by_mass ? m : c);
    uint64_t excl = *(by_mass ? above_m : above_c) + (by_mass ? m_above : c_above);
    if (incl >= target && excl < target) {
        sm->pick = bin;
        sm->pick_c = c_above;
        sm->pick_m = m_above;
        sm->pick_n = bc;
    }
    __syncthreads();
    int j = sm->pick;
    *above_c += sm->pick_c;
    *above_m += sm->pick_m;
    *ret_n = sm->pick_n;
    __syncthreads();
    return j;
}

/* Each warp copies the values of the tokens of its segment [from, to) of the
 * block's slice still in play after the first radix level (bits >= lo, bits
 * 30..20 equal to j0) to the start of the same segment of scratch, and returns
 * their count (every lane of the warp gets it). Tokens of probability 0, when
 * in play, are only counted (*zeros): a row whose cut falls among them (fewer
 * nonzero tokens than top-k, as in a peaked row at a low temperature) would
 * otherwise gather nearly the whole row. No atomics, no barrier: only the warp
 * reads its candidates again (the later levels only histogram them). */
template <bool ZEROS>   /* whether tokens of probability 0 can be in play (else the loop never tests for them) */
__device__ static int gather_candidates_in(const float *slice, float *scratch, int from, int to, uint32_t lo,
                                           uint32_t j0, int *zeros)
{
    int lane = lane_id(), count = 0, n_zero = 0;
    for (int base = from; base < to; base += 32) {
        int j = base + lane;
        uint32_t b = j < to ? __float_as_uint(slice[j]) : 0;
        bool in_play = j < to && b >= lo && b >> 20 == j0, ok = in_play && (!ZEROS || b != 0);
        unsigned act = __ballot_sync(FULL_MASK, ok);
        if (ok)
            scratch[from + count + __popc(act & ((1u << lane) - 1u))] = __uint_as_float(b);
        count += __popc(act);
        if (ZEROS)
            n_zero += __popc(__ballot_sync(FULL_MASK, in_play && b == 0));
    }
    __syncwarp();   /* the warp's writes to scratch seen by its lanes */
    *zeros = n_zero;
    return count;
}

__device__ static int gather_candidates(const float *slice, float *scratch, int from, int to, uint32_t lo,
                                        uint32_t j0, int *zeros)
{
    return j0 == 0 && lo == 0 ? gather_candidates_in<true>(slice, scratch, from, to, lo, j0, zeros)
                              : gather_candidates_in<false>(slice, scratch, from, to, lo, j0, zeros);
}

/* The largest bit pattern u with F(u) >= target, where F(t) is the weight
 * (mass, or count) of the tokens whose bits are >= max(t, lo), given
 * F(lo) >= target; *ret_m gets the mass strictly above u, *ret_c the count
 * (when selecting by count: a search by mass counts only in its last level),
 * *ret_eq the count equal to it.
 * Three radix levels over bits 30..20, 19..10 and 9..0 (probabilities are at
 * most 1, whose bits 30..20 are 0x3f8). Every block of the cluster takes the
 * same steps from the same combined histograms. level0_done: the block's
 * histogram already holds the first level's (of every token, lo 0). The
 * levels after the first read only the tokens of the first level's chosen
 * bin, each warp those of its segment, gathered into the segment's start in
 * scratch (the block's slice of the output row, written only after the
 * select; global memory, mostly L2). */
__device__ static uint32_t radix_select(const float *slice, float *scratch, uint32_t lo, uint64_t target,
                                        bool by_mass, bool level0_done, struct probs_smem *sm, uint64_t *ret_c,
                                        uint64_t *ret_m, uint64_t *ret_eq)
{
    cg::cluster_group cl = cg::this_cluster();
    uint32_t prefix = 0;
    uint64_t above_c = 0, above_m = 0;
    /* what a level reads: the slice, each thread every blockDim-th token; then the warp's candidates,
     * each lane every 32nd */
    const float *src = slice;
    int n = sm->to - sm->from, first = threadIdx.x, step = blockDim.x;
    int zeros = 0;   /* from the second level on: the warp's tokens of probability 0 in play, not gathered */
    for (int level = 0; level < 3; level++) {
        int shift = 20 - 10 * level;                      /* the level's bits: from 30..20 down to 9..0 */
        int keep = level == 0 ? 31 : shift + 10;           /* the bits fixed by the levels before */
        if (level == 1) {
            int from, to;
            warp_segment(n, &from, &to);
            n = gather_candidates(slice, scratch, from, to, lo, prefix >> 20, &zeros);   /* the warp's */
            src = scratch + from;
            first = lane_id();
            step = 32;
        }
        if (level > 0 || !level0_done) {
            hist_clear(sm);
            __syncthreads();
            for (int base = 0; base < n; base += step) {   /* (n and step are the same over each warp) */
                int j = base + first;
                float v = j < n ? src[j] : 0.0f;
                uint32_t b = __float_as_uint(v);
                bool ok = j < n && b >= lo && (b >> keep) == (prefix >> keep);
                int bin = level == 0 ? level0_bin(b) : (int)((b >> shift) & (RADIX_BINS - 1));
                hist_add(ok, bin, ok ? to_fx(v) : 0, !by_mass || level == 2, sm);
            }
            /* the zeros: bin 0 of every level, in play while the levels before chose bin 0; no mass */
            if (level > 0 && zeros && lane_id() == 0 && (!by_mass || level == 2) && (prefix >> keep) == 0)
                atomicAdd(&sm->hist.hc[0], (unsigned)zeros);
        }
        cl.sync();   /* every block's histogram is complete */
        int bin = RADIX_BINS - 1 - (int)threadIdx.x;   /* the bin pick_bin gives this thread */
        uint64_t c = 0, m = 0, n_bin;
        for (unsigned r = 0; r < cl.num_blocks(); r++) {
            const struct probs_smem *o = cl.map_shared_rank(sm, r);
            c += o->hist.hc[bin];
            m += ((uint64_t)o->hist.hm_hi[bin] << 32) + o->hist.hm_lo[bin];
        }
        cl.sync();   /* every block has read the others' histograms */
        int j = pick_bin(c, m, target, by_mass, &above_c, &above_m, &n_bin, sm);
        prefix |= (uint32_t)j << shift;
        if (level == 2)
            *ret_eq = n_bin;   /* the last level's bins are single values, all of them in play */
    }
    *ret_c = above_c;
    *ret_m = above_m;
    return prefix;
}

/* A lane's share of its warp segment for a draw: the lane's tokens of the
 * segment (every 32nd from the lane's first), their mass and the last
 * positive index. */
struct draw_part {
    uint64_t acc;
    int last;   /* -1: none, for a row of no mass */
};

__device__ static inline void draw_part_add(struct draw_part &dp, float p, int i)
{
    dp.acc += to_fx(p);
    if (p > 0.0f)
        dp.last = i;
}

/* out[j] = slice[j] = p · renorm where keep(bits of p, token id), else 0, over the warp's segment [from, to)
 * of the block's slice, p = prob(slice[j]); with `draw`, dp gathers the lane's share of a draw from the
 * written row (draw_scan's). */
template <typename Prob, typename Keep>
__device__ static void write_segment(float *slice, float *out, int from, int to, float renorm, Prob prob, Keep keep,
                                     const struct probs_smem *sm, bool draw, struct draw_part &dp)
{
    for (int base = from; base < to; base += 32) {
        int j = base + lane_id();
        if (j < to) {
            float p = prob(slice[j]);
            float f = keep(__float_as_uint(p), sm->from + j) ? __fmul_rn(p, renorm) : 0.0f;
            out[j] = f;
            slice[j] = f;
            if (draw)
                draw_part_add(dp, f, sm->from + j);
        }
    }
}

/* out[j] = slice[j] = slice[j] · renorm for the tokens above value bits u and
 * the first m (in index order) equal to it, else 0 (out: the block's slice of
 * the output row). Each warp walks its own contiguous segment; the blocks before this one
 * in the cluster (the slices before this one) pass on their count of equal
 * tokens. n_eq_all: the row's count of tokens equal to u, when known (else 0):
 * when all of them are kept, the counting pass is skipped; so it is when u is
 * 0 (a cut among the tokens of probability 0, which are 0 kept or not). With `draw`, dp
 * gathers the lane's share of a draw from the written row (draw_scan's). */
__device__ static void write_kept(float *slice, float *out, uint32_t u, uint64_t m, uint64_t n_eq_all,
                                  float renorm, struct probs_smem *sm, bool draw, struct draw_part &dp)
{
    int from, to, w = warp_id(), lane = lane_id();
    warp_segment(sm->to - sm->from, &from, &to);
    if (u == 0 || (n_eq_all > 0 && m >= n_eq_all)) {
        write_segment(
            slice, out, from, to, renorm, [](float p) { return p; },
            [u](uint32_t b, int) { return b >= u; }, sm, draw, dp);
        return;
    }
    int n_eq = 0;
    for (int base = from; base < to; base += 32) {
        int j = base + lane;
        n_eq += __popc(__ballot_sync(FULL_MASK, j < to && __float_as_uint(slice[j]) == u));
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
        sm->x.u[p] = block_eq;
    cl.sync();
    uint64_t rank = 0;
    for (unsigned b = 0; b < cl.block_rank(); b++)
        rank += cl.map_shared_rank(sm, b)->x.u[p];
    for (int k = 0; k < w; k++)
        rank += (uint64_t)sm->warp_eq[k];
    for (int base = from; base < to; base += 32) {
        int j = base + lane;
        uint32_t b = j < to ? __float_as_uint(slice[j]) : 0;
        bool eq = j < to && b == u;
        unsigned bal = __ballot_sync(FULL_MASK, eq);
        uint64_t my_rank = rank + (uint64_t)__popc(bal & ((1u << lane) - 1u));
        if (j < to) {
            bool keep = b > u || (eq && my_rank < m);
            float f = keep ? __fmul_rn(slice[j], renorm) : 0.0f;
            out[j] = f;
            slice[j] = f;
            if (draw)
                draw_part_add(dp, f, sm->from + j);
        }
        rank += (uint64_t)__popc(bal);
    }
    exchange_done(sm, p);
}

/* The first maximum of the row (ds_argmax: index 0 when nothing beats -inf),
 * over the cluster; every thread gets it, and in *thread_max the largest of its
 * own tokens (-inf for none). The block's slice of x is copied to `slice` on
 * the way (16 bytes at a time where x allows). */
__device__ static int row_argmax(const float *x, float *slice, struct probs_smem *sm, float *ret_max,
                                 float *thread_max)
{
    float x0 = x[0];   /* read before the barrier below: after it, x may be overwritten */
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    int from = sm->from, n = sm->to - sm->from, j = 0;
    const float *xs = x + from;
    if (((uintptr_t)xs & 15) == 0) {
        int n4 = n / 4;
#pragma unroll 4
        for (int k = threadIdx.x; k < n4; k += blockDim.x) {
            float4 v = __ldcs((const float4 *)xs + k);
            ((float4 *)slice)[k] = v;
            int i = from + 4 * k;
            better(bv, bi, v.x, i);
            better(bv, bi, v.y, i + 1);
            better(bv, bi, v.z, i + 2);
            better(bv, bi, v.w, i + 3);
        }
        j = 4 * n4;
    }
    for (j += threadIdx.x; j < n; j += blockDim.x) {
        float v = xs[j];
        slice[j] = v;
        better(bv, bi, v, from + j);
    }
    *thread_max = bv;
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
    exchange_done(sm, p);
    *ret_max = bv;
    return bi;
}

/* The lane's draw_part from the block's slice. */
__device__ static struct draw_part draw_scan(const float *slice, const struct probs_smem *sm)
{
    int a, e;
    warp_segment(sm->to - sm->from, &a, &e);
    struct draw_part dp = {0, -1};
    for (int j = a + lane_id(); j < e; j += 32)
        draw_part_add(dp, slice[j], sm->from + j);
    return dp;
}

/* The draw of ds_k_sample from the row whose probabilities the cluster's
 * slices hold, with uniform u: the first index at which the running sum passes
 * u · the row's mass (see draw_from), found through each warp segment's and
 * each block's mass in order; dp is the lane's share (draw_scan's). Rank 0's
 * thread 0 or the thread that finds it writes *id. Every thread of every
 * block of the cluster must call it. */
__device__ static void draw_in_cluster(const float *slice, float u, struct draw_part dp, struct probs_smem *sm,
                                       int32_t *id)
{
    cg::cluster_group cl = cg::this_cluster();
    int a, e, w = warp_id(), lane = lane_id();
    warp_segment(sm->to - sm->from, &a, &e);
    uint64_t acc = warp_sum(dp.acc);
    int last = warp_max(dp.last);
    __syncthreads();
    if (lane == 0) {
        sm->wm[w] = acc;
        sm->si[w] = last;
    }
    __syncthreads();
    uint64_t block = warp_sum(sm->wm[lane]), before = warp_sum(lane < w ? sm->wm[lane] : (uint64_t)0);
    int block_last = warp_max(sm->si[lane]);
    int p = sm->par;
    if (threadIdx.x == 0) {
        sm->x.u[p] = block;
        sm->x.fi[p] = block_last;
    }
    cl.sync();
    uint64_t total = 0;
    int row_last = -1;
    for (unsigned b = 0; b < cl.num_blocks(); b++) {
        const struct probs_smem *r = cl.map_shared_rank(sm, b);
        before += b < cl.block_rank() ? r->x.u[p] : 0;
        total += r->x.u[p];
        row_last = max(row_last, r->x.fi[p]);
    }
    exchange_done(sm, p);
    if (total == 0) {
        if (cl.block_rank() == 0 && threadIdx.x == 0)
            *id = row_last < 0 ? 0 : row_last;
        return;
    }
    uint64_t target = draw_target(u, total);
    if (!(before <= target && target < before + sm->wm[w]))
        return;   /* exactly one warp of the row holds the crossing */
    int j = warp_crossing(slice, NULL, a, e, before, target);
    if (j >= 0 && lane == 0)
        *id = sm->from + j;
}

/* ---- the cuts from a few candidates ----
 * A top-k cut (then a top-p cut among the kept), or a peaked row's top-p
 * alone, from the row's few largest tokens, with no radix select: most rows'
 * top k, and a peaked row's top-p set, lie among a few dozen tokens that a
 * bound found from each thread's largest value picks out. Keys order the
 * ranking: larger probability first, then lower index. */
__device__ static inline uint64_t rank_key(uint32_t bits, int i)
{
    return (uint64_t)bits << 32 | (uint32_t)~(uint32_t)i;
}

/* Σ of v over the threads up to this one (inclusive), in thread order; T's sums are exact (integers). */
__device__ static uint64_t block_scan(uint64_t v, struct probs_smem *sm)
{
    int lane = lane_id(), w = warp_id();
    for (int o = 1; o < 32; o <<= 1) {
        uint64_t y = __shfl_up_sync(FULL_MASK, v, o);
        if (lane >= o)
            v += y;
    }
    __syncthreads();   /* wm is free */
    if (lane == 31)
        sm->wm[w] = v;
    __syncthreads();
    return v + warp_sum(lane < w ? sm->wm[lane] : (uint64_t)0);
}

/* Whether a top-p alone may keep few enough tokens for cut_from_candidates: it keeps at least
 * top_p / p_max of them, and the row's largest probability is inv (its e is 1). */
__device__ static inline bool top_p_may_fit(float top_p, float inv)
{
    return (double)top_p * 0.999 <= (double)CAND_ROW * (double)inv;
}

/* The row's probabilities are slice · inv (the block's slice holds the exponentials e, sum their sum);
 * e_max is the e of the thread's largest logit (row_argmax's thread_max: those of the threads are
 * distinct tokens). For a top-k (k <= CAND_ROW), every thread's e_max is already counted in its
 * block's first-level histogram hist.hm_lo. When the cut's candidates fit (CAND_BLOCK a block,
 * CAND_ROW a row), writes the kept probabilities, renormalized, to out and the slice (and with `draw`,
 * draws from them with u into *id) and returns true; else returns false having written nothing, and
 * the histogram is the caller's to clear. The cuts, and so every written value, are those of the radix
 * select's path. Every thread of every block of the cluster must call it, and they all return the same. */
template <bool TOP_K>   /* a top-k (0 < k <= CAND_ROW, k < V), else a top-p alone: the two paths compiled apart */
__device__ static bool cut_from_candidates(float *slice, float *out, const struct ds_k_sampling &s, double sum,
                                           float inv, float e_max, struct probs_smem *sm, bool draw, float u_draw,
                                           int32_t *id)
{
    cg::cluster_group cl = cg::this_cluster();
    int nb = (int)cl.num_blocks(), k = s.top_k, n = sm->to - sm->from, t = threadIdx.x;
    constexpr bool cut_k = TOP_K;
    bool cut_p = s.top_p > 0 && s.top_p < 1;
    int bin = RADIX_BINS - 1 - t;
    uint64_t c = 0, m = 0, above_c = 0, above_m = 0, n_bin;
    uint32_t lo;
    if (cut_k) {
        /* k threads of the cluster (k <= CAND_ROW, at most a block's threads) have a largest e at or above
         * the lower edge of the highest first-level bin that reaches k of their counts, so k tokens a
         * probability at or above that edge · inv (rounding keeps the order) */
        for (int r = 0; r < nb; r++)   /* (added before the sum's cluster exchange in probs_row, whose barrier
                                        * makes them visible; hm_lo is written again only after the barrier
                                        * after the gather) */
            c += cl.map_shared_rank(sm, r)->hist.hm_lo[bin];
        int j = pick_bin(c, 0, (uint64_t)k, false, &above_c, &above_m, &n_bin, sm);
        lo = __float_as_uint(__fmul_rn(__uint_as_float((uint32_t)j << 20), inv));
    } else {
        /* top-p alone: the threads' largest probabilities weigh at least the cut's target at or above the
         * lower edge of the highest first-level bin whose masses from the top reach a bound on that
         * target (from the row's sum: the exact total is Σ of each p's rounding, within 2^-24 of it) */
        float pm = __fmul_rn(e_max, inv);
        int b = level0_bin(__float_as_uint(pm));
        atomicAdd(&sm->hist.hc[b], 1u);
        add_mass(sm, b, to_fx(pm));
        cl.sync();   /* every block's counts and masses are in */
        for (int r = 0; r < nb; r++) {
            const struct probs_smem *o = cl.map_shared_rank(sm, r);
            c += o->hist.hc[bin];
            m += ((uint64_t)o->hist.hm_hi[bin] << 32) + o->hist.hm_lo[bin];
        }
        cl.sync();   /* every block has read the others' histograms: cand.own, over hc, may be written */
        double total_hi = sum * (double)inv * FX_ONE * (1.0 + 0x1p-22);
        uint64_t target_hi = (uint64_t)ceil((double)s.top_p * total_hi) + 1;
        if (t == 0)
            sm->pick = -1;
        int j = pick_bin(c, m, target_hi, true, &above_c, &above_m, &n_bin, sm);
        /* the radix select when the threads' maxima do not reach it, or when more of them than a row's
         * candidates lie at or above the bound (each a token) */
        if (j < 0 || above_c + n_bin > CAND_ROW)
            return false;
        lo = (uint32_t)j << 20;
    }
    lo = lo > 1 ? lo : 1;   /* at least the least positive float */
    /* this block's candidates, the tokens at or above lo (in no particular order: the keys rank them); for a
     * top-p alone, also the exact total of the block's probabilities */
    uint64_t total = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        int j = base + t;
        float pj = j < n ? __fmul_rn(slice[j], inv) : 0.0f;
        uint32_t b = __float_as_uint(pj);
        if (!cut_k)
            total += to_fx(pj);
        bool cand = j < n && b >= lo;
        unsigned act = __ballot_sync(FULL_MASK, cand);
        if (!act)
            continue;
        int first = __ffs(act) - 1, at = 0;
        if (lane_id() == first)
            at = atomicAdd(&sm->n_own, __popc(act));
        int at0 = __shfl_sync(FULL_MASK, at, first);
        at = at0 + __popc(act & ((1u << lane_id()) - 1u));
        if (cand && at < CAND_BLOCK)
            sm->cand.own[at] = rank_key(b, sm->from + j);
        if (at0 + __popc(act) > CAND_BLOCK)
            break;   /* too many: the count says so, and the radix select takes the row */
    }
    if (!cut_k)
        total = block_sum(total, sm->red);
    __syncthreads();
    /* the row's candidates, in every block (block order; the remote blocks' lists stay until they leave) */
    int p = sm->par;
    if (t == 0) {
        sm->x.u[p] = (uint64_t)sm->n_own;
        sm->x.t[p] = total;
    }
    cl.sync();   /* also: every block has read the others' hist.hm_lo and hm_hi, which cand.all overwrites */
    int n_c = 0, fits = 1, own_at = 0, own_before = 0;   /* the block holding candidate t, and its first's */
    total = 0;
    for (int r = 0; r < nb; r++) {
        const struct probs_smem *o = cl.map_shared_rank(sm, r);
        int cnt = (int)o->x.u[p];
        total += o->x.t[p];
        fits &= cnt <= CAND_BLOCK;
        if (t >= n_c && t < n_c + cnt) {
            own_at = r;
            own_before = n_c;
        }
        n_c += cnt;
    }
    /* fewer than k candidates only for lo 1: fewer than k tokens above 0, the cut is 0 */
    fits &= n_c >= 1 && n_c <= CAND_ROW && (!cut_k || n_c >= k || lo == 1);
    uint64_t key = 0;
    if (fits && t < n_c) {
        key = cl.map_shared_rank(sm, own_at)->cand.own[t - own_before];
        sm->cand.all[t] = key;
    }
    exchange_done(sm, p);
    if (!fits)
        return false;
    /* ranks: thread r then holds the candidate of rank r, and its mass; cum: the masses of ranks 0..r */
    int rank = 0;
    for (int j = 0; t < n_c && j < n_c; j++)
        rank += sm->cand.all[j] > key;
    __syncthreads();
    if (t < n_c)
        sm->cand.all[rank] = key;
    __syncthreads();
    bool mine = t < n_c;
    key = mine ? sm->cand.all[t] : 0;
    uint32_t vb = (uint32_t)(key >> 32);
    bool first_of_value = mine && (t == 0 || (uint32_t)(sm->cand.all[t - 1] >> 32) != vb);
    uint64_t w = mine ? to_fx(__uint_as_float(vb)) : 0, cum = block_scan(w, sm);
    /* the top-k: ranks 0..k - 1 (the tokens above the k-th value u and, of those equal to it, the lowest
     * ids); or, with fewer than k tokens above 0, every candidate (the zeros kept weigh nothing). A top-p
     * alone starts from every token. */
    int last = cut_k ? (n_c < k ? n_c : k) - 1 : n_c - 1;
    if (t == last)
        sm->cut_mass = cum;
    __syncthreads();
    uint64_t kept = cut_k ? sm->cut_mass : total;
    if (cut_p) {
        /* the top-p among them, as radix_select's search by mass from the top-k's u: the first rank whose
         * running mass reaches the target; its value's tokens from its first rank on, as many as needed */
        uint64_t target = (uint64_t)ceil((double)s.top_p * (double)kept);
        if (target < 1)
            target = 1;
        if (!cut_k && sm->cut_mass < target) {   /* (the bound makes this impossible) */
            cl.sync();   /* no block reads another's list any more */
            return false;
        }
        uint32_t u = !cut_k || n_c < k ? 0 : (uint32_t)(sm->cand.all[last] >> 32);
        int first_u = n_c;   /* the first rank of u (where the top-k's m tokens equal to u start) */
        __syncthreads();
        if (u && first_of_value && vb == u)
            sm->cut_rank = t;
        __syncthreads();
        first_u = u ? sm->cut_rank : n_c;
        __syncthreads();
        if (mine && cum >= target && cum - w < target)
            sm->cut_rank = t;   /* w > 0 there: one thread */
        __syncthreads();
        uint32_t up = (uint32_t)(sm->cand.all[sm->cut_rank] >> 32);
        __syncthreads();
        if (first_of_value && vb == up) {
            sm->cut_rank = t;
            sm->cut_mass = cum - w;
        }
        __syncthreads();
        int f = sm->cut_rank;
        uint64_t above = sm->cut_mass, v = to_fx(__uint_as_float(up));
        uint64_t need = (target - above + v - 1) / v, m_u = (uint64_t)(last + 1 - first_u);
        if (need < 1)
            need = 1;
        if (cut_k && up == u && need > m_u)
            need = m_u;
        kept = above + need * v;
        last = f + (int)need - 1;
    }
    uint64_t cut = sm->cand.all[last];   /* the last kept key */
    float renorm = (float)(1.0 / ((double)kept / FX_ONE));
    /* the row, as write_kept writes it: each warp its own segment (the draw's order) */
    struct draw_part dp = {0, -1};
    int from, to;
    warp_segment(n, &from, &to);
    write_segment(
        slice, out, from, to, renorm, [inv](float e) { return __fmul_rn(e, inv); },
        [cut](uint32_t b, int id) { return rank_key(b, id) >= cut; }, sm, draw, dp);
    if (draw)
        draw_in_cluster(slice, u_draw, dp, sm, id);
    return true;
}

/* The length of a block's slice of a row of V over c blocks: a multiple of 32. */
static __host__ __device__ inline int slice_len(int V, int c)
{
    return ((V + c - 1) / c + 31) & ~31;
}

/* One row per cluster (gridDim.x = rows × cluster size), rows row0 on; dynamic shared memory: the block's
 * slice. */
__device__ static void probs_row(const float *x, int ldx, const int32_t *rows, const struct ds_k_sampling *params,
                                 int V, float *out, int ldo, const float *uniform, int32_t *ids, int row0)
{
    __shared__ struct probs_smem sm;
    extern __shared__ __align__(16) float slice[];   /* [slice_len(V, c)]: x, then e, then probabilities */
    cg::cluster_group cl = cg::this_cluster();
    int c = (int)cl.num_blocks(), row = row0 + (int)blockIdx.x / c;
    if (threadIdx.x == 0) {
        int len = slice_len(V, c);
        int from = (int)cl.block_rank() * len;
        sm.from = from < V ? from : V;
        sm.to = from + len < V ? from + len : V;
        sm.par = 0;
        sm.n_own = 0;
    }
    hist_clear(&sm);   /* the normalization pass builds the first select's first level */
    __syncthreads();
    size_t r = rows ? (size_t)rows[row] : (size_t)row;
    const float *xr = x + r * ldx;
    float *o = out + r * ldo + sm.from;   /* the block's slice of the output row */
    int n = sm.to - sm.from;
    struct ds_k_sampling s = params[row];
    float mx, x_max;
    int imax = row_argmax(xr, slice, &sm, &mx, &x_max);   /* every read of x is done: out may be x (slices are disjoint) */
    if (s.temperature < GREEDY_TEMPERATURE) {
        for (int j = threadIdx.x; j < n; j += blockDim.x)
            o[j] = sm.from + j == imax ? 1.0f : 0.0f;
        if (ids && cl.block_rank() == 0 && threadIdx.x == 0)
            ids[row] = imax;   /* what a draw from the one-hot row gives, whatever u */
        cl.sync();   /* no block leaves while another may read its shared memory */
        return;
    }
    /* softmax(x / T): the CPU's float operations */
    float inv_t = 1.0f / s.temperature;
    double sum = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float e = expf(__fmul_rn(__fsub_rn(slice[j], mx), inv_t));
        slice[j] = e;
        sum += e;
    }
    bool cut_k = s.top_k > 0 && s.top_k < V, cut_p = s.top_p > 0 && s.top_p < 1;
    /* the cuts may come from candidates (cut_from_candidates): a top-k of at most CAND_ROW, or a top-p alone
     * whose row is peaked enough; their bound starts from the e of each thread's largest logit */
    bool few = cut_k && s.top_k <= CAND_ROW, few_p = !cut_k && cut_p;
    float e_max = few || few_p ? expf(__fmul_rn(__fsub_rn(x_max, mx), inv_t)) : 0.0f;
    if (few)
        atomicAdd(&sm.hist.hm_lo[level0_bin(__float_as_uint(e_max))], 1u);
    sum = cluster_sum(block_sum(sum, sm.red_d), &probs_xchg::d, &sm);
    float inv = (float)(1.0 / sum);
    if (few || (few_p && top_p_may_fit(s.top_p, inv))) {
        bool done = few ? cut_from_candidates<true>(slice, o, s, sum, inv, e_max, &sm, ids != NULL,
                                                    ids ? uniform[row] : 0.0f, ids ? ids + row : NULL)
                        : cut_from_candidates<false>(slice, o, s, sum, inv, e_max, &sm, ids != NULL,
                                                     ids ? uniform[row] : 0.0f, ids ? ids + row : NULL);
        if (done) {
            cl.sync();
            return;
        }
        hist_clear(&sm);   /* too many candidates: the radix select, on a clean histogram */
        __syncthreads();
    }
    uint64_t total = 0;
    /* Top-p alone: the first level's histogram leaves out the tokens of bins below `prune`, each under the
     * bin's lower edge, so together under V · edge: at most half the mass the cut leaves out, so the cut lies
     * above them. Checked exactly once the total is known (else radix_select builds it again, every token). */
    int prune = 0;
    if (cut_p && !cut_k)
        prune = level0_bin(__float_as_uint((float)((1.0 - (double)s.top_p) / (2.0 * V))));
    if (cut_k || cut_p) {
        for (int base = 0; base < n; base += blockDim.x) {
            int j = base + threadIdx.x;
            float v = j < n ? __fmul_rn(slice[j], inv) : 0.0f;
            uint64_t w = to_fx(v);
            if (j < n)
                slice[j] = v;
            total += w;
            int bin = level0_bin(__float_as_uint(v));
            hist_add(j < n && bin >= prune, bin, w, cut_k, &sm);
        }
    } else {
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float v = __fmul_rn(slice[j], inv);
            o[j] = v;
            slice[j] = v;
            total += to_fx(v);
        }
    }
    if (!cut_k && !cut_p) {
        if (ids) {
            __syncthreads();
            draw_in_cluster(slice, uniform[row], draw_scan(slice, &sm), &sm, ids + row);
        }
        cl.sync();
        return;
    }
    total = row_sum_all(total, &sm);   /* also makes the slice's writes visible to the block */
    uint32_t u = 0;        /* value (bits) of the last kept token in the ranking */
    uint64_t m = 0;        /* tokens kept among those equal to it (lowest ids) */
    uint64_t n_eq = 0;     /* tokens equal to it */
    uint64_t kept = total; /* kept mass */
    uint64_t f_lo = total; /* mass of the candidates (the top-k set, else every token) */
    uint32_t lo = 0;
    if (cut_k) {
        uint64_t above_c, above_m;
        u = radix_select(slice, o, 0, (uint64_t)s.top_k, false, true, &sm, &above_c, &above_m, &n_eq);
        m = (uint64_t)s.top_k - above_c;
        kept = above_m + m * to_fx(__uint_as_float(u));
        lo = u;
        f_lo = kept;
    }
    if (cut_p) {
        /* the smallest prefix of the ranking whose mass reaches top_p of the candidates' */
        uint64_t target = (uint64_t)ceil((double)s.top_p * (double)f_lo);
        if (target < 1)
            target = 1;
        /* the tokens left out of the first level weigh under `pruned`: enough mass remains above them */
        uint64_t pruned = (uint64_t)ceil((double)V * (double)__uint_as_float((uint32_t)prune << 20) * FX_ONE) + 1;
        bool level0_done = !cut_k && (prune == 0 || (total >= target && total - target >= pruned));
        uint64_t above_c, above;
        uint32_t up = radix_select(slice, o, lo, target, true, level0_done, &sm, &above_c, &above, &n_eq);
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
    struct draw_part dp = {0, -1};
    write_kept(slice, o, u, m, n_eq, renorm, &sm, ids != NULL, dp);
    if (ids)
        draw_in_cluster(slice, uniform[row], dp, &sm, ids + row);
    cl.sync();
}

/* probs_row. A launch in two parts (probs_launch) runs the second while the first ends: the parts' rows are
 * disjoint, so the first lets the second launch at once (its blocks take SMs as the first's leave), and the
 * second waits for the first only before it exits, so that what follows the second follows both. (A kernel
 * after a launch in one part may launch early too: a pdl_launch waits for this one in pdl_enter.) */
__global__ static void __launch_bounds__(SAMPLE_THREADS)
    probs_kernel(const float *x, int ldx, const int32_t *rows, const struct ds_k_sampling *params, int V, float *out,
                 int ldo, const float *uniform, int32_t *ids, int row0)
{
    pdl_release();
    probs_row(x, ldx, rows, params, V, out, ldo, uniform, ids, row0);
    pdl_wait();
}

/* A row's fixed cost in the time model below, in tokens of slice: a cluster
 * takes about ROW_FIXED + (tokens per block) units (h200: ~48 µs fixed, the
 * phases' barriers and latencies, and ~0.42 ns per token; bench/RESULTS.md). */
#define ROW_FIXED 114000.0

static int forced_cluster;   /* ds_k_sampling_force_blocks_per_row's; 0: the time model */

/* Clusters of each size 1..MAX_CLUSTER the GPU holds at once for rows of V
 * (one block per SM; a cluster stays within a GPC, so sizes waste SMs
 * differently): 0 when the slice does not fit a block's shared memory, -1 when
 * it fits but the GPU did not say how many. NULL when the device cannot be
 * asked at all. */
static const int *probs_active(int V)
{
    static int smem_max = -1;             /* the device's (one per process) */
    static int memo_V = -1;
    static int active[MAX_CLUSTER + 1];   /* for memo_V */
    if (smem_max < 0) {
        int dev = 0, optin = 0;
        cudaFuncAttributes fa;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
            cudaFuncGetAttributes(&fa, (const void *)probs_kernel) != cudaSuccess ||
            cudaFuncSetAttribute(probs_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 optin - (int)fa.sharedSizeBytes) != cudaSuccess)
            return NULL;
        smem_max = optin - (int)fa.sharedSizeBytes;
    }
    if (memo_V != V) {
        for (int c = 1; c <= MAX_CLUSTER; c++) {
            size_t bytes = (size_t)slice_len(V, c) * 4;
            active[c] = 0;
            if (bytes > (size_t)smem_max)
                continue;
            cudaLaunchAttribute attr;
            cudaLaunchConfig_t cfg = cluster_config(c, (unsigned)c, SAMPLE_THREADS, bytes, 0, &attr);
            if (cudaOccupancyMaxActiveClusters(&active[c], probs_kernel, &cfg) != cudaSuccess) {
                active[c] = -1;
                (void)cudaGetLastError();   /* not the caller's error */
            }
        }
        memo_V = V;
    }
    return active;
}

/* The time model: n rows of V in clusters of c take ⌈n / active⌉ waves × (ROW_FIXED + slice). */
static double probs_time(int n, int V, int c, const int *active)
{
    return (double)((n + active[c] - 1) / active[c]) * (ROW_FIXED + slice_len(V, c));
}

/* Blocks per row for one launch of n rows: of the sizes that fit, the one of least time by the model (without
 * occupancy figures: the smallest that fits); 0 when no size fits. */
static int probs_one_size(int n, int V, const int *active)
{
    int best = 0;
    for (int c = 1; c <= MAX_CLUSTER && !best; c++)
        if (active[c] != 0)
            best = c;
    for (int c = 1; c <= MAX_CLUSTER; c++)
        if (active[c] > 0 && (active[best] <= 0 || probs_time(n, V, c, active) < probs_time(n, V, best, active)))
            best = c;
    return best;
}

/* How n rows of V are launched: rows [0, n1) in clusters of c1 and, when n1 < n, the rest in a second launch in
 * clusters of c2. A second launch pays when the one launch's last wave would be partial: whole waves of c1, then
 * the remaining rows in smaller slices (over more blocks), is then quicker by the model. 0 when no size fits. */
struct probs_plan {
    int c1, n1, c2;
};

static int probs_plan(int n, int V, struct probs_plan *pl)
{
    const int *active = probs_active(V);
    if (!active)
        return 0;
    if (forced_cluster && active[forced_cluster] != 0) {
        *pl = (struct probs_plan){forced_cluster, n, 0};
        return forced_cluster;
    }
    int c = probs_one_size(n, V, active);
    *pl = (struct probs_plan){c, n, 0};
    if (!c || active[c] <= 0)
        return c;
    double best = probs_time(n, V, c, active);
    for (int c1 = 1; c1 <= MAX_CLUSTER; c1++) {
        if (active[c1] <= 0 || n <= active[c1] || n % active[c1] == 0)
            continue;
        int n1 = n / active[c1] * active[c1], c2 = probs_one_size(n - n1, V, active);
        if (active[c2] <= 0)
            continue;
        double t = probs_time(n1, V, c1, active) + probs_time(n - n1, V, c2, active);
        if (t < best) {
            best = t;
            *pl = (struct probs_plan){c1, n1, c2};
        }
    }
    return pl->c1;
}

extern "C" int ds_k_sampling_blocks_per_row(int n, int V)
{
    struct probs_plan pl;
    return n > 0 && V > 0 ? probs_plan(n, V, &pl) : 0;
}

extern "C" int ds_k_sampling_force_blocks_per_row(int c)
{
    if (c < 0 || c > MAX_CLUSTER)
        return -1;
    forced_cluster = c;
    return 0;
}

static cudaError_t probs_launch(const float *x, int ldx, const int32_t *rows, const struct ds_k_sampling *params,
                                int n, int V, float *out, int ldo, const float *u, int32_t *ids, cudaStream_t stream)
{
    if (n < 0 || V <= 0 || ldx < V || ldo < V || (ids && !u))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    struct probs_plan pl;
    if (!probs_plan(n, V, &pl))
        return cudaErrorInvalidValue;   /* a vocabulary too large for MAX_CLUSTER blocks' shared memory */
    const int size[2] = {pl.c1, pl.c2}, from[2] = {0, pl.n1}, to[2] = {pl.n1, n};
    for (int i = 0; i < 2; i++) {
        if (from[i] == to[i])
            continue;
        cudaLaunchAttribute attr[2];
        cudaLaunchConfig_t cfg = cluster_config(size[i], (unsigned)((to[i] - from[i]) * size[i]), SAMPLE_THREADS,
                                                (size_t)slice_len(V, size[i]) * 4, stream, &attr[0]);
        if (i == 1 && pdl_usable((const void *)probs_kernel)) {   /* the second part overlaps the first */
            attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            attr[1].val.programmaticStreamSerializationAllowed = 1;
            cfg.numAttrs = 2;
        }
        cudaError_t e = cudaLaunchKernelEx(&cfg, probs_kernel, x, ldx, rows, params, V, out, ldo, u, ids, from[i]);
        if (e != cudaSuccess)
            return e;
    }
    return cudaSuccess;
}

extern "C" cudaError_t ds_k_sampling_probs(const float *x, int ldx, const int32_t *rows,
                                           const struct ds_k_sampling *params, int n, int V, float *out, int ldo,
                                           cudaStream_t stream)
{
    return probs_launch(x, ldx, rows, params, n, V, out, ldo, NULL, NULL, stream);
}

extern "C" cudaError_t ds_k_sample_logits(const float *x, int ldx, const int32_t *rows,
                                          const struct ds_k_sampling *params, int n, int V, float *out, int ldo,
                                          const float *u, int32_t *ids, cudaStream_t stream)
{
    if (!u || !ids)
        return cudaErrorInvalidValue;
    return probs_launch(x, ldx, rows, params, n, V, out, ldo, u, ids, stream);
}

/* ---- draws ---- */
struct draw_smem {
    uint64_t warp_sum[N_WARPS];
    uint64_t piece_sum[N_WARPS];   /* draw_from: the crossing segment's pieces, one a warp */
    int result;
};

/* Σ of the weights; every thread gets it (and sm->warp_sum holds each warp segment's share). */
__device__ static uint64_t draw_mass(const float *p, const float *q, int V, struct draw_smem *sm)
{
    int from, to, w = warp_id(), lane = lane_id();
    warp_segment(V, &from, &to);
    uint64_t acc = 0;
    int i = from + lane;
    for (; i + 7 * 32 < to; i += 8 * 32)   /* eight reads in flight (integer sums: any order) */
        acc += ((weight(p, q, i) + weight(p, q, i + 32)) + (weight(p, q, i + 64) + weight(p, q, i + 96))) +
               ((weight(p, q, i + 128) + weight(p, q, i + 160)) + (weight(p, q, i + 192) + weight(p, q, i + 224)));
    for (; i < to; i += 32)
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

/* The last i with a positive weight (p, or p - q), or -1; every thread gets it. */
__device__ static int last_positive(const float *p, const float *q, int V, struct draw_smem *sm)
{
    if (threadIdx.x == 0)
        sm->result = -1;
    __syncthreads();
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float v = q ? __fsub_rn(p[i], q[i]) : p[i];
        if (v > 0.0f)
            atomicMax(&sm->result, i);
    }
    __syncthreads();
    int res = sm->result;
    __syncthreads();
    return res;
}

/* The first i at which the running sum of weights exceeds target (< the total of draw_mass, which the block
 * ran on the same p, q and V last, so that sm->warp_sum holds its segments); every thread gets it. */
__device__ static int draw_from_target(const float *p, const float *q, int V, uint64_t target, struct draw_smem *sm)
{
    int seg = segment_len(V), w = warp_id(), lane = lane_id();
    if (threadIdx.x == 0)
        sm->result = -1;
    __syncthreads();
    /* The warp segment that holds the crossing (before <= target < before + its sum; target < total, so one
     * does), cut into one piece a warp: every warp sums its piece, and only the piece that holds the crossing
     * is scanned, by one warp (a scan of the whole segment by one warp waits on each of its reads in turn). */
    int cw = 0;
    uint64_t before = 0;
    while (cw < N_WARPS - 1 && before + sm->warp_sum[cw] <= target)
        before += sm->warp_sum[cw++];
    int c_from = cw * seg, c_to = c_from + seg < V ? c_from + seg : V;
    int piece = ((c_to - c_from + N_WARPS - 1) / N_WARPS + 31) & ~31;
    int from = c_from + w * piece < c_to ? c_from + w * piece : c_to;
    int to = from + piece < c_to ? from + piece : c_to;
    uint64_t acc = 0;
    for (int i = from + lane; i < to; i += 32)
        acc += weight(p, q, i);
    acc = warp_sum(acc);
    if (lane == 0)
        sm->piece_sum[w] = acc;
    __syncthreads();
    for (int k = 0; k < w; k++)
        before += sm->piece_sum[k];
    if (before <= target && target < before + sm->piece_sum[w]) {
        int i = warp_crossing(p, q, from, to, before, target);
        if (i >= 0 && lane == 0)
            sm->result = i;
    }
    __syncthreads();
    int res = sm->result < 0 ? 0 : sm->result;
    __syncthreads();
    return res;
}

/* The first i in index order whose running sum of weights exceeds u · total
 * (ds_sample_probs); total comes from draw_mass with the same p and q. A row of
 * zero mass gives its last positive token, else 0. Every thread gets the result. */
__device__ static int draw_from(const float *p, const float *q, int V, float u, uint64_t total, struct draw_smem *sm)
{
    if (total == 0) {
        int last = last_positive(p, q, V, sm);
        return last < 0 ? 0 : last;
    }
    return draw_from_target(p, q, V, draw_target(u, total), sm);
}

/* Whether a residual of this mass is drawn from (else the draw falls back to p). */
__device__ static inline bool residual_drawable(uint64_t mass)
{
    return (double)mass / FX_ONE > RESIDUAL_MIN_MASS;
}

/* The correction token: a draw from norm(max(0, p - q)), or from p when that mass is at most 1e-8. */
__device__ static int draw_residual(const float *p, const float *q, int V, float u, struct draw_smem *sm)
{
    uint64_t mass = draw_mass(p, q, V, sm);
    if (residual_drawable(mass))
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

/* ---- screening drafts before the verify's distributions ---- */
/* Most drafts of a round are accepted or rejected by a margin: one pass over a
 * row's logits bounds p[d] (the distribution kernel's value at the draft,
 * whatever its rounding) closely enough to settle the acceptance test, and
 * only the rows the accept may still read need their whole distribution. */
#define SCREEN_UNSURE 0
#define SCREEN_ACCEPT 1
#define SCREEN_REJECT 2
/* relative, on every estimate: fast exp and each thread's float sum of ~V / 1024 terms (up to
 * ~2.4e-7 a term when every term rescales), and the exact kernel's roundings */
#define SCREEN_SLACK(V) (1e-4 + 1e-6 * (double)(((V) + SAMPLE_THREADS - 1) / SAMPLE_THREADS))
#define SCREEN_FLOOR 1e-30     /* absolute, on p[d]: covers denormal and flushed probabilities (and u = 0) */
#define SCREEN_LEVELS 6        /* mass above x_d - T·2^l, l < SCREEN_LEVELS: bounds on the cut's value */
#define SCREEN_SUMS (3 + SCREEN_LEVELS)
#define SCREEN_COUNTS (2 + SCREEN_LEVELS)

/* A thread's (then a warp's) pass: the first maximum and, for soft rows, the
 * masses exp((x - m) / T) of every token, of those above the band around x_d,
 * of those in the band or above it, and of those above each level; for top-k
 * rows also the counts of the last three kinds (c[0], c[1], c[2 + l]). */
struct screen_part {
    float m;
    int im;
    float s[SCREEN_SUMS];
    int c[SCREEN_COUNTS];
};

struct screen_bounds {
    float inv_t, band_lo, band_hi, level[SCREEN_LEVELS];
    bool soft, count;
};

__device__ static inline void screen_add(struct screen_part &p, float x, int i, const struct screen_bounds &b)
{
    if (b.soft && x > p.m) {
        float f = p.m == -INFINITY ? 0.0f : __expf((p.m - x) * b.inv_t);
        for (int k = 0; k < SCREEN_SUMS; k++)
            p.s[k] *= f;
    }
    better(p.m, p.im, x, i);
    if (b.soft) {
        float w = x == -INFINITY ? 0.0f : __expf((x - p.m) * b.inv_t);
        p.s[0] += w;
        p.s[1] += x > b.band_hi ? w : 0.0f;
        p.s[2] += x >= b.band_lo ? w : 0.0f;
        for (int l = 0; l < SCREEN_LEVELS; l++)
            p.s[3 + l] += x > b.level[l] ? w : 0.0f;
    }
    if (b.count) {
        p.c[0] += x > b.band_hi;
        p.c[1] += x >= b.band_lo;
        for (int l = 0; l < SCREEN_LEVELS; l++)
            p.c[2 + l] += x > b.level[l];
    }
}

/* screen_add's sums and counts for a value against the part's reference p.m, which is finite (or +inf)
 * and at least x (or x is NaN), without the maximum's bookkeeping. */
__device__ static inline void screen_add_below(struct screen_part &p, float x, const struct screen_bounds &b)
{
    if (b.soft) {
        float w = __expf((x - p.m) * b.inv_t);   /* 0 for -inf */
        p.s[0] += w;
        p.s[1] += x > b.band_hi ? w : 0.0f;
        p.s[2] += x >= b.band_lo ? w : 0.0f;
#pragma unroll
        for (int l = 0; l < SCREEN_LEVELS; l++)
            p.s[3 + l] += x > b.level[l] ? w : 0.0f;
    }
    if (b.count) {
        p.c[0] += x > b.band_hi;
        p.c[1] += x >= b.band_lo;
#pragma unroll
        for (int l = 0; l < SCREEN_LEVELS; l++)
            p.c[2 + l] += x > b.level[l];
    }
}

/* One block per (draft k, chain): status[chain · DS_K_MAX_CHAIN + k]. */
__global__ static void __launch_bounds__(SAMPLE_THREADS)
    screen_kernel(const float *x, int ldx, const float *q, int ldq, const struct ds_k_chain *chains,
                  const struct ds_k_sampling *params, int V, uint8_t *status)
{
    __shared__ struct screen_part warp_part[N_WARPS];
    const struct ds_k_chain *c = &chains[blockIdx.y];
    int k = (int)blockIdx.x, len = c->len < 0 || !q ? 0 : c->len > DS_K_MAX_CHAIN ? DS_K_MAX_CHAIN : c->len;
    if (k >= len)
        return;
    uint8_t *st = status + (size_t)blockIdx.y * DS_K_MAX_CHAIN + k;
    int d = c->drafts[k];
    if (d < 0 || d >= V) {
        if (threadIdx.x == 0)
            *st = SCREEN_REJECT;   /* the accept rejects it, and draws from the residual */
        return;
    }
    const float *xr = x + (size_t)(c->p_row + k) * ldx;
    struct ds_k_sampling sp = params[blockIdx.y];
    float xd = xr[d], T = sp.temperature;
    struct screen_bounds b;
    b.soft = !(T < GREEDY_TEMPERATURE);   /* as probs_kernel decides (a NaN T is soft there) */
    b.count = b.soft && sp.top_k > 0 && sp.top_k < V;
    b.inv_t = b.soft ? 1.0f / T : 0.0f;
    /* tokens below the band have a probability below p[d], those above it one
     * above (checked below against the row's maximum) */
    float band = b.soft ? 2e-4f * (T + fabsf(xd) + 8.0f) : 0.0f;
    b.band_lo = xd - band;
    b.band_hi = xd + band;
    for (int l = 0; l < SCREEN_LEVELS; l++)
        b.level[l] = xd - T * (float)(1 << l);
    struct screen_part p;
    p.m = -INFINITY;
    p.im = 0x7fffffff;
    for (int i = 0; i < SCREEN_SUMS; i++)
        p.s[i] = 0.0f;
    for (int i = 0; i < SCREEN_COUNTS; i++)
        p.c[i] = 0;
    int j = 0;
    if (((uintptr_t)xr & 15) == 0) {
        int n4 = V / 4, i4 = threadIdx.x, bd = blockDim.x;
        /* Sixteen values a thread at a time (four reads in flight: a block streams only what it has asked
         * for), while the whole warp's are in the row. Once the warp has seen a finite value, its lanes'
         * sums share one reference, the warp's maximum M (raised, and the sums rescaled, when a group
         * brings a larger one), so most values only add to the sums (screen_add_below); each lane keeps
         * its own first maximum (tb at ti) for the row's argmax. Until then, screen_add as for the rest. */
        float M = -INFINITY, tb = -INFINITY;
        int ti = 0x7fffffff;
        bool shared_m = false;
        for (; i4 - lane_id() + 31 + 3 * bd < n4; i4 += 4 * bd) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++)
                v[u] = __ldcs((const float4 *)xr + i4 + u * bd);
            float cm = -INFINITY;   /* the lane's sixteen's maximum (NaN only when all are) */
#pragma unroll
            for (int u = 0; u < 4; u++)
                cm = fmaxf(cm, fmaxf(fmaxf(v[u].x, v[u].y), fmaxf(v[u].z, v[u].w)));
            float wm = cm;
            for (int o = 16; o > 0; o >>= 1)
                wm = fmaxf(wm, __shfl_xor_sync(FULL_MASK, wm, o));
            if (!shared_m && wm > -INFINITY) {   /* the warp's first finite (or +inf) value: M from here on */
                float f = p.m == -INFINITY ? 0.0f : __expf((p.m - wm) * b.inv_t);
                for (int k = 0; k < SCREEN_SUMS; k++)
                    p.s[k] *= f;
                M = wm;
                tb = p.m;
                ti = p.im;
                shared_m = true;
            }
            if (!shared_m) {
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    int i = 4 * (i4 + u * bd);
                    screen_add(p, v[u].x, i, b);
                    screen_add(p, v[u].y, i + 1, b);
                    screen_add(p, v[u].z, i + 2, b);
                    screen_add(p, v[u].w, i + 3, b);
                }
                continue;
            }
            if (cm > tb) {   /* the lane's first value equal to cm: its new maximum */
#pragma unroll
                for (int u = 3; u >= 0; u--) {
                    int i = 4 * (i4 + u * bd);
                    ti = v[u].w == cm ? i + 3 : ti;
                    ti = v[u].z == cm ? i + 2 : ti;
                    ti = v[u].y == cm ? i + 1 : ti;
                    ti = v[u].x == cm ? i : ti;
                }
                tb = cm;
            }
            if (wm > M) {
                float f = __expf((M - wm) * b.inv_t);
                for (int k = 0; k < SCREEN_SUMS; k++)
                    p.s[k] *= f;
                M = wm;
            }
            p.m = M;
#pragma unroll
            for (int u = 0; u < 4; u++) {
                screen_add_below(p, v[u].x, b);
                screen_add_below(p, v[u].y, b);
                screen_add_below(p, v[u].z, b);
                screen_add_below(p, v[u].w, b);
            }
        }
        if (shared_m) {   /* back to a lane's own state: sums against M, its maximum M where it holds M */
            p.m = M;
            p.im = tb == M ? ti : 0x7fffffff;
        }
        for (; i4 < n4; i4 += bd) {
            float4 v = __ldcs((const float4 *)xr + i4);
            screen_add(p, v.x, 4 * i4, b);
            screen_add(p, v.y, 4 * i4 + 1, b);
            screen_add(p, v.z, 4 * i4 + 2, b);
            screen_add(p, v.w, 4 * i4 + 3, b);
        }
        j = 4 * n4;
    }
    for (j += threadIdx.x; j < V; j += blockDim.x)
        screen_add(p, xr[j], j, b);
    /* the warp's parts, then the block's (in double, by warp 0) */
    for (int o = 16; o > 0; o >>= 1) {
        struct screen_part r;
        r.m = __shfl_xor_sync(FULL_MASK, p.m, o);
        r.im = __shfl_xor_sync(FULL_MASK, p.im, o);
        for (int i = 0; i < SCREEN_SUMS; i++)
            r.s[i] = __shfl_xor_sync(FULL_MASK, p.s[i], o);
        for (int i = 0; i < SCREEN_COUNTS && b.count; i++)
            p.c[i] += __shfl_xor_sync(FULL_MASK, p.c[i], o);
        float m = fmaxf(p.m, r.m);
        float fp = p.m == -INFINITY ? 0.0f : __expf((p.m - m) * b.inv_t);
        float fr = r.m == -INFINITY ? 0.0f : __expf((r.m - m) * b.inv_t);
        for (int i = 0; i < SCREEN_SUMS && b.soft; i++)
            p.s[i] = p.s[i] * fp + r.s[i] * fr;
        better(p.m, p.im, r.m, r.im);
    }
    if (lane_id() == 0)
        warp_part[warp_id()] = p;
    __syncthreads();
    /* warp 0 merges the warps' parts, lane w taking warp w's (butterflies: a fixed order); lane 0 then
     * gives the verdict */
    if (threadIdx.x >= 32)
        return;
    static_assert(N_WARPS == 32, "a lane of warp 0 for each warp's part");
    const struct screen_part &wp = warp_part[lane_id()];
    float m = -INFINITY;
    int im = 0x7fffffff;
    better(m, im, wp.m, wp.im);
    for (int o = 16; o > 0; o >>= 1) {
        float om = __shfl_xor_sync(FULL_MASK, m, o);
        int oi = __shfl_xor_sync(FULL_MASK, im, o);
        better(m, im, om, oi);
    }
    if (im == 0x7fffffff)
        im = 0;   /* ds_argmax's answer for a row that nothing beats -inf in */
    const float *qk = q + (size_t)(c->q_row + k) * ldq;
    float qq = qk[d] > MIN_DRAFT_PROB ? qk[d] : MIN_DRAFT_PROB;
    double uq = (double)__fmul_rn(c->u_accept[k], qq);   /* the accept's left side, exactly */
    uint8_t out = SCREEN_UNSURE;
    if (!b.soft) {   /* one-hot at the first maximum */
        out = d == im && uq < 1.0 ? SCREEN_ACCEPT : SCREEN_REJECT;
    } else {
        double sum[SCREEN_SUMS];
        int cnt[SCREEN_COUNTS];   /* (each at most V) */
        /* a part of no finite value adds nothing (but a warp of NaN logits does: Z becomes NaN, every
         * verdict unsure) */
        bool skip = wp.m == -INFINITY && !isnan(wp.s[0]);
        double f = skip ? 0.0 : exp((double)(wp.m - m) * b.inv_t);
#pragma unroll
        for (int i = 0; i < SCREEN_COUNTS; i++) {
            cnt[i] = wp.c[i];   /* (0 without top-k) */
            for (int o = 16; o > 0; o >>= 1)
                cnt[i] += __shfl_xor_sync(FULL_MASK, cnt[i], o);
        }
#pragma unroll
        for (int i = 0; i < SCREEN_SUMS; i++) {
            sum[i] = skip ? 0.0 : (double)wp.s[i] * f;
            for (int o = 16; o > 0; o >>= 1)
                sum[i] += __shfl_xor_sync(FULL_MASK, sum[i], o);
        }
        if (lane_id() != 0)
            return;
        const double lo = 1.0 - SCREEN_SLACK(V), hi = 1.0 + SCREEN_SLACK(V);
        double Z = sum[0], vd = exp((double)(xd - m) * b.inv_t) / Z;
        /* the band must hold every token whose probability can round to p[d]'s:
         * the exact kernel's exponents err by ~3 ulps of (m - x) / T, e by two
         * ulps (CUDA's expf) and p by one, so a band of about 6e-7 T + 5e-7
         * (m - x_d) would do (4e-7 T when e was exp in double) */
        bool band_ok = band >= 2e-6 * (T + ((double)m - xd));
        bool cut_k = b.count, cut_p = sp.top_p > 0 && sp.top_p < 1;
        /* the probability of a token at logit y, and the masses above the band and from it up */
        auto value = [&](double y) { return exp((y - m) * b.inv_t) / Z; };
        /* whether the gap from level l down to level l + 1 is wider than a tie (as band_ok asks of the band) */
        auto gap_wide = [&](int l) {
            return (double)T * (double)(1 << l) >= 4e-6 * (T + ((double)m - b.level[l + 1]));
        };
        double above = sum[1] / Z, from_band = sum[2] / Z;
        /* the pool the cut applies to (every token, or the top k), its mass within [pool_lo, pool_hi]
         * (slack included), and whether d is certainly in it */
        double pool_lo = lo, pool_hi = hi;
        bool in_pool = true;
        if (cut_k && band_ok && Z > 0 && isfinite(Z) && isfinite(T)) {
            /* Tokens rank by the kernel's p (ties: lower id first), which never decreases with x, and
             * tokens whose p tie lie within the band's width: so every token above the band comes
             * before d, and only tokens from the band up can. At a level, the same holds across the
             * gap down to the next level (checked against that width): the c[2 + l + 1] tokens above
             * level l + 1 hold every token that can rank before one above level l. */
            double kk = sp.top_k;
            if ((double)cnt[0] >= kk && vd * lo > SCREEN_FLOOR) {
                /* k tokens rank before d: p[d] = 0 (p[d] normal: subnormal probabilities can tie tokens
                 * above the band, which then rank after d by id) */
                *st = SCREEN_REJECT;
                return;
            }
            in_pool = (double)cnt[1] <= kk;
            pool_lo = in_pool ? (above + vd) * lo : 0.0;   /* d and everything above its band are kept */
            pool_hi = hi;
            if (in_pool)   /* the rest of the top k lies at or below the band */
                pool_hi = fmin(pool_hi, (above + (kk - (double)cnt[0]) * value(b.band_hi)) * hi);
            for (int l = 0; l + 1 < SCREEN_LEVELS; l++) {
                double y = b.level[l];
                if (!gap_wide(l))
                    continue;
                double above_l = sum[3 + l] / Z;
                if ((double)cnt[2 + l + 1] <= kk) {   /* every token above level l is in the top k */
                    pool_lo = fmax(pool_lo, above_l * lo);
                    pool_hi = fmin(pool_hi, (above_l + (kk - (double)cnt[2 + l]) * value(y)) * hi);
                }
                if ((double)cnt[2 + l] >= kk)   /* the top k lies above level l + 1 */
                    pool_hi = fmin(pool_hi, sum[3 + l + 1] / Z * hi);
            }
        }
        if (!band_ok || !(Z > 0) || !isfinite(Z) || !isfinite(T) || !(pool_lo > 0)) {
            out = SCREEN_UNSURE;
        } else if (!cut_p && !cut_k) {
            out = uq < vd * lo - SCREEN_FLOOR ? SCREEN_ACCEPT : uq >= vd * hi + SCREEN_FLOOR ? SCREEN_REJECT
                                                                                              : SCREEN_UNSURE;
        } else if (!cut_p) {
            /* p[d] = v_d / the pool's mass when d is in the pool */
            double p_lo = vd * lo / pool_hi - SCREEN_FLOOR, p_hi = vd * hi / pool_lo + SCREEN_FLOOR;
            out = in_pool && uq < p_lo ? SCREEN_ACCEPT : uq >= p_hi ? SCREEN_REJECT : SCREEN_UNSURE;
        } else {
            /* kept: the smallest prefix of the pool's ranking of mass >= top_p of
             * the pool's (without top-k both ~1): d is in it when the mass from
             * its band up is below that, out of it when the mass above its band
             * reaches it */
            double t = sp.top_p;
            /* d's place in the ranking: every token above its band comes before
             * it, none below the band does ("through d": up to and with d) */
            double before_hi = from_band * hi - vd * lo, through_lo = (above + vd) * lo, through_hi = from_band * hi;
            if (above * lo >= t * pool_hi && vd * lo > SCREEN_FLOOR) {
                out = SCREEN_REJECT;   /* the mass before d reaches the target: p[d] = 0 (p[d] normal, as above) */
            } else {
                bool kept = in_pool && before_hi < t * pool_lo;
                /* the cut (the last kept token's value) is at or below d when d is
                 * kept, and at or below every level whose mass above is short of
                 * the target (with top-k: a level whose tokens above are all in the pool) */
                double v_cut = kept ? vd * hi : 1.0;
                for (int l = 0; l < SCREEN_LEVELS; l++)
                    if (sum[3 + l] / Z * hi < t * pool_lo &&
                        (!cut_k || (l + 1 < SCREEN_LEVELS && (double)cnt[2 + l + 1] <= (double)sp.top_k &&
                                    gap_wide(l)))) {
                        double v = value(b.level[l]) * hi + 1e-17;
                        v_cut = v < v_cut ? v : v_cut;
                    }
                /* the kept mass: at least the target (and, d kept, the mass
                 * through d); below target + v_cut, and, when d is the last kept
                 * token, at most the mass through d */
                double kept_lo = t * pool_lo, kept_hi = t * pool_hi + v_cut + 1e-17;
                if (kept) {
                    kept_lo = through_lo > kept_lo ? through_lo : kept_lo;
                    if (through_lo >= t * pool_hi && through_hi < kept_hi)
                        kept_hi = through_hi;   /* d is the last kept token */
                }
                double p_lo = vd * lo / kept_hi - SCREEN_FLOOR, p_hi = vd * hi / kept_lo + SCREEN_FLOOR;
                out = kept && uq < p_lo ? SCREEN_ACCEPT : uq >= p_hi ? SCREEN_REJECT : SCREEN_UNSURE;
            }
        }
        /* Whatever d's rank: a cut row's p[d] is d's value over the kept mass, which holds the row's
         * maximum (value 1 / Z), so p[d] <= (v_d + floor) Z. This settles drafts far below the peak,
         * whose subnormal or flushed value keeps the rules above from ranking them. */
        if (out == SCREEN_UNSURE && (cut_k || cut_p) && Z > 0 && isfinite(Z) && isfinite(T) &&
            uq >= (vd * hi + SCREEN_FLOOR) * Z * (hi / lo))
            out = SCREEN_REJECT;
    }
    if (lane_id() == 0)
        *st = out;
}

/* One block: the rows each chain's accept may read without a certain
 * acceptance, in chain order, and their count. */
__global__ static void __launch_bounds__(SAMPLE_THREADS)
    screen_plan_kernel(const struct ds_k_chain *chains, const struct ds_k_sampling *params, const uint8_t *status,
                       int n, bool have_q, int32_t *rows, struct ds_k_sampling *row_params, int32_t *n_rows)
{
    __shared__ int warp_total[N_WARPS];
    int done = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        int i = base + (int)threadIdx.x, count = 0;
        const struct ds_k_chain *c = &chains[i < n ? i : 0];
        const uint8_t *st = status + (size_t)(i < n ? i : 0) * DS_K_MAX_CHAIN;
        int len = c->len < 0 || !have_q ? 0 : c->len > DS_K_MAX_CHAIN ? DS_K_MAX_CHAIN : c->len;
        for (int k = 0; k <= len && i < n; k++) {
            if (k < len && st[k] == SCREEN_ACCEPT)
                continue;
            count++;
            if (k == len || st[k] == SCREEN_REJECT)
                break;
        }
        /* exclusive scan of count over the block */
        int incl = count;
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(FULL_MASK, incl, o);
            if (lane_id() >= o)
                incl += y;
        }
        if (lane_id() == 31)
            warp_total[warp_id()] = incl;
        __syncthreads();
        int at = done + incl - count, all = 0;
        for (int w = 0; w < N_WARPS; w++) {
            at += w < warp_id() ? warp_total[w] : 0;
            all += warp_total[w];
        }
        for (int k = 0; k <= len && i < n; k++) {
            if (k < len && st[k] == SCREEN_ACCEPT)
                continue;
            rows[at] = c->p_row + k;
            row_params[at++] = params[i];
            if (k == len || st[k] == SCREEN_REJECT)
                break;
        }
        done += all;
        __syncthreads();   /* warp_total is read before the next chunk writes it */
    }
    if (threadIdx.x == 0)
        *n_rows = done;
}

extern "C" cudaError_t ds_k_spec_screen(const float *x, int ldx, const float *q, int ldq,
                                        const struct ds_k_chain *chains, const struct ds_k_sampling *params, int n,
                                        int max_len, int V, uint8_t *status, int32_t *rows,
                                        struct ds_k_sampling *row_params, int32_t *n_rows, cudaStream_t stream)
{
    if (n < 0 || n > 65535 || V <= 0 || ldx < V || (q && ldq < V) || max_len < 0 || max_len > DS_K_MAX_CHAIN)
        return cudaErrorInvalidValue;   /* (n: the grid's y extent) */
    if (n == 0)
        return cudaMemsetAsync(n_rows, 0, sizeof *n_rows, stream);
    if (max_len > 0 && q)
        screen_kernel<<<dim3((unsigned)max_len, (unsigned)n), SAMPLE_THREADS, 0, stream>>>(x, ldx, q, ldq, chains,
                                                                                            params, V, status);
    screen_plan_kernel<<<1, SAMPLE_THREADS, 0, stream>>>(chains, params, status, n, q != NULL, rows, row_params,
                                                         n_rows);
    return cudaGetLastError();
}

/* ---- chain accept/reject ---- */
/* The sums over the cluster's blocks of v (thread 0's), over all of them and over the ranks before this
 * block's; every thread gets both. slot: the block's exchange slot in shared memory, free again when it
 * returns (its last barrier follows every block's reads). Every thread of the cluster must call it. */
__device__ static void cluster_prefix(uint64_t v, uint64_t *slot, uint64_t *ret_total, uint64_t *ret_before)
{
    cg::cluster_group cl = cg::this_cluster();
    if (threadIdx.x == 0)
        *slot = v;
    cl.sync();
    uint64_t total = 0, before = 0;
    for (unsigned r = 0; r < cl.num_blocks(); r++) {
        uint64_t x = *cl.map_shared_rank(slot, r);
        total += x;
        before += r < cl.block_rank() ? x : 0;
    }
    cl.sync();
    *ret_total = total;
    *ret_before = before;
}

/* The draw of draw_from over a whole row of weights (p, or p - q) by the blocks of a cluster, each holding
 * the slice [from, from + n): its mass, the row's, and the slices' before it (cluster_prefix's); the block
 * whose slice holds the crossing writes the token to *out (rank 0 for a row of zero mass). The same token
 * as one block's draw_from: integer sums, in index order. Every thread of the cluster must call it. */
__device__ static void cluster_draw(const float *p, const float *q, int from, int n, float u, uint64_t mine,
                                    uint64_t total, uint64_t before, struct draw_smem *sm, uint64_t *slot,
                                    int32_t *out)
{
    const float *qs = q ? q + from : NULL;
    if (total == 0) {   /* the row's last positive token, else 0 */
        cg::cluster_group cl = cg::this_cluster();
        int last = last_positive(p + from, qs, n, sm);
        if (threadIdx.x == 0)
            *slot = last < 0 ? 0 : (uint64_t)(from + last) + 1;   /* 0: none */
        cl.sync();
        uint64_t row_last = 0;
        for (unsigned r = 0; r < cl.num_blocks(); r++) {
            uint64_t x = *cl.map_shared_rank(slot, r);
            row_last = x > row_last ? x : row_last;
        }
        cl.sync();   /* every block has read every slot */
        if (cl.block_rank() == 0 && threadIdx.x == 0)
            *out = row_last == 0 ? 0 : (int32_t)(row_last - 1);
        return;
    }
    uint64_t target = draw_target(u, total);
    if (before <= target && target < before + mine) {   /* exactly one block's slice holds the crossing */
        int i = draw_from_target(p + from, qs, n, target - before, sm);
        if (threadIdx.x == 0)
            *out = from + i;
    }
}

/* One cluster per chain, each block taking a slice of the rows' tokens (every block takes the same
 * decisions): draft k is accepted when u_accept[k] · max(q_k[d_k], 1e-8) < p_k[d_k]; the first rejection
 * draws the correction from the residual of p_k and q_k (from p_k when that mass is at most 1e-8); with
 * every draft accepted the bonus comes from p_len. A draft id outside the vocabulary is rejected. */
__global__ static void __launch_bounds__(SAMPLE_THREADS)
    accept_kernel(const float *p, int ldp, const float *q, int ldq, const struct ds_k_chain *chains,
                  const uint8_t *status, int V, int32_t *accepted, int32_t *next)
{
    __shared__ struct draw_smem sm;
    __shared__ uint64_t slot;
    cg::cluster_group cl = cg::this_cluster();
    int C = (int)cl.num_blocks(), chain = (int)blockIdx.x / C;
    int slice = slice_len(V, C);
    int from = (int)cl.block_rank() * slice < V ? (int)cl.block_rank() * slice : V;
    int n = (from + slice < V ? from + slice : V) - from;
    const struct ds_k_chain *c = &chains[chain];
    int len = c->len < 0 || !q ? 0 : c->len > DS_K_MAX_CHAIN ? DS_K_MAX_CHAIN : c->len;
    int a = 0;
    for (int k = 0; k <= len; k++) {
        const float *pk = p + (size_t)(c->p_row + k) * ldp;
        if (k < len && status && status[(size_t)chain * DS_K_MAX_CHAIN + k] == SCREEN_ACCEPT) {
            a++;   /* certain without p_k (ds_k_spec_screen) */
            continue;
        }
        const float *qk = NULL;
        if (k < len) {
            qk = q + (size_t)(c->q_row + k) * ldq;
            int d = c->drafts[k];
            if (d >= 0 && d < V) {
                float pq = pk[d], qq = qk[d] > MIN_DRAFT_PROB ? qk[d] : MIN_DRAFT_PROB;
                if (__fmul_rn(c->u_accept[k], qq) < pq) {
                    a++;
                    continue;
                }
            }
        }
        uint64_t mine = draw_mass(pk + from, qk ? qk + from : NULL, n, &sm), total, before;
        cluster_prefix(mine, &slot, &total, &before);
        if (qk && !residual_drawable(total)) {   /* no residual to speak of: from p */
            qk = NULL;
            __syncthreads();
            mine = draw_mass(pk + from, NULL, n, &sm);
            cluster_prefix(mine, &slot, &total, &before);
        }
        cluster_draw(pk, qk, from, n, c->u_target[k], mine, total, before, &sm, &slot, next + chain);
        break;
    }
    if (cl.block_rank() == 0 && threadIdx.x == 0)
        accepted[chain] = a;
}

extern "C" cudaError_t ds_k_spec_accept(const float *p, int ldp, const float *q, int ldq,
                                        const struct ds_k_chain *chains, const uint8_t *status, int n, int V,
                                        int32_t *accepted, int32_t *next, cudaStream_t stream)
{
    if (n < 0 || V <= 0 || ldp < V || (q && ldq < V))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    /* blocks a chain: as many as keep every chain's blocks within one wave (one 1,024-thread block an SM) */
    static int n_sm = -1;   /* the device's (one per process) */
    int dev = 0;
    if (n_sm < 0 && (cudaGetDevice(&dev) != cudaSuccess ||
                     cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess))
        n_sm = 0;
    int blocks = 1;
    while (blocks < MAX_CLUSTER && (long)n * (blocks + 1) <= n_sm)
        blocks++;
    if ((long)n * blocks > 0x7fffffffL)
        return cudaErrorInvalidValue;
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t cfg = cluster_config(blocks, (unsigned)(n * blocks), SAMPLE_THREADS, 0, stream, &attr);
    return cudaLaunchKernelEx(&cfg, accept_kernel, p, ldp, q, ldq, chains, status, V, accepted, next);
}
