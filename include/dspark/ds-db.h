/* ds-db.h: PostgreSQL access shared by dsparkd, dspark-worker and dsparkctl.
 *
 * A struct ds_db wraps one libpq connection with what the service needs
 * around it: errors carried as DS_EDB with the server's message, detail,
 * hint and SQLSTATE in ds_errdetail(); the schema version check and the
 * migrations (embedded into the binary at build time); reconnection with
 * back-off after the server went away (LISTEN channels are re-issued); and
 * waiting for notifications.
 *
 * One struct ds_db belongs to one thread at a time. Results returned through
 * ret_ out-parameters belong to the caller, who PQclear()s them. */
#ifndef DS_DB_H
#define DS_DB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "dspark/ds-err.h"

/* The schema version this build knows: the number of the last migration in
 * sql/. Daemon and worker refuse to run against any other version. */
#define DS_SCHEMA_VERSION 22

/* Channel of the job notifications: one NOTIFY per statement that inserts
 * jobs or changes job states, payload = one entry per job and change,
 * comma-separated, "id:version:state:attempt" with the state as its first
 * letter (q, r, s, f, c for queued, running, succeeded, failed, cancelled),
 * e.g. "12:2:r:1,13:2:r:1"; at most about 7000 bytes each (longer lists are
 * split over several notifications). */
#define DS_DB_EVENTS_CHANNEL "dspark_events"

/* A payload on DS_DB_EVENTS_CHANNEL that starts with this names no job: a
 * process checking that its own notifications arrive (ds_db_send_probe). */
#define DS_DB_PROBE_PREFIX "probe:"
/* A payload that starts with this names no job either: delayed jobs of the
 * model after it ('*': of several) came due and may be claimed
 * (dspark.promote_due_jobs); a hint for idle workers. */
#define DS_DB_DUE_PREFIX "due:"

/* SQLSTATE reported for a connection that broke (libpq gives none). */
#define DS_DB_SQLSTATE_CONNECTION "08006"

struct ds_db;

/* Connect with a conninfo string or URI (NULL or "" = libpq defaults, i.e. the
 * PG* environment); application_name is used unless conninfo sets one.
 * The connection uses client_encoding UTF8. */
int ds_db_connect(const char *conninfo, const char *application_name,
                  struct ds_db **ret) DS_MUSTCHECK;
/* Statements a connection needs before its use, run on the connection
 * attempt's thread once connected (with the blocking calls below; their
 * ds_errdetail is that thread's). arg: ds_db_connect_start's setup_arg (a
 * copy). Returns 0, or < 0 with ds_seterr to fail the attempt. */
typedef int ds_db_setup_fn(struct ds_db *db, const char *arg);
/* Start connecting as ds_db_connect does, on a thread of its own, so that the
 * caller's loop never waits on the server or on name lookups; then call
 * ds_db_connect_poll until it returns 1 (or fails). The attempt follows
 * libpq's rules for a blocking connect: connect_timeout (10 s unless the
 * conninfo, PGCONNECT_TIMEOUT or a service file says otherwise) for each host
 * and address in turn. setup (NULL: none) runs on the same thread once
 * connected, bounded by the deadline it sets (ds_db_set_deadline) and by
 * nothing else. ds_db_free may be called at any
 * time: an attempt under way then ends on its own. */
int ds_db_connect_start(const char *conninfo, const char *application_name, ds_db_setup_fn *setup,
                        const char *setup_arg, struct ds_db **ret) DS_MUSTCHECK;
/* Whether the attempt ds_db_connect_start began is over, without blocking:
 * 1 when connected and set up (db is then as ds_db_connect's; 1 again on later
 * calls), 0 when it is still under way (poll *ret_fd for *ret_events, then
 * call again), < 0 when it failed (free db then): -DS_EDB when connecting
 * failed, setup's own code when it did. */
int ds_db_connect_poll(struct ds_db *db, int *ret_fd, short *ret_events) DS_MUSTCHECK;
/* Close and free; accepts NULL; returns NULL. */
struct ds_db *ds_db_free(struct ds_db *db);
/* The underlying connection (borrowed; replaced by ds_db_ensure()). */
PGconn *ds_db_conn(struct ds_db *db);

/* SQLSTATE of the last failed call on db ("" when it had none). */
const char *ds_db_sqlstate(const struct ds_db *db);

/* Run one statement with text parameters (params[i] NULL = SQL NULL) and
 * return its result (PGRES_COMMAND_OK or PGRES_TUPLES_OK) in *ret.
 * On error: -DS_EDB, ds_errdetail() = "message: detail (hint: ...)
 * [SQLSTATE xxxxx]", ds_db_sqlstate() = the code. */
int ds_db_exec(struct ds_db *db, const char *sql, int nparams,
               const char *const *params, PGresult **ret) DS_MUSTCHECK;
/* From now on, ds_db_exec and the calls built on it (ds_db_command,
 * ds_db_schema_version, ds_db_listen, ...) fail with -DS_EDB "no answer from
 * the database within N s" when their answer has not come timeout_ms from now
 * (a server or pooler that holds queries; the connection is of no use then).
 * 0: no deadline (the default). ds_db_ensure's new connections end by it too,
 * rather than by connect_timeout. For a setup on a connection attempt's thread. */
void ds_db_set_deadline(struct ds_db *db, int timeout_ms);
/* Bound every later statement of a long-lived connection that waits for its
 * answer (ds_db_exec and the calls built on it): the session gets
 * statement_timeout = default_statement_ms where it has none of its own (0:
 * the server's default; a conninfo option, role or database setting is kept),
 * and an answer that has not come grace_ms after the session's
 * statement_timeout (a server or pooler that stopped answering, a network path
 * that drops everything: statement_timeout is the server's own) fails the
 * call with -DS_EDB "no answer from the database within N s
 * (statement_timeout M s); giving the connection up" and gives the connection
 * up: ds_db_ok is then false, and ds_db_ensure makes a new one, with the same
 * bounds. Statements are written without blocking, so a server that stopped
 * reading holds up no write past the bound either. Returns 0, or < 0 when the
 * session's setting could not be read or set. */
int ds_db_set_timeouts(struct ds_db *db, int default_statement_ms, int grace_ms) DS_MUSTCHECK;
/* The session's statement_timeout in ms as ds_db_set_timeouts read or set it (0: none, or not read). */
int ds_db_statement_timeout_ms(const struct ds_db *db);
/* A statement sent without waiting (the connection becomes non-blocking), for
 * a loop that polls ds_db_socket: then ds_db_flush while it returns 1 (poll
 * for POLLOUT too), and ds_db_consume_notify and ds_db_take_result whenever
 * the socket is readable. One statement at a time. Returns 0 when sent, 1
 * when part of it waits to be written, < 0 (-DS_EDB) on error. */
int ds_db_send(struct ds_db *db, const char *sql, int nparams, const char *const *params) DS_MUSTCHECK;
/* Write what ds_db_send left: 0 when all is sent, 1 when more waits, < 0. */
int ds_db_flush(struct ds_db *db) DS_MUSTCHECK;
/* The sent statement's result, without blocking (after ds_db_consume_notify
 * read the socket): 1 with *ret (PQclear it) when the statement is over, 0
 * while it is not, < 0 as ds_db_exec's errors (the statement is over too). */
int ds_db_take_result(struct ds_db *db, PGresult **ret) DS_MUSTCHECK;
/* ds_db_exec, discarding the result. */
int ds_db_command(struct ds_db *db, const char *sql, int nparams,
                  const char *const *params) DS_MUSTCHECK;
/* Run a script of several statements (simple query protocol, no parameters). */
int ds_db_script(struct ds_db *db, const char *sql) DS_MUSTCHECK;
/* Transactions. ds_db_rollback() never fails (it is for error paths) and
 * keeps the detail of the error that led to it. */
int ds_db_begin(struct ds_db *db) DS_MUSTCHECK;
int ds_db_commit(struct ds_db *db) DS_MUSTCHECK;
void ds_db_rollback(struct ds_db *db);

/* Turn a failed result (or a NULL one) into -DS_EDB with the server's
 * message; records the SQLSTATE in db (db may be NULL). Does not PQclear. */
int ds_db_result_error(struct ds_db *db, const PGresult *res);

/* The schema version of the database: max(version) of dspark.schema_version,
 * 0 when there is no dspark schema. */
int ds_db_schema_version(struct ds_db *db, int *ret_version) DS_MUSTCHECK;
/* 0 when the database is at DS_SCHEMA_VERSION; -DS_EDB otherwise, with
 * "database schema version %d, this build knows %d: run 'dsparkctl db migrate'"
 * (or "database has no dspark schema: run 'dsparkctl db init'"). */
int ds_db_check_schema(struct ds_db *db) DS_MUSTCHECK;
/* ds_db_check_schema's verdict on a version already read: 0 at
 * DS_SCHEMA_VERSION, else -code with its message. */
int ds_db_schema_error(int version, int code);

/* One forward-only migration: sql/NNN-name.sql. */
struct ds_db_migration {
    int version;      /* NNN */
    const char *name; /* "001-schema" */
    const char *sql;  /* the script; it records its own schema_version row */
};
/* The migrations compiled into this binary, ordered by version (static). */
const struct ds_db_migration *ds_db_migrations(size_t *ret_n);
/* Bring the database to DS_SCHEMA_VERSION: apply every migration newer than
 * the database's version, each in its own transaction under a transaction-level
 * advisory lock (so that concurrent runs apply each once, also through a
 * transaction-pooling proxy). sqldir NULL = the embedded migrations, else the
 * NNN-*.sql files of that directory. Refuses a database newer than this build.
 * *ret_from / *ret_to (may be NULL) get the versions before and after this
 * run's migrations (equal when it applied none). */
int ds_db_migrate(struct ds_db *db, const char *sqldir, int *ret_from,
                  int *ret_to) DS_MUSTCHECK;

/* Whether the connection is up (no round trip): false too once a statement's
 * answer did not come in time (ds_db_set_deadline, ds_db_set_timeouts). */
bool ds_db_ok(struct ds_db *db);
/* Make sure the connection is up: when it is not, reset it with exponential
 * back-off (100 ms doubling to 5 s between attempts, remembered across calls
 * so that frequent callers do not hammer the server), waiting at most
 * max_wait_ms (0 = at most one attempt now, if one is due). After a
 * successful reset the LISTEN channels are issued again, and the session's
 * statement_timeout set again (ds_db_set_timeouts). Under a deadline
 * (ds_db_set_deadline) an attempt is given up when it passes, however long
 * connect_timeout is.
 * Returns 0 when connected, 1 when it reconnected during this call,
 * -DS_EDB when still down. */
int ds_db_ensure(struct ds_db *db, int max_wait_ms) DS_MUSTCHECK;
/* How many successful reconnections db has made (for logs and tests). */
unsigned ds_db_reconnects(const struct ds_db *db);

/* LISTEN on channel (a plain identifier) and remember it for reconnects. */
int ds_db_listen(struct ds_db *db, const char *channel) DS_MUSTCHECK;
/* Send payload (DS_DB_PROBE_PREFIX...) on DS_DB_EVENTS_CHANNEL from a short
 * connection of its own to conninfo: the probe of a listener checking that
 * notifications reach it (behind a pooler that pools transactions they do
 * not). Fails when the statement has no answer within 10 s. */
int ds_db_send_probe(const char *conninfo, const char *application_name, const char *payload) DS_MUSTCHECK;
/* The same probe on a connection of the caller's (a ds_db_setup_fn: dsparkd
 * sends it on a connection attempt's thread), with the same 10 s limit. */
int ds_db_probe(struct ds_db *db, const char *payload) DS_MUSTCHECK;
typedef void ds_db_notify_fn(void *ud, const char *channel, const char *payload);
/* The socket to poll() for readability (-1 when disconnected). */
int ds_db_socket(struct ds_db *db);
/* Read what the server sent, without blocking, and call fn for each
 * notification (fn may be NULL). Returns the count, or -DS_EDB when the
 * connection broke. */
int ds_db_consume_notify(struct ds_db *db, ds_db_notify_fn *fn, void *ud);
/* Wait up to timeout_ms (-1 = forever) for notifications and deliver them as
 * ds_db_consume_notify() does; returns the count (0 on timeout) or -DS_EDB;
 * EINTR returns 0. */
int ds_db_wait_notify(struct ds_db *db, int timeout_ms, ds_db_notify_fn *fn,
                      void *ud);

/* One entry of a notification payload: job id entered state at version
 * (attempt = the job's attempt number after the change). */
struct ds_db_transition {
    int64_t id;
    int64_t version;
    int32_t attempt;
    const char *state;  /* static: "queued", "running", "succeeded", "failed", "cancelled" */
};
/* Parse a notification payload "12:1:q:0,12:2:r:1" (see DS_DB_EVENTS_CHANNEL)
 * into a malloc'ed array in payload order (*ret NULL when *ret_n is 0; ""
 * is the empty list). Ids, versions and attempts are unsigned decimal numbers
 * within range (int64, attempts int32); anything else (a missing field, an
 * unknown state letter, stray blanks, an empty entry) is -DS_EFORMAT naming
 * the entry. */
int ds_db_parse_transitions(const char *payload, struct ds_db_transition **ret,
                            size_t *ret_n) DS_MUSTCHECK;
/* The job ids of a notification payload, in order (a job may repeat), for
 * callers that want only ids: entries as ds_db_parse_transitions() takes them,
 * or bare ids ("12,13,200"). Malloc'ed (*ret_ids NULL when *ret_n is 0);
 * -DS_EFORMAT on anything else. */
int ds_db_parse_ids(const char *payload, int64_t **ret_ids, size_t *ret_n) DS_MUSTCHECK;
/* A PostgreSQL array literal "{1,2,3}" for ids (malloc'ed, never NULL). */
char *ds_db_int64_array(const int64_t *ids, size_t n);

#endif
