/* cmd-show.c: dsparkctl status, list, workers and stats: read-only views of
 * the queue. Every query returns one JSON document per row, printed as is
 * with --json or formatted as a table. */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "request.h"

#define J(o, k) json_object_get((o), (k))

/* Common option loop for the simple commands; returns -1 to continue, else an exit code. */
static int show_opt(struct ctl *c, int opt, void (*usage)(FILE *))
{
    if (ctl_common_opt(c, opt, optarg))
        return -1;
    if (opt == 'h') {
        usage(stdout);
        return CTL_EXIT_OK;
    }
    usage(stderr);
    return CTL_EXIT_USAGE;
}

/* ---- status ---------------------------------------------------------- */

static void status_usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl status [OPTIONS] [ID...]\n"
            "       dsparkctl status [OPTIONS] --batch BATCH\n"
            "       dsparkctl status [OPTIONS] --clients\n"
            "\n"
            "Without arguments: the queue (job counts over all owners) and the workers.\n"
            "With job ids: those jobs (yours only). With --batch: the batch's progress.\n"
            "With --clients: each client's share of the turns, queued and running jobs\n"
            "(dspark_admin only; shares are set in the table dspark.client_shares).\n"
            "  -b, --batch BATCH\n"
            "  -c, --clients\n"
            "  -d, --dsn DSN, --json, -q, --quiet, -h, --help\n");
}

static const char *const job_fields_sql =
    "SELECT json_build_object('id', j.id, 'batch_id', j.batch_id, 'custom_id', j.custom_id,"
    " 'owner', j.owner, 'model', j.model, 'state', j.state, 'attempt', j.attempt,"
    " 'max_attempts', j.max_attempts, 'released', j.released, 'run_alone', j.run_alone,"
    " 'priority', j.priority, 'spec_mode', j.spec_mode,"
    " 'max_tokens', j.max_tokens, 'version', j.version, 'cancel_requested', j.cancel_requested,"
    " 'worker_id', j.worker_id, 'created_at', j.created_at, 'run_after', j.run_after,"
    " 'expires_at', j.expires_at,"
    " 'started_at', j.started_at, 'finished_at', j.finished_at,"
    " 'finish_reason', j.finish_reason, 'error', j.error,"
    " 'prompt_tokens', s.prompt_tokens, 'output_tokens', s.output_tokens,"
    " 'e2e_latency_s', s.e2e_latency_s, 'decode_tokens_per_s', s.decode_tokens_per_s,"
    " 'mean_acceptance_length', s.mean_acceptance_length)"
    " FROM dspark.jobs j LEFT JOIN dspark.job_stats s ON s.job_id = j.id AND s.attempt = j.attempt ";

/* Timestamps as "YYYY-MM-DD HH:MM:SS" for tables. */
static const char *short_time(json_t *v, char *buf, size_t size)
{
    if (!json_is_string(v))
        return "-";
    snprintf(buf, size, "%.19s", json_string_value(v));
    char *t = strchr(buf, 'T');
    if (t)
        *t = ' ';
    return buf;
}

static void print_jobs_table(json_t *rows)
{
    static const char *const titles[] = { "ID", "BATCH", "CUSTOM_ID", "MODEL", "STATE",
                                          "ATTEMPT", "CREATED", "FINISHED", "TOKENS", "TOK/S",
                                          "REASON" };
    struct ctl_table *t = ctl_table_new(11, titles);
    ctl_table_right(t, 0);
    ctl_table_right(t, 8);
    ctl_table_right(t, 9);
    size_t i;
    json_t *r;
    json_array_foreach(rows, i, r) {
        char b[11][160];
        char att[48];
        snprintf(att, sizeof att, "%" JSON_INTEGER_FORMAT "/%" JSON_INTEGER_FORMAT,
                 json_integer_value(J(r, "attempt")), json_integer_value(J(r, "max_attempts")));
        const char *reason = json_is_string(J(r, "error")) ? ctl_cell(J(r, "error"), b[10], 60)
                                                           : ctl_cell(J(r, "finish_reason"),
                                                                      b[10], sizeof b[10]);
        const char *cells[] = {
            ctl_cell(J(r, "id"), b[0], sizeof b[0]),
            ctl_cell(J(r, "batch_id"), b[1], sizeof b[1]),
            ctl_cell(J(r, "custom_id"), b[2], 40),
            ctl_cell(J(r, "model"), b[3], 40),
            ctl_cell(J(r, "state"), b[4], sizeof b[4]),
            att,
            short_time(J(r, "created_at"), b[6], sizeof b[6]),
            short_time(J(r, "finished_at"), b[7], sizeof b[7]),
            ctl_cell(J(r, "output_tokens"), b[8], sizeof b[8]),
            ctl_cell_real(J(r, "decode_tokens_per_s"), 1, b[9], sizeof b[9]),
            reason,
        };
        ctl_table_add(t, cells);
    }
    ctl_table_print(t, stdout);
    ctl_table_free(t);
}

static void print_batches_table(json_t *rows)
{
    static const char *const titles[] = { "BATCH", "CREATED", "TOTAL", "QUEUED", "RUNNING",
                                          "SUCCEEDED", "FAILED", "CANCELLED", "TOKENS", "INPUT" };
    struct ctl_table *t = ctl_table_new(10, titles);
    for (int k = 2; k <= 8; k++)
        ctl_table_right(t, k);
    ctl_table_right(t, 0);
    size_t i;
    json_t *r;
    json_array_foreach(rows, i, r) {
        char b[10][160];
        const char *cells[] = {
            ctl_cell(J(r, "batch_id"), b[0], sizeof b[0]),
            short_time(J(r, "created_at"), b[1], sizeof b[1]),
            ctl_cell(J(r, "total"), b[2], sizeof b[2]),
            ctl_cell(J(r, "queued"), b[3], sizeof b[3]),
            ctl_cell(J(r, "running"), b[4], sizeof b[4]),
            ctl_cell(J(r, "succeeded"), b[5], sizeof b[5]),
            ctl_cell(J(r, "failed"), b[6], sizeof b[6]),
            ctl_cell(J(r, "cancelled"), b[7], sizeof b[7]),
            ctl_cell(J(r, "output_tokens"), b[8], sizeof b[8]),
            ctl_cell(J(J(r, "metadata"), "input_file"), b[9], 60),
        };
        ctl_table_add(t, cells);
    }
    ctl_table_print(t, stdout);
    ctl_table_free(t);
}

static const char *const batch_sql =
    "SELECT row_to_json(b) FROM dspark.batch_progress b ";

static void print_clients_table(json_t *rows)
{
    static const char *const titles[] = { "CLIENT", "SHARE", "QUEUED", "DELAYED", "RUNNING", "OLDEST QUEUED S" };
    struct ctl_table *t = ctl_table_new(6, titles);
    for (int k = 1; k <= 5; k++)
        ctl_table_right(t, k);
    size_t i;
    json_t *r;
    json_array_foreach(rows, i, r) {
        char b[6][160];
        const char *cells[] = {
            ctl_cell(J(r, "client"), b[0], 64),
            ctl_cell(J(r, "share"), b[1], sizeof b[1]),
            ctl_cell(J(r, "queued"), b[2], sizeof b[2]),
            ctl_cell(J(r, "delayed"), b[3], sizeof b[3]),
            ctl_cell(J(r, "running"), b[4], sizeof b[4]),
            ctl_cell_real(J(r, "oldest_queued_s"), 1, b[5], sizeof b[5]),
        };
        ctl_table_add(t, cells);
    }
    ctl_table_print(t, stdout);
    ctl_table_free(t);
}

int ctl_cmd_status(struct ctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "batch", required_argument, NULL, 'b' },
        { "clients", no_argument, NULL, 'c' },
        { NULL, 0, NULL, 0 },
    };
    const char *batch = NULL;
    bool clients = false;
    int64_t v;
    int opt, rc;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "b:c", opts, NULL)) != -1) {
        if (opt == 'b') {
            if (ctl_parse_int64("status", "--batch", optarg, 1, INT64_MAX, &v))
                return CTL_EXIT_USAGE;
            batch = optarg;
            continue;
        }
        if (opt == 'c') {
            clients = true;
            continue;
        }
        if ((rc = show_opt(c, opt, status_usage)) >= 0)
            return rc;
    }
    int64_t *ids = NULL;
    size_t nids = 0;
    if (ctl_parse_ids("status", argc, argv, optind, &ids, &nids) < 0)
        return CTL_EXIT_USAGE;
    if ((nids > 0) + (batch != NULL) + clients > 1) {
        free(ids);
        return ctl_usage_error("status ", "give one of job ids, --batch and --clients");
    }
    if ((rc = ctl_connect(c, true))) {
        free(ids);
        return rc;
    }
    json_t *rows = NULL;
    int r;
    if (clients) {
        r = ctl_query_json(c,
                           "SELECT row_to_json(s) FROM dspark.client_status s"
                           " ORDER BY s.queued DESC, s.running DESC, s.client",
                           0, NULL, &rows);
        if (r == 0) {
            if (c->json)
                ctl_print_json(rows, false);
            else
                print_clients_table(rows);
        } else if (strcmp(ds_db_sqlstate(c->db), "42501") == 0) {
            return ctl_fail("status --clients names every client, and needs the dspark_admin role");
        }
    } else if (batch) {
        char sql[512];
        snprintf(sql, sizeof sql, "%s WHERE b.batch_id = $1::bigint", batch_sql);
        const char *p[] = { batch };
        r = ctl_query_json(c, sql, 1, p, &rows);
        if (r == 0 && json_array_size(rows) == 0) {
            json_decref(rows);
            ctl_error("batch %s does not exist (or is not yours)", batch);
            return CTL_EXIT_ERROR;
        }
        if (r == 0) {
            json_t *b = json_array_get(rows, 0);
            if (c->json)
                ctl_print_json(b, false);
            else
                print_batches_table(rows);
        }
    } else if (nids) {
        char *arr = ds_db_int64_array(ids, nids);
        char sql[2048];
        snprintf(sql, sizeof sql, "%s WHERE j.id = ANY ($1::bigint[]) ORDER BY j.id",
                 job_fields_sql);
        const char *p[] = { arr };
        r = ctl_query_json(c, sql, 1, p, &rows);
        free(arr);
        if (r == 0) {
            if (c->json)
                ctl_print_json(rows, false);
            else
                print_jobs_table(rows);
            if (json_array_size(rows) != nids) {
                ctl_error("%zu of the %zu jobs do not exist (or are not yours)",
                          nids - json_array_size(rows), nids);
                rc = CTL_EXIT_ERROR;
            }
        }
    } else {
        r = ctl_query_json(
            c,
            "SELECT json_build_object('jobs', (SELECT row_to_json(q) FROM dspark.queue_status q),"
            " 'workers', (SELECT json_build_object("
            "   'registered', count(*),"
            "   'running', count(*) FILTER (WHERE state = 'running'),"
            "   'draining', count(*) FILTER (WHERE state = 'draining'),"
            "   'lost', count(*) FILTER (WHERE state = 'lost'),"
            "   'running_jobs', coalesce(sum(running_jobs), 0))"
            "  FROM dspark.worker_status),"
            " 'batches_open', (SELECT count(*) FROM dspark.batch_progress"
            "   WHERE done < total))",
            0, NULL, &rows);
        if (r == 0) {
            json_t *s = json_array_get(rows, 0);
            if (c->json) {
                ctl_print_json(s, false);
            } else {
                json_t *jb = J(s, "jobs"), *wk = J(s, "workers");
                char b[8][64];
                printf("jobs:    %s queued (%s delayed), %s running, %s succeeded, %s failed, "
                       "%s cancelled\n",
                       ctl_cell(J(jb, "queued"), b[0], 64), ctl_cell(J(jb, "delayed"), b[1], 64),
                       ctl_cell(J(jb, "running"), b[2], 64),
                       ctl_cell(J(jb, "succeeded"), b[3], 64),
                       ctl_cell(J(jb, "failed"), b[4], 64),
                       ctl_cell(J(jb, "cancelled"), b[5], 64));
                if (json_is_number(J(jb, "oldest_queued_s")))
                    printf("oldest queued job: %.1f s\n",
                           json_number_value(J(jb, "oldest_queued_s")));
                printf("workers: %s running, %s draining, %s lost (%s registered)\n",
                       ctl_cell(J(wk, "running"), b[0], 64), ctl_cell(J(wk, "draining"), b[1], 64),
                       ctl_cell(J(wk, "lost"), b[2], 64), ctl_cell(J(wk, "registered"), b[3], 64));
                printf("your open batches: %s\n", ctl_cell(J(s, "batches_open"), b[0], 64));
            }
        }
    }
    free(ids);
    json_decref(rows);
    if (r < 0)
        return ctl_fail(NULL);
    return rc;
}

/* ---- list ------------------------------------------------------------ */

static void list_usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl list [OPTIONS]\n"
            "       dsparkctl list --batches [OPTIONS]\n"
            "\n"
            "List your jobs, newest first (or your batches with --batches).\n"
            "  -b, --batch BATCH     jobs of one batch\n"
            "  -s, --state STATE     queued, running, succeeded, failed or cancelled\n"
            "                        (repeatable, or comma-separated)\n"
            "  -m, --model NAME      jobs for one model\n"
            "  -n, --limit N         at most N rows (default 100; 0 = all)\n"
            "      --batches         list batches with their progress\n"
            "  -d, --dsn DSN, --json, -q, --quiet, -h, --help\n");
}

int ctl_cmd_list(struct ctl *c, int argc, char **argv)
{
    enum { O_BATCHES = 256 };
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "batch", required_argument, NULL, 'b' },
        { "state", required_argument, NULL, 's' },
        { "model", required_argument, NULL, 'm' },
        { "limit", required_argument, NULL, 'n' },
        { "batches", no_argument, NULL, O_BATCHES },
        { NULL, 0, NULL, 0 },
    };
    const char *batch = NULL, *model = NULL;
    struct ds_buf states = { 0 };
    bool batches = false;
    int64_t limit = 100, v;
    int opt, rc;
    ds_buf_puts(&states, "{");
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "b:s:m:n:", opts, NULL)) != -1) {
        switch (opt) {
        case 'b':
            if (ctl_parse_int64("list", "--batch", optarg, 1, INT64_MAX, &v)) {
                ds_buf_free(&states);
                return CTL_EXIT_USAGE;
            }
            batch = optarg;
            continue;
        case 's': {
            char *s = ds_xstrdup(optarg), *save = NULL;
            for (char *tok = strtok_r(s, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (strcmp(tok, "queued") && strcmp(tok, "running") && strcmp(tok, "succeeded") &&
                    strcmp(tok, "failed") && strcmp(tok, "cancelled")) {
                    free(s);
                    ds_buf_free(&states);
                    return ctl_usage_error("list ", "unknown state '%s'", tok);
                }
                if (states.len > 1)
                    ds_buf_puts(&states, ",");
                ds_buf_puts(&states, tok);
            }
            free(s);
            continue;
        }
        case 'm':
            model = optarg;
            continue;
        case 'n':
            if (ctl_parse_int64("list", "--limit", optarg, 0, INT64_MAX, &limit)) {
                ds_buf_free(&states);
                return CTL_EXIT_USAGE;
            }
            continue;
        case O_BATCHES:
            batches = true;
            continue;
        }
        if ((rc = show_opt(c, opt, list_usage)) >= 0) {
            ds_buf_free(&states);
            return rc;
        }
    }
    ds_buf_puts(&states, "}");
    if (optind < argc) {
        ds_buf_free(&states);
        return ctl_usage_error("list ", "unexpected argument '%s'", argv[optind]);
    }
    if ((rc = ctl_connect(c, true))) {
        ds_buf_free(&states);
        return rc;
    }
    char lim[32];
    snprintf(lim, sizeof lim, "%" PRId64, limit);
    const char *params[] = { batch, states.len > 2 ? states.data : NULL, model,
                             limit ? lim : NULL };
    json_t *rows;
    int r;
    if (batches) {
        const char *bparams[] = { batch, limit ? lim : NULL };
        r = ctl_query_json(c,
                           "SELECT row_to_json(b) FROM dspark.batch_progress b"
                           " WHERE ($1::bigint IS NULL OR b.batch_id = $1::bigint)"
                           " ORDER BY b.batch_id DESC LIMIT $2::bigint",
                           2, bparams, &rows);
    } else {
        struct ds_buf sql = { 0 };
        ds_buf_puts(&sql, job_fields_sql);
        ds_buf_puts(&sql, "WHERE ($1::bigint IS NULL OR j.batch_id = $1::bigint)"
                           " AND ($2::text[] IS NULL OR j.state = ANY ($2::text[]))"
                           " AND ($3::text IS NULL OR j.model = $3::text)"
                           " ORDER BY j.id DESC LIMIT $4::bigint");
        r = ctl_query_json(c, sql.data, 4, params, &rows);
        ds_buf_free(&sql);
    }
    ds_buf_free(&states);
    if (r < 0)
        return ctl_fail(NULL);
    if (c->json)
        ctl_print_json(rows, false);
    else if (batches)
        print_batches_table(rows);
    else
        print_jobs_table(rows);
    json_decref(rows);
    return CTL_EXIT_OK;
}

/* ---- workers --------------------------------------------------------- */

static void workers_usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl workers [OPTIONS]\n"
            "\n"
            "The registered GPU workers: identity, device, model and draft, state,\n"
            "seconds since the last heartbeat, and running jobs.\n"
            "  -a, --all             also workers that stopped or were lost\n"
            "  -d, --dsn DSN, --json, -q, --quiet, -h, --help\n");
}

int ctl_cmd_workers(struct ctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "all", no_argument, NULL, 'a' },
        { NULL, 0, NULL, 0 },
    };
    bool all = false;
    int opt, rc;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "a", opts, NULL)) != -1) {
        if (opt == 'a') {
            all = true;
            continue;
        }
        if ((rc = show_opt(c, opt, workers_usage)) >= 0)
            return rc;
    }
    if (optind < argc)
        return ctl_usage_error("workers ", "unexpected argument '%s'", argv[optind]);
    if ((rc = ctl_connect(c, true)))
        return rc;
    json_t *rows;
    int r = ctl_query_json(c,
                           all ? "SELECT row_to_json(w) FROM dspark.worker_status w ORDER BY worker_id"
                               : "SELECT row_to_json(w) FROM dspark.worker_status w"
                                 " WHERE state NOT IN ('stopped', 'lost') ORDER BY worker_id",
                           0, NULL, &rows);
    if (r < 0)
        return ctl_fail(NULL);
    if (c->json) {
        ctl_print_json(rows, false);
    } else {
        static const char *const titles[] = { "WORKER", "HOST", "PID", "DEVICE", "MODEL",
                                              "DRAFT", "STATE", "HEARTBEAT", "JOBS" };
        struct ctl_table *t = ctl_table_new(9, titles);
        ctl_table_right(t, 2);
        ctl_table_right(t, 7);
        ctl_table_right(t, 8);
        size_t i;
        json_t *w;
        json_array_foreach(rows, i, w) {
            char b[9][160], hb[32];
            snprintf(hb, sizeof hb, "%s s ago",
                     ctl_cell_real(J(w, "heartbeat_age_s"), 1, b[7], sizeof b[7]));
            const char *cells[] = {
                ctl_cell(J(w, "worker_id"), b[0], sizeof b[0]),
                ctl_cell(J(w, "host"), b[1], sizeof b[1]),
                ctl_cell(J(w, "pid"), b[2], sizeof b[2]),
                ctl_cell(J(w, "device"), b[3], sizeof b[3]),
                ctl_cell(J(w, "model"), b[4], 48),
                ctl_cell(J(w, "draft"), b[5], 48),
                ctl_cell(J(w, "state"), b[6], sizeof b[6]),
                hb,
                ctl_cell(J(w, "running_jobs"), b[8], sizeof b[8]),
            };
            ctl_table_add(t, cells);
        }
        ctl_table_print(t, stdout);
        ctl_table_free(t);
    }
    json_decref(rows);
    return CTL_EXIT_OK;
}

/* ---- stats ----------------------------------------------------------- */

static void stats_usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl stats [OPTIONS]\n"
            "\n"
            "Statistics of your succeeded jobs (final attempts), grouped by batch and model:\n"
            "jobs, output tokens, tau (mean acceptance length: tokens per round, accepted\n"
            "drafts + 1), draft acceptance rate, mean verified draft tokens per round,\n"
            "decode tokens/s per job (median), throughput (output tokens over the\n"
            "group's wall time), latency percentiles (p50/p90/p99 of time to first\n"
            "token, end-to-end latency and queue wait), and the conditional acceptance\n"
            "rate of each draft position.\n"
            "  -b, --batch BATCH     one batch\n"
            "  -m, --model NAME      one model\n"
            "      --since INTERVAL  jobs finished within INTERVAL ('1 hour', '2 days')\n"
            "      --by KEYS         group by batch,model (default), model, or batch\n"
            "  -d, --dsn DSN, --json, -q, --quiet, -h, --help\n");
}

#define PCT(col)                                                                              \
    "json_build_object('p50', percentile_cont(0.5) WITHIN GROUP (ORDER BY " col "),"          \
    " 'p90', percentile_cont(0.9) WITHIN GROUP (ORDER BY " col "),"                           \
    " 'p99', percentile_cont(0.99) WITHIN GROUP (ORDER BY " col "), 'mean', avg(" col "))"

int ctl_cmd_stats(struct ctl *c, int argc, char **argv)
{
    enum { O_SINCE = 256, O_BY };
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "batch", required_argument, NULL, 'b' },
        { "model", required_argument, NULL, 'm' },
        { "since", required_argument, NULL, O_SINCE },
        { "by", required_argument, NULL, O_BY },
        { NULL, 0, NULL, 0 },
    };
    const char *batch = NULL, *model = NULL, *since = NULL;
    bool by_batch = true, by_model = true;
    int64_t v;
    int opt, rc;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "b:m:", opts, NULL)) != -1) {
        switch (opt) {
        case 'b':
            if (ctl_parse_int64("stats", "--batch", optarg, 1, INT64_MAX, &v))
                return CTL_EXIT_USAGE;
            batch = optarg;
            continue;
        case 'm':
            model = optarg;
            continue;
        case O_SINCE:
            since = optarg;
            continue;
        case O_BY:
            if (strcmp(optarg, "batch,model") == 0 || strcmp(optarg, "model,batch") == 0)
                by_batch = by_model = true;
            else if (strcmp(optarg, "model") == 0)
                by_batch = false, by_model = true;
            else if (strcmp(optarg, "batch") == 0)
                by_batch = true, by_model = false;
            else
                return ctl_usage_error("stats ", "--by takes batch,model, model or batch");
            continue;
        }
        if ((rc = show_opt(c, opt, stats_usage)) >= 0)
            return rc;
    }
    if (optind < argc)
        return ctl_usage_error("stats ", "unexpected argument '%s'", argv[optind]);
    if ((rc = ctl_connect(c, true)))
        return rc;
    if (since) {   /* only the server judges an interval: a bad one is a usage error, as submit's are */
        const char *params[] = { since };
        if (ds_db_command(c->db, "SELECT $1::interval", 1, params) < 0)
            return ds_db_ok(c->db) ? ctl_usage_error("stats ", "--since '%s': %s", since, ds_errdetail())
                                   : ctl_fail(NULL);
    }

    const char *gb = by_batch ? "j.batch_id" : "NULL::bigint";
    const char *gm = by_model ? "j.model" : "NULL::text";
    struct ds_buf sql = { 0 };
    char head[1024];
    snprintf(head, sizeof head,
             "WITH s AS ("
             " SELECT %s AS g_batch, %s AS g_model, j.started_at, j.finished_at, st.*"
             " FROM dspark.jobs j JOIN dspark.job_stats st"
             "  ON st.job_id = j.id AND st.attempt = j.attempt"
             " WHERE j.state = 'succeeded'"
             "  AND ($1::bigint IS NULL OR j.batch_id = $1::bigint)"
             "  AND ($2::text IS NULL OR j.model = $2::text)"
             "  AND ($3::interval IS NULL OR j.finished_at >= now() - $3::interval)), ",
             gb, gm);
    ds_buf_puts(&sql, head);
    ds_buf_puts(
        &sql,
        "pos AS ("
        " SELECT g_batch, g_model, u.k, sum(u.a) AS acc, sum(u.v) AS ver"
        " FROM s, unnest(s.acceptance_by_position, s.verified_by_position)"
        "  WITH ORDINALITY AS u(a, v, k)"
        " GROUP BY g_batch, g_model, u.k), "
        "posagg AS ("
        " SELECT g_batch, g_model, array_agg(acc ORDER BY k) AS acc,"
        "  array_agg(ver ORDER BY k) AS ver,"
        "  array_agg(round((acc::numeric / nullif(ver, 0)), 4) ORDER BY k) AS rate"
        " FROM pos GROUP BY g_batch, g_model), "
        "agg AS ("
        " SELECT g_batch, g_model, count(*) AS jobs,"
        "  sum(output_tokens) AS output_tokens, sum(prompt_tokens) AS prompt_tokens,"
        "  sum(rounds) AS rounds,"
        "  sum(mean_acceptance_length * rounds) / nullif(sum(rounds)"
        "   FILTER (WHERE mean_acceptance_length IS NOT NULL), 0) AS mean_acceptance_length,"
        "  sum(num_draft_tokens) AS num_draft_tokens,"
        "  sum(num_verified_tokens) AS num_verified_tokens,"
        "  sum(num_accepted_tokens) AS num_accepted_tokens,"
        "  sum(num_accepted_tokens)::float8 / nullif(sum(num_verified_tokens), 0)"
        "   AS draft_acceptance_rate,"
        "  sum(mean_verify_len * rounds) / nullif(sum(rounds)"
        "   FILTER (WHERE mean_verify_len IS NOT NULL), 0) AS mean_verify_len,"
        "  " PCT("decode_tokens_per_s") " AS decode_tokens_per_s,"
        "  sum(output_tokens) / nullif(extract(epoch FROM max(finished_at) - min(started_at)), 0)"
        "   AS throughput_tokens_per_s,"
        "  " PCT("time_to_first_token_s") " AS time_to_first_token_s,"
        "  " PCT("e2e_latency_s") " AS e2e_latency_s,"
        "  " PCT("queue_wait_s") " AS queue_wait_s"
        " FROM s GROUP BY g_batch, g_model) "
        "SELECT json_build_object('batch_id', a.g_batch, 'model', a.g_model, 'jobs', a.jobs,"
        " 'output_tokens', a.output_tokens, 'prompt_tokens', a.prompt_tokens,"
        " 'rounds', a.rounds, 'mean_acceptance_length', a.mean_acceptance_length,"
        " 'num_draft_tokens', a.num_draft_tokens, 'num_verified_tokens', a.num_verified_tokens,"
        " 'num_accepted_tokens', a.num_accepted_tokens,"
        " 'draft_acceptance_rate', a.draft_acceptance_rate,"
        " 'mean_verify_len', a.mean_verify_len,"
        " 'decode_tokens_per_s', a.decode_tokens_per_s,"
        " 'throughput_tokens_per_s', a.throughput_tokens_per_s,"
        " 'time_to_first_token_s', a.time_to_first_token_s, 'e2e_latency_s', a.e2e_latency_s,"
        " 'queue_wait_s', a.queue_wait_s,"
        " 'acceptance_by_position', p.acc, 'verified_by_position', p.ver,"
        " 'conditional_acceptance_by_position', p.rate)"
        " FROM agg a LEFT JOIN posagg p"
        "  ON p.g_batch IS NOT DISTINCT FROM a.g_batch AND p.g_model IS NOT DISTINCT FROM a.g_model"
        " ORDER BY a.g_batch NULLS FIRST, a.g_model");
    const char *params[] = { batch, model, since };
    json_t *rows;
    int r = ctl_query_json(c, sql.data, 3, params, &rows);
    ds_buf_free(&sql);
    if (r < 0)
        return ctl_fail(NULL);
    if (c->json) {
        ctl_print_json(rows, false);
        json_decref(rows);
        return CTL_EXIT_OK;
    }
    if (json_array_size(rows) == 0) {
        if (!c->quiet)
            printf("no succeeded jobs match\n");
        json_decref(rows);
        return CTL_EXIT_OK;
    }
    static const char *const titles[] = { "BATCH", "MODEL", "JOBS", "OUT_TOK", "TAU",
                                          "ACCEPT", "VERIFY", "TOK/S", "THRPT", "TTFT_P50",
                                          "E2E_P50", "E2E_P90", "E2E_P99" };
    struct ctl_table *t = ctl_table_new(13, titles);
    for (int k = 2; k < 13; k++)
        ctl_table_right(t, k);
    size_t i;
    json_t *g;
    json_array_foreach(rows, i, g) {
        char b[13][96];
        const char *cells[] = {
            by_batch ? ctl_cell(J(g, "batch_id"), b[0], 96) : "*",
            by_model ? ctl_cell(J(g, "model"), b[1], 48) : "*",
            ctl_cell(J(g, "jobs"), b[2], 96),
            ctl_cell(J(g, "output_tokens"), b[3], 96),
            ctl_cell_real(J(g, "mean_acceptance_length"), 2, b[4], 96),
            ctl_cell_real(J(g, "draft_acceptance_rate"), 3, b[5], 96),
            ctl_cell_real(J(g, "mean_verify_len"), 2, b[6], 96),
            ctl_cell_real(J(J(g, "decode_tokens_per_s"), "p50"), 1, b[7], 96),
            ctl_cell_real(J(g, "throughput_tokens_per_s"), 1, b[8], 96),
            ctl_cell_real(J(J(g, "time_to_first_token_s"), "p50"), 3, b[9], 96),
            ctl_cell_real(J(J(g, "e2e_latency_s"), "p50"), 3, b[10], 96),
            ctl_cell_real(J(J(g, "e2e_latency_s"), "p90"), 3, b[11], 96),
            ctl_cell_real(J(J(g, "e2e_latency_s"), "p99"), 3, b[12], 96),
        };
        ctl_table_add(t, cells);
    }
    ctl_table_print(t, stdout);
    ctl_table_free(t);
    json_array_foreach(rows, i, g) {
        json_t *rate = J(g, "conditional_acceptance_by_position");
        if (!json_is_array(rate) || json_array_size(rate) == 0)
            continue;
        char b0[96], b1[96];
        printf("\nacceptance by position (batch %s, model %s):",
               by_batch ? ctl_cell(J(g, "batch_id"), b0, sizeof b0) : "*",
               by_model ? ctl_cell(J(g, "model"), b1, sizeof b1) : "*");
        size_t k;
        json_t *x;
        json_array_foreach(rate, k, x)
            printf(" %zu:%s", k + 1, ctl_cell_real(x, 3, b0, sizeof b0));
        printf("\n");
    }
    json_decref(rows);
    return CTL_EXIT_OK;
}
