/* kv.c: the paged KV cache pool. A sequence owns a list of page ids; rolling
 * back rejected tokens only moves its length (and returns whole pages no
 * longer needed). Pages are handed out from a stack of free ids. */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "dspark/ds-model.h"

int ds_kv_pool_init_pages(struct ds_kv_pool *pool, int n_layers, int n_kv_heads, int head_dim, int page_size,
                          int n_pages)
{
    memset(pool, 0, sizeof *pool);
    if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0 || page_size <= 0 || n_pages <= 0)
        return ds_seterr(DS_EINVAL, "KV pool shape is invalid (%d layers, %d heads, %d dims, %d x %d pages)",
                         n_layers, n_kv_heads, head_dim, n_pages, page_size);
    pool->free_pages = malloc((size_t)n_pages * sizeof(int32_t));
    if (!pool->free_pages)
        return ds_seterr(DS_ENOMEM, "could not allocate the list of %d KV pages", n_pages);
    pool->n_layers = n_layers;
    pool->n_kv_heads = n_kv_heads;
    pool->head_dim = head_dim;
    pool->page_size = page_size;
    pool->n_pages = n_pages;
    /* pop from the end: page 0 first */
    for (int i = 0; i < n_pages; i++)
        pool->free_pages[i] = n_pages - 1 - i;
    pool->n_free = n_pages;
    return 0;
}

int ds_kv_pool_init(struct ds_kv_pool *pool, int n_layers, int n_kv_heads, int head_dim, int page_size,
                    int n_pages)
{
    int r = ds_kv_pool_init_pages(pool, n_layers, n_kv_heads, head_dim, page_size, n_pages);
    if (r < 0)
        return r;
    size_t n = (size_t)n_layers * n_pages * page_size * n_kv_heads * head_dim;
    pool->k = malloc(n * sizeof(float));
    pool->v = malloc(n * sizeof(float));
    if (!pool->k || !pool->v) {
        ds_kv_pool_done(pool);
        return ds_seterr(DS_ENOMEM, "could not allocate a KV cache of %zu MB", 2 * n * sizeof(float) >> 20);
    }
    return 0;
}

void ds_kv_pool_done(struct ds_kv_pool *pool)
{
    if (!pool)
        return;
    free(pool->k);
    free(pool->v);
    free(pool->free_pages);
    memset(pool, 0, sizeof *pool);
}

int ds_kv_pages_for(const struct ds_kv_pool *pool, int n)
{
    return (n + pool->page_size - 1) / pool->page_size;
}

int ds_kv_reserve(struct ds_kv_pool *pool, struct ds_kv_seq *seq, int n)
{
    int need = ds_kv_pages_for(pool, n) - seq->n_pages;
    if (need <= 0)
        return 0;
    if (need > pool->n_free)
        return ds_seterr(DS_ELIMIT, "KV cache is full (%d pages needed, %d free)", need, pool->n_free);
    if (seq->n_pages + need > seq->cap) {
        int cap = seq->cap ? seq->cap : 4;
        while (cap < seq->n_pages + need)
            cap *= 2;
        seq->pages = ds_xrealloc(seq->pages, (size_t)cap * sizeof *seq->pages);
        seq->cap = cap;
    }
    for (int i = 0; i < need; i++)
        seq->pages[seq->n_pages++] = pool->free_pages[--pool->n_free];
    return 0;
}

void ds_kv_truncate(struct ds_kv_pool *pool, struct ds_kv_seq *seq, int len)
{
    if (len < 0)
        len = 0;
    seq->len = len;
    int keep = ds_kv_pages_for(pool, len);
    while (seq->n_pages > keep)
        pool->free_pages[pool->n_free++] = seq->pages[--seq->n_pages];
}

void ds_kv_release(struct ds_kv_pool *pool, struct ds_kv_seq *seq)
{
    ds_kv_truncate(pool, seq, 0);
    free(seq->pages);
    memset(seq, 0, sizeof *seq);
}
