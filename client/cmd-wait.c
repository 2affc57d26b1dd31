/* cmd-wait.c: dsparkctl wait and watch: follow jobs until they finish.
 *
 * The loop reads the jobs' progress from PostgreSQL, then blocks on an event
 * source (events.h: dsparkd's ZeroMQ events, else PostgreSQL LISTEN, else
 * sleep) until a hint arrives or the poll interval passes. wait
 * shows a progress bar on a terminal (done/total, failures, tokens/s) and
 * exits 0 when every job succeeded, 3 when some failed or were cancelled, 4
 * on --timeout. watch prints one line (or JSON object) per state change,
 * re-reading just the hinted rows, and at each poll interval every job's
 * state, then the rows whose state changed.
 * keygen prints a CURVE key pair for a client of events published to other
 * hosts. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dspark/ds-events.h"
#include "ctl.h"
#include "events.h"
#include "request.h"

#define MIN_QUERY_GAP_MS 200
#define TIMEOUT_SLACK_MS 500   /* a statement's answer may come this long after --timeout */
#define RATE_WINDOW 16

static void wait_usage(FILE *f, bool watch)
{
    fprintf(f,
            "usage: dsparkctl %s [OPTIONS] ID...\n"
            "       dsparkctl %s [OPTIONS] --batch BATCH\n"
            "\n"
            "%s\n"
            "\n"
            "  -b, --batch BATCH     the jobs of a batch\n"
            "  -t, --timeout SECS    give up after SECS seconds (exit status 4)\n"
            "  -i, --interval SECS   re-read everything at least this often (default 1)\n"
            "  -e, --events ENDPOINT dsparkd's ZeroMQ events (default: $DSPARK_EVENTS, else\n"
            "                        " DS_EVENTS_DEFAULT_ENDPOINT " when that socket exists)\n"
            "      --events-server-key FILE\n"
            "                        dsparkd's CURVE public key, for events over tcp: a\n"
            "                        file as 'dsparkd --curve-keypair' writes it, or the key\n"
            "                        (default: $DSPARK_EVENTS_SERVER_KEY)\n"
            "      --events-key FILE this client's CURVE key pair, as 'dsparkctl keygen'\n"
            "                        writes it (default: $DSPARK_EVENTS_KEY)\n"
            "      --no-events       do not use ZeroMQ events\n"
            "      --poll            use neither ZeroMQ nor LISTEN: only poll\n"
            "  -v, --verbose         say where the hints come from\n"
            "      --no-progress     no progress bar even on a terminal\n"
            "  -d, --dsn DSN, --json, -q, --quiet, -h, --help\n"
            "\n"
            "Exit status: 0 all succeeded, 1 error, 2 usage, 3 some failed or were\n"
            "cancelled, 4 timed out.\n",
            watch ? "watch" : "wait", watch ? "watch" : "wait",
            watch ? "Print each state change of the jobs (one JSON object per line with --json)\n"
                    "until all of them have finished."
                  : "Wait until the jobs have finished, with a progress bar on a terminal\n"
                    "(done/total, failures, output tokens per second).");
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct progress {
    int64_t total, queued, running, succeeded, failed, cancelled, tokens;
};

/* id -> last printed state and attempt, seen_code (watch). */
struct seen {
    int64_t *ids, *states;
    size_t cap, n;
};

static int64_t *seen_slot(struct seen *s, int64_t id)
{
    if (s->n * 2 >= s->cap) {
        struct seen big = { 0 };
        big.cap = s->cap ? s->cap * 2 : 1024;
        big.ids = ds_xcalloc(big.cap, sizeof *big.ids);
        big.states = ds_xcalloc(big.cap, sizeof *big.states);
        for (size_t i = 0; i < s->cap; i++)
            if (s->ids[i]) {
                size_t j = (size_t)(s->ids[i] * 0x9E3779B97F4A7C15ULL) & (big.cap - 1);
                while (big.ids[j])
                    j = (j + 1) & (big.cap - 1);
                big.ids[j] = s->ids[i];
                big.states[j] = s->states[i];
            }
        big.n = s->n;
        free(s->ids);
        free(s->states);
        *s = big;
    }
    size_t j = (size_t)(id * 0x9E3779B97F4A7C15ULL) & (s->cap - 1);
    while (s->ids[j] && s->ids[j] != id)
        j = (j + 1) & (s->cap - 1);
    if (!s->ids[j]) {
        s->ids[j] = id;
        s->n++;
    }
    return &s->states[j];
}

struct hints {
    int64_t *ids;
    size_t n, cap;
    bool all;
};

static void on_hint(void *ud, int64_t id)
{
    struct hints *h = ud;
    if (id < 0 || h->n >= 100000) {
        h->all = true;
        return;
    }
    if (h->n == h->cap)
        h->ids = ds_xrealloc(h->ids, (h->cap = h->cap ? h->cap * 2 : 64) * sizeof *h->ids);
    h->ids[h->n++] = id;
}

struct waiter {
    struct ctl *c;
    bool watch;
    const char *batch;  /* text id or NULL */
    char *ids;          /* array literal or NULL */
    size_t nids;
    struct seen seen;
};

static int read_progress(struct waiter *w, struct progress *p)
{
    const char *params[] = { w->batch ? w->batch : w->ids };
    const char *sql = w->batch
        ? "SELECT count(*), count(*) FILTER (WHERE j.state = 'queued'),"
          " count(*) FILTER (WHERE j.state = 'running'),"
          " count(*) FILTER (WHERE j.state = 'succeeded'),"
          " count(*) FILTER (WHERE j.state = 'failed'),"
          " count(*) FILTER (WHERE j.state = 'cancelled'), coalesce(sum(s.output_tokens), 0)"
          " FROM dspark.jobs j LEFT JOIN dspark.job_stats s"
          " ON s.job_id = j.id AND s.attempt = j.attempt WHERE j.batch_id = $1::bigint"
        : "SELECT count(*), count(*) FILTER (WHERE j.state = 'queued'),"
          " count(*) FILTER (WHERE j.state = 'running'),"
          " count(*) FILTER (WHERE j.state = 'succeeded'),"
          " count(*) FILTER (WHERE j.state = 'failed'),"
          " count(*) FILTER (WHERE j.state = 'cancelled'), coalesce(sum(s.output_tokens), 0)"
          " FROM dspark.jobs j LEFT JOIN dspark.job_stats s"
          " ON s.job_id = j.id AND s.attempt = j.attempt WHERE j.id = ANY ($1::bigint[])";
    PGresult *res;
    int r = ds_db_exec(w->c->db, sql, 1, params, &res);
    if (r < 0)
        return r;
    int64_t v[7];
    for (int i = 0; i < 7; i++)
        v[i] = strtoll(PQgetvalue(res, 0, i), NULL, 10);
    PQclear(res);
    *p = (struct progress){ v[0], v[1], v[2], v[3], v[4], v[5], v[6] };
    return 0;
}

static const char *const job_states[] = { "queued", "running", "succeeded", "failed", "cancelled" };

/* A state's code in struct seen: 1..5, 0 for none. */
static int64_t state_code(const char *state)
{
    for (int k = 0; k < 5; k++)
        if (state && strcmp(state, job_states[k]) == 0)
            return k + 1;
    return 0;
}

/* What watch compares: the state and the attempt, so that a retry claimed again between two reads (running,
 * queued, running) prints its new attempt. */
static int64_t seen_code(const char *state, int64_t attempt)
{
    return state_code(state) + 8 * attempt;
}

/* watch: read rows (all, or the hinted ids) and print the changed ones. */
static int read_rows(struct waiter *w, const struct hints *h)
{
    char *hinted = NULL;
    const char *params[2] = { w->batch ? w->batch : w->ids, NULL };
    struct ds_buf sql = { 0 };
    ds_buf_puts(&sql,
                 "SELECT json_build_object('id', j.id, 'batch_id', j.batch_id, 'custom_id',"
                 " j.custom_id, 'state', j.state, 'attempt', j.attempt, 'version', j.version,"
                 " 'finish_reason', j.finish_reason, 'error', j.error, 'worker_id', j.worker_id,"
                 " 'output_tokens', s.output_tokens, 'decode_tokens_per_s', s.decode_tokens_per_s,"
                 " 'mean_acceptance_length', s.mean_acceptance_length)"
                 " FROM dspark.jobs j LEFT JOIN dspark.job_stats s"
                 " ON s.job_id = j.id AND s.attempt = j.attempt WHERE ");
    ds_buf_puts(&sql, w->batch ? "j.batch_id = $1::bigint" : "j.id = ANY ($1::bigint[])");
    int np = 1;
    if (h && !h->all) {
        hinted = ds_db_int64_array(h->ids, h->n);
        params[1] = hinted;
        np = 2;
        ds_buf_puts(&sql, " AND j.id = ANY ($2::bigint[])");
    }
    ds_buf_puts(&sql, " ORDER BY j.id");
    json_t *rows;
    int r = ctl_query_json(w->c, sql.data, np, params, &rows);
    ds_buf_free(&sql);
    free(hinted);
    if (r < 0)
        return r;
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row) {
        int64_t id = json_integer_value(json_object_get(row, "id"));
        const char *state = json_string_value(json_object_get(row, "state"));
        int64_t code = seen_code(state, json_integer_value(json_object_get(row, "attempt")));
        /* print state changes and new attempts only (a heartbeat bumps the version too) */
        int64_t *slot = seen_slot(&w->seen, id);
        if (*slot == code)
            continue;
        *slot = code;
        if (!state)
            continue;
        if (w->c->json) {
            ctl_print_json(row, true);
            continue;
        }
        char b1[128], b2[64], b3[64];
        printf("job %" PRId64, id);
        json_t *cid = json_object_get(row, "custom_id");
        if (json_is_string(cid))
            printf(" (%s)", ctl_cell(cid, b1, sizeof b1));
        printf(": %s", state);
        if (strcmp(state, job_states[1]) == 0)
            printf(" (attempt %s, worker %s)",
                   ctl_cell(json_object_get(row, "attempt"), b2, sizeof b2),
                   ctl_cell(json_object_get(row, "worker_id"), b1, sizeof b1));
        else if (strcmp(state, job_states[2]) == 0)
            printf(" (%s tokens, %s tok/s, tau %s)",
                   ctl_cell(json_object_get(row, "output_tokens"), b1, sizeof b1),
                   ctl_cell_real(json_object_get(row, "decode_tokens_per_s"), 1, b2, sizeof b2),
                   ctl_cell_real(json_object_get(row, "mean_acceptance_length"), 2, b3,
                                 sizeof b3));
        else if (strcmp(state, job_states[3]) == 0 || strcmp(state, job_states[4]) == 0)
            printf(": %s", ctl_cell(json_object_get(row, "error"), b1, sizeof b1));
        printf("\n");
    }
    json_decref(rows);
    fflush(stdout);
    return 0;
}

/* watch's full read: the jobs' states and attempts alone first (a few bytes a row), then the whole rows of those whose state
 * changed since last printed; all of them at once where those are more than a quarter of the jobs (the first
 * read). */
static int read_changes(struct waiter *w, const struct hints *h)
{
    if (h && !h->all)
        return read_rows(w, h);
    const char *params[1] = { w->batch ? w->batch : w->ids };
    PGresult *res;
    int r = ds_db_exec(w->c->db,
                       w->batch ? "SELECT j.id, j.state, j.attempt FROM dspark.jobs j WHERE j.batch_id = $1::bigint"
                                : "SELECT j.id, j.state, j.attempt FROM dspark.jobs j WHERE j.id = ANY ($1::bigint[])",
                       1, params, &res);
    if (r < 0)
        return r;
    struct hints changed = { 0 };
    int rows = PQntuples(res);
    for (int i = 0; i < rows; i++) {
        int64_t id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        if (*seen_slot(&w->seen, id) != seen_code(PQgetvalue(res, i, 1), strtoll(PQgetvalue(res, i, 2), NULL, 10)))
            on_hint(&changed, id);
    }
    PQclear(res);
    if (changed.n > 0 || changed.all)
        r = read_rows(w, changed.all || changed.n * 4 > (size_t)rows ? NULL : &changed);
    free(changed.ids);
    return r;
}

static void draw_bar(const struct progress *p, double rate, double elapsed)
{
    int64_t done = p->succeeded + p->failed + p->cancelled;
    int width = 30, fill = p->total ? (int)(width * done / p->total) : 0;
    char bar[64];
    for (int i = 0; i < width; i++)
        bar[i] = i < fill ? '#' : '.';
    bar[width] = 0;
    fprintf(stderr, "\r\033[K[%s] %" PRId64 "/%" PRId64 " done", bar, done, p->total);
    if (p->failed + p->cancelled)
        fprintf(stderr, " (%" PRId64 " failed, %" PRId64 " cancelled)", p->failed, p->cancelled);
    fprintf(stderr, ", %" PRId64 " running", p->running);
    if (rate >= 0)
        fprintf(stderr, ", %.0f tok/s", rate);
    fprintf(stderr, ", %.0f s", elapsed);
    fflush(stderr);
}

int ctl_cmd_wait(struct ctl *c, int argc, char **argv)
{
    bool watch = strcmp(argv[0], "watch") == 0;
    enum { O_POLL = 256, O_NOPROGRESS, O_NOEVENTS, O_SERVERKEY, O_CLIENTKEY };
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "batch", required_argument, NULL, 'b' },
        { "timeout", required_argument, NULL, 't' },
        { "interval", required_argument, NULL, 'i' },
        { "poll", no_argument, NULL, O_POLL },
        { "events", required_argument, NULL, 'e' },
        { "no-events", no_argument, NULL, O_NOEVENTS },
        { "events-server-key", required_argument, NULL, O_SERVERKEY },
        { "events-key", required_argument, NULL, O_CLIENTKEY },
        { "verbose", no_argument, NULL, 'v' },
        { "no-progress", no_argument, NULL, O_NOPROGRESS },
        { NULL, 0, NULL, 0 },
    };
    const char *cmd = watch ? "watch" : "wait";
    char cmdsp[16];
    snprintf(cmdsp, sizeof cmdsp, "%s ", cmd);
    struct waiter w = { .c = c, .watch = watch };
    double timeout = -1, interval = 1.0;
    bool poll_only = false, no_progress = false, no_events = false, verbose = false;
    const char *endpoint = getenv("DSPARK_EVENTS");
    if (endpoint && !*endpoint)
        endpoint = NULL;
    const char *server_key = getenv("DSPARK_EVENTS_SERVER_KEY");
    const char *client_key = getenv("DSPARK_EVENTS_KEY");
    bool server_key_opt = false, client_key_opt = false;
    int64_t bid;
    int opt;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "b:t:i:e:v", opts, NULL)) != -1) {
        if (ctl_common_opt(c, opt, optarg))
            continue;
        switch (opt) {
        case 'h':
            wait_usage(stdout, watch);
            return CTL_EXIT_OK;
        case 'b':
            if (ctl_parse_int64(cmd, "--batch", optarg, 1, INT64_MAX, &bid))
                return CTL_EXIT_USAGE;
            w.batch = optarg;
            break;
        case 't':
            if (ctl_parse_double(cmd, "--timeout", optarg, &timeout))
                return CTL_EXIT_USAGE;
            if (!(timeout >= 0 && timeout <= 1e9))
                return ctl_usage_error(cmdsp, "--timeout must be between 0 and 1e9 seconds");
            break;
        case 'i':
            if (ctl_parse_double(cmd, "--interval", optarg, &interval))
                return CTL_EXIT_USAGE;
            if (!(interval >= 0.05 && interval <= 3600))
                return ctl_usage_error(cmdsp, "--interval must be between 0.05 and 3600 seconds");
            break;
        case O_POLL: poll_only = true; break;
        case 'e': endpoint = optarg; break;
        case O_NOEVENTS: no_events = true; break;
        case O_SERVERKEY:
            server_key = optarg;
            server_key_opt = true;
            break;
        case O_CLIENTKEY:
            client_key = optarg;
            client_key_opt = true;
            break;
        case 'v': verbose = true; break;
        case O_NOPROGRESS: no_progress = true; break;
        default:
            wait_usage(stderr, watch);
            return CTL_EXIT_USAGE;
        }
    }
    if (server_key && !*server_key)
        server_key = NULL;
    if (client_key && !*client_key)
        client_key = NULL;
    bool use_zmq = !poll_only && !no_events;
    /* the keys matter only for ZeroMQ events; a client key from the
     * environment alone is ignored (local events need no CURVE) */
    if (use_zmq && server_key && !client_key)
        return ctl_usage_error(cmdsp,
                               "%s needs this client's CURVE key pair: give --events-key FILE"
                               " or set DSPARK_EVENTS_KEY",
                               server_key_opt ? "--events-server-key"
                                              : "$DSPARK_EVENTS_SERVER_KEY");
    if (use_zmq && client_key_opt && !server_key)
        return ctl_usage_error(cmdsp,
                               "--events-key needs dsparkd's public key: give"
                               " --events-server-key FILE or set DSPARK_EVENTS_SERVER_KEY");
    int urc = ctl_parse_selection(cmd, argc, argv, optind, w.batch, &w.ids, &w.nids);
    if (urc)
        return urc;
    struct ds_events_sub_opts so = { .endpoint = endpoint };
    struct ctl_curve_keys keys;
    if (use_zmq && server_key && ctl_events_read_keys(server_key, client_key, &keys, &so) < 0) {
        free(w.ids);
        return ctl_fail(NULL);
    }
    int rc = ctl_connect(c, true);
    if (rc) {
        free(w.ids);
        return rc;
    }

    /* the event source opens before the first read of the rows */
    struct ctl_events *ev = NULL;
    if (use_zmq) {
        /* the default endpoint only when its socket is there (no dsparkd on
         * this host: no wait for an answer) */
        const char *def = DS_EVENTS_DEFAULT_ENDPOINT;
        const char *ep = endpoint;
        if (!ep && strncmp(def, "ipc://", 6) == 0 && access(def + 6, F_OK) == 0)
            ep = def;
        so.endpoint = ep;
        if (!ep && server_key && verbose)
            fprintf(stderr, "dsparkctl: no ZeroMQ events (no endpoint: give --events or set"
                            " DSPARK_EVENTS)\n");
        if (ep && ctl_events_zmq(&so, w.batch ? strtoll(w.batch, NULL, 10) : 0, 1000, &ev) < 0) {
            if ((endpoint || server_key) && !c->quiet)
                ctl_warn("no ZeroMQ events (%s), using the database", ds_errdetail());
            else if (verbose)
                fprintf(stderr, "dsparkctl: no ZeroMQ events (%s)\n", ds_errdetail());
            ev = NULL;
        }
        if (ev && verbose)
            fprintf(stderr, "dsparkctl: hints from ZeroMQ events at %s%s\n", ep,
                    so.curve_server_key ? " (CURVE)" : "");
    }
    if (!ev && !poll_only) {
        if (ctl_events_listen(c->db, &ev) < 0) {
            if (!c->quiet)
                ctl_warn("cannot LISTEN (%s), polling", ds_errdetail());
            ev = NULL;
        } else if (verbose) {
            fprintf(stderr, "dsparkctl: hints from PostgreSQL notifications\n");
        }
    }
    if (!ev) {
        ev = ctl_events_poll();
        if (verbose)
            fprintf(stderr, "dsparkctl: polling every %.2f s\n", interval);
    }

    bool bar = !watch && !no_progress && !c->quiet && !c->json && isatty(2);
    double start = now_s(), last_full = -1e9, last_query = -1e9;
    /* --timeout holds when the server stops answering too: no statement waits past it (and a little
     * more, so that the loop's own check comes first when the server answers) */
    if (timeout >= 0 && timeout < 1e6)
        ds_db_set_deadline(c->db, (int)(timeout * 1000) + TIMEOUT_SLACK_MS);
    double rate_t[RATE_WINDOW];
    int64_t rate_tok[RATE_WINDOW];
    int nrate = 0;
    struct progress p = { 0 };
    struct hints h = { 0 };
    h.all = true;
    rc = CTL_EXIT_OK;
    for (;;) {
        double t = now_s();
        if (t - last_query < MIN_QUERY_GAP_MS / 1000.0) {
            struct timespec ts = { 0, (long)((MIN_QUERY_GAP_MS / 1000.0 - (t - last_query)) * 1e9) };
            nanosleep(&ts, NULL);
            t = now_s();
        }
        last_query = t;
        int r = 0;
        if (watch) {
            if (t - last_full >= interval)
                h.all = true;
            r = read_changes(&w, h.all ? NULL : &h);
            if (h.all)
                last_full = t;
            h.n = 0;
            h.all = false;
        }
        if (r == 0)
            r = read_progress(&w, &p);
        if (r < 0) {
            if (timeout >= 0 && now_s() - start >= timeout && !ds_db_ok(c->db)) {   /* no answer in time */
                ctl_warn("%s", ds_errdetail());
                rc = CTL_EXIT_TIMEOUT;
                break;
            }
            if (ds_db_ok(c->db)) {
                rc = ctl_fail(NULL);
                break;
            }
            /* the server went away: wait for it (within the timeout) */
            ctl_warn("%s; reconnecting", ds_errdetail());
            int wait_ms = timeout >= 0 ? (int)fmax(0, (timeout - (t - start)) * 1000) : 60000;
            if (ds_db_ensure(c->db, wait_ms) < 0) {
                if (timeout >= 0 && now_s() - start >= timeout) {   /* still down when the timeout passed */
                    ctl_warn("%s", ds_errdetail());
                    rc = CTL_EXIT_TIMEOUT;
                } else {
                    rc = ctl_fail(NULL);
                }
                break;
            }
            h.all = true;
            continue;
        }
        if (p.total == 0 || (w.nids && (size_t)p.total != w.nids)) {
            if (w.batch)
                ctl_error("no jobs in batch %s (or the batch does not exist)", w.batch);
            else
                ctl_error("%zu of the %zu jobs do not exist (or are not yours)",
                          w.nids - (size_t)p.total, w.nids);
            rc = CTL_EXIT_ERROR;
            break;
        }
        if (nrate == RATE_WINDOW) {
            memmove(rate_t, rate_t + 1, (RATE_WINDOW - 1) * sizeof *rate_t);
            memmove(rate_tok, rate_tok + 1, (RATE_WINDOW - 1) * sizeof *rate_tok);
            nrate--;
        }
        rate_t[nrate] = t;
        rate_tok[nrate++] = p.tokens;
        double rate = nrate > 1 && rate_t[nrate - 1] > rate_t[0]
                          ? (rate_tok[nrate - 1] - rate_tok[0]) / (rate_t[nrate - 1] - rate_t[0])
                          : -1;
        if (bar)
            draw_bar(&p, rate, t - start);
        int64_t done = p.succeeded + p.failed + p.cancelled;
        if (done == p.total) {
            /* the counts come after the changes were read: a job may have
             * finished in between, so print what is left before leaving */
            if (watch && read_changes(&w, NULL) < 0) {
                rc = ctl_fail(NULL);
                break;
            }
            rc = p.failed + p.cancelled ? CTL_EXIT_FAILED : CTL_EXIT_OK;
            break;
        }
        double left = timeout >= 0 ? timeout - (t - start) : -1;
        if (timeout >= 0 && left <= 0) {
            rc = CTL_EXIT_TIMEOUT;
            break;
        }
        int wait_ms = (int)(interval * 1000);
        if (left >= 0 && left * 1000 < wait_ms)
            wait_ms = (int)(left * 1000) + 1;
        r = ev->wait(ev, wait_ms, on_hint, &h);
        if (r < 0) {
            /* the source broke: poll from now on; the query path reconnects */
            if (verbose)
                fprintf(stderr, "dsparkctl: %s hints failed (%s), polling\n", ev->name,
                        ds_errdetail());
            ctl_events_free(ev);
            ev = ctl_events_poll();
            h.all = true;
        }
    }
    if (bar)
        fputc('\n', stderr);
    double elapsed = now_s() - start;
    if (rc == CTL_EXIT_OK || rc == CTL_EXIT_FAILED || rc == CTL_EXIT_TIMEOUT) {
        if (rc == CTL_EXIT_TIMEOUT)
            ctl_error("timed out after %.1f s: %" PRId64 " of %" PRId64 " jobs finished", elapsed,
                      p.succeeded + p.failed + p.cancelled, p.total);
        if (c->json && !watch) {
            json_t *j = json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:b}", "total",
                                  (json_int_t)p.total, "queued", (json_int_t)p.queued,
                                  "running", (json_int_t)p.running, "succeeded",
                                  (json_int_t)p.succeeded, "failed", (json_int_t)p.failed,
                                  "cancelled", (json_int_t)p.cancelled, "output_tokens",
                                  (json_int_t)p.tokens, "elapsed_s", elapsed, "timed_out",
                                  rc == CTL_EXIT_TIMEOUT);
            ctl_print_json(j, true);
            json_decref(j);
        } else if (!c->quiet && !c->json && rc != CTL_EXIT_TIMEOUT) {
            printf("%" PRId64 " jobs finished: %" PRId64 " succeeded, %" PRId64
                   " failed, %" PRId64 " cancelled; %" PRId64 " output tokens in %.1f s\n",
                   p.total, p.succeeded, p.failed, p.cancelled, p.tokens, elapsed);
            if (rc == CTL_EXIT_FAILED && w.batch && !watch)
                fprintf(stderr, "dsparkctl: 'dsparkctl resubmit %s' sends the failed and cancelled jobs again\n",
                        w.batch);
        }
    }
    ctl_events_free(ev);
    free(h.ids);
    free(w.ids);
    free(w.seen.ids);
    free(w.seen.states);
    return rc;
}

int ctl_cmd_keygen(struct ctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "output", required_argument, NULL, 'o' },
        { NULL, 0, NULL, 0 },
    };
    const char *out = NULL;
    int opt;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "o:", opts, NULL)) != -1) {
        if (ctl_common_opt(c, opt, optarg))
            continue;
        switch (opt) {
        case 'h':
            printf("usage: dsparkctl keygen [-o FILE]\n"
                   "\n"
                   "Print a new CURVE key pair for wait/watch --events-key; add its public key\n"
                   "to dsparkd's events.curve_allow_file.\n"
                   "\n"
                   "  -o, --output FILE     write it to a new FILE (mode 0600) instead\n");
            return CTL_EXIT_OK;
        case 'o': out = optarg; break;
        default:
            fprintf(stderr, "usage: dsparkctl keygen [-o FILE]\n");
            return CTL_EXIT_USAGE;
        }
    }
    if (optind < argc)
        return ctl_usage_error("keygen ", "unexpected argument '%s'", argv[optind]);
    char pub[DS_EVENTS_KEY_Z85_LEN + 1], sec[DS_EVENTS_KEY_Z85_LEN + 1];
    if (ds_events_curve_keypair(pub, sec) < 0)
        return ctl_fail(NULL);
    FILE *f = stdout;
    if (out) {
        int fd = open(out, O_WRONLY | O_CREAT | O_EXCL, 0600);
        if (fd < 0 || !(f = fdopen(fd, "w"))) {
            ctl_error("could not create '%s': %s", out, strerror(errno));
            if (fd >= 0)
                close(fd);
            return CTL_EXIT_ERROR;
        }
    }
    fprintf(f,
            "# public key: add it to dsparkd's events.curve_allow_file\n"
            "public-key = \"%s\"\n"
            "# secret key: keep this file private (dsparkctl wait --events-key FILE)\n"
            "secret-key = \"%s\"\n",
            pub, sec);
    if (out && fclose(f) != 0) {
        ctl_error("could not write '%s': %s", out, strerror(errno));
        return CTL_EXIT_ERROR;
    }
    return CTL_EXIT_OK;
}
