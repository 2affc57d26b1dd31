/* test-db.c: common/db.c against a private PostgreSQL (started by
 * tests/integration/test-db.sh, which exports PGHOST etc. and PGH_SCRIPT):
 * connection errors and defaults, connecting without waiting, statements
 * bounded in time (a server process that stops answering), SQLSTATE and server detail in errors, the schema check
 * and migrations (embedded = sql/ files), LISTEN/NOTIFY, and reconnection
 * after the server restarts or is down for a while. */
#include "config.h"

#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "testutil.h"

#include "dspark/ds-db.h"

static int restart_server(const char *how)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "sh -c '. \"$PGH_SCRIPT\" && pg_harness_ctl -w -s %s' >/dev/null 2>&1",
             how);
    return system(cmd);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static struct ds_db *connect_db(const char *dbname)
{
    char conninfo[256];
    snprintf(conninfo, sizeof conninfo, "dbname=%s", dbname);
    struct ds_db *db = NULL;
    int r = ds_db_connect(conninfo, "test-db", &db);
    if (r < 0)
        fail_msg("connect: %s", ds_errdetail());
    return db;
}

static void test_connect_errors(void **state)
{
    (void)state;
    struct ds_db *db = (struct ds_db *)0x1;
    int r = ds_db_connect("dbname=no_such_database", "t", &db);
    assert_int_equal(r, -DS_EDB);
    assert_ptr_equal(db, (struct ds_db *)0x1); /* out-param untouched on failure */
    assert_non_null(strstr(ds_errdetail(), "could not connect to the database"));
    assert_non_null(strstr(ds_errdetail(), "no_such_database"));
    r = ds_db_connect("port=notaport", "t", &db);
    assert_int_equal(r, -DS_EDB);
    assert_null(ds_db_free(NULL));
}

/* The value libpq uses for keyword on db's connection. */
static const char *conn_option(struct ds_db *db, const char *keyword, char *buf, size_t size)
{
    PQconninfoOption *opts = PQconninfo(ds_db_conn(db));
    snprintf(buf, size, "(unset)");
    for (PQconninfoOption *o = opts; o && o->keyword; o++)
        if (strcmp(o->keyword, keyword) == 0 && o->val)
            snprintf(buf, size, "%s", o->val);
    PQconninfoFree(opts);
    return buf;
}

/* Our connect_timeout and keepalive defaults, and what overrides them: the
 * conninfo and a service file. */
static void test_connection_defaults(void **state)
{
    (void)state;
    char a[32], b[32];
    struct ds_db *db = connect_db("postgres");
    assert_string_equal(conn_option(db, "connect_timeout", a, sizeof a), "10");
    assert_string_equal(conn_option(db, "keepalives_idle", b, sizeof b), "30");
    ds_db_free(db);
    assert_int_equal(ds_db_connect("dbname=postgres connect_timeout=77 keepalives_idle=55", "t", &db), 0);
    assert_string_equal(conn_option(db, "connect_timeout", a, sizeof a), "77");
    assert_string_equal(conn_option(db, "keepalives_idle", b, sizeof b), "55");
    ds_db_free(db);
    /* a service file's settings fill what is unset: ours must not come first */
    char path[] = "/tmp/dspark-test-service-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fprintf(f, "[s]\ndbname=postgres\nconnect_timeout=66\nkeepalives_idle=99\n");
    fclose(f);
    setenv("PGSERVICEFILE", path, 1);
    int r = ds_db_connect("service=s", "t", &db);
    unsetenv("PGSERVICEFILE");
    unlink(path);
    assert_int_equal(r, 0);
    assert_string_equal(conn_option(db, "connect_timeout", a, sizeof a), "66");
    assert_string_equal(conn_option(db, "keepalives_idle", b, sizeof b), "99");
    ds_db_free(db);
}

/* Drive ds_db_connect_poll to its end as dsparkd's loop does: poll the descriptor it names, call again.
 * Returns its last result; *steps the calls, *longest_s the longest one. */
static int connect_loop(struct ds_db *db, int *steps, double *longest_s)
{
    *steps = 0;
    *longest_s = 0;
    for (;;) {
        int fd = -1;
        short events = 0;
        double t0 = now_s();
        int r = ds_db_connect_poll(db, &fd, &events);
        double took = now_s() - t0;
        if (took > *longest_s)
            *longest_s = took;
        ++*steps;
        if (r != 0)
            return r;
        assert_true(fd >= 0);
        assert_true(events == POLLIN || events == POLLOUT);
        struct pollfd p = { .fd = fd, .events = events };
        poll(&p, 1, 500);
        if (*steps > 1000)
            fail_msg("the attempt did not end in 1000 steps");
    }
}

/* A socket that accepts TCP connections and never answers (the kernel completes the handshakes of the
 * backlog); its port in *port. */
static int silent_server(int *port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(s >= 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof sa;
    assert_int_equal(bind(s, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(s, 8), 0);
    assert_int_equal(getsockname(s, (struct sockaddr *)&sa, &len), 0);
    *port = ntohs(sa.sin_port);
    return s;
}

/* An attempt that never blocks its caller (dsparkd's): it connects with the same defaults as
 * ds_db_connect, reports what libpq reports, gives up after connect_timeout on a server that never
 * answers, goes on to the next host when one does not answer, and each call returns at once. */
static void test_connect_without_waiting(void **state)
{
    (void)state;
    char a[32], b[32];
    int steps;
    double longest;
    struct ds_db *db = NULL;
    assert_int_equal(ds_db_connect_start("dbname=postgres", "t", NULL, NULL, &db), 0);
    assert_int_equal(connect_loop(db, &steps, &longest), 1);
    assert_true(ds_db_ok(db));
    assert_int_equal(ds_db_command(db, "SELECT 1", 0, NULL), 0);
    assert_string_equal(conn_option(db, "connect_timeout", a, sizeof a), "10");
    assert_string_equal(conn_option(db, "keepalives_idle", b, sizeof b), "30");
    int fd;
    short events;
    assert_int_equal(ds_db_connect_poll(db, &fd, &events), 1);   /* connected: nothing more to do */
    ds_db_free(db);

    db = NULL;
    assert_int_equal(ds_db_connect_start("dbname=no_such_database", "t", NULL, NULL, &db), 0);
    assert_int_equal(connect_loop(db, &steps, &longest), -DS_EDB);
    assert_non_null(strstr(ds_errdetail(), "could not connect to the database"));
    assert_non_null(strstr(ds_errdetail(), "no_such_database"));
    ds_db_free(db);

    db = NULL;
    assert_int_equal(ds_db_connect_start("port=notaport", "t", NULL, NULL, &db), 0);
    assert_int_equal(connect_loop(db, &steps, &longest), -DS_EDB);
    assert_non_null(strstr(ds_errdetail(), "notaport"));
    ds_db_free(db);

    int port;
    int s = silent_server(&port);
    char conninfo[400];
    snprintf(conninfo, sizeof conninfo, "host=127.0.0.1 port=%d dbname=x user=x connect_timeout=2", port);
    db = NULL;
    double t0 = now_s();
    assert_int_equal(ds_db_connect_start(conninfo, "t", NULL, NULL, &db), 0);
    assert_int_equal(connect_loop(db, &steps, &longest), -DS_EDB);
    double took = now_s() - t0;
    assert_non_null(strstr(ds_errdetail(), "timeout expired"));
    assert_true(took >= 1.9 && took < 4.0);
    assert_true(longest < 0.5);   /* no call waited for the server (2 s) */
    assert_true(steps >= 2);      /* it was asked again while the attempt went on */
    ds_db_free(db);

    /* the first host does not answer: after its connect_timeout, the next one (the private server) */
    const char *host = getenv("PGHOST"), *pgport = getenv("PGPORT");
    assert_non_null(host);
    snprintf(conninfo, sizeof conninfo, "host=127.0.0.1,%s port=%d,%s dbname=postgres connect_timeout=2", host,
             port, pgport ? pgport : "5432");
    db = NULL;
    t0 = now_s();
    assert_int_equal(ds_db_connect_start(conninfo, "t", NULL, NULL, &db), 0);
    assert_int_equal(connect_loop(db, &steps, &longest), 1);
    took = now_s() - t0;
    assert_true(took >= 1.9);
    assert_int_equal(ds_db_command(db, "SELECT 1", 0, NULL), 0);
    ds_db_free(db);

    /* freed while the attempt is under way: it ends on its own (nothing to wait for here) */
    db = NULL;
    snprintf(conninfo, sizeof conninfo, "host=127.0.0.1 port=%d dbname=x user=x connect_timeout=2", port);
    assert_int_equal(ds_db_connect_start(conninfo, "t", NULL, NULL, &db), 0);
    t0 = now_s();
    ds_db_free(db);
    assert_true(now_s() - t0 < 0.5);
    close(s);
}

/* A setup that LISTENs, sets what it is given, and fails when told to (ds_db_setup_fn). */
static int setup_listen(struct ds_db *db, const char *arg)
{
    if (strcmp(arg, "fail") == 0)
        return ds_seterr(DS_ECONFIG, "setup said no");
    char sql[128];
    snprintf(sql, sizeof sql, "SET application_name = '%s'", arg);
    int r = ds_db_command(db, sql, 0, NULL);
    return r < 0 ? r : ds_db_listen(db, "setup_chan");
}

static void collect_payload(void *ud, const char *channel, const char *payload)
{
    (void)channel;
    snprintf(ud, 64, "%s", payload);
}

/* Until the sent statement is over: poll the socket (for POLLOUT too while ds_db_flush says so), read,
 * take. Returns ds_db_take_result's verdict; *rounds: how many times it was asked. */
static int wait_result(struct ds_db *db, PGresult **res, int writing, int *rounds, char *payload)
{
    for (*rounds = 1;; ++*rounds) {
        if (writing) {
            writing = ds_db_flush(db);
            assert_true(writing >= 0);
        }
        assert_true(ds_db_consume_notify(db, collect_payload, payload) >= 0);
        int r = ds_db_take_result(db, res);
        if (r != 0)
            return r;
        struct pollfd p = { .fd = ds_db_socket(db), .events = POLLIN | (writing ? POLLOUT : 0) };
        assert_true(poll(&p, 1, 5000) > 0);
    }
}

/* The setup runs on the attempt's thread before the attempt is over: its LISTEN is the connection's (a
 * notification sent after connecting arrives); its failure is the attempt's, with its own code. */
static void test_connect_with_setup(void **state)
{
    (void)state;
    int steps;
    double longest;
    struct ds_db *db = NULL;
    assert_int_equal(ds_db_connect_start("dbname=postgres", "t", setup_listen, "set-up-here", &db), 0);
    assert_int_equal(connect_loop(db, &steps, &longest), 1);
    PGresult *res;
    assert_int_equal(ds_db_exec(db, "SHOW application_name", 0, NULL, &res), 0);
    assert_string_equal(PQgetvalue(res, 0, 0), "set-up-here");
    PQclear(res);
    struct ds_db *other = connect_db("postgres");
    assert_int_equal(ds_db_command(other, "NOTIFY setup_chan, 'hello'", 0, NULL), 0);
    char payload[64] = "";
    assert_int_equal(ds_db_wait_notify(db, 5000, collect_payload, payload), 1);
    assert_string_equal(payload, "hello");
    ds_db_free(db);

    db = NULL;
    assert_int_equal(ds_db_connect_start("dbname=postgres", "t", setup_listen, "fail", &db), 0);
    assert_int_equal(connect_loop(db, &steps, &longest), -DS_ECONFIG);
    assert_string_equal(ds_errdetail(), "setup said no");
    ds_db_free(db);

    /* a failed connection never runs the setup: libpq's reason, as without one */
    db = NULL;
    assert_int_equal(ds_db_connect_start("dbname=no_such_database", "t", setup_listen, "fail", &db), 0);
    assert_int_equal(connect_loop(db, &steps, &longest), -DS_EDB);
    assert_non_null(strstr(ds_errdetail(), "no_such_database"));
    ds_db_free(db);
    ds_db_free(other);
}

/* Statements sent without waiting: the call returns before the answer (a 0.5 s sleep), the result comes
 * once the socket is read, notifications that arrive meanwhile are delivered, an error ends the statement
 * with its SQLSTATE, one statement at a time, and a large statement is written in parts. */
static void test_send_without_waiting(void **state)
{
    (void)state;
    struct ds_db *db = connect_db("postgres");
    struct ds_db *other = connect_db("postgres");
    assert_int_equal(ds_db_listen(db, "send_chan"), 0);
    PGresult *res = NULL;
    char payload[64] = "";
    int rounds;

    double t0 = now_s();
    int w = ds_db_send(db, "SELECT pg_sleep(0.5), $1::int * 2", 1, (const char *const[]){ "21" });
    assert_true(w == 0 || w == 1);
    assert_true(now_s() - t0 < 0.2);
    assert_int_equal(ds_db_take_result(db, &res), 0);   /* not yet */
    assert_int_equal(ds_db_send(db, "SELECT 1", 0, NULL), -DS_EINVAL);   /* one at a time */
    assert_int_equal(ds_db_command(other, "NOTIFY send_chan, 'during'", 0, NULL), 0);
    assert_int_equal(wait_result(db, &res, w, &rounds, payload), 1);
    assert_true(now_s() - t0 >= 0.5);
    assert_true(rounds >= 2);
    assert_string_equal(PQgetvalue(res, 0, 1), "42");
    PQclear(res);
    if (!payload[0])   /* sent during the sleep: read with the result or right after it */
        assert_int_equal(ds_db_wait_notify(db, 2000, collect_payload, payload), 1);
    assert_string_equal(payload, "during");

    res = NULL;
    w = ds_db_send(db, "SELECT 1 / $1::int", 1, (const char *const[]){ "0" });
    assert_true(w >= 0);
    assert_int_equal(wait_result(db, &res, w, &rounds, payload), -DS_EDB);
    assert_null(res);
    assert_string_equal(ds_db_sqlstate(db), "22012");
    assert_int_equal(ds_db_take_result(db, &res), -DS_EINVAL);   /* over: nothing under way */

    /* 4 MB of parameter: more than a socket takes at once */
    size_t n = 4u << 20;
    char *big = malloc(n + 1);
    memset(big, 'x', n);
    big[n] = 0;
    w = ds_db_send(db, "SELECT length($1::text)", 1, (const char *const[]){ big });
    free(big);
    assert_int_equal(w, 1);
    assert_int_equal(wait_result(db, &res, w, &rounds, payload), 1);
    assert_string_equal(PQgetvalue(res, 0, 0), "4194304");
    PQclear(res);

    /* the blocking calls still work on the same connection */
    assert_int_equal(ds_db_command(db, "SELECT 1", 0, NULL), 0);
    ds_db_free(other);
    ds_db_free(db);
}

/* A deadline on the blocking calls: statements answered in time work as before (errors too); one that is
 * not fails at the deadline, not at its end. */
static void test_deadline(void **state)
{
    (void)state;
    struct ds_db *db = connect_db("postgres");
    ds_db_set_deadline(db, 2000);
    PGresult *res;
    assert_int_equal(ds_db_exec(db, "SELECT $1::int + 1", 1, (const char *const[]){ "41" }, &res), 0);
    assert_string_equal(PQgetvalue(res, 0, 0), "42");
    PQclear(res);
    assert_int_equal(ds_db_command(db, "SELECT 1 / 0", 0, NULL), -DS_EDB);
    assert_string_equal(ds_db_sqlstate(db), "22012");
    int version;
    assert_int_equal(ds_db_schema_version(db, &version), 0);
    ds_db_set_deadline(db, 300);
    double t0 = now_s();
    assert_int_equal(ds_db_command(db, "SELECT pg_sleep(3)", 0, NULL), -DS_EDB);
    double took = now_s() - t0;
    assert_string_equal(ds_errdetail(), "no answer from the database within 0.3 s");
    assert_true(took >= 0.25 && took < 1.5);
    ds_db_free(db);
}

/* A new connection under a deadline ends by it, not by connect_timeout: here the first of two hosts
 * accepts connections and never answers (connect_timeout 2 s), the second is the private server. */
static void test_reset_under_deadline(void **state)
{
    (void)state;
    int port;
    int s = silent_server(&port);
    const char *host = getenv("PGHOST"), *pgport = getenv("PGPORT");
    assert_non_null(host);
    char conninfo[400];
    snprintf(conninfo, sizeof conninfo, "host=127.0.0.1,%s port=%d,%s dbname=postgres connect_timeout=2", host,
             port, pgport ? pgport : "5432");
    struct ds_db *db = NULL;
    assert_int_equal(ds_db_connect(conninfo, "test-db", &db), 0);   /* (after the silent host's 2 s) */
    struct ds_db *other = connect_db("postgres");
    char pid[16];
    snprintf(pid, sizeof pid, "%d", PQbackendPID(ds_db_conn(db)));
    assert_int_equal(ds_db_command(other, "SELECT pg_terminate_backend($1::int)", 1, (const char *const[]){ pid }),
                     0);
    ds_db_free(other);
    while (ds_db_command(db, "SELECT 1", 0, NULL) == 0)   /* (until the termination has arrived) */
        usleep(10000);
    assert_false(ds_db_ok(db));

    /* under a deadline of 0.7 s: the attempt waits on the silent host until the deadline, then gives up */
    ds_db_set_deadline(db, 700);
    double t0 = now_s();
    assert_int_equal(ds_db_ensure(db, 0), -DS_EDB);
    double took = now_s() - t0;
    assert_true(took >= 0.5 && took < 1.5);
    assert_false(ds_db_ok(db));
    assert_string_equal(ds_errdetail(), "database connection is down: no answer from the database within 0.7 s");
    assert_string_equal(ds_db_sqlstate(db), DS_DB_SQLSTATE_CONNECTION);

    /* without one: libpq's own rules, the silent host's connect_timeout, then the next host */
    ds_db_set_deadline(db, 0);
    t0 = now_s();
    assert_int_equal(ds_db_ensure(db, 5000), 1);
    took = now_s() - t0;
    assert_true(took >= 1.9 && took < 5.0);
    assert_int_equal(ds_db_command(db, "SELECT 1", 0, NULL), 0);
    ds_db_free(db);
    close(s);
}

/* Server processes this test stopped (SIGSTOP), continued at exit whatever happens, so that the
 * harness can stop the server. */
static pid_t stopped[4];
static int n_stopped;

static void continue_stopped(void)
{
    for (int i = 0; i < n_stopped; i++)
        kill(stopped[i], SIGCONT);
    n_stopped = 0;
}

static int continue_stopped_after(void **state)
{
    (void)state;
    continue_stopped();
    return 0;
}

static void stop_server_process(struct ds_db *db)
{
    pid_t pid = PQbackendPID(ds_db_conn(db));
    assert_true(pid > 0 && n_stopped < 4);
    assert_int_equal(kill(pid, SIGSTOP), 0);
    stopped[n_stopped++] = pid;
}

static char *show_statement_timeout(struct ds_db *db)
{
    PGresult *res;
    assert_int_equal(ds_db_exec(db, "SHOW statement_timeout", 0, NULL, &res), 0);
    static char value[32];
    snprintf(value, sizeof value, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    return value;
}

static void test_timeouts(void **state)
{
    (void)state;
    struct ds_db *db = connect_db("postgres");
    assert_int_equal(ds_db_set_timeouts(db, 700, 400), 0);
    assert_string_equal(show_statement_timeout(db), "700ms");
    /* the server's own timeout: the statement fails, the connection stays */
    assert_int_equal(ds_db_command(db, "SELECT pg_sleep(3)", 0, NULL), -DS_EDB);
    assert_string_equal(ds_db_sqlstate(db), "57014");
    assert_true(ds_db_ok(db));
    assert_int_equal(ds_db_command(db, "SELECT 1", 0, NULL), 0);
    /* a statement_timeout the conninfo sets is the session's own: kept */
    struct ds_db *own = NULL;
    assert_int_equal(ds_db_connect("dbname=postgres options='-c statement_timeout=1500'", "test-db", &own), 0);
    assert_int_equal(ds_db_set_timeouts(own, 700, 400), 0);
    assert_string_equal(show_statement_timeout(own), "1500ms");
    ds_db_free(own);
    /* one too long for milliseconds in an int: no bound, rather than the grace alone */
    assert_int_equal(ds_db_connect("dbname=postgres options='-c statement_timeout=2000000000'", "test-db", &own), 0);
    assert_int_equal(ds_db_set_timeouts(own, 700, 400), 0);
    assert_int_equal(ds_db_command(own, "SELECT pg_sleep(0.6)", 0, NULL), 0);
    assert_true(ds_db_ok(own));
    ds_db_free(own);

    /* the server process stops answering: the answer is waited for 0.7 + 0.4 s, then the connection is
     * given up, and later calls fail at once */
    assert_int_equal(ds_db_listen(db, "test_timeouts"), 0);
    stop_server_process(db);
    double t0 = now_s();
    assert_int_equal(ds_db_command(db, "SELECT 1", 0, NULL), -DS_EDB);
    double took = now_s() - t0;
    assert_string_equal(ds_errdetail(),
                        "no answer from the database within 1.1 s (statement_timeout 0.7 s); giving the connection up");
    assert_string_equal(ds_db_sqlstate(db), "08006");
    assert_true(took >= 1.05 && took < 2.5);
    assert_false(ds_db_ok(db));
    assert_int_equal(ds_db_socket(db), -1);
    t0 = now_s();
    assert_int_equal(ds_db_command(db, "SELECT 1", 0, NULL), -DS_EDB);
    assert_true(now_s() - t0 < 0.5);
    assert_non_null(strstr(ds_errdetail(), "given up"));

    /* a new connection, with the same statement_timeout and the channel listened to again */
    assert_int_equal(ds_db_ensure(db, 5000), 1);
    assert_string_equal(show_statement_timeout(db), "700ms");
    assert_int_equal(ds_db_command(db, "NOTIFY test_timeouts, 'again'", 0, NULL), 0);
    assert_int_equal(ds_db_wait_notify(db, 2000, NULL, NULL), 1);

    /* a statement far larger than the socket's buffers, to a server process that reads nothing: the write
     * does not block past the bound either */
    stop_server_process(db);
    size_t big = 8u << 20;
    char *text = malloc(big + 1);
    assert_non_null(text);
    memset(text, 'x', big);
    text[big] = 0;
    t0 = now_s();
    assert_int_equal(ds_db_command(db, "SELECT length($1)", 1, (const char *const[]){ text }), -DS_EDB);
    took = now_s() - t0;
    free(text);
    assert_non_null(strstr(ds_errdetail(), "no answer from the database within 1.1 s"));
    assert_true(took >= 1.05 && took < 2.5);

    /* the server processes continue; the given-up ones end on their own */
    continue_stopped();
    assert_int_equal(ds_db_ensure(db, 5000), 1);
    assert_int_equal(ds_db_command(db, "SELECT 1", 0, NULL), 0);
    assert_int_equal(ds_db_reconnects(db), 2);
    ds_db_free(db);
}

static void test_errors_carry_sqlstate(void **state)
{
    (void)state;
    struct ds_db *db = connect_db("postgres");
    PGresult *res = NULL;
    int r = ds_db_exec(db, "SELECT 1 / $1::int", 1, (const char *const[]){ "0" }, &res);
    assert_int_equal(r, -DS_EDB);
    assert_null(res);
    assert_string_equal(ds_db_sqlstate(db), "22012");
    assert_non_null(strstr(ds_errdetail(), "division by zero [SQLSTATE 22012]"));

    /* detail and hint travel with the message */
    r = ds_db_command(db,
                      "DO $$ BEGIN RAISE EXCEPTION 'boom' USING DETAIL = 'the detail', "
                      "HINT = 'the hint', ERRCODE = '22023'; END $$",
                      0, NULL);
    assert_int_equal(r, -DS_EDB);
    assert_string_equal(ds_errdetail(), "boom: the detail (hint: the hint) [SQLSTATE 22023]");

    /* success clears the SQLSTATE; results come back */
    r = ds_db_exec(db, "SELECT $1::int + 1", 1, (const char *const[]){ "41" }, &res);
    assert_int_equal(r, 0);
    assert_string_equal(ds_db_sqlstate(db), "");
    assert_string_equal(PQgetvalue(res, 0, 0), "42");
    PQclear(res);

    /* NULL parameters are SQL NULL; the session speaks UTF-8 */
    r = ds_db_exec(db, "SELECT $1::text IS NULL, current_setting('client_encoding'), "
                       "current_setting('application_name')",
                   1, (const char *const[]){ NULL }, &res);
    assert_int_equal(r, 0);
    assert_string_equal(PQgetvalue(res, 0, 0), "t");
    assert_string_equal(PQgetvalue(res, 0, 1), "UTF8");
    assert_string_equal(PQgetvalue(res, 0, 2), "test-db");
    PQclear(res);

    /* transactions */
    assert_int_equal(ds_db_begin(db), 0);
    assert_int_equal(ds_db_command(db, "CREATE TEMP TABLE t (x int)", 0, NULL), 0);
    assert_int_equal(ds_db_command(db, "INSERT INTO t VALUES (1)", 0, NULL), 0);
    ds_db_rollback(db);
    r = ds_db_command(db, "SELECT * FROM t", 0, NULL);
    assert_int_equal(r, -DS_EDB);
    assert_string_equal(ds_db_sqlstate(db), "42P01");
    ds_db_rollback(db); /* nothing open: harmless */
    ds_db_free(db);
}

static void test_schema_and_migrations(void **state)
{
    (void)state;
    struct ds_db *admin = connect_db("postgres");
    assert_int_equal(ds_db_command(admin, "DROP DATABASE IF EXISTS mig", 0, NULL), 0);
    assert_int_equal(ds_db_command(admin, "CREATE DATABASE mig", 0, NULL), 0);
    struct ds_db *db = connect_db("mig");

    int v = -1;
    assert_int_equal(ds_db_schema_version(db, &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(ds_db_check_schema(db), -DS_EDB);
    assert_string_equal(ds_errdetail(), "database has no dspark schema: run 'dsparkctl db init'");

    int from = -1, to = -1;
    assert_int_equal(ds_db_migrate(db, NULL, &from, &to), 0);
    assert_int_equal(from, 0);
    assert_int_equal(to, DS_SCHEMA_VERSION);
    assert_int_equal(ds_db_check_schema(db), 0);
    assert_int_equal(ds_db_migrate(db, NULL, &from, &to), 0);
    assert_int_equal(from, DS_SCHEMA_VERSION);
    assert_int_equal(to, DS_SCHEMA_VERSION);

    /* an older database is told to migrate; a newer one is refused */
    assert_int_equal(ds_db_command(db, "DELETE FROM dspark.schema_version WHERE version >= 2", 0,
                                   NULL), 0);
    assert_int_equal(ds_db_check_schema(db), -DS_EDB);
    char want[200];
    snprintf(want, sizeof want,
             "database schema version 1, this build knows %d: run 'dsparkctl db migrate'",
             DS_SCHEMA_VERSION);
    assert_string_equal(ds_errdetail(), want);
    char sql[200], future[100];
    snprintf(sql, sizeof sql, "INSERT INTO dspark.schema_version VALUES (2, now(), '002-queue'), "
             "(3, now(), '003-throughput'), (%d, now(), 'future')", DS_SCHEMA_VERSION + 1);
    assert_int_equal(ds_db_command(db, sql, 0, NULL), 0);
    assert_int_equal(ds_db_check_schema(db), -DS_EDB);
    snprintf(future, sizeof future, "database schema version %d, this build knows", DS_SCHEMA_VERSION + 1);
    assert_non_null(strstr(ds_errdetail(), future));
    assert_int_equal(ds_db_migrate(db, NULL, NULL, NULL), -DS_EDB);
    assert_non_null(strstr(ds_errdetail(), "is newer than this build knows"));

    /* a failing migration rolls back and names itself */
    struct ds_db *db2;
    assert_int_equal(ds_db_command(admin, "CREATE DATABASE mig2", 0, NULL), 0);
    db2 = connect_db("mig2");
    assert_int_equal(ds_db_command(db2, "CREATE SCHEMA dspark", 0, NULL), 0);
    assert_int_equal(ds_db_migrate(db2, NULL, NULL, NULL), -DS_EDB);
    assert_non_null(strstr(ds_errdetail(), "migration '001-schema': "));
    assert_non_null(strstr(ds_errdetail(), "[SQLSTATE 42P06]"));
    assert_int_equal(ds_db_schema_version(db2, &v), 0);
    assert_int_equal(v, 0);
    /* from the files of sql/ */
    assert_int_equal(ds_db_command(db2, "DROP SCHEMA dspark", 0, NULL), 0);
    assert_int_equal(ds_db_migrate(db2, ds_test_path("sql"), &from, &to), 0);
    assert_int_equal(to, DS_SCHEMA_VERSION);
    assert_int_equal(ds_db_migrate(db2, "/nonexistent-dir", NULL, NULL), -DS_EIO);
    ds_db_free(db2);
    ds_db_free(db);
    ds_db_free(admin);
}

/* The embedded migrations are exactly the files of sql/. */
static void test_embedded_equals_files(void **state)
{
    (void)state;
    size_t n;
    const struct ds_db_migration *m = ds_db_migrations(&n);
    assert_true(n >= 2);
    assert_int_equal(m[n - 1].version, DS_SCHEMA_VERSION);
    for (size_t i = 0; i < n; i++) {
        char rel[256];
        snprintf(rel, sizeof rel, "sql/%s.sql", m[i].name);
        size_t len;
        char *text = ds_test_read_file(ds_test_path(rel), &len);
        assert_non_null(text);
        assert_int_equal(strlen(m[i].sql), len);
        assert_memory_equal(m[i].sql, text, len);
        assert_int_equal(m[i].version, atoi(m[i].name));
        if (i)
            assert_true(m[i].version > m[i - 1].version);
        free(text);
    }
}

static void test_ids(void **state)
{
    (void)state;
    int64_t *ids;
    size_t n;
    assert_int_equal(ds_db_parse_ids("12,13,9000000000", &ids, &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 12);
    assert_int_equal(ids[2], 9000000000LL);
    char *s = ds_db_int64_array(ids, n);
    assert_string_equal(s, "{12,13,9000000000}");
    free(s);
    free(ids);
    assert_int_equal(ds_db_parse_ids("", &ids, &n), 0);
    assert_int_equal(n, 0);
    s = ds_db_int64_array(NULL, 0);
    assert_string_equal(s, "{}");
    free(s);
    const char *bad[] = { "1,,2", "1,", ",1", "a", "1;2", "-1", "1 2" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(ds_db_parse_ids(bad[i], &ids, &n), -DS_EFORMAT);

    /* notification entries: id:version:state:attempt */
    struct ds_db_transition *tr;
    const char *payload = "12:1:q:0,12:2:r:1,9000000000:7:c:3";
    assert_int_equal(ds_db_parse_transitions(payload, &tr, &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(tr[0].id, 12);
    assert_int_equal(tr[0].version, 1);
    assert_string_equal(tr[0].state, "queued");
    assert_int_equal(tr[0].attempt, 0);
    assert_int_equal(tr[1].version, 2);
    assert_string_equal(tr[1].state, "running");
    assert_int_equal(tr[1].attempt, 1);
    assert_int_equal(tr[2].id, 9000000000LL);
    assert_int_equal(tr[2].version, 7);
    assert_string_equal(tr[2].state, "cancelled");
    assert_int_equal(tr[2].attempt, 3);
    free(tr);
    assert_int_equal(ds_db_parse_ids(payload, &ids, &n), 0);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 12);
    assert_int_equal(ids[1], 12);
    assert_int_equal(ids[2], 9000000000LL);
    free(ids);
    const char *bad_tr[] = { "12", "1:1:x:0", "1:1:q", "1:1:q:0,", "1:-1:q:0", "1:1:q:2147483648",
                             "9223372036854775808:1:q:0", " 1:1:q:0", "1:1:s:1:7" };
    for (size_t i = 0; i < sizeof bad_tr / sizeof bad_tr[0]; i++) {
        assert_int_equal(ds_db_parse_transitions(bad_tr[i], &tr, &n), -DS_EFORMAT);
        assert_non_null(strstr(ds_errdetail(), "entry "));
    }
}

struct got {
    int n;
    char payload[64];
};

static void on_notify(void *ud, const char *channel, const char *payload)
{
    struct got *g = ud;
    assert_string_equal(channel, "test_chan");
    snprintf(g->payload, sizeof g->payload, "%s", payload);
    g->n++;
}

static void test_listen_and_reconnect(void **state)
{
    (void)state;
    struct ds_db *db = connect_db("postgres");
    struct ds_db *other = connect_db("postgres");
    assert_int_equal(ds_db_listen(db, "test_chan"), 0);
    assert_true(ds_db_socket(db) >= 0);
    struct got g = { 0 };
    assert_int_equal(ds_db_wait_notify(db, 50, on_notify, &g), 0); /* timeout */
    assert_int_equal(ds_db_command(other, "NOTIFY test_chan, 'one'", 0, NULL), 0);
    int r = ds_db_wait_notify(db, 5000, on_notify, &g);
    assert_int_equal(r, 1);
    assert_string_equal(g.payload, "one");
    assert_int_equal(ds_db_ensure(db, 0), 0); /* healthy: nothing to do */
    assert_int_equal(ds_db_reconnects(db), 0);

    /* the server restarts under us */
    assert_int_equal(restart_server("-m fast restart"), 0);
    PGresult *res;
    r = ds_db_exec(db, "SELECT 1", 0, NULL, &res);
    assert_int_equal(r, -DS_EDB);
    assert_string_equal(ds_db_sqlstate(db), DS_DB_SQLSTATE_CONNECTION);
    assert_false(ds_db_ok(db));
    assert_int_equal(ds_db_ensure(db, 10000), 1);
    assert_true(ds_db_ok(db));
    assert_int_equal(ds_db_reconnects(db), 1);
    r = ds_db_exec(db, "SELECT 2", 0, NULL, &res);
    assert_int_equal(r, 0);
    assert_string_equal(PQgetvalue(res, 0, 0), "2");
    PQclear(res);
    /* the LISTEN was issued again */
    ds_db_free(other);
    other = connect_db("postgres");
    assert_int_equal(ds_db_command(other, "NOTIFY test_chan, 'two'", 0, NULL), 0);
    r = ds_db_wait_notify(db, 5000, on_notify, &g);
    assert_int_equal(r, 1);
    assert_string_equal(g.payload, "two");

    /* the server is down for a while: ensure gives up after its wait, then
     * succeeds once the server is back */
    ds_db_free(other);
    assert_int_equal(restart_server("-m fast stop"), 0);
    r = ds_db_exec(db, "SELECT 1", 0, NULL, &res);
    assert_int_equal(r, -DS_EDB);
    double t0 = now_s();
    assert_int_equal(ds_db_ensure(db, 700), -DS_EDB);
    double waited = now_s() - t0;
    assert_true(waited >= 0.3 && waited < 5.0);
    assert_non_null(strstr(ds_errdetail(), "database connection is down"));
    assert_int_equal(ds_db_ensure(db, 0), -DS_EDB); /* backing off: no hammering */
    assert_int_equal(restart_server("start"), 0);
    assert_int_equal(ds_db_ensure(db, 15000), 1);
    assert_int_equal(ds_db_reconnects(db), 2);
    assert_int_equal(ds_db_command(db, "SELECT 1", 0, NULL), 0);
    ds_db_free(db);
}

int main(void)
{
    if (!getenv("PGH_SCRIPT"))
        ds_test_skip_all("run through tests/integration/test-db.sh (needs its PostgreSQL)");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_connect_errors),
        cmocka_unit_test(test_connection_defaults),
        cmocka_unit_test(test_connect_without_waiting),
        cmocka_unit_test(test_connect_with_setup),
        cmocka_unit_test(test_send_without_waiting),
        cmocka_unit_test(test_deadline),
        cmocka_unit_test(test_reset_under_deadline),
        cmocka_unit_test_teardown(test_timeouts, continue_stopped_after),
        cmocka_unit_test(test_errors_carry_sqlstate),
        cmocka_unit_test(test_schema_and_migrations),
        cmocka_unit_test(test_embedded_equals_files),
        cmocka_unit_test(test_ids),
        cmocka_unit_test(test_listen_and_reconnect),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
