/* rowmath.cuh: the arithmetic of RMSNorm and SwiGLU, in the one order that
 * every kernel computing them follows (rowwise.cu's row kernels, and the
 * products of gemm.cu that make their bf16 x on the way in). Two kernels that
 * call these functions give the same bits, so a fused kernel is
 * interchangeable with the separate ones and the forward stays
 * batch-invariant. */
#ifndef DS_ROWMATH_CUH
#define DS_ROWMATH_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define ROW_THREADS 256   /* rowwise.cu's block size, and the width of a row's fixed sum order */

/* W consecutive f32 read or written as one access (16 bytes for W = 4). */
template <int W> struct __align__(4 * W) f32s {
    float v[W];
};

__device__ static inline float rms_scale(float ss, int H, float eps)
{
    return (float)(1.0 / sqrt((double)ss / H + (double)eps));
}

/* A row's sum of squares (H % 4 == 0, the row 16-byte aligned) in one fixed
 * order whatever the block size B (a multiple of 32 that divides ROW_THREADS):
 * virtual thread v < ROW_THREADS sums the float4 chunks v, v + ROW_THREADS,
 * ... in turn; each 32 virtual threads sum by a butterfly; then the
 * ROW_THREADS / 32 sums add in order. Every thread gets the value. red holds
 * ROW_THREADS / 32 floats. */
template <int B> __device__ static inline float row_sumsq4(const float *xr, int H, float *red)
{
    const float4 *x4 = (const float4 *)xr;
    __syncthreads();   /* red may still be read by an earlier call */
#pragma unroll
    for (int v0 = 0; v0 < ROW_THREADS; v0 += B) {
        float ss = 0.0f;
#pragma unroll 4
        for (int i = v0 + threadIdx.x; i < H / 4; i += ROW_THREADS) {
            float4 v = x4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        for (int o = 16; o > 0; o >>= 1)
            ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if ((threadIdx.x & 31) == 0)
            red[(v0 + threadIdx.x) >> 5] = ss;
    }
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < ROW_THREADS / 32; i++)
        s += red[i];
    return s;
}

/* Four normalized elements x · scale · w, rounded to bf16. */
__device__ static inline void rms_bf16x4(float4 v, float4 g, float scale, __nv_bfloat162 *out /* [2] */)
{
    out[0] = __floats2bfloat162_rn(g.x * (v.x * scale), g.y * (v.y * scale));
    out[1] = __floats2bfloat162_rn(g.z * (v.z * scale), g.w * (v.w * scale));
}

/* SwiGLU of one gate and up value: silu(g) · u. */
__device__ static inline float silu_mul(float g, float u)
{
    return g / (1.0f + expf(-g)) * u;
}

#endif
