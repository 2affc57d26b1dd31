/* main.c: dspark-worker, one device's job runner.
 *
 * Two threads. The decoding thread (this file) owns the engine: it takes
 * claimed jobs, tokenizes and submits them, runs ds_engine_step rounds, turns
 * finished sequences into finish_jobs items, and after every round reports
 * its free room (KV tokens, job slots) to the database thread. The database
 * thread (dbthread.c) owns the connection and does every database call:
 * claims, write-backs, heartbeats, hand-backs. They meet in struct wshared
 * under one mutex (an eventfd wakes the database thread, a condition variable
 * the decoding thread when it is idle), so a slow or unreachable database
 * never stalls a decoding round.
 *
 * Start-up: a short-lived thread connects and announces the worker as
 * starting (again every --heartbeat seconds) while this one loads the models and measures
 * SPS(B) or loads it (--sps); then connect (with retries) if that thread
 * could not, check the schema version (exit 78 on a mismatch; the announcing
 * thread checks it too), register in dspark.workers, say READY on
 * $DSPARK_READY_FD. SIGTERM/SIGINT: stop
 * claiming, let the jobs in flight finish for --drain-timeout seconds, hand
 * the rest back with dspark.release_jobs() (not counted against their
 * max_attempts), write what is left, exit 0. A second signal hands back at
 * once. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "dspark/ds-db.h"
#include "dspark/ds-draft.h"
#include "dspark/ds-cuda.h"
#include "dspark/ds-engine.h"
#include "dspark/ds-gemm.h"
#include "dspark/ds-log.h"
#include "dspark/ds-model.h"
#include "dspark/ds-notify.h"
#include "dspark/ds-safetensors.h"
#include "dspark/ds-sched.h"
#include "worker.h"

#define EXIT_CONFIG 78
#define SPS_CONTEXT 128

static volatile sig_atomic_t got_term;

static void on_term(int sig)
{
    (void)sig;
    got_term++;
}

/* ---- the pipe to dsparkd ---- */
static int ready_fd = -1;

static void proto_line(const char *fmt, ...) DS_PRINTF(1, 2);
static void proto_line(const char *fmt, ...)
{
    if (ready_fd < 0)
        return;
    char buf[201];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    if (write(ready_fd, buf, (size_t)n) < 0 && errno != EAGAIN && errno != EINTR) {
        wlog(DS_LOG_WARNING, 0, "dsparkd's pipe is gone (%s); going on without it", strerror(errno));
        close(ready_fd);
        ready_fd = -1;
    }
}

static void ready_fd_open(void)
{
    const char *s = getenv("DSPARK_READY_FD");
    if (!s || !*s)
        return;
    char *end;
    long fd = strtol(s, &end, 10);
    if (*end || fd < 0 || fd > INT_MAX || fcntl((int)fd, F_GETFD) < 0) {
        wlog(DS_LOG_WARNING, 0, "DSPARK_READY_FD='%s' is not an open descriptor; ignoring it", s);
        return;
    }
    ready_fd = (int)fd;
    fcntl(ready_fd, F_SETFD, FD_CLOEXEC);
    fcntl(ready_fd, F_SETFL, fcntl(ready_fd, F_GETFL) | O_NONBLOCK);
}

/* ---- options ---- */
static void usage(FILE *f)
{
    fprintf(f,
            "usage: dspark-worker --target DIR [--draft DIR] [OPTION]...\n"
            "\n"
            "Claim dspark generation jobs from PostgreSQL and run them on one device with\n"
            "DSpark speculative decoding; write outputs and statistics back.\n"
            "\n"
            "models:\n"
            "  --target DIR              Hugging Face Qwen3 model directory\n"
            "  --draft DIR               DSpark (or DFlash) draft checkpoint directory\n"
            "  --model-name NAME         the model name jobs ask for (default: the target\n"
            "                            directory's name)\n"
            "  --spec MODE               speculation for jobs that name none: dspark,\n"
            "                            dspark-async, fixed:N, threshold:X, none (default:\n"
            "                            dspark with a draft, else none)\n"
            "  --sps FILE                step-time profile SPS(B): loaded when FILE exists,\n"
            "                            else measured and written there\n"
            "engine:\n"
            "  --backend auto|cpu|cuda   compute backend (default auto: cuda where a GPU exists)\n"
            "  --device N                device index\n"
            "  --threads N               CPU threads, up to 256 (default: all, at most 256)\n"
            "  --max-batch N             sequences decoded together (default 64)\n"
            "  --concurrency N           jobs held at once (default: max-batch + a quarter)\n"
            "  --kv-tokens N             KV-cache capacity in tokens (default: room for\n"
            "                            max-batch sequences of the full context, at most\n"
            "                            a quarter of RAM (cpu) or the --gpu-memory share)\n"
            "  --max-context N           context length (default: the model's)\n"
            "  --gpu-memory PERCENT      cuda: share of the free GPU memory the KV cache may\n"
            "                            take after the weights and activations (default 85)\n"
            "  --gemm-ranges N           cuda: split the products' k (target and draft) into at\n"
            "                            most N ranges (default 0: as many as one row needs\n"
            "                            to fill the GPU; 4 is faster for speculation and\n"
            "                            batches of 4 sequences or more)\n"
            "queue:\n"
            "  --dsn CONNINFO            database (default: $DSPARK_DSN, else PG* variables)\n"
            "  --worker-id ID            default: $DSPARK_WORKER_ID, else HOST/PID\n"
            "  --lease S                 lease of a claimed job in seconds (default 30)\n"
            "  --heartbeat S             seconds between heartbeats (default: lease / 3, at\n"
            "                            most 5)\n"
            "  --poll-interval S         seconds between claims while the queue looks empty\n"
            "                            (default 1; new jobs also wake the worker at once)\n"
            "  --unknown-model-timeout S fail due jobs of models that no worker serves after\n"
            "                            S seconds (default 60; 0 = never)\n"
            "  --drain-timeout S         on SIGTERM, seconds to finish jobs in flight before\n"
            "                            handing the rest back (default 60)\n"
            "  --db-timeout S            statement_timeout of the worker's session where the\n"
            "                            server, role or DSN sets none (default 20); a\n"
            "                            statement unanswered 10 s past the session's\n"
            "                            statement_timeout gives the connection up\n"
            "  --once                    exit when the queue has no job for this worker\n"
            "other:\n"
            "  --log-level LEVEL         debug, info (default), notice, warning, error\n"
            "  -h, --help                this help\n"
            "      --version             print the version\n"
            "\n"
            "Exit status: 0 stopped cleanly, 78 configuration error (bad option, model\n"
            "directory, or database schema), 1 other failure. See dspark-worker(8).\n");
}

static void die_config(const char *fmt, ...) DS_PRINTF(1, 2);
static void die_config(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    ds_log(DS_LOG_ERR, "%s", buf);
    exit(EXIT_CONFIG);
}

static long opt_long(const char *opt, const char *v, long lo, long hi)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi)
        die_config("option %s: expected an integer between %ld and %ld, got '%s'", opt, lo, hi, v);
    return x;
}

static double opt_double(const char *opt, const char *v, double lo, double hi)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !(x >= lo && x <= hi))
        die_config("option %s: expected a number between %g and %g, got '%s'", opt, lo, hi, v);
    return x;
}

static void parse_options(int argc, char **argv, struct wopts *o)
{
    enum { O_DSN = 256, O_TARGET, O_DRAFT, O_SPEC, O_BACKEND, O_DEVICE, O_THREADS, O_MAX_BATCH, O_CONC, O_KV,
           O_MAXCTX, O_DRAIN, O_DBTIMEOUT, O_WID, O_LEASE, O_HB, O_POLL, O_UNKNOWN, O_SPS, O_MODEL_NAME, O_ONCE,
           O_LOG, O_VERSION, O_GPU_MEM, O_GEMM_RANGES };
    static const struct option longopts[] = {
        {"dsn", required_argument, NULL, O_DSN}, {"target", required_argument, NULL, O_TARGET},
        {"draft", required_argument, NULL, O_DRAFT}, {"spec", required_argument, NULL, O_SPEC},
        {"backend", required_argument, NULL, O_BACKEND}, {"device", required_argument, NULL, O_DEVICE},
        {"threads", required_argument, NULL, O_THREADS}, {"max-batch", required_argument, NULL, O_MAX_BATCH},
        {"concurrency", required_argument, NULL, O_CONC}, {"kv-tokens", required_argument, NULL, O_KV},
        {"max-context", required_argument, NULL, O_MAXCTX}, {"drain-timeout", required_argument, NULL, O_DRAIN},
        {"db-timeout", required_argument, NULL, O_DBTIMEOUT},
        {"worker-id", required_argument, NULL, O_WID}, {"lease", required_argument, NULL, O_LEASE},
        {"heartbeat", required_argument, NULL, O_HB}, {"poll-interval", required_argument, NULL, O_POLL},
        {"unknown-model-timeout", required_argument, NULL, O_UNKNOWN}, {"sps", required_argument, NULL, O_SPS},
        {"model-name", required_argument, NULL, O_MODEL_NAME}, {"once", no_argument, NULL, O_ONCE},
        {"log-level", required_argument, NULL, O_LOG}, {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, O_VERSION}, {"gpu-memory", required_argument, NULL, O_GPU_MEM},
        {"gemm-ranges", required_argument, NULL, O_GEMM_RANGES}, {NULL, 0, NULL, 0},
    };
    *o = (struct wopts){.backend = "auto", .device = -1, .drain_timeout = 60, .db_timeout = 20, .lease = 30,
                        .heartbeat = 0, .poll = 1, .unknown_model_timeout = 60, .log_level = DS_LOG_INFO};
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case O_DSN: o->dsn = optarg; break;
        case O_TARGET: o->target_dir = optarg; break;
        case O_DRAFT: o->draft_dir = optarg; break;
        case O_SPEC: o->spec = optarg; break;
        case O_BACKEND: o->backend = optarg; break;
        case O_DEVICE: o->device = (int)opt_long("--device", optarg, 0, 1 << 20); break;
        case O_THREADS: o->threads = (int)opt_long("--threads", optarg, 0, DS_POOL_MAX_THREADS); break;
        case O_MAX_BATCH: o->max_batch = (int)opt_long("--max-batch", optarg, 1, 65536); break;
        case O_CONC: o->concurrency = (int)opt_long("--concurrency", optarg, 1, 1 << 20); break;
        case O_KV: o->kv_tokens = opt_long("--kv-tokens", optarg, 1, 2000000000L); break;
        case O_GPU_MEM: o->gpu_memory = opt_long("--gpu-memory", optarg, 5, 95) / 100.0; break;
        case O_GEMM_RANGES: o->gemm_ranges = (int)opt_long("--gemm-ranges", optarg, 0, 64); break;
        case O_MAXCTX: o->max_context = (int)opt_long("--max-context", optarg, 1, 1 << 24); break;
        case O_DRAIN: o->drain_timeout = opt_double("--drain-timeout", optarg, 0, 86400 * 7); break;
        case O_DBTIMEOUT: o->db_timeout = opt_double("--db-timeout", optarg, 0.001, 86400); break;
        case O_WID: o->worker_id = optarg; break;
        case O_LEASE: o->lease = opt_double("--lease", optarg, 1, 86400); break;
        case O_HB: o->heartbeat = opt_double("--heartbeat", optarg, 0.05, 86400); break;
        case O_POLL: o->poll = opt_double("--poll-interval", optarg, 0.01, 3600); break;
        case O_UNKNOWN: o->unknown_model_timeout = opt_double("--unknown-model-timeout", optarg, 0, 86400 * 365); break;
        case O_SPS: o->sps_file = optarg; break;
        case O_MODEL_NAME: o->model_name = optarg; break;
        case O_ONCE: o->once = true; break;
        case O_LOG:
            if (ds_log_parse_level(optarg, &o->log_level) < 0)
                die_config("option --log-level: %s", ds_errdetail());
            break;
        case 'h': usage(stdout); exit(0);
        case O_VERSION: printf("dspark-worker %s\n", PACKAGE_VERSION); exit(0);
        default:
            die_config("unknown or incomplete option '%s' (see dspark-worker --help)", argv[optind - 1]);
        }
    }
    if (optind < argc)
        die_config("unexpected argument '%s' (see dspark-worker --help)", argv[optind]);
    if (!o->target_dir)
        die_config("no target model: give --target DIR (see dspark-worker --help)");
    if (o->max_batch == 0)
        o->max_batch = 64;
    if (o->concurrency == 0)
        o->concurrency = o->max_batch + (o->max_batch + 3) / 4;
    if (o->heartbeat == 0)
        o->heartbeat = fmin(5.0, o->lease / 3);
    if (o->heartbeat >= o->lease)
        die_config("option --heartbeat (%g s) must be shorter than --lease (%g s)", o->heartbeat, o->lease);
    if (!o->dsn)
        o->dsn = getenv("DSPARK_DSN");
}

/* The last component of a directory path ("a/b/" -> "b"). */
static void base_name(const char *path, char *out, size_t cap)
{
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/')
        n--;
    size_t s = n;
    while (s > 0 && path[s - 1] != '/')
        s--;
    size_t len = n - s < cap - 1 ? n - s : cap - 1;
    memcpy(out, path + s, len);
    out[len] = 0;
}

static void sleep_s(double s)
{
    struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - floor(s)) * 1e9)};
    nanosleep(&ts, NULL);
}

/* How long past the session's statement_timeout a statement's answer may come before the connection is
 * given up (a server or pooler that stopped answering; see ds_db_set_timeouts). */
#define DB_ANSWER_GRACE_MS 10000

/* The database's warnings on the worker's connection, logged at warning level: a heartbeat that ended the
 * leases of jobs it did not name says so (sql/019). Its notices are not logged. (libpq calls this on the
 * thread that runs the statement; the receiver stays with the connection across its resets.) */
static void log_db_warning(void *arg, const PGresult *res)
{
    (void)arg;
    const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    if (!severity || strcmp(severity, "WARNING") != 0)
        return;
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    wlog(DS_LOG_WARNING, 0, "database: %s%s%s", msg ? msg : "(no message)", detail ? " " : "", detail ? detail : "");
}

/* One connection attempt: the connection, or NULL (the reason in ds_errdetail).
 * A schema this build does not know is a configuration error: logged, then
 * exit 78, or (bad_schema given) *bad_schema set for the caller to stop. */
static struct ds_db *try_connect_db(const struct wopts *o, bool *bad_schema)
{
    struct ds_db *db = NULL;
    int version = 0;
    if (ds_db_connect(o->dsn, "dspark-worker", &db) == 0 &&
        ds_db_set_timeouts(db, (int)ceil(o->db_timeout * 1000), DB_ANSWER_GRACE_MS) == 0 &&
        ds_db_schema_version(db, &version) == 0) {
        if (ds_db_check_schema(db) < 0) {
            ds_log(DS_LOG_ERR, "%s", ds_errdetail());
            ds_db_free(db);
            if (!bad_schema)
                exit(EXIT_CONFIG);
            *bad_schema = true;
            return NULL;
        }
        PQsetNoticeReceiver(ds_db_conn(db), log_db_warning, NULL);
        /* the heartbeats share the connection: one statement that waits out statement_timeout holds them off */
        double st = ds_db_statement_timeout_ms(db) / 1000.0;
        static bool warned;
        if (!warned && st + o->heartbeat >= o->lease) {
            ds_log(DS_LOG_WARNING,
                   "the session's statement_timeout (%g s) and --heartbeat (%g s) reach --lease (%g s): a statement "
                   "that waits that long (a lock) holds off the heartbeats until the leases end, and the jobs may "
                   "run again elsewhere; give --lease more than their sum, or a shorter --db-timeout",
                   st, o->heartbeat, o->lease);
            warned = true;
        }
        return db;
    }
    ds_db_free(db);
    return NULL;
}

/* Connect, retrying with back-off while the server is unreachable; exit 78
 * when the schema version is not this build's. Returns NULL on a signal. */
static struct ds_db *connect_db(const struct wopts *o)
{
    double delay = 0.1;
    for (int attempt = 0;; attempt++) {
        struct ds_db *db = try_connect_db(o, NULL);
        if (db)
            return db;
        if (attempt == 0 || attempt % 20 == 0)
            wlog(DS_LOG_WARNING, 0, "%s; retrying", ds_errdetail());
        if (got_term)
            return NULL;
        sleep_s(delay);
        delay = fmin(delay * 2, 5);
    }
}

/* ---- while loading: the worker's row says 'starting' ----
 * A thread of its own connects (retrying every LOADING_RETRY_S while the
 * database does not answer), calls dspark.worker_starting(), and calls it
 * again every --heartbeat seconds, while the decoding thread loads the models and
 * measures the step-time profile. So the reaper does not call a worker that
 * loads for minutes lost, and the unknown-model sweep counts its model as
 * served. The thread owns w->db until loading_beat_stop(). */
#define LOADING_RETRY_S 2.0

struct loading_beat {
    struct wctx *w;
    const struct wopts *o;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    bool running;
    bool bad_schema;              /* the database's schema is not this build's: the worker exits 78 */
    bool id_taken;                /* a live worker on another host holds this worker id: the worker exits 1 */
};

/* The database refused this worker id: a live worker on another host holds it
 * (dspark.worker_starting and register_worker, SQLSTATE 55006, object_in_use).
 * Two hosts configured with one id would otherwise share one row and end each
 * other's leases; this one stops, and its supervisor retries later. */
static bool id_refused(struct wctx *w)
{
    if (strcmp(ds_db_sqlstate(w->db), "55006") != 0)
        return false;
    wlog(DS_LOG_ERR, 0, "%s: give each worker its own --worker-id (or $DSPARK_WORKER_ID); not starting",
         ds_errdetail());
    return true;
}

static int announce_starting(struct wctx *w, const struct wopts *o)
{
    char pid[16], live[32];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    snprintf(live, sizeof live, "%g", o->lease);
    const char *params[7] = {w->id.worker_id, w->id.host, pid, w->id.device, w->id.model, live, w->id.instance};
    return ds_db_command(w->db, "SELECT dspark.worker_starting($1, $2, $3::int, $4, $5, $6::float8, $7)", 7,
                         params);
}

static void *loading_beat_main(void *arg)
{
    struct loading_beat *b = arg;
    struct wctx *w = b->w;
    bool warned = false;
    double wait_s = 0;
    pthread_mutex_lock(&b->mu);
    while (!b->stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        double whole = floor(wait_s);
        until.tv_sec += (time_t)whole;
        until.tv_nsec += (long)((wait_s - whole) * 1e9);
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        int r = 0;
        while (!b->stop && r != ETIMEDOUT)
            r = pthread_cond_timedwait(&b->cv, &b->mu, &until);
        if (b->stop)
            break;
        pthread_mutex_unlock(&b->mu);
        if (!w->db)
            w->db = try_connect_db(b->o, &b->bad_schema);
        if (b->bad_schema) {
            pthread_mutex_lock(&b->mu);
            break;   /* the decoding thread exits once it stops this thread */
        }
        int announced = -1;
        if (w->db && ds_db_ensure(w->db, 0) >= 0)
            announced = announce_starting(w, b->o);
        if (announced < 0 && w->db && id_refused(w)) {
            pthread_mutex_lock(&b->mu);
            b->id_taken = true;
            break;   /* as for a bad schema */
        }
        if (announced == 0) {
            warned = false;
            wait_s = b->o->heartbeat;
        } else {
            if (!warned)
                wlog(DS_LOG_WARNING, 0, "could not announce the worker as starting (%s); retrying while it loads",
                     ds_errdetail());
            warned = true;
            wait_s = LOADING_RETRY_S;
        }
        pthread_mutex_lock(&b->mu);
    }
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

static void loading_beat_start(struct loading_beat *b, struct wctx *w, const struct wopts *o)
{
    *b = (struct loading_beat){.w = w, .o = o};
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
    b->running = pthread_create(&b->thread, NULL, loading_beat_main, b) == 0;
    if (!b->running) {
        wlog(DS_LOG_WARNING, 0, "could not start the thread that announces the worker while it loads");
        pthread_cond_destroy(&b->cv);
        pthread_mutex_destroy(&b->mu);
    }
}

/* Stop the thread (after its current call); w->db is the decoding thread's again. */
static void loading_beat_stop(struct loading_beat *b)
{
    if (!b->running)
        return;
    pthread_mutex_lock(&b->mu);
    b->stop = true;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
    pthread_join(b->thread, NULL);
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    b->running = false;
}

/* Has the database refused this worker while it loads (a schema this build does
 * not know, or its id in use elsewhere)? Then the thread is stopped, so that the
 * worker exits before it spends minutes loading. */
static bool loading_refused(struct loading_beat *b)
{
    if (!b->running)
        return false;
    pthread_mutex_lock(&b->mu);
    bool refused = b->bad_schema || b->id_taken;
    pthread_mutex_unlock(&b->mu);
    if (refused)
        loading_beat_stop(b);
    return refused;
}

/* (context: the one it was measured at; 0 when read from a file: null) */
static json_t *sps_json(const struct ds_sps *t, int context)
{
    json_t *o = json_object(), *b = json_array(), *s = json_array();
    for (int i = 0; t && i < t->n; i++) {
        json_array_append_new(b, json_integer(t->b[i]));
        json_array_append_new(s, json_real(t->sps[i]));
    }
    json_object_set_new(o, "format", json_integer(1));
    json_object_set_new(o, "context", context > 0 ? json_integer(context) : json_null());
    json_object_set_new(o, "tokens", b);
    json_object_set_new(o, "steps_per_s", s);
    return o;
}

int wregister_row(struct wctx *w, struct ds_db *db)
{
    char pid[16], live[32];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    snprintf(live, sizeof live, "%g", w->o.lease);
    const char *params[11] = {w->id.worker_id, w->id.host, pid, w->id.device, w->id.model,
                              w->id.draft[0] ? w->id.draft : NULL, w->id.model_checksum,
                              w->id.draft[0] ? w->id.draft_checksum : NULL, w->sps_text, live, w->id.instance};
    return ds_db_command(db,
                         "SELECT dspark.register_worker($1, $2, $3::int, $4, $5, $6, $7, $8, $9::jsonb, $10::float8, $11)",
                         11, params);
}

/* Register (upsert) the worker row with its step-time profile; retries while the connection is down. */
static int register_worker(struct wctx *w, const struct ds_sps *sps, int sps_context)
{
    json_t *j = sps ? sps_json(sps, sps_context) : NULL;
    free(w->sps_text);
    w->sps_text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    int r;
    while ((r = wregister_row(w, w->db)) < 0) {
        if (ds_db_ok(w->db) || got_term)
            break;
        wlog(DS_LOG_WARNING, 0, "could not register: %s; retrying", ds_errdetail());
        if (ds_db_ensure(w->db, 5000) < 0)
            continue;
    }
    return r;
}

/* ---- the decoding loop ---- */
struct loop {
    struct wctx *w;
    struct ds_model *model;
    struct ds_engine *engine;
    struct wjob *active;          /* jobs in the engine */
    int n_active;
    json_t *results;              /* items finished in this turn */
    long tokens_out;              /* output tokens since the last STATUS */
    bool taken_over;              /* run_loop stopped: another process holds the worker id */
};

static void add_result(struct loop *L, json_t *item)
{
    json_array_append_new(L->results, item);
}

static void fail_job(struct loop *L, struct wjob *j, const char *why)
{
    wlog(DS_LOG_NOTICE, j->id, "failed: %s", why);
    add_result(L, wfailed_json(&L->w->id, j, why));
    wjob_free(j);
}

static void submit_job(struct loop *L, struct wjob *j)
{
    int32_t *ids = NULL;
    int n = 0;
    if (wjob_tokenize(L->model, L->w->id.model, j, &ids, &n) < 0) {
        fail_job(L, j, ds_errdetail());
        return;
    }
    j->n_prompt = n;
    struct ds_request req = {.prompt = ids, .n_prompt = n, .user = j};
    struct wreq_keep keep;
    int r = wjob_request(j, &req, &keep);
    if (r == 0)
        r = ds_engine_submit(L->engine, &req, &j->engine_id);
    wreq_keep_done(&keep);
    free(ids);
    if (r < 0) {
        fail_job(L, j, ds_errdetail());
        return;
    }
    j->t_submit = wnow();
    j->next = L->active;
    L->active = j;
    L->n_active++;
}

static struct wjob *unlink_active(struct loop *L, struct wjob *j)
{
    for (struct wjob **p = &L->active; *p; p = &(*p)->next)
        if (*p == j) {
            *p = j->next;
            L->n_active--;
            return j;
        }
    return NULL;
}

static void collect(struct loop *L)
{
    struct ds_result *fin[64];
    int nf;
    while ((nf = ds_engine_take_finished(L->engine, fin, 64)) > 0) {
        for (int i = 0; i < nf; i++) {
            struct ds_result *r = fin[i];
            struct wjob *j = r->user;
            unlink_active(L, j);
            json_t *item = wresult_json(&L->w->id, j, r, j->t_submit - j->t_claimed);
            const char *state = json_string_value(json_object_get(item, "state"));
            if (strcmp(state, "failed") == 0)
                wlog(DS_LOG_NOTICE, j->id, "failed: %s", r->error_detail);
            else
                wlog(DS_LOG_DEBUG, j->id, "%s: %d tokens, finish reason '%s', %.2f s", state, r->n_ids,
                     r->finish_reason, r->stats.e2e_latency_s);
            L->tokens_out += r->n_ids;
            add_result(L, item);
            ds_result_free(r);
            wjob_free(j);
        }
    }
}

/* Put a job on the hand-back list (dspark.release_jobs) and free it. The
 * caller holds the mutex. */
static void hand_back_locked(struct loop *L, struct wjob *j, const char *why)
{
    struct wshared *sh = &L->w->sh;
    if (sh->n_rel == sh->cap_rel) {
        sh->cap_rel = sh->cap_rel ? 2 * sh->cap_rel : 64;
        sh->rel_ids = ds_xrealloc(sh->rel_ids, (size_t)sh->cap_rel * sizeof *sh->rel_ids);
        sh->rel_attempts = ds_xrealloc(sh->rel_attempts, (size_t)sh->cap_rel * sizeof *sh->rel_attempts);
    }
    sh->rel_ids[sh->n_rel] = j->id;
    sh->rel_attempts[sh->n_rel++] = j->attempt;
    wlog(DS_LOG_INFO, j->id, "handing back: %s", why);
    wjob_free(j);
}

static void hand_back(struct loop *L, struct wjob *j, const char *why)
{
    pthread_mutex_lock(&L->w->sh.mu);
    hand_back_locked(L, j, why);
    pthread_mutex_unlock(&L->w->sh.mu);
}

/* Hand back every job still in the engine, in one release call (they stay in
 * the engine until it is freed). */
static void hand_back_all(struct loop *L, const char *why)
{
    pthread_mutex_lock(&L->w->sh.mu);
    for (struct wjob *j = L->active, *next; j; j = next) {
        next = j->next;
        hand_back_locked(L, j, why);
    }
    pthread_mutex_unlock(&L->w->sh.mu);
    L->active = NULL;
    L->n_active = 0;
}

static int run_loop(struct loop *L)
{
    struct wctx *w = L->w;
    struct wshared *sh = &w->sh;
    uint64_t consumed = 0;
    bool draining = false;
    double drain_deadline = 0, last_wd = 0, last_status = wnow() - 4; /* the first STATUS after a second, then every 5 s */
    int rc = 0, term_seen = 0;
    for (;;) {
        /* what the database thread delivered */
        pthread_mutex_lock(&sh->mu);
        struct wjob *jobs = sh->inbox;
        sh->inbox = NULL;
        sh->inbox_tail = &sh->inbox;
        int n_stop = sh->n_stop;
        struct wclaim *stops = n_stop ? ds_xmalloc((size_t)n_stop * sizeof *stops) : NULL;
        if (n_stop)
            memcpy(stops, sh->stops, (size_t)n_stop * sizeof *stops);
        sh->n_stop = 0;
        bool queue_empty = sh->queue_empty, db_up = sh->db_up, taken_over = sh->taken_over;
        pthread_mutex_unlock(&sh->mu);

        if (taken_over) {
            /* another process holds this worker id: the jobs in flight go back
             * to the queue (release_jobs is fenced by attempt), and the worker
             * exits 1 like one refused its id at start */
            for (struct wjob *j = jobs, *next; j; j = next) {
                next = j->next;
                j->next = NULL;
                consumed++;
                hand_back(L, j, "the worker id was taken over");
            }
            free(stops);
            collect(L);
            hand_back_all(L, "the worker id was taken over");
            L->taken_over = true;
            return 1;
        }

        if (got_term != term_seen) {
            /* a second signal (also two before this turn saw the first) hands back at once */
            bool again = draining || got_term - term_seen > 1;
            term_seen = got_term;
            if (!draining) {
                draining = true;
                drain_deadline = wnow() + w->o.drain_timeout;
                wlog(DS_LOG_INFO, 0, "draining: %d jobs in flight, %g s to finish them", L->n_active,
                     w->o.drain_timeout);
                pthread_mutex_lock(&sh->mu);
                sh->draining = true;
                pthread_mutex_unlock(&sh->mu);
                wdb_wake(w);
            }
            if (again) {
                wlog(DS_LOG_INFO, 0, "signal received again: handing back the jobs in flight now");
                drain_deadline = 0;
            }
        }

        for (struct wjob *j = jobs, *next; j; j = next) {
            next = j->next;
            j->next = NULL;
            consumed++;
            if (draining) {
                hand_back(L, j, "claimed as the drain began");
                continue;
            }
            submit_job(L, j);
        }
        for (int i = 0; i < n_stop; i++)
            for (struct wjob *j = L->active; j; j = j->next)
                if (j->id == stops[i].id && j->attempt == stops[i].attempt) {
                    wlog(DS_LOG_INFO, j->id, "stopping attempt %d: cancellation requested, or the job is no longer ours",
                         j->attempt);
                    if (ds_engine_cancel(L->engine, j->engine_id) < 0)
                        wlog(DS_LOG_WARNING, j->id, "could not stop it: %s", ds_errdetail());
                }
        free(stops);

        if (draining && wnow() >= drain_deadline && L->n_active > 0) {
            collect(L);
            hand_back_all(L, "not finished within the drain timeout");
        }
        if (ds_engine_active(L->engine) > 0 && L->n_active > 0) {
            if (ds_engine_step(L->engine) < 0) {
                /* no hand-back: the leases expire and the reaper counts the
                 * attempt, so a job that breaks the engine fails after
                 * max_attempts instead of breaking every worker */
                wlog(DS_LOG_ERR, 0, "decoding round failed: %s; stopping with %d jobs in flight", ds_errdetail(),
                     L->n_active);
                rc = 1;
            }
            collect(L);
        }

        /* hand over results and the room left */
        long free_tok = ds_engine_free_tokens(L->engine);
        int slots = w->o.concurrency - L->n_active;
        if (slots < 0)
            slots = 0;
        bool idle = L->n_active == 0;
        pthread_mutex_lock(&sh->mu);
        if (json_array_size(L->results) > 0) {
            json_array_extend(sh->results, L->results);
            json_array_clear(L->results);
        }
        sh->cap_budget = free_tok > 0 ? free_tok : 0;   /* each job claimed costs w->job_tokens too (claim_jobs) */
        sh->cap_slots = slots;
        sh->cap_idle = idle;
        sh->cap_consumed = consumed;
        pthread_mutex_unlock(&sh->mu);
        wdb_wake(w);

        double now = wnow();
        if (now - last_wd >= 0.25) {
            proto_line("WATCHDOG");
            last_wd = now;
        }
        if (now - last_status >= 5) {
            proto_line("STATUS %d running, %.0f tok/s in jobs finished in the last %.0f s%s%s", L->n_active,
                       L->tokens_out / (now - last_status), now - last_status,
                       db_up ? "" : ", database unreachable", draining ? ", draining" : "");
            L->tokens_out = 0;
            last_status = now;
        }

        if (rc != 0)
            break;
        if (draining && L->n_active == 0)
            break;
        if (w->o.once && idle && queue_empty && !draining) {
            wlog(DS_LOG_INFO, 0, "the queue has no job for this worker: exiting (--once)");
            break;
        }
        if (idle) {
            pthread_mutex_lock(&sh->mu);
            if (!sh->inbox && sh->n_stop == 0 && got_term == term_seen && !(w->o.once && sh->queue_empty)) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 250 * 1000000L;
                if (ts.tv_nsec >= 1000000000L)
                    ts.tv_sec++, ts.tv_nsec -= 1000000000L;
                pthread_cond_timedwait(&sh->main_cv, &sh->mu, &ts);
            }
            pthread_mutex_unlock(&sh->mu);
        }
    }
    return rc;
}

int main(int argc, char **argv)
{
    struct wctx *w = ds_xcalloc(1, sizeof *w);
    ds_log_init("dspark-worker", DS_LOG_INFO, DS_LOG_TARGET_AUTO);
    parse_options(argc, argv, &w->o);
    struct wopts *o = &w->o;
    ds_log_set_level(o->log_level);

    /* identity */
    char host[256] = "localhost";
    if (gethostname(host, sizeof host - 1) < 0)
        snprintf(host, sizeof host, "localhost");
    snprintf(w->id.host, sizeof w->id.host, "%s", host);
    ds_random_hex(w->id.instance, 16);   /* which process holds the worker row */
    const char *wid = o->worker_id ? o->worker_id : getenv("DSPARK_WORKER_ID");
    if (wid && *wid)
        snprintf(w->id.worker_id, sizeof w->id.worker_id, "%s", wid);
    else
        snprintf(w->id.worker_id, sizeof w->id.worker_id, "%.200s/%d", host, (int)getpid());
    wlog_worker_id = w->id.worker_id;

    enum ds_backend backend;
    if (ds_backend_parse(o->backend, &backend) < 0)
        die_config("option --backend: %s", ds_errdetail());
    int device = o->device >= 0 ? o->device : 0;
    if (backend == DS_BACKEND_CUDA && !ds_cuda_available()) {
        char why[256];
        ds_cuda_describe(device, why, sizeof why);
        die_config("backend 'cuda': %s; use --backend cpu", why);
    }
    if (backend == DS_BACKEND_CUDA)
        snprintf(w->id.device, sizeof w->id.device, "cuda:%d", device);
    else if (o->device >= 0)
        snprintf(w->id.device, sizeof w->id.device, "cpu:%d", o->device);
    else
        snprintf(w->id.device, sizeof w->id.device, "cpu");

    struct ds_spec_mode spec = {.kind = o->draft_dir ? DS_SPEC_DSPARK : DS_SPEC_NONE};
    if (o->spec && ds_spec_mode_parse(o->spec, &spec) < 0)
        die_config("option --spec: %s", ds_errdetail());

    struct sigaction sa = {.sa_handler = on_term};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    ready_fd_open();

    if (o->model_name)
        snprintf(w->id.model, sizeof w->id.model, "%s", o->model_name);
    else
        base_name(o->target_dir, w->id.model, sizeof w->id.model);
    if (!w->id.model[0] || strlen(w->id.model) > 256)
        die_config("model name '%s' must have 1 to 256 bytes (see --model-name)", w->id.model);

    struct loading_beat beat;
    loading_beat_start(&beat, w, o);

    /* models */
    double t0 = wnow();
    struct ds_model *model = NULL;
    struct ds_draft *draft = NULL;
    /* the GPU reads the layers from the checkpoint itself: the host keeps only what the draft shares */
    struct ds_model_opts mopts = {.load_tokenizer = true, .skip_layers = backend == DS_BACKEND_CUDA};
    if (ds_model_load(o->target_dir, &mopts, &model) < 0)
        die_config("could not load the target model: %s", ds_errdetail());
    if (loading_refused(&beat))
        return beat.bad_schema ? EXIT_CONFIG : 1;
    if (o->draft_dir && ds_draft_load(o->draft_dir, model, &draft) < 0)
        die_config("could not load the draft model: %s", ds_errdetail());
    snprintf(w->id.model_checksum, sizeof w->id.model_checksum, "%s", model->checksum);
    if (draft) {
        base_name(o->draft_dir, w->id.draft, sizeof w->id.draft);
        snprintf(w->id.draft_checksum, sizeof w->id.draft_checksum, "%s", ds_draft_checksum(draft));
    }

    struct ds_engine_opts eopts = {.backend = backend, .device = device, .cuda_graphs = true,
                                   .gpu_memory_fraction = o->gpu_memory, .gemm_ranges = o->gemm_ranges,
                                   .n_threads = o->threads, .max_seqs = o->max_batch, .max_context = o->max_context,
                                   .spec = spec};
    if (o->kv_tokens > 0)
        eopts.kv_pages = (int)((o->kv_tokens + 15) / 16);
    struct ds_engine *engine = NULL;
    if (ds_engine_new(model, draft, &eopts, &engine) < 0)
        die_config("could not create the engine: %s", ds_errdetail());
    w->job_tokens = (int)ds_engine_request_overhead(engine);
    if (loading_refused(&beat))
        return beat.bad_schema ? EXIT_CONFIG : 1;
    size_t released = ds_engine_release_draft_weights(engine);   /* the draft runs from its GPU copy */
    if (released > 0)
        wlog(DS_LOG_INFO, 0, "released %.0f MB of host memory held by the draft's weights (it runs on the GPU)",
             released / 1e6);
    wlog(DS_LOG_INFO, 0, "loaded model '%s' (%s)%s%s in %.2f s; %ld KV tokens, %d sequences per round, %s",
         w->id.model, w->id.model_checksum, draft ? " with draft " : " without a draft", draft ? w->id.draft : "",
         wnow() - t0, ds_engine_free_tokens(engine), o->max_batch, w->id.device);

    /* the step-time curve the dspark schedulers price verification with */
    int sps_context = 0;   /* (the context it was measured at; 0: read from a file) */
    if (draft) {
        struct ds_sps table;
        if (o->sps_file && access(o->sps_file, R_OK) == 0) {
            if (ds_sps_load(o->sps_file, &table) < 0 || ds_engine_set_sps(engine, &table) < 0)
                die_config("option --sps: %s", ds_errdetail());
            ds_sps_done(&table);
            wlog(DS_LOG_INFO, 0, "step-time profile loaded from '%s'", o->sps_file);
        } else {
            double tp = wnow();
            if ((sps_context = ds_engine_profile_sps(engine, SPS_CONTEXT, 3)) < 0) {
                wlog(DS_LOG_ERR, 0, "could not measure the step-time profile: %s", ds_errdetail());
                return 1;
            }
            wlog(DS_LOG_INFO, 0, "measured the step-time profile in %.1f s", wnow() - tp);
            if (o->sps_file && ds_sps_save(ds_engine_sps(engine), o->sps_file) < 0)
                wlog(DS_LOG_WARNING, 0, "could not save the step-time profile: %s", ds_errdetail());
        }
    }
    /* database (the announcing thread's connection, else connect now, with retries) */
    loading_beat_stop(&beat);
    if (beat.bad_schema)
        return EXIT_CONFIG;
    if (beat.id_taken)
        return 1;
    if (!w->db)
        w->db = connect_db(o);
    if (!w->db) {
        wlog(DS_LOG_INFO, 0, "stopped before connecting to the database");
        return 0;
    }
    if (register_worker(w, draft ? ds_engine_sps(engine) : NULL, sps_context) < 0) {
        if (got_term)
            return 0;
        if (id_refused(w))
            return 1;
        wlog(DS_LOG_ERR, 0, "could not register in dspark.workers: %s", ds_errdetail());
        return EXIT_CONFIG;
    }

    /* the database thread */
    struct wshared *sh = &w->sh;
    pthread_mutex_init(&sh->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_cond_init(&sh->main_cv, &ca);
    sh->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (sh->wake_fd < 0) {
        wlog(DS_LOG_ERR, 0, "eventfd: %s", strerror(errno));
        return 1;
    }
    sh->results = json_array();
    sh->inbox_tail = &sh->inbox;
    sh->db_up = true;
    /* signals go to the decoding thread */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    pthread_t dbt;
    if (wdb_start(w, &dbt) < 0) {
        wlog(DS_LOG_ERR, 0, "%s", ds_errdetail());
        return 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    char mode[64];
    ds_spec_mode_format(&spec, mode, sizeof mode);
    wlog(DS_LOG_INFO, 0, "ready: serving model '%s', default speculation '%s', %d jobs at once, lease %g s",
         w->id.model, mode, o->concurrency, o->lease);
    proto_line("READY");
    proto_line("STATUS ready, model %s", w->id.model);

    struct loop L = {.w = w, .model = model, .engine = engine, .results = json_array()};
    int rc = run_loop(&L);

    /* write what is left (results, hand-backs), then stop */
    pthread_mutex_lock(&sh->mu);
    if (json_array_size(L.results) > 0)
        json_array_extend(sh->results, L.results);
    sh->draining = true;
    sh->quit = true;
    sh->quit_deadline = wnow() + fmin(10.0, fmax(0.5, o->drain_timeout / 2));
    pthread_mutex_unlock(&sh->mu);
    wdb_wake(w);
    pthread_join(dbt, NULL);
    int unwritten = sh->unwritten;
    wlog(DS_LOG_INFO, 0, "stopped%s", L.taken_over ? ": the worker id is another process's now"
                                      : rc       ? " after an engine failure"
                                      : unwritten ? " (some results unwritten)"
                                                  : "");

    for (struct wjob *j = L.active, *next; j; j = next) {
        next = j->next;
        wjob_free(j);
    }
    json_decref(L.results);
    json_decref(sh->results);
    free(sh->rel_ids);
    free(sh->rel_attempts);
    free(sh->stops);
    close(sh->wake_fd);
    ds_db_free(w->db);
    ds_engine_free(engine);
    ds_draft_free(draft);
    ds_model_free(model);
    free(w->sps_text);
    free(w);
    return rc;
}
