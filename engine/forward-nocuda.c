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
int ds_cuda_set_products(struct ds_cuda_target *t, bool cublas, bool kernels_only)
{
    return nocuda();
}
void ds_cuda_set_in_turn_rows(struct ds_cuda_target *t, int min_rows)
{
}
size_t ds_cuda_weight_bytes(const struct ds_cuda_target *t)
{
    return 0;
}
size_t ds_cuda_page_bytes(const struct ds_cuda_target *t, int page_size)
{
    return 0;
}
long ds_cuda_pages_for_memory(const struct ds_cuda_target *t, int page_size, double fraction, int max_tokens,
                              size_t extra_page_bytes)
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
int ds_cuda_sync(struct ds_cuda_target *t)
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
size_t ds_cuda_draft_page_bytes(const struct ds_draft *d, int page_size)
{
    return 0;
}
int ds_cuda_draft_new(struct ds_cuda_target *t, const struct ds_draft *d, int max_seqs, struct ds_cuda_draft **ret)
{
    return nocuda();
}
int ds_cuda_draft_new_random(struct ds_cuda_target *t, const struct ds_dspark_config *cfg, uint64_t seed,
                             int max_seqs, struct ds_cuda_draft **ret)
{
    return nocuda();
}
struct ds_cuda_draft *ds_cuda_draft_free(struct ds_cuda_draft *g)
{
    return NULL;
}
int ds_cuda_draft_context(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int n, const int32_t *rows,
                          struct ds_kv_seq *const *kv, const int32_t *pos)
{
    return nocuda();
}
int ds_cuda_draft_block(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R, struct ds_kv_seq *const *kv,
                        const int32_t *anchor, const int32_t *start)
{
    return nocuda();
}
int ds_cuda_draft_step(struct ds_cuda_draft *g, int k, const int32_t *prev, int32_t *ids, float *z, float *logits)
{
    return nocuda();
}
int ds_cuda_draft_greedy(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R, struct ds_kv_seq *const *kv,
                         const int32_t *anchor, const int32_t *start, int32_t *drafts, float *z, float *p)
{
    return nocuda();
}
int ds_cuda_draft_sample(struct ds_cuda_draft *g, const struct ds_kv_pool *pool, int R, struct ds_kv_seq *const *kv,
                         const int32_t *anchor, const int32_t *start, const struct ds_sampling *s, int32_t *drafts,
                         float *z, float *p)
{
    return nocuda();
}
int ds_cuda_sample(struct ds_cuda_target *t, const struct ds_cuda_draft *g, int n, const struct ds_cuda_chain *c,
                   int32_t *accepted, int32_t *next)
{
    return nocuda();
}
uint64_t ds_cuda_logits_to_host(const struct ds_cuda_target *t)
{
    return 0;
}
void ds_cuda_verify_rows(const struct ds_cuda_target *t, uint64_t *rows, uint64_t *distributions)
{
    *rows = 0;
    *distributions = 0;
}
