/* gemm.cu: the batch-invariant bf16 matrix product of the CUDA backend.
 *
 * y[m, n] (+)= x[m, k] · W[n, k]ᵀ with bf16 x and W (row-major, W as
 * PyTorch's Linear stores it), f32 accumulation and f32 y. k is cut into
 * `split` contiguous ranges of equal length (a multiple of 32; the last range
 * takes what is left) that depend only on (n, k) and the GPU
 * (ds_k_gemm_split); within a range, every output element is one
 * chain of tensor-core products over 16-wide k chunks in increasing order
 * (wmma m16n16k16), and the ranges' partials are summed in range order, after
 * y's own value when the product adds to y: ((y + p0) + p1) + ... . For
 * decoding's 16-row tiles the last block of the tile to finish sums them (a
 * counter per tile at the start of the workspace), else a second kernel. Tile
 * shapes differ with m (a 16-row tile that streams W for decoding, 64 and
 * 128-row tiles for larger passes), but chunks past a range's end are
 * zero-filled, so every shape runs the same chain for each element: a token's
 * result never depends on what else shares the pass.
 *
 * Larger passes can run the k ranges through cuBLASLt instead (with a
 * ds_k_gemm_lt): an algorithm that does not split k runs that same chain, one
 * tensor-core product per 16-wide chunk in increasing order from zero, and
 * gives the same bits (measured on an H200 for every algorithm its heuristic
 * offered, bench/RESULTS.md; tests/gpu/test-kernels checks it on every run).
 * The equal ranges go as one strided batch, so that the GPU is filled by all
 * of them at once, and the last range, when shorter, as a second product.
 * Passes of many rows, where one range's product fills the GPU by itself, run
 * the ranges one after another instead, each adding its product to y (cuBLASLt's
 * beta = 1): the same sums in the same order, without writing the partials and
 * reading them back (gemm_lt_in_turn).
 * cuBLASLt's heuristic is asked once per class of row counts (lt_rows_class),
 * not for every new pass size.
 *
 * x can also be made on the way in (ds_k_gemm_bf16_x): the RMSNorm or SwiGLU
 * of f32 rows. Decoding's few rows are then made by each block for its own k
 * range, in shared memory, with rowwise.cu's arithmetic (rowmath.cuh), so a
 * layer at batch 1 runs no norm or SwiGLU kernel before its products (one
 * row's gate_up, which cuBLASLt takes otherwise, runs here unsplit for it);
 * larger passes make the rows with those kernels first. Either way the same
 * bits. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "kernels.h"
#include "pdl.cuh"
#include "rowmath.cuh"

using namespace nvcuda;


template <int BM, int BN, int BK, int WM, int WN, int STAGES> struct Tile {
    static constexpr int THREADS = WM * WN * 32;
    static constexpr int LDS = BK + 8;            /* smem row stride in bf16: breaks bank conflicts */
    static constexpr int FM = BM / WM / 16, FN = BN / WN / 16;   /* fragments per warp */
    static constexpr int A_STAGE = BM * LDS, B_STAGE = BN * LDS;
    static constexpr int PIPE = (A_STAGE + B_STAGE) * STAGES * 2;
    static constexpr int LDC = BN + 4;            /* epilogue row stride in f32 */
    static constexpr int EPI = BM * LDC * 4;
    static constexpr int SMEM = PIPE > EPI ? PIPE : EPI;
};

#define GM_KQ 32              /* split boundaries are multiples of this */
#define GM_COUNTERS 4096      /* tile counters at the start of the workspace (f32 slots) */
#define GM_X_ROWS 4           /* decoding's products make their x themselves for at most this many rows: each
                                 block reads whole rows for a norm */
#define GM_XS_MAX 11264       /* and in at most this many bytes of shared memory (three blocks still fit an SM) */
#define GM_SWIGLU_XS_MAX 4096 /* SwiGLU's x in at most this many: each block reads twice its range's bytes in f32
                                 (gate and up) before its first product, which costs more than the launch saved
                                 once a range is longer (two rows of down, or k in few ranges; bench/RESULTS.md) */

/* Chunks of GM_KQ in k (the last one may be partial). */
__host__ __device__ static inline int k_chunks(int K)
{
    return (K + GM_KQ - 1) / GM_KQ;
}

/* Chunks of GM_KQ in each k range but the last, which takes the rest (at least one chunk: ds_k_gemm_split). */
__host__ __device__ static inline int range_chunks(int KQ, int split)
{
    return (KQ + split - 1) / split;
}

__device__ static inline void cp_async16(void *smem, const void *gmem, bool valid)
{
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int bytes = valid ? 16 : 0;   /* 0: fill the 16 bytes with zeros, read nothing */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ static inline void cp_async_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> __device__ static inline void cp_async_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* A tile's (ROWS x BK) 16-byte chunks that this thread fills, addressed once a block, from rows r0.. of a
 * row-major source with leading dimension ld: a pipeline stage at k0 is then a predicate and a copy per
 * chunk (k at or past k_lim, and rows at or past `rows`, read as zero). The W tile (rows of W) and the x
 * tile (rows of x, or of the rows made in shared memory with stride xs_ld: copy) both use it. */
template <class T, int ROWS, int BK> struct tile_loader {
    static constexpr int CPR = BK / 8, PER = ROWS * CPR / T::THREADS;
    static_assert(ROWS * CPR % T::THREADS == 0, "every thread fills as many chunks");
    const __nv_bfloat16 *src[PER];   /* the chunk's row and column at k 0 (row 0 for rows out of range) */
    int col[PER];                    /* its column; rows out of range: never below k_lim */
    int made[PER];                   /* its offset in made rows of stride xs_ld; rows out of range: -1 */
    int dst[PER];                    /* its place in the stage */
    __device__ tile_loader(const __nv_bfloat16 *base, int ld, int rows, int r0, int xs_ld)
    {
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int idx = threadIdx.x + i * T::THREADS, r = idx / CPR, c = (idx % CPR) * 8;
            bool in = r0 + r < rows;
            src[i] = base + (size_t)(in ? r0 + r : 0) * ld + c;
            col[i] = in ? c : 1 << 30;
            made[i] = in ? r * xs_ld + c : -1;
            dst[i] = r * T::LDS + c;
        }
    }
    /* the stage at k0 from the source (base: any valid address, read for nothing) */
    __device__ void stage(__nv_bfloat16 *S, const __nv_bfloat16 *base, int k0, int k_lim) const
    {
#pragma unroll
        for (int i = 0; i < PER; i++) {
            bool ok = k0 + col[i] < k_lim;
            cp_async16(S + dst[i], ok ? (const void *)(src[i] + k0) : (const void *)base, ok);
        }
    }
    /* the stage at column j0 of the made rows Xs */
    __device__ void copy(__nv_bfloat16 *S, const __nv_bfloat16 *Xs, int j0) const
    {
#pragma unroll
        for (int i = 0; i < PER; i++) {
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (made[i] >= 0)
                v = *(const uint4 *)(Xs + made[i] + j0);
            *(uint4 *)(S + dst[i]) = v;
        }
    }
};

/* Where decoding's product makes its x from (ds_k_x, as the kernel reads it). */
struct x_src {
    const float *src;     /* RMSNORM: [M, ld] rows; SWIGLU: [M, ld] rows holding gate [K] then up [K] */
    const float *norm_w;  /* RMSNORM: [K] */
    float eps;
    int ld;
    int xs_ld;            /* row stride of the made range in shared memory (bf16 elements) */
};

/* Make rows 0..M-1 of x over this block's k range [kb, kb + cols) into Xs (zeros at k_lim and past), with
 * the arithmetic of ds_k_rmsnorm_bf16 / ds_k_swiglu_bf16 (rowmath.cuh), so the same bits. */
template <int XK, int B>
__device__ static void make_x_range(__nv_bfloat16 *Xs, const x_src &in, int M, int K, int kb, int k_lim, int cols,
                                    float *red)
{
    for (int m = 0; m < M; m++) {
        const float *row = in.src + (size_t)m * in.ld;
        float scale = 0.0f;
        if (XK == DS_K_X_RMSNORM)
            scale = rms_scale(row_sumsq4<B>(row, K, red), K, in.eps);
        __nv_bfloat16 *dst = Xs + (size_t)m * in.xs_ld;
#pragma unroll 4
        for (int j = threadIdx.x * 4; j < cols; j += B * 4) {
            int k = kb + j;
            __nv_bfloat162 o[2] = {__floats2bfloat162_rn(0.0f, 0.0f), __floats2bfloat162_rn(0.0f, 0.0f)};
            if (k < k_lim) {   /* k_lim and k are multiples of 4: the four are in or out together */
                float4 v = *(const float4 *)(row + k);
                if (XK == DS_K_X_RMSNORM) {
                    rms_bf16x4(v, *(const float4 *)(in.norm_w + k), scale, o);
                } else {
                    float4 u = *(const float4 *)(row + K + k);
                    o[0] = __floats2bfloat162_rn(silu_mul(v.x, u.x), silu_mul(v.y, u.y));
                    o[1] = __floats2bfloat162_rn(silu_mul(v.z, u.z), silu_mul(v.w, u.w));
                }
            }
            *(uint2 *)(dst + j) = make_uint2(*(const unsigned *)&o[0], *(const unsigned *)&o[1]);
        }
    }
}

/* Grid: (n tiles, m tiles, split). Split s covers k in [32 s L, 32 (s + 1) L) ∩ [0, K), KQ = ⌈K / 32⌉,
 * L = ⌈KQ / S⌉. With split 1 the tile goes to y (added to it when accumulate); otherwise to part[s]
 * (part = ws + GM_COUNTERS), and with `fused` the tile's last block sums the parts into y. XK other than
 * DS_K_X_BF16: x is made from `in` into shared memory after the pipeline's (Xs), for this block's k range
 * (and x is not read). */
template <int BM, int BN, int BK, int WM, int WN, int STAGES, int XK>
__global__ static void __launch_bounds__(WM * WN * 32)
gemm_bf16_kernel(const __nv_bfloat16 *x, int ldx, const __nv_bfloat16 *w, int M, int N, int K, float *y, int ldy,
                 int accumulate, float *ws, int fused, x_src in)
{
    typedef Tile<BM, BN, BK, WM, WN, STAGES> T;
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ float red[ROW_THREADS / 32];
    __nv_bfloat16 *As = (__nv_bfloat16 *)smem;
    __nv_bfloat16 *Bs = As + T::A_STAGE * STAGES;
    __nv_bfloat16 *Xs = (__nv_bfloat16 *)(smem + T::SMEM);   /* [M, in.xs_ld] when XK != DS_K_X_BF16 */
    int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
    int S = gridDim.z, s = blockIdx.z;
    int KQ = k_chunks(K);
    int L = range_chunks(KQ, S);
    int kb = s * L * GM_KQ, ke = (s + 1) * L * GM_KQ;
    int k_lim = ke < K ? ke : K;
    int nk = (ke - kb + BK - 1) / BK;

    int warp = threadIdx.x >> 5;
    int wm = warp / WN, wn = warp % WN;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[T::FM][T::FN];
#pragma unroll
    for (int i = 0; i < T::FM; i++)
#pragma unroll
        for (int j = 0; j < T::FN; j++)
            wmma::fill_fragment(acc[i][j], 0.0f);

    /* No kernel writes W: its first stages are requested before waiting for the kernel before (so they
     * stream while that one finishes), x after. The prologue is one group, then empty ones, so that the
     * loop's wait keeps counting STAGES - 1 groups ahead. */
    const tile_loader<T, BN, BK> wl(w, K, N, n0, 0);
    const tile_loader<T, BM, BK> xl(x, ldx, M, m0, in.xs_ld);
#pragma unroll
    for (int st = 0; st < STAGES - 1; st++)
        if (st < nk)
            wl.stage(Bs + st * T::B_STAGE, w, kb + st * BK, k_lim);
    pdl_enter();
    if (XK != DS_K_X_BF16) {
        make_x_range<XK, T::THREADS>(Xs, in, M, K, kb, k_lim, nk * BK, red);
        __syncthreads();
#pragma unroll
        for (int st = 0; st < STAGES - 1; st++)
            if (st < nk)
                xl.copy(As + st * T::A_STAGE, Xs, st * BK);
    } else {
#pragma unroll
        for (int st = 0; st < STAGES - 1; st++)
            if (st < nk)
                xl.stage(As + st * T::A_STAGE, x, kb + st * BK, k_lim);
    }
#pragma unroll
    for (int st = 0; st < STAGES - 1; st++)
        cp_async_commit();
    for (int i = 0; i < nk; i++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        int nxt = i + STAGES - 1;
        if (nxt < nk) {
            int st = nxt % STAGES;
            if (XK != DS_K_X_BF16)
                xl.copy(As + st * T::A_STAGE, Xs, nxt * BK);
            else
                xl.stage(As + st * T::A_STAGE, x, kb + nxt * BK, k_lim);
            wl.stage(Bs + st * T::B_STAGE, w, kb + nxt * BK, k_lim);
        }
        cp_async_commit();
        const __nv_bfloat16 *a = As + (i % STAGES) * T::A_STAGE;
        const __nv_bfloat16 *b = Bs + (i % STAGES) * T::B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[T::FM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[T::FN];
#pragma unroll
            for (int r = 0; r < T::FM; r++)
                wmma::load_matrix_sync(fa[r], a + (wm * T::FM * 16 + r * 16) * T::LDS + kk, T::LDS);
#pragma unroll
            for (int c = 0; c < T::FN; c++)
                wmma::load_matrix_sync(fb[c], b + (wn * T::FN * 16 + c * 16) * T::LDS + kk, T::LDS);
#pragma unroll
            for (int r = 0; r < T::FM; r++)
#pragma unroll
                for (int c = 0; c < T::FN; c++)
                    wmma::mma_sync(acc[r][c], fa[r], fb[c], acc[r][c]);
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    /* epilogue through shared memory, so that global writes are row-contiguous */
    float *C = (float *)smem;
#pragma unroll
    for (int r = 0; r < T::FM; r++)
#pragma unroll
        for (int c = 0; c < T::FN; c++)
            wmma::store_matrix_sync(C + (wm * T::FM * 16 + r * 16) * T::LDC + wn * T::FN * 16 + c * 16, acc[r][c],
                                    T::LDC, wmma::mem_row_major);
    __syncthreads();
    int rows = M - m0 < BM ? M - m0 : BM;
    for (int idx = threadIdx.x; idx < rows * BN; idx += T::THREADS) {
        int r = idx / BN, c = idx % BN;
        int m = m0 + r, n = n0 + c;
        if (n >= N)
            continue;
        float v = C[r * T::LDC + c];
        if (S == 1) {
            float *dst = y + (size_t)m * ldy + n;
            *dst = accumulate ? *dst + v : v;
        } else {
            ws[GM_COUNTERS + ((size_t)s * M + m) * N + n] = v;
        }
    }
    if (S == 1 || !fused)
        return;
    /* the last block of this tile to finish sums the parts in split order */
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int *count = (int *)ws + blockIdx.y * gridDim.x + blockIdx.x;
        last = atomicAdd(count, 1) == S - 1;
        if (last)
            *count = 0;   /* ready for the next product */
    }
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    const float *part = ws + GM_COUNTERS;
    for (int idx = threadIdx.x; idx < rows * BN; idx += T::THREADS) {
        int r = idx / BN, c = idx % BN;
        int m = m0 + r, n = n0 + c;
        if (n >= N)
            continue;
        size_t i = (size_t)m * N + n;
        float *dst = y + (size_t)m * ldy + n;
        float v = accumulate ? *dst + __ldcg(part + i) : __ldcg(part + i);
        for (int z = 1; z < S; z++)
            v += __ldcg(part + (size_t)z * M * N + i);
        *dst = v;
    }
}

/* Ranges of ⌈KQ / split⌉ chunks: as many as it takes to cover k (KQ chunks), so that none is empty. */
static int covering_split(int KQ, int split)
{
    int L = range_chunks(KQ, split);
    return (KQ + L - 1) / L;
}

extern "C" int ds_k_gemm_split(int N, int K, int n_sm)
{
    int KQ = k_chunks(K);
    int tiles = (N + 63) / 64;
    /* decoding runs the 16 x 64 tile, three blocks per SM: as many k ranges as
     * still fit one wave of blocks, each range but the last at least 8 chunks of
     * 32 long */
    int split = 1;
    while (tiles * (split + 1) <= 3 * n_sm && KQ / (split + 1) >= 8 && split < 32)
        split++;
    return covering_split(KQ, split);
}

extern "C" int ds_k_gemm_split_at_most(int split, int K, int max_ranges)
{
    if (max_ranges < 1 || split <= max_ranges)
        return split;
    return covering_split(k_chunks(K), max_ranges);
}

extern "C" size_t ds_k_gemm_workspace(int M, int N, int split)
{
    return split > 1 ? GM_COUNTERS + (size_t)split * M * N : 0;
}

/* y[m, n] = ((y[m, n] +) ws[0, m, n]) + ws[1, m, n] + ... in split order, W columns a thread (for W = 4: N and
 * ldy multiples of 4, y and ws 16-byte aligned, so four times the bytes in flight; the same sums either way). */
template <int W>
__global__ static void gemm_reduce_kernel(const float *ws, int M, int N, int S, float *y, int ldy, int accumulate)
{
    pdl_enter();
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * W;
    if (i >= (size_t)M * N)
        return;
    int m = (int)(i / N), n = (int)(i % N);
    const float *part = ws + GM_COUNTERS;
    f32s<W> *dst = (f32s<W> *)(y + (size_t)m * ldy + n);
    f32s<W> v = *(const f32s<W> *)(part + i);
    if (accumulate) {
        f32s<W> d = *dst;
#pragma unroll
        for (int c = 0; c < W; c++)
            v.v[c] = d.v[c] + v.v[c];
    }
    for (int s = 1; s < S; s++) {
        f32s<W> p = *(const f32s<W> *)(part + (size_t)s * M * N + i);
#pragma unroll
        for (int c = 0; c < W; c++)
            v.v[c] += p.v[c];
    }
    *dst = v;
}

template <int BM, int BN, int BK, int WM, int WN, int STAGES, int XK>
static cudaError_t gemm_launch(const uint16_t *x, int ldx, const uint16_t *w, int M, int N, int K, int split,
                               float *ws, float *y, int ldy, int accumulate, cudaStream_t stream, int *fused,
                               x_src in, size_t xs_bytes)
{
    typedef Tile<BM, BN, BK, WM, WN, STAGES> T;
    static int attr_set;
    if (!attr_set) {
        cudaError_t e = cudaFuncSetAttribute(gemm_bf16_kernel<BM, BN, BK, WM, WN, STAGES, XK>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             T::SMEM + (XK != DS_K_X_BF16 ? GM_XS_MAX : 0));
        if (e != cudaSuccess)
            return e;
        attr_set = 1;
    }
    if ((M + BM - 1) / BM > 65535)
        return cudaErrorInvalidValue;
    dim3 grid((unsigned)((N + BN - 1) / BN), (unsigned)((M + BM - 1) / BM), (unsigned)split);
    /* one block sums a tile's parts: worth it for decoding's small tiles only */
    *fused = BM <= 16 && (size_t)grid.x * grid.y <= GM_COUNTERS;
    return pdl_launch(gemm_bf16_kernel<BM, BN, BK, WM, WN, STAGES, XK>, grid, dim3(T::THREADS),
                      (size_t)T::SMEM + xs_bytes, stream, (const __nv_bfloat16 *)x, ldx, (const __nv_bfloat16 *)w, M,
                      N, K, y, ldy, accumulate, ws, *fused, in);
}

/* The split's sums after products that did not sum their own parts. */
static cudaError_t gemm_reduce(int M, int N, int split, const float *ws, float *y, int ldy, int accumulate,
                               cudaStream_t stream)
{
    size_t total = (size_t)M * N;
    if (N % 4 == 0 && ldy % 4 == 0 && ((uintptr_t)y & 15) == 0 && ((uintptr_t)ws & 15) == 0)
        return pdl_launch(gemm_reduce_kernel<4>, dim3((unsigned)((total / 4 + 255) / 256)), dim3(256), 0, stream, ws,
                          M, N, split, y, ldy, accumulate);
    return pdl_launch(gemm_reduce_kernel<1>, dim3((unsigned)((total + 255) / 256)), dim3(256), 0, stream, ws, M, N,
                      split, y, ldy, accumulate);
}

/* The in-house kernels: a tile shape by M, the k ranges' partials summed in order. */
static cudaError_t gemm_inhouse(const uint16_t *x, int ldx, const uint16_t *w, int M, int N, int K, int split,
                               float *ws, float *y, int ldy, int accumulate, cudaStream_t stream)
{
    cudaError_t e;
    int fused = 0;
    x_src none = {};
    if (M <= 16)        /* decoding: stream W with deep k steps */
        e = gemm_launch<16, 64, 128, 1, 4, 3, DS_K_X_BF16>(x, ldx, w, M, N, K, split, ws, y, ldy, accumulate, stream,
                                                           &fused, none, 0);
    else if (M <= 128)
        e = gemm_launch<64, 128, 32, 2, 4, 4, DS_K_X_BF16>(x, ldx, w, M, N, K, split, ws, y, ldy, accumulate, stream,
                                                           &fused, none, 0);
    else
        e = gemm_launch<128, 128, 32, 2, 4, 4, DS_K_X_BF16>(x, ldx, w, M, N, K, split, ws, y, ldy, accumulate,
                                                            stream, &fused, none, 0);
    if (e != cudaSuccess || split == 1 || fused)
        return e;
    return gemm_reduce(M, N, split, ws, y, ldy, accumulate, stream);
}

/* ---- cuBLASLt for the larger passes ---- */
#define LT_WORKSPACE (32u << 20)
#define LT_CACHE 1024             /* (M, N, range K, ...) problems remembered: a power of two */
#define LT_PROBE 8                /* slots a problem may take, from its hash on */
#define LT_IN_TURN_ROWS 1024      /* passes of at least this many rows run a split's ranges in turn */

struct lt_problem {               /* `batch` k ranges of Ks each, one after another, as cuBLASLt sees them */
    int M, N, Ks, K, ldx, ldy, beta, align, batch;
};
struct lt_entry {
    struct lt_problem key;
    int used;
    int usable;                   /* 0: no algorithm that keeps the chain; use the kernels */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
};
struct ds_k_gemm_lt {
    cublasLtHandle_t handle;
    void *workspace;              /* LT_WORKSPACE bytes: fixed, so products can be captured in graphs */
    struct lt_entry cache[LT_CACHE];   /* open addressing by the problem's hash */
    unsigned next_evict;
    size_t launches;              /* products cuBLASLt was given */
    size_t heuristics;            /* questions asked of its heuristic */
    int in_turn_rows;             /* passes of at least this many rows run a split's ranges in turn (0: never) */
};

extern "C" cudaError_t ds_k_gemm_lt_create(struct ds_k_gemm_lt **ret)
{
    struct ds_k_gemm_lt *lt = (struct ds_k_gemm_lt *)calloc(1, sizeof *lt);
    if (!lt)
        return cudaErrorMemoryAllocation;
    if (cublasLtCreate(&lt->handle) != CUBLAS_STATUS_SUCCESS) {
        free(lt);
        return cudaErrorNotSupported;
    }
    cudaError_t e = cudaMalloc(&lt->workspace, LT_WORKSPACE);
    if (e != cudaSuccess) {
        cublasLtDestroy(lt->handle);
        free(lt);
        return e;
    }
    lt->in_turn_rows = LT_IN_TURN_ROWS;
    *ret = lt;
    return cudaSuccess;
}

extern "C" void ds_k_gemm_lt_set_in_turn_rows(struct ds_k_gemm_lt *lt, int rows)
{
    if (lt)
        lt->in_turn_rows = rows < 0 ? LT_IN_TURN_ROWS : rows;
}

static void lt_entry_free(struct lt_entry *en)
{
    if (en->op)
        cublasLtMatmulDescDestroy(en->op);
    if (en->a)
        cublasLtMatrixLayoutDestroy(en->a);
    if (en->b)
        cublasLtMatrixLayoutDestroy(en->b);
    if (en->c)
        cublasLtMatrixLayoutDestroy(en->c);
    memset(en, 0, sizeof *en);
}

extern "C" size_t ds_k_gemm_lt_launches(const struct ds_k_gemm_lt *lt)
{
    return lt ? lt->launches : 0;
}

extern "C" size_t ds_k_gemm_lt_heuristics(const struct ds_k_gemm_lt *lt)
{
    return lt ? lt->heuristics : 0;
}

extern "C" void ds_k_gemm_lt_destroy(struct ds_k_gemm_lt *lt)
{
    if (!lt)
        return;
    for (int i = 0; i < LT_CACHE; i++)
        lt_entry_free(&lt->cache[i]);
    cudaFree(lt->workspace);
    cublasLtDestroy(lt->handle);
    free(lt);
}

/* Whether cuBLASLt's algorithm `al` may stand in for the kernels: it must not split k. */
static bool lt_keeps_chain(const cublasLtMatmulAlgo_t *al)
{
    int32_t splitk = 1;
    uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_NONE;
    size_t got = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(al, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &got) !=
            CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoConfigGetAttribute(al, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &reduction, sizeof reduction,
                                             &got) != CUBLAS_STATUS_SUCCESS)
        return false;
    return splitk <= 1 && reduction == CUBLASLT_REDUCTION_SCHEME_NONE;
}

/* The descriptors of one problem (y^T [N, M] = W [N, Ks] . x^T [Ks, M] in cuBLAS's column-major terms). */
static bool lt_describe(struct lt_entry *en)
{
    const struct lt_problem *k = &en->key;
    cublasOperation_t tr = CUBLAS_OP_T, no = CUBLAS_OP_N;
    if (cublasLtMatmulDescCreate(&en->op, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(en->op, CUBLASLT_MATMUL_DESC_TRANSA, &tr, sizeof tr) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(en->op, CUBLASLT_MATMUL_DESC_TRANSB, &no, sizeof no) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatrixLayoutCreate(&en->a, CUDA_R_16BF, k->Ks, k->N, k->K) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatrixLayoutCreate(&en->b, CUDA_R_16BF, k->Ks, k->M, k->ldx) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatrixLayoutCreate(&en->c, CUDA_R_32F, k->N, k->M, k->ldy) != CUBLAS_STATUS_SUCCESS)
        return false;
    if (k->batch > 1) {   /* range b: W and x from column b Ks on, its partial at b M N (ldy = N) */
        int32_t count = k->batch;
        cublasLtMatrixLayout_t layout[3] = {en->a, en->b, en->c};
        int64_t stride[3] = {k->Ks, k->Ks, (int64_t)k->M * k->N};
        for (int i = 0; i < 3; i++)
            if (cublasLtMatrixLayoutSetAttribute(layout[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                 sizeof count) != CUBLAS_STATUS_SUCCESS ||
                cublasLtMatrixLayoutSetAttribute(layout[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride[i],
                                                 sizeof stride[i]) != CUBLAS_STATUS_SUCCESS)
                return false;
    }
    return true;
}

/* The heuristic's best algorithm for a described problem that keeps the chain (en->usable 0: none). */
static void lt_choose(struct ds_k_gemm_lt *lt, struct lt_entry *en)
{
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res[16];
    int got = 0;
    size_t wsb = LT_WORKSPACE;
    uint32_t align = (uint32_t)en->key.align;
    en->usable = 0;
    if (cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS)
        return;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align, sizeof align);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align, sizeof align);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align, sizeof align);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align, sizeof align);
    if (cublasLtMatmulAlgoGetHeuristic(lt->handle, en->op, en->a, en->b, en->c, en->c, pref, 16, res, &got) !=
        CUBLAS_STATUS_SUCCESS)
        got = 0;
    for (int i = 0; i < got; i++)
        if (res[i].state == CUBLAS_STATUS_SUCCESS && res[i].workspaceSize <= wsb && lt_keeps_chain(&res[i].algo)) {
            en->algo = res[i].algo;
            en->usable = 1;
            break;
        }
    cublasLtMatmulPreferenceDestroy(pref);
    lt->heuristics++;
}

/* Whether an algorithm chosen for another row count runs this problem within the workspace. */
static bool lt_fits(struct ds_k_gemm_lt *lt, const struct lt_entry *en, const cublasLtMatmulAlgo_t *al)
{
    cublasLtMatmulHeuristicResult_t res;
    memset(&res, 0, sizeof res);
    return cublasLtMatmulAlgoCheck(lt->handle, en->op, en->a, en->b, en->c, en->c, al, &res) ==
               CUBLAS_STATUS_SUCCESS &&
           res.state == CUBLAS_STATUS_SUCCESS && res.workspaceSize <= LT_WORKSPACE;
}

/* The row count whose heuristic choice a problem of M rows takes: M itself up to 8, else the next of
 * 12, 16, 24, 32, 48, 64, ... (powers of two and one and a half times them). Each new pass size (a
 * prefill of any length, a verification of any total) would otherwise ask the heuristic again, which costs
 * about as much as a small pass. Every algorithm that keeps the chain gives the same bits, so which one a
 * row count gets changes the time only. */
static int lt_rows_class(int M)
{
    if (M <= 8)
        return M;
    int c = 8;
    while (c < M)
        c = (c & (c - 1)) == 0 ? c + c / 2 : c / 3 * 4;   /* 8, 12, 16, 24, 32, 48, ... */
    return c;
}

static unsigned lt_hash(const struct lt_problem *key)
{
    unsigned h = 2166136261u;   /* FNV-1a over the problem's ints */
    for (size_t i = 0; i < sizeof *key; i++)
        h = (h ^ ((const unsigned char *)key)[i]) * 16777619u;
    return h;
}

/* The problem's entry, or NULL. */
static struct lt_entry *lt_find(struct ds_k_gemm_lt *lt, const struct lt_problem *key)
{
    unsigned h = lt_hash(key);
    for (int p = 0; p < LT_PROBE; p++) {
        struct lt_entry *e = &lt->cache[(h + p) & (LT_CACHE - 1)];
        if (e->used && !memcmp(&e->key, key, sizeof *key))
            return e;
    }
    return NULL;
}

/* A new entry for a problem not in the cache (a free slot, else one replaced in turn), described;
 * *described false when cuBLASLt refused the descriptors. Not usable until an algorithm is set. */
static struct lt_entry *lt_claim(struct ds_k_gemm_lt *lt, const struct lt_problem *key, bool *described)
{
    unsigned h = lt_hash(key);
    struct lt_entry *en = NULL;
    for (int p = 0; p < LT_PROBE && !en; p++)
        if (!lt->cache[(h + p) & (LT_CACHE - 1)].used)
            en = &lt->cache[(h + p) & (LT_CACHE - 1)];
    if (!en) {
        en = &lt->cache[(h + lt->next_evict++ % LT_PROBE) & (LT_CACHE - 1)];
        lt_entry_free(en);
    }
    en->key = *key;
    en->used = 1;
    en->usable = 0;
    *described = lt_describe(en);
    return en;
}

/* The problem's entry: its algorithm is its row class's where that fits, else the heuristic's own. */
static struct lt_entry *lt_lookup(struct ds_k_gemm_lt *lt, const struct lt_problem *key)
{
    struct lt_entry *en = lt_find(lt, key);
    if (en)
        return en;
    struct lt_problem ck = *key;
    ck.M = lt_rows_class(key->M);
    bool from_class = false, described;
    cublasLtMatmulAlgo_t al;
    if (ck.M != key->M) {
        struct lt_entry *ce = lt_find(lt, &ck);
        if (!ce && (ce = lt_claim(lt, &ck, &described), described))
            lt_choose(lt, ce);
        from_class = ce->usable;
        al = ce->algo;   /* copied: claiming this problem's slot may replace the class's entry */
    }
    en = lt_claim(lt, key, &described);
    if (!described)
        return en;
    if (from_class && lt_fits(lt, en, &al)) {
        en->algo = al;
        en->usable = 1;
    } else {
        lt_choose(lt, en);
    }
    return en;
}

/* The largest power of two from 2 to 256 that divides a: of several values at once, give it their OR. */
static int alignment_of(uintptr_t a)
{
    int al = 256;
    while (al > 2 && a % (uintptr_t)al)
        al /= 2;
    return al;
}

/* The k ranges through cuBLASLt one after another, each adding its product to y: range 0 writes y (adds to
 * it when accumulating), every later one adds (beta = 1, y as both C and D), so y ends as ((y +) p0 + p1)
 * + ..., the partial sums' order, with no partials in the workspace and no reduce kernel.
 * cudaErrorNotSupported when a range has no algorithm that keeps the chain and y can still be made
 * another way: nothing launched yet, or y is overwritten anyway (not accumulating). */
static cudaError_t gemm_lt_in_turn(struct ds_k_gemm_lt *lt, const uint16_t *x, int ldx, const uint16_t *w, int M,
                                   int N, int K, int split, float *y, int ldy, int accumulate, cudaStream_t stream)
{
    int ks = range_chunks(k_chunks(K), split) * GM_KQ, last_ks = K - (split - 1) * ks;
    int al = alignment_of((uintptr_t)w | (uintptr_t)x | (uintptr_t)y | (uintptr_t)ks * 2);
    /* range 0, the ranges between (adding), the last one (adding; as long as the others or shorter) */
    const struct lt_problem keys[3] = {{M, N, ks, K, ldx, ldy, accumulate ? 1 : 0, al, 1},
                                       {M, N, ks, K, ldx, ldy, 1, al, 1},
                                       {M, N, last_ks, K, ldx, ldy, 1, al, 1}};
    for (int g = 0; g < 3; g++)
        if ((g != 1 || split > 2) && !lt_lookup(lt, &keys[g])->usable)
            return cudaErrorNotSupported;   /* nothing launched yet */
    const float one = 1.0f, zero = 0.0f;
    for (int r = 0; r < split; r++) {
        const struct lt_problem *key = &keys[r == 0 ? 0 : r == split - 1 ? 2 : 1];
        /* looked up again: another range's lookup may have replaced this one's entry */
        struct lt_entry *en = lt_lookup(lt, key);
        size_t k0 = (size_t)r * ks;
        if (!en->usable || cublasLtMatmul(lt->handle, en->op, &one, w + k0, en->a, x + k0, en->b,
                                          key->beta ? &one : &zero, y, en->c, y, en->c, &en->algo, lt->workspace,
                                          LT_WORKSPACE, stream) != CUBLAS_STATUS_SUCCESS)
            return r == 0 || !accumulate ? cudaErrorNotSupported : cudaErrorUnknown;   /* y holds some ranges */
        lt->launches++;
    }
    return cudaSuccess;
}

/* The k ranges through cuBLASLt, partials summed by gemm_reduce_kernel: the ranges of L chunks as one
 * strided batch, then the last range when it is shorter. cudaErrorNotSupported when some group has no
 * algorithm that keeps the chain, or a product fails to launch: y is then untouched (with a split, cuBLASLt
 * writes only the partials), and the kernels compute the whole product. */
static cudaError_t gemm_lt(struct ds_k_gemm_lt *lt, const uint16_t *x, int ldx, const uint16_t *w, int M, int N,
                           int K, int split, float *ws, float *y, int ldy, int accumulate, cudaStream_t stream)
{
    if (split > 1 && lt->in_turn_rows && M >= lt->in_turn_rows) {
        cudaError_t e = gemm_lt_in_turn(lt, x, ldx, w, M, N, K, split, y, ldy, accumulate, stream);
        if (e != cudaErrorNotSupported)
            return e;   /* else the batch of ranges may still serve */
    }
    struct lt_problem keys[2];
    int kb[2];      /* each group's first k */
    float *dst[2];  /* and where its first product goes */
    int KQ = k_chunks(K), L = range_chunks(KQ, split);
    int last_ks = K - (split - 1) * L * GM_KQ;              /* k in the last range */
    int groups = split > 1 && last_ks != L * GM_KQ ? 2 : 1;
    for (int g = 0; g < groups; g++) {
        int first = g == 0 ? 0 : split - 1, batch = g == 0 ? split - groups + 1 : 1;
        int ks = split == 1 ? K : g == 0 ? L * GM_KQ : last_ks;
        kb[g] = first * L * GM_KQ;
        dst[g] = split == 1 ? y : ws + GM_COUNTERS + (size_t)first * M * N;
        uintptr_t at = (uintptr_t)(w + kb[g]) | (uintptr_t)(x + kb[g]) | (uintptr_t)dst[g];
        if (batch > 1)   /* every range of the batch starts as aligned as the first */
            at |= (uintptr_t)ks * 2 | (uintptr_t)M * N * 4;
        int al = alignment_of(at);
        keys[g] = lt_problem{M, N, ks, K, ldx, split == 1 ? ldy : N, split == 1 && accumulate, al, batch};
        if (!lt_lookup(lt, &keys[g])->usable)
            return cudaErrorNotSupported;   /* nothing launched yet */
    }
    const float one = 1.0f, beta = split == 1 && accumulate ? 1.0f : 0.0f;
    for (int g = 0; g < groups; g++) {
        /* looked up again: the other group's lookup may have replaced this one's entry */
        struct lt_entry *en = lt_lookup(lt, &keys[g]);
        if (!en->usable || cublasLtMatmul(lt->handle, en->op, &one, w + kb[g], en->a, x + kb[g], en->b, &beta, dst[g],
                                          en->c, dst[g], en->c, &en->algo, lt->workspace, LT_WORKSPACE,
                                          stream) != CUBLAS_STATUS_SUCCESS)
            return cudaErrorNotSupported;
        lt->launches++;
    }
    if (split == 1)
        return cudaSuccess;
    return gemm_reduce(M, N, split, ws, y, ldy, accumulate, stream);
}

/* Whether k splits into `split` ranges that each hold at least one chunk (as ds_k_gemm_split's do). */
static bool split_fits(int K, int split)
{
    int KQ = k_chunks(K);
    return split >= 1 && split <= 64 && (split - 1) * range_chunks(KQ, split) < KQ;
}

/* Which passes cuBLASLt takes: every pass of a product without a k split (its
 * one range is a full-size product) but one row whose x is made on the way in
 * (gate_up: the kernel makes the row itself, one kernel fewer a layer), and
 * passes of more than GM_X_ROWS rows otherwise; decoding's few rows keep the
 * kernel that spreads k ranges over the GPU and makes their x on the way in.
 * Measured, bench/RESULTS.md. */
static bool lt_takes(int M, int split, bool made_x)
{
    return (split == 1 && !(made_x && M == 1)) || M > GM_X_ROWS;
}

extern "C" cudaError_t ds_k_gemm_bf16(struct ds_k_gemm_lt *lt, const uint16_t *x, int ldx, const uint16_t *w, int M,
                                      int N, int K, int split, float *ws, float *y, int ldy, int accumulate,
                                      cudaStream_t stream)
{
    if (M < 0 || N <= 0 || K <= 0 || K % 8 || ldx % 8 || ldx < K || ldy < N || !split_fits(K, split) ||
        (split > 1 && !ws))
        return cudaErrorInvalidValue;
    if (M == 0)
        return cudaSuccess;
    if (lt && lt_takes(M, split, false)) {
        cudaError_t e = gemm_lt(lt, x, ldx, w, M, N, K, split, ws, y, ldy, accumulate, stream);
        if (e != cudaErrorNotSupported)
            return e;
    }
    return gemm_inhouse(x, ldx, w, M, N, K, split, ws, y, ldy, accumulate, stream);
}

/* ---- products whose x is made on the way in ---- */
extern "C" cudaError_t ds_k_x_make(const struct ds_k_x *x, int M, int K, cudaStream_t stream)
{
    switch (x->kind) {
    case DS_K_X_BF16:
        return cudaSuccess;
    case DS_K_X_RMSNORM:
        return ds_k_rmsnorm_bf16(x->src, NULL, x->norm_w, M, K, x->eps, x->x, stream);
    case DS_K_X_SWIGLU:
        return ds_k_swiglu_bf16(x->src, M, K, x->x, stream);
    }
    return cudaErrorInvalidValue;
}

/* Bytes of shared memory for a decoding block's made x: M rows of its k range rounded up to the tile's k step
 * (the longest range of the split); 0 when the product should not make x itself. */
static size_t made_x_bytes(const struct ds_k_x *x, int M, int K, int split, int *ret_ld)
{
    const int BK = 128;
    int KQ = k_chunks(K);
    int range = range_chunks(KQ, split) * GM_KQ;
    int ld = (range + BK - 1) / BK * BK;
    size_t bytes = (size_t)M * ld * 2;
    int ld_src = x->kind == DS_K_X_SWIGLU ? 2 * K : K;
    size_t max_bytes = x->kind == DS_K_X_SWIGLU ? GM_SWIGLU_XS_MAX : GM_XS_MAX;
    if (M > GM_X_ROWS || bytes > max_bytes || K % 4 || ((uintptr_t)x->src & 15) ||
        (x->kind == DS_K_X_RMSNORM && ((uintptr_t)x->norm_w & 15)) || ld_src % 4)
        return 0;
    *ret_ld = ld;
    return bytes;
}

extern "C" cudaError_t ds_k_gemm_bf16_x(struct ds_k_gemm_lt *lt, const struct ds_k_x *x, const uint16_t *w, int M,
                                        int N, int K, int split, float *ws, float *y, int ldy, int accumulate,
                                        cudaStream_t stream)
{
    if (x->kind != DS_K_X_BF16 && (x->ldx != K || !x->src || (x->kind == DS_K_X_RMSNORM && !x->norm_w)))
        return cudaErrorInvalidValue;
    int xs_ld = 0;
    size_t xs = x->kind != DS_K_X_BF16 && M > 0 && M <= 16 && !(lt && lt_takes(M, split, true)) &&
                        split_fits(K, split) && K % 8 == 0 && N > 0 && ldy >= N && (split == 1 || ws)
                    ? made_x_bytes(x, M, K, split, &xs_ld)
                    : 0;
    if (!xs) {   /* the rows first, then the product */
        cudaError_t e = ds_k_x_make(x, M, K, stream);
        if (e != cudaSuccess)
            return e;
        return ds_k_gemm_bf16(lt, x->x, x->ldx, w, M, N, K, split, ws, y, ldy, accumulate, stream);
    }
    x_src in = {x->src, x->norm_w, x->eps, x->kind == DS_K_X_SWIGLU ? 2 * K : K, xs_ld};
    int fused = 0;
    cudaError_t e = x->kind == DS_K_X_RMSNORM
                        ? gemm_launch<16, 64, 128, 1, 4, 3, DS_K_X_RMSNORM>(NULL, K, w, M, N, K, split, ws, y, ldy,
                                                                            accumulate, stream, &fused, in, xs)
                        : gemm_launch<16, 64, 128, 1, 4, 3, DS_K_X_SWIGLU>(NULL, K, w, M, N, K, split, ws, y, ldy,
                                                                           accumulate, stream, &fused, in, xs);
    if (e != cudaSuccess || split == 1 || fused)
        return e;
    return gemm_reduce(M, N, split, ws, y, ldy, accumulate, stream);
}
