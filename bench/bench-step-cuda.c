/* bench-step-cuda.c: the CUDA backend's target step time on random bf16
 * weights with real Qwen3 shapes, against the weight-streaming floor.
 *
 *   bench-step-cuda [--models 0.6b,4b,8b] [--rs 1,8,32,64,128,256] [--qs 1,4,8]
 *                   [--ctx 1024] [--reps N] [--products invariant,kernels,cublas] [--json FILE]
 *                   [--settle N]
 *   bench-step-cuda --round [--models ...] [--rs 64] [--ctx 1024] [--reps N] [--temperature T] [--top-k K]
 *
 * For every model, R sequences whose caches hold ctx positions each (random
 * K/V) feed q new tokens each in one pass, logits for every token (what a
 * verification pass needs; they stay on the device). Each pass is one CUDA
 * graph replay; the median of reps passes, timed with events. The floor is
 * the parameter bytes over the device-to-device copy bandwidth measured in
 * the same run; the weights + KV floor adds the K and V rows the pass's
 * attention must read (R x (ctx + q) positions, every layer), which no engine
 * can skip either. Prints a markdown table; --json writes one line per point.
 *
 * --round times a whole greedy DSpark round on the GPU against its verify pass
 * alone, both in wall-clock time from the host (syncs included): a random
 * draft of DSpark's shape for that target (5 layers of the target's shape,
 * 5 captured layers, γ = 7, vanilla Markov head of rank 256, confidence head)
 * drafts a block for each of R sequences and runs its 7 Markov positions
 * (greedy: chained on the device, one graph, one copy back), the target verifies 8 tokens
 * per sequence (argmax only, capturing the draft's layers), and all 8 rows
 * extend the draft contexts (what the engine queues before the acceptance: every verified row). With --temperature
 * T > 0 the round samples (top-p 0.95, and top-k K with --top-k), all on the device: the draft draws its
 * tokens, the verify pass leaves its logits on the GPU, and the chains of
 * ds_cuda_sample accept or reject all 7 drafts of each sequence, after the
 * contexts are queued; the verify pass alone is then the same pass without
 * argmax. Both end when the GPU has finished (ds_cuda_sync). */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dspark/ds-config.h"

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

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void die(const char *what);

/* --round for one target: the round against its verify pass, for each R. */
static void bench_round(struct ds_cuda_target *t, const struct ds_qwen3_config *c, const char *name,
                        struct ds_kv_pool *pool, const int *rs, int n_rs, int ctx, int reps, float temperature,
                        int top_k, int settle)
{
    bool sampled = temperature >= DS_GREEDY_TEMPERATURE;
    enum { G = 7, M = 5 };
    struct ds_dspark_config dc = {.base = *c, .num_target_layers = c->num_hidden_layers, .block_size = G,
                                  .mask_token_id = c->vocab_size - 1, .n_target_layers = M, .markov_rank = 256,
                                  .markov_head = DS_MARKOV_VANILLA, .enable_confidence_head = true,
                                  .confidence_head_with_markov = true};
    dc.base.num_hidden_layers = 5;
    for (int i = 0; i < M; i++)   /* 1, 9, 17, 25, 33 for 36 layers, as the released drafts */
        dc.target_layer_ids[i] = 1 + i * (c->num_hidden_layers - 4) / (M - 1);
    int max_r = 0;
    for (int i = 0; i < n_rs; i++)
        max_r = rs[i] > max_r ? rs[i] : max_r;
    struct ds_cuda_draft *g = NULL;
    if (ds_cuda_reserve(t, max_r * (G + 1), max_r, M) < 0 || ds_cuda_draft_new_random(t, &dc, 77, max_r, &g) < 0)
        die("random draft");
    for (int ri = 0; ri < n_rs; ri++) {
        int R = rs[ri], n = R * (G + 1);
        struct ds_kv_seq *seqs = calloc((size_t)R, sizeof *seqs);
        struct ds_kv_seq **kv = calloc((size_t)R, sizeof *kv), **row_kv = calloc((size_t)n, sizeof *row_kv);
        int32_t *tok = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4), *sq = malloc((size_t)n * 4);
        int32_t *rows = malloc((size_t)n * 4), *ids = malloc((size_t)n * 4), *anchor = malloc((size_t)R * 4);
        int32_t *start = malloc((size_t)R * 4), *drafts = malloc((size_t)R * G * 4);
        float *z = malloc((size_t)R * G * 4);
        struct ds_sampling *samp = calloc((size_t)R, sizeof *samp);
        struct ds_cuda_chain *chains = calloc((size_t)R, sizeof *chains);
        int32_t *acc = malloc((size_t)R * 4), *next = malloc((size_t)R * 4);
        for (int s = 0; s < R; s++) {
            samp[s] = (struct ds_sampling){.temperature = temperature, .top_p = 0.95f, .top_k = top_k,
                                           .seed = 1000u + (unsigned)s};
            chains[s] = (struct ds_cuda_chain){.row = s * (G + 1), .len = G, .drafts = drafts + (size_t)s * G,
                                               .q_block = s, .sampling = samp[s], .position = (uint64_t)ctx + 1};
        }
        for (int s = 0; s < R; s++) {
            if (ds_kv_reserve(pool, &seqs[s], ctx + G + 1) < 0)
                die("reserve");
            seqs[s].len = ctx;
            kv[s] = &seqs[s];
            anchor[s] = (int32_t)((s * 7919u + 17) % (unsigned)c->vocab_size);
            start[s] = ctx;
        }
        for (int s = 0, k = 0; s < R; s++)
            for (int j = 0; j <= G; j++, k++) {
                tok[k] = (int32_t)((k * 7919u + 17) % (unsigned)c->vocab_size);
                pos[k] = ctx + j;
                sq[k] = s;
                rows[k] = k;
                row_kv[k] = kv[s];
            }
        struct ds_batch b = {.n_tokens = n, .tokens = tok, .pos = pos, .seq = sq, .kv = kv, .n_logits = n,
                             .logit_rows = rows, .argmax = sampled ? NULL : ids, .n_capture = M,
                             .capture_layers = dc.target_layer_ids};
        double *tv = malloc((size_t)reps * sizeof *tv), *tr = malloc((size_t)reps * sizeof *tr);
        double *td = malloc((size_t)reps * sizeof *td);
        /* two warm-ups (the graph's capture), and settle more before the model's first point */
        for (int rep = -2 - (ri == 0 ? settle : 0); rep < reps; rep++) {
            double t0 = now_s();
            if (ds_cuda_forward(t, pool, &b) < 0 || ds_cuda_sync(t) < 0)
                die("verify pass");
            double t1 = now_s();
            if ((sampled ? ds_cuda_draft_sample(g, pool, R, kv, anchor, start, samp, drafts, z, NULL)
                         : ds_cuda_draft_greedy(g, pool, R, kv, anchor, start, drafts, z, NULL)) < 0)
                die("draft phase");
            double t2 = now_s();
            /* as the engine orders them: the contexts gain every verified row while the accept runs */
            if (ds_cuda_forward(t, pool, &b) < 0 || ds_cuda_draft_context(g, pool, n, rows, row_kv, pos) < 0 ||
                (sampled && ds_cuda_sample(t, g, R, chains, acc, next) < 0) || ds_cuda_sync(t) < 0)
                die("verify, context and accept");
            double t3 = now_s();
            if (rep >= 0) {
                tv[rep] = t1 - t0;
                td[rep] = t2 - t1;
                tr[rep] = t3 - t1;
            }
        }
        qsort(tv, (size_t)reps, sizeof *tv, cmp_double);
        qsort(td, (size_t)reps, sizeof *td, cmp_double);
        qsort(tr, (size_t)reps, sizeof *tr, cmp_double);
        double v = tv[reps / 2] * 1e3, dr = td[reps / 2] * 1e3, rd = tr[reps / 2] * 1e3;
        printf("| %s | %d | %.3f | %.3f | %.3f | %.3f |\n", name, R, v, dr, rd, rd / v);
        fflush(stdout);
        for (int s = 0; s < R; s++)
            ds_kv_release(pool, &seqs[s]);
        free(seqs), free(kv), free(row_kv), free(tok), free(pos), free(sq), free(rows), free(ids), free(anchor);
        free(start), free(drafts), free(z), free(tv), free(tr), free(td), free(samp), free(chains), free(acc);
        free(next);
    }
    if (sampled) {   /* after the table: how many verify rows needed their whole distribution */
        uint64_t rows, dist;
        ds_cuda_verify_rows(t, &rows, &dist);
        fprintf(stderr, "bench-step-cuda: %s: sampled verifies computed the distribution of %llu of %llu rows\n",
                name, (unsigned long long)dist, (unsigned long long)rows);
    }
    ds_cuda_draft_free(g);
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
    bool round = false;
    float temperature = 0;
    int top_k = 0, in_turn_rows = -1, max_ranges = 0;   /* -1, 0: the products' defaults */
    int settle = 20;   /* replays of each model's first point before it is timed */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--round")) {
            round = true;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: bench-step-cuda [--models 0.6b,4b,8b] [--rs 1,8,...] [--qs 1,4,8] [--ctx N] [--reps N]\n"
                   "                       [--products invariant,kernels,cublas] [--json FILE] [--in-turn-rows N]\n"
                   "                       [--max-ranges N] [--settle N]\n"
                   "       bench-step-cuda --round [--models ...] [--rs 64] [--ctx N] [--reps N] [--temperature T]\n"
                   "                       [--top-k K] [--in-turn-rows N] [--max-ranges N] [--settle N]\n"
                   "--in-turn-rows N: passes of N rows or more run a split product's k ranges one after another\n"
                   "                  (0: never; the default: the kernels' own threshold)\n"
                   "--max-ranges N: split the products' k into at most N ranges (0: the kernels' split)\n"
                   "--settle N: replay each model's first point (or round) N times, untimed, before timing it (default 20;\n"
                   "            a model's first replays after another model's large passes read up to 9 %% high)\n");
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
        else if (!strcmp(a, "--temperature"))
            temperature = strtof(v, NULL);
        else if (!strcmp(a, "--top-k"))
            top_k = atoi(v);
        else if (!strcmp(a, "--in-turn-rows"))
            in_turn_rows = atoi(v);
        else if (!strcmp(a, "--max-ranges"))
            max_ranges = atoi(v);
        else if (!strcmp(a, "--settle"))
            settle = atoi(v);
        else {
            fprintf(stderr, "bench-step-cuda: unknown option %s\n", a);
            return 2;
        }
    }
    if (n_rs <= 0 || n_qs <= 0 || ctx <= 0 || reps <= 0 || top_k < 0) {
        fprintf(stderr, "bench-step-cuda: bad --rs, --qs, --ctx, --reps or --top-k\n");
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
    bool want_kernels = strstr(products, "kernels") != NULL;   /* invariant, the in-house kernels alone */
    if (round) {
        if (temperature >= DS_GREEDY_TEMPERATURE)
            printf("sampled rounds: temperature %g, top-p 0.95, top-k %d, drafts drawn and 7 per sequence accepted or "
                   "rejected on the GPU\n\n", temperature, top_k);
        printf("| model | R | verify pass ms | draft block + 7 Markov ms | draft + verify + accept + context ms | round / verify |\n");
        printf("|---|---|---|---|---|---|\n");
    } else {
        printf("| model | R | q | tokens | invariant ms | invariant, kernels alone ms | cuBLAS ms | floor ms | "
               "invariant / floor | invariant / cuBLAS | weights + KV floor ms | invariant / weights + KV floor |\n");
        printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    }
    int max_r = 0, max_q = 0;
    for (int i = 0; i < n_rs; i++)
        max_r = rs[i] > max_r ? rs[i] : max_r;
    for (int i = 0; i < n_qs; i++)
        max_q = qs[i] > max_q ? qs[i] : max_q;
    if (round && max_q < 8)
        max_q = 8;   /* the verify pass of a round: γ + 1 tokens */

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
        struct ds_cuda_opts o = {.graphs = true, .max_ranges = max_ranges};
        struct ds_cuda_target *t = NULL;
        if (ds_cuda_target_new_random(&c, 1234 + si, &o, &t) < 0)
            die("random model");
        if (in_turn_rows >= 0)
            ds_cuda_set_in_turn_rows(t, in_turn_rows);
        const int page = 16;
        int per_seq = (ctx + max_q + page - 1) / page;
        if (ds_cuda_kv_alloc(t, per_seq * max_r, page, per_seq) < 0 || ds_cuda_kv_fill_random(t, 99) < 0)
            die("KV cache");
        double floor_ms = (double)ds_cuda_weight_bytes(t) / bw * 1e3;
        size_t position_bytes = ds_cuda_page_bytes(t, page) / page;   /* K and V of one position, every layer */
        struct ds_kv_pool pool;
        if (ds_kv_pool_init_pages(&pool, sh->L, sh->nKV, sh->hd, page, per_seq * max_r) < 0)
            die("KV pages");
        if (round) {
            bench_round(t, &c, sh->name, &pool, rs, n_rs, ctx, reps, temperature, top_k, settle);
            ds_kv_pool_done(&pool);
            ds_cuda_target_free(t);
            continue;
        }
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
                double inv_ms = -1, ker_ms = -1, cub_ms = -1;
                if (ri == 0 && qi == 0 && settle > 0) {
                    double untimed;
                    if (ds_cuda_set_products(t, false, false) < 0 ||
                        ds_cuda_time_forward(t, &pool, &b, settle, true, &untimed) < 0)
                        die("settling");
                }
                if (want_inv) {
                    if (ds_cuda_set_products(t, false, false) < 0 ||
                        ds_cuda_time_forward(t, &pool, &b, rp, true, &inv_ms) < 0)
                        die("timing the invariant products");
                }
                if (want_kernels) {
                    if (ds_cuda_set_products(t, false, true) < 0 ||
                        ds_cuda_time_forward(t, &pool, &b, rp, true, &ker_ms) < 0)
                        die("timing the invariant products on the kernels alone");
                }
                if (want_cublas) {
                    if (ds_cuda_set_products(t, true, false) < 0 ||
                        ds_cuda_time_forward(t, &pool, &b, rp, true, &cub_ms) < 0)
                        die("timing cuBLAS products");
                }
                char ker[16] = "-", cub[16] = "-", vs_cub[16] = "-";   /* "-": not asked for */
                if (ker_ms >= 0)
                    snprintf(ker, sizeof ker, "%.3f", ker_ms);
                if (cub_ms > 0) {
                    snprintf(cub, sizeof cub, "%.3f", cub_ms);
                    snprintf(vs_cub, sizeof vs_cub, "%.2f", inv_ms / cub_ms);
                }
                double kv_bytes = (double)R * (ctx + q) * (double)position_bytes;   /* read by attention */
                double memory_floor_ms = floor_ms + kv_bytes / bw * 1e3;
                printf("| %s | %d | %d | %d | %.3f | %s | %s | %.3f | %.2f | %s | %.3f | %.2f |\n", sh->name, R, q, n,
                       inv_ms, ker, cub, floor_ms, inv_ms / floor_ms, vs_cub,
                       memory_floor_ms, inv_ms / memory_floor_ms);
                fflush(stdout);
                if (json)
                    fprintf(json,
                            "{\"model\": \"%s\", \"R\": %d, \"q\": %d, \"tokens\": %d, \"invariant_ms\": %.4f, "
                            "\"kernels_ms\": %.4f, \"cublas_ms\": %.4f, \"floor_ms\": %.4f, \"weight_bytes\": %zu, "
                            "\"kv_bytes\": %.0f, \"memory_floor_ms\": %.4f}\n",
                            sh->name, R, q, n, inv_ms, ker_ms, cub_ms, floor_ms, ds_cuda_weight_bytes(t), kv_bytes,
                            memory_floor_ms);
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
