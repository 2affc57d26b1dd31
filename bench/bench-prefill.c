/* bench-prefill: CPU prefill throughput of the engine against OpenBLAS sgemm
 * alone on the same matrix shapes, side by side in one run.
 *
 * Writes a random-weight Qwen3 directory (f32) of the given shape to a
 * temporary folder, runs the engine's forward over one 512-token prompt
 * (logits of the last position), and times cblas_sgemm over exactly the
 * products that forward performs (q/k/v, o, gate/up, down per layer, and the
 * head on one row). Prints GFLOP/s of both over the products' FLOPs. */
#include "config.h"

#include <cblas.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dspark/ds-model.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static uint64_t rs = 12345;
static float frand(void)
{
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    return ((rs >> 40) * (1.0f / 16777216.0f) - 0.5f) * 0.1f;
}

struct shape {
    int V, H, inter, L, nH, nKV, hd;
};

static int write_model(const char *dir, const struct shape *s)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f,
            "{\"architectures\":[\"Qwen3ForCausalLM\"],\"model_type\":\"qwen3\",\"vocab_size\":%d,\"hidden_size\":%d,"
            "\"intermediate_size\":%d,\"num_hidden_layers\":%d,\"num_attention_heads\":%d,\"num_key_value_heads\":%d,"
            "\"head_dim\":%d,\"max_position_embeddings\":4096,\"rms_norm_eps\":1e-6,\"rope_theta\":1000000.0,"
            "\"tie_word_embeddings\":true,\"hidden_act\":\"silu\",\"torch_dtype\":\"float32\"}\n",
            s->V, s->H, s->inter, s->L, s->nH, s->nKV, s->hd);
    fclose(f);
    /* tensors: name, rows, cols (cols 0 = vector) */
    struct { char name[96]; long r, c; } t[16 * 64];
    int n = 0;
#define ADD(nm, R, C) (snprintf(t[n].name, sizeof t[n].name, "%s", nm), t[n].r = (R), t[n].c = (C), n++)
    ADD("model.embed_tokens.weight", s->V, s->H);
    ADD("model.norm.weight", s->H, 0);
    for (int l = 0; l < s->L; l++) {
        char b[96];
#define L_ADD(suf, R, C) (snprintf(b, sizeof b, "model.layers.%d.%s", l, suf), ADD(b, R, C))
        L_ADD("input_layernorm.weight", s->H, 0);
        L_ADD("post_attention_layernorm.weight", s->H, 0);
        L_ADD("self_attn.q_norm.weight", s->hd, 0);
        L_ADD("self_attn.k_norm.weight", s->hd, 0);
        L_ADD("self_attn.q_proj.weight", (long)s->nH * s->hd, s->H);
        L_ADD("self_attn.k_proj.weight", (long)s->nKV * s->hd, s->H);
        L_ADD("self_attn.v_proj.weight", (long)s->nKV * s->hd, s->H);
        L_ADD("self_attn.o_proj.weight", s->H, (long)s->nH * s->hd);
        L_ADD("mlp.gate_proj.weight", s->inter, s->H);
        L_ADD("mlp.up_proj.weight", s->inter, s->H);
        L_ADD("mlp.down_proj.weight", s->H, s->inter);
    }
    char *hdr = malloc(1 << 20);
    size_t hl = 0, off = 0;
    hl += (size_t)sprintf(hdr + hl, "{");
    for (int i = 0; i < n; i++) {
        long cnt = t[i].c ? t[i].r * t[i].c : t[i].r;
        if (t[i].c)
            hl += (size_t)sprintf(hdr + hl, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%ld,%ld],\"data_offsets\":[%zu,%zu]}",
                                  i ? "," : "", t[i].name, t[i].r, t[i].c, off, off + (size_t)cnt * 4);
        else
            hl += (size_t)sprintf(hdr + hl, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%ld],\"data_offsets\":[%zu,%zu]}",
                                  i ? "," : "", t[i].name, t[i].r, off, off + (size_t)cnt * 4);
        off += (size_t)cnt * 4;
    }
    hl += (size_t)sprintf(hdr + hl, "}");
    while (hl % 8)
        hdr[hl++] = ' ';
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    f = fopen(path, "wb");
    uint64_t h64 = hl;
    fwrite(&h64, 8, 1, f);
    fwrite(hdr, 1, hl, f);
    float buf[4096];
    for (int i = 0; i < n; i++) {
        long cnt = t[i].c ? t[i].r * t[i].c : t[i].r;
        bool norm = t[i].c == 0;
        for (long k = 0; k < cnt; k += 4096) {
            long m = cnt - k < 4096 ? cnt - k : 4096;
            for (long j = 0; j < m; j++)
                buf[j] = norm ? 1.0f + frand() : frand();
            fwrite(buf, 4, (size_t)m, f);
        }
    }
    fclose(f);
    free(hdr);
    return 0;
}

int main(int argc, char **argv)
{
    struct shape s = {.V = 32768, .H = 1024, .inter = 3072, .L = 4, .nH = 16, .nKV = 8, .hd = 128};
    int T = 512, threads = 0, reps = 3, c;
    while ((c = getopt(argc, argv, "T:t:L:r:h")) != -1) {
        if (c == 'T') T = atoi(optarg);
        else if (c == 't') threads = atoi(optarg);
        else if (c == 'L') s.L = atoi(optarg);
        else if (c == 'r') reps = atoi(optarg);
        else {
            fprintf(stderr, "usage: bench-prefill [-T tokens] [-t threads] [-L layers] [-r reps]\n"
                            "Qwen3-0.6B layer shapes (H 1024, I 3072, 16/8 heads of 128), vocab 32768.\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (threads <= 0)
        threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    char dir[] = "/tmp/dspark-bench-XXXXXX";
    if (!mkdtemp(dir) || write_model(dir, &s) < 0) {
        perror("bench-prefill: temporary model");
        return 1;
    }
    struct ds_model *m;
    struct ds_model_opts mo = {0};
    if (ds_model_load(dir, &mo, &m) < 0) {
        fprintf(stderr, "bench-prefill: %s\n", ds_errdetail());
        return 1;
    }
    struct ds_pool *pool;
    struct ds_forward_ctx *ctx;
    struct ds_kv_pool kv;
    if (ds_pool_new(threads, &pool) < 0 || ds_forward_ctx_new(m, pool, &ctx) < 0 ||
        ds_kv_pool_init(&kv, s.L, s.nKV, s.hd, 16, (T + 15) / 16) < 0) {
        fprintf(stderr, "bench-prefill: %s\n", ds_errdetail());
        return 1;
    }
    int32_t *tok = malloc((size_t)T * 4), *pos = malloc((size_t)T * 4), *sq = malloc((size_t)T * 4), last = T - 1;
    for (int i = 0; i < T; i++)
        tok[i] = (i * 7919) % s.V, pos[i] = i, sq[i] = 0;
    float *logits = malloc((size_t)s.V * 4);
    double te[16], tb[16];
    for (int r = 0; r <= reps; r++) {
        struct ds_kv_seq ks = {0}, *kp = &ks;
        if (ds_kv_reserve(&kv, &ks, T) < 0)
            return 1;
        struct ds_batch b = {.n_tokens = T, .tokens = tok, .pos = pos, .seq = sq, .kv = &kp, .n_logits = 1,
                             .logit_rows = &last, .logits = logits};
        double t0 = now();
        if (ds_model_forward(m, ctx, &kv, &b) < 0)
            return 1;
        if (r > 0)
            te[r - 1] = now() - t0;
        ds_kv_release(&kv, &ks);
    }
    /* the same products through OpenBLAS */
    openblas_set_num_threads(threads);
    int qkv = (s.nH + 2 * s.nKV) * s.hd;
    struct { int m, n, k; } prods[5] = {{T, qkv, s.H}, {T, s.H, s.nH * s.hd}, {T, 2 * s.inter, s.H}, {T, s.H, s.inter},
                                        {1, s.V, s.H}};
    size_t maxw = (size_t)s.V * s.H, maxx = (size_t)T * (s.inter > s.H ? 2 * s.inter : s.H);
    float *W = malloc(maxw * 4), *X = malloc(maxx * 4), *Y = malloc((size_t)T * 2 * s.inter * 4 + (size_t)s.V * 4);
    for (size_t i = 0; i < maxw; i++)
        W[i] = frand();
    for (size_t i = 0; i < maxx; i++)
        X[i] = frand();
    double flops = 0;
    for (int p = 0; p < 5; p++)
        flops += 2.0 * prods[p].m * prods[p].n * prods[p].k * (p < 4 ? s.L : 1);
    for (int r = 0; r <= reps; r++) {
        double t0 = now();
        for (int l = 0; l < s.L; l++)
            for (int p = 0; p < 4; p++)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, prods[p].m, prods[p].n, prods[p].k, 1.0f, X,
                            prods[p].k, W, prods[p].k, 0.0f, Y, prods[p].n);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, 1, s.V, s.H, 1.0f, X, s.H, W, s.H, 0.0f, Y, s.V);
        if (r > 0)
            tb[r - 1] = now() - t0;
    }
    qsort(te, (size_t)reps, sizeof(double), cmpd);
    qsort(tb, (size_t)reps, sizeof(double), cmpd);
    double me = te[reps / 2], mb = tb[reps / 2];
    printf("prefill of %d tokens, %d layers of Qwen3-0.6B shape (H %d, I %d, heads %d/%d x %d), vocab %d, %d threads, gemm %s\n",
           T, s.L, s.H, s.inter, s.nH, s.nKV, s.hd, s.V, threads, ds_gemm_isa());
    printf("%-34s %10s %10s\n", "", "median s", "GFLOP/s");
    printf("%-34s %10.4f %10.1f\n", "dspark forward (whole pass)", me, flops / me / 1e9);
    printf("%-34s %10.4f %10.1f\n", "OpenBLAS sgemm (products only)", mb, flops / mb / 1e9);
    printf("%-34s %10.2f\n", "dspark / OpenBLAS throughput", mb / me);
    ds_kv_pool_done(&kv);
    ds_forward_ctx_free(ctx);
    ds_pool_free(pool);
    ds_model_free(m);
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "bench-prefill: could not remove '%s'\n", dir);
    free(W), free(X), free(Y), free(tok), free(pos), free(sq), free(logits);
    return 0;
}
