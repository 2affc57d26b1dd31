/* test-spec.c: speculative decoding is lossless, and the schedulers do what
 * dspark-spec.md §5 says.
 *  - greedy: the output of every speculation mode equals target-only greedy
 *    output token for token, at concurrency 1 and 32, on several model pairs;
 *  - sampled: the first three tokens under dspark and dspark-async follow the
 *    target's exact distribution (enumerated) in a chi-square test, α = 0.001;
 *  - the paper's Appendix A case: admission without early stop is biased,
 *    Algorithm 1 is not;
 *  - the scheduler functions themselves, and longer budgets at low load;
 *  - traces carry the draft's probability of each draft;
 *  - sts.json's (z, p) map sets the confidences where it applies, temperatures elsewhere. */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"
#include "dspark/ds-draft.h"
#include "dspark/ds-engine.h"
#include "dspark/ds-model.h"
#include "dspark/ds-sched.h"

static uint64_t rs = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (uint32_t)(rs >> 16);
}

static struct ds_model *load_target(const char *name)
{
    char dir[600];
    snprintf(dir, sizeof dir, "%s/%s", ds_test_path("tests/data/models"), name);
    struct ds_model *m;
    struct ds_model_opts o = {0};
    if (ds_model_load(dir, &o, &m) < 0)
        fail_msg("%s", ds_errdetail());
    return m;
}

static struct ds_draft *load_draft(const char *name, const struct ds_model *t)
{
    char dir[600];
    snprintf(dir, sizeof dir, "%s/%s", ds_test_path("tests/data/drafts"), name);
    struct ds_draft *d;
    if (ds_draft_load(dir, t, &d) < 0)
        fail_msg("%s", ds_errdetail());
    return d;
}

/* SPS falling gently with B: verification lengths then vary with confidence. */
static struct ds_sps gentle_sps(int bmax, double slope)
{
    struct ds_sps t = {.n = bmax, .b = malloc((size_t)bmax * sizeof(int)), .sps = malloc((size_t)bmax * sizeof(double))};
    for (int i = 0; i < bmax; i++) {
        t.b[i] = i + 1;
        t.sps[i] = 1.0 / (1.0 + slope * (i + 1));
    }
    return t;
}

struct run_stats {
    long verified, accepted, rounds;
};

/* Generate for every prompt; outputs into out[p] (max_tokens ids each). */
static void generate_all(struct ds_model *t, struct ds_draft *d, const char *mode, int conc, int32_t **prompts,
                         const int *lens, int n, int max_tokens, const struct ds_sampling *smp, int32_t *out,
                         int *out_n, struct run_stats *st)
{
    struct ds_engine *e;
    struct ds_engine_opts o = {.n_threads = 2, .max_seqs = conc, .max_context = 128};
    if (ds_spec_mode_parse(mode, &o.spec) < 0)
        fail_msg("%s", ds_errdetail());
    assert_int_equal(ds_engine_new(t, d, &o, &e), 0);
    if (d) {
        struct ds_sps s = gentle_sps(conc * 9 + 8, 0.02);
        assert_int_equal(ds_engine_set_sps(e, &s), 0);
        ds_sps_done(&s);
    }
    int32_t no_stop = -1;
    int next = 0, done = 0;
    while (done < n) {
        while (next < n && ds_engine_active(e) < conc) {
            struct ds_sampling sp = *smp;
            sp.seed = smp->seed + (uint64_t)next;
            struct ds_request rq = {.prompt = prompts[next], .n_prompt = lens[next], .max_tokens = max_tokens,
                                    .sampling = sp, .stop_ids = &no_stop, .n_stop_ids = 0,
                                    .user = (void *)(intptr_t)next};
            int id;
            assert_int_equal(ds_engine_submit(e, &rq, &id), 0);
            next++;
        }
        assert_int_equal(ds_engine_step(e), 0);
        struct ds_result *res[64];
        int k;
        while ((k = ds_engine_take_finished(e, res, 64)) > 0) {
            for (int i = 0; i < k; i++) {
                int p = (int)(intptr_t)res[i]->user;
                memcpy(out + (size_t)p * max_tokens, res[i]->ids, (size_t)res[i]->n_ids * sizeof(int32_t));
                out_n[p] = res[i]->n_ids;
                if (st) {
                    st->verified += res[i]->stats.num_verified_tokens;
                    st->accepted += res[i]->stats.num_accepted_tokens;
                    st->rounds += res[i]->stats.rounds;
                }
                ds_result_free(res[i]);
                done++;
            }
        }
    }
    ds_engine_free(e);
}

static void lossless_greedy(const char *target, const char *draft, int n_prompts)
{
    struct ds_model *t = load_target(target);
    struct ds_draft *d = load_draft(draft, t);
    int V = t->cfg.vocab_size, max_tokens = 20;
    int32_t **prompts = malloc((size_t)n_prompts * sizeof *prompts);
    int *lens = malloc((size_t)n_prompts * sizeof(int));
    for (int p = 0; p < n_prompts; p++) {
        lens[p] = 3 + (int)(rnd() % 18);
        prompts[p] = malloc((size_t)lens[p] * sizeof(int32_t));
        for (int j = 0; j < lens[p]; j++)
            prompts[p][j] = (int32_t)(rnd() % (uint32_t)V);
    }
    struct ds_sampling greedy = {.temperature = 0, .top_p = 1};
    int32_t *ref = malloc((size_t)n_prompts * max_tokens * sizeof(int32_t));
    int32_t *got = malloc((size_t)n_prompts * max_tokens * sizeof(int32_t));
    int *ref_n = malloc((size_t)n_prompts * sizeof(int)), *got_n = malloc((size_t)n_prompts * sizeof(int));
    generate_all(t, NULL, "none", 8, prompts, lens, n_prompts, max_tokens, &greedy, ref, ref_n, NULL);
    const char *modes[] = {"dspark", "dspark-async", "fixed:2", "fixed:32", "threshold:0.4", "none"};
    const int concs[] = {1, 32};
    long accepted_total = 0;
    for (size_t mi = 0; mi < sizeof modes / sizeof modes[0]; mi++) {
        for (int ci = 0; ci < 2; ci++) {
            struct run_stats st = {0};
            memset(got, 0xff, (size_t)n_prompts * max_tokens * sizeof(int32_t));
            generate_all(t, d, modes[mi], concs[ci], prompts, lens, n_prompts, max_tokens, &greedy, got, got_n, &st);
            for (int p = 0; p < n_prompts; p++) {
                assert_int_equal(got_n[p], ref_n[p]);
                for (int j = 0; j < ref_n[p]; j++)
                    if (got[(size_t)p * max_tokens + j] != ref[(size_t)p * max_tokens + j])
                        fail_msg("%s+%s mode %s concurrency %d: prompt %d token %d is %d, target-only gives %d",
                                 target, draft, modes[mi], concs[ci], p, j, got[(size_t)p * max_tokens + j],
                                 ref[(size_t)p * max_tokens + j]);
            }
            if (strcmp(modes[mi], "none") != 0)
                assert_true(st.verified > 0);   /* the mode did verify drafts */
            accepted_total += st.accepted;
        }
    }
    print_message("%s + %s: %d prompts x 6 modes x 2 concurrencies equal; %ld drafts accepted in all\n", target, draft,
                  n_prompts, accepted_total);
    assert_true(accepted_total > 0);   /* the acceptance path ran */
    for (int p = 0; p < n_prompts; p++)
        free(prompts[p]);
    free(prompts), free(lens), free(ref), free(got), free(ref_n), free(got_n);
    ds_draft_free(d);
    ds_model_free(t);
}

/* The modes' text forms: what the jobs table's spec_mode domain allows parses and formats back to itself
 * (fixed:N up to 64), the rest is refused; a fixed length above the draft's block verifies at most the block. */
static void test_spec_mode_parse(void **state)
{
    (void)state;
    const char *good[] = {"none", "dspark", "dspark-async", "fixed:0", "fixed:7", "fixed:64", "threshold:0.35",
                          "threshold:1"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        struct ds_spec_mode m;
        char back[32];
        if (ds_spec_mode_parse(good[i], &m) < 0)
            fail_msg("'%s' refused: %s", good[i], ds_errdetail());
        ds_spec_mode_format(&m, back, sizeof back);
        assert_string_equal(back, good[i]);
    }
    const char *bad[] = {"fixed:65", "fixed:-1", "fixed:", "fixed:4x", "threshold:1.5", "threshold:", "greedy", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct ds_spec_mode m;
        if (ds_spec_mode_parse(bad[i], &m) == 0)
            fail_msg("'%s' accepted", bad[i]);
    }

    struct ds_model *t = load_target("tiny-v16");
    struct ds_draft *d = load_draft("tiny-v16-draft", t);
    int block = ds_draft_config(d)->block_size, n = 8, max_tokens = 16;
    assert_true(block < DS_SPEC_FIXED_MAX);
    int32_t *prompts[8], store[8][4], out[8 * 16], out_n[8], lens[8];
    for (int p = 0; p < n; p++) {
        for (int j = 0; j < 4; j++)
            store[p][j] = (int32_t)((7 * p + 13 * j + 1) % t->cfg.vocab_size);   /* (rnd() is the other tests') */
        prompts[p] = store[p];
        lens[p] = 4;
    }
    struct ds_sampling greedy = {.temperature = 0, .top_p = 1};
    struct run_stats st = {0};
    generate_all(t, d, "fixed:64", 4, prompts, lens, n, max_tokens, &greedy, out, out_n, &st);
    print_message("fixed:64 with a block of %d: %ld drafts verified in %ld rounds\n", block, st.verified, st.rounds);
    assert_true(st.verified > 0);
    assert_true(st.verified <= st.rounds * block);
    ds_draft_free(d);
    ds_model_free(t);
}

static void test_lossless_greedy_pair(void **state)
{
    (void)state;
    lossless_greedy("pair-target", "draft-vanilla", 200);
}

static void test_lossless_greedy_tiny(void **state)
{
    (void)state;
    lossless_greedy("tiny-v16", "tiny-v16-draft", 200);
}

static void test_lossless_greedy_heads(void **state)
{
    (void)state;
    lossless_greedy("pair-target", "draft-gated", 40);
    lossless_greedy("pair-target", "draft-rnn", 40);
    lossless_greedy("pair-target", "draft-dflash", 40);
    lossless_greedy("pair-target", "draft-m3-noembed", 40);
}

/* ---- sampled: chi-square against the enumerated target distribution ---- */

/* Regularized upper incomplete gamma Q(a, x) (series or continued fraction). */
static double gamma_q(double a, double x)
{
    if (x <= 0)
        return 1.0;
    double gln = lgamma(a);
    if (x < a + 1) {
        double sum = 1.0 / a, del = sum, ap = a;
        for (int n = 0; n < 10000; n++) {
            ap += 1;
            del *= x / ap;
            sum += del;
            if (fabs(del) < fabs(sum) * 1e-15)
                break;
        }
        return 1.0 - sum * exp(-x + a * log(x) - gln);
    }
    double b = x + 1 - a, c = 1e300, dd = 1 / b, h = dd;
    for (int i = 1; i < 10000; i++) {
        double an = -i * (i - a);
        b += 2;
        dd = an * dd + b;
        if (fabs(dd) < 1e-300)
            dd = 1e-300;
        c = b + an / c;
        if (fabs(c) < 1e-300)
            c = 1e-300;
        dd = 1 / dd;
        double del = dd * c;
        h *= del;
        if (fabs(del - 1) < 1e-15)
            break;
    }
    return exp(-x + a * log(x) - gln) * h;
}

/* P(t1 t2 t3 | prompt) for every triple, with the target alone. */
static void exact_distribution(struct ds_model *t, const int32_t *prompt, int n, const struct ds_sampling *s,
                               double *P /* [V^3] */)
{
    int V = t->cfg.vocab_size;
    struct ds_pool *pool;
    assert_int_equal(ds_pool_new(1, &pool), 0);
    struct ds_forward_ctx *ctx;
    assert_int_equal(ds_forward_ctx_new(t, pool, &ctx), 0);
    struct ds_kv_pool kv;
    const struct ds_qwen3_config *c = &t->cfg;
    assert_int_equal(ds_kv_pool_init(&kv, c->num_hidden_layers, c->num_key_value_heads, c->head_dim, 32, 4), 0);
    float *logits = malloc((size_t)V * sizeof(float)), *p1 = malloc((size_t)V * sizeof(float));
    float *p2 = malloc((size_t)V * sizeof(float)), *p3 = malloc((size_t)V * sizeof(float));
    uint64_t *scratch = malloc((size_t)V * 2 * sizeof(uint64_t));
    int32_t seq[64];
    memcpy(seq, prompt, (size_t)n * sizeof(int32_t));
    /* the distribution after a full prefix, by one pass over it */
#define DIST(len, out)                                                                                 \
    do {                                                                                               \
        struct ds_kv_seq ks = {0}, *kp = &ks;                                                          \
        assert_int_equal(ds_kv_reserve(&kv, &ks, (len)), 0);                                          \
        int32_t pos[64], sq[64], last = (len) - 1;                                                     \
        for (int z = 0; z < (len); z++)                                                                \
            pos[z] = z, sq[z] = 0;                                                                     \
        struct ds_batch b = {.n_tokens = (len), .tokens = seq, .pos = pos, .seq = sq, .kv = &kp,       \
                             .n_logits = 1, .logit_rows = &last, .logits = logits};                    \
        assert_int_equal(ds_model_forward(t, ctx, &kv, &b), 0);                                        \
        ds_probs(logits, V, s, (out), scratch);                                                        \
        ds_kv_release(&kv, &ks);                                                                       \
    } while (0)
    DIST(n, p1);
    for (int a = 0; a < V; a++) {
        seq[n] = a;
        DIST(n + 1, p2);
        for (int b2 = 0; b2 < V; b2++) {
            seq[n + 1] = b2;
            DIST(n + 2, p3);
            for (int c3 = 0; c3 < V; c3++)
                P[((size_t)a * V + b2) * V + c3] = (double)p1[a] * p2[b2] * p3[c3];
        }
    }
#undef DIST
    free(logits), free(p1), free(p2), free(p3), free(scratch);
    ds_kv_pool_done(&kv);
    ds_forward_ctx_free(ctx);
    ds_pool_free(pool);
}

static void chi_square_case(struct ds_model *t, struct ds_draft *d, const char *mode, float temperature, float top_p)
{
    int V = t->cfg.vocab_size, N = 100000;
    size_t cells = (size_t)V * V * V;
    int32_t prompt[3] = {1, 2, 3};
    struct ds_sampling s = {.temperature = temperature, .top_p = top_p, .seed = 1000};
    double *P = malloc(cells * sizeof(double));
    exact_distribution(t, prompt, 3, &s, P);
    int32_t **prompts = malloc((size_t)N * sizeof *prompts);
    int *lens = malloc((size_t)N * sizeof(int));
    for (int i = 0; i < N; i++)
        prompts[i] = prompt, lens[i] = 3;
    /* six tokens per sample so that later rounds schedule from older predictions too;
     * the first three are counted */
    const int M = 6;
    int32_t *out = malloc((size_t)N * M * sizeof(int32_t));
    int *out_n = malloc((size_t)N * sizeof(int));
    struct run_stats st = {0};
    generate_all(t, d, mode, 256, prompts, lens, N, M, &s, out, out_n, &st);
    long *count = calloc(cells, sizeof(long));
    for (int i = 0; i < N; i++) {
        assert_int_equal(out_n[i], M);
        count[((size_t)out[i * M] * V + out[i * M + 1]) * V + out[i * M + 2]]++;
    }
    /* cells with expected count >= 5 alone, the rest pooled */
    double chi = 0, pooled_e = 0, pooled_o = 0;
    int df = -1;
    for (size_t c = 0; c < cells; c++) {
        double e = P[c] * N;
        if (e >= 5) {
            chi += (count[c] - e) * (count[c] - e) / e;
            df++;
        } else {
            pooled_e += e;
            pooled_o += (double)count[c];
            if (e == 0 && count[c] > 0)
                fail_msg("%s T=%g: a triple of probability 0 was sampled", mode, temperature);
        }
    }
    if (pooled_e > 0) {
        chi += (pooled_o - pooled_e) * (pooled_o - pooled_e) / pooled_e;
        df++;
    }
    double pval = gamma_q(df / 2.0, chi / 2.0);
    print_message("%s T=%g top_p=%g: chi2 %.1f, df %d, p = %.4f; %ld verified, %ld accepted drafts in %ld rounds\n", mode,
                  temperature, top_p, chi, df, pval, st.verified, st.accepted, st.rounds);
    assert_true(st.verified > 0 && st.accepted > 0);   /* speculation really happened */
    assert_true(pval > 0.001);
    free(P), free(prompts), free(lens), free(out), free(out_n), free(count);
}

static void test_lossless_sampled(void **state)
{
    (void)state;
    struct ds_model *t = load_target("tiny-v16");
    struct ds_draft *d = load_draft("tiny-v16-draft", t);
    chi_square_case(t, d, "dspark", 1.0f, 1.0f);
    chi_square_case(t, d, "dspark-async", 1.0f, 1.0f);
    chi_square_case(t, d, "dspark", 0.7f, 0.9f);
    chi_square_case(t, d, "dspark-async", 0.7f, 0.9f);
    ds_draft_free(d);
    ds_model_free(t);
}

/* ---- Appendix A ----
 * Vocabulary {A, B}; target p = (0.7, 0.3), draft q = (0.5, 0.5). c_1 = 0.5 for
 * both drafts; c_2 = 1 after d_1 = A and 0 after d_1 = B. SPS makes verifying
 * one draft a loss and two a gain. Searching the whole path lets d_1 = A (and
 * only A) buy its own verification: the output becomes (0.85, 0.15). */
static double out_prob_A(int len, int d1)
{
    const double p[2] = {0.7, 0.3}, q[2] = {0.5, 0.5};
    if (len == 0)
        return p[0];   /* no draft verified: the token comes from the target */
    double acc = fmin(1.0, p[d1] / q[d1]);
    /* accepted: the token is d1; rejected: from norm(max(0, p - q)) = A */
    return d1 == 0 ? acc : (1 - acc);
}

static void test_appendix_a(void **state)
{
    (void)state;
    int bb[3] = {1, 2, 3};
    double sps[3] = {1.0, 0.6, 0.6};
    struct ds_sps table = {.n = 3, .b = bb, .sps = sps};
    double biased = 0, causal = 0;
    for (int d1 = 0; d1 < 2; d1++) {
        float a[2] = {0.5f, d1 == 0 ? 0.5f : 0.0f};
        int len;
        ds_sched_dspark(a, 1, 2, NULL, 0, &table, &len);
        causal += 0.5 * out_prob_A(len, d1);
        int K = ds_sched_capacity(a, 1, 2, NULL, 0, &table);   /* misused on the current a */
        ds_sched_topk(a, 1, 2, NULL, K, &len);
        biased += 0.5 * out_prob_A(len, d1);
    }
    assert_true(fabs(biased - 0.85) < 1e-9);
    assert_true(fabs(causal - 0.70) < 1e-9);
}

/* ---- scheduler functions ---- */
static void test_scheduler_functions(void **state)
{
    (void)state;
    /* flat SPS: every positive survival is worth verifying */
    int bb[1] = {1};
    double one[1] = {1.0};
    struct ds_sps flat = {.n = 1, .b = bb, .sps = one};
    float a[3 * 4] = {0.9f, 0.8f, 0.1f, 0.0f, 0.5f, 0.5f, 0.4f, 0.3f, 0.2f, 0.1f, 0.05f, 0.01f};
    int len[3];
    /* flat table past its last point extrapolates proportionally; use a long table instead */
    struct ds_sps f2 = gentle_sps(64, 0.0);
    ds_sched_dspark(a, 3, 4, NULL, 0, &f2, len);
    assert_int_equal(len[0], 3);
    assert_int_equal(len[1], 4);
    assert_int_equal(len[2], 4);
    int cap[3] = {1, 2, 0};
    ds_sched_dspark(a, 3, 4, cap, 0, &f2, len);
    assert_int_equal(len[0], 1);
    assert_int_equal(len[1], 2);
    assert_int_equal(len[2], 0);
    /* steep SPS: nothing is worth it */
    struct ds_sps steep = gentle_sps(64, 10.0);
    ds_sched_dspark(a, 3, 4, NULL, 0, &steep, len);
    assert_int_equal(len[0] + len[1] + len[2], 0);
    /* top-K admits by descending survival, prefixes only */
    ds_sched_topk(a, 3, 4, NULL, 4, len);
    assert_int_equal(len[0], 2);   /* 0.9 0.8 */
    assert_int_equal(len[1], 2);   /* 0.5 0.5 */
    assert_int_equal(len[2], 0);
    /* a staircase: Θ dips at B = 4 and recovers; early stop stops, the capacity search does not */
    int sb[6] = {1, 2, 3, 4, 5, 6};
    double ss[6] = {1.0, 0.95, 0.9, 0.55, 0.55, 0.55};
    struct ds_sps stair = {.n = 6, .b = sb, .sps = ss};
    float b1[5] = {0.9f, 0.85f, 0.8f, 0.8f, 0.8f};
    ds_sched_dspark(b1, 1, 5, NULL, 0, &stair, len);
    assert_int_equal(len[0], 2);
    assert_int_equal(ds_sched_capacity(b1, 1, 5, NULL, 0, &stair), 5);
    /* threshold cuts at the first conditional confidence below θ */
    float c[2 * 3] = {0.9f, 0.3f, 0.9f, 0.2f, 0.9f, 0.9f};
    ds_sched_threshold(c, 2, 3, NULL, 0.5f, len);
    assert_int_equal(len[0], 1);
    assert_int_equal(len[1], 0);
    /* extra tokens in the pass (prefill) make verification dearer */
    ds_sched_dspark(a, 3, 4, NULL, 0, &flat, len);
    ds_sps_done(&f2);
    ds_sps_done(&steep);
}

/* On an SPS table measured here, the budget per sequence shrinks as load grows.
 * The target is a random model of 12 M parameters (48 MB in f32, far past the
 * caches), so that a pass is bound by streaming the weights at small batch and by
 * arithmetic at large batch, as on real hardware. */
static void test_budget_shrinks_with_load(void **state)
{
    (void)state;
    char *dir = ds_test_tmpdir();
    struct ds_test_shape shape = {.vocab = 8192, .hidden = 512, .inter = 2048, .layers = 2, .heads = 8,
                                  .kv_heads = 4, .head_dim = 64};
    assert_int_equal(ds_test_write_random_qwen3(dir, &shape, 7), 0);
    struct ds_model *t;
    struct ds_model_opts mo = {0};
    if (ds_model_load(dir, &mo, &t) < 0)
        fail_msg("%s", ds_errdetail());
    struct ds_engine *e;
    struct ds_engine_opts o = {.n_threads = 1, .max_seqs = 16, .max_context = 256};
    assert_int_equal(ds_engine_new(t, NULL, &o, &e), 0);
    /* The profile is measured: another process taking the cores mid-profile (make check runs
     * tests side by side) can make a small pass look slower than a larger one. Measure again, up
     * to three times, until step time grows with B, as it does on a quiet core. */
    const struct ds_sps *sps = NULL;
    for (int attempt = 0; attempt < 3; attempt++) {
        assert_int_equal(ds_engine_profile_sps(e, 32, 5), 32);   /* (the context it measured at) */
        sps = ds_engine_sps(e);
        double t1 = 1 / ds_sps_at(sps, 1), t2 = 1 / ds_sps_at(sps, 2), t16 = 1 / ds_sps_at(sps, 16);
        double t128 = 1 / ds_sps_at(sps, 128);
        if (t2 < 1.8 * t1 && t1 <= 1.1 * t16 && t16 <= 1.1 * t128)
            break;
        print_message("profile %d disturbed (step time at B = 1, 2, 16, 128: %.0f %.0f %.0f %.0f us)\n", attempt + 1,
                      1e6 * t1, 1e6 * t2, 1e6 * t16, 1e6 * t128);
    }
    assert_true(sps->n > 4);
    /* survivals of a good draft: 0.9, 0.81, ... */
    int g = 7;
    float a[16 * 7];
    for (int r = 0; r < 16; r++)
        for (int j = 0; j < g; j++)
            a[r * g + j] = powf(0.9f, (float)(j + 1));
    int len[16];
    double mean[3];
    const int Rs[3] = {1, 4, 16};
    for (int i = 0; i < 3; i++) {
        ds_sched_dspark(a, Rs[i], g, NULL, 0, sps, len);
        long sum = 0;
        for (int r = 0; r < Rs[i]; r++)
            sum += len[r];
        mean[i] = (double)sum / Rs[i];
    }
    print_message("step time at B = 1, 2, 16, 128: %.0f %.0f %.0f %.0f us; mean verify length at R = 1, 4, 16: "
                  "%.2f %.2f %.2f\n",
                  1e6 / ds_sps_at(sps, 1), 1e6 / ds_sps_at(sps, 2), 1e6 / ds_sps_at(sps, 16),
                  1e6 / ds_sps_at(sps, 128), mean[0], mean[1], mean[2]);
    assert_true(mean[0] > mean[2]);
    ds_engine_free(e);
    ds_model_free(t);
    ds_test_rmtree(dir);
    free(dir);
}

/* ---- traces: the draft's own probability of each draft ----
 * On the CPU every trace line carries "draft_prob": γ numbers in (0, 1]. Greedy
 * drafts are argmaxes, so p >= 1/V; sampled drafts at temperature 1 (no top-p,
 * no top-k) are drawn from the very distribution p is taken from, so
 * E[1/p(d)] = Σ_v q(v) / q(v) = V exactly. 1/p is heavy-tailed (its sample mean
 * comes out a standard error or two low), so the check asks for V within a
 * factor of two: the argmax's probability instead of the draw's gives about 2. */
static void traced_run(struct ds_model *t, struct ds_draft *d, float temperature, double *sum, double *sum_inv,
                       double *sum_inv2, double *min_p, double *max_p, long *n_vals, long *n_lines)
{
    int V = t->cfg.vocab_size, g = ds_draft_config(d)->block_size, n_prompts = 256, max_tokens = 64;
    FILE *f = tmpfile();
    assert_non_null(f);
    struct ds_engine *e;
    struct ds_engine_opts o = {.n_threads = 2, .max_seqs = 8, .max_context = 128};
    assert_int_equal(ds_spec_mode_parse("fixed:4", &o.spec), 0);
    assert_int_equal(ds_engine_new(t, d, &o, &e), 0);
    struct ds_sps s = gentle_sps(8 * 9 + 8, 0.02);
    assert_int_equal(ds_engine_set_sps(e, &s), 0);
    ds_sps_done(&s);
    ds_engine_set_trace(e, f);
    int32_t prompt[8], no_stop = -1;
    uint64_t st = 0x2545F4914F6CDD1Dull;   /* own stream: the prompts do not depend on the other tests */
    int next = 0, done = 0;
    while (done < n_prompts) {
        while (next < n_prompts && ds_engine_active(e) < 8) {
            for (int j = 0; j < 8; j++) {
                st ^= st << 13, st ^= st >> 7, st ^= st << 17;
                prompt[j] = (int32_t)((st >> 16) % (uint64_t)(V - 2));
            }
            struct ds_request rq = {.prompt = prompt, .n_prompt = 8, .max_tokens = max_tokens,
                                    .sampling = {.temperature = temperature, .top_p = 1, .seed = 11 + (uint64_t)next},
                                    .stop_ids = &no_stop, .n_stop_ids = 0};
            int id;
            assert_int_equal(ds_engine_submit(e, &rq, &id), 0);
            next++;
        }
        assert_int_equal(ds_engine_step(e), 0);
        struct ds_result *res[16];
        int k;
        while ((k = ds_engine_take_finished(e, res, 16)) > 0)
            for (int i = 0; i < k; i++, done++)
                ds_result_free(res[i]);
    }
    ds_engine_free(e);
    rewind(f);
    char line[4096];
    *sum = *sum_inv = *sum_inv2 = 0;
    *min_p = INFINITY, *max_p = -INFINITY;
    *n_vals = *n_lines = 0;
    while (fgets(line, sizeof line, f)) {
        const char *at = strstr(line, "\"draft_prob\":[");
        if (!at)
            fail_msg("a trace line without draft_prob: %s", line);
        char *q = (char *)at + strlen("\"draft_prob\":[");
        for (int k = 0; k < g; k++) {
            char *end;
            double p = strtod(q, &end);
            if (end == q || *end != (k + 1 < g ? ',' : ']'))
                fail_msg("draft_prob entry %d is not a number: %s", k, line);
            q = end + 1;
            *sum += p, *sum_inv += 1 / p, *sum_inv2 += 1 / (p * p);
            *min_p = fmin(*min_p, p), *max_p = fmax(*max_p, p);
            (*n_vals)++;
        }
        (*n_lines)++;
    }
    fclose(f);
}

static void test_trace_draft_prob(void **state)
{
    (void)state;
    struct ds_model *t = load_target("tiny-v16");
    struct ds_draft *d = load_draft("tiny-v16-draft", t);
    int V = t->cfg.vocab_size;
    double sum, inv, inv2, lo, hi;
    long n, lines;
    traced_run(t, d, 0.0f, &sum, &inv, &inv2, &lo, &hi, &n, &lines);
    print_message("greedy: %ld trace lines, draft_prob in [%.4f, %.4f], mean %.4f\n", lines, lo, hi, sum / n);
    assert_true(lines > 0);
    assert_true(lo >= 1.0 / V - 1e-6);
    assert_true(hi <= 1.0 + 1e-6);
    traced_run(t, d, 1.0f, &sum, &inv, &inv2, &lo, &hi, &n, &lines);
    double mean = inv / n, se = sqrt((inv2 / n - mean * mean) / n);
    print_message("temperature 1: %ld trace lines, draft_prob in [%.4f, %.4f], mean 1/p %.3f (V = %d, se %.3f)\n",
                  lines, lo, hi, mean, V, se);
    assert_true(lines > 0);
    assert_true(lo > 0 && hi <= 1.0 + 1e-6);
    assert_true(mean > V / 2.0 && mean < 2.0 * V);
    ds_draft_free(d);
    ds_model_free(t);
}

/* ---- the confidence map of sts.json ----
 * A draft directory whose sts.json has temperatures for 0 and 1 and a (z, p)
 * map for 0 only: greedy trace lines' "survival" must be the prefix product of
 * σ(α z + β logit p + γ) computed from the same line's confidence and
 * draft_prob, and at temperature 1 (no map there) of σ(z / T). */
static const float map_t0[4] = {0.7f, 1.3f, 0.9f, 2.0f}, map_t1[4] = {1.1f, 0.6f, 1.5f, 0.8f};
static const float map_abc[4][3] = {{0.5f, 0.8f, 0.3f}, {1.2f, 0.1f, -0.4f}, {0.0f, 1.0f, 0.0f}, {0.3f, 0.6f, 1.1f}};

static void check_survival(const char *line, int g, bool with_map)
{
    double z[8], p[8], surv[8];
    const char *keys[3] = {"\"confidence\":[", "\"draft_prob\":[", "\"survival\":["};
    double *dst[3] = {z, p, surv};
    for (int f = 0; f < 3; f++) {
        const char *q = strstr(line, keys[f]);
        if (!q)
            fail_msg("a trace line without %s: %s", keys[f], line);
        q += strlen(keys[f]);
        for (int k = 0; k < g; k++) {
            char *end;
            dst[f][k] = strtod(q, &end);
            if (end == q)
                fail_msg("entry %d of %s is not a number: %s", k, keys[f], line);
            q = end + 1;
        }
    }
    double a = 1;
    for (int k = 0; k < g; k++) {
        double pk = fmin(fmax(p[k], 1e-6), 1 - 1e-6);
        double x = with_map ? map_abc[k][0] * z[k] + map_abc[k][1] * log(pk / (1 - pk)) + map_abc[k][2]
                            : z[k] / map_t1[k];
        a *= 1 / (1 + exp(-x));
        if (fabs(surv[k] - a) > 1e-4 * fmax(a, 1e-3))
            fail_msg("position %d: survival %.7g, expected %.7g (%s): %s", k + 1, surv[k], a,
                     with_map ? "map" : "temperature", line);
    }
}

static void test_sts_map(void **state)
{
    (void)state;
    char dir[] = "/tmp/ds-test-sts-XXXXXX", path[700], src[700];
    assert_non_null(mkdtemp(dir));
    const char *files[2] = {"config.json", "model.safetensors"};
    for (int i = 0; i < 2; i++) {
        snprintf(src, sizeof src, "%s/tiny-v16-draft/%s", ds_test_path("tests/data/drafts"), files[i]);
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        assert_int_equal(symlink(src, path), 0);
    }
    snprintf(path, sizeof path, "%s/sts.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "{\"format\": 1, \"block_size\": 4, \"temperatures\": {\"0\": [%g, %g, %g, %g], \"1\": [%g, %g, %g, %g]},"
               " \"maps\": {\"0\": [", map_t0[0], map_t0[1], map_t0[2], map_t0[3], map_t1[0], map_t1[1], map_t1[2],
            map_t1[3]);
    for (int k = 0; k < 4; k++)
        fprintf(f, "%s[%g, %g, %g]", k ? ", " : "", map_abc[k][0], map_abc[k][1], map_abc[k][2]);
    fprintf(f, "]}}\n");
    fclose(f);
    struct ds_model *t = load_target("tiny-v16");
    struct ds_draft *d;
    if (ds_draft_load(dir, t, &d) < 0)
        fail_msg("%s", ds_errdetail());
    int g = ds_draft_config(d)->block_size;
    assert_int_equal(g, 4);
    for (int pass = 0; pass < 2; pass++) {
        FILE *tr = tmpfile();
        assert_non_null(tr);
        struct ds_engine *e;
        struct ds_engine_opts o = {.n_threads = 2, .max_seqs = 4, .max_context = 64};
        assert_int_equal(ds_spec_mode_parse("fixed:4", &o.spec), 0);
        assert_int_equal(ds_engine_new(t, d, &o, &e), 0);
        ds_engine_set_trace(e, tr);
        int32_t prompt[6] = {3, 9, 1, 7, 4, 2}, no_stop = -1;
        for (int i = 0; i < 4; i++) {
            prompt[0] = 3 + i;
            struct ds_request rq = {.prompt = prompt, .n_prompt = 6, .max_tokens = 24,
                                    .sampling = {.temperature = pass ? 1.0f : 0.0f, .top_p = 1, .seed = 5 + (uint64_t)i},
                                    .stop_ids = &no_stop, .n_stop_ids = 0};
            int id;
            assert_int_equal(ds_engine_submit(e, &rq, &id), 0);
        }
        while (ds_engine_active(e) > 0) {
            assert_int_equal(ds_engine_step(e), 0);
            struct ds_result *res[4];
            int k;
            while ((k = ds_engine_take_finished(e, res, 4)) > 0)
                for (int i = 0; i < k; i++)
                    ds_result_free(res[i]);
        }
        ds_engine_free(e);
        rewind(tr);
        char line[4096];
        long lines = 0;
        while (fgets(line, sizeof line, tr)) {
            check_survival(line, g, pass == 0);
            lines++;
        }
        fclose(tr);
        print_message("%s: %ld trace lines, survival as the %s gives\n", pass ? "temperature 1" : "greedy", lines,
                      pass ? "temperatures" : "map");
        assert_true(lines > 0);
    }
    ds_draft_free(d);
    /* a map for a temperature with no set of temperatures is refused */
    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "{\"temperatures\": {\"1\": [1, 1, 1, 1]}, \"maps\": {\"0\": [[1,0,0],[1,0,0],[1,0,0],[1,0,0]]}}\n");
    fclose(f);
    assert_true(ds_draft_load(dir, t, &d) < 0);
    print_message("refused: %s\n", ds_errdetail());
    assert_non_null(strstr(ds_errdetail(), "no set of temperatures"));
    /* sets past the limit, one temperature twice (as "0" and "0.0", or one key twice), and an
     * infinite one are refused (the first were dropped, the others loaded) */
    static const char *const bad[][2] = {
        {"{\"temperatures\": {\"0\": [1,1,1,1], \"0.1\": [1,1,1,1], \"0.2\": [1,1,1,1], \"0.3\": [1,1,1,1], "
         "\"0.4\": [1,1,1,1], \"0.5\": [1,1,1,1], \"0.6\": [1,1,1,1], \"0.7\": [1,1,1,1], \"0.8\": [1,1,1,1]}}",
         "more than 8 sets of temperatures"},
        {"{\"temperatures\": {\"0\": [1,1,1,1], \"0.0\": [2,2,2,2]}}", "temperature 0.0 has two sets"},
        {"{\"temperatures\": {\"1\": [1,1,1,1], \"1\": [2,2,2,2]}}", "duplicate object key"},
        {"{\"temperatures\": {\"inf\": [1,1,1,1]}}", "entry 'inf' must map a temperature"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        f = fopen(path, "w");
        assert_non_null(f);
        fprintf(f, "%s\n", bad[i][0]);
        fclose(f);
        assert_true(ds_draft_load(dir, t, &d) < 0);
        if (!strstr(ds_errdetail(), bad[i][1]))
            fail_msg("sts.json case %zu: '%s' lacks '%s'", i, ds_errdetail(), bad[i][1]);
    }
    ds_model_free(t);
    const char *all[3] = {"config.json", "model.safetensors", "sts.json"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, all[i]);
        unlink(path);
    }
    rmdir(dir);
}

/* On the CPU backend the engine runs the draft from its host weights: nothing
 * is released, and the draft still serves the next engine. */
static void test_release_draft_weights_cpu(void **state)
{
    (void)state;
    struct ds_model *t = load_target("tiny-v16");
    struct ds_draft *d = load_draft("tiny-v16-draft", t);
    struct ds_engine_opts o = {.n_threads = 2, .max_seqs = 4, .max_context = 128};
    assert_int_equal(ds_spec_mode_parse("fixed:4", &o.spec), 0);
    struct ds_engine *e = NULL;
    assert_int_equal(ds_engine_new(t, d, &o, &e), 0);
    assert_int_equal(ds_engine_release_draft_weights(e), 0);
    ds_engine_free(e);
    e = NULL;
    assert_int_equal(ds_engine_new(t, d, &o, &e), 0);
    int32_t prompt[] = {1, 2, 3, 4}, no_stop = -1;
    struct ds_request rq = {.prompt = prompt, .n_prompt = 4, .max_tokens = 12, .sampling = {.temperature = 0, .top_p = 1},
                            .stop_ids = &no_stop, .n_stop_ids = 1};
    int id;
    assert_int_equal(ds_engine_submit(e, &rq, &id), 0);
    while (ds_engine_active(e) > 0)
        assert_int_equal(ds_engine_step(e), 0);
    struct ds_result *res[1];
    assert_int_equal(ds_engine_take_finished(e, res, 1), 1);
    assert_true(res[0]->stats.rounds > 0);   /* the draft drafted */
    ds_result_free(res[0]);
    ds_engine_free(e);
    ds_draft_free(d);
    ds_model_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spec_mode_parse),
        cmocka_unit_test(test_scheduler_functions),
        cmocka_unit_test(test_appendix_a),
        cmocka_unit_test(test_budget_shrinks_with_load),
        cmocka_unit_test(test_lossless_greedy_pair),
        cmocka_unit_test(test_lossless_greedy_tiny),
        cmocka_unit_test(test_lossless_greedy_heads),
        cmocka_unit_test(test_lossless_sampled),
        cmocka_unit_test(test_trace_draft_prob),
        cmocka_unit_test(test_sts_map),
        cmocka_unit_test(test_release_draft_weights_cpu),
    };
    return cmocka_run_group_tests_name("spec", tests, NULL, NULL);
}
