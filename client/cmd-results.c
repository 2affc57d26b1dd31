/* cmd-results.c: dsparkctl results (OpenAI Batch output JSONL), cancel and
 * resubmit (a batch's failed or cancelled jobs again, as a new batch).
 *
 * Output lines follow the OpenAI Batch output file: {"id", "custom_id",
 * "response": {"status_code", "request_id", "body": <chat.completion or
 * text_completion>}, "error"}; failed and cancelled jobs have a null response
 * and an error {"code", "message"}. The server builds each line; results are
 * read through a cursor so that a large batch streams. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ctl.h"

#define FETCH_ROWS 1000
#define STR_(x) #x
#define STR(x) STR_(x)

static void results_usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl results [OPTIONS] ID...\n"
            "       dsparkctl results [OPTIONS] --batch BATCH\n"
            "\n"
            "Print the results of finished jobs as JSONL in the OpenAI Batch output\n"
            "format, one line per job, in job order; match them to requests by custom_id.\n"
            "Failed and cancelled jobs carry an error object and no response.\n"
            "  -b, --batch BATCH     the jobs of a batch\n"
            "  -o, --output FILE     write to FILE instead of standard output\n"
            "      --all             also unfinished jobs (error code 'job_not_finished')\n"
            "      --metrics         add per-job metrics to each response body\n"
            "                        (tokens/s, latencies, mean acceptance length)\n"
            "  -d, --dsn DSN, -q, --quiet, -h, --help\n");
}

static const char *const result_sql =
    "SELECT json_build_object("
    " 'id', 'dspark-job-' || r.id,"
    " 'custom_id', r.custom_id,"
    " 'response', CASE WHEN r.state = 'succeeded' THEN json_build_object("
    "   'status_code', 200, 'request_id', 'dspark-job-' || r.id,"
    "   'body', json_build_object("
    "     'id', CASE WHEN r.chat THEN 'chatcmpl-' ELSE 'cmpl-' END || r.id,"
    "     'object', CASE WHEN r.chat THEN 'chat.completion' ELSE 'text_completion' END,"
    "     'created', extract(epoch FROM r.finished_at)::bigint,"
    "     'model', r.model,"
    "     'choices', json_build_array(CASE WHEN r.chat THEN json_build_object("
    "         'index', 0, 'message', json_build_object('role', 'assistant',"
    "         'content', r.output_text), 'finish_reason', r.finish_reason)"
    "       ELSE json_build_object('index', 0, 'text', r.output_text,"
    "         'finish_reason', r.finish_reason) END),"
    "     'usage', json_build_object('prompt_tokens', r.prompt_tokens,"
    "       'completion_tokens', r.output_tokens,"
    "       'total_tokens', r.prompt_tokens + r.output_tokens)"
    "     %s)) END,"
    " 'error', CASE WHEN r.state <> 'succeeded' THEN json_build_object("
    "   'code', CASE WHEN r.state = 'failed' THEN 'job_failed'"
    "     WHEN r.state = 'cancelled' AND r.finish_reason = 'expired' THEN 'job_expired'"
    "     WHEN r.state = 'cancelled' THEN 'job_cancelled' ELSE 'job_not_finished' END,"
    "   'message', coalesce(r.error, CASE r.state WHEN 'cancelled' THEN 'cancelled'"
    "     WHEN 'failed' THEN 'failed' ELSE 'the job is ' || r.state END)) END)"
    " FROM dspark.job_results r WHERE %s %s ORDER BY r.id";

static const char *const metrics_sql =
    ", 'metrics', json_build_object('queue_wait_s', r.queue_wait_s,"
    " 'time_to_first_token_s', r.time_to_first_token_s, 'e2e_latency_s', r.e2e_latency_s,"
    " 'decode_tokens_per_s', r.decode_tokens_per_s, 'rounds', r.rounds,"
    " 'num_draft_tokens', r.num_draft_tokens, 'num_verified_tokens', r.num_verified_tokens,"
    " 'num_accepted_tokens', r.num_accepted_tokens,"
    " 'mean_acceptance_length', r.mean_acceptance_length,"
    " 'acceptance_by_position', r.acceptance_by_position,"
    " 'verified_by_position', r.verified_by_position, 'mean_verify_len', r.mean_verify_len,"
    " 'worker_id', r.worker_id, 'device', r.device, 'draft', r.draft, 'attempt', r.attempt)";

int ctl_cmd_results(struct ctl *c, int argc, char **argv)
{
    enum { O_ALL = 256, O_METRICS };
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "batch", required_argument, NULL, 'b' },
        { "output", required_argument, NULL, 'o' },
        { "all", no_argument, NULL, O_ALL },
        { "metrics", no_argument, NULL, O_METRICS },
        { NULL, 0, NULL, 0 },
    };
    const char *batch = NULL, *output = NULL;
    bool all = false, metrics = false;
    int64_t v;
    int opt;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "b:o:", opts, NULL)) != -1) {
        if (ctl_common_opt(c, opt, optarg))
            continue;
        switch (opt) {
        case 'h':
            results_usage(stdout);
            return CTL_EXIT_OK;
        case 'b':
            if (ctl_parse_int64("results", "--batch", optarg, 1, INT64_MAX, &v))
                return CTL_EXIT_USAGE;
            batch = optarg;
            break;
        case 'o': output = optarg; break;
        case O_ALL: all = true; break;
        case O_METRICS: metrics = true; break;
        default:
            results_usage(stderr);
            return CTL_EXIT_USAGE;
        }
    }
    char *idarr;
    size_t nids;
    int rc = ctl_parse_selection("results", argc, argv, optind, batch, &idarr, &nids);
    if (rc || (rc = ctl_connect(c, true))) {
        free(idarr);
        return rc;
    }

    size_t len = strlen(result_sql) + strlen(metrics_sql) + 256;
    char *query = ds_xmalloc(len), *decl = ds_xmalloc(len + 64);
    snprintf(query, len, result_sql, metrics ? metrics_sql : "",
             batch ? "r.batch_id = $1::bigint" : "r.id = ANY ($1::bigint[])",
             all ? "" : "AND r.state IN ('succeeded', 'failed', 'cancelled')");
    snprintf(decl, len + 64, "DECLARE ds_results NO SCROLL CURSOR FOR %s", query);
    free(query);
    const char *params[] = { batch ? batch : idarr };

    /* -o FILE: a new or regular FILE is written to a temporary file beside
     * it, renamed over it once complete, so that a failure leaves FILE as it
     * was (with an existing FILE's mode); anything else (a symbolic link, a
     * device, a pipe) is written in place */
    FILE *out = stdout;
    char *tmp = NULL;
    struct stat st;
    bool exists = output && lstat(output, &st) == 0;
    if (output && exists && !S_ISREG(st.st_mode)) {
        out = fopen(output, "w");
    } else if (output) {
        tmp = ds_xmalloc(strlen(output) + 16);
        sprintf(tmp, "%s.tmp-XXXXXX", output);
        int fd = mkstemp(tmp);
        mode_t mask = umask(0);
        umask(mask);
        if (fd >= 0)   /* as fopen would create it (not mkstemp's 0600), or as FILE was */
            fchmod(fd, exists ? st.st_mode & 07777 : 0666 & ~mask);
        out = fd >= 0 ? fdopen(fd, "w") : NULL;
        if (!out && fd >= 0) {
            int e = errno;
            close(fd);
            errno = e;
        }
    }
    if (!out) {
        ctl_error("could not create '%s': %s", tmp ? tmp : output, strerror(errno));
        free(tmp);
        free(decl);
        free(idarr);
        return CTL_EXIT_ERROR;
    }
    int64_t written = 0;
    /* one snapshot for the results and the count of unfinished jobs, so that a
     * job finishing meanwhile is in one or the other */
    int r = ds_db_begin(c->db);
    if (r == 0)
        r = ds_db_command(c->db, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", 0, NULL);
    if (r == 0)
        r = ds_db_command(c->db, decl, 1, params);
    free(decl);
    while (r == 0) {
        PGresult *res;
        r = ds_db_exec(c->db, "FETCH " STR(FETCH_ROWS) " FROM ds_results", 0, NULL, &res);
        if (r < 0)
            break;
        int n = PQntuples(res);
        for (int i = 0; i < n; i++) {
            /* re-encode compactly, keeping the key order */
            json_error_t jerr;
            json_t *line = json_loads(PQgetvalue(res, i, 0), 0, &jerr);
            if (!line) {
                r = ds_seterr(DS_EFORMAT, "the server sent bad JSON: %s", jerr.text);
                break;
            }
            json_dumpf(line, out, JSON_COMPACT | JSON_REAL_PRECISION(10));
            fputc('\n', out);
            json_decref(line);
        }
        written += n;
        PQclear(res);
        if (r < 0 || n < FETCH_ROWS)
            break;
    }
    /* how many of the selected jobs have no result yet */
    int64_t unfinished = 0;
    if (r == 0 && !all) {
        PGresult *res;
        r = ds_db_exec(c->db,
                       batch ? "SELECT count(*) FROM dspark.jobs WHERE batch_id = $1::bigint"
                               " AND state IN ('queued', 'running')"
                             : "SELECT count(*) FROM dspark.jobs WHERE id = ANY ($1::bigint[])"
                               " AND state IN ('queued', 'running')",
                       1, params, &res);
        if (r == 0) {
            unfinished = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
            PQclear(res);
        }
    }
    if (r == 0)
        r = ds_db_commit(c->db);
    else
        ds_db_rollback(c->db);
    free(idarr);
    bool werr = ferror(out) != 0;
    if (out != stdout && fclose(out) != 0)
        werr = true;
    bool none = r == 0 && written == 0 && unfinished == 0;
    if (tmp) {
        if (r == 0 && !werr && !none && rename(tmp, output) < 0) {
            ctl_error("could not rename '%s' to '%s': %s", tmp, output, strerror(errno));
            werr = true;
        }
        if (r < 0 || werr || none)
            unlink(tmp);
        free(tmp);
    }
    if (r < 0)
        return ctl_fail("could not read the results");
    if (werr) {
        ctl_error("could not write '%s'", output ? output : "<stdout>");
        return CTL_EXIT_ERROR;
    }
    if (none) {
        ctl_error(batch ? "no jobs in batch %s (or the batch is not yours)"
                        : "no such jobs%s (or they are not yours)",
                  batch ? batch : "");
        return CTL_EXIT_ERROR;
    }
    if (unfinished && !c->quiet)
        ctl_warn("%" PRId64 " job%s not finished yet (not printed; see --all)", unfinished,
                 unfinished == 1 ? " is" : "s are");
    return CTL_EXIT_OK;
}

static void cancel_usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl cancel [OPTIONS] ID...\n"
            "       dsparkctl cancel [OPTIONS] --batch BATCH\n"
            "\n"
            "Cancel jobs: a queued job ends 'cancelled' at once; a running job is asked\n"
            "to stop and its worker ends it 'cancelled' within one decoding round.\n"
            "Finished jobs are left alone. Exit status 1 when an id does not exist.\n"
            "  -b, --batch BATCH     every unfinished job of a batch\n"
            "  -d, --dsn DSN, --json, -q, --quiet, -h, --help\n");
}

int ctl_cmd_cancel(struct ctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "batch", required_argument, NULL, 'b' },
        { NULL, 0, NULL, 0 },
    };
    const char *batch = NULL;
    int64_t v;
    int opt;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "b:", opts, NULL)) != -1) {
        if (ctl_common_opt(c, opt, optarg))
            continue;
        switch (opt) {
        case 'h':
            cancel_usage(stdout);
            return CTL_EXIT_OK;
        case 'b':
            if (ctl_parse_int64("cancel", "--batch", optarg, 1, INT64_MAX, &v))
                return CTL_EXIT_USAGE;
            batch = optarg;
            break;
        default:
            cancel_usage(stderr);
            return CTL_EXIT_USAGE;
        }
    }
    char *idarr;
    size_t nids;
    int rc = ctl_parse_selection("cancel", argc, argv, optind, batch, &idarr, &nids);
    if (rc || (rc = ctl_connect(c, true))) {
        free(idarr);
        return rc;
    }
    const char *params[] = { batch ? batch : idarr };
    json_t *rows;
    /* one statement: cancel, then report every selected job's state */
    int r = ctl_query_json(
        c,
        batch ? "WITH x AS (SELECT * FROM dspark.cancel_batch($1::bigint))"
                " SELECT json_build_object('id', j.id, 'state', coalesce(x.state, j.state),"
                " 'result', CASE WHEN x.state = 'cancelled' THEN 'cancelled'"
                "  WHEN x.state = 'running' THEN 'cancel_requested'"
                "  WHEN j.cancel_requested AND j.state = 'running' THEN 'cancel_requested'"
                "  ELSE 'already_' || j.state END)"
                " FROM dspark.jobs j LEFT JOIN x ON x.id = j.id"
                " WHERE j.batch_id = $1::bigint ORDER BY j.id"
              : "WITH x AS (SELECT * FROM dspark.cancel_jobs($1::bigint[]))"
                " SELECT json_build_object('id', u.id, 'state', coalesce(x.state, j.state),"
                " 'result', CASE WHEN x.state = 'cancelled' THEN 'cancelled'"
                "  WHEN x.state = 'running' THEN 'cancel_requested'"
                "  WHEN j.id IS NULL THEN 'not_found'"
                "  WHEN j.cancel_requested AND j.state = 'running' THEN 'cancel_requested'"
                "  ELSE 'already_' || j.state END)"
                " FROM unnest($1::bigint[]) AS u(id) LEFT JOIN dspark.jobs j ON j.id = u.id"
                " LEFT JOIN x ON x.id = u.id ORDER BY u.id",
        1, params, &rows);
    free(idarr);
    if (r < 0)
        return ctl_fail("could not cancel");
    size_t i, missing = 0;
    json_t *row;
    json_array_foreach(rows, i, row)
        if (strcmp(json_string_value(json_object_get(row, "result")), "not_found") == 0)
            missing++;
    if (batch && json_array_size(rows) == 0) {
        json_decref(rows);
        ctl_error("no jobs in batch %s (or the batch is not yours)", batch);
        return CTL_EXIT_ERROR;
    }
    if (c->json) {
        ctl_print_json(rows, false);
    } else if (!c->quiet) {
        json_array_foreach(rows, i, row) {
            const char *res = json_string_value(json_object_get(row, "result"));
            printf("job %" JSON_INTEGER_FORMAT ": ", json_integer_value(json_object_get(row, "id")));
            if (strcmp(res, "cancel_requested") == 0)
                printf("cancel requested (running; stops within a round)\n");
            else if (strcmp(res, "not_found") == 0)
                printf("not found\n");
            else if (strncmp(res, "already_", 8) == 0)
                printf("already %s\n", res + 8);
            else
                printf("%s\n", res);
        }
    }
    json_decref(rows);
    if (missing) {
        ctl_error("%zu job%s not found (or not yours)", missing, missing == 1 ? "" : "s");
        return CTL_EXIT_ERROR;
    }
    return CTL_EXIT_OK;
}

static void resubmit_usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl resubmit [OPTIONS] BATCH\n"
            "\n"
            "Send a batch's failed and cancelled jobs again, as a new batch: the same\n"
            "custom_id, model, prompt and parameters, fresh attempts. Finished jobs are\n"
            "never run again in place. Prints the new batch like submit -f; nothing, and\n"
            "no batch, when no job of BATCH is in those states.\n"
            "  -s, --state LIST      the finished states to send again, comma-separated:\n"
            "                        failed, cancelled, succeeded (default failed,cancelled)\n"
            "  -b, --batch BATCH     the batch, instead of the argument\n"
            "  -d, --dsn DSN, --json, -q (the new batch id only), -h, --help\n");
}

/* The finished states resubmit may send again, in the order --state gives them (each once). */
struct states {
    const char *name[3];
    int n;
};

static const char *const finished_states[] = { "failed", "cancelled", "succeeded" };

/* Parse "failed,cancelled"; 0, or the usage error's exit status. */
static int parse_states(const char *list, struct states *ret)
{
    ret->n = 0;
    for (const char *p = list;; p++) {
        size_t len = strcspn(p, ",");
        const char *known = NULL;
        for (int i = 0; i < 3; i++)
            if (len == strlen(finished_states[i]) && strncmp(p, finished_states[i], len) == 0)
                known = finished_states[i];
        if (!known)
            return ctl_usage_error("resubmit ",
                                   "--state: '%.*s' is not a finished state (failed, cancelled, succeeded)", (int)len,
                                   p);
        bool again = false;
        for (int i = 0; i < ret->n; i++)
            again |= ret->name[i] == known;
        if (!again)
            ret->name[ret->n++] = known;
        p += len;
        if (!*p)
            return 0;
    }
}

/* The states joined: as a PostgreSQL array literal ("{failed,cancelled}"), or as words ("failed or
 * cancelled"). */
static void join_states(const struct states *st, bool words, char *out, size_t size)
{
    size_t used = (size_t)snprintf(out, size, "%s", words ? "" : "{");
    for (int i = 0; i < st->n && used < size; i++)
        used += (size_t)snprintf(out + used, size - used, "%s%s",
                                 i == 0 ? "" : !words ? "," : i == st->n - 1 ? " or " : ", ", st->name[i]);
    if (!words && used < size)
        snprintf(out + used, size - used, "}");
}

int ctl_cmd_resubmit(struct ctl *c, int argc, char **argv)
{
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "state", required_argument, NULL, 's' },
        { "batch", required_argument, NULL, 'b' },
        { NULL, 0, NULL, 0 },
    };
    const char *batch = NULL;
    struct states st = { { finished_states[0], finished_states[1] }, 2 };
    int64_t v;
    int opt, rc;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "s:b:", opts, NULL)) != -1) {
        if (ctl_common_opt(c, opt, optarg))
            continue;
        switch (opt) {
        case 'h':
            resubmit_usage(stdout);
            return CTL_EXIT_OK;
        case 's':
            if ((rc = parse_states(optarg, &st)))
                return rc;
            break;
        case 'b':
            batch = optarg;
            break;
        default:
            resubmit_usage(stderr);
            return CTL_EXIT_USAGE;
        }
    }
    if (!batch && optind < argc)
        batch = argv[optind++];
    if (!batch)
        return ctl_usage_error("resubmit ", "which batch? (dsparkctl resubmit BATCH)");
    if (optind < argc)
        return ctl_usage_error("resubmit ", "one batch at a time, got '%s' too", argv[optind]);
    if (ctl_parse_int64("resubmit", "BATCH", batch, 1, INT64_MAX, &v))
        return CTL_EXIT_USAGE;
    if ((rc = ctl_connect(c, true)))
        return rc;
    char states[64], words[80];
    join_states(&st, false, states, sizeof states);
    join_states(&st, true, words, sizeof words);
    const char *params[] = { batch, states };
    json_t *rows;
    if (ctl_query_json(c,
                       "SELECT json_build_object('batch_id', r.batch_id, 'jobs', r.jobs, 'first_id', r.first_id,"
                       " 'last_id', r.last_id) FROM dspark.resubmit_batch($1::bigint, $2::text[]) r",
                       2, params, &rows) < 0)
        return ctl_fail("could not resubmit");
    json_t *row = json_array_get(rows, 0);
    if (c->json) {
        json_t *out = row ? json_incref(row)
                          : json_pack("{s:n, s:i, s:n, s:n}", "batch_id", "jobs", 0, "first_id", "last_id");
        json_object_set_new(out, "resubmit_of", json_integer(v));
        ctl_print_json(out, true);
        json_decref(out);
    } else if (!row) {
        if (!c->quiet)
            printf("batch %s has no %s jobs: nothing resubmitted\n", batch, words);
    } else if (c->quiet) {
        printf("%" JSON_INTEGER_FORMAT "\n", json_integer_value(json_object_get(row, "batch_id")));
    } else {
        json_int_t jobs = json_integer_value(json_object_get(row, "jobs")),
                   first = json_integer_value(json_object_get(row, "first_id")),
                   last = json_integer_value(json_object_get(row, "last_id"));
        printf("batch %" JSON_INTEGER_FORMAT ": %" JSON_INTEGER_FORMAT " jobs (ids %" JSON_INTEGER_FORMAT
               "..%" JSON_INTEGER_FORMAT "%s), the %s jobs of batch %s\n",
               json_integer_value(json_object_get(row, "batch_id")), jobs, first, last,
               last - first + 1 == jobs ? "" : ", other jobs among them", words, batch);
    }
    json_decref(rows);
    return CTL_EXIT_OK;
}
