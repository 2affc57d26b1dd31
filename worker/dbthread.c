/* dbthread.c: dspark-worker's database thread. Every database call of a
 * running worker happens here, on its own connection, so that the decoding
 * thread (main.c) never waits for PostgreSQL:
 *
 *   - claims (dspark.claim_jobs) when the decoding thread reports room: its
 *     free KV tokens and free job slots, measured after it took the previous
 *     claim's jobs (the "consumed" counter makes the handshake exact, so the
 *     budget of one claim never counts room that earlier jobs already use;
 *     each job costs its prompt, its max_tokens and what the engine takes
 *     beyond them (the speculative block, the rounding to whole pages), which
 *     claim_jobs adds as p_job_tokens);
 *     an idle worker that finds nothing within its budget asks once more for
 *     a single job with no budget, so that a job too large for it is still
 *     handed out and fails with the engine's reason;
 *   - write-backs (dspark.finish_job_results): everything finished since the last
 *     call goes in one call (an array of dspark.job_result rows, so that the
 *     database decodes no JSON), so at most one call per decoding round;
 *   - heartbeats (dspark.heartbeat) every --heartbeat seconds, extending the
 *     leases of every job held (claimed and not yet written back) and
 *     reporting the ids to stop (cancel requested, or no longer ours), and
 *     sending the server time of the last one, up to which the database
 *     requeues running jobs of this worker that it does not name; a
 *     heartbeat refused because another process took the worker id over
 *     (after this one was cut off for longer than a lease) stops the worker,
 *     and one refused because the worker's row is gone (pruned while it was
 *     cut off) registers it again;
 *   - hand-backs (dspark.release_jobs) when a drain runs out of time;
 *   - a sweep for queued jobs of models that no registered worker serves
 *     (claim_jobs only hands out jobs of the worker's own model): after
 *     --unknown-model-timeout they are claimed and failed with the reason;
 *   - at start, a notification sent to itself from a second connection (the
 *     probe): when it does not come back, as behind a pooler that pools
 *     transactions, a warning says that new jobs are found by polling.
 *
 * The threads share struct wshared under one mutex: the decoding thread
 * appends results and capacity and writes the eventfd; this thread appends
 * claimed jobs and stop ids and signals the condition variable. When the
 * connection breaks, results stay queued here and are written after the
 * reconnection (back-off from ds_db_ensure); a write that committed just
 * before the break is refused the second time by the attempt fence, which
 * is logged and harmless. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "dspark/ds-buf.h"
#include "dspark/ds-db.h"
#include "dspark/ds-log.h"
#include "worker.h"

double wnow(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void wdb_wake(struct wctx *w)
{
    uint64_t one = 1;
    ssize_t n = write(w->sh.wake_fd, &one, sizeof one);
    (void)n; /* EAGAIN: a wake-up is pending already */
}

/* After a claim that found nothing, notifications (every state change of
 * every job, this worker's included) trigger the next claim no sooner than this. */
#define HINT_GAP 0.05
#define PROBE_TIMEOUT 10.0   /* seconds for the notification probe to come back */

struct dbt {
    struct wctx *w;
    struct ds_db *db;
    struct wclaim *held;              /* claimed and not yet written back or released */
    int n_held, cap_held;
    json_t *pending;                  /* finish_jobs items to write */
    int64_t *rel_ids;
    int *rel_att;
    int n_rel, cap_rel;
    /* claiming */
    bool more_maybe;                  /* the last claim returned jobs: there may be more */
    bool hint;                        /* a job notification came (new or requeued jobs) */
    double empty_at;                  /* when a claim last found nothing */
    double next_poll;                 /* claim again at the latest then */
    long empty_budget;                /* the budget of the last claim that found nothing */
    char models[600];                 /* text[] literal of the models served */
    double next_hb, next_sweep;
    bool was_down, state_draining;
    bool down_unsaid;                 /* was_down not logged yet (say_down) */
    char down_why[512];               /* ... and why the connection went */
    bool quit_bounded;                /* the quit deadline bounds every statement (ds_db_set_deadline) */
    bool taken_over;                  /* a heartbeat or claim found the worker id held by another process */
    char heard_until[24];             /* the last heartbeat's now() in µs since the epoch ("": none yet) */
    char pid[16];                     /* this process's, as the worker row holds it */
    int lease_s;
    double next_busy_log;             /* write-backs refused for a passing reason: log at most this often */
    int busy_turns;                   /* turns in a row whose write-back met a passing error */
    char probe[48];                   /* the notification this worker sent itself at start ... */
    double probe_deadline;            /* ... and when to say that it did not arrive (0: it did, or none sent) */
};

/* ---- small helpers ---- */
static void held_add(struct dbt *t, int64_t id, int attempt)
{
    if (t->n_held == t->cap_held) {
        t->cap_held = t->cap_held ? 2 * t->cap_held : 64;
        t->held = ds_xrealloc(t->held, (size_t)t->cap_held * sizeof *t->held);
    }
    t->held[t->n_held++] = (struct wclaim){id, attempt};
}

static void held_remove(struct dbt *t, int64_t id, int attempt)
{
    for (int i = 0; i < t->n_held; i++)
        if (t->held[i].id == id && t->held[i].attempt == attempt) {
            t->held[i] = t->held[--t->n_held];
            return;
        }
}

static void add_release(struct dbt *t, int64_t id, int attempt)
{
    if (t->n_rel == t->cap_rel) {
        t->cap_rel = t->cap_rel ? 2 * t->cap_rel : 64;
        t->rel_ids = ds_xrealloc(t->rel_ids, (size_t)t->cap_rel * sizeof *t->rel_ids);
        t->rel_att = ds_xrealloc(t->rel_att, (size_t)t->cap_rel * sizeof *t->rel_att);
    }
    t->rel_ids[t->n_rel] = id;
    t->rel_att[t->n_rel++] = attempt;
}

/* "{1,2,3}" */
static char *int_array(const int64_t *v64, const int *v32, int n)
{
    size_t cap = 16 + (size_t)n * 21, len = 0;
    char *s = ds_xmalloc(cap);
    s[len++] = '{';
    for (int i = 0; i < n; i++) {
        int64_t v = v64 ? v64[i] : v32 ? (int64_t)v32[i] : 0;
        len += (size_t)snprintf(s + len, cap - len, "%s%" PRId64, i ? "," : "", v);
    }
    s[len++] = '}';
    s[len] = 0;
    return s;
}

/* A text[] literal of one string. */
static void text_array1(char *buf, size_t cap, const char *s)
{
    size_t o = 0;
    buf[o++] = '{';
    buf[o++] = '"';
    for (; *s && o + 4 < cap; s++) {
        if (*s == '"' || *s == '\\')
            buf[o++] = '\\';
        buf[o++] = *s;
    }
    buf[o++] = '"';
    buf[o++] = '}';
    buf[o] = 0;
}

/* Did the last statement fail for a passing reason (a deadlock, a
 * serialization failure, a statement timeout, a lock not available, a server
 * short of disk, memory or connections), so that the same call should be made
 * again later rather than its items judged bad? */
static bool transient_error(struct dbt *t)
{
    const char *st = ds_db_sqlstate(t->db);
    return strncmp(st, "40", 2) == 0 || strncmp(st, "53", 2) == 0 || strcmp(st, "57014") == 0 ||
           strcmp(st, "55P03") == 0;
}

static void lock(struct wctx *w)
{
    pthread_mutex_lock(&w->sh.mu);
}

static void unlock(struct wctx *w)
{
    pthread_mutex_unlock(&w->sh.mu);
}

/* The connection is gone (why: ds_errdetail): the database counts as down until it is back, and the loop
 * says so once (say_down), when the results still to write are known. */
static void mark_down(struct dbt *t)
{
    if (t->was_down)
        return;
    snprintf(t->down_why, sizeof t->down_why, "%s", ds_errdetail());
    t->was_down = t->down_unsaid = true;
    lock(t->w);
    t->w->sh.db_up = false;
    unlock(t->w);
}

static void say_down(struct dbt *t)
{
    if (!t->down_unsaid)
        return;
    wlog(DS_LOG_WARNING, 0, "database connection lost (%s); reconnecting, %zu results waiting", t->down_why,
         json_array_size(t->pending));
    t->down_unsaid = false;
}

/* Did the last call fail because the connection is gone (rather than the statement)? Then the database
 * counts as down (mark_down) until ds_db_ensure has a connection again. */
static bool conn_failed(struct dbt *t)
{
    const char *st = ds_db_sqlstate(t->db);
    bool gone = !ds_db_ok(t->db) || strncmp(st, "08", 2) == 0 || strncmp(st, "57P", 3) == 0;
    if (gone)
        mark_down(t);
    return gone;
}

/* ---- write-back ---- */
static int64_t item_id(json_t *item)
{
    return json_integer_value(json_object_get(item, "id"));
}

static int item_attempt(json_t *item)
{
    return (int)json_integer_value(json_object_get(item, "attempt"));
}

/* The items are written (or refused by the fence): the claims are no longer held. */
static void applied_rows(struct dbt *t, json_t *items, PGresult *res)
{
    for (int i = 0; i < PQntuples(res); i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        bool applied = PQgetvalue(res, i, 1)[0] == 't';
        if (!applied)
            wlog(DS_LOG_NOTICE, id,
                 "result dropped: the job is no longer held by this worker (its lease expired, or it was "
                 "handed back or finished elsewhere)");
    }
    size_t i;
    json_t *item;
    json_array_foreach(items, i, item)
        held_remove(t, item_id(item), item_attempt(item));
}

/* A job claimed again by this worker (its lease had expired, so it was
 * requeued) can have a result of each claim waiting; the older one is refused
 * by the fence anyway, and dspark.finish_job_results takes one item per job,
 * so drop it here. */
struct item_key {
    struct wclaim claim;
    size_t index;
};

static int cmp_item_key(const void *a, const void *b)
{
    const struct wclaim *x = &((const struct item_key *)a)->claim, *y = &((const struct item_key *)b)->claim;
    if (x->id != y->id)
        return x->id < y->id ? -1 : 1;
    return x->attempt < y->attempt ? -1 : x->attempt > y->attempt;
}

static void drop_stale_items(struct dbt *t)
{
    size_t n = json_array_size(t->pending);
    struct item_key *keys = ds_xmalloc(n * sizeof *keys);
    for (size_t i = 0; i < n; i++) {
        json_t *item = json_array_get(t->pending, i);
        keys[i] = (struct item_key){{item_id(item), item_attempt(item)}, i};
    }
    /* by id, then attempt: an entry followed by one of the same id is stale */
    qsort(keys, n, sizeof *keys, cmp_item_key);
    bool *stale = ds_xcalloc(n ? n : 1, sizeof *stale);
    size_t n_stale = 0;
    for (size_t k = 0; k + 1 < n; k++)
        if (keys[k].claim.id == keys[k + 1].claim.id && keys[k].claim.attempt < keys[k + 1].claim.attempt) {
            stale[keys[k].index] = true;
            n_stale++;
        }
    free(keys);
    if (n_stale > 0) {
        json_t *keep = json_array();
        for (size_t i = 0; i < n; i++) {
            json_t *item = json_array_get(t->pending, i);
            if (!stale[i]) {
                json_array_append(keep, item);
                continue;
            }
            wlog(DS_LOG_NOTICE, item_id(item), "result of attempt %d dropped: the job was claimed again",
                 item_attempt(item));
            held_remove(t, item_id(item), item_attempt(item));
        }
        json_decref(t->pending);
        t->pending = keep;
    }
    free(stale);
}

/* ---- write-back items as a dspark.job_result[] literal ---- */
static void sb_quoted(struct ds_buf *b, const char *s, size_t n)
{
    ds_buf_puts(b, "\"");
    const char *run = s, *end = s + n;
    for (; s < end; s++) {
        if (*s != '"' && *s != '\\')
            continue;
        ds_buf_put(b, run, (size_t)(s - run));
        ds_buf_puts(b, "\\");
        run = s;
    }
    ds_buf_put(b, run, (size_t)(end - run));
    ds_buf_puts(b, "\"");
}

/* One field of a row literal: nothing for NULL (absent or null), else the
 * quoted text of a string, number or array of numbers. */
static void sb_field(struct ds_buf *b, json_t *v)
{
    char num[40];
    if (!v || json_is_null(v))
        return;
    if (json_is_string(v)) {
        sb_quoted(b, json_string_value(v), json_string_length(v));
    } else if (json_is_integer(v)) {
        snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        ds_buf_puts(b, num);
    } else if (json_is_real(v)) {
        snprintf(num, sizeof num, "%.17g", json_real_value(v));
        ds_buf_puts(b, num);
    } else if (json_is_boolean(v)) {
        ds_buf_puts(b, json_is_true(v) ? "t" : "f");
    } else if (json_is_array(v)) {
        struct ds_buf a = {0};
        size_t i;
        json_t *x;
        ds_buf_puts(&a, "{");
        json_array_foreach(v, i, x) {
            if (i)
                ds_buf_puts(&a, ",");
            if (json_is_integer(x)) {
                snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(x));
                ds_buf_puts(&a, num);
            } else if (json_is_real(x)) {
                snprintf(num, sizeof num, "%.17g", json_real_value(x));
                ds_buf_puts(&a, num);
            } else {
                ds_buf_puts(&a, "NULL");
            }
        }
        ds_buf_puts(&a, "}");
        sb_quoted(b, a.data, a.len);
        ds_buf_free(&a);
    } else {
        /* an object: its JSON text (the database refuses it with a message) */
        char *text = json_dumps(v, JSON_COMPACT);
        sb_quoted(b, text, strlen(text));
        free(text);
    }
}

/* The fields of dspark.job_result, in order: the item's own, then those of
 * its "stats" object (the columns of dspark.job_stats). */
static const char *const result_fields[] = {"id", "attempt", "state", "output_text", "output_ids",
                                            "finish_reason", "error", NULL};
static const char *const stats_fields[] = {
    "device", "model", "draft", "model_checksum", "draft_checksum", "queue_wait_s",
    "time_to_first_token_s", "e2e_latency_s", "decode_tokens_per_s", "prompt_tokens", "output_tokens",
    "rounds", "num_draft_tokens", "num_verified_tokens", "num_accepted_tokens", "mean_acceptance_length",
    "acceptance_by_position", "verified_by_position", "mean_verify_len", NULL};

/* The items (finish_jobs JSON objects) as an array literal of rows. */
static char *results_literal(json_t *items)
{
    struct ds_buf out = {0}, row = {0};
    size_t i;
    json_t *item;
    ds_buf_puts(&out, "{");
    json_array_foreach(items, i, item) {
        json_t *st = json_object_get(item, "stats");
        row.len = 0;
        ds_buf_puts(&row, "(");
        for (int k = 0; result_fields[k]; k++) {
            if (k)
                ds_buf_puts(&row, ",");
            sb_field(&row, json_object_get(item, result_fields[k]));
        }
        for (int k = 0; stats_fields[k]; k++) {
            ds_buf_puts(&row, ",");
            sb_field(&row, json_is_object(st) ? json_object_get(st, stats_fields[k]) : NULL);
        }
        ds_buf_puts(&row, ")");
        if (i)
            ds_buf_puts(&out, ",");
        sb_quoted(&out, row.data, row.len);
    }
    ds_buf_puts(&out, "}");
    ds_buf_free(&row);
    return out.data;
}

/* How one write-back call went (when the connection held). */
enum written { WRITTEN, REFUSED, BUSY };   /* applied or fenced; the statement failed; a passing error */

/* Write one array of items; 0 with *how, or -1 when the connection failed
 * (nothing lost). */
static int finish_call(struct dbt *t, json_t *items, enum written *how)
{
    char *text = results_literal(items);
    const char *params[2] = {t->w->id.worker_id, text};
    PGresult *res;
    int r = ds_db_exec(t->db, "SELECT id, applied FROM dspark.finish_job_results($1, $2::dspark.job_result[])", 2, params,
                       &res);
    free(text);
    *how = WRITTEN;
    if (r < 0) {
        if (conn_failed(t))
            return -1;
        *how = transient_error(t) ? BUSY : REFUSED;
        return 0;
    }
    applied_rows(t, items, res);
    PQclear(res);
    return 0;
}

/* Keep the pending items from the i-th on, after those in kept (the others are written). */
static void keep_pending_from(struct dbt *t, json_t *kept, size_t i)
{
    for (size_t k = i; k < json_array_size(t->pending); k++)
        json_array_append(kept, json_array_get(t->pending, k));
    json_decref(t->pending);
    t->pending = kept;
}

static void log_busy(struct dbt *t, size_t n)
{
    if (wnow() < t->next_busy_log)
        return;
    wlog(DS_LOG_WARNING, 0, "could not write %zu result%s (%s); trying again", n, n == 1 ? "" : "s", ds_errdetail());
    t->next_busy_log = wnow() + 30;
}

/* Write what is pending, in one call when it can. A passing error (a lock, a
 * timeout) keeps the items for the next turn, so that heartbeats and claims
 * go on meanwhile; after BUSY_TRIES such turns, or when the database refuses
 * the call, the items go one by one: a refused item is stored as failed, an
 * item held up by a passing error waits, and the others are written. */
#define BUSY_TRIES 3
static int write_back(struct dbt *t)
{
    if (json_array_size(t->pending) > 1)
        drop_stale_items(t);
    size_t n = json_array_size(t->pending);
    if (n == 0)
        return 0;
    enum written how;
    if (finish_call(t, t->pending, &how) < 0)
        return -1;
    if (how == WRITTEN) {
        t->busy_turns = 0;
        json_array_clear(t->pending);
        return 0;
    }
    if (how == BUSY && ++t->busy_turns < BUSY_TRIES) {
        log_busy(t, n);
        return 0;
    }
    if (how == REFUSED)
        wlog(DS_LOG_WARNING, 0, "could not write %zu results at once: %s; writing them one by one", n,
             ds_errdetail());
    json_t *kept = json_array();
    int busy_items = 0;
    for (size_t i = 0; i < n; i++) {
        if (busy_items == 2) {
            /* the table itself is held up: do not wait item by item now */
            keep_pending_from(t, kept, i);
            return 0;
        }
        json_t *one = json_array(), *item = json_array_get(t->pending, i);
        json_array_append(one, item);
        int r = finish_call(t, one, &how);
        json_decref(one);
        if (r < 0) {
            keep_pending_from(t, kept, i);   /* the items not written yet */
            return -1;
        }
        if (how == BUSY) {
            log_busy(t, 1);
            json_array_append(kept, item);
            busy_items++;
        }
        if (how != REFUSED)
            continue;
        int64_t id = item_id(item);
        char msg[600];
        snprintf(msg, sizeof msg, "could not store the result: %s", ds_errdetail());
        wlog(DS_LOG_ERR, id, "%s", msg);
        json_t *f = json_pack("[{s:I, s:O, s:s, s:s, s:s}]", "id", (json_int_t)id, "attempt",
                              json_object_get(item, "attempt"), "state", "failed", "finish_reason", "error",
                              "error", msg);
        r = f ? finish_call(t, f, &how) : 0;
        json_decref(f);
        if (r < 0) {
            /* the connection broke: keep this item (its failure is written
             * again after the reconnection) and the ones not written yet */
            keep_pending_from(t, kept, i);
            return -1;
        }
        if (how == BUSY) {
            json_array_append(kept, item);   /* the result itself is tried again */
            busy_items++;
        } else if (how == REFUSED) {
            wlog(DS_LOG_ERR, id, "could not store the failure either: %s; the lease will expire", ds_errdetail());
            held_remove(t, id, item_attempt(item));
        }
    }
    json_decref(t->pending);
    t->pending = kept;
    if (json_array_size(kept) == 0)
        t->busy_turns = 0;
    return 0;
}

/* ---- release ---- */
static int release(struct dbt *t)
{
    if (t->n_rel == 0)
        return 0;
    char *ids = int_array(t->rel_ids, NULL, t->n_rel), *att = int_array(NULL, t->rel_att, t->n_rel);
    const char *params[3] = {t->w->id.worker_id, ids, att};
    PGresult *res;
    int r = ds_db_exec(t->db, "SELECT * FROM dspark.release_jobs($1, $2::bigint[], $3::int[])", 3, params, &res);
    free(ids);
    free(att);
    if (r < 0) {
        if (conn_failed(t))
            return -1;
        if (transient_error(t)) {   /* kept, and their leases with them, for the next turn */
            if (wnow() >= t->next_busy_log) {
                wlog(DS_LOG_WARNING, 0, "could not hand back %d jobs (%s); trying again", t->n_rel, ds_errdetail());
                t->next_busy_log = wnow() + 30;
            }
            return 0;
        }
        wlog(DS_LOG_ERR, 0, "could not hand back %d jobs: %s; their leases will expire", t->n_rel, ds_errdetail());
    } else {
        wlog(DS_LOG_INFO, 0, "handed back %d of %d unfinished jobs to the queue", PQntuples(res), t->n_rel);
        PQclear(res);
    }
    for (int i = 0; i < t->n_rel; i++)
        held_remove(t, t->rel_ids[i], t->rel_att[i]);
    t->n_rel = 0;
    return 0;
}

/* ---- heartbeat ---- */
/* Another process holds this worker id now (SQLSTATE 55006): claim nothing more, and the decoding
 * thread stops (main.c). */
static void taken_over(struct dbt *t)
{
    wlog(DS_LOG_ERR, 0, "%s; stopping", ds_errdetail());
    t->taken_over = true;
    lock(t->w);
    t->w->sh.taken_over = true;
    pthread_cond_signal(&t->w->sh.main_cv);
    unlock(t->w);
}

/* The worker's row is gone (pruned while this worker was cut off): register again. The next heartbeat
 * extends what is still held and names the rest to stop; a draining worker says so again. */
static int register_again(struct dbt *t)
{
    wlog(DS_LOG_WARNING, 0, "%s; registering again", ds_errdetail());
    if (wregister_row(t->w, t->db) < 0) {
        if (conn_failed(t))
            return -1;
        if (strcmp(ds_db_sqlstate(t->db), "55006") == 0)
            taken_over(t);   /* another host took the id meanwhile */
        else
            wlog(DS_LOG_ERR, 0, "could not register again: %s", ds_errdetail());
        return 0;
    }
    t->next_hb = 0;
    t->state_draining = false;
    return 0;
}

/* A heartbeat or claim that the database refused for the worker row (sql/018's refuse_worker_row): another
 * process holds it (55006: stop) or it is gone (P0002: register again). True when it was, with *ret the
 * caller's result (-1: the connection failed). */
static bool row_refused(struct dbt *t, int *ret)
{
    if (strcmp(ds_db_sqlstate(t->db), "55006") == 0) {
        taken_over(t);
        *ret = 0;
        return true;
    }
    if (strcmp(ds_db_sqlstate(t->db), "P0002") == 0) {
        *ret = register_again(t);
        return true;
    }
    return false;
}

static int heartbeat(struct dbt *t)
{
    int64_t *ids = ds_xmalloc(((size_t)t->n_held + 1) * sizeof *ids);
    int *att = ds_xmalloc(((size_t)t->n_held + 1) * sizeof *att);
    for (int i = 0; i < t->n_held; i++)
        ids[i] = t->held[i].id, att[i] = t->held[i].attempt;
    char *sids = int_array(ids, NULL, t->n_held), *satt = int_array(NULL, att, t->n_held), lease[16];
    free(ids);
    free(att);
    /* the claims this heartbeat speaks for */
    int n_sent = t->n_held;
    struct wclaim *sent = ds_xmalloc(((size_t)n_sent + 1) * sizeof *sent);
    if (n_sent > 0)
        memcpy(sent, t->held, (size_t)n_sent * sizeof *sent);
    snprintf(lease, sizeof lease, "%d", t->lease_s);
    /* The watermark: the server time of the last heartbeat, whose answer came before this list was made.
     * A claim read after that started later, so the database ends the leases of unnamed jobs only up to
     * it, and a heartbeat that runs late (on a connection given up) cannot take a newer claim (sql/018).
     * One row always: the server's now() for the next heartbeat, and an id to stop or NULL. */
    const char *params[8] = {t->w->id.worker_id, sids, satt, lease, t->w->id.host, t->pid, t->w->id.instance,
                             t->heard_until[0] ? t->heard_until : NULL};
    PGresult *res;
    int r = ds_db_exec(t->db,
                       "SELECT (extract(epoch FROM now()) * 1000000)::bigint, h.id"
                       " FROM (SELECT) AS o LEFT JOIN LATERAL dspark.heartbeat($1, $2::bigint[], $3::int[], $4::int,"
                       " $5, $6::int, $7, timestamptz 'epoch' + $8::bigint * interval '1 microsecond') AS h(id) ON true",
                       8, params, &res);
    free(sids);
    free(satt);
    if (r < 0) {
        free(sent);
        if (conn_failed(t))
            return -1;
        if (row_refused(t, &r))
            return r;
        wlog(DS_LOG_ERR, 0, "heartbeat failed: %s", ds_errdetail());
        return 0;
    }
    int n = PQntuples(res);
    if (n > 0 && !PQgetisnull(res, 0, 0))
        snprintf(t->heard_until, sizeof t->heard_until, "%s", PQgetvalue(res, 0, 0));
    if (n > 0 && !PQgetisnull(res, 0, 1)) {
        /* stop the claims this heartbeat named, not a claim of the same job made since */
        struct wshared *sh = &t->w->sh;
        lock(t->w);
        for (int i = 0; i < n; i++) {
            int64_t id = strtoll(PQgetvalue(res, i, 1), NULL, 10);
            for (int k = 0; k < n_sent; k++) {
                if (sent[k].id != id)
                    continue;
                if (sh->n_stop == sh->cap_stop) {
                    sh->cap_stop = sh->cap_stop ? 2 * sh->cap_stop : 32;
                    sh->stops = ds_xrealloc(sh->stops, (size_t)sh->cap_stop * sizeof *sh->stops);
                }
                sh->stops[sh->n_stop++] = sent[k];
            }
        }
        pthread_cond_signal(&sh->main_cv);
        unlock(t->w);
    }
    PQclear(res);
    free(sent);
    return 0;
}

/* ---- claiming ---- */
/* Claim up to max_jobs within budget (< 0: no budget). Returns the number of
 * jobs delivered to the decoding thread, or -1 when the connection failed. */
static int claim(struct dbt *t, int max_jobs, long budget)
{
    char smax[16], sbudget[32], lease[16], job_tokens[16];
    snprintf(smax, sizeof smax, "%d", max_jobs);
    snprintf(sbudget, sizeof sbudget, "%ld", budget);
    snprintf(lease, sizeof lease, "%d", t->lease_s);
    snprintf(job_tokens, sizeof job_tokens, "%d", t->w->job_tokens);
    const char *params[7] = {t->w->id.instance, t->w->id.worker_id, smax, budget >= 0 ? sbudget : NULL, lease,
                             t->models, job_tokens};
    PGresult *res;
    /* only while this process holds the worker row (sql/018): one whose id was taken over stops here */
    int r = ds_db_exec(t->db,
                       "SELECT " WJOB_COLUMNS
                       " FROM dspark.claim_jobs_held($1, $2, $3::int, $4::bigint, $5::int, $6::text[], $7::int)",
                       7, params, &res);
    if (r < 0) {
        if (conn_failed(t))
            return -1;
        if (row_refused(t, &r))
            return r;
        wlog(DS_LOG_ERR, 0, "claim failed: %s", ds_errdetail());
        t->next_poll = wnow() + t->w->o.poll;
        t->more_maybe = false;
        return 0;
    }
    int n = PQntuples(res);
    double now = wnow();
    struct wjob *first = NULL, **tail = &first;
    for (int i = 0; i < n; i++) {
        struct wjob *j = wjob_from_row(res, i);
        j->t_claimed = now;
        held_add(t, j->id, j->attempt);
        wlog(DS_LOG_DEBUG, j->id, "claimed (attempt %d)", j->attempt);
        *tail = j;
        tail = &j->next;
    }
    PQclear(res);
    if (n > 0) {
        struct wshared *sh = &t->w->sh;
        lock(t->w);
        *sh->inbox_tail = first;
        sh->inbox_tail = tail;
        sh->delivered += (uint64_t)n;
        sh->queue_empty = false;
        pthread_cond_signal(&sh->main_cv);
        unlock(t->w);
    }
    return n;
}

/* ---- jobs of models nobody serves ---- */
static int sweep(struct dbt *t)
{
    char secs[32];
    snprintf(secs, sizeof secs, "%g", t->w->o.unknown_model_timeout);
    const char *params[1] = {secs};
    PGresult *res;
    /* a model counts as served while a worker for it starts (loading, which
     * may take minutes), runs or drains, or was heard from in the last ten
     * minutes (a worker between a crash and its restart) */
    int r = ds_db_exec(t->db,
                       "SELECT m.model, (SELECT string_agg(DISTINCT quote_literal(w.model), ', ')"
                       "                 FROM dspark.workers w"
                       "                 WHERE w.state IN ('starting', 'running', 'draining'))"
                       /* (the queued jobs as the claims' index and the delayed jobs' index hold them) */
                       " FROM (SELECT DISTINCT j.model"
                       "       FROM (SELECT c.model, c.created_at, c.run_after FROM dspark.jobs c"
                       "             WHERE c.state = 'queued' AND NOT c.delayed"
                       "             UNION ALL"
                       "             SELECT d.model, d.created_at, d.run_after FROM dspark.jobs d"
                       "             WHERE d.state = 'queued' AND d.delayed"
                       "               AND d.run_after < now() - make_interval(secs => $1::float8)) j"
                       "       WHERE greatest(j.created_at, j.run_after)"
                       "             < now() - make_interval(secs => $1::float8)"
                       "         AND NOT EXISTS (SELECT FROM dspark.workers w WHERE w.model = j.model"
                       "             AND (w.state IN ('starting', 'running', 'draining')"
                       "                  OR w.heartbeat_at > now() - interval '10 minutes'))"
                       "       LIMIT 16) m",
                       1, params, &res);
    if (r < 0) {
        if (conn_failed(t))
            return -1;
        wlog(DS_LOG_ERR, 0, "could not look for jobs of unserved models: %s", ds_errdetail());
        return 0;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        const char *model = PQgetvalue(res, i, 0);
        const char *served = PQgetisnull(res, i, 1) ? "none" : PQgetvalue(res, i, 1);
        char lease[16], msg[1024];
        snprintf(lease, sizeof lease, "%d", t->lease_s);
        const char *cp[5] = {t->w->id.instance, t->w->id.worker_id, model, lease, secs};
        PGresult *jr;
        /* only while this process holds the worker row (sql/020), as its claims; only the jobs that have waited
         * the timeout themselves, and none once a worker serves the model (sql/021) */
        if (ds_db_exec(t->db,
                       "SELECT " WJOB_COLUMNS " FROM dspark.claim_unserved_held($1, $2, $3, 1000, $4::int, $5::float8)",
                       5, cp, &jr) < 0) {
            PQclear(res);
            if (conn_failed(t))
                return -1;
            if (row_refused(t, &r))
                return r;
            wlog(DS_LOG_ERR, 0, "could not claim jobs of unserved model '%s': %s", model, ds_errdetail());
            return 0;
        }
        snprintf(msg, sizeof msg, "no worker serves model '%s' (models served now: %s)", model, served);
        for (int k = 0; k < PQntuples(jr); k++) {
            struct wjob *j = wjob_from_row(jr, k);
            held_add(t, j->id, j->attempt);
            wlog(DS_LOG_NOTICE, j->id, "failing: %s", msg);
            json_array_append_new(t->pending, wfailed_json(NULL, j, msg));
            wjob_free(j);
        }
        PQclear(jr);
    }
    PQclear(res);
    return write_back(t);
}

static void notify_cb(void *ud, const char *channel, const char *payload)
{
    (void)channel;
    struct dbt *t = ud;
    if (t->probe_deadline > 0 && strcmp(payload, t->probe) == 0) {
        t->probe_deadline = 0;
        wlog(DS_LOG_DEBUG, 0, "notifications arrive: the probe came back");
    }
    t->hint = true;
}

/* Behind a pooler that pools transactions (PgBouncer's pool_mode = transaction) LISTEN is not served: send,
 * from a connection of its own, a notification that this worker's connection should receive, and say so
 * when it does not (the worker then finds new jobs by polling). */
static void probe_send(struct dbt *t)
{
    snprintf(t->probe, sizeof t->probe, DS_DB_PROBE_PREFIX "worker.%s.%.0f", t->pid, wnow() * 1e6);
    if (ds_db_send_probe(t->w->o.dsn, "dspark-worker-probe", t->probe) == 0)
        t->probe_deadline = wnow() + PROBE_TIMEOUT;
}

static void set_state(struct dbt *t, const char *state)
{
    /* with its instance: a worker whose id was taken over leaves the new holder's row alone */
    const char *params[5] = {t->w->id.worker_id, state, t->w->id.host, t->pid, t->w->id.instance};
    if (ds_db_command(t->db, "SELECT dspark.set_worker_state($1, $2, $3, $4::int, $5)", 5, params) < 0)
        wlog(DS_LOG_WARNING, 0, "could not set the worker state '%s': %s", state, ds_errdetail());
}

static void *db_main(void *arg)
{
    struct dbt *t = arg;
    struct wctx *w = t->w;
    struct wshared *sh = &w->sh;
    bool pause = false;
    for (;;) {
        if (pause) {
            /* the connection failed under the last call: do not spin */
            struct pollfd pf = {.fd = sh->wake_fd, .events = POLLIN};
            poll(&pf, 1, 200);
            uint64_t v;
            ssize_t rd = read(sh->wake_fd, &v, sizeof v);
            (void)rd;
            pause = false;
            t->probe_deadline = 0;   /* a probe lost with a broken connection proves nothing */
        }
        /* take what the decoding thread left */
        lock(w);
        if (json_array_size(sh->results) > 0) {
            json_array_extend(t->pending, sh->results);
            json_array_clear(sh->results);
        }
        for (int i = 0; i < sh->n_rel; i++)
            add_release(t, sh->rel_ids[i], sh->rel_attempts[i]);
        sh->n_rel = 0;
        if (sh->quit) {
            /* jobs claimed after the decoding thread stopped taking them go back */
            for (struct wjob *j = sh->inbox, *next; j; j = next) {
                next = j->next;
                add_release(t, j->id, j->attempt);
                wlog(DS_LOG_INFO, j->id, "handing back: claimed as the worker stopped");
                wjob_free(j);
            }
            sh->inbox = NULL;
            sh->inbox_tail = &sh->inbox;
        }
        long budget = sh->cap_budget;
        int slots = sh->cap_slots;
        bool idle = sh->cap_idle, draining = sh->draining, quit = sh->quit;
        bool handshake = sh->cap_consumed == sh->delivered && !sh->inbox;
        double quit_deadline = sh->quit_deadline;
        unlock(w);

        double now = wnow();
        say_down(t);
        if (quit && now >= quit_deadline)
            break;
        if (quit && !t->quit_bounded) {
            /* the last writes: no statement waits past the quit deadline */
            ds_db_set_deadline(t->db, (int)ceil((quit_deadline - now) * 1000));
            t->quit_bounded = true;
        }
        int r = ds_db_ensure(t->db, 0);
        if (r < 0) {
            mark_down(t);
            say_down(t);
            pause = true;
            continue;
        }
        if (r == 1 || t->was_down) {
            wlog(DS_LOG_NOTICE, 0, "database connection restored; writing %zu waiting results",
                 json_array_size(t->pending));
            t->was_down = false;
            t->hint = true;
            t->next_hb = 0;
            lock(w);
            sh->db_up = true;
            unlock(w);
        }
        if (write_back(t) < 0 || release(t) < 0) {
            pause = true;
            continue;
        }
        if (quit) {
            if (json_array_size(t->pending) > 0 || t->n_rel > 0) {
                /* a passing error (a lock, a timeout) kept some: again, until the quit deadline */
                pause = true;
                continue;
            }
            set_state(t, "stopped");
            break;
        }
        if (draining && !t->state_draining) {
            set_state(t, "draining");
            t->state_draining = true;
        }
        if (now >= t->next_hb) {
            t->next_hb = now + w->o.heartbeat;
            if (heartbeat(t) < 0) {
                pause = true;
                continue;
            }
        }
        if (!draining && !t->taken_over && w->o.unknown_model_timeout > 0 && now >= t->next_sweep) {
            t->next_sweep = now + fmax(1.0, w->o.unknown_model_timeout / 2);
            if (sweep(t) < 0) {
                pause = true;
                continue;
            }
        }
        /* claim when the decoding thread has room, measured after it took the
         * last claim's jobs, and there may be jobs */
        bool hinted = t->hint && now >= t->empty_at + HINT_GAP;
        if (!draining && !t->taken_over && handshake && slots > 0 &&
            (t->more_maybe || hinted || now >= t->next_poll || budget > t->empty_budget)) {
            t->hint = false;
            int n = 0;
            if (budget > 0) {
                n = claim(t, slots, budget);
                if (n < 0) {
                    pause = true;
                    continue;
                }
            }
            if (n == 0 && idle && !t->taken_over) {
                /* an idle worker takes one job whatever its size: if it cannot
                 * run it, the job fails with the reason instead of waiting forever */
                n = claim(t, 1, -1);
                if (n < 0) {
                    pause = true;
                    continue;
                }
                if (n == 0) {
                    lock(w);
                    sh->queue_empty = true;
                    pthread_cond_signal(&sh->main_cv);
                    unlock(w);
                }
            }
            t->more_maybe = n > 0;
            if (n == 0) {
                t->empty_budget = idle ? LONG_MAX : budget;
                t->empty_at = wnow();
                t->next_poll = t->empty_at + w->o.poll;
            } else {
                t->empty_budget = -1;
            }
        }

        /* sleep until woken, notified, or the next timer */
        now = wnow();
        double until = t->next_hb;
        if (!t->more_maybe && t->next_poll < until)
            until = t->next_poll;
        if (t->hint && t->empty_at + HINT_GAP < until)
            until = t->empty_at + HINT_GAP;
        if (!draining && w->o.unknown_model_timeout > 0 && t->next_sweep < until)
            until = t->next_sweep;
        int timeout_ms = (int)fmax(0, fmin(1000, (until - now) * 1000));
        struct pollfd pf[2] = {{.fd = sh->wake_fd, .events = POLLIN}, {.fd = ds_db_socket(t->db), .events = POLLIN}};
        int np = pf[1].fd >= 0 ? 2 : 1;
        if (poll(pf, (nfds_t)np, timeout_ms) > 0) {
            if (pf[0].revents & POLLIN) {
                uint64_t v;
                ssize_t rd = read(sh->wake_fd, &v, sizeof v);
                (void)rd;
            }
        }
        if (ds_db_consume_notify(t->db, notify_cb, t) < 0)
            pause = true;
        if (t->probe_deadline > 0 && wnow() >= t->probe_deadline) {
            t->probe_deadline = 0;
            wlog(DS_LOG_WARNING, 0,
                 "notifications do not arrive on this worker's database connection (a pooler that pools "
                 "transactions?): an idle worker finds new jobs by polling, every %g s (--poll-interval)",
                 w->o.poll);
        }
    }
    int left = (int)json_array_size(t->pending) + t->n_rel;
    if (left > 0)
        wlog(DS_LOG_WARNING, 0,
             "gave up writing %d results and hand-backs at the quit deadline: the database %s; those jobs return "
             "to the queue when their leases expire",
             left, t->was_down ? "stayed unreachable" : "kept refusing them for a passing reason (a lock, a timeout)");
    lock(w);
    sh->unwritten = left;
    pthread_cond_signal(&sh->main_cv);
    unlock(w);
    json_decref(t->pending);
    free(t->held);
    free(t->rel_ids);
    free(t->rel_att);
    free(t);
    return NULL;
}

int wdb_start(struct wctx *w, pthread_t *ret_thread)
{
    struct dbt *t = ds_xcalloc(1, sizeof *t);
    t->w = w;
    t->db = w->db;
    t->pending = json_array();
    t->hint = true;
    t->empty_budget = -1;
    t->lease_s = (int)ceil(w->o.lease);
    snprintf(t->pid, sizeof t->pid, "%d", (int)getpid());
    text_array1(t->models, sizeof t->models, w->id.model);
    t->next_sweep = wnow() + (w->o.unknown_model_timeout > 0 ? fmin(w->o.unknown_model_timeout, 5) : 0);
    if (ds_db_listen(t->db, DS_DB_EVENTS_CHANNEL) < 0)
        wlog(DS_LOG_WARNING, 0, "could not LISTEN for new jobs (%s); polling every %g s", ds_errdetail(), w->o.poll);
    else
        probe_send(t);
    int r = pthread_create(ret_thread, NULL, db_main, t);
    if (r != 0) {
        json_decref(t->pending);
        free(t);
        return ds_seterr(DS_EIO, "could not start the database thread: %s", strerror(r));
    }
    return 0;
}
