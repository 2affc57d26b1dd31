/* cluster.cuh: the launch configuration of a kernel whose blocks run in
 * clusters (thread block clusters, compute capability 9.0), for
 * cudaLaunchKernelEx. The kernels that use it cut a row into slices, one a
 * block of a cluster, and combine the blocks' results through distributed
 * shared memory in rank order. */
#ifndef DS_CLUSTER_CUH
#define DS_CLUSTER_CUH

#include <cuda_runtime.h>

/* `blocks` blocks of `threads` threads (a multiple of c) in clusters of c along x, each block with `bytes`
 * of dynamic shared memory; attr is the cluster attribute the configuration points to. */
static inline cudaLaunchConfig_t cluster_config(int c, unsigned blocks, unsigned threads, size_t bytes,
                                                cudaStream_t stream, cudaLaunchAttribute *attr)
{
    attr->id = cudaLaunchAttributeClusterDimension;
    attr->val.clusterDim.x = (unsigned)c;
    attr->val.clusterDim.y = 1;
    attr->val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = bytes;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cfg;
}

#endif
