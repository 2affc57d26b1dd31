/* bench-step-cuda.c: the CUDA backend's target step time on random bf16
 * weights with real Qwen3 shapes, against the weight-streaming floor.
 *
 *   bench-step-cuda [--models 0.6b,4b,8b] [--rs 1,8,32,64,128,256] [--qs 1,4,8]
 *                   [--ctx 1024] [--reps N] [--products invariant,cublas] [--json FILE]
 *
 * For every model, R sequences whose caches hold ctx positions each (random
 * K/V) feed q new tokens each in one pass, logits for every token (what a
 * verification pass needs; they stay on the device). Each pass is one CUDA
 * graph replay; the median of reps passes, timed with events. The floor is
 * the parameter bytes over the device-to-device copy bandwidth measured in
 * the same run. Prints a markdown table; --json writes one line per point. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dspark/ds-cuda.h"
#include "dspark/ds-model.h"

struct shape {
    const char *name;
    int H, L, nH, nKV, hd, I, V;
    bool tied;
};

static const struct shape shapes[] = {
    {"0.6b", 1024, 28, 16, 8, 128, 3072, 151936, true},
    {"4b", 2560, 36, 32, 8, 128, 9728, 151936, true},
    {"8b", 4096, 36, 32, 8, 128, 12288, 151936, false},
};

static int parse_list(const char *s, int *out, int cap)
{
    int n = 0;
    while (*s && n < cap) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v <= 0)
            return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

static void die(const char *what)
{
    fprintf(stderr, "bench-step-cuda: %s: %s\n", what, ds_errdetail());
    exit(1);
}

int main(int argc, char **argv)
{
    const char *models = "0.6b,4b,8b", *products = "invariant,cublas", *json_path = NULL;
    int rs[16] = {1, 8, 32, 64, 128, 256}, n_rs = 6, qs[8] = {1, 4, 8}, n_qs = 3, ctx = 1024, reps = 10;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: bench-step-cuda [--models 0.6b,4b,8b] [--rs 1,8,...] [--qs 1,4,8] [--ctx N] [--reps N]\n"
                   "                       [--products invariant,cublas] [--json FILE]\n");
            return 0;
        }
        if (!v) {
            fprintf(stderr, "bench-step-cuda: option %s needs a value\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--models"))
            models = v;
        else if (!strcmp(a, "--rs"))
            n_rs = parse_list(v, rs, 16);
        else if (!strcmp(a, "--qs"))
            n_qs = parse_list(v, qs, 8);
        else if (!strcmp(a, "--ctx"))
            ctx = atoi(v);
        else if (!strcmp(a, "--reps"))
            reps = atoi(v);
        else if (!strcmp(a, "--products"))
            products = v;
        else if (!strcmp(a, "--json"))
            json_path = v;
        else {
            fprintf(stderr, "bench-step-cuda: unknown option %s\n", a);
            return 2;
        }
    }
    if (n_rs <= 0 || n_qs <= 0 || ctx <= 0 || reps <= 0) {
        fprintf(stderr, "bench-step-cuda: bad --rs, --qs, --ctx or --reps\n");
        return 2;
    }
    if (!ds_cuda_available()) {
        char why[256];
        ds_cuda_describe(0, why, sizeof why);
        fprintf(stderr, "bench-step-cuda: %s\n", why);
        return 77;
    }
    char dev[256];
    ds_cuda_describe(0, dev, sizeof dev);
    FILE *json = json_path ? fopen(json_path, "w") : NULL;
    double bw;
    if (ds_cuda_copy_bandwidth((size_t)2 << 30, 20, &bw) < 0)
        die("copy bandwidth");
    printf("# %s; device-to-device copy %.0f GB/s (read + write); context %d; median of %d graph replays\n\n", dev,
           bw / 1e9, ctx, reps);
    if (json)
        fprintf(json, "{\"device\": \"%s\", \"copy_bytes_per_s\": %.6g, \"ctx\": %d, \"reps\": %d}\n", dev, bw, ctx,
                reps);
    bool want_inv = strstr(products, "invariant") != NULL, want_cublas = strstr(products, "cublas") != NULL;
    printf("| model | R | q | tokens | invariant ms | cuBLAS ms | floor ms | invariant / floor | invariant / cuBLAS |\n");
    printf("|---|---|---|---|---|---|---|---|---|\n");
    int max_r = 0, max_q = 0;
    for (int i = 0; i < n_rs; i++)
        max_r = rs[i] > max_r ? rs[i] : max_r;
    for (int i = 0; i < n_qs; i++)
        max_q = qs[i] > max_q ? qs[i] : max_q;

    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const struct shape *sh = &shapes[si];
        char key[16];
        snprintf(key, sizeof key, ",%s,", sh->name);
        char list[256];
        snprintf(list, sizeof list, ",%s,", models);
        if (!strstr(list, key))
            continue;
        struct ds_qwen3_config c = {.vocab_size = sh->V, .hidden_size = sh->H, .intermediate_size = sh->I,
                                    .num_hidden_layers = sh->L, .num_attention_heads = sh->nH,
                                    .num_key_value_heads = sh->nKV, .head_dim = sh->hd,
                                    .max_position_embeddings = 40960, .rms_norm_eps = 1e-6, .rope_theta = 1e6,
                                    .tie_word_embeddings = sh->tied};
        struct ds_cuda_opts o = {.graphs = true};
        struct ds_cuda_target *t = NULL;
        if (ds_cuda_target_new_random(&c, 1234 + si, &o, &t) < 0)
            die("random model");
        const int page = 16;
        int per_seq = (ctx + max_q + page - 1) / page;
        if (ds_cuda_kv_alloc(t, per_seq * max_r, page, per_seq) < 0 || ds_cuda_kv_fill_random(t, 99) < 0)
            die("KV cache");
        double floor_ms = (double)ds_cuda_weight_bytes(t) / bw * 1e3;
        struct ds_kv_pool pool;
        if (ds_kv_pool_init_pages(&pool, sh->L, sh->nKV, sh->hd, page, per_seq * max_r) < 0)
            die("KV pages");
        for (int ri = 0; ri < n_rs; ri++) {
            int R = rs[ri];
            struct ds_kv_seq *seqs = calloc((size_t)R, sizeof *seqs);
            struct ds_kv_seq **kv = calloc((size_t)R, sizeof *kv);
            for (int s = 0; s < R; s++) {
                if (ds_kv_reserve(&pool, &seqs[s], ctx + max_q) < 0)
                    die("reserve");
                seqs[s].len = ctx;
                kv[s] = &seqs[s];
            }
            for (int qi = 0; qi < n_qs; qi++) {
                int q = qs[qi], n = R * q;
                int32_t *tok = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4), *sq = malloc((size_t)n * 4),
                        *rows = malloc((size_t)n * 4);
                for (int s = 0, k = 0; s < R; s++)
                    for (int j = 0; j < q; j++, k++) {
                        tok[k] = (int32_t)((k * 7919u + 17) % (unsigned)sh->V);
                        pos[k] = ctx + j;
                        sq[k] = s;
                        rows[k] = k;
                    }
                struct ds_batch b = {.n_tokens = n, .tokens = tok, .pos = pos, .seq = sq, .kv = kv, .n_logits = n,
                                     .logit_rows = rows, .logits = NULL};
                int rp = n >= 1024 ? (reps + 1) / 2 : reps;
                double inv_ms = -1, cub_ms = -1;
                if (want_inv) {
                    if (ds_cuda_set_cublas(t, false) < 0 || ds_cuda_time_forward(t, &pool, &b, rp, true, &inv_ms) < 0)
                        die("timing the invariant products");
                }
                if (want_cublas) {
                    if (ds_cuda_set_cublas(t, true) < 0 || ds_cuda_time_forward(t, &pool, &b, rp, true, &cub_ms) < 0)
                        die("timing cuBLAS products");
                }
                printf("| %s | %d | %d | %d | %.3f | %.3f | %.3f | %.2f | %.2f |\n", sh->name, R, q, n, inv_ms, cub_ms,
                       floor_ms, inv_ms / floor_ms, cub_ms > 0 ? inv_ms / cub_ms : 0.0);
                fflush(stdout);
                if (json)
                    fprintf(json,
                            "{\"model\": \"%s\", \"R\": %d, \"q\": %d, \"tokens\": %d, \"invariant_ms\": %.4f, "
                            "\"cublas_ms\": %.4f, \"floor_ms\": %.4f, \"weight_bytes\": %zu}\n",
                            sh->name, R, q, n, inv_ms, cub_ms, floor_ms, ds_cuda_weight_bytes(t));
                free(tok), free(pos), free(sq), free(rows);
            }
            for (int s = 0; s < R; s++)
                ds_kv_release(&pool, &seqs[s]);
            free(seqs), free(kv);
        }
        ds_kv_pool_done(&pool);
        ds_cuda_target_free(t);
    }
    if (json)
        fclose(json);
    return 0;
}
