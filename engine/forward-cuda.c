/* forward-cuda.c: the Qwen3 target on one GPU (the CUDA backend).
 *
 * The same pass as forward-cpu.c, with bf16 weights and a bf16 KV cache:
 *   x (f32 residual) → RMSNorm → bf16 → qkv product (f32) → q/k norm + RoPE →
 *   K/V appended to the pages → attention (bf16 out) → o product added to x →
 *   RMSNorm → bf16 → gate/up product → SwiGLU (bf16) → down product added to x.
 * Products run through the batch-invariant kernel of kernels/gemm.cu (or cuBLAS
 * when asked); every other kernel reduces in a fixed per-row order, so a
 * token's logits do not depend on what else is in its pass.
 *
 * A pass uploads its metadata (tokens, positions, sequence slots, logit rows,
 * page table) in one copy into fixed device buffers, so the device part is
 * the same launch sequence for every pass of a given shape and can be
 * captured once as a CUDA graph and replayed. */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "dspark/ds-cuda.h"
#include "cuda-impl.h"
#include "kernels.h"
#include "load-util.h"

bool ds_cuda_available(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

void ds_cuda_describe(int device, char *buf, size_t cap)
{
    struct cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) {
        snprintf(buf, cap, "no CUDA device %d (%s)", device, cudaGetErrorString(e));
        return;
    }
    snprintf(buf, cap, "%s, %.1f GiB, sm_%d%d, %d SMs", p.name, p.totalGlobalMem / 1073741824.0, p.major, p.minor,
             p.multiProcessorCount);
}

int ds_cu_alloc(void *ptr, size_t bytes, const char *what)
{
    void **p = ptr;
    *p = NULL;
    if (bytes == 0)
        return 0;
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        *p = NULL;
        return ds_seterr(DS_ENOMEM, "could not allocate %.1f MiB of GPU memory for %s: %s", bytes / 1048576.0, what,
                         cudaGetErrorString(e));
    }
    return 0;
}

int ds_cu_upload_f32(float **dst, const float *src, size_t n, const char *what)
{
    int r = ds_cu_alloc(dst, n * sizeof(float), what);
    if (r < 0 || n == 0)
        return r;
    CK(cudaMemcpy(*dst, src, n * sizeof(float), cudaMemcpyHostToDevice));
    return 0;
}

/* The k ranges of an [n, k] weight's products: the kernels' split for this GPU, at most opts.max_ranges. */
static int weight_split(const struct ds_cuda_target *t, int n, int k)
{
    return ds_k_gemm_split_at_most(ds_k_gemm_split(n, k, t->n_sm), k, t->opts.max_ranges);
}

/* Unpack a host panel matrix into bf16 rows on the device. */
int ds_cu_upload_mat(struct ds_cuda_target *t, struct cu_mat *dm, const struct ds_mat *hm, const char *what)
{
    dm->n = hm->n;
    dm->k = hm->k;
    dm->split = weight_split(t, hm->n, hm->k);
    size_t n = (size_t)hm->n * hm->k;
    int r = ds_cu_alloc(&dm->w, n * 2, what);
    if (r < 0)
        return r;
    float *row = malloc((size_t)hm->k * sizeof(float));
    uint16_t *buf = malloc(n * 2);
    if (!row || !buf) {
        free(row);
        free(buf);
        return ds_seterr(DS_ENOMEM, "could not stage %s for the GPU", what);
    }
    for (int i = 0; i < hm->n; i++) {
        ds_mat_row(hm, i, row);
        for (int j = 0; j < hm->k; j++)
            buf[(size_t)i * hm->k + j] = ds_f32_to_bf16(row[j]);
    }
    cudaError_t e = cudaMemcpy(dm->w, buf, n * 2, cudaMemcpyHostToDevice);
    free(row);
    free(buf);
    if (e != cudaSuccess)
        return ds_seterr(DS_ECUDA, "uploading %s: %s", what, cudaGetErrorString(e));
    t->weight_bytes += n * 2;
    return 0;
}

int ds_cu_upload_bf16(struct ds_cuda_target *t, uint16_t **dst, const float *src, size_t n, const char *what)
{
    uint16_t *buf = malloc(n * 2);
    if (!buf)
        return ds_seterr(DS_ENOMEM, "could not stage %s for the GPU", what);
    for (size_t i = 0; i < n; i++)
        buf[i] = ds_f32_to_bf16(src[i]);
    int r = ds_cu_alloc(dst, n * 2, what);
    if (r == 0 && cudaMemcpy(*dst, buf, n * 2, cudaMemcpyHostToDevice) != cudaSuccess)
        r = ds_seterr(DS_ECUDA, "uploading %s failed", what);
    free(buf);
    if (r == 0)
        t->weight_bytes += n * 2;
    return r;
}

int ds_cu_random_mat(struct ds_cuda_target *t, struct cu_mat *dm, int n, int k, uint64_t seed, const char *what)
{
    dm->n = n;
    dm->k = k;
    dm->split = weight_split(t, n, k);
    int r = ds_cu_alloc(&dm->w, (size_t)n * k * 2, what);
    if (r < 0)
        return r;
    CK(ds_k_fill_uniform_bf16(dm->w, (size_t)n * k, seed, 0.0f, 1.0f / sqrtf((float)k), t->stream));
    t->weight_bytes += (size_t)n * k * 2;
    return 0;
}

int ds_cu_random_vec(struct ds_cuda_target *t, float **dst, size_t n, uint64_t seed, float center, float scale,
                     const char *what)
{
    int r = ds_cu_alloc(dst, n * sizeof(float), what);
    if (r < 0)
        return r;
    CK(ds_k_fill_uniform_f32(*dst, n, seed, center, scale, t->stream));
    return 0;
}

void ds_cu_layer_free(struct cu_layer *l)
{
    cudaFree(l->attn_norm);
    cudaFree(l->ffn_norm);
    cudaFree(l->q_norm);
    cudaFree(l->k_norm);
    cudaFree(l->qkv_bias);
    cudaFree(l->o_bias);
    cudaFree(l->qkv.w);
    cudaFree(l->o.w);
    cudaFree(l->gate_up.w);
    cudaFree(l->down.w);
}

static int check_shape(const struct ds_qwen3_config *c)
{
    int qkv = (c->num_attention_heads + 2 * c->num_key_value_heads) * c->head_dim;
    if (c->hidden_size % 8 || c->intermediate_size % 8 || (c->num_attention_heads * c->head_dim) % 8 || qkv % 8)
        return ds_seterr(DS_ENOTSUP,
                         "the CUDA backend needs hidden_size, intermediate_size and the attention widths to be "
                         "multiples of 8 (hidden %d, intermediate %d, heads %d x %d)",
                         c->hidden_size, c->intermediate_size, c->num_attention_heads, c->head_dim);
    if (c->head_dim > 256 || c->head_dim % 8)
        return ds_seterr(DS_ENOTSUP, "the CUDA backend supports head_dim up to 256 in multiples of 8 (model has %d)",
                         c->head_dim);
    return 0;
}

static int cublas_init(struct ds_cuda_target *t)
{
    if (t->cublas)
        return 0;
    cublasStatus_t s = cublasCreate(&t->cublas);
    if (s != CUBLAS_STATUS_SUCCESS)
        return ds_seterr(DS_ECUBLAS, "cublasCreate failed (status %d)", (int)s);
    cublasSetStream(t->cublas, t->stream);
    /* a fixed workspace, so that products can be captured in graphs */
    void *ws = NULL;
    CK(cudaMalloc(&ws, 32u << 20));
    t->cublas_ws = ws;
    cublasSetWorkspace(t->cublas, ws, 32u << 20);
    return 0;
}

static int target_init(const struct ds_qwen3_config *cfg, const struct ds_cuda_opts *o, struct ds_cuda_target **ret)
{
    int r = check_shape(cfg);
    if (r < 0)
        return r;
    struct ds_cuda_target *t = ds_xcalloc(1, sizeof *t);
    t->cfg = *cfg;
    t->opts = o ? *o : (struct ds_cuda_opts){0};
    *ret = t;
    CK(cudaSetDevice(t->opts.device));
    struct cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, t->opts.device));
    t->n_sm = p.multiProcessorCount;
    CK(cudaStreamCreateWithFlags(&t->stream, cudaStreamNonBlocking));
    CK(cudaEventCreateWithFlags(&t->meta_sent, cudaEventDisableTiming));
    if (t->opts.cublas && (r = cublas_init(t)) < 0)
        return r;
    if (ds_k_gemm_lt_create(&t->lt) != cudaSuccess) {   /* the kernels alone then: same bits, slower */
        t->lt = NULL;
        cudaGetLastError();
    }
    t->layers = ds_xcalloc((size_t)cfg->num_hidden_layers, sizeof *t->layers);
    size_t half = (size_t)cfg->head_dim / 2;
    float *inv = ds_xmalloc(half * sizeof(float));
    for (size_t i = 0; i < half; i++)   /* as model.c (and transformers): in f32 */
        inv[i] = 1.0f / powf((float)cfg->rope_theta, (float)(2 * i) / (float)cfg->head_dim);
    r = ds_cu_upload_f32(&t->inv_freq, inv, half, "RoPE frequencies");
    free(inv);
    return r;
}

/* Stack [rows_i, k] tensors of the checkpoint into one bf16 matrix on the device,
 * converting a block of rows at a time (bf16 tensors are copied as they are). */
static int load_stacked(struct ds_cuda_target *t, const struct ds_st *st, const char *const *names,
                        const int64_t *rows, int n_parts, int64_t k, struct cu_mat *dm)
{
    int64_t total = 0;
    for (int i = 0; i < n_parts; i++)
        total += rows[i];
    dm->n = (int)total;
    dm->k = (int)k;
    dm->split = weight_split(t, dm->n, dm->k);
    int r = ds_cu_alloc(&dm->w, (size_t)total * k * 2, names[0]);
    if (r < 0)
        return r;
    const size_t block = 1u << 20;   /* elements per staging block */
    uint16_t *buf = malloc(block * 2);
    float *f = malloc(block * 4);
    if (!buf || !f) {
        free(buf);
        free(f);
        return ds_seterr(DS_ENOMEM, "could not stage tensors for the GPU");
    }
    size_t at = 0;   /* elements written so far */
    for (int i = 0; i < n_parts && r == 0; i++) {
        const struct ds_tensor *tt;
        int64_t shape[2] = {rows[i], k};
        if ((r = ds_st_get(st, names[i], 2, shape, &tt)) < 0)
            break;
        for (size_t off = 0; off < (size_t)tt->numel && r == 0; off += block) {
            size_t cnt = (size_t)tt->numel - off < block ? (size_t)tt->numel - off : block;
            if (tt->dtype == DS_DTYPE_BF16) {
                memcpy(buf, (const uint16_t *)tt->data + off, cnt * 2);
            } else {
                ds_tensor_to_f32(tt, off, cnt, f);
                for (size_t j = 0; j < cnt; j++)
                    buf[j] = ds_f32_to_bf16(f[j]);
            }
            cudaError_t e = cudaMemcpy(dm->w + at + off, buf, cnt * 2, cudaMemcpyHostToDevice);
            if (e != cudaSuccess)
                r = ds_seterr(DS_ECUDA, "uploading '%s': %s", names[i], cudaGetErrorString(e));
        }
        at += (size_t)tt->numel;
    }
    free(buf);
    free(f);
    if (r == 0)
        t->weight_bytes += (size_t)total * k * 2;
    return r;
}

static int upload_vec_file(const struct ds_st *st, const char *name, int64_t n, float **dst)
{
    float *h = NULL;
    int r = ds_load_vec(st, name, n, &h);
    if (r == 0)
        r = ds_cu_upload_f32(dst, h, (size_t)n, name);
    free(h);
    return r;
}

/* The layers of a model loaded with skip_layers, read from its checkpoint. */
static int load_layers(struct ds_cuda_target *t, const struct ds_model *m)
{
    const struct ds_qwen3_config *c = &m->cfg;
    struct ds_st *st = NULL;
    int r = ds_st_open_dir(m->dir, &st);
    int64_t H = c->hidden_size, I = c->intermediate_size, hd = c->head_dim;
    int64_t q_rows = (int64_t)c->num_attention_heads * hd, kv_rows = (int64_t)c->num_key_value_heads * hd;
    for (int li = 0; li < c->num_hidden_layers && r == 0; li++) {
        struct cu_layer *dl = &t->layers[li];
        char n[4][160];
#define NAME(buf, suffix) snprintf(buf, sizeof buf, "model.layers.%d.%s", li, suffix)
        NAME(n[0], "input_layernorm.weight");
        NAME(n[1], "post_attention_layernorm.weight");
        NAME(n[2], "self_attn.q_norm.weight");
        NAME(n[3], "self_attn.k_norm.weight");
        if ((r = upload_vec_file(st, n[0], H, &dl->attn_norm)) < 0 ||
            (r = upload_vec_file(st, n[1], H, &dl->ffn_norm)) < 0 ||
            (r = upload_vec_file(st, n[2], hd, &dl->q_norm)) < 0 ||
            (r = upload_vec_file(st, n[3], hd, &dl->k_norm)) < 0)
            break;
        NAME(n[0], "self_attn.q_proj.weight");
        NAME(n[1], "self_attn.k_proj.weight");
        NAME(n[2], "self_attn.v_proj.weight");
        const char *qkv[3] = {n[0], n[1], n[2]};
        int64_t qkv_rows[3] = {q_rows, kv_rows, kv_rows};
        if ((r = load_stacked(t, st, qkv, qkv_rows, 3, H, &dl->qkv)) < 0)
            break;
        if (c->attention_bias) {
            float *all = NULL;
            NAME(n[0], "self_attn.q_proj.bias");
            NAME(n[1], "self_attn.k_proj.bias");
            NAME(n[2], "self_attn.v_proj.bias");
            if ((r = ds_load_concat(st, qkv, qkv_rows, 3, &all)) == 0)
                r = ds_cu_upload_f32(&dl->qkv_bias, all, (size_t)(q_rows + 2 * kv_rows), "biases");
            free(all);
            NAME(n[0], "self_attn.o_proj.bias");
            if (r == 0)
                r = upload_vec_file(st, n[0], H, &dl->o_bias);
            if (r < 0)
                break;
        }
        NAME(n[0], "self_attn.o_proj.weight");
        const char *o[1] = {n[0]};
        if ((r = load_stacked(t, st, o, &H, 1, q_rows, &dl->o)) < 0)
            break;
        NAME(n[0], "mlp.gate_proj.weight");
        NAME(n[1], "mlp.up_proj.weight");
        const char *gu[2] = {n[0], n[1]};
        int64_t gu_rows[2] = {I, I};
        if ((r = load_stacked(t, st, gu, gu_rows, 2, H, &dl->gate_up)) < 0)
            break;
        NAME(n[0], "mlp.down_proj.weight");
        const char *down[1] = {n[0]};
        if ((r = load_stacked(t, st, down, &H, 1, I, &dl->down)) < 0)
            break;
#undef NAME
    }
    ds_st_free(st);
    return r < 0 ? ds_prefixerr(r, "model '%s'", m->dir) : 0;
}

int ds_cuda_target_new(const struct ds_model *m, const struct ds_cuda_opts *o, struct ds_cuda_target **ret)
{
    struct ds_cuda_target *t = NULL;
    const struct ds_qwen3_config *c = &m->cfg;
    int r = target_init(c, o, &t);
    size_t H = c->hidden_size, hd = c->head_dim;
    size_t qkv = (c->num_attention_heads + 2 * (size_t)c->num_key_value_heads) * hd;
    if (r == 0)
        r = ds_cu_upload_bf16(t, &t->embed, m->embed, (size_t)c->vocab_size * H, "the embedding");
    if (r == 0 && !m->layers)
        r = load_layers(t, m);
    for (int li = 0; li < c->num_hidden_layers && r == 0 && m->layers; li++) {
        const struct ds_layer *hl = &m->layers[li];
        struct cu_layer *dl = &t->layers[li];
        if ((r = ds_cu_upload_f32(&dl->attn_norm, hl->attn_norm, H, "norm weights")) < 0 ||
            (r = ds_cu_upload_f32(&dl->ffn_norm, hl->ffn_norm, H, "norm weights")) < 0 ||
            (r = ds_cu_upload_f32(&dl->q_norm, hl->q_norm, hd, "norm weights")) < 0 ||
            (r = ds_cu_upload_f32(&dl->k_norm, hl->k_norm, hd, "norm weights")) < 0 ||
            (hl->qkv_bias && (r = ds_cu_upload_f32(&dl->qkv_bias, hl->qkv_bias, qkv, "biases")) < 0) ||
            (hl->o_bias && (r = ds_cu_upload_f32(&dl->o_bias, hl->o_bias, H, "biases")) < 0) ||
            (r = ds_cu_upload_mat(t, &dl->qkv, &hl->qkv, "q/k/v projections")) < 0 ||
            (r = ds_cu_upload_mat(t, &dl->o, &hl->o, "o projections")) < 0 ||
            (r = ds_cu_upload_mat(t, &dl->gate_up, &hl->gate_up, "gate/up projections")) < 0 ||
            (r = ds_cu_upload_mat(t, &dl->down, &hl->down, "down projections")) < 0)
            break;
    }
    if (r == 0)
        r = ds_cu_upload_f32(&t->final_norm, m->final_norm, H, "the final norm");
    if (r == 0) {
        if (c->tie_word_embeddings) {
            t->lm_head = (struct cu_mat){.w = t->embed, .n = c->vocab_size, .k = (int)H,
                                         .split = weight_split(t, c->vocab_size, (int)H)};
        } else {
            r = ds_cu_upload_mat(t, &t->lm_head, &m->lm_head, "the lm head");
        }
    }
    if (r < 0) {
        ds_cuda_target_free(t);
        return r;
    }
    *ret = t;
    return 0;
}

int ds_cuda_target_new_random(const struct ds_qwen3_config *c, uint64_t seed, const struct ds_cuda_opts *o,
                              struct ds_cuda_target **ret)
{
    struct ds_cuda_target *t = NULL;
    int r = target_init(c, o, &t);
    int H = c->hidden_size, hd = c->head_dim, I = c->intermediate_size;
    int qkv = (c->num_attention_heads + 2 * c->num_key_value_heads) * hd;
    if (r == 0 && (r = ds_cu_alloc(&t->embed, (size_t)c->vocab_size * H * 2, "the embedding")) == 0) {
        cudaError_t e = ds_k_fill_uniform_bf16(t->embed, (size_t)c->vocab_size * H, seed, 0.0f, 1.0f, t->stream);
        if (e != cudaSuccess)
            r = ds_seterr(DS_ECUDA, "filling the embedding: %s", cudaGetErrorString(e));
        t->weight_bytes += (size_t)c->vocab_size * H * 2;
    }
    for (int li = 0; li < c->num_hidden_layers && r == 0; li++) {
        struct cu_layer *dl = &t->layers[li];
        uint64_t s = seed + 1000 * (uint64_t)(li + 1);
        if ((r = ds_cu_random_vec(t, &dl->attn_norm, H, s + 1, 1.0f, 0.1f, "norm weights")) < 0 ||
            (r = ds_cu_random_vec(t, &dl->ffn_norm, H, s + 2, 1.0f, 0.1f, "norm weights")) < 0 ||
            (r = ds_cu_random_vec(t, &dl->q_norm, hd, s + 3, 1.0f, 0.1f, "norm weights")) < 0 ||
            (r = ds_cu_random_vec(t, &dl->k_norm, hd, s + 4, 1.0f, 0.1f, "norm weights")) < 0 ||
            (r = ds_cu_random_mat(t, &dl->qkv, qkv, H, s + 5, "q/k/v projections")) < 0 ||
            (r = ds_cu_random_mat(t, &dl->o, c->num_attention_heads * hd, H, s + 6, "o projections")) < 0 ||
            (r = ds_cu_random_mat(t, &dl->gate_up, 2 * I, H, s + 7, "gate/up projections")) < 0 ||
            (r = ds_cu_random_mat(t, &dl->down, H, I, s + 8, "down projections")) < 0)
            break;
        /* o maps nH hd -> H: its weight is [H, nH hd] */
        dl->o.n = H;
        dl->o.k = c->num_attention_heads * hd;
        dl->o.split = weight_split(t, dl->o.n, dl->o.k);
    }
    if (r == 0)
        r = ds_cu_random_vec(t, &t->final_norm, H, seed + 7, 1.0f, 0.1f, "the final norm");
    if (r == 0) {
        if (c->tie_word_embeddings)
            t->lm_head = (struct cu_mat){.w = t->embed, .n = c->vocab_size, .k = H,
                                         .split = weight_split(t, c->vocab_size, H)};
        else
            r = ds_cu_random_mat(t, &t->lm_head, c->vocab_size, H, seed + 9, "the lm head");
    }
    if (r == 0 && cudaStreamSynchronize(t->stream) != cudaSuccess)
        r = ds_seterr(DS_ECUDA, "making random weights failed");
    if (r < 0) {
        ds_cuda_target_free(t);
        return r;
    }
    *ret = t;
    return 0;
}

static void drop_graphs(struct ds_cuda_target *t)
{
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        if (t->graphs[i].exec)
            cudaGraphExecDestroy(t->graphs[i].exec);
        memset(&t->graphs[i], 0, sizeof t->graphs[i]);
    }
}

static void free_activations(struct ds_cuda_target *t)
{
    drop_graphs(t);
    cudaFree(t->x);
    cudaFree(t->xn);
    cudaFree(t->qkv);
    cudaFree(t->attn);
    cudaFree(t->gu);
    cudaFree(t->ws);
    cudaFree(t->att_ws);
    cudaFree(t->rows);
    cudaFree(t->logits);
    cudaFree(t->ids);
    cudaFree(t->captured);
    cudaFree(t->meta);
    cudaFreeHost(t->h_meta);
    cudaFree(t->samp);
    cudaFreeHost(t->h_samp);
    t->samp = t->h_samp = NULL;
    t->last_rows = 0;
    t->x = t->qkv = t->gu = t->ws = t->att_ws = t->logits = t->captured = NULL;
    t->xn = t->attn = t->rows = NULL;
    t->ids = NULL;
    t->meta = t->h_meta = NULL;
    t->cap_tokens = t->cap_rows = t->cap_seqs = t->cap_capture = 0;
    t->ws_floats = 0;
}

struct ds_cuda_target *ds_cuda_target_free(struct ds_cuda_target *t)
{
    if (!t)
        return NULL;
    if (t->stream)
        cudaStreamSynchronize(t->stream);
    free_activations(t);
    if (t->layers) {
        for (int i = 0; i < t->cfg.num_hidden_layers; i++)
            ds_cu_layer_free(&t->layers[i]);
        free(t->layers);
    }
    if (t->lm_head.w != t->embed)
        cudaFree(t->lm_head.w);
    cudaFree(t->embed);
    cudaFree(t->final_norm);
    cudaFree(t->inv_freq);
    cudaFree(t->k_cache);
    cudaFree(t->v_cache);
    if (t->cublas)
        cublasDestroy(t->cublas);
    cudaFree(t->cublas_ws);
    ds_k_gemm_lt_destroy(t->lt);
    if (t->meta_sent)
        cudaEventDestroy(t->meta_sent);
    if (t->stream)
        cudaStreamDestroy(t->stream);
    free(t);
    return NULL;
}

int ds_cuda_set_products(struct ds_cuda_target *t, bool cublas, bool kernels_only)
{
    int r = cublas ? cublas_init(t) : 0;
    if (r < 0)
        return r;
    cudaStreamSynchronize(t->stream);
    drop_graphs(t);
    t->opts.cublas = cublas;
    t->opts.kernels_only = kernels_only;
    return 0;
}

void ds_cuda_set_in_turn_rows(struct ds_cuda_target *t, int min_rows)
{
    cudaStreamSynchronize(t->stream);
    drop_graphs(t);
    ds_k_gemm_lt_set_in_turn_rows(t->lt, min_rows);
}

size_t ds_cuda_weight_bytes(const struct ds_cuda_target *t)
{
    return t->weight_bytes;
}

size_t ds_cuda_page_bytes(const struct ds_cuda_target *t, int page_size)
{
    return 2ull * t->cfg.num_hidden_layers * page_size * t->cfg.num_key_value_heads * t->cfg.head_dim * 2;
}

/* Device bytes of the activations for passes of n tokens (an upper bound). */
static size_t activation_bytes(const struct ds_qwen3_config *c, int n, int n_sm)
{
    size_t H = c->hidden_size, I = c->intermediate_size, hd = c->head_dim;
    size_t qkv = (c->num_attention_heads + 2 * (size_t)c->num_key_value_heads) * hd;
    size_t wide = qkv > 2 * I ? qkv : 2 * I;
    size_t per = H * 4 + (H > I ? H : I) * 2 + qkv * 4 + c->num_attention_heads * hd * 2 + 2 * I * 4 +
                 (size_t)c->vocab_size * 4 + H * 2 + 8 * H * 4 + 32 * wide * 4 +
                 ds_k_attention_workspace(1, c->num_attention_heads, (int)hd) * 4;
    (void)n_sm;
    return per * (size_t)n + (64u << 20);
}

long ds_cuda_pages_for_memory(const struct ds_cuda_target *t, int page_size, double fraction, int max_tokens,
                              size_t extra_page_bytes)
{
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess)
        return 0;
    double budget = fraction * (double)free_b - (double)activation_bytes(&t->cfg, max_tokens, t->n_sm);
    if (budget <= 0)
        return 0;
    return (long)(budget / (double)(ds_cuda_page_bytes(t, page_size) + extra_page_bytes));
}

int ds_cuda_kv_alloc(struct ds_cuda_target *t, int n_pages, int page_size, int max_pages_per_seq)
{
    if (n_pages <= 0 || page_size <= 0 || max_pages_per_seq <= 0)
        return ds_seterr(DS_EINVAL, "GPU KV cache shape is invalid (%d pages of %d)", n_pages, page_size);
    cudaFree(t->k_cache);
    cudaFree(t->v_cache);
    t->k_cache = t->v_cache = NULL;
    free_activations(t);   /* the page table's row length may change */
    size_t half = ds_cuda_page_bytes(t, page_size) / 2 * (size_t)n_pages;
    int r;
    if ((r = ds_cu_alloc(&t->k_cache, half, "the KV cache")) < 0 ||
        (r = ds_cu_alloc(&t->v_cache, half, "the KV cache")) < 0)
        return r;
    t->n_pages = n_pages;
    t->page_size = page_size;
    t->max_pages = max_pages_per_seq;
    return 0;
}

int ds_cuda_kv_fill_random(struct ds_cuda_target *t, uint64_t seed)
{
    size_t n = ds_cuda_page_bytes(t, t->page_size) / 4 * (size_t)t->n_pages;
    CK(ds_k_fill_uniform_bf16(t->k_cache, n, seed, 0.0f, 1.0f, t->stream));
    CK(ds_k_fill_uniform_bf16(t->v_cache, n, seed + 1, 0.0f, 1.0f, t->stream));
    CK(cudaStreamSynchronize(t->stream));
    return 0;
}

/* Where the parts of the sampling staging buffers lie, for cap rows. */
struct samp_layout {
    size_t rows, params, chains, chain_params, status, n_rows, accepted, next, bytes;
};

static size_t align16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

static struct samp_layout samp_layout(int cap)
{
    struct samp_layout l;
    l.rows = 0;
    l.params = align16(l.rows + (size_t)cap * sizeof(int32_t));
    l.chains = align16(l.params + (size_t)cap * sizeof(struct ds_k_sampling));
    l.chain_params = align16(l.chains + (size_t)cap * sizeof(struct ds_k_chain));
    l.status = align16(l.chain_params + (size_t)cap * sizeof(struct ds_k_sampling));
    l.n_rows = align16(l.status + (size_t)cap * DS_K_MAX_CHAIN);
    l.accepted = align16(l.n_rows + sizeof(int32_t));
    l.next = l.accepted + (size_t)cap * sizeof(int32_t);
    l.bytes = l.next + (size_t)cap * sizeof(int32_t);
    return l;
}

/* Grow the activation buffers (dropping captured graphs, which point into them). */
static int ensure_capacity(struct ds_cuda_target *t, int n, int n_rows, int n_seqs, int n_capture)
{
    if (n <= t->cap_tokens && n_rows <= t->cap_rows && n_seqs <= t->cap_seqs && n_capture <= t->cap_capture)
        return 0;
    const struct ds_qwen3_config *c = &t->cfg;
    int cn = n > t->cap_tokens ? n : t->cap_tokens;
    int cr = n_rows > t->cap_rows ? n_rows : t->cap_rows;
    int cs = n_seqs > t->cap_seqs ? n_seqs : t->cap_seqs;
    int cc = n_capture > t->cap_capture ? n_capture : t->cap_capture;
    /* round up, so that growing batches do not reallocate every pass */
    cn = cn < 64 ? 64 : (cn + 63) / 64 * 64;
    cr = cr < 64 ? 64 : (cr + 63) / 64 * 64;
    cs = cs < 64 ? 64 : (cs + 63) / 64 * 64;
    cudaStreamSynchronize(t->stream);
    free_activations(t);
    size_t H = c->hidden_size, I = c->intermediate_size, hd = c->head_dim, V = c->vocab_size;
    size_t qkv = (c->num_attention_heads + 2 * (size_t)c->num_key_value_heads) * hd;
    size_t nq = (size_t)c->num_attention_heads * hd;
    size_t widest_in = H > I ? H : I;
    /* split-k workspace: the largest split x rows x columns over the products */
    size_t ws = 0;
    for (int li = 0; li < c->num_hidden_layers; li++) {
        const struct cu_mat *ms[4] = {&t->layers[li].qkv, &t->layers[li].o, &t->layers[li].gate_up,
                                      &t->layers[li].down};
        for (int i = 0; i < 4; i++) {
            size_t w = ds_k_gemm_workspace(cn, ms[i]->n, ms[i]->split);
            if (w > ws)
                ws = w;
        }
    }
    size_t wl = ds_k_gemm_workspace(cr, t->lm_head.n, t->lm_head.split);
    if (wl > ws)
        ws = wl;

    t->meta_ints = META_PAGES(cn) + (size_t)cs * t->max_pages;
    int r;
    if ((r = ds_cu_alloc(&t->x, cn * H * 4, "activations")) < 0 ||
        (r = ds_cu_alloc(&t->xn, cn * widest_in * 2, "activations")) < 0 ||
        (r = ds_cu_alloc(&t->qkv, cn * qkv * 4, "activations")) < 0 ||
        (r = ds_cu_alloc(&t->attn, cn * nq * 2, "activations")) < 0 ||
        (r = ds_cu_alloc(&t->gu, cn * 2 * I * 4, "activations")) < 0 ||
        (r = ds_cu_alloc(&t->ws, ws * 4, "the product workspace")) < 0 ||
        (r = ds_cu_alloc(&t->att_ws, ds_k_attention_workspace(cn, c->num_attention_heads, (int)hd) * 4,
                       "the attention workspace")) < 0 ||
        (r = ds_cu_alloc(&t->rows, cr * H * 2, "activations")) < 0 ||
        (r = ds_cu_alloc(&t->logits, cr * V * 4, "logits")) < 0 ||
        (r = ds_cu_alloc(&t->ids, cr * 4, "token ids")) < 0 ||
        (cc > 0 && (r = ds_cu_alloc(&t->captured, (size_t)cn * cc * H * 4, "captured features")) < 0) ||
        (r = ds_cu_alloc(&t->meta, t->meta_ints * 4, "pass metadata")) < 0 ||
        (r = ds_cu_alloc(&t->samp, samp_layout((int)cr).bytes, "sampling parameters")) < 0)
        return r;
    CK(cudaMallocHost((void **)&t->h_meta, t->meta_ints * 4));
    CK(cudaMallocHost(&t->h_samp, samp_layout((int)cr).bytes));
    if (ws)
        CK(cudaMemset(t->ws, 0, ws * 4));   /* the product's tile counters start at zero */
    t->ws_floats = ws;
    t->cap_tokens = cn;
    t->cap_rows = cr;
    t->cap_seqs = cs;
    t->cap_capture = cc;
    return 0;
}

int ds_cuda_reserve(struct ds_cuda_target *t, int max_tokens, int max_seqs, int n_capture)
{
    if (!t->k_cache)
        return ds_seterr(DS_EINVAL, "allocate the GPU KV cache before the activations");
    return ensure_capacity(t, max_tokens, max_tokens, max_seqs, n_capture);
}

int ds_cu_gemm_x(struct ds_cuda_target *t, float *ws, const struct cu_mat *m, const struct ds_k_x *x, int M, float *y,
                 int ldy, bool accumulate)
{
    if (M == 0)
        return 0;
    if (t->opts.cublas) {
        CK(ds_k_x_make(x, M, m->k, t->stream));
        const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
        cublasStatus_t s = cublasGemmEx(t->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m->n, M, m->k, &one, m->w, CUDA_R_16BF,
                                        m->k, x->x, CUDA_R_16BF, x->ldx, &beta, y, CUDA_R_32F, ldy,
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (s != CUBLAS_STATUS_SUCCESS)
            return ds_seterr(DS_ECUBLAS, "cublasGemmEx (%d x %d x %d) failed with status %d", M, m->n, m->k, (int)s);
        return 0;
    }
    CK(ds_k_gemm_bf16_x(t->opts.kernels_only ? NULL : t->lt, x, m->w, M, m->n, m->k, m->split, ws, y, ldy,
                        accumulate, t->stream));
    return 0;
}

int ds_cu_gemm(struct ds_cuda_target *t, float *ws, const struct cu_mat *m, const uint16_t *x, int ldx, int M, float *y,
               int ldy, bool accumulate)
{
    struct ds_k_x in = {.kind = DS_K_X_BF16, .x = (uint16_t *)x, .ldx = ldx};
    return ds_cu_gemm_x(t, ws, m, &in, M, y, ldy, accumulate);
}

/* The device part of a pass; metadata is already in t->meta. Graph-capturable:
 * only kernel launches on t->stream. */
int ds_cu_enqueue_layer(struct ds_cuda_target *t, const struct cu_layer *l, uint16_t *kc, uint16_t *vc,
                        const struct cu_layer_pass *p)
{
    int n = p->n, H = p->H, I = p->I, nH = p->nH, nKV = p->nKV, hd = p->hd, r;
    int qkvw = (nH + 2 * nKV) * hd;
    float scale = 1.0f / sqrtf((float)hd);
    struct ds_k_x attn_in = {.kind = DS_K_X_RMSNORM, .x = p->xn, .ldx = H, .src = p->x, .norm_w = l->attn_norm,
                             .eps = p->eps};
    if ((r = ds_cu_gemm_x(t, p->ws, &l->qkv, &attn_in, n, p->qkv, qkvw, false)) < 0)
        return r;
    if (l->qkv_bias)
        CK(ds_k_add_bias(p->qkv, qkvw, l->qkv_bias, n, qkvw, t->stream));
    CK(ds_k_qk_norm_rope_append_bf16(p->qkv, qkvw, p->qkv + (size_t)nH * hd, qkvw, p->qkv + (size_t)(nH + nKV) * hd,
                                     qkvw, l->q_norm, l->k_norm, p->inv_freq, p->pos, p->seq, p->pages, t->max_pages,
                                     t->page_size, n, nH, nKV, hd, p->eps, kc, vc, t->stream));
    CK(ds_k_attention_bf16(p->qkv, qkvw, kc, vc, p->seq, p->att_pos, p->run_start, p->run_len, p->n_runs,
                           p->att_longest, p->pages, t->max_pages, t->page_size, n, nH, nKV, hd, scale, p->att_ws,
                           p->attn, t->stream));
    if ((r = ds_cu_gemm(t, p->ws, &l->o, p->attn, nH * hd, n, p->x, H, true)) < 0)
        return r;
    if (l->o_bias)
        CK(ds_k_add_bias(p->x, H, l->o_bias, n, H, t->stream));
    struct ds_k_x ffn_in = {.kind = DS_K_X_RMSNORM, .x = p->xn, .ldx = H, .src = p->x, .norm_w = l->ffn_norm,
                            .eps = p->eps};
    if ((r = ds_cu_gemm_x(t, p->ws, &l->gate_up, &ffn_in, n, p->gu, 2 * I, false)) < 0)
        return r;
    struct ds_k_x down_in = {.kind = DS_K_X_SWIGLU, .x = p->xn, .ldx = I, .src = p->gu};
    return ds_cu_gemm_x(t, p->ws, &l->down, &down_in, n, p->x, H, true);
}

/* Copy the residual stream after layer li (-1: the embeddings) into the
 * captured features of the draft layers it feeds ([n, n_capture, H]). */
static int capture_after(struct ds_cuda_target *t, int li, int n, int n_capture, const int32_t *capture_layers)
{
    size_t H = (size_t)t->cfg.hidden_size;
    for (int ci = 0; ci < n_capture; ci++)
        if (capture_layers[ci] == li)
            CK(cudaMemcpy2DAsync(t->captured + ci * H, n_capture * H * 4, t->x, H * 4, H * 4, n,
                                 cudaMemcpyDeviceToDevice, t->stream));
    return 0;
}

static int enqueue_pass(struct ds_cuda_target *t, int n, int n_rows, int n_capture, const int32_t *capture_layers,
                        bool argmax)
{
    const struct ds_qwen3_config *c = &t->cfg;
    int H = c->hidden_size, I = c->intermediate_size, hd = c->head_dim, V = c->vocab_size;
    int nH = c->num_attention_heads, nKV = c->num_key_value_heads;
    float eps = (float)c->rms_norm_eps;
    const int32_t *d_tok = t->meta, *d_pos = t->meta + t->cap_tokens, *d_seq = t->meta + 2 * t->cap_tokens;
    const int32_t *d_rows = t->meta + 3 * t->cap_tokens, *d_pages = t->meta + META_PAGES(t->cap_tokens);
    const int32_t *d_run_start = t->meta + 4 * t->cap_tokens, *d_run_len = t->meta + 5 * t->cap_tokens;
    const int32_t *d_n_runs = t->meta + 6 * t->cap_tokens;
    size_t layer_kv = (size_t)t->n_pages * t->page_size * nKV * hd;
    int r;

    CK(ds_k_embed_bf16(t->embed, d_tok, n, H, V, t->x, t->stream));
    if ((r = capture_after(t, -1, n, n_capture, capture_layers)) < 0)
        return r;
    struct cu_layer_pass lp = {.n = n, .H = H, .I = I, .nH = nH, .nKV = nKV, .hd = hd, .eps = eps, .x = t->x,
                               .xn = t->xn, .qkv = t->qkv, .attn = t->attn, .gu = t->gu, .ws = t->ws,
                               .att_ws = t->att_ws, .inv_freq = t->inv_freq, .seq = d_seq, .pos = d_pos,
                               .att_pos = d_pos, .run_start = d_run_start, .run_len = d_run_len, .n_runs = d_n_runs,
                               .pages = d_pages, .att_longest = t->att_longest};
    for (int li = 0; li < c->num_hidden_layers; li++) {
        if ((r = ds_cu_enqueue_layer(t, &t->layers[li], t->k_cache + (size_t)li * layer_kv,
                                     t->v_cache + (size_t)li * layer_kv, &lp)) < 0)
            return r;
        if ((r = capture_after(t, li, n, n_capture, capture_layers)) < 0)
            return r;
    }
    if (n_rows > 0) {
        CK(ds_k_rmsnorm_bf16(t->x, d_rows, t->final_norm, n_rows, H, eps, t->rows, t->stream));
        if ((r = ds_cu_gemm(t, t->ws, &t->lm_head, t->rows, H, n_rows, t->logits, V, false)) < 0)
            return r;
        if (argmax)
            CK(ds_k_argmax(t->logits, V, n_rows, V, t->ids, t->stream));
    }
    return 0;
}

/* Check the batch and copy its metadata into the fixed device buffers. */
static int upload_pass(struct ds_cuda_target *t, const struct ds_kv_pool *pool, const struct ds_batch *b,
                       int *ret_seqs)
{
    int n = b->n_tokens, V = t->cfg.vocab_size;
    if (!t->k_cache)
        return ds_seterr(DS_EINVAL, "the GPU KV cache is not allocated");
    if (pool->page_size != t->page_size || pool->n_pages > t->n_pages)
        return ds_seterr(DS_EINVAL, "the KV bookkeeping (%d pages of %d) does not match the GPU cache (%d of %d)",
                         pool->n_pages, pool->page_size, t->n_pages, t->page_size);
    if (b->n_capture > 8)
        return ds_seterr(DS_EINVAL, "at most 8 captured layers (asked for %d)", b->n_capture);
    int n_seqs = 0;
    for (int i = 0; i < n; i++) {
        if (b->tokens[i] < 0 || b->tokens[i] >= V)
            return ds_seterr(DS_EINVAL, "token id %d at batch row %d is outside the vocabulary (%d)", b->tokens[i], i,
                             V);
        const struct ds_kv_seq *s = b->kv[b->seq[i]];
        if (b->pos[i] < 0 || ds_kv_pages_for(pool, b->pos[i] + 1) > s->n_pages)
            return ds_seterr(DS_EINVAL, "position %d at batch row %d has no KV page reserved", b->pos[i], i);
        if (s->n_pages > t->max_pages)
            return ds_seterr(DS_ELIMIT, "a sequence holds %d KV pages, more than the %d the GPU page table allows",
                             s->n_pages, t->max_pages);
        if (b->seq[i] + 1 > n_seqs)
            n_seqs = b->seq[i] + 1;
    }
    for (int i = 0; i < b->n_logits; i++)
        if (b->logit_rows[i] < 0 || b->logit_rows[i] >= n)
            return ds_seterr(DS_EINVAL, "logit row %d is outside the batch of %d tokens", b->logit_rows[i], n);
    int r = ensure_capacity(t, n, b->n_logits, n_seqs, b->n_capture);
    if (r < 0)
        return r;
    CK(cudaEventSynchronize(t->meta_sent));   /* the last pass may still be reading it (never recorded: at once) */
    int32_t *h = t->h_meta;
    int cn = t->cap_tokens;
    memcpy(h, b->tokens, (size_t)n * 4);
    memcpy(h + cn, b->pos, (size_t)n * 4);
    memcpy(h + 2 * cn, b->seq, (size_t)n * 4);
    if (b->n_logits)
        memcpy(h + 3 * cn, b->logit_rows, (size_t)b->n_logits * 4);
    h[6 * cn] = ds_k_attention_runs(b->seq, n, t->cfg.num_attention_heads, t->cfg.num_key_value_heads, h + 4 * cn,
                                    h + 5 * cn, &t->att_longest);
    int32_t *pages = h + META_PAGES(cn);
    for (int s = 0; s < n_seqs; s++) {
        const struct ds_kv_seq *kv = b->kv[s];
        int np = kv ? kv->n_pages : 0;
        if (np)
            memcpy(pages + (size_t)s * t->max_pages, kv->pages, (size_t)np * 4);
    }
    size_t used = META_PAGES(cn) + (size_t)n_seqs * t->max_pages;
    CK(cudaMemcpyAsync(t->meta, h, used * 4, cudaMemcpyHostToDevice, t->stream));
    CK(cudaEventRecord(t->meta_sent, t->stream));
    *ret_seqs = n_seqs;
    return 0;
}

int ds_cu_capture(cudaStream_t stream, int (*enqueue)(void *arg), void *arg, cudaGraphExec_t *ret)
{
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    int r = enqueue(arg);
    cudaError_t e = cudaStreamEndCapture(stream, &g);
    if (r < 0)
        return r;
    if (e != cudaSuccess)
        return ds_seterr(DS_ECUDA, "capturing a CUDA graph: %s", cudaGetErrorString(e));
    e = cudaGraphInstantiate(ret, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess)
        return ds_seterr(DS_ECUDA, "instantiating a CUDA graph: %s", cudaGetErrorString(e));
    return 0;
}

struct pass_args {
    struct ds_cuda_target *t;
    int n, n_rows;
    const struct ds_batch *b;
};

static int enqueue_pass_args(void *arg)
{
    const struct pass_args *a = arg;
    return enqueue_pass(a->t, a->n, a->n_rows, a->b->n_capture, a->b->capture_layers, a->b->argmax != NULL);
}

/* Run the device part. With graphs on, a shape seen before is captured as a
 * CUDA graph on its second pass and replayed from then on (a shape seen once
 * runs eagerly: capturing costs more than one pass). */
static int run_pass(struct ds_cuda_target *t, int n, int n_rows, const struct ds_batch *b, bool graph)
{
    if (!graph)
        return enqueue_pass(t, n, n_rows, b->n_capture, b->capture_layers, b->argmax != NULL);
    struct graph_slot *hit = NULL, *victim = &t->graphs[0];
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        struct graph_slot *g = &t->graphs[i];
        if (g->last_use && g->n_tokens == n && g->n_logits == n_rows && g->n_capture == b->n_capture &&
            g->att_longest == t->att_longest &&
            g->argmax == (b->argmax != NULL) &&
            (b->n_capture == 0 || !memcmp(g->capture_layers, b->capture_layers, (size_t)b->n_capture * 4))) {
            hit = g;
            break;
        }
        if (g->last_use < victim->last_use)
            victim = g;
    }
    if (!hit) {
        if (victim->exec)
            cudaGraphExecDestroy(victim->exec);
        memset(victim, 0, sizeof *victim);
        victim->n_tokens = n;
        victim->n_logits = n_rows;
        victim->n_capture = b->n_capture;
        victim->att_longest = t->att_longest;
        victim->argmax = b->argmax != NULL;
        if (b->n_capture)
            memcpy(victim->capture_layers, b->capture_layers, (size_t)b->n_capture * 4);
        victim->last_use = ++t->uses;
        return enqueue_pass(t, n, n_rows, b->n_capture, b->capture_layers, b->argmax != NULL);
    }
    hit->last_use = ++t->uses;
    if (!hit->exec) {
        struct pass_args a = {t, n, n_rows, b};
        int r = ds_cu_capture(t->stream, enqueue_pass_args, &a, &hit->exec);
        if (r < 0)
            return r;
    }
    CK(cudaGraphLaunch(hit->exec, t->stream));
    return 0;
}

int ds_cuda_forward(struct ds_cuda_target *t, const struct ds_kv_pool *pool, const struct ds_batch *b)
{
    int n = b->n_tokens, n_seqs = 0;
    if (n <= 0)
        return 0;
    int r = upload_pass(t, pool, b, &n_seqs);
    if (r == 0)
        r = run_pass(t, n, b->n_logits, b, t->opts.graphs);
    if (r < 0)
        return r;
    size_t H = t->cfg.hidden_size, V = t->cfg.vocab_size;
    bool to_host = false;
    t->last_rows = b->n_logits;
    if (b->logits && b->n_logits) {
        CK(cudaMemcpyAsync(b->logits, t->logits, (size_t)b->n_logits * V * 4, cudaMemcpyDeviceToHost, t->stream));
        t->logits_to_host += (uint64_t)b->n_logits * V * 4;
        to_host = true;
    }
    if (b->argmax && b->n_logits) {
        CK(cudaMemcpyAsync(b->argmax, t->ids, (size_t)b->n_logits * 4, cudaMemcpyDeviceToHost, t->stream));
        to_host = true;
    }
    if (b->captured && b->n_capture) {
        CK(cudaMemcpyAsync(b->captured, t->captured, (size_t)n * b->n_capture * H * 4, cudaMemcpyDeviceToHost,
                           t->stream));
        to_host = true;
    }
    if (to_host)   /* else what follows on the stream (ds_cuda_sample, the draft's context) waits for it there */
        CK(cudaStreamSynchronize(t->stream));
    return 0;
}

int ds_cuda_sync(struct ds_cuda_target *t)
{
    CK(cudaStreamSynchronize(t->stream));
    return 0;
}

/* ---- sampling on the device ---- */
/* Verifies of at most this many rows compute every row's distribution: the
 * distribution kernel takes one wave for them anyway, and the screen's pass
 * and its sync cost more than they save (h200: 8 rows, 5.94 against 6.01 ms a
 * round; 64 rows, even; 512 rows, 0.8 ms saved; bench/RESULTS.md). */
#define SCREEN_MIN_ROWS 32

int ds_cuda_sample(struct ds_cuda_target *t, const struct ds_cuda_draft *g, int n, const struct ds_cuda_chain *c,
                   int32_t *accepted, int32_t *next)
{
    int V = t->cfg.vocab_size, q_blocks = 0, gamma = 0, max_len = 0, end = 0;
    if (n <= 0)
        return 0;
    struct samp_layout l = samp_layout(t->cap_rows);
    uint8_t *h = t->h_samp, *d = t->samp;
    struct ds_k_chain *chains = (struct ds_k_chain *)(h + l.chains);                  /* [n] */
    struct ds_k_sampling *params = (struct ds_k_sampling *)(h + l.chain_params);      /* [n] */
    int32_t *rows = (int32_t *)(h + l.rows);                                          /* [n_all] */
    struct ds_k_sampling *row_params = (struct ds_k_sampling *)(h + l.params);        /* [n_all] */
    int n_all = 0;   /* rows of the chains */
    const float *q = g ? ds_cu_draft_q(g, &q_blocks, &gamma) : NULL;         /* [q_blocks, γ, V] */
    for (int i = 0; i < n; i++) {
        const struct ds_cuda_chain *ci = &c[i];
        if (ci->len < 0 || ci->len > DS_K_MAX_CHAIN || ci->row < end || ci->row + ci->len >= t->last_rows)
            return ds_seterr(DS_EINVAL,
                             "sampling rows %d..%d are outside the last pass's %d logits rows or overlap a chain "
                             "before them", ci->row, ci->row + ci->len, t->last_rows);
        if (ci->len > 0 && (!q || ci->q_block < 0 || ci->q_block >= q_blocks || ci->len > gamma))
            return ds_seterr(DS_EINVAL, "%d drafts to verify without their draft distributions (block row %d)",
                             ci->len, ci->q_block);
        end = ci->row + ci->len + 1;
        max_len = ci->len > max_len ? ci->len : max_len;
        const struct ds_sampling *s = &ci->sampling;
        params[i] = (struct ds_k_sampling){.temperature = s->temperature, .top_p = s->top_p, .top_k = s->top_k};
        struct ds_k_chain *k = &chains[i];
        memset(k, 0, sizeof *k);
        k->p_row = ci->row;
        k->q_row = ci->len > 0 ? ci->q_block * gamma : 0;
        k->len = ci->len;
        for (int j = 0; j <= ci->len; j++) {
            rows[n_all] = ci->row + j;
            row_params[n_all++] = params[i];
            k->u_target[j] = ds_uniform(s->seed, ci->position + (uint64_t)j, DS_SLOT_TARGET);
            if (j == ci->len)
                break;
            if (ci->drafts[j] < 0 || ci->drafts[j] >= V)
                return ds_seterr(DS_EINVAL, "draft token %d is outside the vocabulary", ci->drafts[j]);
            k->drafts[j] = ci->drafts[j];
            k->u_accept[j] = ds_uniform(s->seed, ci->position + (uint64_t)j, DS_SLOT_ACCEPT);
        }
    }
    /* Above SCREEN_MIN_ROWS rows, drafts whose outcome one pass over the
     * logits settles need no distribution (ds_k_spec_screen); the rows the
     * accept still reads become probabilities in place; one cluster of blocks per chain. */
    bool screen = n_all > SCREEN_MIN_ROWS && n <= 65535;   /* (the screen's grid takes 65535 chains) */
    int n_rows = n_all;
    CK(cudaMemcpyAsync(d + l.chains, chains, (size_t)n * sizeof *chains, cudaMemcpyHostToDevice, t->stream));
    if (screen) {
        CK(cudaMemcpyAsync(d + l.chain_params, params, (size_t)n * sizeof *params, cudaMemcpyHostToDevice,
                           t->stream));
        CK(ds_k_spec_screen(t->logits, V, q, V, (const struct ds_k_chain *)(d + l.chains),
                            (const struct ds_k_sampling *)(d + l.chain_params), n, max_len, V, d + l.status,
                            (int32_t *)(d + l.rows), (struct ds_k_sampling *)(d + l.params),
                            (int32_t *)(d + l.n_rows), t->stream));
        CK(cudaMemcpyAsync(h + l.n_rows, d + l.n_rows, sizeof(int32_t), cudaMemcpyDeviceToHost, t->stream));
        CK(cudaStreamSynchronize(t->stream));
        n_rows = *(const int32_t *)(h + l.n_rows);
    } else {
        CK(cudaMemcpyAsync(d + l.rows, rows, (size_t)n_all * sizeof *rows, cudaMemcpyHostToDevice, t->stream));
        CK(cudaMemcpyAsync(d + l.params, row_params, (size_t)n_all * sizeof *row_params, cudaMemcpyHostToDevice,
                           t->stream));
    }
    t->verify_rows += (uint64_t)n_all;
    t->distribution_rows += (uint64_t)n_rows;
    CK(ds_k_sampling_probs(t->logits, V, (const int32_t *)(d + l.rows), (const struct ds_k_sampling *)(d + l.params),
                           n_rows, V, t->logits, V, t->stream));
    CK(ds_k_spec_accept(t->logits, V, q, V, (const struct ds_k_chain *)(d + l.chains), screen ? d + l.status : NULL,
                        n, V, (int32_t *)(d + l.accepted), (int32_t *)(d + l.next), t->stream));
    CK(cudaMemcpyAsync(h + l.accepted, d + l.accepted, (size_t)n * 4, cudaMemcpyDeviceToHost, t->stream));
    CK(cudaMemcpyAsync(h + l.next, d + l.next, (size_t)n * 4, cudaMemcpyDeviceToHost, t->stream));
    CK(cudaStreamSynchronize(t->stream));
    memcpy(accepted, h + l.accepted, (size_t)n * 4);
    memcpy(next, h + l.next, (size_t)n * 4);
    t->last_rows = 0;   /* the rows now hold probabilities */
    return 0;
}

uint64_t ds_cuda_logits_to_host(const struct ds_cuda_target *t)
{
    return t ? t->logits_to_host : 0;
}

void ds_cuda_verify_rows(const struct ds_cuda_target *t, uint64_t *rows, uint64_t *distributions)
{
    *rows = t ? t->verify_rows : 0;
    *distributions = t ? t->distribution_rows : 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int ds_cuda_time_forward(struct ds_cuda_target *t, const struct ds_kv_pool *pool, const struct ds_batch *b, int reps,
                         bool graph, double *ret_ms)
{
    int n_seqs = 0, r;
    if (reps < 1)
        reps = 1;
    if ((r = upload_pass(t, pool, b, &n_seqs)) < 0)
        return r;
    /* warm-up (and the graph's capture) */
    for (int i = 0; i < 2; i++)
        if ((r = run_pass(t, b->n_tokens, b->n_logits, b, graph)) < 0)
            return r;
    CK(cudaStreamSynchronize(t->stream));
    double *ms = ds_xmalloc((size_t)reps * sizeof *ms);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < reps && r == 0; i++) {
        cudaEventRecord(e0, t->stream);
        r = run_pass(t, b->n_tokens, b->n_logits, b, graph);
        cudaEventRecord(e1, t->stream);
        if (cudaEventSynchronize(e1) != cudaSuccess)
            r = ds_seterr(DS_ECUDA, "a timed pass failed: %s", cudaGetErrorString(cudaGetLastError()));
        float f = 0;
        cudaEventElapsedTime(&f, e0, e1);
        ms[i] = f;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    if (r == 0) {
        qsort(ms, (size_t)reps, sizeof *ms, cmp_double);
        *ret_ms = ms[reps / 2];
    }
    free(ms);
    return r;
}

int ds_cuda_copy_bandwidth(size_t bytes, int reps, double *ret_bps)
{
    void *a = NULL, *b = NULL;
    int r;
    if ((r = ds_cu_alloc(&a, bytes, "the bandwidth test")) < 0)
        return r;
    if ((r = ds_cu_alloc(&b, bytes, "the bandwidth test")) < 0) {
        cudaFree(a);
        return r;
    }
    cudaMemset(a, 1, bytes);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    double *ms = ds_xmalloc((size_t)reps * sizeof *ms);
    for (int i = 0; i < reps; i++) {
        cudaEventRecord(e0, 0);
        cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice, 0);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        float f = 0;
        cudaEventElapsedTime(&f, e0, e1);
        ms[i] = f;
    }
    qsort(ms, (size_t)reps, sizeof *ms, cmp_double);
    double med = ms[reps / 2];
    free(ms);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    CK(cudaGetLastError());
    *ret_bps = 2.0 * (double)bytes / (med * 1e-3);
    return 0;
}
