/* main.c: dsparkd, the per-host dspark service daemon: options, the
 * configuration table, signals and the main loop.
 *
 * One thread, one poll() loop that never waits on the database (connection
 * attempts and the session's setup run on short threads of their own:
 * ds_db_connect_start; every later statement is sent without waiting for its
 * answer: fanout_pump). Signals arrive through a
 * signalfd (nothing runs in signal context). Each turn: read signals, notifications and worker pipes;
 * publish events; run what is due (status, heartbeat, reaper, delayed jobs due, retention,
 * worker restarts and timeouts); talk to systemd. READY=1 goes out once the
 * database is connected with the right schema, the event socket is bound and
 * either every worker said READY, or at least one did and every other one has
 * failed at least once since the start (exited, or killed for
 * worker.start_timeout or a hang): one broken device must not keep the unit
 * from starting, which would make systemd restart the healthy workers too.
 * The workers not ready are then named in the log and in STATUS= until they
 * are ready.
 * WATCHDOG=1 only while the loop turns and the database answered within the
 * watchdog interval. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dspark/ds-cfg.h"
#include "dspark/ds-err.h"
#include "dspark/ds-log.h"
#include "dspark/ds-notify.h"
#include "dspark/ds-wire.h"
#include "dsparkd.h"

#ifndef DS_SYSCONFDIR
#define DS_SYSCONFDIR "/etc"
#endif
#ifndef DS_BINDIR
#define DS_BINDIR "/usr/bin"
#endif

#define DEFAULT_CONFIG DS_SYSCONFDIR "/dspark/dspark.conf"
#define MAX_POLL 300
#define EXTEND_STEP_US 20000000u      /* EXTEND_TIMEOUT_USEC while starting */
#define EXTEND_AFTER_KILL_US 5000000u /* ... past a first-time loader's start timeout: its kill, then READY=1 */
#define PROMOTE_INTERVAL_US 1000000u  /* how often delayed jobs that came due join the queue */
#define DRAIN_EVENTS_US 1000000u      /* at exit, the last events are read for at most db_timeout + this */
#define WATCHDOG_RECHECK_US 250000u   /* WATCHDOG=1 withheld (the database does not answer): looked at again */

static struct dsparkd_config cfg;

static const char *const log_levels[] = { "crit", "error", "warning", "notice", "info", "debug", NULL };
static const int log_level_values[] = { DS_LOG_CRIT, DS_LOG_ERR, DS_LOG_WARNING, DS_LOG_NOTICE, DS_LOG_INFO,
                                        DS_LOG_DEBUG };
static const char *const skip_none[] = { NULL };

#define MS(x) ((double)(x))
#define SEC 1000.0
#define DAY (86400.0 * SEC)

/* Every key dsparkd reads, by section. Documented in dspark.conf(5). */
static const struct ds_cfg_key config_keys[] = {
    { "dsparkd", "log_level", DS_CFG_ENUM, &cfg.log_level, 0, 0, "info", DS_CFG_RELOADABLE, log_levels,
      "most verbose messages logged: crit, error, warning, notice, info, debug" },
    { "dsparkd", "host_name", DS_CFG_STRING, &cfg.host_name, 0, 200, "", 0, NULL,
      "name of this host in heartbeats and worker ids (empty: the system host name)" },
    { "dsparkd", "status_interval", DS_CFG_DURATION, &cfg.status_interval, 100, 3600 * SEC, "2s", DS_CFG_RELOADABLE,
      NULL, "how often queue counts are read for STATUS= and heartbeats" },
    { "dsparkd", "reaper_interval", DS_CFG_DURATION, &cfg.reaper_interval, SEC, 3600 * SEC, "5s", DS_CFG_RELOADABLE,
      NULL,
      "how often expired leases are requeued (dspark.requeue_expired) and jobs past their deadline expired" },
    { "dsparkd", "reaper_grace", DS_CFG_DURATION, &cfg.reaper_grace, 0, 3600 * SEC, "15s", DS_CFG_RELOADABLE, NULL,
      "after connecting to the database, the reaper waits this long (workers cut off with dsparkd renew their leases)" },
    { "dsparkd", "worker_timeout", DS_CFG_DURATION, &cfg.worker_timeout, SEC, DAY, "1min", DS_CFG_RELOADABLE, NULL,
      "a worker silent this long is marked lost in dspark.workers" },
    { "dsparkd", "retention", DS_CFG_DURATION, &cfg.retention, 0, 3650 * DAY, "7d", DS_CFG_RELOADABLE, NULL,
      "finished jobs older than this are deleted (0: keep forever)" },
    { "dsparkd", "retention_interval", DS_CFG_DURATION, &cfg.retention_interval, SEC, 30 * DAY, "1d",
      DS_CFG_RELOADABLE, NULL, "how often retention runs" },
    { "dsparkd", "prune_batch", DS_CFG_INT, &cfg.prune_batch, 1, 10000000, "10000", DS_CFG_RELOADABLE, NULL,
      "jobs deleted per transaction by retention (it repeats until done)" },
    { "dsparkd", "db_timeout", DS_CFG_DURATION, &cfg.db_timeout, 100, 3600 * SEC, "10s", 0, NULL,
      "statement_timeout of the daemon's own queries" },
    { "dsparkd", "watchdog_requires_db", DS_CFG_BOOL, &cfg.watchdog_requires_db, 0, 0, "on", DS_CFG_RELOADABLE,
      NULL, "withhold WATCHDOG=1 while the database does not answer (systemd then restarts the service)" },

    { "database", "dsn", DS_CFG_STRING, &cfg.dsn, 0, 4000, "", DS_CFG_SECRET, NULL,
      "libpq connection string or URI (empty: the PG* environment variables)" },

    { "events", "endpoint", DS_CFG_STRING, &cfg.endpoint, 1, 400, DS_EVENTS_DEFAULT_ENDPOINT, 0, NULL,
      "ZeroMQ endpoint the event publisher binds: ipc://PATH or tcp://ADDRESS:PORT" },
    { "events", "socket_mode", DS_CFG_STRING, &cfg.socket_mode, 0, 4, "0666", 0, NULL,
      "permissions of an ipc socket file (octal)" },
    { "events", "heartbeat_interval", DS_CFG_DURATION, &cfg.heartbeat_interval, 100, 3600 * SEC, "2s",
      DS_CFG_RELOADABLE, NULL, "how often a heartbeat event is published" },
    { "events", "sndhwm", DS_CFG_INT, &cfg.sndhwm, 100, 100000000, "100000", 0, NULL,
      "messages queued per subscriber before it misses events" },
    { "events", "curve_secret_key_file", DS_CFG_STRING, &cfg.curve_secret_key_file, 0, 1000, "", 0, NULL,
      "file with the server's Z85 CURVE secret key (empty: no CURVE)" },
    { "events", "curve_allow_file", DS_CFG_STRING, &cfg.curve_allow_file, 0, 1000, "", DS_CFG_RELOADABLE, NULL,
      "file with the Z85 public keys of the clients allowed to subscribe, one per line" },

    { "worker", "program", DS_CFG_STRING, &cfg.program, 0, 1000, DS_BINDIR "/dspark-worker", 0, NULL,
      "the worker executable" },
    { "worker", "devices", DS_CFG_STRING, &cfg.devices, 0, 1000, "", 0, NULL,
      "one worker per device: '0,1', '0-3' (empty: no workers)" },
    { "worker", "dsn", DS_CFG_STRING, &cfg.worker_dsn, 0, 4000, "", DS_CFG_SECRET, NULL,
      "connection string for the workers (empty: database.dsn)" },
    { "worker", "target", DS_CFG_STRING, &cfg.target, 0, 1000, "", 0, NULL,
      "target model directory (--target)" },
    { "worker", "draft", DS_CFG_STRING, &cfg.draft, 0, 1000, "", 0, NULL,
      "DSpark draft checkpoint directory (--draft)" },
    { "worker", "spec", DS_CFG_STRING, &cfg.spec, 0, 64, "", 0, NULL,
      "default speculation mode (--spec): dspark, dspark-async, fixed:N, threshold:X, none" },
    { "worker", "backend", DS_CFG_STRING, &cfg.backend, 0, 16, "", 0, NULL, "compute backend (--backend): auto, cpu, cuda" },
    { "worker", "max_batch", DS_CFG_INT, &cfg.max_batch, 0, 65536, "0", 0, NULL,
      "most sequences decoded together (--max-batch; 0: the worker's default)" },
    { "worker", "kv_tokens", DS_CFG_INT, &cfg.kv_tokens, 0, 2000000000, "0", 0, NULL,
      "KV-cache capacity in tokens (--kv-tokens; 0: the worker's default)" },
    { "worker", "concurrency", DS_CFG_INT, &cfg.concurrency, 0, 65536, "0", 0, NULL,
      "most jobs claimed at once (--concurrency; 0: the worker's default)" },
    { "worker", "drain_timeout", DS_CFG_DURATION, &cfg.drain_timeout, SEC, DAY, "60s", 0, NULL,
      "time a worker has to finish or hand back its jobs on stop (--drain-timeout)" },
    { "worker", "args", DS_CFG_STRING, &cfg.args, 0, 4000, "", 0, NULL,
      "extra worker arguments, split on blanks (quotes group)" },
    { "worker", "restart_delay", DS_CFG_DURATION, &cfg.restart_delay, 100, 3600 * SEC, "1s", DS_CFG_RELOADABLE,
      NULL, "first restart delay after a worker exits; doubles on each failure" },
    { "worker", "restart_delay_max", DS_CFG_DURATION, &cfg.restart_delay_max, 100, DAY, "1min", DS_CFG_RELOADABLE,
      NULL, "longest restart delay" },
    { "worker", "start_timeout", DS_CFG_DURATION, &cfg.start_timeout, 0, DAY, "10min", DS_CFG_RELOADABLE, NULL,
      "a worker that has not said READY by then is killed and restarted (0: wait forever)" },
    { "worker", "watchdog_timeout", DS_CFG_DURATION, &cfg.watchdog_timeout, 0, DAY, "1min", DS_CFG_RELOADABLE,
      NULL, "a worker that sent WATCHDOG once and then stays silent this long is killed (0: off)" },

    { "metrics", "listen", DS_CFG_STRING, &cfg.metrics_listen, 0, 300, "", 0, NULL,
      "address of the Prometheus endpoint (GET /metrics): HOST:PORT, [IPV6]:PORT or :PORT (empty: none)" },
};

/* ---- state of the running daemon ---- */

struct daemon {
    const char *config_path;
    bool config_explicit;
    char host[256];
    int sigfd;
    struct ds_events_pub *pub;
    struct fanout *fanout;
    struct supervisor *sup;
    struct metrics *metrics;          /* NULL: no endpoint */
    double start_ts;                  /* wall clock (Unix seconds) at start */
    bool ready_sent;
    bool ready_partial;               /* READY=1 went out with workers not ready, not all ready since */
    bool stopping;
    int exit_code;
    uint64_t start_us;
    uint64_t watchdog_usec;           /* 0 = no watchdog */
    uint64_t next_watchdog_us;
    uint64_t next_status_us;
    uint64_t next_heartbeat_us;
    uint64_t heartbeats;             /* published so far */
    uint64_t next_reap_us;
    uint64_t reap_not_before_us;      /* the end of the reaper's grace after the last connection */
    uint64_t next_prune_us;
    uint64_t next_promote_us;
    uint64_t next_extend_us;
    struct fanout_status status;
    double status_ts;               /* wall clock (Unix seconds) when status was read */
    char last_status[512];
};

static int level_of(int idx)
{
    return idx >= 0 && idx < (int)(sizeof log_level_values / sizeof log_level_values[0]) ? log_level_values[idx]
                                                                                       : DS_LOG_INFO;
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* Checks beyond what the table can express (the table's check: see ds-cfg.h). */
static int check_config(const void **ret_key)
{
    char *end;
    long mode = strtol(cfg.socket_mode, &end, 8);
    *ret_key = &cfg.socket_mode;
    if (!*cfg.socket_mode || *end || mode < 0 || mode > 07777)
        return ds_seterr(DS_ECONFIG, "events.socket_mode '%s' is not an octal mode like '0660'", cfg.socket_mode);
    if ((mode & 0777) == 0)   /* (ds_events_pub_open leaves a mode of 0 alone: it would not be applied) */
        return ds_seterr(DS_ECONFIG, "events.socket_mode '%s' lets no one connect", cfg.socket_mode);
    *ret_key = &cfg.endpoint;
    if (!ds_events_endpoint_is_local(cfg.endpoint) && !*cfg.curve_secret_key_file)
        return ds_seterr(DS_ECONFIG, "events.endpoint '%s' is reachable from other hosts: set "
                         "events.curve_secret_key_file and events.curve_allow_file, or bind to ipc:// or "
                         "tcp://127.0.0.1", cfg.endpoint);
    *ret_key = &cfg.curve_secret_key_file;
    if (*cfg.curve_secret_key_file && !*cfg.curve_allow_file)
        return ds_seterr(DS_ECONFIG, "events.curve_secret_key_file needs events.curve_allow_file");
    *ret_key = &cfg.metrics_listen;
    if (*cfg.metrics_listen && metrics_check_address(cfg.metrics_listen) < 0)
        return -DS_ECONFIG;
    /* (a worker given another exits 78 at every restart, and is never ready) */
    *ret_key = &cfg.backend;
    if (*cfg.backend && strcmp(cfg.backend, "auto") != 0 && strcmp(cfg.backend, "cpu") != 0 &&
        strcmp(cfg.backend, "cuda") != 0)
        return ds_seterr(DS_ECONFIG, "worker.backend '%s' is not auto, cpu or cuda", cfg.backend);
    return supervisor_check_config(&cfg, ret_key);
}

static const struct ds_cfg_table config_table = {
    config_keys, sizeof config_keys / sizeof config_keys[0], skip_none, check_config,
};

/* (the table's check runs in both) */
static int load_config(struct daemon *d)
{
    int r;
    if (!d->config_explicit && access(d->config_path, F_OK) != 0 && errno == ENOENT) {
        r = ds_cfg_defaults(&config_table);
        if (r == 0)
            ds_log(DS_LOG_NOTICE, "configuration file '%s' does not exist, using defaults", d->config_path);
    } else {
        r = ds_cfg_load(&config_table, d->config_path);
    }
    return r;
}

/* Warn about a file holding a secret that every user may read (the key
 * command writes with the caller's umask; tmpfiles.d fixes modes at boot). */
static void warn_readable(const char *path, const char *what)
{
    struct stat st;
    if (*path && stat(path, &st) == 0 && (st.st_mode & S_IROTH))
        ds_log(DS_LOG_WARNING, "'%s' holds %s and every user may read it (mode %04o): chmod o-r it", path, what,
               (unsigned)(st.st_mode & 07777));
}

/* ---- systemd ---- */

static void notify(const char *fmt, ...) DS_PRINTF(1, 2);

static void notify(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (ds_notify(buf) < 0)
        ds_log(DS_LOG_WARNING, "%s", ds_errdetail());
}

static void update_status(struct daemon *d)
{
    char text[512];
    int nw = supervisor_count(d->sup), ready = supervisor_ready(d->sup);
    if (d->stopping)
        snprintf(text, sizeof text, "draining: %d of %d workers still running", supervisor_running(d->sup), nw);
    else if (!fanout_up(d->fanout))
        snprintf(text, sizeof text, "database unavailable: %.300s", fanout_down_reason(d->fanout));
    else if (!d->ready_sent)
        snprintf(text, sizeof text, "starting: %d of %d workers ready", ready, nw);
    else {
        /* ready, maybe without some workers: name those */
        const char *missing = ready < nw ? supervisor_not_ready_names(d->sup) : "";
        const char *sep = *missing ? "; not ready: " : "";
        if (d->status.valid)
            snprintf(text, sizeof text, "%" PRId64 " queued, %" PRId64 " running, %d/%d workers, %.1f tokens/s%s%s",
                     d->status.queued, d->status.running, ready, nw, d->status.tokens_per_s, sep, missing);
        else
            snprintf(text, sizeof text, "%d/%d workers ready%s%s", ready, nw, sep, missing);
    }
    if (strcmp(text, d->last_status) != 0) {
        snprintf(d->last_status, sizeof d->last_status, "%s", text);
        notify("STATUS=%s", text);
    }
}

/* ---- signals ---- */

static int signals_setup(struct daemon *d)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
        return ds_seterr(DS_EIO, "could not block signals: %s", strerror(errno));
    d->sigfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (d->sigfd < 0)
        return ds_seterr(DS_EIO, "could not create a signalfd: %s", strerror(errno));
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

static void reload(struct daemon *d)
{
    if (d->stopping) {   /* systemd heard STOPPING=1: no RELOADING=1 and READY=1 after it */
        ds_log(DS_LOG_NOTICE, "received SIGHUP while stopping; not reloading");
        return;
    }
    notify("RELOADING=1\nMONOTONIC_USEC=%" PRIu64, ds_now_usec());
    ds_log(DS_LOG_INFO, "received SIGHUP, reloading '%s'", d->config_path);
    int changed = 0, ignored = 0;
    int r = ds_cfg_reload(&config_table, d->config_path, &changed, &ignored);
    if (r < 0) {
        ds_log(DS_LOG_ERR, "configuration file contains errors; no changes were applied: %s", ds_errdetail());
    } else {
        ds_log_set_level(level_of(cfg.log_level));
        /* the allow-list file is reread on every reload: its content may have changed */
        if (*cfg.curve_secret_key_file) {
            if (ds_events_pub_reload_allow(d->pub, cfg.curve_allow_file) < 0)
                ds_log(DS_LOG_ERR, "could not reload the CURVE allow-list, keeping the old one: %s", ds_errdetail());
            else
                ds_log(DS_LOG_INFO, "reloaded the CURVE allow-list from '%s'", cfg.curve_allow_file);
        }
        ds_log(DS_LOG_INFO, "configuration reloaded: %d change%s applied, %d ignored until restart", changed,
               changed == 1 ? "" : "s", ignored);
        /* intervals may have changed: recompute the timers from now */
        uint64_t now = ds_now_usec();
        d->next_status_us = now;
        d->next_heartbeat_us = now;
        /* (not before the end of a reaper grace that is still running) */
        d->next_reap_us = min_u64(d->next_reap_us, now + (uint64_t)cfg.reaper_interval * 1000u);
        if (d->next_reap_us < d->reap_not_before_us)
            d->next_reap_us = d->reap_not_before_us;
        /* (sooner for a shorter interval; a reload never puts retention off) */
        d->next_prune_us = min_u64(d->next_prune_us, now + (uint64_t)cfg.retention_interval * 1000u);
        if (!d->ready_sent)
            d->next_extend_us = now;   /* (worker.start_timeout may have been raised) */
    }
    d->last_status[0] = 0;
    if (d->ready_sent)
        notify("READY=1");
    update_status(d);
}

static void begin_stop(struct daemon *d, int sig)
{
    if (d->stopping) {
        ds_log(DS_LOG_WARNING, "received signal %d again, killing the workers now", sig);
        supervisor_kill_all(d->sup);
        return;
    }
    d->stopping = true;
    fanout_stop_probe(d->fanout);
    ds_log(DS_LOG_INFO, "received %s, draining %d worker%s", sig == SIGINT ? "SIGINT" : "SIGTERM",
           supervisor_running(d->sup), supervisor_running(d->sup) == 1 ? "" : "s");
    notify("STOPPING=1");
    supervisor_drain(d->sup, ds_now_usec());
    update_status(d);
}

static void read_signals(struct daemon *d)
{
    struct signalfd_siginfo si;
    while (read(d->sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
        switch (si.ssi_signo) {
        case SIGTERM:
        case SIGINT:
            begin_stop(d, (int)si.ssi_signo);
            break;
        case SIGHUP:
            reload(d);
            break;
        case SIGCHLD:
            supervisor_reap(d->sup, ds_now_usec());
            break;
        }
    }
}

/* ---- periodic work ---- */

static void publish_heartbeat(struct daemon *d)
{
    struct ds_event hb = { .type = DS_EVENT_HB, .ts = ds_wire_now() };
    snprintf(hb.host, sizeof hb.host, "%s", d->host);
    hb.queued = d->status.valid ? d->status.queued : 0;
    hb.running = d->status.valid ? d->status.running : 0;
    hb.workers = supervisor_ready(d->sup);
    if (d->status.valid) {
        hb.counts_ts = d->status_ts;
        hb.has |= DS_EV_COUNTS_TS;
    }
    if (ds_events_publish(d->pub, &hb) < 0)
        ds_log(DS_LOG_WARNING, "could not publish a heartbeat: %s", ds_errdetail());
    /* the subscribed topics' counts, so that a subscriber past its high-water mark learns of its loss: those that
     * changed, and every 16th heartbeat all (a checkpoint that found the queue full was dropped too) */
    if (ds_events_pub_checkpoint(d->pub, d->heartbeats++ % 16 == 0) < 0)
        ds_log(DS_LOG_WARNING, "could not publish the topics' counts: %s", ds_errdetail());
}

/* The Prometheus page: what dsparkd knows without asking the database again. */
static void render_metrics(struct ds_buf *b, void *arg)
{
    struct daemon *d = arg;
    struct fanout_counters n = fanout_counters(d->fanout);
    const struct fanout_status *st = &d->status;
#define HELP(name, type, text) ds_buf_printf(b, "# HELP " name " " text "\n# TYPE " name " " type "\n")
    HELP("dspark_database_up", "gauge", "1 while dsparkd's connection to PostgreSQL is up");
    ds_buf_printf(b, "dspark_database_up %d\n", fanout_up(d->fanout) ? 1 : 0);
    if (st->valid) {
        HELP("dspark_jobs", "gauge", "jobs by state (read every dsparkd.status_interval)");
        ds_buf_printf(b, "dspark_jobs{state=\"queued\"} %" PRId64 "\n", st->queued);
        ds_buf_printf(b, "dspark_jobs{state=\"running\"} %" PRId64 "\n", st->running);
        HELP("dspark_jobs_age_seconds", "gauge", "age of the job counts");
        ds_buf_printf(b, "dspark_jobs_age_seconds %.3f\n", ds_wire_now() - d->status_ts);
        HELP("dspark_output_tokens_per_second", "gauge",
             "output tokens of the jobs finished in the last minute, per second");
        ds_buf_printf(b, "dspark_output_tokens_per_second %.3f\n", st->tokens_per_s);
        if (st->mean_acceptance_length >= 0) {
            HELP("dspark_mean_acceptance_length", "gauge",
                 "tokens committed per decoding round over the jobs finished in the last minute (tau)");
            ds_buf_printf(b, "dspark_mean_acceptance_length %.4f\n", st->mean_acceptance_length);
        }
    }
    HELP("dspark_workers", "gauge", "dspark-worker processes: configured, running and ready");
    ds_buf_printf(b, "dspark_workers{state=\"configured\"} %d\n", supervisor_count(d->sup));
    ds_buf_printf(b, "dspark_workers{state=\"running\"} %d\n", supervisor_running(d->sup));
    ds_buf_printf(b, "dspark_workers{state=\"ready\"} %d\n", supervisor_ready(d->sup));
    struct supervisor_worker_info w;
    if (supervisor_count(d->sup) > 0) {
        HELP("dspark_worker_ready", "gauge", "1 while the device's dspark-worker is ready");
        for (int i = 0; supervisor_worker(d->sup, i, &w); i++)
            ds_buf_printf(b, "dspark_worker_ready{device=\"%s\"} %d\n", w.device, w.ready ? 1 : 0);
        HELP("dspark_worker_failures_total", "counter",
             "runs of the device's dspark-worker that exited, were killed or could not start");
        for (int i = 0; supervisor_worker(d->sup, i, &w); i++)
            ds_buf_printf(b, "dspark_worker_failures_total{device=\"%s\"} %u\n", w.device, w.failed_total);
    }
    HELP("dspark_events_published_total", "counter", "job events published on the event socket");
    ds_buf_printf(b, "dspark_events_published_total %" PRIu64 "\n", fanout_published(d->fanout));
    HELP("dspark_heartbeats_total", "counter", "heartbeat events published");
    ds_buf_printf(b, "dspark_heartbeats_total %" PRIu64 "\n", d->heartbeats);
    HELP("dspark_reaped_jobs_total", "counter",
         "jobs whose lease expired: requeued, failed or cancelled by the reaper");
    ds_buf_printf(b, "dspark_reaped_jobs_total %" PRIu64 "\n", n.reaped);
    HELP("dspark_expired_jobs_total", "counter", "queued jobs ended at their deadline (expires_at)");
    ds_buf_printf(b, "dspark_expired_jobs_total %" PRIu64 "\n", n.expired);
    HELP("dspark_due_jobs_total", "counter", "delayed jobs that came due and joined the queue (by dsparkd's pass)");
    ds_buf_printf(b, "dspark_due_jobs_total %" PRIu64 "\n", n.due);
    HELP("dspark_pruned_jobs_total", "counter", "finished jobs deleted by retention");
    ds_buf_printf(b, "dspark_pruned_jobs_total %" PRIu64 "\n", n.pruned);
    HELP("dspark_start_time_seconds", "gauge", "when dsparkd started (Unix time)");
    ds_buf_printf(b, "dspark_start_time_seconds %.3f\n", d->start_ts);
#undef HELP
}

static bool healthy(struct daemon *d, uint64_t now)
{
    if (!cfg.watchdog_requires_db)
        return true;
    uint64_t last = fanout_last_ok(d->fanout);
    return last > 0 && now - last < d->watchdog_usec;
}

/* Whether the workers allow READY=1: all are ready, or at least one is and
 * every other one has failed since the start (it keeps being restarted). A
 * worker still loading that has not failed yet is waited for. */
static bool workers_ready(struct daemon *d)
{
    int nw = supervisor_count(d->sup), ready = supervisor_ready(d->sup);
    return ready == nw || (ready > 0 && ready + supervisor_failed_not_ready(d->sup) == nw);
}

/* Starting takes long (the database, model loading): keep systemd's start timeout ahead of us, for up to
 * worker.start_timeout from dsparkd's start, and as long as a worker loading for the first time may still
 * get ready or be killed for it (workers start only once the database answers: a worker that hangs is
 * killed start_timeout after its own start, and partial readiness comes after that). */
static void extend_start(struct daemon *d, uint64_t now)
{
    if (d->ready_sent || d->stopping || now < d->next_extend_us)
        return;
    uint64_t until = d->start_us + (uint64_t)cfg.start_timeout * 1000u;
    uint64_t first_load = supervisor_first_start_deadline(d->sup);
    if (first_load && first_load + EXTEND_AFTER_KILL_US > until)
        until = first_load + EXTEND_AFTER_KILL_US;
    if (cfg.start_timeout != 0 && now >= until) {
        d->next_extend_us = UINT64_MAX;   /* systemd's own timeout decides from here (and the loop sleeps) */
        return;
    }
    d->next_extend_us = now + EXTEND_STEP_US / 2;
    notify("EXTEND_TIMEOUT_USEC=%u", EXTEND_STEP_US);
}

static void run_due(struct daemon *d, uint64_t now)
{
    if (now >= d->next_status_us) {
        /* the status query is also the database health check behind WATCHDOG=1 */
        uint64_t every = (uint64_t)cfg.status_interval * 1000u;
        if (d->watchdog_usec && every > d->watchdog_usec / 4)
            every = d->watchdog_usec / 4;
        d->next_status_us = now + every;
        fanout_request(d->fanout, FANOUT_STATUS, now);   /* (pass_done takes the counts) */
        const char *ws = supervisor_status_text(d->sup);
        if (*ws)
            ds_log(DS_LOG_DEBUG, "workers: %s", ws);
    }
    if (now >= d->next_heartbeat_us) {
        d->next_heartbeat_us = now + (uint64_t)cfg.heartbeat_interval * 1000u;
        publish_heartbeat(d);
    }
    /* the passes over the queue go in their turn; pass_done brings a pass with more to do forward */
    if (now >= d->next_reap_us && fanout_up(d->fanout)) {
        d->next_reap_us = now + (uint64_t)cfg.reaper_interval * 1000u;
        fanout_request(d->fanout, FANOUT_REAP, now);
        fanout_request(d->fanout, FANOUT_EXPIRE, now);
    }
    if (now >= d->next_promote_us && fanout_up(d->fanout)) {
        d->next_promote_us = now + PROMOTE_INTERVAL_US;
        fanout_request(d->fanout, FANOUT_PROMOTE, now);
    }
    if (now >= d->next_prune_us && fanout_up(d->fanout)) {
        d->next_prune_us = now + (uint64_t)cfg.retention_interval * 1000u;
        fanout_request(d->fanout, FANOUT_PRUNE, now);
    }
    supervisor_start_due(d->sup, now);
    supervisor_tick(d->sup, now);

    int nw = supervisor_count(d->sup);
    if (!d->ready_sent && !d->stopping && fanout_up(d->fanout) && workers_ready(d)) {
        d->ready_sent = true;
        if (supervisor_all_ready(d->sup)) {
            ds_log(DS_LOG_INFO, "ready: %d worker%s, events on '%s'", nw, nw == 1 ? "" : "s",
                   ds_events_pub_endpoint(d->pub));
        } else {
            d->ready_partial = true;
            ds_log(DS_LOG_WARNING, "ready: %d of %d workers, events on '%s'; not ready: %s",
                   supervisor_ready(d->sup), nw, ds_events_pub_endpoint(d->pub),
                   supervisor_not_ready_detail(d->sup, now));
        }
        notify("READY=1");
    } else if (d->ready_partial && !d->stopping && supervisor_all_ready(d->sup)) {
        d->ready_partial = false;
        ds_log(DS_LOG_NOTICE, "all %d workers are ready", nw);
    }
    extend_start(d, now);
    if (d->watchdog_usec && now >= d->next_watchdog_us) {
        if (healthy(d, now)) {
            notify("WATCHDOG=1");
            d->next_watchdog_us = now + d->watchdog_usec / 2;
        } else {
            /* withheld: look again soon, not at once (the loop would spin until the database answers) */
            d->next_watchdog_us = now + min_u64(WATCHDOG_RECHECK_US, d->watchdog_usec / 4);
        }
    }
    update_status(d);
}

/* A pass over the database is over (fanout_done_fn). */
static void pass_done(void *ud, enum fanout_pass pass, int64_t n, const struct fanout_status *st)
{
    struct daemon *d = ud;
    uint64_t now = ds_now_usec();
    switch (pass) {
    case FANOUT_STATUS:
        if (st->valid) {
            d->status = *st;
            d->status_ts = st->asked;   /* (when asked, so that the counts' age is never understated) */
        }
        break;
    case FANOUT_EXPIRE:
        /* a full sweep: more jobs may be past their deadline, sweep again soon (the loop runs in between) */
        if (n >= FANOUT_EXPIRE_BATCH)
            d->next_reap_us = min_u64(d->next_reap_us, now + 200000u);
        break;
    case FANOUT_PROMOTE:
        /* a full pass: more delayed jobs may be due, again soon */
        if (n >= FANOUT_PROMOTE_BATCH)
            d->next_promote_us = min_u64(d->next_promote_us, now + 50000u);
        break;
    case FANOUT_PRUNE:
        /* a full batch: more may be waiting, continue soon in a new transaction;
         * a failure (a timeout, a lock held by another host's pass): in a minute */
        if (n >= cfg.prune_batch)
            d->next_prune_us = min_u64(d->next_prune_us, now + 1000000u);
        else if (n < 0)
            d->next_prune_us = min_u64(d->next_prune_us, now + 60000000u);
        break;
    default:
        break;
    }
}

/* How long the loop may sleep. run_due's timers, the supervisor's among them, count once it runs (the
 * workers started): before, they are all due at once, and would make the loop spin while the database
 * connection is made. */
static int poll_timeout_ms(struct daemon *d, uint64_t now, bool workers_started)
{
    uint64_t next = UINT64_MAX;
    if (workers_started) {
        next = min_u64(d->next_status_us, d->next_heartbeat_us);
        if (fanout_up(d->fanout)) {
            next = min_u64(next, d->next_reap_us);
            next = min_u64(next, d->next_prune_us);
            next = min_u64(next, d->next_promote_us);
        }
        if (d->watchdog_usec)
            next = min_u64(next, d->next_watchdog_us);
        next = min_u64(next, supervisor_next_due(d->sup));
    }
    if (!d->ready_sent && !d->stopping)
        next = min_u64(next, d->next_extend_us);
    next = min_u64(next, metrics_next_due(d->metrics));
    if (!fanout_up(d->fanout))
        next = min_u64(next, now + 200000u);   /* reconnect attempts are paced by the back-off */
    /* ZeroMQ descriptors are edge-triggered: never sleep longer than a second */
    next = min_u64(next, now + 1000000u);
    return next <= now ? 0 : (int)((next - now + 999) / 1000);
}

static int run(struct daemon *d)
{
    uint64_t now = ds_now_usec();
    d->start_us = now;
    d->next_status_us = d->next_heartbeat_us = now;
    d->next_reap_us = now;
    d->next_promote_us = now;
    /* first retention pass a minute after start (sooner when the interval is shorter) */
    d->next_prune_us = now + min_u64(60000000u, (uint64_t)cfg.retention_interval * 1000u);
    d->next_extend_us = now;
    if (ds_watchdog_enabled(&d->watchdog_usec))
        ds_log(DS_LOG_INFO, "systemd watchdog every %.1f s", (double)d->watchdog_usec / 1e6);
    else
        d->watchdog_usec = 0;
    d->next_watchdog_us = now;
    update_status(d);

    bool workers_started = false;
    while (!d->stopping || supervisor_running(d->sup) > 0) {
        now = ds_now_usec();
        int r = d->exit_code == EXIT_CONFIG ? 0 : fanout_connect(d->fanout, now);
        if (r == 1) {
            /* (re)connected: after an outage the workers' leases may have run out
             * meanwhile; give the workers that were cut off too the time to
             * reconnect and renew them before the reaper takes their jobs (as
             * crashed, to run alone) */
            d->reap_not_before_us = now + (uint64_t)cfg.reaper_grace * 1000u;
            if (d->next_reap_us < d->reap_not_before_us)
                d->next_reap_us = d->reap_not_before_us;
        }
        if (r < 0) {
            ds_log(DS_LOG_CRIT, "%s", ds_errdetail());
            d->exit_code = EXIT_CONFIG;
            if (!d->stopping)
                begin_stop(d, SIGTERM);
            if (supervisor_running(d->sup) == 0)
                break;
        }
        /* workers start once the database is known to be usable: connected, and its notifications arrive */
        if (!workers_started && fanout_verified(d->fanout)) {
            workers_started = true;
            if (supervisor_count(d->sup) == 0)
                ds_log(DS_LOG_NOTICE, "no workers configured (worker.devices is empty)");
        }
        if (workers_started) {
            run_due(d, now);
        } else {
            extend_start(d, now);   /* (while the database is not there yet, too) */
            update_status(d);
        }
        if (d->stopping && supervisor_running(d->sup) == 0)
            break;

        struct pollfd fds[MAX_POLL];
        int n = 0;
        fds[n++] = (struct pollfd){ .fd = d->sigfd, .events = POLLIN };
        n += fanout_pollfds(d->fanout, fds + n, MAX_POLL - n);
        int zfds[2];
        int nz = ds_events_pub_fds(d->pub, zfds, 2);
        for (int i = 0; i < nz; i++)
            fds[n++] = (struct pollfd){ .fd = zfds[i], .events = POLLIN };
        n += supervisor_pollfds(d->sup, fds + n, MAX_POLL - n);
        n += metrics_pollfds(d->metrics, fds + n, MAX_POLL - n);

        if (ds_events_pub_process(d->pub) < 0)
            ds_log(DS_LOG_WARNING, "event socket: %s", ds_errdetail());
        int pr = poll(fds, (nfds_t)n, poll_timeout_ms(d, ds_now_usec(), workers_started));
        if (pr < 0 && errno != EINTR) {
            ds_log(DS_LOG_CRIT, "poll failed: %s", strerror(errno));
            d->exit_code = 1;
            break;
        }
        now = ds_now_usec();
        read_signals(d);
        fanout_pump(d->fanout, now);
        supervisor_read(d->sup, now);
        metrics_handle(d->metrics, now);
        if (ds_events_pub_process(d->pub) < 0)
            ds_log(DS_LOG_WARNING, "event socket: %s", ds_errdetail());
    }
    /* last events of drained jobs */
    fanout_drain(d->fanout, ds_now_usec() + (uint64_t)cfg.db_timeout * 1000u + DRAIN_EVENTS_US);
    return d->exit_code;
}

/* ---- options ---- */

static void usage(FILE *f)
{
    fprintf(f,
            "dsparkd: the dspark service daemon (job events, lease reaper, retention, workers).\n"
            "\n"
            "Usage: dsparkd [OPTION]...\n"
            "\n"
            "Options:\n"
            "  -c, --config=FILE     configuration file (default: %s)\n"
            "  -f, --foreground      run in the foreground (the default; dsparkd never forks)\n"
            "      --check-config    check the configuration and exit\n"
            "      --dump-config     print the configuration in effect and exit\n"
            "      --curve-keypair   print a new CURVE key pair for events.curve_* and exit\n"
            "  -h, --help            show this help and exit\n"
            "  -V, --version         show the version and exit\n"
            "\n"
            "See dsparkd(8) and dspark.conf(5).\n",
            DEFAULT_CONFIG);
}

int main(int argc, char **argv)
{
    enum { OPT_CHECK = 256, OPT_DUMP, OPT_KEYPAIR };
    static const struct option opts[] = {
        { "config", required_argument, NULL, 'c' },
        { "foreground", no_argument, NULL, 'f' },
        { "check-config", no_argument, NULL, OPT_CHECK },
        { "dump-config", no_argument, NULL, OPT_DUMP },
        { "curve-keypair", no_argument, NULL, OPT_KEYPAIR },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    struct daemon d = { .config_path = DEFAULT_CONFIG, .sigfd = -1 };
    bool check = false, dump = false;
    int c;
    ds_log_init("dsparkd", DS_LOG_INFO, DS_LOG_TARGET_AUTO);
    while ((c = getopt_long(argc, argv, "c:fhV", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            d.config_path = optarg;
            d.config_explicit = true;
            break;
        case 'f':
            break;
        case OPT_CHECK:
            check = true;
            break;
        case OPT_DUMP:
            dump = true;
            break;
        case OPT_KEYPAIR: {
            char pub[DS_EVENTS_KEY_Z85_LEN + 1], sec[DS_EVENTS_KEY_Z85_LEN + 1];
            if (ds_events_curve_keypair(pub, sec) < 0) {
                ds_log(DS_LOG_ERR, "%s", ds_errdetail());
                return 1;
            }
            printf("# public key: give it to subscribers (events.curve_server_key)\npublic-key = \"%s\"\n"
                   "# secret key: keep it in the file named by events.curve_secret_key_file\nsecret-key = \"%s\"\n",
                   pub, sec);
            return 0;
        }
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("dsparkd (dspark) %s\n", PACKAGE_VERSION);
            return 0;
        default:
            usage(stderr);
            return 64;
        }
    }
    if (optind < argc) {
        ds_log(DS_LOG_ERR, "unexpected argument '%s'", argv[optind]);
        usage(stderr);
        return 64;
    }

    int r = load_config(&d);
    if (r < 0) {
        ds_log(DS_LOG_ERR, "invalid configuration: %s", ds_errdetail());
        ds_cfg_free(&config_table);
        return EXIT_CONFIG;
    }
    warn_readable(cfg.curve_secret_key_file, "the CURVE secret key");
    if (strstr(cfg.dsn, "password") || strstr(cfg.worker_dsn, "password"))
        warn_readable(d.config_path, "a database password");
    if (check || dump) {
        if (dump)
            ds_cfg_dump(&config_table, stdout, true);
        if (check)
            printf("configuration file '%s' is valid\n", d.config_path);
        ds_cfg_free(&config_table);
        return 0;
    }
    ds_log_set_level(level_of(cfg.log_level));
    if (*cfg.host_name)
        snprintf(d.host, sizeof d.host, "%s", cfg.host_name);
    else if (gethostname(d.host, sizeof d.host - 1) < 0)
        snprintf(d.host, sizeof d.host, "localhost");
    /* libpq waits forever for an unreachable server unless told otherwise */
    setenv("PGCONNECT_TIMEOUT", "10", 0);

    if ((r = signals_setup(&d)) < 0) {
        ds_log(DS_LOG_CRIT, "%s", ds_errdetail());
        ds_cfg_free(&config_table);
        return 1;
    }
    struct ds_events_pub_opts po = {
        .endpoint = cfg.endpoint,
        .ipc_mode = (int)strtol(cfg.socket_mode, NULL, 8),
        .sndhwm = cfg.sndhwm,
        .curve_secret_key_file = cfg.curve_secret_key_file,
        .curve_allow_file = cfg.curve_allow_file,
    };
    if ((r = ds_events_pub_open(&po, &d.pub)) < 0) {
        ds_log(DS_LOG_CRIT, "%s", ds_errdetail());
        ds_cfg_free(&config_table);
        return r == -DS_ECONFIG ? EXIT_CONFIG : 1;
    }
    ds_log(DS_LOG_INFO, "dsparkd %s starting on '%s', events on '%s'%s", PACKAGE_VERSION, d.host,
           ds_events_pub_endpoint(d.pub), *cfg.curve_secret_key_file ? " (CURVE)" : "");
    d.start_ts = ds_wire_now();
    if (*cfg.metrics_listen) {
        if ((r = metrics_new(cfg.metrics_listen, render_metrics, &d, &d.metrics)) < 0) {
            int code = r == -DS_ECONFIG ? EXIT_CONFIG : 1;
            ds_log(DS_LOG_CRIT, "%s", ds_errdetail());
            ds_events_pub_close(d.pub);
            ds_cfg_free(&config_table);
            return code;
        }
        ds_log(DS_LOG_INFO, "metrics on '%s' (GET /metrics)", cfg.metrics_listen);
    }
    d.fanout = fanout_new(&cfg, d.pub);
    fanout_set_done(d.fanout, pass_done, &d);
    d.sup = supervisor_new(&cfg, d.host);

    int code = run(&d);

    ds_log(DS_LOG_INFO, "dsparkd stopped (%" PRIu64 " events published)", fanout_published(d.fanout));
    supervisor_free(d.sup);
    fanout_free(d.fanout);
    metrics_free(d.metrics);
    ds_events_pub_close(d.pub);
    close(d.sigfd);
    ds_cfg_free(&config_table);
    return code;
}
