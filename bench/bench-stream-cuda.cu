/* bench-stream-cuda.cu: one-row decoding's four products, for every layer of the Qwen3-4B shape, as the
 * library's kernels run them and as one persistent kernel that streams the weights without stopping at
 * the products' boundaries. A measurement of how near the weight floor a batch-1 step's products can get,
 * not a path the engine takes (bench/RESULTS.md says why).
 *
 *   bench-stream-cuda [--layers N] [--reps N] [--per-sm N] [--ring N] [--sync each|one|acqrel]
 *                     [--balance phase|layer] [--no-hint] [--poll-sleep NS] [--sums block|last]
 *                     [--leave-out waits,x,sums,loads] [--deps product|tile] [--gu-split N]
 *
 * Each layer runs qkv (x: RMSNorm of the residual), o (x: a fixed row standing in for attention's output;
 * o still waits for qkv), gate_up (x: RMSNorm of the residual) and down (x: SwiGLU of gate_up's output);
 * o and down add to the residual. k ranges are ds_k_gemm_split's, so both ways run the same chains.
 *
 * The streaming kernel: per-SM blocks (--per-sm, 3 by default) of four consumer warps and one producer
 * warp. The host deals every (layer, product, 64-column tile, k range) item to a block, in order, each
 * phase balanced by its weight bytes. A block's producer lane copies its items' weight stages (64 columns
 * x 64 k of bf16, 8 KiB, by TMA from a 2-D tensor map with the 128-byte swizzle) into a ring of --ring
 * stages, waiting only for free stages, never for activations. The consumers wait for the product before
 * to be complete (a counter in global memory per layer and product), make their x range in shared memory,
 * run gemm.cu's decoding chain (per column, m16n8k16 products over 16-wide k chunks in increasing order,
 * chunks past the range's end zero) and write their range's partial sums. The ranges are summed in order
 * into y by the tile's last item to finish (--sums last, the default: an atomic whose answer the item
 * waits for, as gemm.cu's last block does) or by one block named for the tile (--sums block: the block
 * that ran its last range, once its own items of the phase are done and the tile's counter is full; the
 * items only add to counters, none waits for an atomic's answer). Layer 0's x and sums are compared bit for bit with
 * ds_k_gemm_bf16 on the same x. --leave-out drops parts to show what each costs (the results are then
 * wrong): waits (no dependency waits), x (no x making), sums (the tile's last item does not sum), loads
 * (no weight copies: the products read whatever the ring holds).
 *
 * --deps tile (with --sums last; no waits or sums left out) measures finer dependencies: warp 0 of an item
 * waits only for the tiles of the product before that its x range reads (o: its heads' q and their KV heads'
 * k and v), and RMSNorm's scale is applied to qkv's and gate_up's sums instead of to x: the tile's last item
 * waits for the product before to be complete and takes the scale from its half tiles' sums of squares, summed
 * in a fixed order. That changes the model's arithmetic (x is rounded to bf16 before the scale); the check
 * still compares the sums before the scale. --gu-split N runs gate_up (and the kernels' gate_up) in N k ranges,
 * so that its items need only part of the residual. (Measured: neither gains, bench/RESULTS.md.)
 *
 * Prints the copy rate and the weight floor, the check, each run's median step for both ways, and the
 * timeline of layer 10's phases in the last streaming run (globaltimer). Exits 77 without a device. */
#include "config.h"

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

#define CK(x)                                                                                                  \
    do {                                                                                                       \
        cudaError_t e_ = (x);                                                                                  \
        if (e_ != cudaSuccess) {                                                                               \
            fprintf(stderr, "bench-stream-cuda: %s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                                           \
        }                                                                                                      \
    } while (0)

enum { P_QKV, P_O, P_GU, P_DOWN, NPROD };
static const char *const prod_name[NPROD] = {"qkv", "o", "gate_up", "down"};
#define HID 2560              /* the 4B's hidden size */
#define QO 4096               /* its 32 query heads x 128 */
#define QKV_N 6144            /* q, k and v */
#define FF 9728               /* its intermediate size */
#define MAX_LAYERS 36
#define BOX_K 64              /* a stage: 64 k ... */
#define BOX_N 64              /* ... of 64 columns (a tile) */
#define STAGE_BYTES (BOX_K * BOX_N * 2)
#define CONSUMERS 128         /* four warps, 16 columns each */
#define XS_MAX 2560           /* bf16 of an item's x range (gate_up's unsplit 2560 is the longest) */
#define MAX_TILES 304
#define MAX_SPLIT 16
#define SUM_DUTY 255          /* an item's range that means: sum this tile's ranges */
#define TRACE_LAYER 10
#define TRACE_ITEMS 24        /* items of TRACE_LAYER a block records at most */
#define SPIN_LIMIT 8000000000LL   /* cycles before a wait gives up (a fault, never a hang) */

enum { LEAVE_WAITS = 1, LEAVE_X = 2, LEAVE_SUMS = 4, LEAVE_LOADS = 8 };
enum { SYNC_EACH, SYNC_ONE, SYNC_ACQREL };

struct Prod {
    int N, K, split;
    int L;                    /* a k range's length (a multiple of 32) */
    int stages;               /* stages an item runs: 2 ceil(L / 128), as gemm.cu's 128-deep tile */
    int tiles;
    int accumulate;           /* adds to the residual */
};

struct Params {
    const int2 *items;        /* x: layer << 4 | product, y: tile << 8 | range */
    const int *item_start;    /* [blocks + 1] */
    float *resid;             /* [HID] */
    float *qkv_out;           /* [QKV_N] */
    float *gu_out;            /* [2 FF]: gate then up */
    const uint16_t *attn_x;   /* [QO] bf16: o's fixed x */
    const float *norm_w;      /* [HID] */
    float *part[NPROD];       /* [split, N] */
    int *tile_cnt;            /* [NPROD, MAX_TILES], back to 0 after each tile (the last item sums) */
    int *tile_done;           /* [layers, NPROD, MAX_TILES]: ranges done, growing across runs (a block sums) */
    int summers;              /* 1: each split tile is summed by a block named for it, after its own items */
    int *done;                /* [layers, NPROD]: tiles complete, growing across runs */
    int gen;                  /* this run's number from 1: a product is complete at gen x tiles */
    int deps_tile;            /* --deps tile: an item waits only for the tiles its x reads; RMSNorm's scale after
                                 the product */
    int *tile_ready;          /* [layers, NPROD, MAX_TILES]: the tile's y is final, growing across runs (--deps tile) */
    float scale0;             /* --deps tile: layer 0's RMSNorm scale of the first residual */
    float *tile_ss;           /* [layers, NPROD, MAX_TILES, 2]: the residual's sums of squares over each half of the
                                 tile, once o or down has added to it (--deps tile) */
    uint16_t *dump_x[NPROD];  /* layer 0's x [K], written in run 1 */
    float *dump_y[NPROD];     /* layer 0's sums without the residual [N], written in run 1 */
    Prod prod[NPROD];
    int ring;                 /* stages in a block's ring */
    int hint;                 /* weights copied with the L2 evict-first hint */
    int leave_out;
    int sync;
    int poll_sleep_ns;
    unsigned long long *trace;   /* [blocks, TRACE_ITEMS, 6]: start, dependency met, x made, products done,
                                    end (globaltimer ns), product */
};

/* ---- device helpers ---- */
__device__ static inline uint32_t smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ static inline void mbar_init(uint64_t *b, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count));
}
__device__ static inline void mbar_expect_tx(uint64_t *b, int bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ static inline void mbar_arrive(uint64_t *b)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
__device__ static inline void mbar_wait(uint64_t *b, int parity)
{
    long long t0 = clock64();
    for (;;) {
        uint32_t ok;
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(ok)
                     : "r"(smem_u32(b)), "r"(parity)
                     : "memory");
        if (ok)
            return;
        if (clock64() - t0 > SPIN_LIMIT)
            __trap();
    }
}
/* One 64 x 64 box of W (k from k, rows from row) into a stage, completing on bar. */
__device__ static inline void tma_load(void *dst, const CUtensorMap *map, int k, int row, uint64_t *bar,
                                       unsigned long long policy, bool hint)
{
    if (hint)
        asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                     " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(smem_u32(dst)),
                     "l"((uint64_t)map), "r"(k), "r"(row), "r"(smem_u32(bar)), "l"(policy)
                     : "memory");
    else
        asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                     " [%0], [%1, {%2, %3}], [%4];" ::"r"(smem_u32(dst)),
                     "l"((uint64_t)map), "r"(k), "r"(row), "r"(smem_u32(bar))
                     : "memory");
}
__device__ static inline void consumers_sync(void)
{
    asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS) : "memory");
}
__device__ static inline void spin_until(const int *p, int target, int sleep_ns)
{
    long long t0 = clock64();
    for (;;) {
        int v;
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
        if (v >= target)
            return;
        if (sleep_ns)
            __nanosleep(sleep_ns);
        if (clock64() - t0 > SPIN_LIMIT)
            __trap();
    }
}
__device__ static inline unsigned long long gtime(void)
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
/* Thread 0 of the consumers adds 1 to counter c, after every consumer's writes before the barrier;
 * returns the old value (acquiring the other adders' writes with SYNC_ACQREL). */
__device__ static inline int counter_add(int *c, int sync, bool want_old)
{
    int old = 0;
    if (sync == SYNC_ACQREL) {
        if (want_old)
            asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
        else
            asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(c) : "memory");
    } else {
        if (sync == SYNC_ONE)
            __threadfence();
        old = atomicAdd(c, 1);
    }
    return old;
}
/* After every consumer's writes: thread 0 adds 1 to counter c, for other blocks to wait on. */
__device__ static inline void consumers_publish(int *c, int sync)
{
    if (sync == SYNC_EACH)
        __threadfence();
    consumers_sync();
    if (threadIdx.x == 0)
        counter_add(c, sync, false);
}
__device__ static inline uint2 bf16x4(float a, float b, float c, float d)
{
    __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
    return make_uint2(*(uint32_t *)&lo, *(uint32_t *)&hi);
}

/* Threads 0..63: the tile's y = ((y +) part[0]) + part[1] + ... in range order, the parts' loads at once
 * (gemm.cu's last block's sums); in run 1, layer 0's sums without y to dump_y. */
__device__ static void sum_tile(const Params &P, const Prod &pr, int p, int layer, int tile, float *y, float scale)
{
    if (threadIdx.x >= BOX_N)
        return;
    const float *part = P.part[p];   /* [split, N] */
    int n = tile * BOX_N + threadIdx.x;
    float pz[MAX_SPLIT];
#pragma unroll
    for (int z = 0; z < MAX_SPLIT; z++)
        pz[z] = z < pr.split ? __ldcg(part + (size_t)z * pr.N + n) : 0.0f;
    float plain = pz[0];
    float v = pr.accumulate ? __ldcg(y + n) + plain : plain;
#pragma unroll
    for (int z = 1; z < MAX_SPLIT; z++)
        if (z < pr.split) {
            v += pz[z];
            plain += pz[z];
        }
    y[n] = pr.accumulate ? v : v * scale;
    if (layer == 0 && P.gen == 1)
        P.dump_y[p][n] = plain;
    if (P.deps_tile && pr.accumulate) {   /* the residual's sums of squares over each half tile, for the norms */
        float ss = v * v;
        for (int o = 16; o; o >>= 1)
            ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if ((threadIdx.x & 31) == 0)
            P.tile_ss[((size_t)(layer * NPROD + p) * MAX_TILES + tile) * 2 + (threadIdx.x >> 5)] = ss;
    }
}

/* --deps tile: thread waits until tile t of (layer, product) is final. */
__device__ static inline void wait_tile(const Params &P, int layer, int p, int t)
{
    spin_until(&P.tile_ready[(layer * NPROD + p) * MAX_TILES + t], P.gen, P.poll_sleep_ns);
}

/* ---- the streaming kernel ---- */
__global__ void __launch_bounds__(CONSUMERS + 32)
stream_layers(const __grid_constant__ CUtensorMap map_qkv, const __grid_constant__ CUtensorMap map_o,
              const __grid_constant__ CUtensorMap map_gu, const __grid_constant__ CUtensorMap map_down, Params P)
{
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char *ring = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);   /* [ring][64][64] bf16,
                                                                                                    swizzled */
    const int S = P.ring;
    uint64_t *full = (uint64_t *)(ring + (size_t)S * STAGE_BYTES);   /* [ring]: the stage has arrived */
    uint64_t *empty = full + S;                                     /* [ring]: the four warps are done with it */
    __nv_bfloat16 *xs = (__nv_bfloat16 *)(empty + S);               /* [XS_MAX]: the item's x range */
    __shared__ float red[CONSUMERS / 32];
    __shared__ int last_flag;
    __shared__ float scale_cache;

    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (tid == 0) {
        for (int i = 0; i < S; i++) {
            mbar_init(&full[i], 1);
            mbar_init(&empty[i], CONSUMERS / 32);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    int i0 = P.item_start[blockIdx.x], i1 = P.item_start[blockIdx.x + 1];

    if (warp == CONSUMERS / 32) {   /* the producer: every stage of every item, in order */
        if (lane != 0 || (P.leave_out & LEAVE_LOADS))
            return;
        unsigned long long policy = 0;
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
        const CUtensorMap *maps[NPROD] = {&map_qkv, &map_o, &map_gu, &map_down};
        int slot = 0, phase = 0;
        for (int it = i0; it < i1; it++) {
            int2 item = P.items[it];
            int layer = item.x >> 4, p = item.x & 15, tile = item.y >> 8, range = item.y & 255;
            const Prod pr = P.prod[p];
            if (range == SUM_DUTY)
                continue;
            int kb = range * pr.L, row = layer * pr.N + tile * BOX_N;
            for (int j = 0; j < pr.stages; j++) {
                mbar_wait(&empty[slot], phase ^ 1);
                mbar_expect_tx(&full[slot], STAGE_BYTES);
                tma_load(ring + (size_t)slot * STAGE_BYTES, maps[p], kb + j * BOX_K, row, &full[slot], policy,
                         P.hint != 0);
                if (++slot == S) {
                    slot = 0;
                    phase ^= 1;
                }
            }
        }
        return;
    }

    /* the consumers */
    const bool loads = !(P.leave_out & LEAVE_LOADS);
    int slot = 0, phase = 0;
    int dep_layer = -1, dep_p = -1;             /* the dependency last met */
    int scale_layer = -1, scale_p = -1;         /* the RMSNorm scale in scale_cache */
    int x_layer = -1, x_p = -1, x_range = -1;   /* the x range in xs */
    int n_traced = 0;
    /* the consumers' partial sums of squares of the residual -> RMSNorm's scale in scale_cache, summed in a
     * fixed order */
    auto scale_from_partials = [&](float s) {
        for (int o = 16; o; o >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0)
            red[warp] = s;
        consumers_sync();
        if (tid == 0)
            scale_cache = (float)(1.0 / sqrt((double)(red[0] + red[1] + red[2] + red[3]) / HID + 1e-6));
        consumers_sync();
    };
    /* --deps tile: RMSNorm's scale of the residual that qkv or gate_up of this layer reads, applied after the
     * product: from the sums of squares of the product before's tiles, in tile order, once it is complete */
    auto row_scale = [&](int layer, int p) -> float {
        if (layer != scale_layer || p != scale_p) {
            if (layer == 0 && p == P_QKV) {
                if (tid == 0)
                    scale_cache = P.scale0;
                consumers_sync();
            } else {   /* the half tiles' sums, one a thread */
                int dl = p == P_QKV ? layer - 1 : layer, dp = p == P_QKV ? P_DOWN : P_O;
                if (tid == 0)
                    spin_until(&P.done[dl * NPROD + dp], P.gen * P.prod[dp].tiles, P.poll_sleep_ns);
                consumers_sync();
                const float *ss = P.tile_ss + (size_t)(dl * NPROD + dp) * MAX_TILES * 2;
                scale_from_partials(tid < 2 * P.prod[dp].tiles ? __ldcg(ss + tid) : 0.0f);
            }
            scale_layer = layer;
            scale_p = p;
        }
        return scale_cache;
    };
    for (int it = i0; it < i1; it++) {
        int2 item = P.items[it];
        int layer = item.x >> 4, p = item.x & 15, tile = item.y >> 8, range = item.y & 255;
        const Prod pr = P.prod[p];
        unsigned long long *tr = layer == TRACE_LAYER && n_traced < TRACE_ITEMS && P.trace && tid == 0
                                     ? P.trace + ((size_t)blockIdx.x * TRACE_ITEMS + n_traced++) * 6
                                     : NULL;
        if (tr) {
            tr[0] = gtime();
            tr[5] = range == SUM_DUTY ? NPROD + p : p;
        }
        if (range == SUM_DUTY) {   /* this block sums the tile once its ranges are all done */
            float *y = p == P_QKV ? P.qkv_out : P.resid;
            if (tid == 0)
                spin_until(&P.tile_done[(layer * NPROD + p) * MAX_TILES + tile], P.gen * pr.split, P.poll_sleep_ns);
            consumers_sync();
            if (tr)
                tr[1] = tr[2] = gtime();
            if (!(P.leave_out & LEAVE_SUMS))
                sum_tile(P, pr, p, layer, tile, y, 1.0f);
            if (tr)
                tr[3] = gtime();
            consumers_publish(&P.done[layer * NPROD + p], P.sync);
            if (tr)
                tr[4] = gtime();
            continue;
        }
        if (!P.deps_tile && (layer != dep_layer || p != dep_p)) {   /* qkv waits for the layer before's down, the others for
                                                     the product before */
            int dl = p == P_QKV ? layer - 1 : layer, dp = p == P_QKV ? P_DOWN : p - 1;
            if (dl >= 0 && tid == 0 && !(P.leave_out & LEAVE_WAITS))
                spin_until(&P.done[dl * NPROD + dp], P.gen * P.prod[dp].tiles, P.poll_sleep_ns);
            consumers_sync();
            dep_layer = layer;
            dep_p = p;
        }
        if (tr)
            tr[1] = gtime();
        int kb = range * pr.L, ke = kb + pr.L, k_lim = ke < pr.K ? ke : pr.K;
        int cols = pr.stages * BOX_K;

        /* x over [kb, kb + cols), zeros at k_lim and past; every load of a thread before its first use */
        if (!(P.leave_out & LEAVE_X) && (layer != x_layer || p != x_p || range != x_range)) {
            x_layer = layer;
            x_p = p;
            x_range = range;
            uint2 *xs4 = (uint2 *)xs;
            int dl = p == P_QKV ? layer - 1 : layer;
            if (P.deps_tile && dl >= 0) {   /* warp 0's lanes wait for the tiles the x range reads; no scale */
                int t0 = kb / BOX_N, nt = (k_lim - 1) / BOX_N - t0 + 1, h0 = kb / 128, nh = (k_lim - 1) / 128 - h0 + 1;
                int n = p == P_DOWN ? 2 * nt : p == P_O ? 6 * nh : nt;
                for (int i = tid; tid < 32 && i < n; i += 32) {
                    if (p == P_QKV)
                        wait_tile(P, dl, P_DOWN, t0 + i);
                    else if (p == P_GU)
                        wait_tile(P, dl, P_O, t0 + i);
                    else if (p == P_DOWN)   /* gate's tiles, then up's */
                        wait_tile(P, dl, P_GU, i < nt ? t0 + i : FF / BOX_N + t0 + i - nt);
                    else {   /* o: head h's q, and its KV head's k and v, all of them */
                        int h = h0 + i / 6, r = i % 6, g = h / 4;
                        wait_tile(P, dl, P_QKV, r < 2 ? 2 * h + r : r < 4 ? (QO + 128 * g) / BOX_N + r - 2
                                                                          : (QO + 1024 + 128 * g) / BOX_N + r - 4);
                    }
                }
                consumers_sync();
            }
            if (p == P_QKV || p == P_GU) {   /* --deps tile: the scale comes after the product */
                if (!P.deps_tile && (layer != scale_layer || p != scale_p)) {   /* the row's scale, once a block and
                                                                                   product */
                    constexpr int PER = (HID / 4 + CONSUMERS - 1) / CONSUMERS;
                    float4 v[PER];
#pragma unroll
                    for (int i = 0; i < PER; i++) {
                        int k4 = tid + i * CONSUMERS;
                        v[i] = k4 < HID / 4 ? __ldcg((const float4 *)P.resid + k4) : make_float4(0.f, 0.f, 0.f, 0.f);
                    }
                    float s = 0.0f;
#pragma unroll
                    for (int i = 0; i < PER; i++)
                        s += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
                    scale_from_partials(s);
                    scale_layer = layer;
                    scale_p = p;
                }
                float scale = P.deps_tile ? 1.0f : scale_cache;
                constexpr int PER = (XS_MAX / 4 + CONSUMERS - 1) / CONSUMERS;
                float4 v[PER], w[PER];
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    int j = (tid + i * CONSUMERS) * 4, k = kb + j;
                    bool in = j < cols && k < k_lim;
                    v[i] = in ? __ldcg((const float4 *)(P.resid + k)) : make_float4(0.f, 0.f, 0.f, 0.f);
                    w[i] = in ? *(const float4 *)(P.norm_w + k) : make_float4(0.f, 0.f, 0.f, 0.f);
                }
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    int j = (tid + i * CONSUMERS) * 4;
                    if (j < cols)
                        xs4[j / 4] = bf16x4(v[i].x * scale * w[i].x, v[i].y * scale * w[i].y,
                                            v[i].z * scale * w[i].z, v[i].w * scale * w[i].w);
                }
            } else if (p == P_O) {
                for (int j = tid * 4; j < cols; j += CONSUMERS * 4) {
                    int k = kb + j;
                    xs4[j / 4] = k < k_lim ? *(const uint2 *)(P.attn_x + k) : make_uint2(0u, 0u);
                }
            } else {
                constexpr int PER = (1152 / 4 + CONSUMERS - 1) / CONSUMERS;   /* down's 1,152 (18 stages) */
                float4 g[PER], u[PER];
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    int j = (tid + i * CONSUMERS) * 4, k = kb + j;
                    bool in = j < cols && k < k_lim;
                    g[i] = in ? __ldcg((const float4 *)(P.gu_out + k)) : make_float4(0.f, 0.f, 0.f, 0.f);
                    u[i] = in ? __ldcg((const float4 *)(P.gu_out + FF + k)) : make_float4(0.f, 0.f, 0.f, 0.f);
                }
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    int j = (tid + i * CONSUMERS) * 4;
                    if (j < cols)
                        xs4[j / 4] = bf16x4(g[i].x / (1.0f + __expf(-g[i].x)) * u[i].x,
                                            g[i].y / (1.0f + __expf(-g[i].y)) * u[i].y,
                                            g[i].z / (1.0f + __expf(-g[i].z)) * u[i].z,
                                            g[i].w / (1.0f + __expf(-g[i].w)) * u[i].w);
                }
            }
            consumers_sync();
        }
        if (tr)
            tr[2] = gtime();
        if (layer == 0 && P.gen == 1)
            for (int j = tid; j < cols; j += CONSUMERS)
                if (kb + j < k_lim)
                    ((__nv_bfloat16 *)P.dump_x[p])[kb + j] = xs[j];

        /* The products: warp w takes the tile's columns 16 w .. 16 w + 15 as two 8-column m16n8k16 tiles; x is
         * row 0 of A (lanes 0..3 hold its k pairs), rows 1..15 zero. */
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        const uint32_t *xs32 = (const uint32_t *)xs;
        int wn0 = warp * 16;
        /* ldmatrix.x4's matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) */
        int nrow = wn0 + (lane & 7) + ((lane >> 4) << 3);
        int chunk0 = (lane >> 3) & 1;
        struct frags {
            uint32_t b[4][4];         /* [k16 step][ldmatrix register] */
            uint32_t a0[4], a2[4];    /* [k16 step]: x at k 2 lane.., 2 lane + 8.. */
        };
        auto load = [&](frags &f, int sl, int j) {
            uint32_t base = smem_u32(ring + (size_t)sl * STAGE_BYTES) + nrow * 128;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                int chunk = 2 * q + chunk0;   /* 16-byte chunk of the 128-byte row, before the swizzle */
                uint32_t addr = base + ((chunk ^ (nrow & 7)) << 4);
                asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                             : "=r"(f.b[q][0]), "=r"(f.b[q][1]), "=r"(f.b[q][2]), "=r"(f.b[q][3])
                             : "r"(addr));
            }
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                int kr = j * BOX_K + kk * 16;
                f.a0[kk] = lane < 4 ? xs32[kr / 2 + lane] : 0u;
                f.a2[kk] = lane < 4 ? xs32[kr / 2 + 4 + lane] : 0u;
            }
        };
        auto products = [&](const frags &f, int j) {
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                bool live = kb + j * BOX_K + kk * 16 < k_lim;   /* else a zero chunk, as gemm.cu's */
#pragma unroll
                for (int t = 0; t < 2; t++) {
                    uint32_t b0 = f.b[kk][t * 2], b1 = f.b[kk][t * 2 + 1], x0 = f.a0[kk], x2 = f.a2[kk];
                    if (!live)
                        b0 = b1 = x0 = x2 = 0u;
                    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                                 : "+f"(acc[t][0]), "+f"(acc[t][1]), "+f"(acc[t][2]), "+f"(acc[t][3])
                                 : "r"(x0), "r"(0u), "r"(x2), "r"(0u), "r"(b0), "r"(b1));
                }
            }
        };
        /* stage j + 1's wait and loads go before stage j's products */
        frags cur, nxt;
        if (loads)
            mbar_wait(&full[slot], phase);
        load(cur, slot, 0);
        for (int j = 0; j < pr.stages; j++) {
            int used = slot;
            if (++slot == S) {
                slot = 0;
                phase ^= 1;
            }
            if (j + 1 < pr.stages) {
                if (loads)
                    mbar_wait(&full[slot], phase);
                load(nxt, slot, j + 1);
            }
            products(cur, j);
            __syncwarp();
            if (lane == 0 && loads)
                mbar_arrive(&empty[used]);   /* the products have read the stage's registers */
            cur = nxt;
        }
        if (tr)
            tr[3] = gtime();

        /* row 0's columns: lanes 0..3 hold 2 lane and 2 lane + 1 of each 8-column tile */
        float *y = p == P_QKV ? P.qkv_out : p == P_GU ? P.gu_out : P.resid;
        int n0 = tile * BOX_N + wn0;
        if (pr.split == 1) {   /* gate_up: the item is the tile */
            float sc = P.deps_tile ? row_scale(layer, p) : 1.0f;
            if (lane < 4)
                for (int t = 0; t < 2; t++) {
                    int n = n0 + t * 8 + 2 * lane;
                    *(float2 *)(y + n) = make_float2(acc[t][0] * sc, acc[t][1] * sc);
                    if (layer == 0 && P.gen == 1)
                        *(float2 *)(P.dump_y[p] + n) = make_float2(acc[t][0], acc[t][1]);
                }
            consumers_publish(&P.done[layer * NPROD + p], P.sync);
            if (P.deps_tile && tid == 0)
                counter_add(&P.tile_ready[(layer * NPROD + p) * MAX_TILES + tile], P.sync, false);
            if (tr)
                tr[4] = gtime();
            continue;
        }
        float *part = P.part[p];
        if (lane < 4)
            for (int t = 0; t < 2; t++) {
                int n = n0 + t * 8 + 2 * lane;
                *(float2 *)(part + (size_t)range * pr.N + n) = make_float2(acc[t][0], acc[t][1]);
            }
        if (P.sync == SYNC_EACH)
            __threadfence();
        consumers_sync();
        if (P.summers) {   /* the tile's summing block counts this range; nothing to wait for here */
            if (tid == 0)
                counter_add(&P.tile_done[(layer * NPROD + p) * MAX_TILES + tile], P.sync, false);
            if (tr)
                tr[4] = gtime();
            continue;
        }
        if (tid == 0) {
            int *cnt = &P.tile_cnt[p * MAX_TILES + tile];
            int last = counter_add(cnt, P.sync, true) == pr.split - 1;
            if (last)
                *cnt = 0;   /* for the next layer's product */
            last_flag = last;
        }
        consumers_sync();
        float sc = last_flag && P.deps_tile && (p == P_QKV || p == P_GU) ? row_scale(layer, p) : 1.0f;
        if (last_flag && !(P.leave_out & LEAVE_SUMS)) {
            if (P.sync != SYNC_ACQREL)
                __threadfence();
            sum_tile(P, pr, p, layer, tile, y, sc);
            if (P.sync == SYNC_EACH)
                __threadfence();
            consumers_sync();
        }
        if (last_flag && tid == 0) {
            counter_add(&P.done[layer * NPROD + p], P.sync, false);
            if (P.deps_tile)
                counter_add(&P.tile_ready[(layer * NPROD + p) * MAX_TILES + tile], P.sync, false);
        }
        if (tr)
            tr[4] = gtime();
    }
}

/* ---- host ---- */
__global__ static void fill_bf16(uint16_t *w, size_t n, uint32_t seed, float scale)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        __nv_bfloat16 b = __float2bfloat16_rn(((h & 0xffffff) / 16777216.0f * 2.0f - 1.0f) * scale);
        w[i] = *(uint16_t *)&b;
    }
}
__global__ static void fill_f32(float *w, size_t n, uint32_t seed, float scale, float offset)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        w[i] = offset + ((h & 0xffffff) / 16777216.0f * 2.0f - 1.0f) * scale;
    }
}

/* The driver's tensor-map encoder, through the runtime (no link to libcuda). */
typedef CUresult (*encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                              const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/* W [rows, K] bf16 in boxes of BOX_N rows x BOX_K k, 128-byte swizzle. */
static CUtensorMap make_map(encode_fn encode, const uint16_t *w, int rows, int K)
{
    CUtensorMap m;
    cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)K * 2};
    cuuint32_t box[2] = {BOX_K, BOX_N};
    cuuint32_t elem[2] = {1, 1};
    CUresult r = encode(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)w, dims, strides, box, elem,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        fprintf(stderr, "bench-stream-cuda: cuTensorMapEncodeTiled: error %d\n", (int)r);
        exit(1);
    }
    return m;
}

static double median(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

static int leave_out_bits(const char *list)
{
    int bits = 0;
    char buf[128];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (!strcmp(t, "waits"))
            bits |= LEAVE_WAITS;
        else if (!strcmp(t, "x"))
            bits |= LEAVE_X;
        else if (!strcmp(t, "sums"))
            bits |= LEAVE_SUMS;
        else if (!strcmp(t, "loads"))
            bits |= LEAVE_LOADS;
        else
            return -1;
    }
    return bits;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: bench-stream-cuda [--layers N] [--reps N] [--per-sm N] [--ring N] [--sync each|one|acqrel]\n"
               "                         [--balance phase|layer] [--no-hint] [--poll-sleep NS] [--sums block|last]\n"
               "                         [--leave-out waits,x,sums,loads] [--deps product|tile] [--gu-split N]\n"
               "(--deps tile takes --sums last, and leaves out neither waits nor sums)\n");
}

int main(int argc, char **argv)
{
    int layers = MAX_LAYERS, reps = 10, per_sm = 3, ring = 8, sync = SYNC_ACQREL, balance_phase = 1, hint = 1;
    int poll_sleep = 0, leave_out = 0, summers = 0, deps_tile = 0, gu_split = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--no-hint")) {
            hint = 0;
            continue;
        }
        if (!v) {
            usage(stderr);
            return 2;
        }
        i++;
        if (!strcmp(a, "--layers"))
            layers = atoi(v);
        else if (!strcmp(a, "--reps"))
            reps = atoi(v);
        else if (!strcmp(a, "--per-sm"))
            per_sm = atoi(v);
        else if (!strcmp(a, "--ring"))
            ring = atoi(v);
        else if (!strcmp(a, "--poll-sleep"))
            poll_sleep = atoi(v);
        else if (!strcmp(a, "--sync"))
            sync = !strcmp(v, "each") ? SYNC_EACH : !strcmp(v, "one") ? SYNC_ONE : !strcmp(v, "acqrel") ? SYNC_ACQREL : -1;
        else if (!strcmp(a, "--sums"))
            summers = !strcmp(v, "block") ? 1 : !strcmp(v, "last") ? 0 : -1;
        else if (!strcmp(a, "--gu-split"))
            gu_split = atoi(v);
        else if (!strcmp(a, "--deps"))
            deps_tile = !strcmp(v, "tile") ? 1 : !strcmp(v, "product") ? 0 : -1;
        else if (!strcmp(a, "--balance"))
            balance_phase = !strcmp(v, "phase") ? 1 : !strcmp(v, "layer") ? 0 : -1;
        else if (!strcmp(a, "--leave-out"))
            leave_out = leave_out_bits(v);
        else {
            usage(stderr);
            return 2;
        }
    }
    if (layers < 1 || layers > MAX_LAYERS || reps < 1 || per_sm < 1 || ring < 2 || sync < 0 || balance_phase < 0 ||
        leave_out < 0 || poll_sleep < 0 || summers < 0 || deps_tile < 0 || (deps_tile && summers) ||
        (deps_tile && (leave_out & (LEAVE_WAITS | LEAVE_SUMS))) || gu_split < 0 ||
        gu_split > MAX_SPLIT) {
        usage(stderr);
        return 2;
    }
    int n_dev = 0, dev = 0, n_sm = 0, major = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        fprintf(stderr, "bench-stream-cuda: no CUDA device\n");
        return 77;
    }
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev));
    CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major < 9) {
        fprintf(stderr, "bench-stream-cuda: needs compute capability 9.0 (TMA)\n");
        return 77;
    }
    encode_fn encode = NULL;
    cudaDriverEntryPointQueryResult found;
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void **)&encode, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || !encode) {
        fprintf(stderr, "bench-stream-cuda: the driver has no cuTensorMapEncodeTiled\n");
        return 77;
    }
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));

    /* the weights: each product's layers stacked, [layers N, K] */
    Prod pr[NPROD];
    const int NN[NPROD] = {QKV_N, HID, 2 * FF, HID}, KK[NPROD] = {HID, QO, HID, FF}, ACC[NPROD] = {0, 1, 0, 1};
    size_t weight_bytes = 0;
    uint16_t *W[NPROD];
    CUtensorMap maps[NPROD];
    for (int p = 0; p < NPROD; p++) {
        pr[p].N = NN[p];
        pr[p].K = KK[p];
        pr[p].split = p == P_GU && gu_split ? gu_split : ds_k_gemm_split(NN[p], KK[p], n_sm);
        int chunks = (KK[p] + 31) / 32;
        pr[p].L = (chunks + pr[p].split - 1) / pr[p].split * 32;
        pr[p].stages = 2 * ((pr[p].L + 127) / 128);
        pr[p].tiles = NN[p] / BOX_N;
        pr[p].accumulate = ACC[p];
        if (pr[p].split > MAX_SPLIT || pr[p].tiles > MAX_TILES || pr[p].stages * BOX_K > XS_MAX) {
            fprintf(stderr, "bench-stream-cuda: %s's split %d does not fit this bench\n", prod_name[p], pr[p].split);
            return 1;
        }
        size_t n = (size_t)layers * NN[p] * KK[p];
        CK(cudaMalloc(&W[p], n * 2));
        fill_bf16<<<1024, 256, 0, st>>>(W[p], n, 0x1234u + p, 0.03f);
        weight_bytes += n * 2;
        maps[p] = make_map(encode, W[p], layers * NN[p], KK[p]);
    }
    double bw;
    {   /* the copy rate, read + write, as bench-step-cuda measures it */
        size_t bytes = (size_t)2 << 30;
        void *a, *b;
        CK(cudaMalloc(&a, bytes));
        CK(cudaMalloc(&b, bytes));
        cudaEvent_t e0, e1;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        std::vector<double> t;
        for (int r = 0; r < 20; r++) {
            CK(cudaEventRecord(e0, st));
            CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, st));
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            t.push_back(ms);
        }
        bw = 2.0 * bytes / (median(t) * 1e-3);
        CK(cudaFree(a));
        CK(cudaFree(b));
    }
    double floor_ms = weight_bytes / bw * 1e3;
    printf("# %d SMs; device-to-device copy %.0f GB/s; %d layers of the 4B's products, %.3f GB: floor %.3f ms "
           "(%.1f us a layer)\n",
           n_sm, bw / 1e9, layers, weight_bytes / 1e9, floor_ms, floor_ms * 1e3 / layers);
    for (int p = 0; p < NPROD; p++)
        printf("# %s: N %d, K %d, %d k ranges of %d, %d tiles\n", prod_name[p], NN[p], KK[p], pr[p].split, pr[p].L,
               pr[p].tiles);

    float *resid, *resid0, *qkv_out, *gu_out, *norm_w, *ws;
    uint16_t *attn_x, *xbuf;
    CK(cudaMalloc(&resid, HID * 4));
    CK(cudaMalloc(&resid0, HID * 4));
    CK(cudaMalloc(&qkv_out, QKV_N * 4));
    CK(cudaMalloc(&gu_out, 2 * FF * 4));
    CK(cudaMalloc(&norm_w, HID * 4));
    CK(cudaMalloc(&attn_x, QO * 2));
    CK(cudaMalloc(&xbuf, FF * 2));
    fill_f32<<<16, 256, 0, st>>>(resid0, HID, 77, 1.0f, 0.0f);
    fill_f32<<<16, 256, 0, st>>>(norm_w, HID, 78, 0.0f, 1.0f);
    fill_bf16<<<16, 256, 0, st>>>(attn_x, QO, 79, 1.0f);
    size_t ws_floats = 0;
    for (int p = 0; p < NPROD; p++)
        ws_floats = std::max(ws_floats, ds_k_gemm_workspace(1, NN[p], pr[p].split));
    CK(cudaMalloc(&ws, ws_floats * 4));
    CK(cudaMemset(ws, 0, ws_floats * 4));

    /* the library's kernels, one graph (their launches are programmatic: PDL) */
    cudaGraphExec_t kernels;
    {
        CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        for (int l = 0; l < layers; l++) {
            struct ds_k_x xq = {DS_K_X_RMSNORM, xbuf, HID, resid, norm_w, 1e-6f};
            CK(ds_k_gemm_bf16_x(NULL, &xq, W[P_QKV] + (size_t)l * QKV_N * HID, 1, QKV_N, HID, pr[P_QKV].split, ws,
                                qkv_out, QKV_N, 0, st));
            CK(ds_k_gemm_bf16(NULL, attn_x, QO, W[P_O] + (size_t)l * HID * QO, 1, HID, QO, pr[P_O].split, ws, resid,
                              HID, 1, st));
            struct ds_k_x xg = {DS_K_X_RMSNORM, xbuf, HID, resid, norm_w, 1e-6f};
            CK(ds_k_gemm_bf16_x(NULL, &xg, W[P_GU] + (size_t)l * 2 * FF * HID, 1, 2 * FF, HID, pr[P_GU].split, ws,
                                gu_out, 2 * FF, 0, st));
            struct ds_k_x xd = {DS_K_X_SWIGLU, xbuf, FF, gu_out, NULL, 0.0f};
            CK(ds_k_gemm_bf16_x(NULL, &xd, W[P_DOWN] + (size_t)l * HID * FF, 1, HID, FF, pr[P_DOWN].split, ws,
                                resid, HID, 1, st));
        }
        cudaGraph_t graph;
        CK(cudaStreamEndCapture(st, &graph));
        CK(cudaGraphInstantiate(&kernels, graph, 0));
    }

    /* the streaming kernel's items, dealt in order to the least loaded block (in weight stages) of the
     * phase, then of the layers so far; --balance layer: of the layers so far alone */
    int blocks = n_sm * per_sm;
    std::vector<std::vector<int2>> per(blocks);
    std::vector<double> load(blocks, 0.0), phase_load(blocks, 0.0);
    std::vector<int> summer(MAX_TILES, 0);   /* the block that sums each tile: the one with its last range */
    for (int l = 0; l < layers; l++)
        for (int p = 0; p < NPROD; p++) {
            std::fill(phase_load.begin(), phase_load.end(), 0.0);
            for (int t = 0; t < pr[p].tiles; t++)
                for (int s = 0; s < pr[p].split; s++) {
                    int best = 0;
                    for (int c = 1; c < blocks; c++) {
                        bool better = balance_phase ? phase_load[c] < phase_load[best] ||
                                                          (phase_load[c] == phase_load[best] && load[c] < load[best])
                                                    : load[c] < load[best];
                        if (better)
                            best = c;
                    }
                    load[best] += pr[p].stages;
                    phase_load[best] += pr[p].stages;
                    per[best].push_back(make_int2(l << 4 | p, t << 8 | s));
                    if (summers && pr[p].split > 1 && s == pr[p].split - 1)
                        summer[t] = best;
                }
            /* each tile's sum, after its summing block's items of this phase */
            if (summers && pr[p].split > 1)
                for (int t = 0; t < pr[p].tiles; t++)
                    per[summer[t]].push_back(make_int2(l << 4 | p, t << 8 | SUM_DUTY));
        }
    std::vector<int2> items;
    std::vector<int> start(blocks + 1);
    for (int c = 0; c < blocks; c++) {
        start[c] = (int)items.size();
        items.insert(items.end(), per[c].begin(), per[c].end());
    }
    start[blocks] = (int)items.size();
    Params P;
    memset(&P, 0, sizeof P);
    int2 *d_items;
    int *d_start;
    CK(cudaMalloc(&d_items, items.size() * sizeof(int2)));
    CK(cudaMalloc(&d_start, start.size() * sizeof(int)));
    CK(cudaMemcpy(d_items, items.data(), items.size() * sizeof(int2), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_start, start.data(), start.size() * sizeof(int), cudaMemcpyHostToDevice));
    P.items = d_items;
    P.item_start = d_start;
    P.resid = resid;
    P.qkv_out = qkv_out;
    P.gu_out = gu_out;
    P.attn_x = attn_x;
    P.norm_w = norm_w;
    for (int p = 0; p < NPROD; p++) {
        CK(cudaMalloc(&P.part[p], (size_t)pr[p].split * NN[p] * 4));
        CK(cudaMalloc(&P.dump_x[p], KK[p] * 2));
        CK(cudaMalloc(&P.dump_y[p], NN[p] * 4));
        P.prod[p] = pr[p];
    }
    CK(cudaMalloc(&P.tile_cnt, NPROD * MAX_TILES * 4));
    CK(cudaMemset(P.tile_cnt, 0, NPROD * MAX_TILES * 4));
    CK(cudaMalloc(&P.tile_done, (size_t)layers * NPROD * MAX_TILES * 4));
    CK(cudaMemset(P.tile_done, 0, (size_t)layers * NPROD * MAX_TILES * 4));
    P.summers = summers;
    P.deps_tile = deps_tile;
    CK(cudaMalloc(&P.tile_ready, (size_t)layers * NPROD * MAX_TILES * 4));
    CK(cudaMemset(P.tile_ready, 0, (size_t)layers * NPROD * MAX_TILES * 4));
    CK(cudaMalloc(&P.tile_ss, (size_t)layers * NPROD * MAX_TILES * 2 * 4));
    CK(cudaMemset(P.tile_ss, 0, (size_t)layers * NPROD * MAX_TILES * 2 * 4));
    {
        std::vector<float> r0(HID);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(r0.data(), resid0, HID * 4, cudaMemcpyDeviceToHost));
        double ss = 0;
        for (int i = 0; i < HID; i++)
            ss += (double)r0[i] * r0[i];
        P.scale0 = (float)(1.0 / sqrt(ss / HID + 1e-6));
    }
    CK(cudaMalloc(&P.done, layers * NPROD * 4));
    CK(cudaMemset(P.done, 0, layers * NPROD * 4));
    size_t trace_n = (size_t)blocks * TRACE_ITEMS * 6;
    CK(cudaMalloc(&P.trace, trace_n * 8));
    CK(cudaMemset(P.trace, 0, trace_n * 8));
    P.ring = ring;
    P.hint = hint;
    P.sync = sync;
    P.poll_sleep_ns = poll_sleep;
    size_t smem = 1024 + (size_t)ring * STAGE_BYTES + 2 * ring * 8 + XS_MAX * 2;
    CK(cudaFuncSetAttribute(stream_layers, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    printf("# streaming kernel: %d blocks (%d an SM) of %d threads, rings of %d stages (%zu bytes of shared memory "
           "a block), L2 evict-first hint %s, sync %s, sums by %s, %s balance, poll sleep %d ns, %s, left out: "
           "%s%s%s%s%s\n",
           blocks, per_sm, CONSUMERS + 32, ring, smem, hint ? "on" : "off",
           sync == SYNC_EACH ? "each" : sync == SYNC_ONE ? "one" : "acqrel", summers ? "block" : "last item",
           balance_phase ? "phase" : "layer",
           poll_sleep,
           deps_tile ? "waits for the tiles an item's x reads, RMSNorm's scale after the product (--deps tile)"
                     : "waits for the product before (--deps product)",
           leave_out ? "" : "nothing", leave_out & LEAVE_WAITS ? "waits " : "",
           leave_out & LEAVE_X ? "x " : "", leave_out & LEAVE_SUMS ? "sums " : "", leave_out & LEAVE_LOADS ? "loads" : "");

    int gen = 0;
    auto run_streaming = [&](int leave) {
        P.gen = ++gen;
        P.leave_out = leave;
        void *args[] = {&maps[0], &maps[1], &maps[2], &maps[3], &P};
        CK(cudaLaunchCooperativeKernel((void *)stream_layers, dim3(blocks), dim3(CONSUMERS + 32), args, smem, st));
    };

    /* the check: layer 0's sums against ds_k_gemm_bf16 on the same x, bit for bit (nothing left out) */
    CK(cudaMemcpyAsync(resid, resid0, HID * 4, cudaMemcpyDeviceToDevice, st));
    run_streaming(0);
    CK(cudaStreamSynchronize(st));
    int differ = 0;
    for (int p = 0; p < NPROD; p++) {
        float *yref;
        CK(cudaMalloc(&yref, NN[p] * 4));
        CK(ds_k_gemm_bf16(NULL, P.dump_x[p], KK[p], W[p], 1, NN[p], KK[p], pr[p].split, ws, yref, NN[p], 0, st));
        CK(cudaStreamSynchronize(st));
        std::vector<uint32_t> a(NN[p]), b(NN[p]);
        CK(cudaMemcpy(a.data(), yref, NN[p] * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(b.data(), P.dump_y[p], NN[p] * 4, cudaMemcpyDeviceToHost));
        int bad = 0;
        for (int n = 0; n < NN[p]; n++)
            bad += a[n] != b[n];
        printf("# check %s: %d of %d sums differ from ds_k_gemm_bf16's bits\n", prod_name[p], bad, NN[p]);
        differ += bad;
        CK(cudaFree(yref));
    }
    {   /* both ways from the same residual: the same up to their x arithmetic */
        std::vector<float> rs(HID), rk(HID);
        CK(cudaMemcpy(rs.data(), resid, HID * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpyAsync(resid, resid0, HID * 4, cudaMemcpyDeviceToDevice, st));
        CK(cudaGraphLaunch(kernels, st));
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(rk.data(), resid, HID * 4, cudaMemcpyDeviceToHost));
        double num = 0, den = 0;
        for (int i = 0; i < HID; i++) {
            num += (rk[i] - rs[i]) * (double)(rk[i] - rs[i]);
            den += (double)rk[i] * rk[i];
        }
        printf("# the last layer's residual, kernels against streaming: relative L2 difference %.3g\n",
               sqrt(num / den));
    }

    printf("\n| run | kernels ms | us a layer | / floor | streaming ms | us a layer | / floor |\n"
           "|---|---|---|---|---|---|---|\n");
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int pass = 1; pass <= 3; pass++) {
        std::vector<double> tk, ts;
        for (int r = 0; r < reps; r++) {
            CK(cudaEventRecord(e0, st));
            CK(cudaGraphLaunch(kernels, st));
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            tk.push_back(ms);
        }
        for (int r = 0; r < reps; r++) {
            CK(cudaEventRecord(e0, st));
            run_streaming(leave_out);
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            ts.push_back(ms);
        }
        double k = median(tk), s = median(ts);
        printf("| %d | %.3f | %.1f | %.2f | %.3f | %.1f | %.2f |\n", pass, k, k * 1e3 / layers, k / floor_ms, s,
               s * 1e3 / layers, s / floor_ms);
    }

    if (layers > TRACE_LAYER) {   /* layer TRACE_LAYER's phases in the last run, us from its first item's start */
        std::vector<unsigned long long> t(trace_n);
        CK(cudaMemcpy(t.data(), P.trace, trace_n * 8, cudaMemcpyDeviceToHost));
        unsigned long long t_min = ~0ull;
        for (size_t i = 0; i < trace_n; i += 6)
            if (t[i] && t[i] < t_min)
                t_min = t[i];
        printf("\nLayer %d's phases in the last streaming run, us from its first item's start: over the product's "
               "items, the first dependency met, the last x made, the last products done, the last end (sums and "
               "counters); a block's mean time in products\n\n"
               "| product | first dependency met | last x made | last products done | last end | products a block |\n"
               "|---|---|---|---|---|---|\n",
               TRACE_LAYER);
        for (int p = 0; p < 2 * NPROD; p++) {
            double first_met = 1e30, last_x = 0, last_prod = 0, last_end = 0, busy = 0;
            for (size_t i = 0; i < trace_n; i += 6) {
                if (!t[i] || (int)t[i + 5] != p)
                    continue;
                double a[5];
                for (int k = 0; k < 5; k++)
                    a[k] = (t[i + k] - (double)t_min) / 1e3;
                first_met = std::min(first_met, a[1]);
                last_x = std::max(last_x, a[2]);
                last_prod = std::max(last_prod, a[3]);
                last_end = std::max(last_end, a[4]);
                busy += a[3] - a[2];
            }
            if (first_met > 1e29)
                continue;   /* no such items (sums by the last item, or unsplit) */
            printf("| %s%s | %.2f | %.2f | %.2f | %.2f | %.2f |\n", prod_name[p % NPROD], p >= NPROD ? " sums" : "",
                   first_met, last_x, last_prod, last_end, busy / blocks);
        }
    }
    CK(cudaGetLastError());
    if (differ) {
        fprintf(stderr, "bench-stream-cuda: the streaming kernel's sums differ from ds_k_gemm_bf16's\n");
        return 1;
    }
    return 0;
}
