/* db.c: libpq helpers for the service programs (see ds-db.h).
 *
 * Errors become -DS_EDB with the server's message, detail, hint and SQLSTATE
 * in ds_errdetail(). A broken connection is reset with exponential back-off
 * by ds_db_ensure(); the LISTEN channels are issued again afterwards. A
 * caller that must not wait for a connection (dsparkd's loop) has one made on
 * a thread of its own (ds_db_connect_start, ds_db_connect_poll), with the
 * session's first statements, and sends its statements without waiting for
 * their results (ds_db_send, ds_db_flush, ds_db_take_result). The
 * migrations are either the ones embedded at build time (sql-embed.c,
 * generated from sql/NNN-*.sql) or read from a directory. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dspark/ds-db.h"

/* Serialises concurrent migrations (pg_advisory_lock key, "dspkmig\0"). */
#define DS_DB_MIGRATE_LOCK "7234107125371546880"
#define DS_DB_BACKOFF_MIN_MS 100
#define DS_DB_BACKOFF_MAX_MS 5000
#define DS_DB_CONNECT_TIMEOUT_S "10"   /* seconds, as libpq's connect_timeout takes it */
#define DS_DB_MAX_LISTEN 8
#define DS_DB_PROBE_TIMEOUT_MS 10000   /* a probe's statement waits for its answer this long (ds_db_probe) */

struct ds_db {
    PGconn *conn;
    char sqlstate[6];
    char *listen[DS_DB_MAX_LISTEN]; /* channels to re-issue after a reset */
    int nlisten;
    bool need_session;              /* a reset succeeded but LISTEN or the session's timeout did not */
    int backoff_ms;                 /* next wait between reset attempts */
    int64_t next_try_ms;            /* monotonic time of the next attempt */
    unsigned reconnects;
    struct connect_job *job;        /* ds_db_connect_start's attempt, until ds_db_connect_poll takes it */
    int64_t deadline_ms;            /* ds_db_set_deadline's: blocking statements end by then (0: none) */
    int timeout_ms;                 /* ... set that long before it */
    int default_statement_ms;       /* ds_db_set_timeouts': statement_timeout for a session without one (0: none) */
    int grace_ms;                   /* ... and how long past the session's statement_timeout an answer may come */
    int statement_ms;               /* the session's statement_timeout (ms) once ds_db_set_timeouts read it */
    bool given_up;                  /* an answer did not come in time: the connection is of no more use */
    bool sent;                      /* a statement went by ds_db_send and its end was not taken yet */
    PGresult *held;                 /* ... its result, taken from libpq before the statement's end */
};

/* A connection attempt on a thread of its own (ds_db_connect_start): libpq's blocking connect with all
 * its rules (name lookups, connect_timeout for each host and address, on to the next one when it
 * passes, the checks of the conninfo) off the caller's loop, then the caller's setup statements on the
 * new connection. The thread writes a byte to the pipe when it is done. Whoever comes last frees the job: the thread when the attempt was abandoned (the ds_db
 * freed meanwhile), else ds_db_connect_poll or ds_db_free. */
struct connect_job {
    pthread_mutex_t lock;
    bool done, abandoned;           /* under lock */
    struct ds_db *db;               /* the connection made and set up, or NULL (then err and msg say why) */
    int err;
    char msg[512];
    int pipe_r, pipe_w;
    char *conninfo, *application_name;
    ds_db_setup_fn *setup;          /* run on the thread once connected (NULL: none) */
    char *setup_arg;
};

/* The embedded migrations (generated file). */
extern const struct ds_db_migration ds_db_embedded_migrations[];
extern const size_t ds_db_embedded_migrations_n;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    if (ms <= 0)
        return;
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Copy a libpq message without its trailing newline. */
static void chomp_copy(char *dst, size_t size, const char *src)
{
    snprintf(dst, size, "%s", src ? src : "");
    size_t n = strlen(dst);
    while (n > 0 && (dst[n - 1] == '\n' || dst[n - 1] == ' '))
        dst[--n] = 0;
}

static int conn_error(struct ds_db *db, const char *what)
{
    char msg[512];
    chomp_copy(msg, sizeof msg, db && db->conn ? PQerrorMessage(db->conn) : "no connection");
    if (db)
        snprintf(db->sqlstate, sizeof db->sqlstate, "%s", DS_DB_SQLSTATE_CONNECTION);
    return ds_seterr(DS_EDB, "%s: %s", what, msg[0] ? msg : "connection lost");
}

int ds_db_result_error(struct ds_db *db, const PGresult *res)
{
    if (!res)
        return conn_error(db, "query failed");
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    const char *hint = PQresultErrorField(res, PG_DIAG_MESSAGE_HINT);
    if (!state && !primary) {
        /* client-side failure (lost connection, out of memory) */
        if (db && PQstatus(db->conn) != CONNECTION_OK)
            return conn_error(db, "connection to the database lost");
        char msg[512];
        chomp_copy(msg, sizeof msg, PQresultErrorMessage(res));
        if (db)
            db->sqlstate[0] = 0;
        return ds_seterr(DS_EDB, "%s", msg[0] ? msg : "query failed");
    }
    if (db)
        snprintf(db->sqlstate, sizeof db->sqlstate, "%s", state ? state : "");
    char extra[600] = "";
    size_t len = 0;
    if (detail)
        len += (size_t)snprintf(extra + len, sizeof extra - len, ": %s", detail);
    if (hint && len < sizeof extra)
        snprintf(extra + len, sizeof extra - len, " (hint: %s)", hint);
    return ds_seterr(DS_EDB, "%s%s [SQLSTATE %s]", primary ? primary : "query failed", extra,
                     state ? state : "?????");
}

static void ignore_notice(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

/* Whether a connection service file will be read (PGSERVICE, or service= in
 * the conninfo): its settings fill only what is not set yet, so ours must
 * not be set before it. */
static bool uses_service(const char *conninfo)
{
    if (getenv("PGSERVICE"))
        return true;
    if (!conninfo || !*conninfo)
        return false;
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
    bool service = false;
    for (PQconninfoOption *o = opts; o && o->keyword; o++)
        if (strcmp(o->keyword, "service") == 0 && o->val && *o->val)
            service = true;
    PQconninfoFree(opts);
    return service;
}

/* The keywords and values every connection opens with (lists ending with NULL, at most 8 entries each):
 * a connection attempt gives up after DS_DB_CONNECT_TIMEOUT_S, and TCP keepalives (libpq turns them on)
 * probe an idle connection after 30 s instead of the kernel's two hours, so that a server that vanished
 * is noticed within a minute: libpq's own defaults wait for the kernel, and every caller retries anyway.
 * The conninfo (processed after these, so it wins), PGCONNECT_TIMEOUT, or a service file may say
 * otherwise. */
static void connect_params(const char *conninfo, const char *application_name, const char *k[8], const char *v[8])
{
    bool defaults = !uses_service(conninfo);
    const char *timeout = defaults && !getenv("PGCONNECT_TIMEOUT") ? DS_DB_CONNECT_TIMEOUT_S : NULL;
    const char *keys[] = { "connect_timeout", "keepalives_idle", "keepalives_interval", "keepalives_count",
                           "dbname", "fallback_application_name", "client_encoding", NULL };
    const char *vals[] = { timeout, defaults ? "30" : NULL, defaults ? "10" : NULL, defaults ? "3" : NULL,
                           conninfo && *conninfo ? conninfo : NULL,
                           application_name ? application_name : "dspark", "UTF8", NULL };
    /* libpq stops at the first NULL key, so absent values must not end the list */
    int n = 0;
    for (int i = 0; keys[i]; i++)
        if (vals[i]) {
            k[n] = keys[i];
            v[n++] = vals[i];
        }
    k[n] = v[n] = NULL;
}

static struct ds_db *db_new(PGconn *conn)
{
    struct ds_db *db = ds_xcalloc(1, sizeof *db);
    db->conn = conn;
    db->backoff_ms = DS_DB_BACKOFF_MIN_MS;
    return db;
}

/* libpq's blocking connect with connect_params' settings: the connection, or NULL with why in msg and
 * *err (DS_ENOMEM or DS_EDB). No ds_seterr: the connect thread calls it too. */
static PGconn *open_conn(const char *conninfo, const char *application_name, char *msg, size_t size, int *err)
{
    const char *k[8], *v[8];
    connect_params(conninfo, application_name, k, v);
    PGconn *conn = PQconnectdbParams(k, v, 1);
    if (!conn) {
        snprintf(msg, size, "could not allocate a database connection");
        *err = DS_ENOMEM;
        return NULL;
    }
    if (PQstatus(conn) != CONNECTION_OK) {
        chomp_copy(msg, size, PQerrorMessage(conn));
        PQfinish(conn);
        *err = DS_EDB;
        return NULL;
    }
    /* server notices (NOTICE, WARNING) are not errors; the service does not print them */
    PQsetNoticeProcessor(conn, ignore_notice, NULL);
    return conn;
}

int ds_db_connect(const char *conninfo, const char *application_name, struct ds_db **ret)
{
    char msg[512];
    int err;
    PGconn *conn = open_conn(conninfo, application_name, msg, sizeof msg, &err);
    if (!conn)
        return err == DS_ENOMEM ? ds_seterr(DS_ENOMEM, "%s", msg)
                                : ds_seterr(DS_EDB, "could not connect to the database: %s", msg);
    *ret = db_new(conn);
    return 0;
}

static void connect_job_free(struct connect_job *job)
{
    ds_db_free(job->db);
    close(job->pipe_r);
    close(job->pipe_w);
    pthread_mutex_destroy(&job->lock);
    free(job->conninfo);
    free(job->application_name);
    free(job->setup_arg);
    free(job);
}

static void *connect_thread(void *arg)
{
    struct connect_job *job = arg;
    char msg[400];
    PGconn *conn = open_conn(job->conninfo, job->application_name, msg, sizeof msg, &job->err);
    struct ds_db *db = NULL;
    if (!conn) {
        snprintf(job->msg, sizeof job->msg, "could not connect to the database: %s", msg);
    } else {
        db = db_new(conn);
        int r = job->setup ? job->setup(db, job->setup_arg) : 0;
        if (r < 0) {   /* (ds_errdetail is this thread's own) */
            job->err = -r;
            snprintf(job->msg, sizeof job->msg, "%s", ds_errdetail());
            db = ds_db_free(db);
        }
    }
    /* the thread's last touch of the job unless it was abandoned: once done is set, the caller may free it
     * (the write, into an empty non-blocking pipe, does not wait) */
    pthread_mutex_lock(&job->lock);
    job->db = db;
    bool abandoned = job->abandoned;
    if (!abandoned) {
        ssize_t w;
        do
            w = write(job->pipe_w, "", 1);
        while (w < 0 && errno == EINTR);
    }
    job->done = true;
    pthread_mutex_unlock(&job->lock);
    if (abandoned)
        connect_job_free(job);
    return NULL;
}

int ds_db_connect_start(const char *conninfo, const char *application_name, ds_db_setup_fn *setup,
                        const char *setup_arg, struct ds_db **ret)
{
    struct connect_job *job = ds_xcalloc(1, sizeof *job);
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0) {
        free(job);
        return ds_seterr(DS_EIO, "could not connect to the database: pipe: %s", strerror(errno));
    }
    job->pipe_r = fds[0];
    job->pipe_w = fds[1];
    pthread_mutex_init(&job->lock, NULL);
    job->conninfo = conninfo ? ds_xstrdup(conninfo) : NULL;
    job->application_name = application_name ? ds_xstrdup(application_name) : NULL;
    job->setup = setup;
    job->setup_arg = setup_arg ? ds_xstrdup(setup_arg) : NULL;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    int e = pthread_create(&thread, &attr, connect_thread, job);
    pthread_attr_destroy(&attr);
    if (e != 0) {
        connect_job_free(job);
        return ds_seterr(DS_EIO, "could not connect to the database: no thread for the attempt: %s", strerror(e));
    }
    struct ds_db *db = db_new(NULL);
    db->job = job;
    *ret = db;
    return 0;
}

int ds_db_connect_poll(struct ds_db *db, int *ret_fd, short *ret_events)
{
    struct connect_job *job = db->job;
    if (!job)
        return db->conn ? 1 : ds_seterr(DS_EDB, "could not connect to the database: no attempt under way");
    pthread_mutex_lock(&job->lock);
    bool done = job->done;
    pthread_mutex_unlock(&job->lock);
    if (!done) {
        *ret_fd = job->pipe_r;
        *ret_events = POLLIN;
        return 0;
    }
    /* the thread has let go of the job: the connection and what its setup did (its LISTENs) become db's */
    struct ds_db *got = job->db;
    job->db = NULL;
    char msg[sizeof job->msg];
    snprintf(msg, sizeof msg, "%s", job->msg);
    int err = job->err;
    connect_job_free(job);
    db->job = NULL;
    if (!got)
        return ds_seterr(err ? err : DS_EDB, "%s", msg);
    db->conn = got->conn;
    memcpy(db->listen, got->listen, sizeof db->listen);
    db->nlisten = got->nlisten;
    free(got);
    return 1;
}

struct ds_db *ds_db_free(struct ds_db *db)
{
    if (!db)
        return NULL;
    if (db->job) {   /* an attempt under way: its thread frees it when done, or it is done already */
        pthread_mutex_lock(&db->job->lock);
        bool done = db->job->done;
        db->job->abandoned = true;
        pthread_mutex_unlock(&db->job->lock);
        if (done)
            connect_job_free(db->job);
    }
    PQclear(db->held);
    PQfinish(db->conn);
    for (int i = 0; i < db->nlisten; i++)
        free(db->listen[i]);
    free(db);
    return NULL;
}

PGconn *ds_db_conn(struct ds_db *db)
{
    return db ? db->conn : NULL;
}

const char *ds_db_sqlstate(const struct ds_db *db)
{
    return db ? db->sqlstate : "";
}

/* A statement's result (NULL: none came): 0 with *ret when it succeeded, else its error (res is cleared). */
static int result_or_error(struct ds_db *db, PGresult *res, PGresult **ret)
{
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        int r = ds_db_result_error(db, res);
        PQclear(res);
        return r;
    }
    db->sqlstate[0] = 0;
    *ret = res;
    return 0;
}

void ds_db_set_deadline(struct ds_db *db, int timeout_ms)
{
    db->timeout_ms = timeout_ms;
    db->deadline_ms = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
}

/* ds_db_exec's statement under a deadline (deadline_ms, monotonic): sent as ds_db_send sends it and
 * written as the server takes it, then its answer waited for with poll() until then and taken as
 * ds_db_take_result takes it. Once the deadline passed, the statement is still under way (or half written)
 * and the connection is of no more use: it is given up (ds_db_ok false), and ds_db_ensure makes a new one. */
static int exec_until_deadline(struct ds_db *db, const char *sql, int nparams, const char *const *params,
                               int64_t deadline_ms, PGresult **ret)
{
    int r = ds_db_send(db, sql, nparams, params);
    if (r < 0)
        return r;
    for (;;) {
        int unsent = ds_db_flush(db);
        if (unsent < 0)
            return unsent;
        if (unsent == 0 && (r = ds_db_take_result(db, ret)) != 0)
            return r < 0 ? r : 0;
        int64_t left = deadline_ms - now_ms();
        struct pollfd p = { .fd = PQsocket(db->conn), .events = (short)(POLLIN | (unsent ? POLLOUT : 0)) };
        int pr = left > 0 ? poll(&p, 1, left > INT32_MAX ? INT32_MAX : (int)left) : 0;
        if (pr == 0 || (pr < 0 && errno != EINTR)) {
            db->given_up = true;
            snprintf(db->sqlstate, sizeof db->sqlstate, "%s", DS_DB_SQLSTATE_CONNECTION);
            if (db->deadline_ms)
                return ds_seterr(DS_EDB, "no answer from the database within %.1f s", db->timeout_ms / 1e3);
            return ds_seterr(DS_EDB,
                             "no answer from the database within %.1f s (statement_timeout %.1f s); giving the "
                             "connection up",
                             (db->statement_ms + db->grace_ms) / 1e3, db->statement_ms / 1e3);
        }
        if (pr > 0 && (p.revents & (POLLIN | POLLERR | POLLHUP)) && !PQconsumeInput(db->conn))
            return conn_error(db, "query failed");
    }
}

int ds_db_exec(struct ds_db *db, const char *sql, int nparams, const char *const *params,
               PGresult **ret)
{
    if (db->given_up)
        return conn_error(db, "database connection given up");
    if (db->deadline_ms)
        return exec_until_deadline(db, sql, nparams, params, db->deadline_ms, ret);
    if (db->grace_ms)
        return exec_until_deadline(db, sql, nparams, params, now_ms() + db->statement_ms + db->grace_ms, ret);
    return result_or_error(db, PQexecParams(db->conn, sql, nparams, NULL, params, NULL, NULL, 0), ret);
}

int ds_db_command(struct ds_db *db, const char *sql, int nparams, const char *const *params)
{
    PGresult *res;
    int r = ds_db_exec(db, sql, nparams, params, &res);
    if (r < 0)
        return r;
    PQclear(res);
    return 0;
}

int ds_db_send(struct ds_db *db, const char *sql, int nparams, const char *const *params)
{
    if (!ds_db_ok(db))
        return conn_error(db, "database connection is down");
    if (db->sent)
        return ds_seterr(DS_EINVAL, "a statement is under way on this connection");
    if (!PQisnonblocking(db->conn) && PQsetnonblocking(db->conn, 1) != 0)
        return conn_error(db, "could not make the connection non-blocking");
    if (!PQsendQueryParams(db->conn, sql, nparams, NULL, params, NULL, NULL, 0))
        return conn_error(db, "could not send a statement");
    int r = ds_db_flush(db);
    db->sent = r >= 0;   /* (a failed write: nothing to wait for, and the connection is of no more use) */
    return r;
}

int ds_db_flush(struct ds_db *db)
{
    int r = PQflush(db->conn);
    return r < 0 ? conn_error(db, "could not send a statement") : r;
}

int ds_db_take_result(struct ds_db *db, PGresult **ret)
{
    if (!db->sent)
        return ds_seterr(DS_EINVAL, "no statement is under way on this connection");
    /* PQgetResult waits only while PQisBusy: the statement's result, then NULL at its end (ReadyForQuery) */
    while (!PQisBusy(db->conn)) {
        PGresult *res = PQgetResult(db->conn);
        if (res) {
            if (!db->held || PQresultStatus(res) == PGRES_FATAL_ERROR) {
                PQclear(db->held);
                db->held = res;
            } else {
                PQclear(res);
            }
            continue;
        }
        db->sent = false;
        res = db->held;
        db->held = NULL;
        int r = result_or_error(db, res, ret);
        return r < 0 ? r : 1;
    }
    return 0;
}

int ds_db_script(struct ds_db *db, const char *sql)
{
    PGresult *res = PQexec(db->conn, sql);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_EMPTY_QUERY) {
        int r = ds_db_result_error(db, res);
        PQclear(res);
        return r;
    }
    PQclear(res);
    /* PQexec returns the last result; drain nothing else (simple protocol) */
    db->sqlstate[0] = 0;
    return 0;
}

int ds_db_begin(struct ds_db *db)
{
    return ds_db_command(db, "BEGIN", 0, NULL);
}

int ds_db_commit(struct ds_db *db)
{
    return ds_db_command(db, "COMMIT", 0, NULL);
}

void ds_db_rollback(struct ds_db *db)
{
    if (!ds_db_ok(db))
        return;
    if (PQtransactionStatus(db->conn) == PQTRANS_IDLE)
        return;
    PGresult *res = PQexec(db->conn, "ROLLBACK");
    PQclear(res);
}

int ds_db_schema_version(struct ds_db *db, int *ret_version)
{
    /* the catalogs read as a query, not through to_regclass: the query locks them, which makes this session
     * take in the catalog changes that others committed (a migration by a concurrent run, waited for under
     * the advisory lock within this transaction), and a name looked up after it finds them */
    PGresult *res;
    int r = ds_db_exec(db,
                       "SELECT CASE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_class c"
                       " JOIN pg_catalog.pg_namespace s ON s.oid = c.relnamespace"
                       " WHERE s.nspname = 'dspark' AND c.relname = 'schema_version') THEN -1 END",
                       0, NULL, &res);
    if (r < 0)
        return r;
    int missing = !PQgetisnull(res, 0, 0);
    PQclear(res);
    if (missing) {
        *ret_version = 0;
        return 0;
    }
    r = ds_db_exec(db, "SELECT coalesce(max(version), 0) FROM dspark.schema_version", 0, NULL,
                   &res);
    if (r < 0)
        return r;
    *ret_version = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    return 0;
}

int ds_db_schema_error(int version, int code)
{
    if (version == 0)
        return ds_seterr(code, "database has no dspark schema: run 'dsparkctl db init'");
    if (version != DS_SCHEMA_VERSION)
        return ds_seterr(code, "database schema version %d, this build knows %d: run 'dsparkctl db migrate'",
                         version, DS_SCHEMA_VERSION);
    return 0;
}

int ds_db_check_schema(struct ds_db *db)
{
    int v;
    int r = ds_db_schema_version(db, &v);
    return r < 0 ? r : ds_db_schema_error(v, DS_EDB);
}

const struct ds_db_migration *ds_db_migrations(size_t *ret_n)
{
    *ret_n = ds_db_embedded_migrations_n;
    return ds_db_embedded_migrations;
}

/* A migration read from a directory. */
struct file_migration {
    int version;
    char *name;
    char *sql;
};

static void free_file_migrations(struct file_migration *m, size_t n)
{
    if (!m)
        return;
    for (size_t i = 0; i < n; i++) {
        free(m[i].name);
        free(m[i].sql);
    }
    free(m);
}

static int cmp_file_migration(const void *a, const void *b)
{
    const struct file_migration *x = a, *y = b;
    return (x->version > y->version) - (x->version < y->version);
}

static int read_text_file(const char *path, char **ret)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return ds_seterr(DS_EIO, "could not open '%s': %s", path, strerror(errno));
    size_t cap = 65536, n = 0;
    char *buf = ds_xmalloc(cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (cap - n - 1 == 0)
            buf = ds_xrealloc(buf, cap *= 2);
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return ds_seterr(DS_EIO, "could not read '%s'", path);
    }
    buf[n] = 0;
    *ret = buf;
    return 0;
}

static int load_dir_migrations(const char *dir, struct file_migration **ret, size_t *ret_n)
{
    DIR *d = opendir(dir);
    if (!d)
        return ds_seterr(DS_EIO, "could not open directory '%s': %s", dir, strerror(errno));
    struct file_migration *m = NULL;
    size_t n = 0;
    struct dirent *e;
    int r = 0;
    while ((e = readdir(d))) {
        const char *nm = e->d_name;
        size_t len = strlen(nm);
        if (len < 9 || strcmp(nm + len - 4, ".sql") != 0 || nm[0] < '0' || nm[0] > '9' ||
            nm[1] < '0' || nm[1] > '9' || nm[2] < '0' || nm[2] > '9' || nm[3] != '-')
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, nm);
        char *sql = NULL;
        r = read_text_file(path, &sql);
        if (r < 0)
            break;
        m = ds_xrealloc(m, (n + 1) * sizeof *m);
        m[n].version = atoi(nm);
        m[n].name = ds_xstrdup(nm);
        m[n].name[len - 4] = 0;
        m[n].sql = sql;
        n++;
    }
    closedir(d);
    if (r < 0) {
        free_file_migrations(m, n);
        return r;
    }
    if (n == 0) {
        free(m);
        return ds_seterr(DS_EIO, "no migrations (NNN-name.sql) in '%s'", dir);
    }
    qsort(m, n, sizeof *m, cmp_file_migration);
    for (size_t i = 1; i < n; i++)
        if (m[i].version == m[i - 1].version) {
            r = ds_seterr(DS_EFORMAT, "migrations '%s' and '%s' have the same number",
                          m[i - 1].name, m[i].name);
            free_file_migrations(m, n);
            return r;
        }
    *ret = m;
    *ret_n = n;
    return 0;
}

/* Apply one migration in a transaction of its own, which first takes the migrations' advisory lock (for the
 * transaction: a transaction-pooling proxy keeps it on one server session) and reads the version again, so
 * that of concurrent runs only the first applies it. *applied_at: the version found, -1 when another run
 * had applied this one. */
static int apply_one(struct ds_db *db, int version, const char *name, const char *sql, int *applied_at)
{
    /* read committed whatever the database's default: the version read after the lock wait must see what the
     * run that held it committed */
    int r = ds_db_command(db, "BEGIN ISOLATION LEVEL READ COMMITTED", 0, NULL);
    if (r < 0)
        return r;
    int now = 0;
    if ((r = ds_db_command(db, "SELECT pg_advisory_xact_lock(" DS_DB_MIGRATE_LOCK ")", 0, NULL)) < 0 ||
        (r = ds_db_schema_version(db, &now)) < 0) {
        ds_db_rollback(db);
        return ds_prefixerr(r, "migration '%s'", name);
    }
    if (now > DS_SCHEMA_VERSION) {   /* a newer release migrated it meanwhile */
        ds_db_rollback(db);
        return ds_seterr(DS_EDB, "database schema version %d is newer than this build knows (%d): upgrade dspark",
                         now, DS_SCHEMA_VERSION);
    }
    if (now >= version) {
        *applied_at = -1;
        ds_db_rollback(db);
        return 0;
    }
    r = ds_db_script(db, sql);
    if (r < 0) {
        ds_prefixerr(r, "migration '%s'", name);
        ds_db_rollback(db);
        return r;
    }
    char vbuf[16];
    snprintf(vbuf, sizeof vbuf, "%d", version);
    const char *p[] = { vbuf };
    PGresult *res;
    r = ds_db_exec(db, "SELECT 1 FROM dspark.schema_version WHERE version = $1", 1, p, &res);
    if (r < 0) {
        ds_db_rollback(db);
        return ds_prefixerr(r, "migration '%s'", name);
    }
    int recorded = PQntuples(res) == 1;
    PQclear(res);
    if (!recorded) {
        ds_db_rollback(db);
        return ds_seterr(DS_EFORMAT, "migration '%s' did not record version %d in dspark.schema_version",
                         name, version);
    }
    r = ds_db_commit(db);
    if (r < 0)
        return ds_prefixerr(r, "migration '%s'", name);
    *applied_at = now;
    return 0;
}

int ds_db_migrate(struct ds_db *db, const char *sqldir, int *ret_from, int *ret_to)
{
    struct file_migration *fm = NULL;
    size_t n = 0;
    int r;
    if (sqldir) {
        r = load_dir_migrations(sqldir, &fm, &n);
        if (r < 0)
            return r;
    } else {
        n = ds_db_embedded_migrations_n;
    }
    int latest = sqldir ? fm[n - 1].version : ds_db_embedded_migrations[n - 1].version;
    if (latest != DS_SCHEMA_VERSION) {
        free_file_migrations(fm, n);
        return ds_seterr(DS_EFORMAT, "the migrations end at version %d but this build knows %d",
                         latest, DS_SCHEMA_VERSION);
    }

    int seen;
    r = ds_db_schema_version(db, &seen);
    if (r == 0 && seen > DS_SCHEMA_VERSION)
        r = ds_seterr(DS_EDB,
                      "database schema version %d is newer than this build knows (%d): upgrade dspark",
                      seen, DS_SCHEMA_VERSION);
    int from = -1, to = seen;   /* from: the version before the first migration this run applied */
    for (size_t i = 0; r == 0 && i < n; i++) {
        int v = sqldir ? fm[i].version : ds_db_embedded_migrations[i].version;
        if (v <= seen)
            continue;
        int at = -1;
        r = apply_one(db, v, sqldir ? fm[i].name : ds_db_embedded_migrations[i].name,
                      sqldir ? fm[i].sql : ds_db_embedded_migrations[i].sql, &at);
        if (r == 0 && at >= 0 && from < 0)
            from = at;
        if (r == 0)
            to = v;
    }
    free_file_migrations(fm, n);
    if (r < 0)
        return r;
    if (ret_from)
        *ret_from = from < 0 ? to : from;   /* nothing applied here: current (perhaps by another run) */
    if (ret_to)
        *ret_to = to;
    return 0;
}

bool ds_db_ok(struct ds_db *db)
{
    return db && db->conn && !db->given_up && PQstatus(db->conn) == CONNECTION_OK;
}

int ds_db_statement_timeout_ms(const struct ds_db *db)
{
    return db ? db->statement_ms : 0;
}

/* The session's statement_timeout (in db->statement_ms), after setting it to db->default_statement_ms
 * where the session has none (0: the server's default, which no conninfo option, role or database setting
 * changed). */
static int session_timeout(struct ds_db *db)
{
    PGresult *res;
    int r = ds_db_exec(db, "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'statement_timeout'", 0, NULL,
                       &res);
    if (r < 0)
        return r;
    long ms = PQntuples(res) == 1 ? strtol(PQgetvalue(res, 0, 0), NULL, 10) : 0;
    PQclear(res);
    if (ms <= 0 && db->default_statement_ms > 0) {
        char sql[64];
        snprintf(sql, sizeof sql, "SET statement_timeout = %d", db->default_statement_ms);
        if ((r = ds_db_command(db, sql, 0, NULL)) < 0)
            return r;
        ms = db->default_statement_ms;
    }
    db->statement_ms = ms <= 0 ? 0 : ms < INT32_MAX / 2 ? (int)ms : INT32_MAX / 2;   /* (12 days: no bound) */
    return 0;
}

int ds_db_set_timeouts(struct ds_db *db, int default_statement_ms, int grace_ms)
{
    db->default_statement_ms = default_statement_ms > 0 ? default_statement_ms : 0;
    db->grace_ms = grace_ms > 0 ? grace_ms : 1;
    db->statement_ms = 0;   /* (until read: the reading waits grace_ms at most) */
    return session_timeout(db);
}

static int relisten(struct ds_db *db)
{
    for (int i = 0; i < db->nlisten; i++) {
        char *ident = PQescapeIdentifier(db->conn, db->listen[i], strlen(db->listen[i]));
        if (!ident)
            return conn_error(db, "could not quote a channel name");
        char sql[300];
        snprintf(sql, sizeof sql, "LISTEN %s", ident);
        PQfreemem(ident);
        int r = ds_db_command(db, sql, 0, NULL);
        if (r < 0)
            return r;
    }
    return 0;
}

/* PQreset, ended by until_ms (monotonic) where the server or the network does not answer before: libpq's
 * non-blocking reset, polled. A reset cut short leaves the connection bad (ds_db_ok false); the next
 * attempt starts afresh. Names are still looked up before the first poll, as libpq does. Whether it was
 * cut short. */
static bool reset_until(struct ds_db *db, int64_t until_ms)
{
    if (!PQresetStart(db->conn))
        return false;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st == PGRES_POLLING_READING || st == PGRES_POLLING_WRITING) {
        int64_t left = until_ms - now_ms();
        if (left <= 0)
            return true;
        struct pollfd p = { .fd = PQsocket(db->conn), .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT };
        if (p.fd < 0)
            return false;
        int pr = poll(&p, 1, left > INT32_MAX ? INT32_MAX : (int)left);
        if (pr < 0 && errno != EINTR)
            return false;
        if (pr > 0)
            st = PQresetPoll(db->conn);
    }
    return false;
}

int ds_db_ensure(struct ds_db *db, int max_wait_ms)
{
    if (ds_db_ok(db) && !db->need_session)
        return 0;
    int64_t deadline = now_ms() + (max_wait_ms > 0 ? max_wait_ms : 0);
    bool cut_short = false;   /* the last attempt passed the deadline (ds_db_set_deadline) */
    for (;;) {
        int64_t t = now_ms();
        if (t < db->next_try_ms) {
            if (db->next_try_ms > deadline)
                break;
            sleep_ms(db->next_try_ms - t);
        }
        if (!ds_db_ok(db)) {
            /* (non-blocking: a connection given up in the middle of a write does not wait to say goodbye) */
            PQsetnonblocking(db->conn, 1);
            if (db->deadline_ms)   /* (ds_db_set_deadline's bound holds for the new connection too) */
                cut_short = reset_until(db, db->deadline_ms);
            else
                PQreset(db->conn);
            db->given_up = false;
            db->sent = false;
            PQclear(db->held);
            db->held = NULL;
        }
        db->next_try_ms = now_ms() + db->backoff_ms;
        db->backoff_ms = db->backoff_ms * 2 > DS_DB_BACKOFF_MAX_MS ? DS_DB_BACKOFF_MAX_MS
                                                                   : db->backoff_ms * 2;
        if (ds_db_ok(db)) {
            db->need_session = relisten(db) < 0 || (db->grace_ms && session_timeout(db) < 0);
            if (!db->need_session) {
                db->backoff_ms = DS_DB_BACKOFF_MIN_MS;
                db->next_try_ms = 0;
                db->reconnects++;
                return 1;
            }
        }
        if (now_ms() >= deadline)
            break;
    }
    if (cut_short) {
        snprintf(db->sqlstate, sizeof db->sqlstate, "%s", DS_DB_SQLSTATE_CONNECTION);
        return ds_seterr(DS_EDB, "database connection is down: no answer from the database within %.1f s",
                         db->timeout_ms / 1e3);
    }
    return conn_error(db, "database connection is down");
}

unsigned ds_db_reconnects(const struct ds_db *db)
{
    return db ? db->reconnects : 0;
}

int ds_db_probe(struct ds_db *db, const char *payload)
{
    const char *params[2] = { DS_DB_EVENTS_CHANNEL, payload };
    ds_db_set_deadline(db, DS_DB_PROBE_TIMEOUT_MS);
    return ds_db_command(db, "SELECT pg_notify($1, $2)", 2, params);
}

int ds_db_send_probe(const char *conninfo, const char *application_name, const char *payload)
{
    struct ds_db *p = NULL;
    int r = ds_db_connect(conninfo, application_name, &p);
    if (r == 0)
        r = ds_db_probe(p, payload);
    ds_db_free(p);
    return r;
}

int ds_db_listen(struct ds_db *db, const char *channel)
{
    int known = 0;
    for (int i = 0; i < db->nlisten; i++)
        if (strcmp(db->listen[i], channel) == 0)
            known = 1;
    if (!known && db->nlisten == DS_DB_MAX_LISTEN)
        return ds_seterr(DS_ELIMIT, "too many LISTEN channels (at most %d)", DS_DB_MAX_LISTEN);
    char *ident = PQescapeIdentifier(db->conn, channel, strlen(channel));
    if (!ident)
        return conn_error(db, "could not quote a channel name");
    char sql[300];
    int len = snprintf(sql, sizeof sql, "LISTEN %s", ident);
    PQfreemem(ident);
    if (len >= (int)sizeof sql)
        return ds_seterr(DS_EINVAL, "channel name '%s' too long", channel);
    int r = ds_db_command(db, sql, 0, NULL);
    if (r < 0)
        return r;
    if (!known)
        db->listen[db->nlisten++] = ds_xstrdup(channel);
    return 0;
}

int ds_db_socket(struct ds_db *db)
{
    return ds_db_ok(db) ? PQsocket(db->conn) : -1;
}

int ds_db_consume_notify(struct ds_db *db, ds_db_notify_fn *fn, void *ud)
{
    if (!ds_db_ok(db))
        return conn_error(db, "database connection is down");
    if (!PQconsumeInput(db->conn))
        return conn_error(db, "could not read from the database");
    int n = 0;
    PGnotify *nt;
    while ((nt = PQnotifies(db->conn))) {
        if (fn)
            fn(ud, nt->relname, nt->extra);
        PQfreemem(nt);
        n++;
    }
    if (PQstatus(db->conn) != CONNECTION_OK)
        return conn_error(db, "database connection lost");
    return n;
}

int ds_db_wait_notify(struct ds_db *db, int timeout_ms, ds_db_notify_fn *fn, void *ud)
{
    int n = ds_db_consume_notify(db, fn, ud);
    if (n != 0)
        return n;
    struct pollfd p = { .fd = PQsocket(db->conn), .events = POLLIN };
    int pr = poll(&p, 1, timeout_ms);
    if (pr < 0)
        return errno == EINTR ? 0 : ds_seterr(DS_EIO, "poll: %s", strerror(errno));
    if (pr == 0)
        return 0;
    return ds_db_consume_notify(db, fn, ud);
}

/* Notification payloads ----------------------------------------------------- */

/* An unsigned decimal number of at most max at *pp (digits only: no sign, no
 * blanks); advances *pp past it. */
static bool parse_uint(const char **pp, int64_t max, int64_t *ret)
{
    const char *p = *pp;
    int64_t v = 0;
    if (*p < '0' || *p > '9')
        return false;
    for (; *p >= '0' && *p <= '9'; p++) {
        int d = *p - '0';
        if (v > (max - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *pp = p;
    *ret = v;
    return true;
}

static const char *state_of_letter(char c)
{
    switch (c) {
    case 'q': return "queued";
    case 'r': return "running";
    case 's': return "succeeded";
    case 'f': return "failed";
    case 'c': return "cancelled";
    default: return NULL;
    }
}

/* The error for entry number k (from 1) of payload, which starts at entry. */
static int bad_entry(const char *payload, size_t k, const char *entry, const char *why)
{
    int len = (int)strcspn(entry, ",");
    return ds_seterr(DS_EFORMAT, "job notification '%.60s%s': entry %zu '%.*s' %s", payload,
                     strlen(payload) > 60 ? "..." : "", k, len > 40 ? 40 : len, entry, why);
}

/* Parse a payload into transitions; with bare_ok, an entry may also be a bare
 * id (its other fields are then 0 and NULL). */
static int parse_payload(const char *payload, bool bare_ok, struct ds_db_transition **ret,
                         size_t *ret_n)
{
    size_t cap = 0, n = 0;
    struct ds_db_transition *t = NULL;
    const char *p = payload ? payload : "";
    payload = p;
    int r = 0;
    while (*p) {
        const char *entry = p;
        struct ds_db_transition e = { 0 };
        int64_t attempt;
        const char *why = bare_ok ? "is neither a job id nor 'id:version:state:attempt'"
                                  : "is not 'id:version:state:attempt'";
        if (!parse_uint(&p, INT64_MAX, &e.id)) {
            r = bad_entry(payload, n + 1, entry, why);
            break;
        }
        if (*p == ':' || !bare_ok) {
            if (*p++ != ':' || !parse_uint(&p, INT64_MAX, &e.version) || *p++ != ':') {
                r = bad_entry(payload, n + 1, entry, why);
                break;
            }
            e.state = state_of_letter(*p);
            if (!e.state || p[1] != ':') {
                r = bad_entry(payload, n + 1, entry,
                              e.state ? why : "has an unknown state (not q, r, s, f or c)");
                break;
            }
            p += 2;
            if (!parse_uint(&p, INT32_MAX, &attempt)) {
                r = bad_entry(payload, n + 1, entry, why);
                break;
            }
            e.attempt = (int32_t)attempt;
        }
        if (*p != 0 && (*p != ',' || p[1] == 0)) {
            r = bad_entry(payload, n + 1, entry,
                          *p == ',' ? "is followed by an empty entry" : why);
            break;
        }
        if (n == cap)
            t = ds_xrealloc(t, (cap = cap ? cap * 2 : 16) * sizeof *t);
        t[n++] = e;
        if (*p)
            p++;
    }
    if (r < 0) {
        free(t);
        return r;
    }
    *ret = t;
    *ret_n = n;
    return 0;
}

int ds_db_parse_transitions(const char *payload, struct ds_db_transition **ret, size_t *ret_n)
{
    return parse_payload(payload, false, ret, ret_n);
}

int ds_db_parse_ids(const char *payload, int64_t **ret_ids, size_t *ret_n)
{
    struct ds_db_transition *t;
    size_t n;
    int r = parse_payload(payload, true, &t, &n);
    if (r < 0)
        return r;
    int64_t *ids = n ? ds_xmalloc(n * sizeof *ids) : NULL;
    for (size_t i = 0; i < n; i++)
        ids[i] = t[i].id;
    free(t);
    *ret_ids = ids;
    *ret_n = n;
    return 0;
}

char *ds_db_int64_array(const int64_t *ids, size_t n)
{
    char *s = ds_xmalloc(n * 21 + 3);
    size_t len = 0;
    s[len++] = '{';
    for (size_t i = 0; i < n; i++)
        len += (size_t)sprintf(s + len, i ? ",%" PRId64 : "%" PRId64, ids[i]);
    s[len++] = '}';
    s[len] = 0;
    return s;
}
