/* bench-queue.c: claim + write-back throughput of the dspark queue against
 * the plain PostgreSQL queue pattern, on the same server (bench-queue.sh
 * drives it).
 *
 *   bench-queue CLIENTS BATCH ROUND
 *
 * drains both queues in alternating rounds of ROUND jobs, so that both
 * patterns see the same machine load:
 *   dspark  dspark.claim_jobs(worker, BATCH, ..., ARRAY['qwen3-4b']) (a worker's model) then one
 *           dspark.finish_job_results(worker, rows) with output and statistics,
 *           as dspark-worker writes back (BENCH_FINISH=json: the JSON form,
 *           dspark.finish_jobs(worker, results))
 *   plain   UPDATE bench_plain SET state = 'running' WHERE id IN (SELECT id ...
 *           ORDER BY id LIMIT BATCH FOR UPDATE SKIP LOCKED) RETURNING id, payload,
 *           then UPDATE ... SET state = 'done', result = u.result FROM
 *           unnest(ids, results) u WHERE id = u.id: like dspark, each job's
 *           output travels from the client
 * Each client is a thread with its own connections (libpq defaults: the PG*
 * environment). Prints "dspark JOBS SECONDS" and "plain JOBS SECONDS". */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

struct client {
    int index;
    int batch;
    PGconn *conn[2];       /* [0] dspark, [1] plain */
    int pattern;           /* of the current round */
    long *remaining;       /* jobs left in the round (shared) */
    long done;
    int empty;             /* the queue ran dry */
    int failed;
    int rows;              /* write back dspark.job_result[] rather than JSON */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static PGresult *run(PGconn *c, const char *sql, int n, const char *const *p, int *ok)
{
    PGresult *r = PQexecParams(c, sql, n, NULL, p, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(r);
    *ok = st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK;
    if (!*ok)
        fprintf(stderr, "bench-queue: %s", PQerrorMessage(c));
    return r;
}

/* Append to a growing buffer. */
static void put(char **buf, size_t *len, size_t *cap, const char *s)
{
    size_t n = strlen(s);
    if (*len + n + 1 > *cap) {
        *cap = (*len + n + 1) * 2;
        *buf = realloc(*buf, *cap);
        if (!*buf)
            abort();
    }
    memcpy(*buf + *len, s, n + 1);
    *len += n;
}

/* One claim + write-back; returns the number of jobs, -1 on error. */
static int one_batch(struct client *cl, char **buf, size_t *cap)
{
    PGconn *c = cl->conn[cl->pattern];
    char worker[32], batch[16];
    snprintf(worker, sizeof worker, "bench-%d", cl->index);
    snprintf(batch, sizeof batch, "%d", cl->batch);
    size_t len = 0;
    int ok;
    PGresult *r;
    if (cl->pattern == 0) {
        const char *p[] = { worker, batch };
        r = run(c, "SELECT id, attempt FROM dspark.claim_jobs($1, $2::int, NULL, 300, ARRAY['qwen3-4b'])", 2, p, &ok);
    } else {
        const char *p[] = { batch };
        r = run(c,
                "UPDATE bench_plain SET state = 'running' WHERE id IN"
                " (SELECT id FROM bench_plain WHERE state = 'queued' ORDER BY id"
                "  LIMIT $1::int FOR UPDATE SKIP LOCKED)"
                " RETURNING id, payload",
                1, p, &ok);
    }
    if (!ok) {
        PQclear(r);
        return -1;
    }
    int n = PQntuples(r);
    if (n == 0) {
        PQclear(r);
        return 0;
    }
    if (cl->pattern == 0 && cl->rows) {
        /* dspark.job_result[] literal: each element a quoted row literal */
        put(buf, &len, cap, "{");
        for (int i = 0; i < n; i++) {
            char item[400];
            snprintf(item, sizeof item,
                     "%s\"(%s,%s,succeeded,\\\"output of job %s\\\",,stop,,,,,,,,0.05,,250,30,64,20,,"
                     "80,44,3.2,\\\"{18,14,8,4}\\\",\\\"{20,20,20,20}\\\",)\"",
                     i ? "," : "", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 0));
            put(buf, &len, cap, item);
        }
        put(buf, &len, cap, "}");
        PQclear(r);
        const char *p[] = { worker, *buf };
        r = run(c, "SELECT count(*) FROM dspark.finish_job_results($1, $2::dspark.job_result[])", 2, p, &ok);
    } else if (cl->pattern == 0) {
        put(buf, &len, cap, "[");
        for (int i = 0; i < n; i++) {
            char item[640];
            snprintf(item, sizeof item,
                     "%s{\"id\": %s, \"attempt\": %s, \"state\": \"succeeded\","
                     " \"output_text\": \"output of job %s\", \"finish_reason\": \"stop\","
                     " \"stats\": {\"prompt_tokens\": 30, \"output_tokens\": 64, \"rounds\": 20,"
                     " \"mean_acceptance_length\": 3.2, \"num_verified_tokens\": 80,"
                     " \"num_accepted_tokens\": 44, \"acceptance_by_position\": [18, 14, 8, 4],"
                     " \"verified_by_position\": [20, 20, 20, 20], \"decode_tokens_per_s\": 250,"
                     " \"time_to_first_token_s\": 0.05}}",
                     i ? ", " : "", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 0));
            put(buf, &len, cap, item);
        }
        put(buf, &len, cap, "]");
        PQclear(r);
        const char *p[] = { worker, *buf };
        r = run(c, "SELECT count(*) FROM dspark.finish_jobs($1, $2::jsonb)", 2, p, &ok);
    } else {
        /* two array literals in one buffer: the ids, then their outputs */
        put(buf, &len, cap, "{");
        for (int i = 0; i < n; i++) {
            if (i)
                put(buf, &len, cap, ",");
            put(buf, &len, cap, PQgetvalue(r, i, 0));
        }
        put(buf, &len, cap, "}");
        size_t results_at = len + 1;
        put(buf, &len, cap, " {");
        for (int i = 0; i < n; i++) {
            char item[64];
            snprintf(item, sizeof item, "%s\"output of job %s\"", i ? "," : "", PQgetvalue(r, i, 0));
            put(buf, &len, cap, item);
        }
        put(buf, &len, cap, "}");
        (*buf)[results_at - 1] = 0;
        PQclear(r);
        const char *p[] = { *buf, *buf + results_at };
        r = run(c,
                "UPDATE bench_plain p SET state = 'done', result = u.result"
                " FROM unnest($1::bigint[], $2::text[]) AS u(id, result) WHERE p.id = u.id",
                2, p, &ok);
    }
    PQclear(r);
    return ok ? n : -1;
}

static void *client_round(void *arg)
{
    struct client *cl = arg;
    char *buf = NULL;
    size_t cap = 0;
    while (__atomic_load_n(cl->remaining, __ATOMIC_SEQ_CST) > 0) {
        int n = one_batch(cl, &buf, &cap);
        if (n < 0) {
            cl->failed = 1;
            break;
        }
        if (n == 0) {
            cl->empty = 1;
            break;
        }
        cl->done += n;
        __atomic_sub_fetch(cl->remaining, n, __ATOMIC_SEQ_CST);
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: bench-queue CLIENTS BATCH ROUND\n");
        return 2;
    }
    int nclients = atoi(argv[1]), batch = atoi(argv[2]);
    long round = atol(argv[3]);
    if (nclients < 1 || nclients > 64 || batch < 1 || round < 1) {
        fprintf(stderr, "bench-queue: bad CLIENTS, BATCH or ROUND\n");
        return 2;
    }
    struct client *cl = calloc((size_t)nclients, sizeof *cl);
    pthread_t *th = calloc((size_t)nclients, sizeof *th);
    if (!cl || !th)
        return 1;
    for (int i = 0; i < nclients; i++) {
        cl[i].index = i;
        cl[i].batch = batch;
        cl[i].rows = !(getenv("BENCH_FINISH") && strcmp(getenv("BENCH_FINISH"), "json") == 0);
        for (int k = 0; k < 2; k++) {
            cl[i].conn[k] = PQconnectdb("");
            if (PQstatus(cl[i].conn[k]) != CONNECTION_OK) {
                fprintf(stderr, "bench-queue: %s", PQerrorMessage(cl[i].conn[k]));
                return 1;
            }
        }
    }
    double secs[2] = { 0, 0 };
    long jobs[2] = { 0, 0 };
    int dry[2] = { 0, 0 }, failed = 0;
    while (!failed && !(dry[0] && dry[1])) {
        for (int pattern = 0; pattern < 2 && !failed; pattern++) {
            if (dry[pattern])
                continue;
            long remaining = round;
            for (int i = 0; i < nclients; i++) {
                cl[i].pattern = pattern;
                cl[i].remaining = &remaining;
                cl[i].done = 0;
                cl[i].empty = 0;
            }
            double t0 = now_s();
            for (int i = 0; i < nclients; i++)
                pthread_create(&th[i], NULL, client_round, &cl[i]);
            for (int i = 0; i < nclients; i++) {
                pthread_join(th[i], NULL);
                jobs[pattern] += cl[i].done;
                dry[pattern] |= cl[i].empty;
                failed |= cl[i].failed;
            }
            secs[pattern] += now_s() - t0;
        }
    }
    printf("dspark %ld %.3f\nplain %ld %.3f\n", jobs[0], secs[0], jobs[1], secs[1]);
    for (int i = 0; i < nclients; i++) {
        PQfinish(cl[i].conn[0]);
        PQfinish(cl[i].conn[1]);
    }
    free(cl);
    free(th);
    return failed;
}
