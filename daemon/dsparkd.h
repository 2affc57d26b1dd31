/* dsparkd.h: internal interfaces of dsparkd (daemon/).
 *
 * main.c owns the configuration, the signals and the main loop; fanout.c the
 * database side (LISTEN, event fan-out, status, reaper, retention); supervise.c
 * the dspark-worker processes. Everything runs on the main thread. */
#ifndef DSPARKD_H
#define DSPARKD_H

#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "dspark/ds-buf.h"
#include "dspark/ds-db.h"
#include "dspark/ds-events.h"

#define EXIT_CONFIG 78   /* EX_CONFIG: bad configuration or schema; systemd does not restart */

/* The configuration (one table in main.c). Durations are milliseconds. */
struct dsparkd_config {
    /* [dsparkd] */
    int log_level;                  /* enum index: see main.c */
    char *host_name;
    int64_t status_interval;
    int64_t reaper_interval;
    int64_t reaper_grace;           /* the reaper's wait after each (re)connection */
    int64_t worker_timeout;
    int64_t retention;              /* 0 = keep forever */
    int64_t retention_interval;
    int prune_batch;
    int64_t db_timeout;             /* statement_timeout of the daemon's queries */
    bool watchdog_requires_db;
    /* [database] */
    char *dsn;
    /* [events] */
    char *endpoint;
    char *socket_mode;
    int64_t heartbeat_interval;
    int sndhwm;
    char *curve_secret_key_file;
    char *curve_allow_file;
    /* [worker] */
    char *program;
    char *devices;
    char *worker_dsn;
    char *target;
    char *draft;
    char *spec;
    char *backend;
    int max_batch;
    int kv_tokens;
    int concurrency;
    int64_t drain_timeout;
    char *args;
    int64_t restart_delay;
    int64_t restart_delay_max;
    int64_t start_timeout;
    int64_t watchdog_timeout;
    /* [metrics] */
    char *metrics_listen;           /* "" = no endpoint */
};

/* ---- fanout.c: the database side ---- */

struct fanout;

struct fanout_status {
    bool valid;
    double asked;                   /* wall clock (Unix seconds) when the counts were asked for */
    int64_t queued;
    int64_t running;
    double tokens_per_s;            /* output tokens per second over the last minute */
    double mean_acceptance_length;  /* tokens committed per round over the last minute (-1: no rounds) */
};

/* What the daemon's own database passes did since it started. */
struct fanout_counters {
    uint64_t reaped;                /* jobs requeued, failed or cancelled by the lease reaper */
    uint64_t expired;               /* queued jobs ended at their deadline */
    uint64_t due;                   /* delayed jobs that came due and joined the queue */
    uint64_t pruned;                /* finished jobs deleted by retention */
};

struct fanout *fanout_new(const struct dsparkd_config *cfg, struct ds_events_pub *pub);
struct fanout *fanout_free(struct fanout *f);
/* Connect if down and due (back-off), check the schema, LISTEN, and judge the
 * notification probe. The connection attempt never blocks: each call takes
 * the steps it can (see fanout_pollfds). Returns 1 when (re)connected in this
 * call, 0 when up or still down (fanout_up tells), or < 0 (fatal) for a
 * schema this build does not know or a connection that does not carry
 * notifications. */
int fanout_connect(struct fanout *f, uint64_t now_us);
/* Leave the notification probe unjudged (dsparkd is stopping). */
void fanout_stop_probe(struct fanout *f);
bool fanout_up(const struct fanout *f);
/* Up, and its notifications shown to arrive (a probe came back), or stopping. */
bool fanout_verified(const struct fanout *f);
/* The descriptors to poll, at most max into fds: the connection's socket for
 * notifications and results (POLLIN; POLLOUT too while a statement waits
 * to be written) when up, or the connection attempt's next step while
 * one is under way; and the notification probe's connection's next step while
 * it connects. Returns how many. */
int fanout_pollfds(const struct fanout *f, struct pollfd *fds, int max);
/* Without waiting: write what waits to be written, read notifications and
 * publish the events of the jobs they name, take the result of the statement
 * under way, and send the next one (a pass asked for, or a read of notified
 * jobs). A statement with no answer within statement_timeout + 10 s, or a
 * broken connection, is logged and marks the connection down. Returns the
 * number of events published. */
int fanout_pump(struct fanout *f, uint64_t now_us);

/* dsparkd's own passes over the database. Each is one statement, sent in its
 * turn (fanout_request); its outcome goes to the fanout_done_fn. */
enum fanout_pass {
    FANOUT_STATUS,    /* queue counts for STATUS=, heartbeats and metrics (refreshes the DB-health clock) */
    FANOUT_REAP,      /* lease reaper: dspark.requeue_expired(); n: jobs changed (0 when another host holds the lock) */
    FANOUT_EXPIRE,    /* expiry: dspark.expire_jobs(FANOUT_EXPIRE_BATCH), queued jobs past their deadline; n: ended */
    FANOUT_PROMOTE,   /* dspark.promote_due_jobs(NULL, FANOUT_PROMOTE_BATCH): delayed jobs that came due lose their
                       * mark (so that claims see them) and idle workers are woken by one due: notification */
    FANOUT_PRUNE,     /* retention: dspark.prune(); n: jobs deleted */
    FANOUT_N_PASSES
};
#define FANOUT_EXPIRE_BATCH 2000    /* a sweep's jobs: one statement, and their events */
#define FANOUT_PROMOTE_BATCH 2000   /* a pass's jobs */
/* A pass's outcome: n (< 0: it failed, or went with the connection), and for FANOUT_STATUS the counts
 * (st->valid when n == 0). */
typedef void fanout_done_fn(void *ud, enum fanout_pass pass, int64_t n, const struct fanout_status *st);
void fanout_set_done(struct fanout *f, fanout_done_fn *fn, void *ud);
/* Ask for a pass: sent now when no statement is under way, else in its turn (the waiting passes go one
 * after the other, and take turns with reads of notified jobs; once however often asked).
 * false when the connection is down (or FANOUT_PRUNE without retention): nothing will be reported. */
bool fanout_request(struct fanout *f, enum fanout_pass pass, uint64_t now_us);
/* Before exiting: the passes and catch-ups not sent are dropped; the events of what was notified are read
 * and published (after the pass under way, if any), until deadline_us at the most. Without events to
 * read, it returns at once. */
void fanout_drain(struct fanout *f, uint64_t deadline_us);
/* Monotonic time of the last successful exchange with the database (0 = never). */
uint64_t fanout_last_ok(const struct fanout *f);
/* Why the database is down (for STATUS=), or "". */
const char *fanout_down_reason(const struct fanout *f);
uint64_t fanout_published(const struct fanout *f);
struct fanout_counters fanout_counters(const struct fanout *f);

/* ---- supervise.c: the workers ---- */

struct supervisor;

struct supervisor *supervisor_new(const struct dsparkd_config *cfg, const char *host);
struct supervisor *supervisor_free(struct supervisor *s);
/* The worker section's checks (devices "0,1,2" / "0-3", args, program, delays):
 * 0, or -DS_ECONFIG with *ret_key set to the failing key's field in cfg. */
int supervisor_check_config(const struct dsparkd_config *cfg, const void **ret_key);
/* Start every worker that is due (first start or restart after back-off). */
void supervisor_start_due(struct supervisor *s, uint64_t now_us);
/* Reap exited children (after SIGCHLD). */
void supervisor_reap(struct supervisor *s, uint64_t now_us);
/* Add the ready pipes to a poll set; returns the count added (at most max). */
int supervisor_pollfds(struct supervisor *s, struct pollfd *fds, int max);
/* Read what workers wrote on their pipes. */
void supervisor_read(struct supervisor *s, uint64_t now_us);
/* Enforce start and watchdog timeouts and drain deadlines. */
void supervisor_tick(struct supervisor *s, uint64_t now_us);
/* SIGTERM every worker and stop restarting them; kill after the drain timeout. */
void supervisor_drain(struct supervisor *s, uint64_t now_us);
/* SIGKILL every worker now. */
void supervisor_kill_all(struct supervisor *s);
int supervisor_count(const struct supervisor *s);
/* One worker, for the metrics: false when i is not a worker's index. */
struct supervisor_worker_info {
    const char *device;
    bool running, ready;
    unsigned failed_total;   /* runs that exited, were killed or could not start, since dsparkd started */
};
bool supervisor_worker(const struct supervisor *s, int i, struct supervisor_worker_info *ret);
int supervisor_running(const struct supervisor *s);
int supervisor_ready(const struct supervisor *s);
bool supervisor_all_ready(const struct supervisor *s);
/* Workers not ready now that exited, were killed or could not be started at
 * least once since dsparkd started (not counting exits while draining). */
int supervisor_failed_not_ready(const struct supervisor *s);
/* The devices of the workers not ready, for STATUS=: "device 0",
 * "devices 0, 2"; "" when all are ready. */
const char *supervisor_not_ready_names(struct supervisor *s);
/* The same for the log, with what each is doing: "device '0' (failed 2 times,
 * restarting in 0.4 s), device '2' (starting)". */
const char *supervisor_not_ready_detail(struct supervisor *s, uint64_t now_us);
/* The earliest time something is due (restart, timeout), or UINT64_MAX. */
uint64_t supervisor_next_due(const struct supervisor *s);
/* When the last worker still loading its first time (not ready, never failed) reaches worker.start_timeout
 * from its own start; 0 when there is none, or no start timeout. */
uint64_t supervisor_first_start_deadline(const struct supervisor *s);
/* Concatenated STATUS texts of the workers, "" if none. */
const char *supervisor_status_text(struct supervisor *s);

/* ---- metrics.c: the Prometheus endpoint ---- */

struct metrics;
struct ds_buf;
/* Writes the page (the text exposition format) into out. */
typedef void (*metrics_render_fn)(struct ds_buf *out, void *arg);

/* Listen on "HOST:PORT", "[IPV6]:PORT" or ":PORT". 0, -DS_ECONFIG for a bad
 * address or -DS_EIO when it cannot listen. */
int metrics_new(const char *address, metrics_render_fn render, void *arg, struct metrics **ret);
/* Whether address has one of those forms (a port 1 to 65535): 0 or -DS_ECONFIG. */
int metrics_check_address(const char *address);
struct metrics *metrics_free(struct metrics *m);
/* Add the listening socket (while a connection slot is free) and the open
 * connections to a poll set; returns the count added (at most max). */
int metrics_pollfds(struct metrics *m, struct pollfd *fds, int max);
/* Accept, read requests and send answers, as far as that goes without waiting;
 * drop connections past their time. */
void metrics_handle(struct metrics *m, uint64_t now_us);
/* When the oldest open connection times out, or UINT64_MAX. */
uint64_t metrics_next_due(const struct metrics *m);

#endif
