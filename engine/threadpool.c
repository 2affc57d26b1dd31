/* threadpool.c: a fixed pool of worker threads running index-parallel loops.
 *
 * ds_pool_run hands out task indices through an atomic counter; the calling
 * thread works too. Tasks must not depend on which thread runs them for their
 * results (every user here writes disjoint outputs). */
#include "config.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "dspark/ds-gemm.h"

/* about 20-50 microseconds of polling before a worker sleeps */
#define SPIN_ITERS 20000

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

struct ds_pool {
    int n_threads;                 /* including the caller */
    pthread_t *threads;            /* [n_threads - 1] */
    pthread_mutex_t mu;
    pthread_cond_t start_cv, done_cv;
    atomic_ulong generation;       /* bumped for each run */
    atomic_int busy;               /* workers still inside the current run */
    bool stop;
    /* the current run */
    ds_task_fn fn;
    void *ctx;
    int n_tasks;
    atomic_int next;
};

static void run_tasks(struct ds_pool *p, int thread)
{
    for (;;) {
        int t = atomic_fetch_add(&p->next, 1);
        if (t >= p->n_tasks)
            break;
        p->fn(p->ctx, t, thread);
    }
}

struct worker_arg {
    struct ds_pool *pool;
    int index;
};

static void *worker_main(void *arg)
{
    struct worker_arg *wa = arg;
    struct ds_pool *p = wa->pool;
    int index = wa->index;
    free(wa);
    unsigned long seen = 0;
    for (;;) {
        /* spin a little first: a decoding round issues many short runs back to back */
        for (int spin = 0; spin < SPIN_ITERS && atomic_load(&p->generation) == seen && !p->stop; spin++)
            cpu_relax();
        pthread_mutex_lock(&p->mu);
        while (!p->stop && atomic_load(&p->generation) == seen)
            pthread_cond_wait(&p->start_cv, &p->mu);
        bool stop = p->stop;
        pthread_mutex_unlock(&p->mu);
        if (stop)
            break;
        seen = atomic_load(&p->generation);
        run_tasks(p, index);
        if (atomic_fetch_sub(&p->busy, 1) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

int ds_pool_new(int n_threads, struct ds_pool **ret)
{
    if (n_threads <= 0)
        n_threads = ds_pool_default_threads(sysconf(_SC_NPROCESSORS_ONLN));
    if (n_threads > DS_POOL_MAX_THREADS)
        return ds_seterr(DS_EINVAL, "thread count %d is out of range (1..%d)", n_threads, DS_POOL_MAX_THREADS);
    struct ds_pool *p = ds_xcalloc(1, sizeof *p);
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    p->threads = ds_xcalloc((size_t)n_threads, sizeof *p->threads);
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = ds_xmalloc(sizeof *wa);
        wa->pool = p;
        wa->index = i;
        if (pthread_create(&p->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            p->n_threads = i;
            ds_pool_free(p);
            return ds_seterr(DS_ENOMEM, "could not start thread %d of %d", i, n_threads);
        }
    }
    *ret = p;
    return 0;
}

struct ds_pool *ds_pool_free(struct ds_pool *p)
{
    if (!p)
        return NULL;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->start_cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++)
        pthread_join(p->threads[i - 1], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->start_cv);
    pthread_cond_destroy(&p->done_cv);
    free(p->threads);
    free(p);
    return NULL;
}

int ds_pool_threads(const struct ds_pool *p)
{
    return p ? p->n_threads : 1;
}

void ds_pool_run(struct ds_pool *p, int n_tasks, ds_task_fn fn, void *ctx)
{
    if (n_tasks <= 0)
        return;
    if (!p || p->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store(&p->next, 0);
    atomic_store(&p->busy, p->n_threads - 1);
    atomic_fetch_add(&p->generation, 1);
    pthread_cond_broadcast(&p->start_cv);
    pthread_mutex_unlock(&p->mu);
    run_tasks(p, 0);
    for (int spin = 0; spin < SPIN_ITERS && atomic_load(&p->busy) > 0; spin++)
        cpu_relax();
    pthread_mutex_lock(&p->mu);
    while (atomic_load(&p->busy) > 0)
        pthread_cond_wait(&p->done_cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
