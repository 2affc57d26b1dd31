/* test-gemm.c: the packed matrix product: accuracy against a double-precision
 * reference, and batch invariance (a row's result is bit-identical whatever the
 * number of rows, the thread count and the instruction set). */
#include "config.h"

#include <math.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "dspark/ds-gemm.h"

static uint64_t rng_state = 88172645463325252ull;

static float *rand_vec(size_t n)
{
    float *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++)
        v[i] = ds_test_frand(&rng_state);
    return v;
}

static void test_matches_reference(void **state)
{
    (void)state;
    struct ds_pool *pool;
    assert_int_equal(ds_pool_new(2, &pool), 0);
    int shapes[][3] = {{1, 1, 1}, {7, 33, 5}, {13, 64, 100}, {40, 97, 129}, {3, 256, 31}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        float *w = rand_vec((size_t)n * k), *x = rand_vec((size_t)m * k);
        float *y = malloc((size_t)m * n * sizeof *y);
        struct ds_mat mat;
        assert_int_equal(ds_mat_from_f32(&mat, w, n, k), 0);
        ds_gemm(pool, &mat, x, k, m, y, n, false);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) {
                double ref = 0, mag = 0;
                for (int kk = 0; kk < k; kk++) {
                    ref += (double)x[i * k + kk] * w[j * k + kk];
                    mag += fabs((double)x[i * k + kk] * w[j * k + kk]);
                }
                assert_true(fabs(y[i * n + j] - ref) <= 1e-6 * mag + 1e-30);
            }
        /* accumulate: y += x·Wᵀ starts the chain from y */
        float *y2 = malloc((size_t)m * n * sizeof *y2);
        for (int i = 0; i < m * n; i++)
            y2[i] = 1.0f;
        ds_gemm(pool, &mat, x, k, m, y2, n, true);
        for (int i = 0; i < m * n; i++)
            assert_true(fabsf(y2[i] - (y[i] + 1.0f)) <= 1e-5f * (fabsf(y[i]) + 1.0f) * k);
        /* unpacking gives the rows back */
        float *row = malloc((size_t)k * sizeof *row);
        ds_mat_row(&mat, n - 1, row);
        assert_memory_equal(row, w + (size_t)(n - 1) * k, (size_t)k * sizeof *row);
        free(row);
        ds_mat_done(&mat);
        free(w), free(x), free(y), free(y2);
    }
    ds_pool_free(pool);
}

/* Every row of a product over m rows equals the product of that row alone. */
static void test_batch_invariance(void **state)
{
    (void)state;
    int n = 75, k = 301, mmax = 40;
    float *w = rand_vec((size_t)n * k), *x = rand_vec((size_t)mmax * k);
    struct ds_mat mat;
    assert_int_equal(ds_mat_from_f32(&mat, w, n, k), 0);
    float *alone = malloc((size_t)mmax * n * sizeof *alone);
    for (int i = 0; i < mmax; i++)
        ds_gemm(NULL, &mat, x + (size_t)i * k, k, 1, alone + (size_t)i * n, n, false);
    struct ds_pool *pool;
    assert_int_equal(ds_pool_new(3, &pool), 0);
    float *y = malloc((size_t)mmax * n * sizeof *y);
    for (int m = 1; m <= mmax; m++) {
        for (int off = 0; off + m <= mmax; off += 7) {
            ds_gemm(pool, &mat, x + (size_t)off * k, k, m, y, n, false);
            assert_memory_equal(y, alone + (size_t)off * n, (size_t)m * n * sizeof *y);
        }
    }
    /* and every instruction set gives the same bits */
    const char *isas[] = {"generic", "avx2+fma", NULL};
    for (int i = 0; isas[i]; i++) {
        if (ds_gemm_set_isa(isas[i]) != 0)
            continue;
        ds_gemm(pool, &mat, x, k, mmax, y, n, false);
        assert_memory_equal(y, alone, (size_t)mmax * n * sizeof *y);
    }
    assert_int_equal(ds_gemm_set_isa(NULL), 0);
    ds_pool_free(pool);
    ds_mat_done(&mat);
    free(w), free(x), free(alone), free(y);
}

static void count_task(void *ctx, int task, int thread)
{
    (void)thread;
    int *hits = ctx;
    __atomic_fetch_add(&hits[task], 1, __ATOMIC_RELAXED);
}

static void test_pool_runs_every_task_once(void **state)
{
    (void)state;
    struct ds_pool *pool;
    assert_int_equal(ds_pool_new(4, &pool), 0);
    for (int round = 0; round < 50; round++) {
        int hits[97] = {0};
        ds_pool_run(pool, 97, count_task, hits);
        for (int i = 0; i < 97; i++)
            assert_int_equal(hits[i], 1);
    }
    assert_null(ds_pool_free(pool));
    assert_null(ds_pool_free(NULL));
}

/* The default thread count: every online CPU, at most DS_POOL_MAX_THREADS (a 384-CPU host still starts),
 * and the pool takes it; more threads than that are refused. */
static void test_pool_default_threads(void **state)
{
    (void)state;
    assert_int_equal(ds_pool_default_threads(384), DS_POOL_MAX_THREADS);
    assert_int_equal(ds_pool_default_threads(DS_POOL_MAX_THREADS), DS_POOL_MAX_THREADS);
    assert_int_equal(ds_pool_default_threads(2), 2);
    assert_int_equal(ds_pool_default_threads(-1), 1);
    struct ds_pool *pool;
    assert_int_equal(ds_pool_new(0, &pool), 0);
    assert_int_equal(ds_pool_threads(pool), ds_pool_default_threads(sysconf(_SC_NPROCESSORS_ONLN)));
    assert_null(ds_pool_free(pool));
    assert_true(ds_pool_new(DS_POOL_MAX_THREADS + 1, &pool) < 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_reference),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_pool_runs_every_task_once),
        cmocka_unit_test(test_pool_default_threads),
    };
    return cmocka_run_group_tests_name("gemm", tests, NULL, NULL);
}
