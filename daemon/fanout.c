/* fanout.c: dsparkd's database side: the connection (with back-off and
 * re-LISTEN), job notifications turned into ZeroMQ events, queue counts for
 * STATUS= and heartbeats, the lease reaper and retention.
 *
 * A notification names job ids; the rows are read in one query per burst of
 * notifications (never per id) and each job is published once per version it
 * is seen at. After the connection comes back, jobs that finished while it was
 * down are published again, so waiters learn their final states without polling. */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-log.h"
#include "dspark/ds-notify.h"
#include "dspark/ds-wire.h"
#include "dsparkd.h"

#define CONNECT_BACKOFF_MIN_US 200000u
#define CONNECT_BACKOFF_MAX_US 10000000u
#define IDS_PER_QUERY 5000
#define SEEN_SLOTS 8192          /* (id, version) cache against duplicate events */

struct seen {
    int64_t id;
    int64_t version;
};

struct fanout {
    const struct dsparkd_config *cfg;
    struct ds_events_pub *pub;
    struct ds_db *db;
    bool up;
    uint64_t next_connect_us;
    uint64_t backoff_us;
    uint64_t last_ok_us;
    double down_since;               /* wall clock when the connection was lost (0 = never up) */
    char down_reason[256];
    int64_t *ids;                    /* ids named by notifications, not yet read */
    size_t n_ids, cap_ids;
    struct seen seen[SEEN_SLOTS];
    uint64_t published;
};

struct fanout *fanout_new(const struct dsparkd_config *cfg, struct ds_events_pub *pub)
{
    struct fanout *f = ds_xcalloc(1, sizeof *f);
    f->cfg = cfg;
    f->pub = pub;
    f->backoff_us = CONNECT_BACKOFF_MIN_US;
    snprintf(f->down_reason, sizeof f->down_reason, "not connected yet");
    return f;
}

struct fanout *fanout_free(struct fanout *f)
{
    if (!f)
        return NULL;
    ds_db_free(f->db);
    free(f->ids);
    free(f);
    return NULL;
}

bool fanout_up(const struct fanout *f)
{
    return f->up;
}

int fanout_socket(const struct fanout *f)
{
    return f->up ? ds_db_socket(f->db) : -1;
}

uint64_t fanout_last_ok(const struct fanout *f)
{
    return f->last_ok_us;
}

const char *fanout_down_reason(const struct fanout *f)
{
    return f->up ? "" : f->down_reason;
}

uint64_t fanout_published(const struct fanout *f)
{
    return f->published;
}

static void mark_down(struct fanout *f, uint64_t now_us)
{
    if (!f->up)
        return;
    f->up = false;
    /* wall-clock time of the last good exchange: the break may be noticed late */
    f->down_since = ds_wire_now() - (double)(now_us - (f->last_ok_us ? f->last_ok_us : now_us)) / 1e6;
    snprintf(f->down_reason, sizeof f->down_reason, "%s", ds_errdetail());
    ds_log(DS_LOG_WARNING, "lost the database connection: %s", f->down_reason);
    f->next_connect_us = now_us;   /* first retry at once, then back off */
    f->backoff_us = CONNECT_BACKOFF_MIN_US;
}

/* A failed query: if the connection broke, mark it down; otherwise log. */
static int query_failed(struct fanout *f, uint64_t now_us, int r, const char *what)
{
    if (!ds_db_ok(f->db))
        mark_down(f, now_us);
    else
        ds_log(DS_LOG_ERR, "%s failed: %s", what, ds_errdetail());
    return r;
}

/* The session settings and checks that follow every (re)connection. Sets
 * *fatal for a schema version this build does not know. */
static int session_setup(struct fanout *f, bool *fatal)
{
    char sql[96];
    snprintf(sql, sizeof sql, "SET statement_timeout = %" PRId64, f->cfg->db_timeout);
    int r = ds_db_command(f->db, sql, 0, NULL);
    if (r < 0)
        return r;
    int version;
    r = ds_db_schema_version(f->db, &version);
    if (r < 0)
        return r;
    if (version != DS_SCHEMA_VERSION) {
        *fatal = true;
        return ds_db_check_schema(f->db);
    }
    return ds_db_listen(f->db, DS_DB_EVENTS_CHANNEL);
}

static void add_id(struct fanout *f, int64_t id)
{
    if (f->n_ids == f->cap_ids) {
        f->cap_ids = f->cap_ids ? f->cap_ids * 2 : 256;
        f->ids = ds_xrealloc(f->ids, f->cap_ids * sizeof *f->ids);
    }
    f->ids[f->n_ids++] = id;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Publish the rows of a query returning
 * id, batch_id, state, version, attempt, finish_reason, output_tokens, tokens_per_s, mean_acceptance_length. */
static int publish_rows(struct fanout *f, PGresult *res, bool force)
{
    int n = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        int64_t version = strtoll(PQgetvalue(res, i, 3), NULL, 10);
        struct seen *s = &f->seen[(uint64_t)id % SEEN_SLOTS];
        if (!force && s->id == id && s->version >= version)
            continue;   /* already published at this version */
        s->id = id;
        s->version = version;
        struct ds_event ev;
        ds_event_job_init(&ev, id, PQgetvalue(res, i, 2), version, atoi(PQgetvalue(res, i, 4)));
        if (!PQgetisnull(res, i, 1))
            ds_event_set_batch(&ev, strtoll(PQgetvalue(res, i, 1), NULL, 10));
        if (!PQgetisnull(res, i, 5))
            ds_event_set_finish_reason(&ev, PQgetvalue(res, i, 5));
        if (!PQgetisnull(res, i, 6)) {
            ev.output_tokens = strtoll(PQgetvalue(res, i, 6), NULL, 10);
            ev.has |= DS_EV_OUTPUT_TOKENS;
        }
        if (!PQgetisnull(res, i, 7)) {
            ev.tokens_per_s = strtod(PQgetvalue(res, i, 7), NULL);
            ev.has |= DS_EV_TOKENS_PER_S;
        }
        if (!PQgetisnull(res, i, 8)) {
            ev.mean_acceptance_length = strtod(PQgetvalue(res, i, 8), NULL);
            ev.has |= DS_EV_MEAN_ACCEPT;
        }
        int r = ds_events_publish(f->pub, &ev);
        if (r < 0) {
            ds_log_job(DS_LOG_WARNING, id, "could not publish the event: %s", ds_errdetail());
            continue;
        }
        n++;
        f->published++;
    }
    return n;
}

#define JOB_EVENT_COLUMNS \
    "SELECT j.id, j.batch_id, j.state, j.version, j.attempt, j.finish_reason, " \
    "       s.output_tokens, s.decode_tokens_per_s, s.mean_acceptance_length " \
    "FROM dspark.jobs j " \
    "LEFT JOIN dspark.job_stats s ON s.job_id = j.id AND s.attempt = j.attempt " \
    "     AND j.state IN ('succeeded', 'failed', 'cancelled') "

static int flush_ids(struct fanout *f, uint64_t now_us)
{
    if (f->n_ids == 0)
        return 0;
    qsort(f->ids, f->n_ids, sizeof *f->ids, cmp_i64);
    size_t u = 0;
    for (size_t i = 0; i < f->n_ids; i++)
        if (u == 0 || f->ids[i] != f->ids[u - 1])
            f->ids[u++] = f->ids[i];
    int total = 0;
    for (size_t off = 0; off < u; off += IDS_PER_QUERY) {
        size_t n = u - off < IDS_PER_QUERY ? u - off : IDS_PER_QUERY;
        char *arr = ds_db_int64_array(f->ids + off, n);
        const char *params[1] = { arr };
        PGresult *res;
        int r = ds_db_exec(f->db, JOB_EVENT_COLUMNS "WHERE j.id = ANY ($1::bigint[]) ORDER BY j.id", 1, params, &res);
        free(arr);
        if (r < 0) {
            f->n_ids = 0;
            return query_failed(f, now_us, r, "reading notified jobs");
        }
        total += publish_rows(f, res, false);
        PQclear(res);
    }
    f->n_ids = 0;
    f->last_ok_us = now_us;
    return total;
}

/* After a reconnection: publish jobs that finished while we could not listen. */
static void catch_up(struct fanout *f, uint64_t now_us)
{
    if (f->down_since <= 0)
        return;
    char since[64];
    snprintf(since, sizeof since, "%.6f", f->down_since - 2.0);
    const char *params[1] = { since };
    PGresult *res;
    int r = ds_db_exec(f->db, JOB_EVENT_COLUMNS "WHERE j.finished_at >= to_timestamp($1::float8) ORDER BY j.id LIMIT 100000",
                       1, params, &res);
    if (r < 0) {
        query_failed(f, now_us, r, "reading jobs finished during the outage");
        return;
    }
    int n = publish_rows(f, res, false);
    PQclear(res);
    if (n > 0)
        ds_log(DS_LOG_INFO, "published %d job%s that finished while the database connection was down", n,
               n == 1 ? "" : "s");
}

/* Server notices and libpq's own messages go to the log, not raw to stderr. */
static void on_notice(void *arg, const char *message)
{
    (void)arg;
    size_t n = strlen(message);
    while (n > 0 && (message[n - 1] == '\n' || message[n - 1] == ' '))
        n--;
    ds_log(DS_LOG_NOTICE, "database: %.*s", (int)n, message);
}

static void retry_later(struct fanout *f, uint64_t now_us, const char *what)
{
    bool changed = strcmp(f->down_reason, ds_errdetail()) != 0;
    snprintf(f->down_reason, sizeof f->down_reason, "%s", ds_errdetail());
    /* log the first failure, a new reason, and then once per maximal back-off */
    if (changed || f->backoff_us >= CONNECT_BACKOFF_MAX_US)
        ds_log(DS_LOG_WARNING, "%s, retrying: %s", what, f->down_reason);
    f->next_connect_us = now_us + f->backoff_us;
    f->backoff_us = f->backoff_us * 2 > CONNECT_BACKOFF_MAX_US ? CONNECT_BACKOFF_MAX_US : f->backoff_us * 2;
}

int fanout_connect(struct fanout *f, uint64_t now_us)
{
    if (f->up || now_us < f->next_connect_us)
        return 0;
    int r = f->db ? ds_db_ensure(f->db, 0) : ds_db_connect(f->cfg->dsn, "dsparkd", &f->db);
    if (r < 0) {
        retry_later(f, now_us, "database unavailable");
        return 0;
    }
    PQsetNoticeProcessor(ds_db_conn(f->db), on_notice, NULL);
    bool fatal = false;
    r = session_setup(f, &fatal);
    if (r < 0) {
        if (fatal)
            return r;
        retry_later(f, now_us, "database session setup failed");
        return 0;
    }
    f->up = true;
    f->last_ok_us = now_us;
    f->backoff_us = CONNECT_BACKOFF_MIN_US;
    f->down_reason[0] = 0;
    if (f->down_since > 0) {
        ds_log(DS_LOG_NOTICE, "database connection restored, listening on '%s' again", DS_DB_EVENTS_CHANNEL);
        catch_up(f, now_us);
    } else {
        ds_log(DS_LOG_INFO, "connected to the database (schema version %d), listening on '%s'",
               DS_SCHEMA_VERSION, DS_DB_EVENTS_CHANNEL);
    }
    return 1;
}

static void on_notify(void *ud, const char *channel, const char *payload)
{
    struct fanout *f = ud;
    if (strcmp(channel, DS_DB_EVENTS_CHANNEL) != 0)
        return;
    int64_t *ids;
    size_t n;
    if (ds_db_parse_ids(payload, &ids, &n) < 0) {
        ds_log(DS_LOG_WARNING, "ignoring a notification on '%s': %s", channel, ds_errdetail());
        return;
    }
    for (size_t i = 0; i < n; i++)
        add_id(f, ids[i]);
    free(ids);
}

int fanout_pump(struct fanout *f, uint64_t now_us)
{
    int total = 0;
    /* a query reads whatever the server sent meanwhile: loop until no
     * notification is left in libpq's queue */
    for (int round = 0; round < 64 && f->up; round++) {
        int r = ds_db_consume_notify(f->db, on_notify, f);
        if (r < 0) {
            f->n_ids = 0;
            mark_down(f, now_us);
            break;
        }
        if (r > 0)
            f->last_ok_us = now_us;
        if (f->n_ids == 0)
            break;
        r = flush_ids(f, now_us);
        if (r > 0)
            total += r;
    }
    return total;
}

int fanout_status(struct fanout *f, uint64_t now_us, struct fanout_status *ret)
{
    if (!f->up)
        return ds_seterr(DS_EDB, "database connection is down");
    PGresult *res;
    int r = ds_db_exec(f->db,
                       "SELECT (SELECT count(*) FROM dspark.jobs WHERE state = 'queued'), "
                       "       (SELECT count(*) FROM dspark.jobs WHERE state = 'running'), "
                       "       (SELECT coalesce(sum(output_tokens), 0) / 60.0 FROM dspark.job_stats "
                       "         WHERE created_at > now() - interval '60 seconds')",
                       0, NULL, &res);
    if (r < 0)
        return query_failed(f, now_us, r, "reading the queue counts");
    ret->valid = true;
    ret->queued = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    ret->running = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    ret->tokens_per_s = strtod(PQgetvalue(res, 0, 2), NULL);
    PQclear(res);
    f->last_ok_us = now_us;
    /* queries consume input too: deliver notifications that arrived meanwhile */
    fanout_pump(f, now_us);
    return 0;
}

int fanout_reap(struct fanout *f, uint64_t now_us)
{
    if (!f->up)
        return 0;
    char timeout[64];
    snprintf(timeout, sizeof timeout, "%" PRId64 " milliseconds", f->cfg->worker_timeout);
    const char *params[1] = { timeout };
    PGresult *res;
    int r = ds_db_exec(f->db, "SELECT dspark.requeue_expired($1::interval)", 1, params, &res);
    if (r < 0)
        return query_failed(f, now_us, r, "the lease reaper");
    int n = PQgetisnull(res, 0, 0) ? 0 : atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    f->last_ok_us = now_us;
    if (n > 0)
        ds_log(DS_LOG_NOTICE, "lease reaper: %d job%s with an expired lease requeued, failed or cancelled", n,
               n == 1 ? "" : "s");
    fanout_pump(f, now_us);
    return n;
}

int64_t fanout_prune(struct fanout *f, uint64_t now_us)
{
    if (!f->up || f->cfg->retention <= 0)
        return 0;
    char older[64], limit[32];
    snprintf(older, sizeof older, "%" PRId64 " milliseconds", f->cfg->retention);
    snprintf(limit, sizeof limit, "%d", f->cfg->prune_batch);
    const char *params[2] = { older, limit };
    PGresult *res;
    int r = ds_db_exec(f->db, "SELECT dspark.prune($1::interval, $2::int)", 2, params, &res);
    if (r < 0)
        return query_failed(f, now_us, r, "retention (dspark.prune)");
    int64_t n = PQgetisnull(res, 0, 0) ? 0 : strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    f->last_ok_us = now_us;
    if (n > 0)
        ds_log(DS_LOG_INFO, "retention: deleted %" PRId64 " finished job%s", n, n == 1 ? "" : "s");
    return n;
}
