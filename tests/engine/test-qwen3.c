/* test-qwen3.c: the CPU target forward against transformers' Qwen3ForCausalLM
 * (fixtures made by tools/reference/make_target_fixtures.py): logits of every
 * prompt position, hidden states after every layer, greedy generation, and the
 * engine's own invariants (KV-cached decoding equals a full forward; a ragged
 * batch of 16 sequences equals each sequence alone, bit for bit). */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "dspark/ds-engine.h"
#include "dspark/ds-model.h"
#include "dspark/ds-safetensors.h"
#include "../../engine/load-util.h"

static const char *const MODELS[] = {"tiny-tied-gqa4", "tiny-untied-gqa2-hd", "tiny-mha", "pair-target"};
#define N_MODELS (sizeof MODELS / sizeof MODELS[0])

struct fixture {
    struct ds_model *m;
    json_t *ref;
    int32_t prompt[64];
    int T;
};

static void load_fixture(const char *name, struct fixture *f)
{
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s", ds_test_path("tests/data/models"));
    snprintf(dir + strlen(dir), sizeof dir - strlen(dir), "/%s", name);
    struct ds_model_opts o = {0};
    int r = ds_model_load(dir, &o, &f->m);
    if (r < 0)
        fail_msg("load %s: %s", name, ds_errdetail());
    snprintf(path, sizeof path, "%s/ref/ref.json", dir);
    json_error_t e;
    f->ref = json_load_file(path, 0, &e);
    assert_non_null(f->ref);
    json_t *p = json_object_get(f->ref, "prompt_ids");
    f->T = (int)json_array_size(p);
    assert_true(f->T > 0 && f->T <= 64);
    for (int i = 0; i < f->T; i++)
        f->prompt[i] = (int32_t)json_integer_value(json_array_get(p, (size_t)i));
}

static void free_fixture(struct fixture *f)
{
    ds_model_free(f->m);
    json_decref(f->ref);
}

static float *read_f32(const char *name, const char *file, size_t expect)
{
    char path[600];
    snprintf(path, sizeof path, "%s/%s/ref/%s", ds_test_path("tests/data/models"), name, file);
    size_t len;
    float *buf = (float *)ds_test_read_file(path, &len);
    assert_non_null(buf);
    assert_int_equal(len, expect * sizeof(float));
    return buf;
}

/* max|a - b| <= tol * max|b| */
static void assert_close(const float *a, const float *b, size_t n, double tol, const char *what)
{
    double mx = 0, d = 0;
    for (size_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs(b[i]));
        d = fmax(d, fabs((double)a[i] - b[i]));
        if (isnan(a[i]))
            fail_msg("%s: NaN at %zu", what, i);
    }
    if (d > tol * mx)
        fail_msg("%s: max|diff| %.3g > %.1g * max|ref| %.3g", what, d, tol, mx);
}

/* Run one sequence's prompt in a single pass; logits of every position and the captured layers. */
static void full_forward(struct fixture *f, struct ds_pool *pool, float *logits, float *captured, int n_cap,
                         const int32_t *layers)
{
    const struct ds_qwen3_config *c = &f->m->cfg;
    struct ds_kv_pool kv;
    assert_int_equal(ds_kv_pool_init(&kv, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 16, 16), 0);
    struct ds_kv_seq s = {0}, *sp = &s;
    assert_int_equal(ds_kv_reserve(&kv, &s, f->T), 0);
    int32_t pos[64], seq[64], rows[64];
    for (int t = 0; t < f->T; t++)
        pos[t] = t, seq[t] = 0, rows[t] = t;
    struct ds_batch b = {.n_tokens = f->T, .tokens = f->prompt, .pos = pos, .seq = seq, .kv = &sp,
                         .n_logits = f->T, .logit_rows = rows, .logits = logits,
                         .n_capture = n_cap, .capture_layers = layers, .captured = captured};
    struct ds_forward_ctx *ctx;
    assert_int_equal(ds_forward_ctx_new(f->m, pool, &ctx), 0);
    assert_int_equal(ds_model_forward(f->m, ctx, &kv, &b), 0);
    ds_forward_ctx_free(ctx);
    ds_kv_release(&kv, &s);
    ds_kv_pool_done(&kv);
}

static void test_logits_and_hidden(void **state)
{
    struct ds_pool *pool = *state;
    for (size_t i = 0; i < N_MODELS; i++) {
        struct fixture f;
        load_fixture(MODELS[i], &f);
        int V = f.m->cfg.vocab_size, H = f.m->cfg.hidden_size, L = f.m->cfg.num_hidden_layers, T = f.T;
        int32_t layers[17];
        layers[0] = -1;
        for (int l = 0; l < L; l++)
            layers[l + 1] = l;
        float *logits = malloc((size_t)T * V * sizeof(float));
        float *cap = malloc((size_t)T * (L + 1) * H * sizeof(float));
        full_forward(&f, pool, logits, cap, L + 1, layers);
        float *ref = read_f32(MODELS[i], "logits.f32", (size_t)T * V);
        assert_close(logits, ref, (size_t)T * V, 1e-4, MODELS[i]);
        free(ref);
        /* hidden_states[l + 1] of transformers = the residual after layer l */
        float *hid = read_f32(MODELS[i], "hidden.f32", (size_t)L * T * H);
        float *emb = read_f32(MODELS[i], "embed.f32", (size_t)T * H);
        float *mine = malloc((size_t)T * H * sizeof(float));
        for (int l = -1; l < L; l++) {
            for (int t = 0; t < T; t++)
                memcpy(mine + (size_t)t * H, cap + ((size_t)t * (L + 1) + (l + 1)) * H, (size_t)H * sizeof(float));
            char what[128];
            snprintf(what, sizeof what, "%s hidden layer %d", MODELS[i], l);
            assert_close(mine, l < 0 ? emb : hid + (size_t)l * T * H, (size_t)T * H, 1e-4, what);
        }
        free(hid), free(emb), free(mine), free(logits), free(cap);
        free_fixture(&f);
    }
}

/* Decoding one token at a time through the cache gives the full pass's logits. */
static void test_kv_cached_equals_full(void **state)
{
    struct ds_pool *pool = *state;
    for (size_t i = 0; i < N_MODELS; i++) {
        struct fixture f;
        load_fixture(MODELS[i], &f);
        const struct ds_qwen3_config *c = &f.m->cfg;
        int V = c->vocab_size, T = f.T;
        float *full = malloc((size_t)T * V * sizeof(float)), *step = malloc((size_t)T * V * sizeof(float));
        full_forward(&f, pool, full, NULL, 0, NULL);
        struct ds_kv_pool kv;
        assert_int_equal(ds_kv_pool_init(&kv, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 4, 32), 0);
        struct ds_kv_seq s = {0}, *sp = &s;
        struct ds_forward_ctx *ctx;
        assert_int_equal(ds_forward_ctx_new(f.m, pool, &ctx), 0);
        /* chunks of 1, 3, 1, 5 ... tokens */
        int t = 0, k = 0;
        while (t < T) {
            int n = (k++ % 2) ? 1 : 3;
            if (t + n > T)
                n = T - t;
            assert_int_equal(ds_kv_reserve(&kv, &s, t + n), 0);
            int32_t pos[8], seq[8], rows[8];
            for (int j = 0; j < n; j++)
                pos[j] = t + j, seq[j] = 0, rows[j] = j;
            struct ds_batch b = {.n_tokens = n, .tokens = f.prompt + t, .pos = pos, .seq = seq, .kv = &sp,
                                 .n_logits = n, .logit_rows = rows, .logits = step + (size_t)t * V};
            assert_int_equal(ds_model_forward(f.m, ctx, &kv, &b), 0);
            s.len = t + n;
            t += n;
        }
        /* the same arithmetic per token: bit-identical, not merely close */
        assert_memory_equal(step, full, (size_t)T * V * sizeof(float));
        ds_forward_ctx_free(ctx);
        ds_kv_release(&kv, &s);
        ds_kv_pool_done(&kv);
        free(full), free(step);
        free_fixture(&f);
    }
}

/* 16 prompts of different lengths in one ragged pass: each row equals that
 * prompt alone (bit for bit) and transformers' last-position logits. */
static void test_ragged_batch(void **state)
{
    struct ds_pool *pool = *state;
    for (size_t i = 0; i < N_MODELS; i++) {
        struct fixture f;
        load_fixture(MODELS[i], &f);
        const struct ds_qwen3_config *c = &f.m->cfg;
        int V = c->vocab_size;
        json_t *bp = json_object_get(f.ref, "batch_prompts");
        int R = (int)json_array_size(bp), total = 0;
        assert_int_equal(R, 16);
        int32_t *tok = malloc(4096 * sizeof(int32_t)), *pos = malloc(4096 * sizeof(int32_t)),
                *seq = malloc(4096 * sizeof(int32_t)), rows[16];
        for (int r = 0; r < R; r++) {
            json_t *p = json_array_get(bp, (size_t)r);
            int n = (int)json_array_size(p);
            for (int j = 0; j < n; j++) {
                tok[total] = (int32_t)json_integer_value(json_array_get(p, (size_t)j));
                pos[total] = j;
                seq[total] = r;
                total++;
            }
            rows[r] = total - 1;
        }
        struct ds_kv_pool kv;
        assert_int_equal(ds_kv_pool_init(&kv, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 8, 256), 0);
        struct ds_kv_seq seqs[16] = {{0}}, *sp[16];
        for (int r = 0; r < R; r++) {
            sp[r] = &seqs[r];
            int n = (int)json_array_size(json_array_get(bp, (size_t)r));
            assert_int_equal(ds_kv_reserve(&kv, &seqs[r], n), 0);
        }
        float *batch = malloc((size_t)R * V * sizeof(float)), *alone = malloc((size_t)V * sizeof(float));
        struct ds_forward_ctx *ctx;
        assert_int_equal(ds_forward_ctx_new(f.m, pool, &ctx), 0);
        struct ds_batch b = {.n_tokens = total, .tokens = tok, .pos = pos, .seq = seq, .kv = sp, .n_logits = R,
                             .logit_rows = rows, .logits = batch};
        assert_int_equal(ds_model_forward(f.m, ctx, &kv, &b), 0);
        float *ref = read_f32(MODELS[i], "batch_last_logits.f32", (size_t)R * V);
        assert_close(batch, ref, (size_t)R * V, 1e-4, MODELS[i]);
        int off = 0;
        for (int r = 0; r < R; r++) {
            int n = (int)json_array_size(json_array_get(bp, (size_t)r)), last = n - 1;
            struct ds_kv_seq one = {0}, *op = &one;
            assert_int_equal(ds_kv_reserve(&kv, &one, n), 0);
            int32_t zero[64];
            for (int j = 0; j < n; j++)
                zero[j] = 0;
            struct ds_batch b1 = {.n_tokens = n, .tokens = tok + off, .pos = pos + off, .seq = zero, .kv = &op,
                                  .n_logits = 1, .logit_rows = &last, .logits = alone};
            assert_int_equal(ds_model_forward(f.m, ctx, &kv, &b1), 0);
            assert_memory_equal(alone, batch + (size_t)r * V, (size_t)V * sizeof(float));
            ds_kv_release(&kv, &one);
            off += n;
        }
        for (int r = 0; r < R; r++)
            ds_kv_release(&kv, &seqs[r]);
        ds_kv_pool_done(&kv);
        ds_forward_ctx_free(ctx);
        free(tok), free(pos), free(seq), free(batch), free(alone), free(ref);
        free_fixture(&f);
    }
}

/* The engine's greedy generation equals transformers.generate for 64 tokens. */
static void test_greedy_generation(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_MODELS; i++) {
        struct fixture f;
        load_fixture(MODELS[i], &f);
        struct ds_engine *e;
        struct ds_engine_opts o = {.n_threads = 2, .max_seqs = 4};
        assert_int_equal(ds_engine_new(f.m, NULL, &o, &e), 0);
        int32_t none = 0;
        struct ds_request req = {.prompt = f.prompt, .n_prompt = f.T, .max_tokens = 64,
                                 .sampling = {.temperature = 0, .top_p = 1}, .stop_ids = &none, .n_stop_ids = 0};
        int id;
        /* three copies at once: concurrency must not change anything */
        for (int k = 0; k < 3; k++)
            assert_int_equal(ds_engine_submit(e, &req, &id), 0);
        while (ds_engine_active(e) > 0)
            assert_int_equal(ds_engine_step(e), 0);
        struct ds_result *res[3];
        assert_int_equal(ds_engine_take_finished(e, res, 3), 3);
        json_t *g = json_object_get(f.ref, "greedy_ids");
        assert_int_equal(json_array_size(g), 64);
        for (int k = 0; k < 3; k++) {
            assert_int_equal(res[k]->n_ids, 64);
            assert_string_equal(res[k]->finish_reason, "length");
            for (int j = 0; j < 64; j++)
                if (res[k]->ids[j] != json_integer_value(json_array_get(g, (size_t)j)))
                    fail_msg("%s: token %d is %d, transformers gives %d", MODELS[i], j, res[k]->ids[j],
                             (int)json_integer_value(json_array_get(g, (size_t)j)));
            ds_result_free(res[k]);
        }
        ds_engine_free(e);
        free_fixture(&f);
    }
}

/* Malformed requests fail alone with a clear message. */
static void test_bad_requests(void **state)
{
    (void)state;
    struct fixture f;
    load_fixture("pair-target", &f);
    struct ds_engine *e;
    struct ds_engine_opts o = {.n_threads = 1, .max_seqs = 2, .max_context = 64};
    assert_int_equal(ds_engine_new(f.m, NULL, &o, &e), 0);
    int id;
    int32_t bad[2] = {1, 100000};
    struct ds_request req = {.prompt = bad, .n_prompt = 2, .max_tokens = 4, .sampling = {.top_p = 1}};
    assert_int_equal(ds_engine_submit(e, &req, &id), -DS_EINVAL);
    assert_non_null(strstr(ds_errdetail(), "outside the vocabulary"));
    req.prompt = f.prompt;
    req.n_prompt = f.T;
    req.max_tokens = 1000;
    assert_int_equal(ds_engine_submit(e, &req, &id), -DS_EINVAL);
    assert_non_null(strstr(ds_errdetail(), "exceeds the context"));
    req.max_tokens = 4;
    req.sampling.temperature = NAN;
    assert_int_equal(ds_engine_submit(e, &req, &id), -DS_EINVAL);
    req.sampling.temperature = 0;
    req.n_prompt = 0;
    assert_int_equal(ds_engine_submit(e, &req, &id), -DS_EINVAL);
    ds_engine_free(e);
    free_fixture(&f);
}

/* ds_load_concat (the stacked q/k/v biases) equals the parts loaded one by one,
 * in order, and a part of the wrong length is refused. */
static void test_load_concat(void **state)
{
    (void)state;
    char dir[512];
    snprintf(dir, sizeof dir, "%s/tiny-mha", ds_test_path("tests/data/models"));
    struct ds_st *st;
    assert_int_equal(ds_st_open_dir(dir, &st), 0);
    const char *names[2] = {"model.norm.weight", "model.layers.0.input_layernorm.weight"};
    int64_t lens[2] = {48, 48}, bad[2] = {48, 47};
    float *all, *a, *b;
    assert_int_equal(ds_load_concat(st, names, lens, 2, &all), 0);
    assert_int_equal(ds_load_vec(st, names[0], 48, &a), 0);
    assert_int_equal(ds_load_vec(st, names[1], 48, &b), 0);
    assert_memory_equal(all, a, 48 * sizeof(float));
    assert_memory_equal(all + 48, b, 48 * sizeof(float));
    assert_memory_not_equal(a, b, 48 * sizeof(float));
    float *none = NULL;
    assert_true(ds_load_concat(st, names, bad, 2, &none) < 0);
    assert_null(none);
    free(all), free(a), free(b);
    ds_st_free(st);
}

/* skip_layers: the shared parts stay (embedding, final norm, head, checksum),
 * the layers do not, and the CPU forward refuses such a model. */
static void test_skip_layers(void **state)
{
    struct fixture f;
    load_fixture("tiny-untied-gqa2-hd", &f);
    char dir[512];
    snprintf(dir, sizeof dir, "%s/tiny-untied-gqa2-hd", ds_test_path("tests/data/models"));
    struct ds_model *lean;
    struct ds_model_opts o = {.skip_layers = true};
    assert_int_equal(ds_model_load(dir, &o, &lean), 0);
    assert_null(lean->layers);
    assert_non_null(lean->embed);
    assert_non_null(lean->final_norm);
    assert_int_equal(lean->lm_head.n, f.m->lm_head.n);
    assert_string_equal(lean->checksum, f.m->checksum);
    size_t n = (size_t)f.m->cfg.vocab_size * f.m->cfg.hidden_size;
    assert_memory_equal(lean->embed, f.m->embed, n * sizeof(float));
    struct ds_forward_ctx *ctx;
    struct ds_kv_pool kv;
    assert_int_equal(ds_forward_ctx_new(lean, *state, &ctx), 0);
    const struct ds_qwen3_config *c = &lean->cfg;
    assert_int_equal(ds_kv_pool_init(&kv, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 16, 4), 0);
    struct ds_kv_seq seq = {0};
    struct ds_kv_seq *kvp[1] = {&seq};
    assert_int_equal(ds_kv_reserve(&kv, &seq, 1), 0);
    int32_t tok = 1, pos = 0, sq = 0;
    struct ds_batch b = {.n_tokens = 1, .tokens = &tok, .pos = &pos, .seq = &sq, .kv = kvp};
    assert_int_equal(ds_model_forward(lean, ctx, &kv, &b), -DS_EINVAL);
    assert_non_null(strstr(ds_errdetail(), "without its layers"));
    ds_kv_release(&kv, &seq);
    ds_kv_pool_done(&kv);
    ds_forward_ctx_free(ctx);
    ds_model_free(lean);
    free_fixture(&f);
}

static int setup(void **state)
{
    struct ds_pool *pool;
    if (ds_pool_new(2, &pool) < 0)
        return -1;
    *state = pool;
    return 0;
}

static int teardown(void **state)
{
    ds_pool_free(*state);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_logits_and_hidden),
        cmocka_unit_test(test_kv_cached_equals_full),
        cmocka_unit_test(test_ragged_batch),
        cmocka_unit_test(test_greedy_generation),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_skip_layers),
        cmocka_unit_test(test_load_concat),
    };
    return cmocka_run_group_tests_name("qwen3", tests, setup, teardown);
}
