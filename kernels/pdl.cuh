/* pdl.cuh: programmatic dependent launch for the forward pass's kernels.
 *
 * A kernel launched with pdl_launch may start while the kernel before it in
 * the stream is still running; it must call pdl_enter() before it touches
 * anything an earlier kernel writes (the products request their first weight
 * tiles before it; q/k norm + RoPE computes its rotations from the
 * positions and frequencies, which only host copies before the pass write;
 * attention reads its runs from that metadata and asks L2 for its first
 * cache rows; nothing else does anything first). pdl_enter waits until
 * that kernel has finished and its writes are visible, then lets the next
 * kernel start launching in turn. What is saved is the launch
 * latency between consecutive small kernels (most of a decoding pass's
 * kernels are a few microseconds long). Arithmetic is unchanged. Kernels
 * that share no data with the kernel after them use its halves instead
 * (pdl_release first, pdl_wait last: the sampling distribution's two parts,
 * which then run together). Needs a
 * device of compute capability 9.0 and kernels compiled for it (pdl_enter is
 * empty below that); elsewhere both are plain launches and no-ops. */
#ifndef DS_PDL_CUH
#define DS_PDL_CUH

#include <utility>

#include <cuda_runtime.h>

__device__ static inline void pdl_enter(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* The halves of pdl_enter, for a kernel that shares no data with the kernel launched after it: pdl_release
 * lets that one start launching now; pdl_wait waits until the kernel before this one has finished and its
 * writes are visible (at once when this one was not launched programmatically). */
__device__ static inline void pdl_release(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ static inline void pdl_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/* Whether the device takes programmatic launches and the kernel's code waits (compiled for compute
 * capability 9.0 or later). One device and one build per process: one answer. */
static inline bool pdl_usable(const void *kernel)
{
    static int usable = -1;
    if (usable < 0) {
        int dev = 0, major = 0;
        cudaFuncAttributes fa;
        usable = cudaGetDevice(&dev) == cudaSuccess &&
                 cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 &&
                 cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.ptxVersion >= 90;
    }
    return usable == 1;
}

template <typename... P, typename... A>
static cudaError_t pdl_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                              A &&...args)
{
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = pdl_usable((const void *)kernel) ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}

#endif
