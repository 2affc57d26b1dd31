/* test-kernels.c: every CUDA kernel against the CPU engine's functions (or a
 * plain C reference where the engine has none), on fresh random inputs each
 * run. Outputs are poisoned with NaN (or -1) before each launch so that an
 * element left unwritten fails the comparison. Prints TAP; without a CUDA
 * device it prints a skip plan and exits 77. DS_TEST_SEED=N repeats a run. */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

#include "dspark/ds-model.h"
#include "dspark/ds-sampler.h"
#include "kernels.h"

/* ---- bookkeeping: every buffer of a test is freed when the test ends ---- */
#define MAX_BUFS 128
static void *dev_bufs[MAX_BUFS], *host_bufs[MAX_BUFS];
static int n_dev, n_host;

static void free_all(void)
{
    for (int i = 0; i < n_dev; i++)
        cudaFree(dev_bufs[i]);
    for (int i = 0; i < n_host; i++)
        free(host_bufs[i]);
    n_dev = n_host = 0;
}

static void *hmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p || n_host == MAX_BUFS) {
        fprintf(stderr, "out of host memory or buffer slots\n");
        exit(1);
    }
    host_bufs[n_host++] = p;
    return p;
}

/* A device buffer filled with 0xff bytes (NaN as f32, -1 as int32). */
static void *dpoison(size_t bytes)
{
    void *p = NULL;
    if (n_dev == MAX_BUFS || cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess ||
        cudaMemset(p, 0xff, bytes) != cudaSuccess) {
        fprintf(stderr, "could not allocate %zu bytes of device memory\n", bytes);
        exit(1);
    }
    dev_bufs[n_dev++] = p;
    return p;
}

static void *dup_to_dev(const void *h, size_t bytes)
{
    void *p = dpoison(bytes);
    if (cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        fprintf(stderr, "host-to-device copy failed\n");
        exit(1);
    }
    return p;
}

static void *dup_to_host(const void *d, size_t bytes)
{
    void *p = hmalloc(bytes);
    cudaError_t e = cudaMemcpy(p, d, bytes, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        printf("# device-to-host copy failed: %s\n", cudaGetErrorString(e));
        memset(p, 0xff, bytes);
    }
    return p;
}

/* ---- random inputs: uniform in [-1, 1], never exactly zero ---- */
static uint64_t rng;

static uint32_t rnd_u32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static float rnd_f(void)
{
    float v = ((float)(rnd_u32() & 0xffffff) + 0.5f) / 8388608.0f - 1.0f;
    return v;
}

static float *rnd_vec(size_t n)
{
    float *p = hmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        p[i] = rnd_f();
    return p;
}

static uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static float bf16_to_f32(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- checks ---- */
/* The launcher's status, then the kernel's (synchronously). */
static bool launched(cudaError_t e, const char *what)
{
    if (e == cudaSuccess)
        e = cudaGetLastError();
    if (e == cudaSuccess)
        e = cudaDeviceSynchronize();
    if (e != cudaSuccess) {
        printf("# %s: %s\n", what, cudaGetErrorString(e));
        return false;
    }
    return true;
}

/* max |got - ref| / max |ref|; any NaN in got (an unwritten element) fails. */
static bool close_enough(const char *what, const float *got, const float *ref, size_t n, double bound)
{
    double maxref = 0, maxdiff = 0;
    size_t worst = 0, nan = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(got[i])) {
            nan++;
            continue;
        }
        double d = fabs((double)got[i] - ref[i]);
        if (d > maxdiff) {
            maxdiff = d;
            worst = i;
        }
        if (fabs(ref[i]) > maxref)
            maxref = fabs(ref[i]);
    }
    double err = maxdiff / (maxref > 0 ? maxref : 1e-30);
    printf("# %s: normalized max error %.3g (bound %.3g), %zu unwritten of %zu\n", what, err, bound, nan, n);
    if (nan || err > bound) {
        if (!nan)
            printf("#   worst at %zu: got %.9g want %.9g\n", worst, got[worst], ref[worst]);
        return false;
    }
    return true;
}

static bool same_bits(const char *what, const void *got, const void *ref, size_t bytes)
{
    if (memcmp(got, ref, bytes) == 0)
        return true;
    const unsigned char *g = got, *r = ref;
    size_t i = 0;
    while (g[i] == r[i])
        i++;
    printf("# %s: differs first at byte %zu of %zu\n", what, i, bytes);
    return false;
}

/* ---- tests ---- */
static bool test_embed_f32(void)
{
    int V = 517, H = 1000, n = 37;
    float *table = rnd_vec((size_t)V * H);
    int32_t *tok = hmalloc((size_t)n * sizeof *tok);
    for (int t = 0; t < n; t++)
        tok[t] = (int32_t)(rnd_u32() % (uint32_t)V);
    tok[5] = V;              /* out of range: zeros */
    tok[6] = -1;
    tok[7] = V - 1;
    float *ref = hmalloc((size_t)n * H * sizeof(float));
    for (int t = 0; t < n; t++)
        for (int i = 0; i < H; i++)
            ref[(size_t)t * H + i] = tok[t] >= 0 && tok[t] < V ? table[(size_t)tok[t] * H + i] : 0.0f;
    float *d_out = dpoison((size_t)n * H * sizeof(float));
    if (!launched(ds_k_embed_f32(dup_to_dev(table, (size_t)V * H * sizeof(float)),
                                 dup_to_dev(tok, (size_t)n * sizeof *tok), n, H, V, d_out, 0), "embed_f32"))
        return false;
    return same_bits("embed_f32", dup_to_host(d_out, (size_t)n * H * sizeof(float)), ref,
                     (size_t)n * H * sizeof(float));
}

static bool test_embed_bf16(void)
{
    int V = 300, H = 768, n = 20;
    uint16_t *table = hmalloc((size_t)V * H * sizeof *table);
    for (size_t i = 0; i < (size_t)V * H; i++) {
        float f = rnd_f();
        uint32_t b;
        memcpy(&b, &f, 4);
        table[i] = (uint16_t)(b >> 16);
    }
    int32_t *tok = hmalloc((size_t)n * sizeof *tok);
    for (int t = 0; t < n; t++)
        tok[t] = (int32_t)(rnd_u32() % (uint32_t)V);
    float *ref = hmalloc((size_t)n * H * sizeof(float));
    for (int t = 0; t < n; t++)
        for (int i = 0; i < H; i++) {
            uint32_t b = (uint32_t)table[(size_t)tok[t] * H + i] << 16;
            memcpy(&ref[(size_t)t * H + i], &b, 4);
        }
    float *d_out = dpoison((size_t)n * H * sizeof(float));
    if (!launched(ds_k_embed_bf16(dup_to_dev(table, (size_t)V * H * sizeof *table),
                                  dup_to_dev(tok, (size_t)n * sizeof *tok), n, H, V, d_out, 0), "embed_bf16"))
        return false;
    return same_bits("embed_bf16", dup_to_host(d_out, (size_t)n * H * sizeof(float)), ref,
                     (size_t)n * H * sizeof(float));
}

static bool test_rmsnorm(void)
{
    int n = 19, H = 2560;
    float eps = 1e-6f;
    size_t bytes = (size_t)n * H * sizeof(float);
    float *x = rnd_vec((size_t)n * H), *w = rnd_vec(H);
    float *ref = hmalloc(bytes);
    for (int t = 0; t < n; t++)
        ds_rmsnorm(x + (size_t)t * H, w, H, eps, ref + (size_t)t * H);
    float *d_x = dup_to_dev(x, bytes), *d_w = dup_to_dev(w, H * sizeof(float)), *d_out = dpoison(bytes);
    if (!launched(ds_k_rmsnorm(d_x, d_w, n, H, eps, d_out, 0), "rmsnorm"))
        return false;
    float *got = dup_to_host(d_out, bytes);
    bool ok = close_enough("rmsnorm", got, ref, (size_t)n * H, 1e-5);
    /* in place gives the same bits */
    if (!launched(ds_k_rmsnorm(d_x, d_w, n, H, eps, d_x, 0), "rmsnorm in place"))
        return false;
    return same_bits("rmsnorm in place", dup_to_host(d_x, bytes), got, bytes) && ok;
}

static bool test_add_rmsnorm(void)
{
    int n = 11, H = 4096;
    float eps = 1e-6f;
    size_t bytes = (size_t)n * H * sizeof(float);
    float *x = rnd_vec((size_t)n * H), *y = rnd_vec((size_t)n * H), *w = rnd_vec(H);
    float *d_x = dup_to_dev(x, bytes), *d_y = dup_to_dev(y, bytes), *d_out = dpoison(bytes);
    float *ref = hmalloc(bytes);
    for (size_t i = 0; i < (size_t)n * H; i++)
        x[i] += y[i];
    for (int t = 0; t < n; t++)
        ds_rmsnorm(x + (size_t)t * H, w, H, eps, ref + (size_t)t * H);
    if (!launched(ds_k_add_rmsnorm(d_x, d_y, dup_to_dev(w, H * sizeof(float)), n, H, eps, d_out, 0),
                  "add_rmsnorm"))
        return false;
    bool ok = same_bits("add_rmsnorm residual", dup_to_host(d_x, bytes), x, bytes);
    return close_enough("add_rmsnorm", dup_to_host(d_out, bytes), ref, (size_t)n * H, 1e-5) && ok;
}

static float *rope_freqs(int hd, double theta)
{
    float *f = hmalloc((size_t)hd / 2 * sizeof(float));
    for (int i = 0; i < hd / 2; i++)
        f[i] = (float)(1.0 / pow(theta, 2.0 * i / hd));
    return f;
}

/* One head width: the kernel against ds_rmsnorm + ds_rope on the CPU. */
static bool qk_norm_rope_case(int hd)
{
    int n = 13, nH = 32, nKV = 8;
    int width = (nH + 2 * nKV) * hd;
    float eps = 1e-6f;
    size_t bytes = (size_t)n * width * sizeof(float);
    float *qkv = rnd_vec((size_t)n * width), *qn = rnd_vec(hd), *kn = rnd_vec(hd);
    float *inv_freq = rope_freqs(hd, 1e6);
    int32_t *pos = hmalloc((size_t)n * sizeof *pos);
    for (int t = 0; t < n; t++)
        pos[t] = (int32_t)(rnd_u32() % 40000);
    pos[0] = 0;
    float *d_qkv = dup_to_dev(qkv, bytes);
    for (int t = 0; t < n; t++) {
        float *q = qkv + (size_t)t * width, *k = q + (size_t)nH * hd;
        for (int h = 0; h < nH; h++)
            ds_rmsnorm(q + (size_t)h * hd, qn, hd, eps, q + (size_t)h * hd);
        for (int h = 0; h < nKV; h++)
            ds_rmsnorm(k + (size_t)h * hd, kn, hd, eps, k + (size_t)h * hd);
        ds_rope(q, nH, hd, inv_freq, pos[t]);
        ds_rope(k, nKV, hd, inv_freq, pos[t]);
    }
    char what[64];
    snprintf(what, sizeof what, "qk_norm_rope, hd %d", hd);
    if (!launched(ds_k_qk_norm_rope(d_qkv, width, d_qkv + (size_t)nH * hd, width,
                                    dup_to_dev(qn, hd * sizeof(float)), dup_to_dev(kn, hd * sizeof(float)),
                                    dup_to_dev(inv_freq, (size_t)hd / 2 * sizeof(float)),
                                    dup_to_dev(pos, (size_t)n * sizeof *pos), n, nH, nKV, hd, eps, 0),
                  what))
        return false;
    /* the v part of each row must come back untouched: it is in the comparison */
    return close_enough(what, dup_to_host(d_qkv, bytes), qkv, (size_t)n * width, 1e-5);
}

/* Head widths: 24 (not a multiple of a warp), 128 (Qwen3's: eight heads a block), 256 (four a block,
 * two elements per virtual thread of the sum of squares). */
static bool test_qk_norm_rope(void)
{
    bool ok = true;
    const int hds[] = {24, 128, 256};
    for (size_t i = 0; i < sizeof hds / sizeof hds[0]; i++)
        ok = qk_norm_rope_case(hds[i]) && ok;
    return ok;
}

/* ds_k_qk_norm_rope_append_bf16 against ds_k_qk_norm_rope then
 * ds_k_kv_append_bf16: the qkv rows and both caches bit for bit (two
 * sequences over scattered pages; also keys only, nH 0, as the draft's
 * context path uses it). */
static bool test_qk_norm_rope_append(void)
{
    enum { N_SEQS = 2, MAX_PAGES = 4, PAGE = 16, N_PAGES = 9 };
    int n = 21, nKV = 8, hd = 128;
    bool ok = true;
    for (int keys_only = 0; keys_only < 2; keys_only++) {
        int nH = keys_only ? 0 : 32, width = (nH + 2 * nKV) * hd;
        size_t bytes = (size_t)n * width * sizeof(float), cache = (size_t)N_PAGES * PAGE * nKV * hd * 2;
        float *qkv = rnd_vec((size_t)n * width), *qn = rnd_vec(hd), *kn = rnd_vec(hd);
        int32_t *pos = hmalloc((size_t)n * 4), *seq = hmalloc((size_t)n * 4);
        int32_t pt[N_SEQS * MAX_PAGES] = {7, 2, 5, 0, 1, 8, 3, 6};
        for (int t = 0; t < n; t++) {   /* sequence 0 at 3.., sequence 1 at 40.. */
            seq[t] = t % 2;
            pos[t] = seq[t] ? 40 + t / 2 : 3 + t / 2;
        }
        float *d_fq = dup_to_dev(qn, (size_t)hd * 4), *d_fk = dup_to_dev(kn, (size_t)hd * 4);
        float *d_if = dup_to_dev(rope_freqs(hd, 1e6), (size_t)hd / 2 * 4);
        int32_t *d_pos = dup_to_dev(pos, (size_t)n * 4), *d_seq = dup_to_dev(seq, (size_t)n * 4);
        int32_t *d_pt = dup_to_dev(pt, sizeof pt);
        float *a = dup_to_dev(qkv, bytes), *b = dup_to_dev(qkv, bytes);
        uint16_t *ka = dpoison(cache), *va = dpoison(cache), *kb = dpoison(cache), *vb = dpoison(cache);
        float *ak = a + (size_t)nH * hd, *bk = b + (size_t)nH * hd;
        if (!launched(ds_k_qk_norm_rope(keys_only ? ak : a, width, ak, width, d_fq, d_fk, d_if, d_pos, n, nH, nKV, hd,
                                        1e-6f, 0), "qk_norm_rope before the append") ||
            !launched(ds_k_kv_append_bf16(ak, width, ak + (size_t)nKV * hd, width, d_seq, d_pos, d_pt, MAX_PAGES, PAGE,
                                          n, nKV, hd, ka, va, 0), "kv_append_bf16") ||
            !launched(ds_k_qk_norm_rope_append_bf16(keys_only ? bk : b, width, bk, width, bk + (size_t)nKV * hd, width,
                                                    d_fq, d_fk, d_if, d_pos, d_seq, d_pt, MAX_PAGES, PAGE, n, nH, nKV,
                                                    hd, 1e-6f, kb, vb, 0), "qk_norm_rope_append_bf16"))
            return false;
        char what[96];
        snprintf(what, sizeof what, "fused append%s: qkv rows", keys_only ? " (keys only)" : "");
        ok &= same_bits(what, dup_to_host(b, bytes), dup_to_host(a, bytes), bytes);
        snprintf(what, sizeof what, "fused append%s: K cache", keys_only ? " (keys only)" : "");
        ok &= same_bits(what, dup_to_host(kb, cache), dup_to_host(ka, cache), cache);
        snprintf(what, sizeof what, "fused append%s: V cache", keys_only ? " (keys only)" : "");
        ok &= same_bits(what, dup_to_host(vb, cache), dup_to_host(va, cache), cache);
        free_all();
    }
    return ok;
}

/* ds_k_k_norm_rope_append_layers_bf16 against one ds_k_qk_norm_rope_append_bf16
 * (keys only) a layer: the rows and both caches bit for bit, three layers laid
 * out as the draft's context rows ([layer][k heads, v heads] in each row). */
static bool test_k_norm_rope_append_layers(void)
{
    enum { N_SEQS = 2, MAX_PAGES = 4, PAGE = 16, N_PAGES = 9, L = 3 };
    int n = 21, nKV = 8, hd = 128, kvw = nKV * hd, ld = 2 * L * kvw;
    size_t bytes = (size_t)n * ld * sizeof(float), layer = (size_t)N_PAGES * PAGE * kvw;
    size_t cache = L * layer * 2;
    float *rows = rnd_vec((size_t)n * ld), *norms = rnd_vec((size_t)L * hd);
    int32_t *pos = hmalloc((size_t)n * 4), *seq = hmalloc((size_t)n * 4);
    int32_t pt[N_SEQS * MAX_PAGES] = {7, 2, 5, 0, 1, 8, 3, 6};
    for (int t = 0; t < n; t++) {
        seq[t] = t % 2;
        pos[t] = seq[t] ? 40 + t / 2 : 3 + t / 2;
    }
    float *d_norms = dup_to_dev(norms, (size_t)L * hd * 4), *d_if = dup_to_dev(rope_freqs(hd, 1e6), (size_t)hd / 2 * 4);
    int32_t *d_pos = dup_to_dev(pos, (size_t)n * 4), *d_seq = dup_to_dev(seq, (size_t)n * 4);
    int32_t *d_pt = dup_to_dev(pt, sizeof pt);
    float *a = dup_to_dev(rows, bytes), *b = dup_to_dev(rows, bytes);
    uint16_t *ka = dpoison(cache), *va = dpoison(cache), *kb = dpoison(cache), *vb = dpoison(cache);
    for (int l = 0; l < L; l++) {
        float *k = a + (size_t)l * 2 * kvw;
        if (!launched(ds_k_qk_norm_rope_append_bf16(k, ld, k, ld, k + kvw, ld, d_norms + l * hd, d_norms + l * hd, d_if,
                                                    d_pos, d_seq, d_pt, MAX_PAGES, PAGE, n, 0, nKV, hd, 1e-6f,
                                                    ka + l * layer, va + l * layer, 0),
                      "qk_norm_rope_append_bf16, a layer"))
            return false;
    }
    if (!launched(ds_k_k_norm_rope_append_layers_bf16(b, b + kvw, ld, L, 2 * kvw, d_norms, d_if, d_pos, d_seq, d_pt,
                                                      MAX_PAGES, PAGE, n, nKV, hd, 1e-6f, kb, vb, layer, 0),
                  "k_norm_rope_append_layers_bf16"))
        return false;
    bool ok = same_bits("layers in one launch: rows", dup_to_host(b, bytes), dup_to_host(a, bytes), bytes);
    ok &= same_bits("layers in one launch: K caches", dup_to_host(kb, cache), dup_to_host(ka, cache), cache);
    ok &= same_bits("layers in one launch: V caches", dup_to_host(vb, cache), dup_to_host(va, cache), cache);
    /* and the bounds: a layer stride that runs past the row */
    ok &= ds_k_k_norm_rope_append_layers_bf16(b, b + kvw, ld, L, 3 * kvw, d_norms, d_if, d_pos, d_seq, d_pt,
                                              MAX_PAGES, PAGE, n, nKV, hd, 1e-6f, kb, vb, layer,
                                              0) == cudaErrorInvalidValue;
    free_all();
    return ok;
}

/* ds_k_gather_bf16 against round-to-nearest-even on the host: picked rows,
 * four columns a thread (aligned) and one (an odd width and leading dimension). */
static bool test_gather_bf16(void)
{
    int n = 13, src_rows = 40;
    bool ok = true;
    for (int vec = 1; vec >= 0; vec--) {
        int w = vec ? 1024 : 1021, ldx = vec ? 1032 : 1023, ldo = vec ? 1028 : 1025;
        float *x = rnd_vec((size_t)src_rows * ldx);
        for (size_t i = 0; i < (size_t)src_rows * ldx; i++)
            x[i] *= 100.0f;
        int32_t *rows = hmalloc((size_t)n * 4);
        for (int i = 0; i < n; i++)
            rows[i] = (int32_t)(rnd_u32() % (uint32_t)src_rows);
        size_t out_bytes = (size_t)n * ldo * 2;
        uint16_t *ref = hmalloc(out_bytes), *d_out = dpoison(out_bytes);
        if (!launched(ds_k_gather_bf16(dup_to_dev(x, (size_t)src_rows * ldx * 4), ldx, dup_to_dev(rows, (size_t)n * 4),
                                       n, w, d_out, ldo, 0), "gather_bf16"))
            return false;
        uint16_t *got = dup_to_host(d_out, out_bytes);
        memcpy(ref, got, out_bytes);   /* the padding past w is not the kernel's */
        for (int i = 0; i < n; i++)
            for (int c = 0; c < w; c++)
                ref[(size_t)i * ldo + c] = f32_to_bf16(x[(size_t)rows[i] * ldx + c]);
        ok &= same_bits(vec ? "gather_bf16, four a thread" : "gather_bf16, one a thread", got, ref, out_bytes);
        free_all();
    }
    return ok;
}

/* ds_k_swiglu_bf16 against ds_k_swiglu's f32 values rounded on the host: bit for bit, four elements a
 * thread (I a multiple of 4) and one (I odd, or the output misaligned for eight-byte stores). */
static bool test_swiglu_bf16(void)
{
    bool ok = true;
    const int shapes[][3] = {{7, 3000, 0}, {5, 3001, 0}, {3, 1024, 1}};   /* n, I, output offset in elements */
    for (int c = 0; c < 3; c++) {
        int n = shapes[c][0], I = shapes[c][1], off = shapes[c][2];
        float *gu = rnd_vec((size_t)n * 2 * I);
        for (size_t i = 0; i < (size_t)n * 2 * I; i++)
            gu[i] *= 8.0f;
        float *d_gu = dup_to_dev(gu, (size_t)n * 2 * I * sizeof(float));
        float *d_f32 = dpoison((size_t)n * I * sizeof(float));
        uint16_t *d_out = dpoison(((size_t)n * I + off) * sizeof(uint16_t));
        if (!launched(ds_k_swiglu(d_gu, n, I, d_f32, 0), "swiglu") ||
            !launched(ds_k_swiglu_bf16(d_gu, n, I, d_out + off, 0), "swiglu_bf16"))
            return false;
        float *f = dup_to_host(d_f32, (size_t)n * I * sizeof(float));
        uint16_t *got = dup_to_host(d_out, ((size_t)n * I + off) * sizeof(uint16_t));
        uint16_t *ref = hmalloc((size_t)n * I * sizeof(uint16_t));
        for (size_t i = 0; i < (size_t)n * I; i++)
            ref[i] = f32_to_bf16(f[i]);
        ok &= same_bits(c == 0 ? "swiglu_bf16, four a thread" : "swiglu_bf16, one a thread", got + off, ref,
                        (size_t)n * I * sizeof(uint16_t));
        free_all();
    }
    return ok;
}

static bool test_swiglu(void)
{
    int n = 7, I = 3000;
    float *gu = rnd_vec((size_t)n * 2 * I);
    for (size_t i = 0; i < (size_t)n * 2 * I; i++)
        gu[i] *= 8.0f;       /* reach well into both tails of silu */
    float *ref = hmalloc((size_t)n * I * sizeof(float));
    for (int t = 0; t < n; t++)
        for (int i = 0; i < I; i++) {
            float g = gu[(size_t)t * 2 * I + i], u = gu[(size_t)t * 2 * I + I + i];
            ref[(size_t)t * I + i] = g / (1.0f + expf(-g)) * u;
        }
    float *d_out = dpoison((size_t)n * I * sizeof(float));
    if (!launched(ds_k_swiglu(dup_to_dev(gu, (size_t)n * 2 * I * sizeof(float)), n, I, d_out, 0), "swiglu"))
        return false;
    return close_enough("swiglu", dup_to_host(d_out, (size_t)n * I * sizeof(float)), ref, (size_t)n * I, 1e-5);
}

static bool test_argmax(void)
{
    int n = 7, V = 151936;
    float *x = rnd_vec((size_t)n * V);
    x[77] = x[9000] = x[150000] = 2.0f;                  /* row 0: a tie, lowest wins */
    x[(size_t)1 * V + V - 1] = 3.0f;                      /* row 1: the last index */
    for (int i = 0; i < V; i++)                           /* row 2: all equal */
        x[(size_t)2 * V + i] = 0.25f;
    x[(size_t)3 * V] = 5.0f;                              /* row 3: index 0 */
    x[(size_t)4 * V + 1023] = x[(size_t)4 * V + 1024] = 4.0f; /* row 4: a tie across threads */
    x[(size_t)5 * V + 30000] = x[(size_t)5 * V + 100000] = 6.0f; /* row 5: a tie across blocks, neither first */
    int32_t want[7];
    for (int t = 0; t < n; t++) {
        const float *r = x + (size_t)t * V;
        int b = 0;
        for (int i = 1; i < V; i++)
            if (r[i] > r[b])
                b = i;
        want[t] = b;
    }
    if (want[0] != 77 || want[1] != V - 1 || want[2] != 0 || want[3] != 0 || want[4] != 1023 || want[5] != 30000) {
        printf("# argmax: the reference is wrong\n");
        return false;
    }
    int32_t *d_out = dpoison((size_t)n * sizeof(int32_t));
    if (!launched(ds_k_argmax(dup_to_dev(x, (size_t)n * V * sizeof(float)), V, n, V, d_out, 0), "argmax"))
        return false;
    int32_t *got = dup_to_host(d_out, (size_t)n * sizeof(int32_t));
    bool ok = true;
    for (int t = 0; t < n; t++)
        if (got[t] != want[t]) {
            printf("# argmax row %d: got %d want %d\n", t, got[t], want[t]);
            ok = false;
        }
    /* with the argmax's probability at temperature 1: the same ids, p = 1 / Σ exp(x - max); the rows
     * apart in memory (ldx > V), with a larger value in the gap that a wrong stride would read */
    int ldx = V + 37;
    float *xs = malloc((size_t)n * ldx * sizeof(float));   /* [n, ldx] */
    for (int t = 0; t < n; t++) {
        memcpy(xs + (size_t)t * ldx, x + (size_t)t * V, (size_t)V * sizeof(float));
        for (int i = V; i < ldx; i++)
            xs[(size_t)t * ldx + i] = 100.0f;
    }
    int32_t *d_out2 = dpoison((size_t)n * sizeof(int32_t));
    float *d_p = dpoison((size_t)n * sizeof(float));
    bool run = launched(ds_k_argmax_prob(dup_to_dev(xs, (size_t)n * ldx * sizeof(float)), ldx, n, V, d_out2, d_p, 0),
                        "argmax_prob");
    free(xs);
    if (!run)
        return false;
    int32_t *got2 = dup_to_host(d_out2, (size_t)n * sizeof(int32_t));
    float *gp = dup_to_host(d_p, (size_t)n * sizeof(float));
    double worst = 0;
    for (int t = 0; t < n; t++) {
        const float *r = x + (size_t)t * V;
        double sum = 0;
        for (int i = 0; i < V; i++)
            sum += exp((double)r[i] - r[want[t]]);
        double e = fabs(gp[t] - 1 / sum) * sum;
        worst = isnan(e) ? INFINITY : fmax(worst, e);
        ok = got2[t] == want[t] && ok;
    }
    printf("# argmax_prob: ids %s, p max relative error %.3g (row 2, all equal: p %.6g, 1/V %.6g)\n",
           memcmp(got2, want, sizeof want) ? "differ" : "agree", worst, gp[2], 1.0 / V);
    /* short rows, which leave some of the blocks a row is cut into with nothing (most rows of these
     * lengths start off a 16-byte boundary) */
    const int short_v[] = {1, 3, 5, 9, 37, 130};
    for (size_t k = 0; k < sizeof short_v / sizeof *short_v; k++) {
        int v = short_v[k], m = 5;
        float *xv = rnd_vec((size_t)m * v);
        int32_t *d_ids = dpoison((size_t)m * sizeof(int32_t));
        if (!launched(ds_k_argmax(dup_to_dev(xv, (size_t)m * v * sizeof(float)), v, m, v, d_ids, 0), "argmax"))
            return false;
        int32_t *ids = dup_to_host(d_ids, (size_t)m * sizeof(int32_t));
        for (int t = 0; t < m; t++) {
            int b = 0;
            for (int i = 1; i < v; i++)
                if (xv[(size_t)t * v + i] > xv[(size_t)t * v + b])
                    b = i;
            if (ids[t] != b) {
                printf("# argmax V %d row %d: got %d want %d\n", v, t, ids[t], b);
                ok = false;
            }
        }
    }
    return ok && worst < 1e-5;
}

/* ---- paged cache and attention ---- */
#define ATT_MAX_SEQS 24

struct att_case {
    int nH, nKV, hd, page_size, n_pages, n_seqs;
    int cached[ATT_MAX_SEQS], n_new[ATT_MAX_SEQS];   /* per sequence: positions already cached, tokens in this batch */
    bool repeat;   /* also the batch repeated to 2,048 tokens: see att_repeated */
};

struct att_setup {
    struct ds_kv_pool pool;     /* host copy, 2 layers; the kernels work on layer 1 */
    struct ds_kv_seq seqs[ATT_MAX_SEQS];
    int max_pages, n, width;
    int32_t *page_table;        /* [n_seqs, max_pages] */
    int32_t *seq, *pos;         /* [n] */
    float *qkv;                 /* [n, width] */
};

/* Random cache contents, shuffled pages, and the batch's tokens interleaved across sequences. */
static void att_setup(const struct att_case *c, struct att_setup *s)
{
    memset(s, 0, sizeof *s);
    s->pool = (struct ds_kv_pool){.n_layers = 2, .n_kv_heads = c->nKV, .head_dim = c->hd,
                                  .page_size = c->page_size, .n_pages = c->n_pages};
    size_t cache = (size_t)2 * c->n_pages * c->page_size * c->nKV * c->hd;
    s->pool.k = rnd_vec(cache);
    s->pool.v = rnd_vec(cache);
    int32_t *perm = hmalloc((size_t)c->n_pages * sizeof *perm);
    for (int i = 0; i < c->n_pages; i++)
        perm[i] = i;
    for (int i = c->n_pages - 1; i > 0; i--) {
        int j = (int)(rnd_u32() % (uint32_t)(i + 1));
        int32_t tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    s->max_pages = 0;
    for (int q = 0; q < c->n_seqs; q++) {
        int need = (c->cached[q] + c->n_new[q] + c->page_size - 1) / c->page_size;
        if (need > s->max_pages)
            s->max_pages = need;
        s->n += c->n_new[q];
    }
    s->page_table = hmalloc((size_t)c->n_seqs * s->max_pages * sizeof(int32_t));
    for (size_t i = 0; i < (size_t)c->n_seqs * s->max_pages; i++)
        s->page_table[i] = -1;
    int next = 0;
    for (int q = 0; q < c->n_seqs; q++) {
        int need = (c->cached[q] + c->n_new[q] + c->page_size - 1) / c->page_size;
        s->seqs[q].pages = s->page_table + (size_t)q * s->max_pages;
        s->seqs[q].n_pages = s->seqs[q].cap = need;
        s->seqs[q].len = c->cached[q];
        for (int p = 0; p < need; p++)
            s->seqs[q].pages[p] = perm[next++];
    }
    if (next > c->n_pages) {
        fprintf(stderr, "attention case needs %d pages, has %d\n", next, c->n_pages);
        exit(1);
    }
    /* round-robin over sequences, a few tokens at a time, so chunks interleave */
    s->seq = hmalloc((size_t)s->n * sizeof(int32_t));
    s->pos = hmalloc((size_t)s->n * sizeof(int32_t));
    int done[ATT_MAX_SEQS] = {0}, t = 0;
    while (t < s->n)
        for (int q = 0; q < c->n_seqs; q++) {
            int take = 1 + (int)(rnd_u32() % 7);
            for (int k = 0; k < take && done[q] < c->n_new[q]; k++) {
                s->seq[t] = q;
                s->pos[t] = c->cached[q] + done[q]++;
                t++;
            }
        }
    s->width = (c->nH + 2 * c->nKV) * c->hd;
    s->qkv = rnd_vec((size_t)s->n * s->width);
}

/* The CPU engine's computation: append each token's K/V, then causal attention (as in forward-cpu.c). */
static void att_reference(const struct att_case *c, struct att_setup *s, float *out /* [n, nH hd] */)
{
    int hd = c->hd, nH = c->nH, nKV = c->nKV, group = nH / nKV, layer = 1;
    size_t row = (size_t)nKV * hd;
    for (int t = 0; t < s->n; t++) {
        const float *k = s->qkv + (size_t)t * s->width + (size_t)nH * hd, *v = k + row;
        memcpy(ds_kv_at(&s->pool, s->pool.k, &s->seqs[s->seq[t]], layer, s->pos[t]), k, row * sizeof(float));
        memcpy(ds_kv_at(&s->pool, s->pool.v, &s->seqs[s->seq[t]], layer, s->pos[t]), v, row * sizeof(float));
    }
    int max_pos = 0;
    for (int t = 0; t < s->n; t++)
        if (s->pos[t] > max_pos)
            max_pos = s->pos[t];
    float *scores = hmalloc((size_t)(max_pos + 1) * sizeof(float));
    float scale = 1.0f / sqrtf((float)hd);
    for (int t = 0; t < s->n; t++) {
        const struct ds_kv_seq *sq = &s->seqs[s->seq[t]];
        int pos = s->pos[t];
        for (int h = 0; h < nH; h++) {
            int g = h / group;
            const float *q = s->qkv + (size_t)t * s->width + (size_t)h * hd;
            float *o = out + ((size_t)t * nH + h) * hd;
            float mx = -INFINITY;
            for (int j = 0; j <= pos; j++) {
                scores[j] = ds_dot(q, ds_kv_at(&s->pool, s->pool.k, sq, layer, j) + (size_t)g * hd, hd) * scale;
                if (scores[j] > mx)
                    mx = scores[j];
            }
            float sum = 0;
            for (int j = 0; j <= pos; j++) {
                scores[j] = expf(scores[j] - mx);
                sum += scores[j];
            }
            float inv = 1.0f / sum;
            for (int d = 0; d < hd; d++)
                o[d] = 0;
            for (int j = 0; j <= pos; j++) {
                const float *vr = ds_kv_at(&s->pool, s->pool.v, sq, layer, j) + (size_t)g * hd;
                float w = scores[j] * inv;
                for (int d = 0; d < hd; d++)
                    o[d] += w * vr[d];
            }
        }
    }
}

/* The bf16 attention of the batch repeated to at least 2,048 tokens: far more items than the tensor-core
 * kernel has blocks, so each block takes many in turn (and, where a copy ends with the sequence the next
 * one starts with, a run joins the two copies' tokens). Every copy of a token must give the bits it gave
 * in the batch (gb). */
static bool att_repeated(const struct att_case *c, const struct att_setup *s, const void *d_kb, const void *d_vb,
                         const int32_t *d_pt, const uint16_t *gb, const char *name)
{
    int n = s->n, nH = c->nH, nKV = c->nKV, hd = c->hd, copies = (2048 + n - 1) / n, nb = n * copies;
    float *q = hmalloc((size_t)nb * s->width * sizeof(float));
    int32_t *seq = hmalloc((size_t)nb * 4), *pos = hmalloc((size_t)nb * 4);
    int32_t *rs = hmalloc((size_t)nb * 4), *rl = hmalloc((size_t)nb * 4);
    for (int r = 0; r < copies; r++) {
        memcpy(q + (size_t)r * n * s->width, s->qkv, (size_t)n * s->width * sizeof(float));
        memcpy(seq + (size_t)r * n, s->seq, (size_t)n * 4);
        memcpy(pos + (size_t)r * n, s->pos, (size_t)n * 4);
    }
    int longest = 0;
    int32_t n_runs = ds_k_attention_runs(seq, nb, nH, nKV, rs, rl, &longest);
    size_t ws_floats = ds_k_attention_workspace(nb, nH, hd), row = (size_t)nH * hd;
    float *d_ws = dpoison(ws_floats * sizeof(float));
    uint16_t *d_out = dpoison((size_t)nb * row * 2);
    if (!launched(ds_k_attention_bf16(dup_to_dev(q, (size_t)nb * s->width * sizeof(float)), s->width, d_kb, d_vb,
                                      dup_to_dev(seq, (size_t)nb * 4), dup_to_dev(pos, (size_t)nb * 4),
                                      dup_to_dev(rs, (size_t)nb * 4), dup_to_dev(rl, (size_t)nb * 4),
                                      dup_to_dev(&n_runs, 4), longest, d_pt, s->max_pages, c->page_size, nb, nH, nKV,
                                      hd, 1.0f / sqrtf((float)hd), d_ws, d_out, 0),
                  "attention_bf16, repeated batch"))
        return false;
    uint16_t *got = dup_to_host(d_out, (size_t)nb * row * 2);
    int differ = 0;
    for (int r = 0; r < copies; r++)
        differ += memcmp(got + (size_t)r * n * row, gb, (size_t)n * row * 2) != 0;
    printf("# %s: bf16, the batch %d times (%d tokens in %d runs): %d of %d copies differ\n", name, copies, nb,
           n_runs, differ, copies);
    return differ == 0;
}

static bool test_attention(const struct att_case *c, const char *name)
{
    struct att_setup s;
    att_setup(c, &s);
    int n = s.n, hd = c->hd, nH = c->nH, nKV = c->nKV;
    size_t layer_floats = (size_t)c->n_pages * c->page_size * nKV * hd;
    size_t cache_bytes = 2 * layer_floats * sizeof(float), out_floats = (size_t)n * nH * hd;
    float *d_k = dup_to_dev(s.pool.k, cache_bytes), *d_v = dup_to_dev(s.pool.v, cache_bytes);
    float *d_qkv = dup_to_dev(s.qkv, (size_t)n * s.width * sizeof(float));
    int32_t *d_seq = dup_to_dev(s.seq, (size_t)n * sizeof(int32_t)), *d_pos = dup_to_dev(s.pos, (size_t)n * sizeof(int32_t));
    int32_t *d_pt = dup_to_dev(s.page_table, (size_t)c->n_seqs * s.max_pages * sizeof(int32_t));
    float *d_out = dpoison(out_floats * sizeof(float));
    float scale = 1.0f / sqrtf((float)hd);
    float *d_ws = dpoison(ds_k_attention_workspace(n, nH, hd) * sizeof(float));
    int32_t *rs = hmalloc((size_t)n * 4), *rl = hmalloc((size_t)n * 4);
    int longest = 0;
    int32_t n_runs = ds_k_attention_runs(s.seq, n, nH, nKV, rs, rl, &longest);
    int32_t *d_rs = dup_to_dev(rs, (size_t)n * 4), *d_rl = dup_to_dev(rl, (size_t)n * 4);
    int32_t *d_nr = dup_to_dev(&n_runs, 4);
    int32_t one_run[3] = {0, 1, 1};   /* start, length, count */
    int32_t *d_one_run = dup_to_dev(one_run, sizeof one_run);
    printf("# %s: %d tokens in %d runs\n", name, n, n_runs);

    if (!launched(ds_k_kv_append(d_qkv + (size_t)nH * hd, s.width, d_qkv + (size_t)(nH + nKV) * hd, s.width, d_seq,
                                 d_pos, d_pt, s.max_pages, c->page_size, n, nKV, hd, d_k + layer_floats,
                                 d_v + layer_floats, 0), "kv_append"))
        return false;
    if (!launched(ds_k_attention(d_qkv, s.width, d_k + layer_floats, d_v + layer_floats, d_seq, d_pos, d_rs, d_rl,
                                 d_nr, longest, d_pt, s.max_pages, c->page_size, n, nH, nKV, hd, scale, d_ws, d_out,
                                 0), "attention"))
        return false;
    /* the other block shape (4 or 8 warps) gives the same bits */
    float *d_other = dpoison(out_floats * sizeof(float));
    int other = longest * (nH / nKV) > 16 ? 1 : 32;
    if (!launched(ds_k_attention(d_qkv, s.width, d_k + layer_floats, d_v + layer_floats, d_seq, d_pos, d_rs, d_rl,
                                 d_nr, other, d_pt, s.max_pages, c->page_size, n, nH, nKV, hd, scale, d_ws, d_other,
                                 0), "attention, other block shape"))
        return false;
    float *ref = hmalloc(out_floats * sizeof(float));
    att_reference(c, &s, ref);
    char what[128];
    snprintf(what, sizeof what, "%s: paged K cache after append", name);
    bool ok = same_bits(what, dup_to_host(d_k, cache_bytes), s.pool.k, cache_bytes);
    snprintf(what, sizeof what, "%s: paged V cache after append", name);
    ok = same_bits(what, dup_to_host(d_v, cache_bytes), s.pool.v, cache_bytes) && ok;
    float *got = dup_to_host(d_out, out_floats * sizeof(float));
    ok = close_enough(name, got, ref, out_floats, 1e-5) && ok;
    snprintf(what, sizeof what, "%s: %d warps per block vs %d", name, longest * (nH / nKV) > 16 ? 8 : 4,
             longest * (nH / nKV) > 16 ? 4 : 8);
    ok = same_bits(what, dup_to_host(d_other, out_floats * sizeof(float)), got, out_floats * sizeof(float)) && ok;

    /* the bf16 cache and output: the same function up to bf16 rounding */
    size_t half_bytes = 2 * layer_floats * 2;
    uint16_t *d_kb = dpoison(half_bytes), *d_vb = dpoison(half_bytes), *d_ob = dpoison(out_floats * 2);
    if (!launched(ds_k_kv_append_bf16(d_qkv + (size_t)nH * hd, s.width, d_qkv + (size_t)(nH + nKV) * hd, s.width,
                                      d_seq, d_pos, d_pt, s.max_pages, c->page_size, n, nKV, hd, d_kb,
                                      d_vb, 0), "kv_append_bf16"))
        return false;
    snprintf(what, sizeof what, "%s: bf16 cache, bf16 out", name);
    {
        /* reference: f32 attention over the bf16-rounded rows the bf16 append wrote */
        uint16_t *hk = dup_to_host(d_kb, half_bytes), *hv = dup_to_host(d_vb, half_bytes);
        float *fk = hmalloc(layer_floats * 4), *fv = hmalloc(layer_floats * 4);
        bool all_written = true;
        for (int t = 0; t < n; t++) {
            int pg = s.page_table[(size_t)s.seq[t] * s.max_pages + s.pos[t] / c->page_size];
            size_t off = ((size_t)pg * c->page_size + s.pos[t] % c->page_size) * nKV * hd;
            for (int i = 0; i < nKV * hd; i++)
                if (hk[off + i] == 0xffff || hv[off + i] == 0xffff)
                    all_written = false;
        }
        /* positions the batch did not write: take them from the f32 cache, rounded */
        for (size_t i = 0; i < layer_floats; i++) {
            fk[i] = bf16_to_f32(hk[i] == 0xffff ? f32_to_bf16(s.pool.k[layer_floats + i]) : hk[i]);
            fv[i] = bf16_to_f32(hv[i] == 0xffff ? f32_to_bf16(s.pool.v[layer_floats + i]) : hv[i]);
            hk[i] = f32_to_bf16(fk[i]);
            hv[i] = f32_to_bf16(fv[i]);
        }
        if (!all_written)
            printf("# %s: the bf16 append left rows unwritten\n", name);
        ok = all_written && ok;
        uint16_t *d_kb2 = dup_to_dev(hk, layer_floats * 2), *d_vb2 = dup_to_dev(hv, layer_floats * 2);
        float *d_fk = dup_to_dev(fk, layer_floats * 4), *d_fv = dup_to_dev(fv, layer_floats * 4);
        float *d_ref = dpoison(out_floats * 4);
        if (!launched(ds_k_attention_bf16(d_qkv, s.width, d_kb2, d_vb2, d_seq, d_pos, d_rs, d_rl, d_nr, longest, d_pt,
                                          s.max_pages, c->page_size,
                                          n, nH, nKV, hd, scale, d_ws, d_ob, 0), "attention_bf16") ||
            !launched(ds_k_attention(d_qkv, s.width, d_fk, d_fv, d_seq, d_pos, d_rs, d_rl, d_nr, longest, d_pt,
                                     s.max_pages,
                                     c->page_size, n,
                                     nH, nKV, hd, scale, d_ws, d_ref, 0), "attention on rounded rows"))
            return false;
        uint16_t *gb = dup_to_host(d_ob, out_floats * 2);
        float *gf = hmalloc(out_floats * 4);
        for (size_t i = 0; i < out_floats; i++)
            gf[i] = gb[i] == 0xffff ? NAN : bf16_to_f32(gb[i]);
        ok = close_enough(what, gf, dup_to_host(d_ref, out_floats * 4), out_floats, 8e-3) && ok;
        /* batch invariance of the bf16 path: a token alone gives the same bits */
        int alone_b[3] = {0, n / 2, n - 1};
        for (int i = 0; i < 3; i++) {
            int t = alone_b[i];
            uint16_t *d_one = dpoison((size_t)nH * hd * 2);
            if (!launched(ds_k_attention_bf16(d_qkv + (size_t)t * s.width, s.width, d_kb2, d_vb2, d_seq + t,
                                              d_pos + t, d_one_run, d_one_run + 1, d_one_run + 2, 1, d_pt,
                                              s.max_pages, c->page_size, 1, nH, nKV, hd, scale, d_ws, d_one, 0),
                          "attention_bf16, one token"))
                return false;
            snprintf(what, sizeof what, "%s: bf16, token %d alone (seq %d pos %d)", name, t, s.seq[t], s.pos[t]);
            ok = same_bits(what, dup_to_host(d_one, (size_t)nH * hd * 2), gb + (size_t)t * nH * hd,
                           (size_t)nH * hd * 2) && ok;
        }
        if (c->repeat)
            ok = att_repeated(c, &s, d_kb2, d_vb2, d_pt, gb, name) && ok;
    }

    /* batch invariance: the first, a middle and the last token alone give the same bits */
    int alone[3] = {0, n / 2, n - 1};
    for (int i = 0; i < 3; i++) {
        int t = alone[i];
        float *d_one = dpoison((size_t)nH * hd * sizeof(float));
        if (!launched(ds_k_attention(d_qkv + (size_t)t * s.width, s.width, d_k + layer_floats, d_v + layer_floats,
                                     d_seq + t, d_pos + t, d_one_run, d_one_run + 1, d_one_run + 2, 1, d_pt,
                                     s.max_pages, c->page_size, 1, nH, nKV, hd, scale,
                                     d_ws, d_one, 0), "attention, one token"))
            return false;
        snprintf(what, sizeof what, "%s: token %d alone (seq %d pos %d)", name, t, s.seq[t], s.pos[t]);
        ok = same_bits(what, dup_to_host(d_one, (size_t)nH * hd * sizeof(float)), got + (size_t)t * nH * hd,
                       (size_t)nH * hd * sizeof(float)) && ok;
    }
    return ok;
}

/* 3 sequences: a prefill chunk crossing a page boundary after 63 cached
 * positions, a decode token after 250, and a decode token on the first slot of a page. */
static bool test_attention_ragged(void)
{
    struct att_case c = {.nH = 16, .nKV = 4, .hd = 128, .page_size = 16, .n_pages = 64, .n_seqs = 3,
                         .cached = {63, 250, 32}, .n_new = {37, 1, 1}};
    return test_attention(&c, "attention ragged (GQA 4, hd 128)");
}

/* 24 sequences of 8 new tokens each (GQA 4, hd 128, interleaved in chunks of 1 to 7, so runs of at
 * most 7 tokens) at contexts 40 to 360: more (run, KV head, group) items than the tensor-core kernel
 * has blocks, so each block takes several groups of a (run, KV head) in turn and reuses their
 * queries; tokens alone (one item a block) must give the same bits. */
static bool test_attention_many_runs(void)
{
    struct att_case c = {.nH = 16, .nKV = 4, .hd = 128, .page_size = 16, .n_pages = 24 * 24, .n_seqs = 24};
    for (int i = 0; i < c.n_seqs; i++) {
        c.cached[i] = 40 + 14 * i - (i % 3);
        c.n_new[i] = 8;
    }
    return test_attention(&c, "attention, 24 verify blocks (GQA 4, hd 128)");
}

/* hd 64 without GQA: a fresh prefill from position 0, a verify block of 5 and a decode. */
static bool test_attention_hd64(void)
{
    struct att_case c = {.nH = 8, .nKV = 8, .hd = 64, .page_size = 8, .n_pages = 48, .n_seqs = 3,
                         .cached = {0, 41, 7}, .n_new = {40, 5, 1}};
    return test_attention(&c, "attention ragged (MHA, hd 64)");
}

/* Long contexts: each position group covers several tiles (double-buffered loads), GQA 4. */
static bool test_attention_long(void)
{
    struct att_case c = {.nH = 32, .nKV = 8, .hd = 128, .page_size = 16, .n_pages = 112, .n_seqs = 2,
                         .cached = {1000, 613}, .n_new = {9, 1}};
    return test_attention(&c, "attention, long contexts (GQA 4, hd 128)");
}

/* Contexts past 8,192 positions: every position group of the tensor-core kernel holds tiles, each
 * several runs of them; a verify block of 8 at 9,000, a decode at 4,100 and a block of 3
 * at 2,300 (GQA 4, hd 128). */
static bool test_attention_very_long(void)
{
    struct att_case c = {.nH = 32, .nKV = 8, .hd = 128, .page_size = 16, .n_pages = 1000, .n_seqs = 3,
                         .cached = {9000, 4100, 2300}, .n_new = {8, 1, 3}};
    return test_attention(&c, "attention, contexts up to 9,008 (GQA 4, hd 128)");
}

/* Many (run, group, KV head) items: more than the tensor-core kernel's blocks that fit an H200 at once (264 to
 * 396), so blocks take several items in turn. 160 tokens of 4 sequences, GQA 4, hd 128. */
static bool test_attention_many_items(void)
{
    struct att_case c = {.nH = 32, .nKV = 8, .hd = 128, .page_size = 16, .n_pages = 64, .n_seqs = 4,
                         .cached = {300, 0, 129, 60}, .n_new = {40, 40, 40, 40}};
    return test_attention(&c, "attention, many items (GQA 4, hd 128)");
}

/* Pages of 12 positions (not a power of two: divisions, not shifts), a verify block of 8, GQA 4, hd 128. */
static bool test_attention_odd_pages(void)
{
    struct att_case c = {.nH = 8, .nKV = 2, .hd = 128, .page_size = 12, .n_pages = 32, .n_seqs = 2,
                         .cached = {100, 29}, .n_new = {8, 1}};
    return test_attention(&c, "attention, pages of 12 positions (GQA 4, hd 128)");
}

/* Decoding: runs of one or two tokens of several sequences (GQA 4, hd 128; then GQA 8, hd 64). */
static bool test_attention_decode(void)
{
    struct att_case c = {.nH = 32, .nKV = 8, .hd = 128, .page_size = 16, .n_pages = 80, .n_seqs = 4,
                         .cached = {500, 17, 0, 255}, .n_new = {1, 2, 1, 2}, .repeat = true};
    struct att_case c8 = {.nH = 16, .nKV = 2, .hd = 64, .page_size = 16, .n_pages = 32, .n_seqs = 2,
                          .cached = {33, 90}, .n_new = {1, 1}};
    bool ok = test_attention(&c, "attention, decoding (GQA 4, hd 128)");
    return test_attention(&c8, "attention, decoding (GQA 8, hd 64)") && ok;
}

/* hd 24 (not a multiple of 32: lanes past hd idle), GQA 2. */
static bool test_attention_hd24(void)
{
    struct att_case c = {.nH = 4, .nKV = 2, .hd = 24, .page_size = 4, .n_pages = 64, .n_seqs = 2,
                         .cached = {9, 0}, .n_new = {3, 30}};
    return test_attention(&c, "attention ragged (GQA 2, hd 24)");
}

/* ---- the bf16 product ---- */
/* y = x·wᵀ (+ y0) in double from the bf16 values. */
static void gemm_reference(const uint16_t *x, const uint16_t *w, const float *y0, int M, int N, int K, float *y)
{
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double acc = y0 ? y0[(size_t)m * N + n] : 0.0;
            for (int k = 0; k < K; k++)
                acc += (double)bf16_to_f32(x[(size_t)m * K + k]) * bf16_to_f32(w[(size_t)n * K + k]);
            y[(size_t)m * N + n] = (float)acc;
        }
}

static uint16_t *rnd_bf16(size_t n)
{
    uint16_t *p = hmalloc(n * 2);
    for (size_t i = 0; i < n; i++)
        p[i] = f32_to_bf16(rnd_f());
    return p;
}

static struct ds_k_gemm_lt *lt;   /* cuBLASLt for the products (NULL where it could not be set up) */

static bool gemm_case(struct ds_k_gemm_lt *with, int M, int N, int K, int split, bool accumulate)
{
    uint16_t *x = rnd_bf16((size_t)M * K), *w = rnd_bf16((size_t)N * K);
    float *y0 = accumulate ? rnd_vec((size_t)M * N) : NULL;
    float *d_y = accumulate ? dup_to_dev(y0, (size_t)M * N * 4) : dpoison((size_t)M * N * 4);
    float *d_ws = dpoison(ds_k_gemm_workspace(M, N, split) * 4 + 4);
    cudaMemset(d_ws, 0, ds_k_gemm_workspace(M, N, split) * 4);   /* the tile counters */
    if (!launched(ds_k_gemm_bf16(with, dup_to_dev(x, (size_t)M * K * 2), K, dup_to_dev(w, (size_t)N * K * 2), M, N, K,
                                 split, d_ws, d_y, N, accumulate, 0), "gemm_bf16"))
        return false;
    float *ref = hmalloc((size_t)M * N * 4);
    gemm_reference(x, w, y0, M, N, K, ref);
    char what[128];
    snprintf(what, sizeof what, "gemm %d x %d x %d, split %d%s%s", M, N, K, split, accumulate ? ", accumulate" : "",
             with ? ", cuBLASLt" : "");
    return close_enough(what, dup_to_host(d_y, (size_t)M * N * 4), ref, (size_t)M * N, 2e-5);
}

static bool test_gemm(void)
{
    bool ok = lt != NULL;
    if (!ok)
        printf("# cuBLASLt could not be set up\n");
    for (int i = 0; i < 2; i++) {   /* the kernels alone, then with cuBLASLt */
        struct ds_k_gemm_lt *with = i ? lt : NULL;
        ok = gemm_case(with, 1, 200, 264, 1, false) && ok;                              /* partial tiles in n and k */
        ok = gemm_case(with, 7, 300, 1024, ds_k_gemm_split(300, 1024, 132), false) && ok;
        ok = gemm_case(with, 64, 128, 64, 1, true) && ok;
        ok = gemm_case(with, 130, 520, 2560, 3, true) && ok;
        ok = gemm_case(with, 300, 96, 48, 1, false) && ok;
        ok = gemm_case(with, 200, 384, 1024, 4, true) && ok;
        ok = gemm_case(with, 16, 268800, 64, 2, true) && ok;   /* more tiles than counters: the separate sum */
        ok = gemm_case(with, 40, 302, 1024, 3, true) && ok;    /* the separate sum one column a thread (N % 4) */
    }
    return ok;
}

/* A row's result is the same bits whatever the batch size, the row's place in it and whether cuBLASLt or the
 * kernels computed it: rows alone and in batches of several sizes (with cuBLASLt taking the larger ones)
 * against the kernels alone on the whole batch. max_ranges > 0 caps the k ranges as the draft's layers do. */
static bool gemm_invariance_case(int N, int K, bool accumulate, int max_ranges)
{
    int M = 300;
    int split = ds_k_gemm_split_at_most(ds_k_gemm_split(N, K, 132), K, max_ranges);
    uint16_t *x = rnd_bf16((size_t)M * K), *w = rnd_bf16((size_t)N * K);
    float *y0 = rnd_vec((size_t)M * N);
    uint16_t *d_x = dup_to_dev(x, (size_t)M * K * 2), *d_w = dup_to_dev(w, (size_t)N * K * 2);
    float *d_ws = dpoison(ds_k_gemm_workspace(M, N, split) * 4 + 4);
    cudaMemset(d_ws, 0, ds_k_gemm_workspace(M, N, split) * 4);   /* the tile counters */
    float *d_y = accumulate ? dup_to_dev(y0, (size_t)M * N * 4) : dpoison((size_t)M * N * 4);
    printf("# %d x %d, split %d%s\n", N, K, split, accumulate ? ", accumulate" : "");
    if (!launched(ds_k_gemm_bf16(NULL, d_x, K, d_w, M, N, K, split, d_ws, d_y, N, accumulate, 0), "gemm, full batch"))
        return false;
    float *full = dup_to_host(d_y, (size_t)M * N * 4);
    bool ok = true;
    size_t lt_before = ds_k_gemm_lt_launches(lt);
    /* 1 to 4 rows stay with the kernels; 5 rows and more are cuBLASLt's, whose heuristic picks other
     * algorithms at few rows */
    const int starts[10] = {0, 0, 63, 150, 299, 100, 40, 7, 201, 270};
    const int sizes[10] = {300, 1, 37, 2, 1, 150, 17, 5, 8, 16};
    for (int i = 0; i < 10; i++) {
        int m0 = starts[i], mm = sizes[i];
        float *d_part = accumulate ? dup_to_dev(y0 + (size_t)m0 * N, (size_t)mm * N * 4) : dpoison((size_t)mm * N * 4);
        if (!launched(ds_k_gemm_bf16(lt, d_x + (size_t)m0 * K, K, d_w, mm, N, K, split, d_ws, d_part, N, accumulate, 0),
                      "gemm, part of the batch"))
            return false;
        char what[128];
        snprintf(what, sizeof what, "gemm rows %d..%d (cuBLASLt where it serves) vs the kernels on a batch of %d", m0,
                 m0 + mm - 1, M);
        ok = same_bits(what, dup_to_host(d_part, (size_t)mm * N * 4), full + (size_t)m0 * N, (size_t)mm * N * 4) && ok;
    }
    if (ds_k_gemm_lt_launches(lt) == lt_before) {   /* every batch of more than 4 rows is cuBLASLt's */
        printf("# cuBLASLt never ran: the kernels computed every part\n");
        ok = false;
    }
    /* the same parts with a split's k ranges run in turn (each adding to y) wherever cuBLASLt takes the pass:
     * one product a range */
    ds_k_gemm_lt_set_in_turn_rows(lt, 1);
    float *d_turn = dpoison((size_t)M * N * 4), *turn = hmalloc((size_t)M * N * 4);   /* one buffer each */
    for (int i = 0; i < 10; i++) {
        int m0 = starts[i], mm = sizes[i];
        size_t bytes = (size_t)mm * N * 4, launches = ds_k_gemm_lt_launches(lt);
        if ((accumulate ? cudaMemcpy(d_turn, y0 + (size_t)m0 * N, bytes, cudaMemcpyHostToDevice)
                        : cudaMemset(d_turn, 0xff, bytes)) != cudaSuccess ||
            !launched(ds_k_gemm_bf16(lt, d_x + (size_t)m0 * K, K, d_w, mm, N, K, split, d_ws, d_turn, N, accumulate, 0),
                      "gemm, part of the batch, ranges in turn") ||
            cudaMemcpy(turn, d_turn, bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
            return false;
        launches = ds_k_gemm_lt_launches(lt) - launches;
        size_t want = split == 1 || mm > 4 ? (size_t)split : 0;   /* what cuBLASLt takes (kernels: 0) */
        char what[160];
        snprintf(what, sizeof what, "gemm rows %d..%d (cuBLASLt's ranges in turn where it serves) vs the kernels on a "
                 "batch of %d", m0, m0 + mm - 1, M);
        ok = same_bits(what, turn, full + (size_t)m0 * N, bytes) && ok;
        if (launches != want) {
            printf("# %s: %zu cuBLASLt products, %zu meant\n", what, launches, want);
            ok = false;
        }
    }
    ds_k_gemm_lt_set_in_turn_rows(lt, -1);   /* the default again */
    /* 33 to 47 rows share the class of 48 (37 rows above asked for it): the heuristic is not asked again
     * for each, and each still gives the kernels' bits */
    size_t asked = ds_k_gemm_lt_heuristics(lt);
    float *d_rows = dpoison((size_t)47 * N * 4), *rows = hmalloc((size_t)47 * N * 4);   /* one buffer each */
    for (int mm = 33; mm <= 47; mm++) {
        size_t bytes = (size_t)mm * N * 4;
        if ((accumulate ? cudaMemcpy(d_rows, y0, bytes, cudaMemcpyHostToDevice) : cudaMemset(d_rows, 0xff, bytes)) !=
                cudaSuccess ||
            !launched(ds_k_gemm_bf16(lt, d_x, K, d_w, mm, N, K, split, d_ws, d_rows, N, accumulate, 0),
                      "gemm, 33 to 47 rows") ||
            cudaMemcpy(rows, d_rows, bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
            return false;
        char what[128];
        snprintf(what, sizeof what, "gemm rows 0..%d through cuBLASLt (the class of 48 rows) vs the kernels", mm - 1);
        ok = same_bits(what, rows, full, bytes) && ok;
    }
    asked = ds_k_gemm_lt_heuristics(lt) - asked;
    if (asked > 2) {   /* at most one a group of k ranges, where the class's choice would not fit */
        printf("# cuBLASLt's heuristic was asked %zu times for 15 row counts of one class\n", asked);
        ok = false;
    }
    return ok;
}

static bool test_gemm_invariance(void)
{
    bool ok = lt != NULL && ds_k_gemm_split(384, 1024, 132) == 4 && ds_k_gemm_split(384, 256, 132) == 1 &&
              ds_k_gemm_split(384, 1176, 132) == 4 && ds_k_gemm_split_at_most(4, 1176, 2) == 2 &&
              ds_k_gemm_split_at_most(9, 9728, 2) == 2 && ds_k_gemm_split_at_most(1, 1024, 2) == 1 &&
              ds_k_gemm_split_at_most(4, 1024, 8) == 4 && ds_k_gemm_split_at_most(3, 40, 2) == 2 &&
              ds_k_gemm_split_at_most(5, 1024, 0) == 5;
    if (!ok)
        printf("# no cuBLASLt, or the shapes do not split k as meant\n");
    ok = gemm_invariance_case(384, 1024, false, 0) && ok;   /* k split in 4 equal ranges: one batch for cuBLASLt */
    ok = gemm_invariance_case(384, 1024, true, 0) && ok;
    ok = gemm_invariance_case(384, 1176, true, 0) && ok;    /* 3 ranges of 320 and one of 216: a batch, then one */
    ok = gemm_invariance_case(384, 1176, true, 2) && ok;    /* capped as a draft layer's: ranges of 608 and 568 */
    ok = gemm_invariance_case(384, 256, false, 0) && ok;    /* no split: cuBLASLt takes every size */
    ok = gemm_invariance_case(384, 256, true, 0) && ok;
    return ok;
}

/* A pass of 1,100 rows, where cuBLASLt runs the k ranges in turn at the default threshold, into columns
 * 40.. of a wider y (row stride N + 72), adding to it and not: the kernels' bits into a y of its own, one
 * cuBLASLt product a range, and the columns around it untouched. */
static bool test_gemm_in_turn(void)
{
    int M = 1100, N = 384, K = 1024, ld = N + 72, off = 40, split = ds_k_gemm_split(N, K, 132);
    bool ok = lt != NULL && split == 4;
    uint16_t *x = rnd_bf16((size_t)M * K), *w = rnd_bf16((size_t)N * K);
    uint16_t *d_x = dup_to_dev(x, (size_t)M * K * 2), *d_w = dup_to_dev(w, (size_t)N * K * 2);
    float *y0 = rnd_vec((size_t)M * ld), *own = hmalloc((size_t)M * N * 4), *wide = hmalloc((size_t)M * ld * 4);
    for (int m = 0; m < M; m++)
        memcpy(own + (size_t)m * N, y0 + (size_t)m * ld + off, (size_t)N * 4);
    float *d_ws = dpoison(ds_k_gemm_workspace(M, N, split) * 4 + 4);
    cudaMemset(d_ws, 0, ds_k_gemm_workspace(M, N, split) * 4);   /* the tile counters */
    float *d_own = dpoison((size_t)M * N * 4), *d_wide = dpoison((size_t)M * ld * 4);
    for (int accumulate = 0; accumulate < 2 && ok; accumulate++) {
        size_t launches = ds_k_gemm_lt_launches(lt);
        if (cudaMemcpy(d_own, own, (size_t)M * N * 4, cudaMemcpyHostToDevice) != cudaSuccess ||
            cudaMemcpy(d_wide, y0, (size_t)M * ld * 4, cudaMemcpyHostToDevice) != cudaSuccess ||
            !launched(ds_k_gemm_bf16(NULL, d_x, K, d_w, M, N, K, split, d_ws, d_own, N, accumulate, 0),
                      "gemm, the kernels") ||
            !launched(ds_k_gemm_bf16(lt, d_x, K, d_w, M, N, K, split, d_ws, d_wide + off, ld, accumulate, 0),
                      "gemm, ranges in turn into a wider y"))
            return false;
        launches = ds_k_gemm_lt_launches(lt) - launches;
        float *got = dup_to_host(d_own, (size_t)M * N * 4);
        if (cudaMemcpy(wide, d_wide, (size_t)M * ld * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
            return false;
        size_t differ = 0, touched = 0;
        for (int m = 0; m < M; m++)
            for (int c = 0; c < ld; c++) {
                const float *v = wide + (size_t)m * ld + c;
                if (c >= off && c < off + N)
                    differ += memcmp(v, got + (size_t)m * N + c - off, 4) != 0;
                else
                    touched += memcmp(v, y0 + (size_t)m * ld + c, 4) != 0;
            }
        printf("# %d x %d x %d, split %d%s, into columns %d.. of rows of %d: %zu cuBLASLt products, %zu of %zu "
               "elements other bits than the kernels', %zu outside touched\n", M, N, K, split,
               accumulate ? ", accumulate" : "", off, ld, launches, differ, (size_t)M * N, touched);
        ok = launches == (size_t)split && differ == 0 && touched == 0;
    }
    return ok;
}

/* A product whose x is made on the way in (RMSNorm or SwiGLU of f32 rows) against the rows made by their own
 * kernel and then the product: the same bits. in_product: the product should make the rows itself
 * (decoding's few rows), leaving x->x as it was. */
static bool gemm_made_x_case(struct ds_k_gemm_lt *with, enum ds_k_x_kind kind, int M, int N, int K, bool accumulate,
                             bool in_product, int max_ranges)
{
    int split = ds_k_gemm_split_at_most(ds_k_gemm_split(N, K, 132), K, max_ranges), src_w = kind == DS_K_X_SWIGLU ? 2 * K : K;
    float *src = rnd_vec((size_t)M * src_w), *g = rnd_vec(K), *y0 = rnd_vec((size_t)M * N);
    uint16_t *w = rnd_bf16((size_t)N * K);
    uint16_t *d_w = dup_to_dev(w, (size_t)N * K * 2);
    size_t wsf = ds_k_gemm_workspace(M, N, split);
    float *d_ws = dpoison(wsf * 4 + 4);
    cudaMemset(d_ws, 0, wsf * 4);   /* the tile counters */
    uint16_t *d_made = dpoison((size_t)M * K * 2), *d_apart = dpoison((size_t)M * K * 2);
    float *d_y = accumulate ? dup_to_dev(y0, (size_t)M * N * 4) : dpoison((size_t)M * N * 4);
    float *d_ref = accumulate ? dup_to_dev(y0, (size_t)M * N * 4) : dpoison((size_t)M * N * 4);
    struct ds_k_x in = {.kind = kind, .x = d_made, .ldx = K, .src = dup_to_dev(src, (size_t)M * src_w * 4),
                        .norm_w = kind == DS_K_X_RMSNORM ? dup_to_dev(g, (size_t)K * 4) : NULL, .eps = 1e-6f};
    struct ds_k_x apart = in;
    apart.x = d_apart;
    char what[160];
    snprintf(what, sizeof what, "%s x made on the way in: %d x %d x %d, split %d%s%s",
             kind == DS_K_X_RMSNORM ? "RMSNorm" : "SwiGLU", M, N, K, split, accumulate ? ", accumulate" : "",
             with ? ", cuBLASLt" : "");
    if (!launched(ds_k_gemm_bf16_x(with, &in, d_w, M, N, K, split, d_ws, d_y, N, accumulate, 0), what) ||
        !launched(ds_k_x_make(&apart, M, K, 0), "the rows apart") ||
        !launched(ds_k_gemm_bf16(with, d_apart, K, d_w, M, N, K, split, d_ws, d_ref, N, accumulate, 0),
                  "the product apart"))
        return false;
    bool ok = same_bits(what, dup_to_host(d_y, (size_t)M * N * 4), dup_to_host(d_ref, (size_t)M * N * 4),
                        (size_t)M * N * 4);
    uint16_t *made = dup_to_host(d_made, (size_t)M * K * 2);
    bool untouched = true;
    for (size_t i = 0; i < (size_t)M * K; i++)
        untouched = untouched && made[i] == 0xffff;
    if (in_product != untouched) {
        printf("# %s: the rows were %s\n", what, untouched ? "made in the product, not as meant" : "written apart, not "
               "made in the product as meant");
        ok = false;
    }
    if (!untouched)
        ok = same_bits("the rows written by the made-x product", made, dup_to_host(d_apart, (size_t)M * K * 2),
                       (size_t)M * K * 2) && ok;
    return ok;
}

static bool test_gemm_made_x(void)
{
    bool ok = ds_k_gemm_split(6144, 2560, 132) == 4 && ds_k_gemm_split(64, 968, 132) == 3 &&
              ds_k_gemm_split(2560, 9728, 132) == 9 && ds_k_gemm_split(512, 480, 132) == 1;
    if (!ok)
        printf("# the shapes do not split k as meant\n");
    ok = gemm_made_x_case(lt, DS_K_X_RMSNORM, 1, 6144, 2560, false, true, 0) && ok;    /* qkv of a 4B at one row */
    ok = gemm_made_x_case(NULL, DS_K_X_RMSNORM, 3, 64, 968, true, true, 0) && ok;      /* uneven k ranges */
    ok = gemm_made_x_case(lt, DS_K_X_SWIGLU, 1, 2560, 9728, false, true, 0) && ok;    /* down of a 4B at one row */
    ok = gemm_made_x_case(lt, DS_K_X_SWIGLU, 4, 2560, 9728, true, false, 0) && ok;    /* at four rows: apart (9 KiB) */
    ok = gemm_made_x_case(NULL, DS_K_X_SWIGLU, 5, 200, 264, false, false, 0) && ok;   /* too many rows to make */
    ok = gemm_made_x_case(lt, DS_K_X_RMSNORM, 2, 512, 480, false, false, 0) && ok;    /* unsplit: cuBLASLt's */
    ok = gemm_made_x_case(lt, DS_K_X_RMSNORM, 1, 512, 480, true, true, 0) && ok;      /* but one row makes its own */
    ok = gemm_made_x_case(NULL, DS_K_X_RMSNORM, 2, 512, 480, false, true, 0) && ok;   /* the kernels' */
    ok = gemm_made_x_case(NULL, DS_K_X_RMSNORM, 16, 64, 968, true, false, 0) && ok;
    /* k in 4 ranges, not 9 (ds_cuda_opts.max_ranges): each block makes a longer range */
    ok = gemm_made_x_case(lt, DS_K_X_SWIGLU, 1, 2560, 9728, true, false, 4) && ok;  /* SwiGLU: apart (4.75 KiB) */
    ok = gemm_made_x_case(lt, DS_K_X_RMSNORM, 3, 2560, 4096, true, true, 4) && ok;
    return ok;
}

static bool test_rmsnorm_bf16(void)
{
    int n = 9, H = 1000, rows[3] = {8, 0, 4};
    float *x = rnd_vec((size_t)n * H), *w = rnd_vec(H);
    int32_t *d_rows = dup_to_dev(rows, sizeof rows);
    uint16_t *d_out = dpoison(3 * (size_t)H * 2);
    if (!launched(ds_k_rmsnorm_bf16(dup_to_dev(x, (size_t)n * H * 4), d_rows, dup_to_dev(w, (size_t)H * 4), 3, H, 1e-6f,
                                    d_out, 0), "rmsnorm_bf16"))
        return false;
    uint16_t *got = dup_to_host(d_out, 3 * (size_t)H * 2);
    float *gf = hmalloc(3 * (size_t)H * 4), *ref = hmalloc(3 * (size_t)H * 4);
    for (int i = 0; i < 3; i++)
        ds_rmsnorm(x + (size_t)rows[i] * H, w, H, 1e-6f, ref + (size_t)i * H);
    for (size_t i = 0; i < 3 * (size_t)H; i++)
        gf[i] = got[i] == 0xffff ? NAN : bf16_to_f32(got[i]);
    return close_enough("rmsnorm of chosen rows, bf16 out", gf, ref, 3 * (size_t)H, 4e-3);
}

/* Shapes the kernels do not support are refused, with nothing launched. */
static bool test_invalid(void)
{
    bool ok = true;
    float *d = dpoison(1024 * sizeof(float));
    int32_t *di = dpoison(16 * sizeof(int32_t));
    if (ds_k_attention(d, 258 * 2, d, d, di, di, di, di, di, 1, di, 1, 16, 1, 2, 1, 258, 1.0f, d, d, 0) !=
        cudaErrorInvalidValue) {
        printf("# attention with hd 258 was not refused\n");
        ok = false;
    }
    if (ds_k_attention(d, 128 * 3, d, d, di, di, di, di, di, 1, di, 1, 16, 1, 3, 2, 128, 1.0f, d, d, 0) !=
        cudaErrorInvalidValue) {
        printf("# attention with 3 heads over 2 KV heads was not refused\n");
        ok = false;
    }
    if (ds_k_rmsnorm(d, d, -1, 8, 1e-6f, d, 0) != cudaErrorInvalidValue) {
        printf("# rmsnorm with n = -1 was not refused\n");
        ok = false;
    }
    if (ds_k_qk_norm_rope(d, 7, d, 7, d, d, d, di, 1, 1, 1, 7, 1e-6f, 0) != cudaErrorInvalidValue) {
        printf("# qk_norm_rope with odd hd was not refused\n");
        ok = false;
    }
    if (ds_k_argmax(d, 7, 1, 8, di, 0) != cudaErrorInvalidValue ||
        ds_k_argmax_prob(d, 7, 1, 8, di, d, 0) != cudaErrorInvalidValue) {
        printf("# argmax with a row stride below V was not refused\n");
        ok = false;
    }
    if (ds_k_swiglu_bf16(d, 1 << 16, 1 << 15, (uint16_t *)d, 0) != cudaErrorInvalidValue) {
        printf("# swiglu_bf16 of 2^31 elements (past its 32-bit indices) was not refused\n");
        ok = false;
    }
    if (ds_k_swiglu(d, 0, 8, d, 0) != cudaSuccess || ds_k_argmax(d, 8, 0, 8, di, 0) != cudaSuccess) {
        printf("# an empty batch was refused\n");
        ok = false;
    }
    return launched(cudaSuccess, "after refused launches") && ok;
}

/* ---- sampling (sample.cu) against ds_probs / ds_sample_probs ---- */
/* How a test row's logits are made. */
enum row_kind { ROW_RANDOM, ROW_TIES, ROW_EQUAL, ROW_MAX_TIE, ROW_PEAKED };

struct prob_case {
    float temperature, top_p;
    int top_k;                   /* < 0: that many tokens short of V */
    enum row_kind kind;
};

static void make_logits(float *x, int V, enum row_kind kind)
{
    for (int i = 0; i < V; i++) {
        float l = 6.0f * rnd_f();
        switch (kind) {
        case ROW_RANDOM: x[i] = l; break;
        case ROW_TIES: x[i] = floorf(l * 0.5f) * 0.75f; break;   /* about 7 distinct values, many exact ties */
        case ROW_EQUAL: x[i] = 0.5f; break;
        case ROW_MAX_TIE: x[i] = l; break;
        case ROW_PEAKED: x[i] = l; break;
        }
    }
    /* a few tokens far above the rest, whose probabilities underflow to exactly 0 (at T 0.6, token 3's
     * to a subnormal): fewer nonzero tokens than top-k, as in a trained model's rows at a low temperature */
    if (kind == ROW_PEAKED && V > 7) {
        x[V / 5] = 150.0f;
        x[V / 2] = 149.0f;
        x[V - 2] = 140.0f;
        x[3] = 95.0f;
    }
    if (kind == ROW_MAX_TIE && V > 3) {
        x[V / 3] = x[V - 1] = x[2 * V / 3] = 7.0f;
        x[V / 2] = 6.99f;
    }
}

static struct ds_k_sampling kparams(const struct prob_case *c, int V)
{
    int k = c->top_k < 0 ? V + c->top_k : c->top_k;
    return (struct ds_k_sampling){.temperature = c->temperature, .top_p = c->top_p, .top_k = k};
}

static struct ds_sampling hparams(const struct ds_k_sampling *k)
{
    return (struct ds_sampling){.temperature = k->temperature, .top_p = k->top_p, .top_k = k->top_k};
}

/* Compare a row of device probabilities with ds_probs: the same kept set
 * (non-zero entries) and max |got - ref| / max ref within bound. */
static bool probs_row_ok(const char *what, int row, const float *got, const float *ref, int V, double bound,
                         int *ret_same_bits)
{
    int only_got = 0, only_ref = 0, kept = 0, first_bad = -1, same = 0;
    double maxdiff = 0, maxref = 0;
    for (int i = 0; i < V; i++) {
        bool g = got[i] > 0, r = ref[i] > 0;
        if (isnan(got[i]) || g != r) {
            only_got += g || isnan(got[i]);
            only_ref += r;
            if (first_bad < 0)
                first_bad = i;
        }
        kept += r;
        same += !memcmp(&got[i], &ref[i], 4);
        double d = isnan(got[i]) ? INFINITY : fabs((double)got[i] - ref[i]);
        maxdiff = d > maxdiff ? d : maxdiff;
        maxref = ref[i] > maxref ? ref[i] : maxref;
    }
    double err = maxdiff / (maxref > 0 ? maxref : 1e-30);
    *ret_same_bits = same;
    if (only_got || only_ref || err > bound) {
        printf("# %s row %d: %d kept by ds_probs, %d only on the device, %d only on the CPU, normalized error "
               "%.3g (bound %.3g), %d of %d equal bits\n", what, row, kept, only_got, only_ref, err, bound, same, V);
        if (first_bad >= 0)
            printf("#   first set difference at %d: got %.9g want %.9g\n", first_bad, got[first_bad], ref[first_bad]);
        return false;
    }
    return true;
}

static bool probs_case(int V, const struct prob_case *cases, int n)
{
    int ldx = V + 5;   /* a row stride larger than V */
    float *x = hmalloc((size_t)n * ldx * sizeof(float));
    float *ref = hmalloc((size_t)n * V * sizeof(float));
    uint64_t *scratch = hmalloc((size_t)V * 2 * sizeof *scratch);
    struct ds_k_sampling *kp = hmalloc((size_t)n * sizeof *kp);
    int32_t *rows = hmalloc((size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) {
        make_logits(x + (size_t)i * ldx, V, cases[i].kind);
        kp[i] = kparams(&cases[i], V);
        struct ds_sampling hs = hparams(&kp[i]);
        ds_probs(x + (size_t)i * ldx, V, &hs, ref + (size_t)i * V, scratch);
        rows[i] = n - 1 - i;   /* params[i] belong to row rows[i] */
    }
    /* the launch takes its rows through rows[]: reorder the parameters to match */
    struct ds_k_sampling *kp_rows = hmalloc((size_t)n * sizeof *kp_rows);
    for (int i = 0; i < n; i++)
        kp_rows[i] = kp[rows[i]];
    float *d_x = dup_to_dev(x, (size_t)n * ldx * sizeof(float));
    float *d_out = dpoison((size_t)n * V * sizeof(float));
    struct ds_k_sampling *d_kp = dup_to_dev(kp, (size_t)n * sizeof *kp);
    struct ds_k_sampling *d_kp_rows = dup_to_dev(kp_rows, (size_t)n * sizeof *kp_rows);
    int32_t *d_rows = dup_to_dev(rows, (size_t)n * sizeof(int32_t));
    char what[96];
    bool ok = true;
    long same_total = 0;
    /* 1: out of place, rows in order; 2: in place through a row map */
    snprintf(what, sizeof what, "sampling probs, V %d", V);
    if (!launched(ds_k_sampling_probs(d_x, ldx, NULL, d_kp, n, V, d_out, V, 0), what))
        return false;
    float *got = dup_to_host(d_out, (size_t)n * V * sizeof(float));
    for (int i = 0; i < n; i++) {
        int same;
        ok &= probs_row_ok(what, i, got + (size_t)i * V, ref + (size_t)i * V, V, 1e-5, &same);
        same_total += same;
    }
    /* 1b: the distribution and a draw in one launch: the same bits, and ds_k_sample's ids */
    float *uni = hmalloc((size_t)n * sizeof(float));
    for (int i = 0; i < n; i++)
        uni[i] = (float)((i * 0.618034 + 0.1) - floor(i * 0.618034 + 0.1));
    float *d_u = dup_to_dev(uni, (size_t)n * sizeof(float));
    float *d_out2 = dpoison((size_t)n * V * sizeof(float));
    int32_t *d_ids = dpoison((size_t)n * sizeof(int32_t)), *d_ids_ref = dpoison((size_t)n * sizeof(int32_t));
    snprintf(what, sizeof what, "sampling probs with a draw, V %d", V);
    if (!launched(ds_k_sample_logits(d_x, ldx, NULL, d_kp, n, V, d_out2, V, d_u, d_ids, 0), what) ||
        !launched(ds_k_sample(d_out, V, NULL, d_u, n, V, d_ids_ref, 0), what))
        return false;
    float *got2 = dup_to_host(d_out2, (size_t)n * V * sizeof(float));
    int32_t *ids = dup_to_host(d_ids, (size_t)n * sizeof(int32_t));
    int32_t *ids_ref = dup_to_host(d_ids_ref, (size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) {
        if (memcmp(got2 + (size_t)i * V, got + (size_t)i * V, (size_t)V * 4)) {
            printf("# %s: row %d differs from ds_k_sampling_probs\n", what, i);
            ok = false;
        }
        if (ids[i] != ids_ref[i]) {
            printf("# %s: row %d drew %d, ds_k_sample %d\n", what, i, ids[i], ids_ref[i]);
            ok = false;
        }
    }
    snprintf(what, sizeof what, "sampling probs in place via rows, V %d", V);
    if (!launched(ds_k_sampling_probs(d_x, ldx, d_rows, d_kp_rows, n, V, d_x, ldx, 0), what))
        return false;
    float *inplace = dup_to_host(d_x, (size_t)n * ldx * sizeof(float));
    for (int i = 0; i < n; i++) {
        int same;
        ok &= probs_row_ok(what, i, inplace + (size_t)i * ldx, ref + (size_t)i * V, V, 1e-5, &same);
        if (memcmp(inplace + (size_t)i * ldx, got + (size_t)i * V, (size_t)V * 4)) {
            printf("# %s: row %d differs from the out-of-place launch\n", what, i);
            ok = false;
        }
    }
    printf("# sampling probs, V %d: %d rows, %d blocks per row, %.6f of the probabilities have the CPU's bits\n", V,
           n, ds_k_sampling_blocks_per_row(n, V), (double)same_total / ((double)n * V));
    return ok;
}

static const struct prob_case prob_cases[] = {
    {0.0f, 1.0f, 0, ROW_RANDOM},      /* greedy */
    {0.0f, 0.5f, 3, ROW_MAX_TIE},     /* greedy, a tie at the maximum: the lowest id */
    {1.0f, 1.0f, 0, ROW_RANDOM},      /* no cut */
    {0.7f, 0.9f, 0, ROW_RANDOM},
    {1.0f, 1.0f, 50, ROW_RANDOM},
    {1.3f, 0.8f, 1000, ROW_RANDOM},
    {0.5f, 1.0f, 1, ROW_RANDOM},
    {1.0f, 0.01f, 0, ROW_RANDOM},
    {2.0f, 0.95f, -1, ROW_RANDOM},    /* top_k V - 1 */
    {1.0f, 1.0f, 3, ROW_MAX_TIE},     /* top-k inside a group of tied maxima */
    {1.0f, 1.0f, 0, ROW_TIES},
    {1.0f, 1.0f, 333, ROW_TIES},      /* top-k cuts a group of ties */
    {0.8f, 0.5f, 0, ROW_TIES},        /* top-p cuts a group of ties */
    {1.2f, 0.7f, 777, ROW_TIES},
    {1.0f, 0.5f, 0, ROW_EQUAL},       /* one group: the lowest ids */
    {1.0f, 0.9f, 100, ROW_EQUAL},
    {0.6f, 0.95f, 20, ROW_PEAKED},    /* the top-k cut among the zeros, then top-p */
    {1.0f, 1.0f, 20, ROW_PEAKED},
    {1.0f, 1.0f, 1024, ROW_RANDOM},   /* as many candidates as a row's ranking holds (CAND_ROW) */
    {1.0f, 0.6f, 40, ROW_TIES},       /* a top-p among the candidates, inside a group of ties */
    {1.0f, 0.9f, 0, ROW_PEAKED},      /* a top-p alone from candidates */
};

/* The cases once, then repeated to 40, 64 and 80 rows: the blocks per row follow
 * the row count and V (ds_k_sampling_blocks_per_row; printed with each case),
 * and at V 151936 on an H200, 64 rows go in two launches of different cluster
 * sizes (39 rows in clusters of 3, then 25 in clusters of 4). */
static bool test_sampling_probs(void)
{
    int n = (int)(sizeof prob_cases / sizeof prob_cases[0]);
    bool ok = true;
    const int vocabs[] = {7, 1000, 4096, 151936};
    const int n_rows[] = {n, 40, 64, 80};
    struct prob_case many[80];
    for (int i = 0; i < 80; i++)
        many[i] = prob_cases[i % n];
    for (int v = 0; v < 4; v++)
        for (int k = 0; k < 4; k++) {
            ok &= probs_case(vocabs[v], many, n_rows[k]);
            free_all();
        }
    /* Cluster sizes the time model would not pick: at V 7, blocks past the
     * first have empty slices (slices are 32 tokens) yet join every barrier. */
    const int forced[] = {2, 5, 8};
    for (int f = 0; f < 3; f++)
        for (int v = 0; v < 2; v++) {
            if (ds_k_sampling_force_blocks_per_row(forced[f]) != 0 ||
                ds_k_sampling_blocks_per_row(n, vocabs[v]) != forced[f]) {
                printf("# forcing %d blocks per row at V %d did not take\n", forced[f], vocabs[v]);
                ok = false;
            }
            ok &= probs_case(vocabs[v], many, n);
            free_all();
        }
    ds_k_sampling_force_blocks_per_row(0);
    if (ds_k_sampling_force_blocks_per_row(9) != -1) {   /* 8 at most */
        printf("# forcing %d blocks per row was accepted\n", 9);
        ok = false;
    }
    return ok;
}

/* Is u · Σw within rounding of the cumulative sum at the lower of two
 * disagreeing ids (where a sequential double sum and an exact one may part)? */
static bool near_boundary(const float *w, int V, float u, int32_t a, int32_t b)
{
    double total = 0, acc = 0;
    for (int i = 0; i < V; i++)
        total += w[i] > 0 ? w[i] : 0;
    int lo = a < b ? a : b;
    for (int i = 0; i <= lo && i < V; i++)
        acc += w[i] > 0 ? w[i] : 0;
    return fabs(acc - (double)u * total) <= 1e-9 * total;
}

/* Check draws against the CPU's; a disagreement passes only at a boundary, and
 * at most max_near of them. */
static bool draws_ok(const char *what, const int32_t *got, const int32_t *want, int n,
                     const float *(*row_w)(int i, void *ctx), const float *u, int V, void *ctx, int max_near)
{
    int near = 0, bad = 0;
    for (int i = 0; i < n; i++) {
        if (got[i] == want[i])
            continue;
        if (got[i] >= 0 && got[i] < V && near_boundary(row_w(i, ctx), V, u[i], got[i], want[i])) {
            near++;
            continue;
        }
        if (bad++ < 5)
            printf("#   %s draw %d: got %d want %d (u %.9g)\n", what, i, got[i], want[i], u[i]);
    }
    printf("# %s: %d draws, %d differ at a rounding boundary (at most %d), %d differ elsewhere\n", what, n, near,
           max_near, bad);
    return bad == 0 && near <= max_near;
}

struct draw_ctx {
    const float *probs;   /* [rows, V] */
    int V, per_row;
};

static const float *draw_row_w(int i, void *ctx)
{
    struct draw_ctx *c = ctx;
    return c->probs + (size_t)(i / c->per_row) * c->V;
}

static bool draw_case(int V, int n_rows, int per_row, const float *probs /* [n_rows, V] */, int max_near)
{
    int n = n_rows * per_row;
    float *u = hmalloc((size_t)n * sizeof(float));
    int32_t *rows = hmalloc((size_t)n * sizeof(int32_t)), *want = hmalloc((size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) {
        int k = i % per_row;
        rows[i] = i / per_row;
        u[i] = k == 0 ? 0.0f : k == 1 ? 1.0f - 1.0f / 16777216.0f : ds_uniform(rng, (uint64_t)i, DS_SLOT_TARGET);
        want[i] = ds_sample_probs(probs + (size_t)rows[i] * V, V, u[i]);
    }
    int32_t *d_out = dpoison((size_t)n * sizeof(int32_t));
    char what[64];
    snprintf(what, sizeof what, "draws, V %d", V);
    if (!launched(ds_k_sample(dup_to_dev(probs, (size_t)n_rows * V * sizeof(float)), V,
                              dup_to_dev(rows, (size_t)n * sizeof(int32_t)), dup_to_dev(u, (size_t)n * sizeof(float)),
                              n, V, d_out, 0), what))
        return false;
    int32_t *got = dup_to_host(d_out, (size_t)n * sizeof(int32_t));
    struct draw_ctx ctx = {probs, V, per_row};
    return draws_ok(what, got, want, n, draw_row_w, u, V, &ctx, max_near);
}

static bool test_sample_draws(void)
{
    bool ok = true;
    /* exact boundaries: the strict '>' of the running sum, zero entries skipped */
    static const float exact[4][5] = {
        {0.25f, 0.0f, 0.25f, 0.5f, 0.0f},
        {0.0f, 0.0f, 0.0f, 0.0f, 0.0f},    /* no mass: index 0 */
        {0.0f, 0.0f, 0.0f, 0.0f, 1.0f},
        {0.5f, 0.5f, 0.0f, 0.0f, 0.0f},
    };
    static const float eu[6] = {0.0f, 0.25f, 0.5f, 0.75f, 0.99999994f, 0.5f - 1.0f / 16777216.0f};
    int32_t want[24], rows[24];
    float u[24];
    for (int r = 0; r < 4; r++)
        for (int k = 0; k < 6; k++) {
            rows[r * 6 + k] = r;
            u[r * 6 + k] = eu[k];
            want[r * 6 + k] = ds_sample_probs(exact[r], 5, eu[k]);
        }
    int32_t *d_out = dpoison(sizeof want);
    if (!launched(ds_k_sample(dup_to_dev(exact, sizeof exact), 5, dup_to_dev(rows, sizeof rows),
                              dup_to_dev(u, sizeof u), 24, 5, d_out, 0), "draws at exact boundaries"))
        return false;
    ok &= same_bits("draws at exact boundaries", dup_to_host(d_out, sizeof want), want, sizeof want);
    free_all();
    /* distributions from ds_probs, 256 uniforms each (including 0 and the largest) */
    const int vocabs[] = {4096, 151936};
    for (int v = 0; v < 2; v++) {
        int V = vocabs[v], n_rows = 5;
        float *probs = hmalloc((size_t)n_rows * V * sizeof(float)), *x = hmalloc((size_t)V * sizeof(float));
        uint64_t *scratch = hmalloc((size_t)V * 2 * sizeof *scratch);
        static const struct prob_case pc[5] = {{1.0f, 1.0f, 0, ROW_RANDOM},
                                               {0.7f, 0.9f, 0, ROW_RANDOM},
                                               {1.0f, 1.0f, 40, ROW_RANDOM},
                                               {1.0f, 0.8f, 0, ROW_TIES},
                                               {0.0f, 1.0f, 0, ROW_RANDOM}};
        for (int r = 0; r < n_rows; r++) {
            make_logits(x, V, pc[r].kind);
            struct ds_k_sampling k = kparams(&pc[r], V);
            struct ds_sampling hs = hparams(&k);
            ds_probs(x, V, &hs, probs + (size_t)r * V, scratch);
        }
        ok &= draw_case(V, n_rows, 256, probs, 2);
        free_all();
    }
    return ok;
}

struct res_ctx {
    const float *p, *q;
    float *tmp;
    int V;
};

static const float *res_row_w(int i, void *ctx)
{
    struct res_ctx *c = ctx;
    const float *p = c->p + (size_t)i * c->V, *q = c->q + (size_t)i * c->V;
    double mass = 0;
    for (int j = 0; j < c->V; j++) {
        float r = p[j] - q[j];
        c->tmp[j] = r > 0 ? r : 0;
        mass += c->tmp[j];
    }
    return mass > 1e-8 ? c->tmp : p;
}

static bool test_residual(void)
{
    bool ok = true;
    const int vocabs[] = {4096, 151936};
    for (int v = 0; v < 2; v++) {
        int V = vocabs[v], n = 12;
        float *p = hmalloc((size_t)n * V * 4), *q = hmalloc((size_t)n * V * 4), *x = hmalloc((size_t)V * 4);
        float *tmp = hmalloc((size_t)V * 4), *u = hmalloc((size_t)n * 4);
        uint64_t *scratch = hmalloc((size_t)V * 2 * sizeof *scratch);
        int32_t *want = hmalloc((size_t)n * 4);
        for (int i = 0; i < n; i++) {
            float *pi = p + (size_t)i * V, *qi = q + (size_t)i * V;
            make_logits(x, V, i % 4 == 3 ? ROW_TIES : ROW_RANDOM);
            struct ds_sampling sp = {.temperature = 1.0f, .top_p = i % 2 ? 0.9f : 1.0f, .top_k = i % 3 ? 0 : 64};
            ds_probs(x, V, &sp, pi, scratch);
            /* the draft: the same logits, perturbed (i 0: exactly p, so no residual mass) */
            for (int j = 0; j < V; j++)
                x[j] += i == 0 ? 0.0f : (i % 5 == 4 ? 3.0f : 0.3f) * rnd_f();
            struct ds_sampling sq = sp;
            if (i == 1)
                sq.temperature = 0;   /* a greedy draft: q one-hot */
            ds_probs(x, V, &sq, qi, scratch);
            u[i] = ds_uniform(rng, (uint64_t)i, DS_SLOT_TARGET);
            want[i] = ds_sample_residual(pi, qi, V, u[i], tmp);
        }
        int32_t *d_out = dpoison((size_t)n * 4);
        char what[64];
        snprintf(what, sizeof what, "residual draws, V %d", V);
        if (!launched(ds_k_sample_residual(dup_to_dev(p, (size_t)n * V * 4), V, dup_to_dev(q, (size_t)n * V * 4), V,
                                           dup_to_dev(u, (size_t)n * 4), n, V, d_out, 0), what))
            return false;
        struct res_ctx ctx = {p, q, tmp, V};
        ok &= draws_ok(what, dup_to_host(d_out, (size_t)n * 4), want, n, res_row_w, u, V, &ctx, 1);
        free_all();
    }
    return ok;
}

/* The CPU's chain (engine/spec.c, sampled rows): accepted count and next token. */
static void ref_chain(const float *p, const float *q, const struct ds_k_chain *c, int V, float *tmp, int *ret_a,
                      int32_t *ret_next)
{
    int a = 0;
    for (int k = 0; k <= c->len; k++) {
        const float *pk = p + (size_t)(c->p_row + k) * V;
        if (k < c->len) {
            const float *qk = q + (size_t)(c->q_row + k) * V;
            int d = c->drafts[k];
            float pq = pk[d], qq = qk[d] > 1e-8f ? qk[d] : 1e-8f;
            if (c->u_accept[k] * qq < pq) {
                a++;
                continue;
            }
            *ret_next = ds_sample_residual(pk, qk, V, c->u_target[k], tmp);
        } else {
            *ret_next = ds_sample_probs(pk, V, c->u_target[k]);
        }
        break;
    }
    *ret_a = a;
}

/* Chains of lengths 0..7 over vocabulary V against ref_chain; *ret_full and
 * *ret_rejected count chains with drafts that accepted all and that rejected one. */
static bool chain_case(int V, int n, int *ret_full, int *ret_rejected)
{
    enum { G = 7 };
    struct ds_k_chain *ch = hmalloc((size_t)n * sizeof *ch);
    int n_p = 0, n_q = 0;
    for (int i = 0; i < n; i++) {
        memset(&ch[i], 0, sizeof ch[i]);
        ch[i].len = i % (G + 1);
        ch[i].p_row = n_p;
        ch[i].q_row = n_q;
        n_p += ch[i].len + 1;
        n_q += G;   /* as the draft lays them out: γ rows per sequence */
    }
    float *p = hmalloc((size_t)n_p * V * 4), *q = hmalloc((size_t)n_q * V * 4), *x = hmalloc((size_t)V * 4);
    float *tmp = hmalloc((size_t)V * 4);
    uint64_t *scratch = hmalloc((size_t)V * 2 * sizeof *scratch);
    for (int i = 0; i < n; i++) {
        struct ds_k_chain *c = &ch[i];
        struct ds_sampling s = {.temperature = i % 3 == 0 ? 0.6f : i % 3 == 1 ? 1.0f : 1.4f,
                                .top_p = i % 2 ? 0.9f : 1.0f, .top_k = i % 4 == 2 ? 40 : 0, .seed = rng + i};
        if (i == 5)
            s.temperature = 0;   /* greedy through the sampled path: accept iff draft = argmax */
        for (int k = 0; k <= c->len; k++) {
            make_logits(x, V, i % 6 == 4 ? ROW_TIES : ROW_RANDOM);
            ds_probs(x, V, &s, p + (size_t)(c->p_row + k) * V, scratch);
            if (k == c->len)
                break;
            /* the draft's distribution: the target's logits, perturbed */
            for (int j = 0; j < V; j++)
                x[j] += (i % 7 == 6 ? 2.0f : 0.4f) * rnd_f();
            float *qk = q + (size_t)(c->q_row + k) * V;
            ds_probs(x, V, &s, qk, scratch);
            /* drafts drawn from q as the draft does; some chains get arbitrary ids */
            c->drafts[k] = i % 5 == 3 ? (int32_t)(rnd_u32() % (uint32_t)V)
                                      : ds_sample_probs(qk, V, ds_uniform(s.seed, (uint64_t)k, DS_SLOT_DRAFT));
            c->u_accept[k] = ds_uniform(s.seed, (uint64_t)k + 1, DS_SLOT_ACCEPT);
        }
        for (int k = 0; k <= c->len; k++)
            c->u_target[k] = ds_uniform(s.seed, (uint64_t)k + 1, DS_SLOT_TARGET);
    }
    int32_t *d_acc = dpoison((size_t)n * 4), *d_next = dpoison((size_t)n * 4);
    char what[64];
    snprintf(what, sizeof what, "chain accept/reject, V %d", V);
    if (!launched(ds_k_spec_accept(dup_to_dev(p, (size_t)n_p * V * 4), V, dup_to_dev(q, (size_t)n_q * V * 4), V,
                                   dup_to_dev(ch, (size_t)n * sizeof *ch), NULL, n, V, d_acc, d_next, 0), what))
        return false;
    int32_t *acc = dup_to_host(d_acc, (size_t)n * 4), *next = dup_to_host(d_next, (size_t)n * 4);
    int bad = 0, near = 0, total_acc = 0, rejected = 0, full = 0;
    for (int i = 0; i < n; i++) {
        int a;
        int32_t nx = -1;
        ref_chain(p, q, &ch[i], V, tmp, &a, &nx);
        total_acc += a;
        rejected += a < ch[i].len;
        full += ch[i].len > 0 && a == ch[i].len;
        if (acc[i] == a && next[i] == nx)
            continue;
        /* the same decisions, and a draw that parts only at a rounding boundary */
        if (acc[i] == a && next[i] >= 0 && next[i] < V) {
            const float *pk = p + (size_t)(ch[i].p_row + a) * V;
            const float *w = pk;
            if (a < ch[i].len) {
                struct res_ctx rc = {pk, q + (size_t)(ch[i].q_row + a) * V, tmp, V};
                w = res_row_w(0, &rc);
            }
            if (near_boundary(w, V, ch[i].u_target[a], next[i], nx)) {
                near++;
                continue;
            }
        }
        if (bad++ < 5)
            printf("#   chain %d (len %d): got %d accepted then %d, want %d then %d\n", i, ch[i].len, acc[i], next[i],
                   a, nx);
    }
    printf("# %s: %d chains, %d drafts accepted, %d chains rejected a draft, %d accepted all their drafts; %d "
           "differ at a rounding boundary, %d elsewhere\n", what, n, total_acc, rejected, full, near, bad);
    *ret_full += full;
    *ret_rejected += rejected;
    return bad == 0 && near <= 1;
}

static bool test_accept_chain(void)
{
    int full = 0, rejected = 0;
    bool ok = chain_case(4096, 48, &full, &rejected);
    free_all();
    ok &= chain_case(151936, 16, &full, &rejected);
    if (full == 0 || rejected == 0)
        printf("# the chains did not exercise both full acceptance (%d) and rejection (%d)\n", full, rejected);
    return ok && full > 0 && rejected > 0;
}

/* The screen before the distributions (ds_k_spec_screen): its verdicts
 * against the acceptance test on every row's full distribution, and the accept
 * over the rows it leaves against the accept over every row, id for id. Rows
 * are random, some with a few peaked tokens (probabilities up to ~0.9, where
 * the kept mass's bounds are widest); drafts come from q, or are the row's
 * argmax, the last kept or the first dropped token, or arbitrary ids; some
 * uniforms sit within an ulp of the acceptance threshold. */
static bool screen_case(int V, int n, long *ret_sure, long *ret_drafts, long *ret_rows, long *ret_all_rows,
                        long *ret_topk_sure)
{
    enum { G = 7 };
    struct ds_k_chain *ch = hmalloc((size_t)n * sizeof *ch);
    struct ds_k_sampling *kp = hmalloc((size_t)n * sizeof *kp);
    int n_p = 0, n_q = 0, max_len = 0;
    for (int i = 0; i < n; i++) {
        memset(&ch[i], 0, sizeof ch[i]);
        ch[i].len = i % 9 == 8 ? 0 : 1 + i % G;
        ch[i].p_row = n_p;
        ch[i].q_row = n_q;
        n_p += ch[i].len + 1;
        n_q += G;
        max_len = ch[i].len > max_len ? ch[i].len : max_len;
        const float temps[] = {0.7f, 1.0f, 1.3f, 0.0f, 1.0f};
        const float tops[] = {0.95f, 1.0f, 0.9f, 0.5f, 0.99f, 0.8f};
        kp[i] = (struct ds_k_sampling){.temperature = temps[i % 5], .top_p = tops[i % 6],
                                       .top_k = i % 11 == 10 ? 40 : i % 13 == 6 ? 3 : 0};
        if (i % 8 == 7)   /* Qwen3's recommended sampling */
            kp[i] = (struct ds_k_sampling){.temperature = 0.6f, .top_p = 0.95f, .top_k = 20};
    }
    size_t row = (size_t)V * 4;
    float *x = hmalloc((size_t)n_p * row), *xq = hmalloc(row), *q = hmalloc((size_t)n_q * row);
    uint64_t *scratch = hmalloc((size_t)V * 2 * sizeof *scratch);
    for (int i = 0; i < n; i++) {
        struct ds_sampling s = {.temperature = kp[i].temperature, .top_p = kp[i].top_p, .top_k = kp[i].top_k};
        for (int k = 0; k <= ch[i].len; k++) {
            float *xk = x + (size_t)(ch[i].p_row + k) * V;
            make_logits(xk, V, (i + k) % 7 == 3 ? ROW_TIES : ROW_RANDOM);
            if ((i + k) % 3 == 0)   /* a few confident tokens */
                for (int j = 0; j < 4; j++)
                    xk[rnd_u32() % (uint32_t)V] = 14.0f + 3.0f * rnd_f() - 2.5f * (float)j;
            else if ((i + k) % 5 == 1)   /* one token of probability ~1, alone above top-p */
                xk[rnd_u32() % (uint32_t)V] = 24.0f + 4.0f * rnd_f();
            if (k == ch[i].len)
                break;
            for (int j = 0; j < V; j++)
                xq[j] = xk[j] + (i % 4 == 1 ? 1.5f : 0.3f) * rnd_f();
            ds_probs(xq, V, &s, q + (size_t)(ch[i].q_row + k) * V, scratch);
        }
    }
    /* every row's distribution, for the drafts' choice and the reference */
    float *d_p = dup_to_dev(x, (size_t)n_p * row);
    struct ds_k_sampling *rows_kp = hmalloc((size_t)n_p * sizeof *rows_kp);
    for (int i = 0; i < n; i++)
        for (int k = 0; k <= ch[i].len; k++)
            rows_kp[ch[i].p_row + k] = kp[i];
    if (!launched(ds_k_sampling_probs(d_p, V, NULL, dup_to_dev(rows_kp, (size_t)n_p * sizeof *rows_kp), n_p, V, d_p,
                                      V, 0), "screen: every row's distribution"))
        return false;
    float *p = dup_to_host(d_p, (size_t)n_p * row);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < ch[i].len; k++) {
            const float *pk = p + (size_t)(ch[i].p_row + k) * V, *qk = q + (size_t)(ch[i].q_row + k) * V;
            const float *xk = x + (size_t)(ch[i].p_row + k) * V;
            int d = ds_sample_probs(qk, V, ds_uniform(rng + (uint64_t)i, (uint64_t)k, DS_SLOT_DRAFT));
            int how = (int)(rnd_u32() % 10);
            if (how == 0) {
                d = 0;   /* the argmax */
                for (int j = 1; j < V; j++)
                    d = xk[j] > xk[d] ? j : d;
            } else if (how == 1 || how == 2) {   /* the last kept token, or the first dropped */
                int best = -1;
                for (int j = 0; j < V; j++) {
                    bool want = how == 1 ? pk[j] > 0 : pk[j] == 0;
                    if (want && (best < 0 || (how == 1 ? pk[j] < pk[best] : xk[j] > xk[best])))
                        best = j;
                }
                d = best >= 0 ? best : d;
            } else if (how == 3) {
                d = (int)(rnd_u32() % (uint32_t)V);
            } else if (how == 4 && i % 13 == 12) {
                d = V + 5;   /* outside the vocabulary: rejected */
            }
            ch[i].drafts[k] = d;
            float u = ds_uniform(rng + (uint64_t)i, (uint64_t)k + 1, DS_SLOT_ACCEPT);
            if (how == 5 && d < V) {   /* at the threshold, to the ulp */
                float qq = qk[d] > 1e-8f ? qk[d] : 1e-8f, t = pk[d] / qq;
                u = t < 1.0f ? nextafterf(t, (rnd_u32() & 1) ? 0.0f : 1.0f) : u;
            }
            ch[i].u_accept[k] = u;
        }
    for (int i = 0; i < n; i++)
        for (int k = 0; k <= ch[i].len; k++)
            ch[i].u_target[k] = ds_uniform(rng + (uint64_t)i, (uint64_t)k + 1, DS_SLOT_TARGET);
    struct ds_k_chain *d_ch = dup_to_dev(ch, (size_t)n * sizeof *ch);
    float *d_q = dup_to_dev(q, (size_t)n_q * row);
    int32_t *acc_ref = dpoison((size_t)n * 4), *next_ref = dpoison((size_t)n * 4);
    if (!launched(ds_k_spec_accept(d_p, V, d_q, V, d_ch, NULL, n, V, acc_ref, next_ref, 0), "screen: reference accept"))
        return false;
    /* the screened path, on a fresh copy of the logits */
    float *d_x = dup_to_dev(x, (size_t)n_p * row);
    uint8_t *d_st = dpoison((size_t)n * DS_K_MAX_CHAIN);
    int32_t *d_rows = dpoison((size_t)n_p * 4), *d_nrows = dpoison(4);
    struct ds_k_sampling *d_rkp = dpoison((size_t)n_p * sizeof *d_rkp);
    int32_t *acc = dpoison((size_t)n * 4), *next = dpoison((size_t)n * 4);
    if (!launched(ds_k_spec_screen(d_x, V, d_q, V, d_ch, dup_to_dev(kp, (size_t)n * sizeof *kp), n, max_len, V, d_st,
                                   d_rows, d_rkp, d_nrows, 0), "screen"))
        return false;
    int32_t n_rows = *(int32_t *)dup_to_host(d_nrows, 4);
    if (n_rows < 0 || n_rows > n_p) {
        printf("# the screen left %d rows of %d\n", n_rows, n_p);
        return false;
    }
    if (!launched(ds_k_sampling_probs(d_x, V, d_rows, d_rkp, n_rows, V, d_x, V, 0), "screen: the rows left") ||
        !launched(ds_k_spec_accept(d_x, V, d_q, V, d_ch, d_st, n, V, acc, next, 0), "screen: accept"))
        return false;
    uint8_t *st = dup_to_host(d_st, (size_t)n * DS_K_MAX_CHAIN);
    int32_t *a0 = dup_to_host(acc_ref, (size_t)n * 4), *n0 = dup_to_host(next_ref, (size_t)n * 4);
    int32_t *a1 = dup_to_host(acc, (size_t)n * 4), *n1 = dup_to_host(next, (size_t)n * 4);
    int wrong = 0, differ = 0, sure_acc = 0, sure_rej = 0, drafts = 0, topk_drafts = 0, topk_sure = 0;
    int plain_rows = 0, plain_all = 0, plain_drafts = 0, plain_sure = 0;   /* the chains without top-k */
    for (int i = 0; i < n; i++) {
        if (kp[i].top_k == 0 || kp[i].temperature == 0) {
            plain_all += ch[i].len + 1;
            for (int k = 0; k <= ch[i].len; k++) {   /* as the plan lists them */
                int v = k < ch[i].len ? st[(size_t)i * DS_K_MAX_CHAIN + k] : 0;
                if (v == 1)
                    continue;
                plain_rows++;
                if (v == 2)
                    break;
            }
        }
        for (int k = 0; k < ch[i].len; k++) {
            const float *pk = p + (size_t)(ch[i].p_row + k) * V, *qk = q + (size_t)(ch[i].q_row + k) * V;
            int d = ch[i].drafts[k];
            bool accepts = false;
            if (d >= 0 && d < V) {
                float qq = qk[d] > 1e-8f ? qk[d] : 1e-8f;
                accepts = ch[i].u_accept[k] * qq < pk[d];
            }
            int v = st[(size_t)i * DS_K_MAX_CHAIN + k];
            drafts++;
            sure_acc += v == 1;
            sure_rej += v == 2;
            if (kp[i].top_k > 0 && kp[i].temperature > 0) {
                topk_drafts++;
                topk_sure += v == 1 || v == 2;
            } else {
                plain_drafts++;
                plain_sure += v == 1 || v == 2;
            }
            if ((v == 1 && !accepts) || (v == 2 && accepts) || v > 2) {
                if (wrong++ < 5)
                    printf("#   chain %d draft %d (T %g, top-p %g, top-k %d): verdict %d, but p %.9g, u·q %.9g\n", i,
                           k, kp[i].temperature, kp[i].top_p, kp[i].top_k, v, d >= 0 && d < V ? pk[d] : -1.0,
                           d >= 0 && d < V ? ch[i].u_accept[k] * (qk[d] > 1e-8f ? qk[d] : 1e-8f) : -1.0);
            }
        }
        if (a0[i] != a1[i] || n0[i] != n1[i]) {
            if (differ++ < 5)
                printf("#   chain %d: screened %d accepted then %d, every row %d then %d\n", i, a1[i], n1[i], a0[i],
                       n0[i]);
        }
    }
    printf("# screen, V %d: %d chains, %d drafts: %d certain accepts, %d certain rejects, %d wrong; %d of %d rows "
           "need their distribution; %d chains differ from the accept over every row; top-k rows: %d of %d drafts "
           "settled\n", V, n, drafts, sure_acc, sure_rej, wrong, n_rows, n_p, differ, topk_sure, topk_drafts);
    *ret_topk_sure += topk_sure;
    *ret_sure += plain_sure;
    *ret_drafts += plain_drafts;
    *ret_rows += plain_rows;
    *ret_all_rows += plain_all;
    return wrong == 0 && differ == 0;
}

static bool test_spec_screen(void)
{
    long sure = 0, drafts = 0, rows = 0, all_rows = 0, topk_sure = 0;
    bool ok = screen_case(4096, 120, &sure, &drafts, &rows, &all_rows, &topk_sure);
    free_all();
    ok &= screen_case(151936, 40, &sure, &drafts, &rows, &all_rows, &topk_sure);
    free_all();
    /* the screen must settle most drafts without top-k, or it saves nothing, and some with it */
    if (2 * sure < drafts || 2 * rows > all_rows || topk_sure == 0) {
        printf("# without top-k, the screen settled %ld of %ld drafts and left %ld of %ld rows; with top-k it "
               "settled %ld\n", sure, drafts, rows, all_rows, topk_sure);
        ok = false;
    }
    return ok;
}

/* Hand-made rows at the screen's edges, each a chain of one draft with q one-hot at it (so u·q = u): its
 * verdict against the acceptance test on the row's full distribution; rows with NaN logits must be unsure.
 * u < 0 asks for one float below p[d] (-1), p[d] itself (-2) or half of it (-3). */
enum edge_row { EDGE_SUBNORMAL, EDGE_NAN_WARP, EDGE_PEAKS_TIED, EDGE_RANDOM, EDGE_FAR, EDGE_MAX_TIED };
struct screen_edge {
    const char *what;
    enum edge_row row;
    int V;
    struct ds_k_sampling sp;
    int d;      /* -1: the argmax; -2, -3: the 3rd and 4th peak of EDGE_PEAKS_TIED; -4: EDGE_FAR's far token;
                   -5, -6: the first and second index of EDGE_MAX_TIED's maximum */
    float u;
    bool settle;   /* the verdict must also be certain */
};

static void edge_row(float *x, int V, enum edge_row kind)
{
    make_logits(x, V, ROW_RANDOM);
    if (kind == EDGE_SUBNORMAL) {   /* p[1] subnormal, tied after rounding with three tokens above its band */
        float xd = (float)(log(26.52) - 149.0 * log(2.0));
        const float row[8] = {0.0f, xd, xd + 0.03f, xd + 0.03f, xd + 0.03f, -INFINITY, -INFINITY, -INFINITY};
        memcpy(x, row, sizeof row);
    } else if (kind == EDGE_NAN_WARP) {   /* a whole warp's share of a 4,096-token row is NaN (of longer rows,
                                             the first sixteen values of each of the warp's lanes) */
        for (int u = 0; u < 4; u++)
            for (int i = 0; i < 128 && u * 4096 + i < V; i++)
                x[u * 4096 + i] = NAN;
    } else if (kind == EDGE_FAR) {   /* token 900 lies 120 below a peak of 10 at 100: its probability flushes to 0 */
        x[100] = 10.0f;
        x[900] = -110.0f;
    } else if (kind == EDGE_MAX_TIED) {   /* the maximum 12 at 30, 36 and 8221: two lanes, two groups of one */
        x[30] = x[36] = x[8221] = 12.0f;
    } else if (kind == EDGE_PEAKS_TIED) {   /* peaks 10, 9, 8, 8 at 100, 300, 500, 700 */
        x[100] = 10.0f;
        x[300] = 9.0f;
        x[500] = x[700] = 8.0f;
    }
}

static bool test_spec_screen_edges(void)
{
    const struct ds_k_sampling tk3 = {.temperature = 1.0f, .top_p = 1.0f, .top_k = 3};
    const struct ds_k_sampling tk3p = {.temperature = 1.0f, .top_p = 0.9f, .top_k = 3};
    const struct screen_edge cases[] = {
        {"subnormal p[d] tied above its band, top-k 3, u = 0", EDGE_SUBNORMAL, 8, tk3, 1, 0.0f, false},
        {"subnormal p[d], top-k 3, top-p 0.5, u = 0", EDGE_SUBNORMAL, 8,
         {.temperature = 1.0f, .top_p = 0.5f, .top_k = 3}, 1, 0.0f, false},
        {"a warp of NaN logits, top-p 0.9", EDGE_NAN_WARP, 4096, {.temperature = 1.0f, .top_p = 0.9f}, -1, 0.01f,
         false},
        {"a warp of NaN logits, top-k 20", EDGE_NAN_WARP, 4096, {.temperature = 1.0f, .top_p = 1.0f, .top_k = 20}, -1,
         0.01f, false},
        {"top-k 3, the 3rd peak tied with the 4th (kept), u below p", EDGE_PEAKS_TIED, 4096, tk3, -2, -1.0f, false},
        {"top-k 3, the 3rd peak tied with the 4th (kept), u = p", EDGE_PEAKS_TIED, 4096, tk3, -2, -2.0f, false},
        {"top-k 3, the 4th peak (dropped), u = 0", EDGE_PEAKS_TIED, 4096, tk3, -3, 0.0f, false},
        {"top-k 3, top-p 0.9, the 3rd peak, u below p", EDGE_PEAKS_TIED, 4096, tk3p, -2, -1.0f, false},
        {"top-k 3, top-p 0.9, the 4th peak, u = 0", EDGE_PEAKS_TIED, 4096, tk3p, -3, 0.0f, false},
        {"top-k V - 1, the argmax, u below p", EDGE_RANDOM, 8, {.temperature = 1.0f, .top_p = 1.0f, .top_k = 7}, -1,
         -1.0f, false},
        {"T 5, top-k 20, the argmax, u below p", EDGE_RANDOM, 4096, {.temperature = 5.0f, .top_p = 1.0f, .top_k = 20},
         -1, -1.0f, false},
        {"T 5, top-k 20, the argmax, u half p", EDGE_RANDOM, 4096, {.temperature = 5.0f, .top_p = 1.0f, .top_k = 20},
         -1, -3.0f, false},
        {"top-p 0.05 with top-k 20, the argmax, u below p", EDGE_PEAKS_TIED, 4096,
         {.temperature = 1.0f, .top_p = 0.05f, .top_k = 20}, -1, -1.0f, false},
        {"subnormal p[d] tied above its band, top-k 3, u 0.5: rejected for certain", EDGE_SUBNORMAL, 8, tk3, 1, 0.5f,
         true},
        {"p[d] flushed to 0 far below the peak, top-k 20, u 0.01: rejected for certain", EDGE_FAR, 4096,
         {.temperature = 1.0f, .top_p = 1.0f, .top_k = 20}, -4, 0.01f, true},
        {"p[d] flushed to 0 far below the peak, T 0.6, top-p 0.95, top-k 20, u 0.01: rejected for certain", EDGE_FAR,
         4096, {.temperature = 0.6f, .top_p = 0.95f, .top_k = 20}, -4, 0.01f, true},
        {"p[d] flushed to 0 far below the peak, top-p 0.9, u 1e-6: rejected for certain", EDGE_FAR, 4096,
         {.temperature = 1.0f, .top_p = 0.9f}, -4, 1e-6f, true},
        /* rows long enough for the screen's warp-wide pass */
        {"V 32768: a tied maximum, greedy, its first index, u 0.5: accepted for certain", EDGE_MAX_TIED, 32768,
         {.temperature = 0.0f, .top_p = 1.0f}, -5, 0.5f, true},
        {"V 32768: a tied maximum, greedy, its second index, u 0: rejected for certain", EDGE_MAX_TIED, 32768,
         {.temperature = 0.0f, .top_p = 1.0f}, -6, 0.0f, true},
        {"V 32768: a tied maximum, top-k 3, its first index, u below p", EDGE_MAX_TIED, 32768, tk3, -5, -1.0f,
         false},
        {"V 32768: NaN logits, top-p 0.9", EDGE_NAN_WARP, 32768, {.temperature = 1.0f, .top_p = 0.9f}, -1, 0.01f,
         false},
        {"V 32768: top-k 3, top-p 0.9, the 3rd peak, u below p", EDGE_PEAKS_TIED, 32768, tk3p, -2, -1.0f, false},
        {"V 32768: p[d] flushed to 0 far below the peak, top-p 0.9, u 1e-6: rejected for certain", EDGE_FAR, 32768,
         {.temperature = 1.0f, .top_p = 0.9f}, -4, 1e-6f, true},
    };
    enum { N = sizeof cases / sizeof cases[0], VMAX = 32768 };
    const int vocabularies[] = {8, 4096, 32768};
    float *x = hmalloc((size_t)2 * N * VMAX * 4), *q = hmalloc((size_t)N * VMAX * 4);
    struct ds_k_chain *ch = hmalloc(N * sizeof *ch);
    struct ds_k_sampling *kp = hmalloc(N * sizeof *kp), *rows_kp = hmalloc(N * sizeof *rows_kp);
    int32_t *prows = hmalloc(N * sizeof *prows);
    bool ok = true;
    for (int vi = 0; vi < 3; vi++) {   /* the cases of each vocabulary size in one screen */
        int V = vocabularies[vi], n = 0, n_probs = 0, idx[N];
        for (int c = 0; c < N; c++) {
            if (cases[c].V != V)
                continue;
            float *xr = x + (size_t)2 * n * V;
            edge_row(xr, V, cases[c].row);
            const int fixed_d[] = {0, 0, 500, 700, 900, 30, 36};   /* by -d */
            int d = cases[c].d < -1 ? fixed_d[-cases[c].d] : cases[c].d;
            if (d == -1) {
                d = 0;
                for (int j = 1; j < V; j++)
                    d = !(xr[j] <= xr[d]) && !isnan(xr[j]) ? j : d;
            }
            memcpy(xr + V, xr, (size_t)V * 4);   /* the bonus row */
            memset(q + (size_t)n * V, 0, (size_t)V * 4);
            q[(size_t)n * V + d] = 1.0f;
            memset(&ch[n], 0, sizeof ch[n]);
            ch[n] = (struct ds_k_chain){.len = 1, .p_row = 2 * n, .q_row = n};
            ch[n].drafts[0] = d;
            ch[n].u_target[0] = ch[n].u_target[1] = 0.5f;
            kp[n] = cases[c].sp;
            if (cases[c].row != EDGE_NAN_WARP) {   /* (the distribution kernel is not for NaN rows) */
                prows[n_probs] = 2 * n;
                rows_kp[n_probs++] = cases[c].sp;
            }
            idx[n++] = c;
        }
        /* the full distributions first, for p[d] */
        float *d_p = dup_to_dev(x, (size_t)2 * n * V * 4);
        if (!launched(ds_k_sampling_probs(d_p, V, dup_to_dev(prows, n_probs * sizeof *prows),
                                          dup_to_dev(rows_kp, n_probs * sizeof *rows_kp), n_probs, V, d_p, V, 0),
                      "screen edges: distributions"))
            return false;
        float *p = dup_to_host(d_p, (size_t)2 * n * V * 4);
        for (int i = 0; i < n; i++) {
            float pd = p[(size_t)2 * i * V + ch[i].drafts[0]], u = cases[idx[i]].u;
            ch[i].u_accept[0] = u == -1.0f ? nextafterf(pd, 0.0f) : u == -2.0f ? pd : u == -3.0f ? 0.5f * pd : u;
        }
        uint8_t *d_st = dpoison((size_t)n * DS_K_MAX_CHAIN);
        int32_t *d_rows = dpoison((size_t)2 * n * 4), *d_nrows = dpoison(4);
        struct ds_k_sampling *d_rkp = dpoison((size_t)2 * n * sizeof *d_rkp);
        if (!launched(ds_k_spec_screen(dup_to_dev(x, (size_t)2 * n * V * 4), V, dup_to_dev(q, (size_t)n * V * 4), V,
                                       dup_to_dev(ch, (size_t)n * sizeof *ch), dup_to_dev(kp, (size_t)n * sizeof *kp),
                                       n, 1, V, d_st, d_rows, d_rkp, d_nrows, 0), "screen edges"))
            return false;
        uint8_t *st = dup_to_host(d_st, (size_t)n * DS_K_MAX_CHAIN);
        for (int i = 0; i < n; i++) {
            bool nan_row = cases[idx[i]].row == EDGE_NAN_WARP;
            float pd = nan_row ? NAN : p[(size_t)2 * i * V + ch[i].drafts[0]];
            bool accepts = ch[i].u_accept[0] * 1.0f < pd;
            int v = st[(size_t)i * DS_K_MAX_CHAIN];
            bool right = (v == 0 && !cases[idx[i]].settle) ||
                         (!nan_row && ((v == 1 && accepts) || (v == 2 && !accepts)));
            printf("# %s: p[d] %.9g, u %.9g: %s, verdict %s%s\n", cases[idx[i]].what, pd, ch[i].u_accept[0],
                   accepts ? "accepts" : "rejects", v == 0 ? "unsure" : v == 1 ? "accept" : v == 2 ? "reject" : "?",
                   right ? "" : v == 0 ? " (NOT SETTLED)" : " (WRONG)");
            ok = right && ok;
        }
    }
    return ok;
}

/* Shapes the sampling kernels do not support are refused. */
static bool test_sampling_invalid(void)
{
    bool ok = true;
    float *d = dpoison(64 * sizeof(float));
    int32_t *di = dpoison(64 * sizeof(int32_t));
    struct ds_k_sampling *dp = dpoison(4 * sizeof *dp);
    struct ds_k_chain *dc = dpoison(sizeof *dc);
    if (ds_k_sampling_probs(d, 7, NULL, dp, 1, 8, d, 8, 0) != cudaErrorInvalidValue ||
        ds_k_sample(d, 8, NULL, d, 1, 0, di, 0) != cudaErrorInvalidValue ||
        ds_k_sample_residual(d, 8, d, 4, d, 1, 8, di, 0) != cudaErrorInvalidValue ||
        ds_k_spec_accept(d, 4, d, 8, dc, NULL, 1, 8, di, di, 0) != cudaErrorInvalidValue ||
        ds_k_sample_logits(d, 8, NULL, dp, 1, 8, d, 8, NULL, di, 0) != cudaErrorInvalidValue ||
        ds_k_sampling_probs(d, 1 << 20, NULL, dp, 1, 1 << 20, d, 1 << 20, 0) != cudaErrorInvalidValue) {
        printf("# a row stride below V, an empty vocabulary, a draw without uniforms or a vocabulary over the "
               "shared memory of 8 blocks was not refused\n");
        ok = false;
    }
    if (ds_k_sampling_probs(d, 8, NULL, dp, 0, 8, d, 8, 0) != cudaSuccess ||
        ds_k_spec_accept(d, 8, NULL, 0, dc, NULL, 0, 8, di, di, 0) != cudaSuccess) {
        printf("# an empty batch was refused\n");
        ok = false;
    }
    return launched(cudaSuccess, "after refused launches") && ok;
}

static const struct {
    const char *name;
    bool (*fn)(void);
} tests[] = {
    {"embed f32 gather (ids out of range give zeros)", test_embed_f32},
    {"embed bf16 gather", test_embed_bf16},
    {"rmsnorm against ds_rmsnorm, and in place", test_rmsnorm},
    {"residual add + rmsnorm", test_add_rmsnorm},
    {"per-head q/k rmsnorm + rope against ds_rmsnorm/ds_rope", test_qk_norm_rope},
    {"q/k rmsnorm + rope + kv append in one launch = the two launches", test_qk_norm_rope_append},
    {"k rmsnorm + rope + kv append of several layers in one launch = a launch a layer",
     test_k_norm_rope_append_layers},
    {"gather_bf16 against host rounding, vectorized and not", test_gather_bf16},
    {"swiglu_bf16 against host rounding of swiglu, vectorized and not", test_swiglu_bf16},
    {"swiglu", test_swiglu},
    {"argmax, ties to the lowest index", test_argmax},
    {"kv append + causal attention, ragged batch, GQA", test_attention_ragged},
    {"kv append + causal attention, ragged batch, hd 64", test_attention_hd64},
    {"kv append + causal attention, 24 verify blocks", test_attention_many_runs},
    {"kv append + causal attention, ragged batch, hd 24", test_attention_hd24},
    {"kv append + causal attention, long contexts", test_attention_long},
    {"kv append + causal attention, contexts past 8,192 positions", test_attention_very_long},
    {"kv append + causal attention, pages of 12 positions", test_attention_odd_pages},
    {"kv append + causal attention, decoding batches", test_attention_decode},
    {"kv append + causal attention, blocks taking many items", test_attention_many_items},
    {"bf16 product against a double reference (splits, accumulate, partial tiles)", test_gemm},
    {"bf16 product: a row's bits depend neither on the batch nor on cuBLASLt", test_gemm_invariance},
    {"bf16 product: cuBLASLt's k ranges in turn into a wider y give the kernels' bits", test_gemm_in_turn},
    {"bf16 product on rows made on the way in (RMSNorm, SwiGLU): the same bits as made apart", test_gemm_made_x},
    {"rmsnorm of chosen rows to bf16", test_rmsnorm_bf16},
    {"unsupported shapes are refused", test_invalid},
    {"sampling distribution against ds_probs (greedy, temperature, top-k, top-p, ties; V up to 151936)",
     test_sampling_probs},
    {"inverse-CDF draws against ds_sample_probs with the same uniforms", test_sample_draws},
    {"residual draws norm(max(0, p - q)) (falling back to p)", test_residual},
    {"chain accept/reject against the CPU's loop", test_accept_chain},
    {"the screen before a verify's distributions: certain verdicts, the same chains", test_spec_screen},
    {"the screen at its edges: subnormal, flushed and NaN rows, ties at the k-th, T 5, k = V - 1", test_spec_screen_edges},
    {"sampling kernels refuse unsupported shapes", test_sampling_invalid},
};

int main(void)
{
    int n_dev_count = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev_count);
    if (e != cudaSuccess || n_dev_count == 0) {
        printf("1..0 # SKIP no CUDA device (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        return 77;
    }
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
        printf("# device 0: %s, compute capability %d.%d\n", prop.name, prop.major, prop.minor);
    const char *env = getenv("DS_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 10) : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    printf("# seed %llu (DS_TEST_SEED=%llu repeats this run)\n", (unsigned long long)seed, (unsigned long long)seed);
    rng = seed * 0x9e3779b97f4a7c15ull + 1;
    if (!rng)
        rng = 1;

    if (ds_k_gemm_lt_create(&lt) != cudaSuccess)
        lt = NULL;   /* the product tests fail then */
    int n = (int)(sizeof tests / sizeof tests[0]), failed = 0;
    printf("1..%d\n", n);
    for (int i = 0; i < n; i++) {
        bool ok = tests[i].fn();
        free_all();
        printf("%s %d - %s\n", ok ? "ok" : "not ok", i + 1, tests[i].name);
        failed += !ok;
        fflush(stdout);
    }
    ds_k_gemm_lt_destroy(lt);
    return failed ? 1 : 0;
}
