/* fanout.c: dsparkd's database side: the connection (made on a thread of its
 * own, so that the loop never waits for it; with back-off and re-LISTEN), job
 * notifications turned into ZeroMQ events, queue counts for STATUS= and
 * heartbeats, the lease reaper, the expiry of queued jobs past their deadline,
 * and retention.
 *
 * A notification names each state change: job id, version, state and attempt
 * (see DS_DB_EVENTS_CHANNEL). The rows are read in one query per burst of
 * notifications (never per id); then, per job and in version order, every
 * notified change newer than what was published for that job goes out as an
 * event (batch from the row), and the row's own state last, with its final
 * statistics. So a job inserted, claimed and finished within milliseconds, or
 * in one transaction, still shows all three states. No job is published twice
 * at one version or out of order (the `seen` cache). After the connection
 * comes back, jobs that finished while it was down are published again, so
 * waiters learn their final states without polling.
 *
 * After connecting, a notification sent from a connection of its own must
 * come back on dsparkd's (the probe; a second one when the first did not,
 * one that could not be sent tried again, and none once one has come back):
 * behind a proxy that pools transactions
 * (PgBouncer's pool_mode = transaction) LISTEN is not served, no job event
 * would ever go out, and dsparkd stops with a configuration error instead. */
#include "config.h"

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dspark/ds-log.h"
#include "dspark/ds-notify.h"
#include "dspark/ds-wire.h"
#include "dsparkd.h"

#define CONNECT_BACKOFF_MIN_US 200000u
#define CONNECT_BACKOFF_MAX_US 10000000u
#define IDS_PER_QUERY 5000
#define SEEN_SLOTS 8192          /* (id, last version published) against duplicate events */
#define MAX_PENDING (1u << 22)   /* notified changes kept while their rows cannot be read */
#define START_CATCH_UP_DELAY_US 3000000u  /* after the first connection */
#define START_CATCH_UP_WINDOW_S 600.0     /* finals of the last ten minutes are republished at start */
#define PROBE_TIMEOUT_US 10000000u        /* each probe must come back within this */
#define PROBE_TRIES 2                     /* probes sent before the verdict */

struct seen {
    int64_t id;
    int64_t version;
};

struct fanout {
    const struct dsparkd_config *cfg;
    struct ds_events_pub *pub;
    struct ds_db *db;
    bool up;
    bool connecting;                 /* db is an attempt under way (ds_db_connect_start) */
    int connect_fd;                  /* while connecting: the descriptor and events that say it is over */
    short connect_events;
    uint64_t next_connect_us;
    uint64_t backoff_us;
    uint64_t last_ok_us;
    uint64_t down_since_us;          /* when the connection was lost (0 = never up) */
    uint64_t start_catch_up_us;      /* when to republish the finals of before the start (0 = done) */
    uint64_t bad_notifications;      /* not job changes, since the last line about them */
    uint64_t next_bad_log_us;
    char down_reason[256];
    struct ds_db_transition *tr;     /* changes named by notifications, not yet published */
    size_t n_tr, cap_tr;
    int64_t *ids;                    /* scratch: the distinct ids of tr */
    size_t cap_ids;
    struct seen seen[SEEN_SLOTS];
    char probe_mark[32];             /* the start of this process's probes' payloads */
    char probe_payload[64];          /* the probe whose connection is under way */
    struct ds_db *probe_db;          /* that connection (NULL: none) */
    int probe_fd;                    /* the descriptor and events that say it is over */
    short probe_events;
    uint64_t probe_started_us;       /* when that connection was started */
    bool probe_slow_said;            /* ... and that it is slow, logged */
    bool probe_went;                 /* the deadline pending is a sent probe's (not a retry's) */
    uint64_t probe_deadline_us;      /* the last probe must be back by then (0: none pending) */
    int probes_sent;                 /* on this connection, sent and not come back */
    bool probe_ok;                   /* one came back: this DSN carries notifications */
    bool probe_off;                  /* stopping: no probe is sent or judged any more */
    uint64_t published;
    struct fanout_counters counters;
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
    ds_db_free(f->probe_db);
    free(f->tr);
    free(f->ids);
    free(f);
    return NULL;
}

bool fanout_up(const struct fanout *f)
{
    return f->up;
}

bool fanout_verified(const struct fanout *f)
{
    return f->up && (f->probe_ok || f->probe_off);
}

int fanout_pollfds(const struct fanout *f, struct pollfd *fds, int max)
{
    int n = 0;
    if (n < max && f->up)
        fds[n++] = (struct pollfd){ .fd = ds_db_socket(f->db), .events = POLLIN };
    else if (n < max && f->connecting)
        fds[n++] = (struct pollfd){ .fd = f->connect_fd, .events = f->connect_events };
    if (n < max && f->probe_db)
        fds[n++] = (struct pollfd){ .fd = f->probe_fd, .events = f->probe_events };
    return n;
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

struct fanout_counters fanout_counters(const struct fanout *f)
{
    return f->counters;
}

static void mark_down(struct fanout *f, uint64_t now_us)
{
    if (!f->up)
        return;
    f->up = false;
    /* the last good exchange: the break may be noticed late */
    f->down_since_us = f->last_ok_us ? f->last_ok_us : now_us;
    snprintf(f->down_reason, sizeof f->down_reason, "%s", ds_errdetail());
    ds_log(DS_LOG_WARNING, "lost the database connection: %s", f->down_reason);
    f->next_connect_us = now_us;   /* first retry at once, then back off */
    f->backoff_us = CONNECT_BACKOFF_MIN_US;
    f->probe_deadline_us = 0;      /* (until a probe came back, the next connection sends them again) */
    f->probe_db = ds_db_free(f->probe_db);
}

/* A probe that could not be sent does not count: it is tried again PROBE_TIMEOUT_US from now. */
static void probe_not_sent(struct fanout *f, uint64_t now_us)
{
    ds_log(DS_LOG_WARNING, "could not send the notification probe (trying again in %u s): %s",
           PROBE_TIMEOUT_US / 1000000u, ds_errdetail());
    f->probe_db = ds_db_free(f->probe_db);
    f->probe_deadline_us = now_us + PROBE_TIMEOUT_US;
}

/* Whether the probe's connection is made; once it is, the probe goes (one short statement), and must be
 * back within PROBE_TIMEOUT_US. */
static void probe_step(struct fanout *f, uint64_t now_us)
{
    if (!f->probe_db)
        return;
    int r = ds_db_connect_poll(f->probe_db, &f->probe_fd, &f->probe_events);
    if (r == 0)
        return;
    const char *params[2] = { DS_DB_EVENTS_CHANNEL, f->probe_payload };
    if (r < 0 || ds_db_command(f->probe_db, "SELECT pg_notify($1, $2)", 2, params) < 0) {
        probe_not_sent(f, now_us);
        return;
    }
    f->probes_sent++;
    f->probe_went = true;
    f->probe_deadline_us = now_us + PROBE_TIMEOUT_US;
    f->probe_db = ds_db_free(f->probe_db);
}

/* Send a probe from a connection of its own, made on a thread of its own (probe_step). Until it went,
 * nothing is judged: the connection's own connect_timeout bounds it. */
static void probe_send(struct fanout *f, uint64_t now_us)
{
    snprintf(f->probe_mark, sizeof f->probe_mark, DS_DB_PROBE_PREFIX "%d.", (int)getpid());
    snprintf(f->probe_payload, sizeof f->probe_payload, "%s%d.%" PRIu64, f->probe_mark, f->probes_sent + 1,
             ds_now_usec());
    f->probe_deadline_us = 0;
    f->probe_went = false;
    f->probe_started_us = now_us;
    f->probe_slow_said = false;
    f->probe_db = ds_db_free(f->probe_db);
    if (ds_db_connect_start(f->cfg->dsn, "dsparkd-probe", &f->probe_db) < 0)
        probe_not_sent(f, now_us);
    else
        probe_step(f, now_us);   /* (the descriptor to poll, from this turn on) */
}

/* When the pending probe's time is up: send another (or the first again, when it could not be sent), or,
 * after PROBE_TRIES sent in vain, the configuration error. */
static int probe_judge(struct fanout *f, uint64_t now_us)
{
    if (!f->up || f->probe_ok || f->probe_off)
        return 0;
    if (f->probe_db) {   /* its connection, bounded by the DSN's connect_timeout (none when 0) */
        if (!f->probe_slow_said && now_us - f->probe_started_us >= PROBE_TIMEOUT_US) {
            f->probe_slow_said = true;
            ds_log(DS_LOG_WARNING, "the notification probe's connection has not been made in %u s; waiting for it "
                   "(the workers start once a probe came back)", PROBE_TIMEOUT_US / 1000000u);
        }
        return 0;
    }
    if (!f->probe_deadline_us || now_us < f->probe_deadline_us)
        return 0;
    if (f->probes_sent < PROBE_TRIES) {
        if (f->probe_went)
            ds_log(DS_LOG_WARNING, "the notification probe did not come back within %u s; sending another",
                   PROBE_TIMEOUT_US / 1000000u);
        probe_send(f, now_us);
        return 0;
    }
    return ds_seterr(DS_ECONFIG,
                     "notifications do not arrive on dsparkd's database connection (%d probes did not come back "
                     "within %u s each), so no job event would be published: connect dsparkd to PostgreSQL "
                     "directly, or through a pooler in session mode, not one that pools transactions "
                     "(PgBouncer's pool_mode = transaction)",
                     PROBE_TRIES, PROBE_TIMEOUT_US / 1000000u);
}

void fanout_stop_probe(struct fanout *f)
{
    f->probe_off = true;
    f->probe_deadline_us = 0;
    f->probe_db = ds_db_free(f->probe_db);
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

static void add_transition(struct fanout *f, const struct ds_db_transition *t)
{
    if (f->n_tr >= MAX_PENDING) {
        /* the rows have not been readable for a long time: keep the newest */
        ds_log(DS_LOG_WARNING, "%zu notified changes wait for their rows; dropping the older half", f->n_tr);
        memmove(f->tr, f->tr + f->n_tr / 2, (f->n_tr - f->n_tr / 2) * sizeof *f->tr);
        f->n_tr -= f->n_tr / 2;
    }
    if (f->n_tr == f->cap_tr) {
        f->cap_tr = f->cap_tr ? f->cap_tr * 2 : 256;
        f->tr = ds_xrealloc(f->tr, f->cap_tr * sizeof *f->tr);
    }
    f->tr[f->n_tr++] = *t;
}

/* By id, version, then state (a forged entry may repeat a real one's version
 * with another state: both are kept, and the row decides). */
static int cmp_transition(const void *a, const void *b)
{
    const struct ds_db_transition *x = a, *y = b;
    if (x->id != y->id)
        return x->id < y->id ? -1 : 1;
    if (x->version != y->version)
        return x->version < y->version ? -1 : 1;
    return strcmp(x->state, y->state);
}

static bool is_final(const char *state)
{
    return strcmp(state, "succeeded") == 0 || strcmp(state, "failed") == 0 || strcmp(state, "cancelled") == 0;
}

/* The columns of the queries below:
 * id, batch_id, state, version, attempt, finish_reason, output_tokens, tokens_per_s, mean_acceptance_length. */
#define JOB_EVENT_COLUMNS \
    "SELECT j.id, j.batch_id, j.state, j.version, j.attempt, j.finish_reason, " \
    "       s.output_tokens, s.decode_tokens_per_s, s.mean_acceptance_length " \
    "FROM dspark.jobs j " \
    "LEFT JOIN dspark.job_stats s ON s.job_id = j.id AND s.attempt = j.attempt " \
    "     AND j.state IN ('succeeded', 'failed', 'cancelled') "

static int64_t row_id(PGresult *res, int i)
{
    return strtoll(PQgetvalue(res, i, 0), NULL, 10);
}

static int64_t row_version(PGresult *res, int i)
{
    return strtoll(PQgetvalue(res, i, 3), NULL, 10);
}

/* The last version published for id (0 when none is remembered). */
static int64_t seen_version(const struct fanout *f, int64_t id)
{
    const struct seen *s = &f->seen[(uint64_t)id % SEEN_SLOTS];
    return s->id == id ? s->version : 0;
}

static void set_seen(struct fanout *f, int64_t id, int64_t version)
{
    struct seen *s = &f->seen[(uint64_t)id % SEEN_SLOTS];
    s->id = id;
    s->version = version;
}

/* Publish ev (for row i's job); 1 when it went out. */
static int send_event(struct fanout *f, struct ds_event *ev, PGresult *res, int i)
{
    if (!PQgetisnull(res, i, 1))
        ds_event_set_batch(ev, strtoll(PQgetvalue(res, i, 1), NULL, 10));
    int r = ds_events_publish(f->pub, ev);
    if (r < 0) {
        ds_log_job(DS_LOG_WARNING, ev->id, "could not publish the event: %s", ds_errdetail());
        return 0;
    }
    f->published++;
    return 1;
}

/* The event of row i as it is: its state, version, attempt and, for a final
 * state, the finish reason and statistics. */
static int publish_row(struct fanout *f, PGresult *res, int i)
{
    int64_t id = row_id(res, i), version = row_version(res, i);
    set_seen(f, id, version);
    struct ds_event ev;
    ds_event_job_init(&ev, id, PQgetvalue(res, i, 2), version, atoi(PQgetvalue(res, i, 4)));
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
    return send_event(f, &ev, res, i);
}

/* The event of one notified change of row i's job (state, version and
 * attempt from the notification, the batch from the row). */
static int publish_transition(struct fanout *f, PGresult *res, int i, const struct ds_db_transition *t)
{
    set_seen(f, t->id, t->version);
    struct ds_event ev;
    ds_event_job_init(&ev, t->id, t->state, t->version, t->attempt);
    return send_event(f, &ev, res, i);
}

/* Publish the rows of a query (JOB_EVENT_COLUMNS) at versions not yet
 * published. */
static int publish_rows(struct fanout *f, PGresult *res)
{
    int n = 0;
    for (int i = 0; i < PQntuples(res); i++)
        if (row_version(res, i) > seen_version(f, row_id(res, i)))
            n += publish_row(f, res, i);
    return n;
}

/* Row i and the notified changes t[0..nt) of its job (nt >= 1, by version):
 * publish each change newer than the last published version, then the row.
 * A final state is published from the row only (its event carries the
 * statistics). When the row's state differs from the last notified one, the
 * row went on in a transaction whose notification has not been read yet: the
 * row waits for it, so that the change in between is not skipped (and since
 * every state change notifies, it comes).
 * Anyone who may connect can NOTIFY on the channel, so a notification is
 * believed only as far as the row allows: a change above the row's version
 * cannot have happened (the row is read after the notifying transaction
 * committed) and is ignored, and a final state is never taken from a
 * notification. */
static int publish_job(struct fanout *f, PGresult *res, int i, const struct ds_db_transition *t, size_t nt)
{
    int64_t id = row_id(res, i), version = row_version(res, i);
    const char *state = PQgetvalue(res, i, 2);
    int64_t last = seen_version(f, id);
    int n = 0;
    while (nt > 0 && t[nt - 1].version > version) {
        ds_log_job(DS_LOG_WARNING, id, "ignoring a notified change at version %" PRId64 ", above the row's %" PRId64,
                   t[nt - 1].version, version);
        nt--;
    }
    if (nt == 0)
        return 0;
    for (size_t k = 0; k < nt; k++) {
        if (t[k].version <= last || t[k].version >= version || is_final(t[k].state))
            continue;
        n += publish_transition(f, res, i, &t[k]);
        last = t[k].version;
    }
    /* the last notified change: of the entries at the highest version, the
     * one that agrees with the row if any */
    const struct ds_db_transition *lt = &t[nt - 1];
    for (size_t k = nt; k > 0 && t[k - 1].version == lt->version; k--)
        if (strcmp(t[k - 1].state, state) == 0)
            lt = &t[k - 1];
    if (version <= last)
        return n;
    if (strcmp(lt->state, state) != 0) {
        ds_log_job(DS_LOG_DEBUG, id, "row is '%s' at version %" PRId64 ", last notified '%s' at %" PRId64
                   ": waiting for the notification in between", state, version, lt->state, lt->version);
        return n;
    }
    /* the row at the notified version, or a final state whose version was
     * bumped since; a later version of the same unfinished state (a
     * heartbeat) adds nothing to the event just published */
    if (version == lt->version || is_final(state))
        n += publish_row(f, res, i);
    return n;
}

static int flush_transitions(struct fanout *f, uint64_t now_us)
{
    if (f->n_tr == 0)
        return 0;
    qsort(f->tr, f->n_tr, sizeof *f->tr, cmp_transition);
    size_t u = 0;
    for (size_t i = 0; i < f->n_tr; i++)
        if (u == 0 || cmp_transition(&f->tr[i], &f->tr[u - 1]) != 0)
            f->tr[u++] = f->tr[i];
    f->n_tr = u;
    if (f->cap_ids < f->n_tr) {
        f->cap_ids = f->cap_tr;
        f->ids = ds_xrealloc(f->ids, f->cap_ids * sizeof *f->ids);
    }
    size_t n_ids = 0;
    for (size_t i = 0; i < f->n_tr; i++)
        if (n_ids == 0 || f->tr[i].id != f->ids[n_ids - 1])
            f->ids[n_ids++] = f->tr[i].id;
    int total = 0;
    size_t ti = 0;
    for (size_t off = 0; off < n_ids; off += IDS_PER_QUERY) {
        size_t n = n_ids - off < IDS_PER_QUERY ? n_ids - off : IDS_PER_QUERY;
        char *arr = ds_db_int64_array(f->ids + off, n);
        const char *params[1] = { arr };
        PGresult *res;
        int r = ds_db_exec(f->db, JOB_EVENT_COLUMNS "WHERE j.id = ANY ($1::bigint[]) ORDER BY j.id", 1, params, &res);
        free(arr);
        if (r < 0) {
            /* keep the changes (a statement timeout, a lock, or a broken
             * connection): the next pass reads them again, and what was
             * published already is not published twice (seen_version) */
            return query_failed(f, now_us, r, "reading notified jobs");
        }
        /* rows and changes are both ordered by id; a job without a row was deleted */
        for (int i = 0; i < PQntuples(res); i++) {
            int64_t id = row_id(res, i);
            while (ti < f->n_tr && f->tr[ti].id < id)
                ti++;
            size_t tj = ti;
            while (tj < f->n_tr && f->tr[tj].id == id)
                tj++;
            if (tj > ti)
                total += publish_job(f, res, i, f->tr + ti, tj - ti);
            ti = tj;
        }
        PQclear(res);
    }
    f->n_tr = 0;
    f->last_ok_us = now_us;
    return total;
}

/* Publish the final rows of the jobs that finished in the last window_s
 * seconds (by the database's clock, so that the hosts' clocks do not matter)
 * and were not published by this process: after a lost connection, and a
 * little after the start (a dsparkd restarted while jobs finished, as its
 * watchdog does during a long database outage). Subscribers drop a state they
 * already have by its version. */
static void catch_up(struct fanout *f, uint64_t now_us, double window_s, const char *when)
{
    char secs[64];
    snprintf(secs, sizeof secs, "%.3f", window_s);
    const char *params[1] = { secs };
    PGresult *res;
    int r = ds_db_exec(f->db,
                       JOB_EVENT_COLUMNS "WHERE j.finished_at >= now() - make_interval(secs => $1::float8)"
                                         " ORDER BY j.finished_at DESC LIMIT 100000",
                       1, params, &res);
    if (r < 0) {
        query_failed(f, now_us, r, "reading the jobs that finished meanwhile");
        return;
    }
    int n = publish_rows(f, res);
    PQclear(res);
    if (n > 0)
        ds_log(DS_LOG_INFO, "published %d job%s that finished %s", n, n == 1 ? "" : "s", when);
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
    probe_step(f, now_us);
    int r = probe_judge(f, now_us);
    if (r < 0)
        return r;
    if (f->up)
        return 0;
    /* an attempt runs on a thread of its own: each call looks whether it is over (dsparkd's loop polls
     * the descriptor that says so) */
    if (!f->connecting) {
        if (now_us < f->next_connect_us)
            return 0;
        f->db = ds_db_free(f->db);   /* a connection that broke: a new one */
        if (ds_db_connect_start(f->cfg->dsn, "dsparkd", &f->db) < 0) {
            retry_later(f, now_us, "database unavailable");
            return 0;
        }
        f->connecting = true;
    }
    r = ds_db_connect_poll(f->db, &f->connect_fd, &f->connect_events);
    if (r == 0)
        return 0;
    f->connecting = false;
    if (r < 0) {
        f->db = ds_db_free(f->db);
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
    if (!f->probe_ok && !f->probe_off) {   /* once one came back, the DSN has shown that it carries them */
        f->probes_sent = 0;
        probe_send(f, now_us);
    }
    if (f->down_since_us > 0) {
        ds_log(DS_LOG_NOTICE, "database connection restored, listening on '%s' again", DS_DB_EVENTS_CHANNEL);
        catch_up(f, now_us, (double)(now_us - f->down_since_us) / 1e6 + 2.0, "while the database connection was down");
    } else {
        /* the subscribers of a dsparkd that stopped reconnect within a second
         * or so: republish after they had the time to */
        f->start_catch_up_us = now_us + START_CATCH_UP_DELAY_US;
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
    if (strncmp(payload, DS_DB_PROBE_PREFIX, strlen(DS_DB_PROBE_PREFIX)) == 0) {   /* ours, or another process's */
        if (!f->probe_ok && f->probe_mark[0] && strncmp(payload, f->probe_mark, strlen(f->probe_mark)) == 0) {
            /* any of this process's probes, a late one too */
            f->probe_deadline_us = 0;
            f->probe_ok = true;
            f->probe_db = ds_db_free(f->probe_db);   /* another still connecting is not needed */
            ds_log(DS_LOG_DEBUG, "notifications arrive: the probe came back");
        }
        return;
    }
    if (strncmp(payload, DS_DB_DUE_PREFIX, strlen(DS_DB_DUE_PREFIX)) == 0)
        return;   /* delayed jobs came due: a hint for the workers, no state changed */
    struct ds_db_transition *t;
    size_t n;
    if (ds_db_parse_transitions(payload, &t, &n) < 0) {
        /* anyone who may connect can send one: at most one line every 10 s */
        uint64_t now = ds_now_usec();
        f->bad_notifications++;
        if (now >= f->next_bad_log_us) {
            ds_log(DS_LOG_WARNING, "ignoring %" PRIu64 " notification%s on '%s' that are not job changes; the last: %s",
                   f->bad_notifications, f->bad_notifications == 1 ? "" : "s", channel, ds_errdetail());
            f->bad_notifications = 0;
            f->next_bad_log_us = now + 10000000u;
        }
        return;
    }
    for (size_t i = 0; i < n; i++)
        add_transition(f, &t[i]);
    free(t);
}

int fanout_pump(struct fanout *f, uint64_t now_us)
{
    int total = 0;
    /* a query reads whatever the server sent meanwhile: loop until no
     * notification is left in libpq's queue */
    for (int round = 0; round < 64 && f->up; round++) {
        int r = ds_db_consume_notify(f->db, on_notify, f);
        if (r < 0) {
            f->n_tr = 0;
            mark_down(f, now_us);
            break;
        }
        if (r > 0)
            f->last_ok_us = now_us;
        if (f->n_tr == 0)
            break;
        r = flush_transitions(f, now_us);
        if (r < 0)
            break;   /* the changes wait for the next pass (the next status read at the latest) */
        total += r;
    }
    return total;
}

int fanout_status(struct fanout *f, uint64_t now_us, struct fanout_status *ret)
{
    if (!f->up)
        return ds_seterr(DS_EDB, "database connection is down");
    if (f->start_catch_up_us && now_us >= f->start_catch_up_us) {
        f->start_catch_up_us = 0;
        catch_up(f, now_us, START_CATCH_UP_WINDOW_S, "before this dsparkd started");
        if (!f->up)
            return ds_seterr(DS_EDB, "database connection is down");
    }
    PGresult *res;
    int r = ds_db_exec(f->db,
                       /* (the queued jobs as the claims' index and the delayed jobs' index hold them) */
                       "SELECT (SELECT count(*) FROM dspark.jobs WHERE state = 'queued' AND NOT delayed)"
                       "       + (SELECT count(*) FROM dspark.jobs WHERE state = 'queued' AND delayed), "
                       "       (SELECT count(*) FROM dspark.jobs WHERE state = 'running'), "
                       "       s.tokens / 60.0, (s.rounds + coalesce(s.accepted, 0))::float8 / nullif(s.rounds, 0) "
                       "FROM (SELECT coalesce(sum(output_tokens), 0) AS tokens, sum(rounds) AS rounds, "
                       "             sum(num_accepted_tokens) AS accepted FROM dspark.job_stats "
                       "       WHERE created_at > now() - interval '60 seconds') s",
                       0, NULL, &res);
    if (r < 0)
        return query_failed(f, now_us, r, "reading the queue counts");
    ret->valid = true;
    ret->queued = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    ret->running = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    ret->tokens_per_s = strtod(PQgetvalue(res, 0, 2), NULL);
    ret->mean_acceptance_length = PQgetisnull(res, 0, 3) ? -1.0 : strtod(PQgetvalue(res, 0, 3), NULL);
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
    f->counters.reaped += (uint64_t)n;
    if (n > 0)
        ds_log(DS_LOG_NOTICE, "lease reaper: %d job%s with an expired lease requeued, failed or cancelled", n,
               n == 1 ? "" : "s");
    fanout_pump(f, now_us);
    return n;
}

/* One of dsparkd's passes over the queue: sql takes the limit as $1 and returns how many jobs it changed.
 * Returns that count, 0 while the connection is down, <0 on error (what: the pass, for the log). */
static int64_t queue_pass(struct fanout *f, uint64_t now_us, const char *sql, int limit, const char *what)
{
    if (!f->up)
        return 0;
    char lim[16];
    snprintf(lim, sizeof lim, "%d", limit);
    const char *params[1] = { lim };
    PGresult *res;
    int r = ds_db_exec(f->db, sql, 1, params, &res);
    if (r < 0)
        return query_failed(f, now_us, r, what);
    int64_t n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    f->last_ok_us = now_us;
    fanout_pump(f, now_us);   /* queries consume input too: deliver notifications that arrived meanwhile */
    return n;
}

int64_t fanout_expire(struct fanout *f, uint64_t now_us)
{
    int64_t n = queue_pass(f, now_us, "SELECT dspark.expire_jobs($1::int)", FANOUT_EXPIRE_BATCH,
                           "the expiry sweep (dspark.expire_jobs)");
    if (n <= 0)
        return n;
    f->counters.expired += (uint64_t)n;
    ds_log(DS_LOG_NOTICE, "expiry: %" PRId64 " queued job%s past %s deadline cancelled%s", n, n == 1 ? "" : "s",
           n == 1 ? "its" : "their", n >= FANOUT_EXPIRE_BATCH ? " (more in 0.2 s)" : "");
    return n;
}

int64_t fanout_promote(struct fanout *f, uint64_t now_us)
{
    int64_t n = queue_pass(f, now_us, "SELECT dspark.promote_due_jobs(NULL, $1::int)", FANOUT_PROMOTE_BATCH,
                           "the pass over delayed jobs (dspark.promote_due_jobs)");
    if (n <= 0)
        return n;
    f->counters.due += (uint64_t)n;
    ds_log(DS_LOG_DEBUG, "%" PRId64 " delayed job%s came due%s", n, n == 1 ? "" : "s",
           n >= FANOUT_PROMOTE_BATCH ? " (more in 0.05 s)" : "");
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
    f->counters.pruned += (uint64_t)n;
    if (n > 0)
        ds_log(DS_LOG_INFO, "retention: deleted %" PRId64 " finished job%s", n, n == 1 ? "" : "s");
    return n;
}
