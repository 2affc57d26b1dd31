/* test-sampler.c: the CPU sampling distribution (ds_probs) against a plain
 * comparison-sort reference written here (the ranking by probability, ties by
 * lower id, kept prefix and renormalization the header specifies), bit for
 * bit, on random rows, rows of many exact ties and flat rows; and the draws. */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "dspark/ds-sampler.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

/* qsort has no context argument */
static const float *ref_keys;

static int ref_by_prob_desc(const void *a, const void *b)
{
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (ref_keys[i] != ref_keys[j])
        return ref_keys[i] > ref_keys[j] ? -1 : 1;
    return i < j ? -1 : i > j;
}

/* The distribution as the header defines it, with a comparison sort: the
 * softmax (and greedy's one-hot) from ds_probs without a cut, which ranks
 * nothing, then the cuts here. */
static void ref_probs(const float *logits, int n, const struct ds_sampling *s, float *probs)
{
    const struct ds_sampling uncut = {.temperature = s->temperature, .top_p = 1.0f, .top_k = 0};
    ds_probs(logits, n, &uncut, probs, NULL);
    if (ds_sampling_is_greedy(s))
        return;
    bool cut_k = s->top_k > 0 && s->top_k < n, cut_p = s->top_p > 0 && s->top_p < 1;
    if (!cut_k && !cut_p)
        return;
    int32_t *order = malloc((size_t)n * sizeof *order);
    for (int i = 0; i < n; i++)
        order[i] = i;
    ref_keys = probs;
    qsort(order, (size_t)n, sizeof *order, ref_by_prob_desc);
    int keep = cut_k ? s->top_k : n;
    if (cut_p) {
        double mass = 0, acc = 0;
        for (int i = 0; i < keep; i++)
            mass += probs[order[i]];
        int j = 0;
        while (j < keep) {
            acc += probs[order[j++]];
            if (acc >= s->top_p * mass)
                break;
        }
        keep = j;
    }
    double kept = 0;
    for (int i = 0; i < keep; i++)
        kept += probs[order[i]];
    float renorm = (float)(1.0 / kept);
    for (int i = keep; i < n; i++)
        probs[order[i]] = 0;
    for (int i = 0; i < keep; i++)
        probs[order[i]] *= renorm;
    free(order);
}

enum row_kind { ROW_RANDOM, ROW_PEAKED, ROW_TIES, ROW_FLAT };

static void make_row(float *x, int n, enum row_kind kind)
{
    for (int i = 0; i < n; i++) {
        float l = 6.0f * ds_test_frand(&rng_state);
        x[i] = kind == ROW_TIES ? floorf(l * 0.5f) * 0.75f : kind == ROW_FLAT ? 0.5f : l;
    }
    if (kind == ROW_PEAKED)
        for (int j = 0; j < 3 && j < n; j++) {
            size_t at = (size_t)(rng_state % (uint64_t)n);
            x[at] = 20.0f - 3.0f * (float)j + ds_test_frand(&rng_state);
        }
}

static void test_probs_match_reference(void **state)
{
    (void)state;
    const int sizes[] = {1, 7, 1000, 151936};
    const struct ds_sampling cases[] = {
        {.temperature = 1.0f, .top_p = 0.95f}, {.temperature = 0.7f, .top_p = 1.0f, .top_k = 50},
        {.temperature = 1.3f, .top_p = 0.8f, .top_k = 1000}, {.temperature = 1.0f, .top_p = 0.01f},
        {.temperature = 0.5f, .top_p = 0.9f, .top_k = 3}, {.temperature = 2.0f, .top_p = 1.0f},
        {.temperature = 1.0f, .top_p = 0.5f, .top_k = 1}, {.temperature = 0.0f, .top_p = 0.9f},
    };
    int checked = 0;
    for (size_t v = 0; v < sizeof sizes / sizeof sizes[0]; v++) {
        int n = sizes[v];
        float *x = malloc((size_t)n * 4), *got = malloc((size_t)n * 4), *want = malloc((size_t)n * 4);
        uint64_t *scratch = malloc((size_t)n * 2 * sizeof *scratch);
        for (int kind = ROW_RANDOM; kind <= ROW_FLAT; kind++)
            for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
                make_row(x, n, (enum row_kind)kind);
                ref_probs(x, n, &cases[c], want);
                ds_probs(x, n, &cases[c], got, scratch);
                if (memcmp(got, want, (size_t)n * 4)) {
                    int i = 0;
                    while (got[i] == want[i])
                        i++;
                    fail_msg("V %d, row kind %d, case %zu: token %d has %.9g, the reference %.9g", n, kind, c, i,
                             (double)got[i], (double)want[i]);
                }
                double total = 0;
                int nonzero = 0;
                for (int i = 0; i < n; i++) {
                    total += got[i];
                    nonzero += got[i] > 0;
                }
                assert_true(fabs(total - 1.0) < 1e-4);
                if (cases[c].top_k > 0 && cases[c].temperature > 0)
                    assert_true(nonzero <= cases[c].top_k);
                checked++;
            }
        free(x), free(got), free(want), free(scratch);
    }
    assert_int_equal(checked, 4 * 4 * 8);
    ds_probs(NULL, 0, &cases[0], NULL, NULL);   /* an empty row: nothing to read or write */
}

/* The draw: the first index whose running sum passes u · total. */
static void test_sample_probs(void **state)
{
    (void)state;
    const float p[5] = {0.0f, 0.25f, 0.0f, 0.5f, 0.25f};
    assert_int_equal(ds_sample_probs(p, 5, 0.0f), 1);
    assert_int_equal(ds_sample_probs(p, 5, 0.2499f), 1);
    assert_int_equal(ds_sample_probs(p, 5, 0.25f), 3);
    assert_int_equal(ds_sample_probs(p, 5, 0.7499f), 3);
    assert_int_equal(ds_sample_probs(p, 5, 0.75f), 4);
    assert_int_equal(ds_sample_probs(p, 5, 0.9999f), 4);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_probs_match_reference),
        cmocka_unit_test(test_sample_probs),
    };
    return cmocka_run_group_tests_name("sampler", tests, NULL, NULL);
}
