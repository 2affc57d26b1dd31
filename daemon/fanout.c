/* fanout.c: dsparkd's database side: the connection (made and set up on a
 * thread of its own, with back-off and re-LISTEN), job notifications turned
 * into ZeroMQ events, queue counts for STATUS= and heartbeats, the lease
 * reaper, the expiry of queued jobs past their deadline, the delayed jobs that
 * came due, and retention.
 *
 * dsparkd's loop never waits on the database. Connecting and the session's
 * first statements (statement_timeout, the schema version, LISTEN) run on a
 * thread (ds_db_connect_start); every later statement is sent without
 * waiting (ds_db_send), one at a time, and its result taken when the socket
 * says it came (fanout_pump). The passes dsparkd asks for (fanout_request)
 * go in turn, each after the one sent last; reading the rows of notified
 * jobs takes every other turn. A statement with no answer within
 * statement_timeout + STMT_GRACE_US (a server or pooler that stopped
 * answering: statement_timeout is the server's own) gives the connection up,
 * and a new one is made; the setup on the thread has the same limit, and a
 * pass lost with a connection is reported failed (dsparkd asks again).
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

#include <errno.h>
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
#define STMT_GRACE_US 10000000u           /* a statement's answer may come this long after statement_timeout */
#define EVENTS_RETRY_US 1000000u          /* reading notified jobs failed: again after this */
#define CATCH_UP_RETRY_US 10000000u       /* a catch-up failed: again after this */
#define CATCH_UP_PAGE 20000               /* rows a catch-up statement reads at most; then the next page */

/* The statement under way (f->stmt): one of the passes, or one of these. */
enum { STMT_NONE = -1, STMT_EVENTS = FANOUT_N_PASSES, STMT_CATCH_UP };

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
    /* the statement under way, and what waits for its turn */
    int stmt;                        /* STMT_NONE, a pass, STMT_EVENTS or STMT_CATCH_UP */
    bool stmt_writing;               /* part of it waits to be written (poll for POLLOUT) */
    uint64_t stmt_deadline_us;       /* no answer by then: the connection is given up */
    double stmt_asked;               /* wall clock when it was sent (the queue counts' age) */
    unsigned wanted;                 /* passes asked for and not sent yet (a bit per pass) */
    bool events_last;                /* the last turn read notified jobs: a pass that waits goes first */
    int last_pass;                   /* the pass sent last: the waiting ones go in turn after it */
    /* the catch-ups that wait (catch_up_send): kept until read, over failures and lost connections */
    bool catch_up_start;             /* the finals of the START_CATCH_UP_WINDOW_S before the start */
    bool catch_up_outage;            /* the finals of the last outage (since down_since_us) */
    bool catch_up_sent_start, catch_up_sent_outage;   /* what the statement under way reads */
    int64_t catch_up_after_id;       /* a catch-up in pages (by id): the last id published, 0 = the first page */
    int64_t catch_up_from_us;        /* where its window starts, the same for every page */
    int64_t catch_up_published;      /* the jobs its pages published so far */
    uint64_t catch_up_not_before_us; /* after a failed one */
    fanout_done_fn *done;            /* told each pass's outcome */
    void *done_ud;
    /* notified changes */
    struct ds_db_transition *tr;     /* named by notifications, not yet being read */
    size_t n_tr, cap_tr;
    struct ds_db_transition *rd;     /* being read (sorted by id, version, state; kept when reading fails) */
    size_t n_rd, cap_rd;
    int64_t *ids;                    /* the distinct ids of rd, read IDS_PER_QUERY a statement */
    size_t n_ids, cap_ids;
    size_t ids_done;                 /* ids whose rows were read (n_ids: none under way) */
    size_t rd_at;                    /* the first entry of rd not yet matched with a row */
    uint64_t events_not_before_us;   /* after a failed read */
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
    f->stmt = STMT_NONE;
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
    free(f->rd);
    free(f->ids);
    free(f);
    return NULL;
}

void fanout_set_done(struct fanout *f, fanout_done_fn *fn, void *ud)
{
    f->done = fn;
    f->done_ud = ud;
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
        fds[n++] = (struct pollfd){ .fd = ds_db_socket(f->db), .events = POLLIN | (f->stmt_writing ? POLLOUT : 0) };
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

/* A pass's outcome for dsparkd, when no statement gave it. */
static void report(struct fanout *f, int pass, int64_t n)
{
    if (pass >= FANOUT_N_PASSES || !f->done)
        return;
    struct fanout_status st = { 0 };
    f->done(f->done_ud, (enum fanout_pass)pass, n, &st);
}

/* A pass asked for that will not be run (its statement could not be sent, or the connection went): its
 * outcome is a failure, so that dsparkd asks again in its own time. */
static void report_lost(struct fanout *f, int pass)
{
    report(f, pass, -DS_EDB);
}

static void mark_down(struct fanout *f, uint64_t now_us)
{
    if (!f->up)
        return;
    f->up = false;
    /* the last good exchange: the break may be noticed late; an outage whose jobs were not read yet (its
     * catch-up) counts from its own start */
    if (!f->catch_up_outage || !f->down_since_us)
        f->down_since_us = f->last_ok_us ? f->last_ok_us : now_us;
    snprintf(f->down_reason, sizeof f->down_reason, "%s", ds_errdetail());
    ds_log(DS_LOG_WARNING, "lost the database connection: %s", f->down_reason);
    f->next_connect_us = now_us;   /* first retry at once, then back off */
    f->backoff_us = CONNECT_BACKOFF_MIN_US;
    f->probe_deadline_us = 0;      /* (until a probe came back, the next connection sends them again) */
    f->probe_db = ds_db_free(f->probe_db);
    /* the statement under way and the passes asked for go with the connection, each reported failed;
     * notified changes stay, and are read on the next one */
    unsigned lost = f->wanted | (f->stmt >= 0 && f->stmt < FANOUT_N_PASSES ? 1u << f->stmt : 0u);
    f->stmt = STMT_NONE;
    f->stmt_writing = false;
    f->wanted = 0;
    f->n_ids = f->ids_done = 0;
    for (int p = 0; p < FANOUT_N_PASSES; p++)
        if (lost & (1u << p))
            report_lost(f, p);
}

/* A probe that could not be sent does not count: it is tried again PROBE_TIMEOUT_US from now. */
static void probe_not_sent(struct fanout *f, uint64_t now_us)
{
    ds_log(DS_LOG_WARNING, "could not send the notification probe (trying again in %u s): %s",
           PROBE_TIMEOUT_US / 1000000u, ds_errdetail());
    f->probe_db = ds_db_free(f->probe_db);
    f->probe_deadline_us = now_us + PROBE_TIMEOUT_US;
}

/* Whether the probe's connection is made and the probe went (ds_db_probe, on the connection's thread); once
 * it went, it must be back within PROBE_TIMEOUT_US. */
static void probe_step(struct fanout *f, uint64_t now_us)
{
    if (!f->probe_db)
        return;
    int r = ds_db_connect_poll(f->probe_db, &f->probe_fd, &f->probe_events);
    if (r == 0)
        return;
    if (r < 0) {
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
    if (ds_db_connect_start(f->cfg->dsn, "dsparkd-probe", ds_db_probe, f->probe_payload, &f->probe_db) < 0)
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

/* The session settings and checks that follow every (re)connection, on the attempt's thread
 * (ds_db_setup_fn; arg: statement_timeout in milliseconds). A schema version this build does not know is
 * -DS_ECONFIG: dsparkd stops. */
static int session_setup(struct ds_db *db, const char *statement_timeout_ms)
{
    char sql[96];
    snprintf(sql, sizeof sql, "SET statement_timeout = %s", statement_timeout_ms);
    /* a server or pooler that completed the login and holds queries: the attempt fails, and is retried */
    ds_db_set_deadline(db, atoi(statement_timeout_ms) + (int)(STMT_GRACE_US / 1000));
    int version;
    int r = ds_db_command(db, sql, 0, NULL);
    if (r == 0)
        r = ds_db_schema_version(db, &version);
    if (r == 0 && version != DS_SCHEMA_VERSION)
        return ds_db_schema_error(version, DS_ECONFIG);
    if (r == 0)
        r = ds_db_listen(db, DS_DB_EVENTS_CHANNEL);
    ds_db_set_deadline(db, 0);
    return r < 0 ? ds_prefixerr(r, "database session setup failed") : 0;
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

/* ---- statements sent without waiting ---- */

static const char *stmt_name(int stmt)
{
    switch (stmt) {
    case FANOUT_STATUS: return "reading the queue counts";
    case FANOUT_REAP: return "the lease reaper";
    case FANOUT_EXPIRE: return "the expiry sweep (dspark.expire_jobs)";
    case FANOUT_PROMOTE: return "the pass over delayed jobs (dspark.promote_due_jobs)";
    case FANOUT_PRUNE: return "retention (dspark.prune)";
    case STMT_EVENTS: return "reading notified jobs";
    case STMT_CATCH_UP: return "reading the jobs that finished meanwhile";
    default: return "a statement";
    }
}

/* Send stmt's statement (its parameters in text). */
static int stmt_send(struct fanout *f, uint64_t now_us, int stmt, const char *sql, int nparams,
                     const char *const *params)
{
    int r = ds_db_send(f->db, sql, nparams, params);
    if (r < 0) {   /* (part of it may have gone: the connection is of no more use) */
        ds_prefixerr(r, "%s", stmt_name(stmt));
        mark_down(f, now_us);
        return r;
    }
    f->stmt = stmt;
    f->stmt_writing = r > 0;
    f->stmt_asked = ds_wire_now();
    f->stmt_deadline_us = now_us + (uint64_t)f->cfg->db_timeout * 1000u + STMT_GRACE_US;
    return 0;
}

/* Reading notified jobs: the ids of rd from ids_done on, IDS_PER_QUERY at a time. */
static int events_send_next(struct fanout *f, uint64_t now_us)
{
    size_t n = f->n_ids - f->ids_done < IDS_PER_QUERY ? f->n_ids - f->ids_done : IDS_PER_QUERY;
    char *arr = ds_db_int64_array(f->ids + f->ids_done, n);
    const char *params[1] = { arr };
    int r = stmt_send(f, now_us, STMT_EVENTS, JOB_EVENT_COLUMNS "WHERE j.id = ANY ($1::bigint[]) ORDER BY j.id", 1,
                      params);
    free(arr);
    return r;
}

/* Start reading the rows of the notified changes: those that came (tr) join those whose read failed (rd),
 * in order, without repeats. */
static int events_start(struct fanout *f, uint64_t now_us)
{
    if (f->n_rd + f->n_tr > f->cap_rd) {
        f->cap_rd = f->n_rd + f->n_tr;
        f->rd = ds_xrealloc(f->rd, f->cap_rd * sizeof *f->rd);
    }
    memcpy(f->rd + f->n_rd, f->tr, f->n_tr * sizeof *f->tr);
    f->n_rd += f->n_tr;
    f->n_tr = 0;
    qsort(f->rd, f->n_rd, sizeof *f->rd, cmp_transition);
    size_t u = 0;
    for (size_t i = 0; i < f->n_rd; i++)
        if (u == 0 || cmp_transition(&f->rd[i], &f->rd[u - 1]) != 0)
            f->rd[u++] = f->rd[i];
    if (u > MAX_PENDING) {   /* the rows have not been readable for a long time: keep the newest jobs' */
        ds_log(DS_LOG_WARNING, "%zu notified changes wait for their rows; dropping the older half", u);
        memmove(f->rd, f->rd + u / 2, (u - u / 2) * sizeof *f->rd);
        u -= u / 2;
    }
    f->n_rd = u;
    if (f->cap_ids < f->n_rd) {
        f->cap_ids = f->cap_rd;
        f->ids = ds_xrealloc(f->ids, f->cap_ids * sizeof *f->ids);
    }
    f->n_ids = 0;
    for (size_t i = 0; i < f->n_rd; i++)
        if (f->n_ids == 0 || f->rd[i].id != f->ids[f->n_ids - 1])
            f->ids[f->n_ids++] = f->rd[i].id;
    f->ids_done = 0;
    f->rd_at = 0;
    return events_send_next(f, now_us);
}

/* A statement's rows of notified jobs: publish them, then read the next ids, if any. */
static void events_done(struct fanout *f, uint64_t now_us, PGresult *res, int r)
{
    if (r < 0) {
        /* keep the changes (a statement timeout, a lock, or a broken connection): they are read again,
         * and what was published already is not published twice (seen_version) */
        f->n_ids = f->ids_done = 0;
        f->events_not_before_us = now_us + EVENTS_RETRY_US;
        query_failed(f, now_us, r, stmt_name(STMT_EVENTS));
        return;
    }
    /* rows and changes are both ordered by id; a job without a row was deleted */
    for (int i = 0; i < PQntuples(res); i++) {
        int64_t id = row_id(res, i);
        size_t ti = f->rd_at;
        while (ti < f->n_rd && f->rd[ti].id < id)
            ti++;
        size_t tj = ti;
        while (tj < f->n_rd && f->rd[tj].id == id)
            tj++;
        if (tj > ti)
            publish_job(f, res, i, f->rd + ti, tj - ti);
        f->rd_at = tj;
    }
    f->last_ok_us = now_us;
    f->ids_done += f->n_ids - f->ids_done < IDS_PER_QUERY ? f->n_ids - f->ids_done : IDS_PER_QUERY;
    if (f->ids_done == f->n_ids)   /* (else the next ids in their turn: send_next) */
        f->n_rd = f->n_ids = f->ids_done = 0;
}

static void catch_up_done(struct fanout *f, uint64_t now_us, PGresult *res, int r)
{
    if (r < 0) {   /* (a statement timeout: it stays, and is read again a little later) */
        query_failed(f, now_us, r, stmt_name(STMT_CATCH_UP));
        f->catch_up_not_before_us = now_us + CATCH_UP_RETRY_US;
        return;
    }
    f->last_ok_us = now_us;
    int rows = PQntuples(res);
    f->catch_up_published += publish_rows(f, res);
    if (rows == CATCH_UP_PAGE) {   /* a full page: the flags stay, and the next page goes */
        f->catch_up_after_id = row_id(res, rows - 1);
        return;
    }
    int64_t n = f->catch_up_published;
    f->catch_up_after_id = 0;
    f->catch_up_published = 0;
    f->catch_up_start &= !f->catch_up_sent_start;
    f->catch_up_outage &= !f->catch_up_sent_outage;
    if (n > 0)
        ds_log(DS_LOG_INFO, "published %" PRId64 " job%s that finished %s", n, n == 1 ? "" : "s",
               f->catch_up_sent_outage ? "while the database connection was down" : "before this dsparkd started");
}

static bool catch_up_due(const struct fanout *f, uint64_t now_us)
{
    return (f->catch_up_start || f->catch_up_outage) && now_us >= f->catch_up_not_before_us;
}

/* Publish the final rows of the jobs that finished and were not published by
 * this process: during the last outage (from the last good exchange before it,
 * worked out when sent), and a little after the start, those of the
 * START_CATCH_UP_WINDOW_S before it (a dsparkd restarted while jobs finished,
 * as its watchdog does during a long database outage); one statement reads
 * both when both wait. By the database's clock, so that the hosts' clocks do
 * not matter. Subscribers drop a state they already have by its version.
 * In pages of CATCH_UP_PAGE rows by id, all of them (a catch-up once stopped
 * at its 100,000 latest, and the earlier jobs never had a final event); every
 * page's window starts where the first page's did. */
static int catch_up_send(struct fanout *f, uint64_t now_us)
{
    if (f->catch_up_after_id == 0) {   /* the first page */
        double window_s = 0;
        if (f->catch_up_outage)
            window_s = (double)(now_us - f->down_since_us) / 1e6 + 2.0;
        if (f->catch_up_start && window_s < START_CATCH_UP_WINDOW_S)
            window_s = START_CATCH_UP_WINDOW_S;
        f->catch_up_from_us = (int64_t)now_us - (int64_t)(window_s * 1e6);
        f->catch_up_published = 0;
        f->catch_up_sent_start = f->catch_up_start;
        f->catch_up_sent_outage = f->catch_up_outage;
    }
    char secs[64], after[32], page[16];
    snprintf(secs, sizeof secs, "%.3f", (double)((int64_t)now_us - f->catch_up_from_us) / 1e6);
    snprintf(after, sizeof after, "%" PRId64, f->catch_up_after_id);
    snprintf(page, sizeof page, "%d", CATCH_UP_PAGE);
    const char *params[3] = { secs, after, page };
    return stmt_send(f, now_us, STMT_CATCH_UP,
                     JOB_EVENT_COLUMNS "WHERE j.finished_at >= now() - make_interval(secs => $1::float8)"
                                       " AND j.id > $2::bigint ORDER BY j.id LIMIT $3::int",
                     3, params);
}

static int pass_send(struct fanout *f, uint64_t now_us, int pass)
{
    char a[64], b[64];
    const char *params[2] = { a, b };
    switch (pass) {
    case FANOUT_STATUS:
        return stmt_send(f, now_us, pass,
                         /* (the queued jobs as the claims' index and the delayed jobs' index hold them) */
                         "SELECT (SELECT count(*) FROM dspark.jobs WHERE state = 'queued' AND NOT delayed)"
                         "       + (SELECT count(*) FROM dspark.jobs WHERE state = 'queued' AND delayed), "
                         "       (SELECT count(*) FROM dspark.jobs WHERE state = 'running'), "
                         "       s.tokens / 60.0, (s.rounds + coalesce(s.accepted, 0))::float8 / nullif(s.rounds, 0) "
                         "FROM (SELECT coalesce(sum(output_tokens), 0) AS tokens, sum(rounds) AS rounds, "
                         "             sum(num_accepted_tokens) AS accepted FROM dspark.job_stats "
                         "       WHERE created_at > now() - interval '60 seconds') s",
                         0, NULL);
    case FANOUT_REAP:
        snprintf(a, sizeof a, "%" PRId64 " milliseconds", f->cfg->worker_timeout);
        return stmt_send(f, now_us, pass, "SELECT dspark.requeue_expired($1::interval)", 1, params);
    case FANOUT_EXPIRE:
        snprintf(a, sizeof a, "%d", FANOUT_EXPIRE_BATCH);
        return stmt_send(f, now_us, pass, "SELECT dspark.expire_jobs($1::int)", 1, params);
    case FANOUT_PROMOTE:
        snprintf(a, sizeof a, "%d", FANOUT_PROMOTE_BATCH);
        return stmt_send(f, now_us, pass, "SELECT dspark.promote_due_jobs(NULL, $1::int)", 1, params);
    case FANOUT_PRUNE:
        snprintf(a, sizeof a, "%" PRId64 " milliseconds", f->cfg->retention);
        snprintf(b, sizeof b, "%d", f->cfg->prune_batch);
        return stmt_send(f, now_us, pass, "SELECT dspark.prune($1::interval, $2::int)", 2, params);
    case STMT_CATCH_UP:
        return catch_up_send(f, now_us);
    }
    return ds_seterr(DS_EINVAL, "no pass %d", pass);
}

static void pass_done(struct fanout *f, uint64_t now_us, int pass, PGresult *res, int r)
{
    struct fanout_status st = { 0 };
    int64_t n = 0;
    if (r < 0) {
        query_failed(f, now_us, r, stmt_name(pass));
        n = r;
    } else if (pass == FANOUT_STATUS) {
        st.valid = true;
        st.asked = f->stmt_asked;
        st.queued = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        st.running = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
        st.tokens_per_s = strtod(PQgetvalue(res, 0, 2), NULL);
        st.mean_acceptance_length = PQgetisnull(res, 0, 3) ? -1.0 : strtod(PQgetvalue(res, 0, 3), NULL);
    } else {
        n = PQgetisnull(res, 0, 0) ? 0 : strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    }
    if (r >= 0)
        f->last_ok_us = now_us;
    if (n > 0 && pass == FANOUT_REAP) {
        f->counters.reaped += (uint64_t)n;
        ds_log(DS_LOG_NOTICE, "lease reaper: %" PRId64 " job%s with an expired lease requeued, failed or cancelled",
               n, n == 1 ? "" : "s");
    } else if (n > 0 && pass == FANOUT_EXPIRE) {
        f->counters.expired += (uint64_t)n;
        ds_log(DS_LOG_NOTICE, "expiry: %" PRId64 " queued job%s past %s deadline cancelled%s", n, n == 1 ? "" : "s",
               n == 1 ? "its" : "their", n >= FANOUT_EXPIRE_BATCH ? " (more in 0.2 s)" : "");
    } else if (n > 0 && pass == FANOUT_PROMOTE) {
        f->counters.due += (uint64_t)n;
        ds_log(DS_LOG_DEBUG, "%" PRId64 " delayed job%s came due%s", n, n == 1 ? "" : "s",
               n >= FANOUT_PROMOTE_BATCH ? " (more in 0.05 s)" : "");
    } else if (n > 0 && pass == FANOUT_PRUNE) {
        f->counters.pruned += (uint64_t)n;
        ds_log(DS_LOG_INFO, "retention: deleted %" PRId64 " finished job%s", n, n == 1 ? "" : "s");
    }
    if (f->done)
        f->done(f->done_ud, (enum fanout_pass)pass, n, &st);
}

/* The next statement, when none is under way: a read of notified jobs and a pass that waits take turns. */
static void send_next(struct fanout *f, uint64_t now_us)
{
    while (f->up && f->stmt == STMT_NONE) {
        bool events = f->n_ids > f->ids_done ||
                      ((f->n_tr > 0 || f->n_rd > 0) && now_us >= f->events_not_before_us);
        unsigned waiting = f->wanted | (catch_up_due(f, now_us) ? 1u << STMT_CATCH_UP : 0u);
        int pass = -1;
        for (int k = 1; k <= STMT_CATCH_UP + 1 && pass < 0; k++) {   /* in turn, from the one after the last */
            int p = (f->last_pass + k) % (STMT_CATCH_UP + 1);
            if (p != STMT_EVENTS && (waiting & (1u << p)))
                pass = p;
        }
        if (events && (pass < 0 || !f->events_last)) {
            f->events_last = true;
            int r = f->n_ids > f->ids_done ? events_send_next(f, now_us) : events_start(f, now_us);
            if (r < 0) {
                f->n_ids = f->ids_done = 0;
                f->events_not_before_us = now_us + EVENTS_RETRY_US;
            }
        } else if (pass >= 0) {
            f->events_last = false;
            f->last_pass = pass;
            f->wanted &= ~(1u << pass);
            if (pass == FANOUT_PRUNE && f->cfg->retention <= 0)   /* turned off (a reload) since asked for */
                report(f, pass, 0);
            else if (pass_send(f, now_us, pass) < 0)
                report_lost(f, pass);
        } else {
            return;
        }
    }
}

/* The statement under way is over: its result (r < 0: its error) goes to its own handler. */
static void stmt_done(struct fanout *f, uint64_t now_us, PGresult *res, int r)
{
    int stmt = f->stmt;
    f->stmt = STMT_NONE;
    f->stmt_writing = false;
    if (stmt == STMT_EVENTS)
        events_done(f, now_us, res, r);
    else if (stmt == STMT_CATCH_UP)
        catch_up_done(f, now_us, res, r);
    else
        pass_done(f, now_us, stmt, res, r);
}

/* ---- the connection ---- */

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
    /* an attempt runs on a thread of its own, with the session's setup: each call looks whether it is over
     * (dsparkd's loop polls the descriptor that says so) */
    if (!f->connecting) {
        if (now_us < f->next_connect_us)
            return 0;
        f->db = ds_db_free(f->db);   /* a connection that broke: a new one */
        char timeout_ms[32];
        snprintf(timeout_ms, sizeof timeout_ms, "%" PRId64, f->cfg->db_timeout);
        if (ds_db_connect_start(f->cfg->dsn, "dsparkd", session_setup, timeout_ms, &f->db) < 0) {
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
        if (r == -DS_ECONFIG)   /* a schema version this build does not know */
            return r;
        retry_later(f, now_us, "database unavailable");
        return 0;
    }
    PQsetNoticeProcessor(ds_db_conn(f->db), on_notice, NULL);
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
        f->catch_up_outage = true;
        f->catch_up_after_id = 0;   /* (a catch-up cut short by this outage starts again, over both) */
    } else {
        /* the subscribers of a dsparkd that stopped reconnect within a second
         * or so: republish after they had the time to */
        f->start_catch_up_us = now_us + START_CATCH_UP_DELAY_US;
        ds_log(DS_LOG_INFO, "connected to the database (schema version %d), listening on '%s'",
               DS_SCHEMA_VERSION, DS_DB_EVENTS_CHANNEL);
    }
    /* (the setup's last statement may have read notifications that poll() will not tell of) */
    fanout_pump(f, now_us);
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
    if (!f->up)
        return 0;
    uint64_t before = f->published;
    if (f->start_catch_up_us && now_us >= f->start_catch_up_us) {
        f->start_catch_up_us = 0;
        f->catch_up_start = true;
    }
    if (f->stmt_writing) {
        int r = ds_db_flush(f->db);
        if (r < 0) {
            mark_down(f, now_us);
            return 0;
        }
        f->stmt_writing = r > 0;
    }
    /* what came: notifications, and the end of the statement under way; then the next statement. Taking a
     * result parses what came after it too, notifications among them: they are read (the second turn)
     * before the loop sleeps, since poll() would not tell of them again. */
    while (f->up) {
        int r = ds_db_consume_notify(f->db, on_notify, f);
        if (r < 0) {
            mark_down(f, now_us);
            break;
        }
        if (r > 0)
            f->last_ok_us = now_us;
        if (f->stmt == STMT_NONE)
            break;
        PGresult *res = NULL;
        r = ds_db_take_result(f->db, &res);
        if (r == 0)
            break;
        stmt_done(f, now_us, res, r);
        PQclear(res);
    }
    if (f->up && f->stmt != STMT_NONE && now_us >= f->stmt_deadline_us) {
        ds_seterr(DS_EDB, "%s: no answer from the database within %.1f s (statement_timeout %.1f s); giving the "
                  "connection up", stmt_name(f->stmt), (double)f->cfg->db_timeout / 1e3 + STMT_GRACE_US / 1e6,
                  (double)f->cfg->db_timeout / 1e3);
        mark_down(f, now_us);
    }
    send_next(f, now_us);
    return (int)(f->published - before);
}

bool fanout_request(struct fanout *f, enum fanout_pass pass, uint64_t now_us)
{
    if (!f->up || (pass == FANOUT_PRUNE && f->cfg->retention <= 0))
        return false;
    f->wanted |= 1u << pass;
    send_next(f, now_us);
    return true;
}

void fanout_drain(struct fanout *f, uint64_t deadline_us)
{
    f->wanted = 0;   /* no more passes: only the events (a pass under way is not waited for) */
    f->catch_up_start = f->catch_up_outage = false;
    f->catch_up_after_id = 0;
    f->start_catch_up_us = 0;
    for (;;) {
        uint64_t now = ds_now_usec();
        fanout_pump(f, now);
        if (!f->up || (f->n_tr == 0 && f->n_rd == 0 && f->stmt != STMT_EVENTS) || now >= deadline_us)
            return;
        struct pollfd fds[2];
        int n = fanout_pollfds(f, fds, 2);
        uint64_t wait = deadline_us - now < 100000u ? deadline_us - now : 100000u;
        if (poll(fds, (nfds_t)n, (int)((wait + 999) / 1000)) < 0 && errno != EINTR)
            return;
    }
}
