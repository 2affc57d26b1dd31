/* draft.cu: the kernels only the DSpark draft needs: bf16 staging of
 * gathered rows (context features, Markov inputs), the gated and rnn Markov
 * heads' element-wise parts, and the confidence head's dot product. The
 * products around them run through gemm.cu. */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "kernels.h"

#define ROW_THREADS 256

__device__ static inline uint16_t f32_to_bf16_bits(float f)
{
    __nv_bfloat16 b = __float2bfloat16_rn(f);
    return *(uint16_t *)&b;
}

__device__ static inline float bf16_bits_to_f32(uint16_t u)
{
    return __uint_as_float((uint32_t)u << 16);
}

/* ---- row staging ---- */
__global__ static void gather_bf16_kernel(const float *x, int ldx, const int32_t *rows, int w, uint16_t *out, int ldo)
{
    int i = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    const float *src = x + (size_t)(rows ? rows[i] : i) * ldx;
    if (c < w)
        out[(size_t)i * ldo + c] = f32_to_bf16_bits(src[c]);
}

/* The same, four columns a thread: float4 in, four bf16 out in one 8-byte store
 * (rows and leading dimensions in whole groups of four, both bases aligned). */
__global__ static void gather_bf16_x4_kernel(const float *x, int ldx, const int32_t *rows, int w4, uint16_t *out,
                                             int ldo)
{
    int i = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    const float4 *src = (const float4 *)(x + (size_t)(rows ? rows[i] : i) * ldx);
    if (c < w4) {
        float4 v = src[c];
        uint2 o;
        o.x = (uint32_t)f32_to_bf16_bits(v.x) | (uint32_t)f32_to_bf16_bits(v.y) << 16;
        o.y = (uint32_t)f32_to_bf16_bits(v.z) | (uint32_t)f32_to_bf16_bits(v.w) << 16;
        ((uint2 *)(out + (size_t)i * ldo))[c] = o;
    }
}

extern "C" cudaError_t ds_k_gather_bf16(const float *x, int ldx, const int32_t *rows, int n, int w, uint16_t *out,
                                        int ldo, cudaStream_t stream)
{
    if (n < 0 || w <= 0 || ldx < w || ldo < w || n > 65535)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    if (w % 4 == 0 && ldx % 4 == 0 && ldo % 4 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)out % 8 == 0) {
        int w4 = w / 4;
        dim3 grid4((unsigned)((w4 + ROW_THREADS - 1) / ROW_THREADS), (unsigned)n);
        gather_bf16_x4_kernel<<<grid4, ROW_THREADS, 0, stream>>>(x, ldx, rows, w4, out, ldo);
        return cudaGetLastError();
    }
    dim3 grid((unsigned)((w + ROW_THREADS - 1) / ROW_THREADS), (unsigned)n);
    gather_bf16_kernel<<<grid, ROW_THREADS, 0, stream>>>(x, ldx, rows, w, out, ldo);
    return cudaGetLastError();
}

__global__ static void table_rows_kernel(const uint16_t *table, const int32_t *ids, int w, int V, uint16_t *out,
                                         int ldo)
{
    int i = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    int id = ids[i];
    if (c < w)
        out[(size_t)i * ldo + c] = id >= 0 && id < V ? table[(size_t)id * w + c] : (uint16_t)0;
}

extern "C" cudaError_t ds_k_table_rows_bf16(const uint16_t *table, const int32_t *ids, int n, int w, int V,
                                            uint16_t *out, int ldo, cudaStream_t stream)
{
    if (n < 0 || w <= 0 || V <= 0 || ldo < w || n > 65535)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    dim3 grid((unsigned)((w + ROW_THREADS - 1) / ROW_THREADS), (unsigned)n);
    table_rows_kernel<<<grid, ROW_THREADS, 0, stream>>>(table, ids, w, V, out, ldo);
    return cudaGetLastError();
}

/* ---- Markov heads ---- */
__global__ static void markov_gated_kernel(const float *mid, const float *bias, const uint16_t *w1,
                                           const int32_t *prev, int r, int V, uint16_t *out)
{
    int i = blockIdx.y, q = blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= r)
        return;
    int id = prev[i];
    float e = id >= 0 && id < V ? bf16_bits_to_f32(w1[(size_t)id * r + q]) : 0.0f;
    float g = 1.0f / (1.0f + expf(-(mid[(size_t)i * r + q] + bias[q])));
    out[(size_t)i * r + q] = f32_to_bf16_bits(g * e);
}

extern "C" cudaError_t ds_k_markov_gated(const float *mid, const float *bias, const uint16_t *w1, const int32_t *prev,
                                         int n, int r, int V, uint16_t *out, cudaStream_t stream)
{
    if (n < 0 || r <= 0 || n > 65535)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    dim3 grid((unsigned)((r + ROW_THREADS - 1) / ROW_THREADS), (unsigned)n);
    markov_gated_kernel<<<grid, ROW_THREADS, 0, stream>>>(mid, bias, w1, prev, r, V, out);
    return cudaGetLastError();
}

__global__ static void markov_rnn_kernel(const float *mid, const float *bias, float *state, int r, uint16_t *out)
{
    int i = blockIdx.y, q = blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= r)
        return;
    const float *m3 = mid + (size_t)i * 3 * r;
    float gr = 1.0f / (1.0f + expf(-(m3[q] + bias[q])));
    float cr = tanhf(m3[r + q] + bias[r + q]);
    float orr = tanhf(m3[2 * r + q] + bias[2 * r + q]);
    float *st = state + (size_t)i * r;
    st[q] = gr * st[q] + (1.0f - gr) * cr;
    out[(size_t)i * r + q] = f32_to_bf16_bits(orr);
}

extern "C" cudaError_t ds_k_markov_rnn(const float *mid, const float *bias, float *state, int n, int r, uint16_t *out,
                                       cudaStream_t stream)
{
    if (n < 0 || r <= 0 || n > 65535)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    dim3 grid((unsigned)((r + ROW_THREADS - 1) / ROW_THREADS), (unsigned)n);
    markov_rnn_kernel<<<grid, ROW_THREADS, 0, stream>>>(mid, bias, state, r, out);
    return cudaGetLastError();
}

/* ---- confidence head ---- */
/* One block per row: z = w[0:H]·h + w[H:H+r]·w1[prev] + b, summed per thread in
 * index order then over the threads in a fixed tree. */
__global__ static void confidence_kernel(const float *h, int ldh, const float *w, const uint16_t *w1,
                                         const int32_t *prev, int H, int r, int V, float b, float *z)
{
    __shared__ float red[ROW_THREADS];
    int i = blockIdx.x;
    const float *hr = h + (size_t)i * ldh;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < H; c += blockDim.x)
        acc += w[c] * hr[c];
    if (r > 0) {
        int id = prev[i];
        if (id >= 0 && id < V)
            for (int c = threadIdx.x; c < r; c += blockDim.x)
                acc += w[H + c] * bf16_bits_to_f32(w1[(size_t)id * r + c]);
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = ROW_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s)
            red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        z[i] = red[0] + b;
}

extern "C" cudaError_t ds_k_confidence(const float *h, int ldh, const float *w, const uint16_t *w1,
                                       const int32_t *prev, int n, int H, int r, int V, float b, float *z,
                                       cudaStream_t stream)
{
    if (n < 0 || H <= 0 || r < 0 || ldh < H || (r > 0 && (!w1 || !prev)))
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    confidence_kernel<<<n, ROW_THREADS, 0, stream>>>(h, ldh, w, w1, prev, H, r, V, b, z);
    return cudaGetLastError();
}
