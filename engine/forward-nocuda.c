/* forward-nocuda.c: the CUDA backend's functions in a build without CUDA
 * (configure without --with-cuda): each fails with DS_ENOTSUP, and
 * ds_cuda_available() is false, so `--backend auto` picks the CPU. */
#include "config.h"

#include <stdio.h>

#include "dspark/ds-cuda.h"

bool ds_cuda_available(void)
{
    return false;
}
void ds_cuda_describe(int device, char *buf, size_t cap)
{
    (void)device;
    snprintf(buf, cap, "this build has no CUDA backend (configure --with-cuda)");
}
static int nocuda(void)
{
    return ds_seterr(DS_ENOTSUP, "this build has no CUDA backend (configure --with-cuda)");
}
int ds_cuda_target_new(const struct ds_model *m, const struct ds_cuda_opts *o, struct ds_cuda_target **ret)
{
    return nocuda();
}
int ds_cuda_target_new_random(const struct ds_qwen3_config *cfg, uint64_t seed, const struct ds_cuda_opts *o,
                              struct ds_cuda_target **ret)
{
    return nocuda();
}
struct ds_cuda_target *ds_cuda_target_free(struct ds_cuda_target *t)
{
    return NULL;
}
int ds_cuda_set_cublas(struct ds_cuda_target *t, bool cublas)
{
    return nocuda();
}
size_t ds_cuda_weight_bytes(const struct ds_cuda_target *t)
{
    return 0;
}
size_t ds_cuda_page_bytes(const struct ds_cuda_target *t, int page_size)
{
    return 0;
}
long ds_cuda_pages_for_memory(const struct ds_cuda_target *t, int page_size, double fraction, int max_tokens)
{
    return 0;
}
int ds_cuda_kv_alloc(struct ds_cuda_target *t, int n_pages, int page_size, int max_pages_per_seq)
{
    return nocuda();
}
int ds_cuda_kv_fill_random(struct ds_cuda_target *t, uint64_t seed)
{
    return nocuda();
}
int ds_cuda_reserve(struct ds_cuda_target *t, int max_tokens, int max_seqs, int n_capture)
{
    return nocuda();
}
int ds_cuda_forward(struct ds_cuda_target *t, const struct ds_kv_pool *pool, const struct ds_batch *b)
{
    return nocuda();
}
int ds_cuda_time_forward(struct ds_cuda_target *t, const struct ds_kv_pool *pool, const struct ds_batch *b, int reps,
                         bool graph, double *ret_ms)
{
    return nocuda();
}
int ds_cuda_copy_bandwidth(size_t bytes, int reps, double *ret_bps)
{
    return nocuda();
}

