/* smoke.cu: placeholder translation unit until the CUDA backend lands; it proves
 * that nvcc and the build rules work in CI (where there is no GPU to run it). */
#include <cuda_runtime.h>

extern "C" cudaError_t ds_k_fill_f32(float *dst /* [n] */, float value, long n, cudaStream_t stream);

__global__ static void fill_f32(float *dst, float value, long n)
{
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        dst[i] = value;
}

extern "C" cudaError_t ds_k_fill_f32(float *dst, float value, long n, cudaStream_t stream)
{
    if (n <= 0)
        return cudaSuccess;
    fill_f32<<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(dst, value, n);
    return cudaGetLastError();
}
