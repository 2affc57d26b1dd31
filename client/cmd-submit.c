/* cmd-submit.c: dsparkctl submit: one prompt, or a JSONL file as a batch.
 *
 * Every request is validated first (a bad line N is reported as "line N: ...");
 * the rows then travel by COPY into a temporary table and reach dspark.jobs
 * with one INSERT ... SELECT, all in one transaction: either the whole file
 * is queued or nothing is (unless --skip-invalid drops the bad lines). */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctl.h"
#include "request.h"

#define MAX_REPORTED_ERRORS 20
/* COPY data goes out in pieces well under a local socket's buffer, so that
 * sending never waits on the server: it parses while we read the next lines
 * (pieces of 256 KiB made the two take turns: 200 against 110 ms per 25,000
 * lines, bench/RESULTS.md). */
#define COPY_CHUNK (8 * 1024)

static void submit_usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl submit [OPTIONS] [PROMPT]\n"
            "       dsparkctl submit [OPTIONS] --file FILE.jsonl\n"
            "\n"
            "Queue one prompt (from PROMPT, --prompt, or standard input with '-'), or every\n"
            "line of a JSONL file as one batch. File lines are OpenAI Batch requests\n"
            "{\"custom_id\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\" or\n"
            "\"/v1/completions\", \"body\": {model, messages | prompt, max_tokens, temperature,\n"
            "top_p, top_k, seed, stop}}, or DeepSpec lines {\"turns\": [...]} (the first turn\n"
            "is sent as a user message). Nothing is queued if any line is invalid.\n"
            "\n"
            "Input:\n"
            "  -p, --prompt TEXT       the prompt ('-' reads standard input)\n"
            "      --chat              send the prompt as a user message (chat format)\n"
            "      --system TEXT       a system message before it (implies --chat)\n"
            "  -f, --file FILE         JSONL requests ('-' reads standard input)\n"
            "      --skip-invalid      queue the valid lines of FILE, warn about the others\n"
            "      --metadata JSON     batch metadata (a JSON object)\n"
            "Defaults for what a request leaves out:\n"
            "  -m, --model NAME        model (else $DSPARK_MODEL)\n"
            "      --max-tokens N      1..1000000 (default 1024)\n"
            "      --temperature T     0..100 (default 1; 0 = greedy)\n"
            "      --top-p P           (0, 1] (default 1)\n"
            "      --top-k K           0 = off (default 0)\n"
            "      --seed N            sampling seed\n"
            "      --stop TEXT         stop string (repeatable, at most 16)\n"
            "For every job:\n"
            "      --spec-mode MODE    dspark (default), dspark-async, fixed:N, threshold:X, none\n"
            "      --priority N        -1000..1000, higher first (default 0)\n"
            "      --max-attempts N    claims before a job whose worker dies fails (default 3)\n"
            "      --run-after TIME    do not start before TIME (a timestamp)\n"
            "      --delay INTERVAL    do not start before now + INTERVAL ('90 s', '2 hours')\n"
            "      --expires-at TIME   not run if still queued at TIME: then cancelled, reason 'expired'\n"
            "      --expires-in INTERVAL  the same at now + INTERVAL ('24 hours': a completion window)\n"
            "Output: the job id, or 'batch B: N jobs'; --json gives an object.\n"
            "  -d, --dsn DSN, --json, -q, --quiet, -h, --help\n");
}

/* A set of custom_ids with the line that first used each. */
struct idset {
    char **keys;
    long *lines;
    size_t cap, n;
};

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

/* Insert key; returns 0, or the line that already holds it. */
static long idset_add(struct idset *set, const char *key, long line)
{
    if (set->n * 2 >= set->cap) {
        struct idset big = { 0 };
        big.cap = set->cap ? set->cap * 2 : 1024;
        big.keys = ds_xcalloc(big.cap, sizeof *big.keys);
        big.lines = ds_xcalloc(big.cap, sizeof *big.lines);
        for (size_t i = 0; i < set->cap; i++)
            if (set->keys[i]) {
                size_t j = hash_str(set->keys[i]) & (big.cap - 1);
                while (big.keys[j])
                    j = (j + 1) & (big.cap - 1);
                big.keys[j] = set->keys[i];
                big.lines[j] = set->lines[i];
            }
        big.n = set->n;
        free(set->keys);
        free(set->lines);
        *set = big;
    }
    size_t j = hash_str(key) & (set->cap - 1);
    while (set->keys[j]) {
        if (strcmp(set->keys[j], key) == 0)
            return set->lines[j];
        j = (j + 1) & (set->cap - 1);
    }
    set->keys[j] = ds_xstrdup(key);
    set->lines[j] = line;
    set->n++;
    return 0;
}

static void idset_free(struct idset *set)
{
    for (size_t i = 0; i < set->cap; i++)
        free(set->keys[i]);
    free(set->keys);
    free(set->lines);
}

struct submit_opts {
    struct ctl_params params;
    const char *prompt;
    const char *system;
    bool chat;
    const char *file;
    bool skip_invalid;
    const char *metadata;
    const char *spec_mode;
    const char *priority;
    const char *max_attempts;
    const char *run_after;
    const char *delay;
    const char *expires_at;
    const char *expires_in;
};

/* The options that only the database's rules judge (the speculation mode,
 * start times), asked of the server before anything is written, so that a bad
 * value is a usage error naming the option, as for the others. 0, or the
 * exit status. */
static int check_server_options(struct ctl *c, const struct submit_opts *o)
{
    const struct { const char *opt, *value, *sql; } checks[] = {
        { "--spec-mode", o->spec_mode, "SELECT $1::dspark.spec_mode" },
        { "--run-after", o->run_after, "SELECT $1::timestamptz" },
        { "--delay", o->delay, "SELECT now() + $1::interval" },
        { "--expires-at", o->expires_at, "SELECT $1::timestamptz" },
        { "--expires-in", o->expires_in, "SELECT now() + $1::interval" },
    };
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        if (!checks[i].value)
            continue;
        const char *params[] = { checks[i].value };
        if (ds_db_command(c->db, checks[i].sql, 1, params) == 0)
            continue;
        if (!ds_db_ok(c->db))
            return ctl_fail(NULL);
        return ctl_usage_error("submit ", "%s '%s': %s", checks[i].opt, checks[i].value, ds_errdetail());
    }
    if (o->expires_at || o->expires_in) {   /* a deadline at or before the start would expire every job */
        const char *params[] = { o->run_after, o->delay, o->expires_at, o->expires_in };
        PGresult *res;
        if (ds_db_exec(c->db,
                       "SELECT coalesce($3::timestamptz, now() + $4::interval)"
                       " > coalesce($1::timestamptz, now()) + coalesce($2::interval, interval '0')",
                       4, params, &res) < 0)
            return ctl_fail(NULL);
        bool after_start = PQgetvalue(res, 0, 0)[0] == 't';
        PQclear(res);
        if (!after_start)
            return ctl_usage_error("submit ", "%s is not after the jobs may start: every job would expire",
                                   o->expires_at ? "--expires-at" : "--expires-in");
    }
    return 0;
}

/* All of f, NUL-terminated; its length in *len. */
static char *read_all(FILE *f, size_t *len)
{
    struct ds_buf b = { 0 };
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0)
        ds_buf_put(&b, tmp, n);
    if (!b.data)
        ds_buf_put(&b, "", 0);
    *len = b.len;
    return b.data;
}

/* Send buffered COPY data. */
static int copy_flush(struct ctl *c, struct ds_buf *b)
{
    if (b->len == 0)
        return 0;
    if (PQputCopyData(ds_db_conn(c->db), b->data, (int)b->len) != 1)
        return ds_db_result_error(c->db, NULL);
    b->len = 0;
    return 0;
}

static int begin_copy(struct ctl *c)
{
    int r = ds_db_command(c->db,
                          "CREATE TEMP TABLE ds_submit (seq bigint, custom_id text, model text, "
                          "prompt text, messages jsonb, prompt_ids int[], max_tokens int, "
                          "temperature float8, top_p float8, top_k int, seed bigint, stop text[]) "
                          "ON COMMIT DROP",
                          0, NULL);
    if (r < 0)
        return r;
    PGresult *res = PQexec(ds_db_conn(c->db), "COPY ds_submit (" CTL_COPY_COLUMNS ") FROM STDIN");
    if (!res || PQresultStatus(res) != PGRES_COPY_IN) {
        r = ds_db_result_error(c->db, res);
        PQclear(res);
        return r;
    }
    PQclear(res);
    return 0;
}

/* End the COPY; errmsg non-NULL aborts it. */
static int end_copy(struct ctl *c, const char *errmsg)
{
    PGconn *conn = ds_db_conn(c->db);
    if (PQputCopyEnd(conn, errmsg) != 1)
        return ds_db_result_error(c->db, NULL);
    PGresult *res;
    int r = 0;
    while ((res = PQgetResult(conn))) {
        if (PQresultStatus(res) != PGRES_COMMAND_OK && r == 0 && !errmsg)
            r = ds_db_result_error(c->db, res);
        PQclear(res);
    }
    return r;
}

/* Move the copied rows into dspark.jobs; *ret_* get count, first and last id. */
static int insert_jobs(struct ctl *c, const char *batch_id, const struct submit_opts *o,
                       int64_t *ret_n, int64_t *ret_first, int64_t *ret_last)
{
    const char *params[] = { batch_id, o->spec_mode, o->priority, o->max_attempts,
                             o->run_after, o->delay, o->expires_at, o->expires_in };
    PGresult *res;
    /* room to sort a large file's rows in memory */
    int r = ds_db_command(c->db, "SET LOCAL work_mem = '64MB'", 0, NULL);
    if (r < 0)
        return r;
    r = ds_db_exec(
        c->db,
        "WITH ins AS ("
        " INSERT INTO dspark.jobs (batch_id, custom_id, model, prompt, messages, prompt_ids,"
        "  max_tokens, temperature, top_p, top_k, seed, stop, spec_mode, priority, max_attempts,"
        "  run_after, expires_at)"
        " SELECT $1::bigint, custom_id, model, prompt, messages, prompt_ids, max_tokens,"
        "  temperature, top_p, top_k, seed, stop, coalesce($2::dspark.spec_mode, 'dspark'),"
        "  coalesce($3::dspark.priority, 0), coalesce($4::dspark.max_attempts, 3),"
        "  coalesce($5::timestamptz, now()) + coalesce($6::interval, interval '0'),"
        "  coalesce($7::timestamptz, now() + $8::interval)"
        " FROM ds_submit ORDER BY seq"
        " RETURNING id)"
        " SELECT count(*), min(id), max(id) FROM ins",
        8, params, &res);
    if (r < 0)
        return r;
    *ret_n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    *ret_first = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    *ret_last = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
    PQclear(res);
    return 0;
}

static int submit_prompt(struct ctl *c, struct submit_opts *o)
{
    char *stdin_text = NULL;
    const char *text = o->prompt;
    if (strcmp(text, "-") == 0) {
        size_t n;
        stdin_text = read_all(stdin, &n);
        if (memchr(stdin_text, 0, n)) {
            free(stdin_text);
            ctl_error("prompt: the standard input holds a NUL byte");
            return CTL_EXIT_ERROR;
        }
        /* the line end that ends the input */
        if (n > 0 && stdin_text[n - 1] == '\n')
            stdin_text[--n] = 0;
        if (n > 0 && stdin_text[n - 1] == '\r')
            stdin_text[--n] = 0;
        text = stdin_text;
    }
    struct ctl_request req;
    char err[512];
    if (ctl_request_from_prompt(text, o->chat, o->system, &o->params, &req, err, sizeof err) <
        0) {
        free(stdin_text);
        ctl_error("%s", err);
        return CTL_EXIT_ERROR;
    }
    free(stdin_text);
    int rc = ctl_connect(c, true);
    if (!rc)
        rc = check_server_options(c, o);
    if (rc) {
        ctl_request_done(&req);
        return rc;
    }
    struct ds_buf row = { 0 };
    ctl_request_copy_row(&req, 1, &row);
    ctl_request_done(&req);
    int64_t n = 0, first = 0, last = 0;
    int r = ds_db_begin(c->db);
    if (r == 0)
        r = begin_copy(c);
    if (r == 0)
        r = copy_flush(c, &row);
    if (r == 0)
        r = end_copy(c, NULL);
    if (r == 0)
        r = insert_jobs(c, NULL, o, &n, &first, &last);
    if (r == 0)
        r = ds_db_commit(c->db);
    ds_buf_free(&row);
    if (r < 0) {
        ds_db_rollback(c->db);
        return ctl_fail("could not submit the job");
    }
    if (c->json) {
        json_t *j = json_pack("{s:I}", "id", (json_int_t)first);
        ctl_print_json(j, true);
        json_decref(j);
    } else {
        printf("%" PRId64 "\n", first);
    }
    return CTL_EXIT_OK;
}

static int submit_file(struct ctl *c, struct submit_opts *o)
{
    FILE *f = strcmp(o->file, "-") == 0 ? stdin : fopen(o->file, "r");
    if (!f) {
        ctl_error("could not open '%s': %s", o->file, strerror(errno));
        return CTL_EXIT_ERROR;
    }
    const char *fname = f == stdin ? "<stdin>" : o->file;

    json_t *meta = NULL;
    if (o->metadata) {
        json_error_t jerr;
        meta = json_loads(o->metadata, 0, &jerr);
        if (!meta || !json_is_object(meta)) {
            json_decref(meta);
            if (f != stdin)
                fclose(f);
            return ctl_usage_error("submit ", "--metadata must be a JSON object");
        }
    } else {
        meta = json_object();
    }
    if (!json_object_get(meta, "input_file"))
        json_object_set_new(meta, "input_file", json_string(fname));
    char *meta_text = json_dumps(meta, JSON_COMPACT);
    json_decref(meta);

    int rc = ctl_connect(c, true);
    if (!rc)
        rc = check_server_options(c, o);
    if (rc) {
        free(meta_text);
        if (f != stdin)
            fclose(f);
        return rc;
    }

    char batch_id[32] = "";
    PGresult *res;
    const char *bp[] = { meta_text };
    int r = ds_db_begin(c->db);
    if (r == 0)
        r = ds_db_exec(c->db, "INSERT INTO dspark.batches (metadata) VALUES ($1) RETURNING id", 1,
                       bp, &res);
    free(meta_text);
    if (r == 0) {
        snprintf(batch_id, sizeof batch_id, "%s", PQgetvalue(res, 0, 0));
        PQclear(res);
        r = begin_copy(c);
    }
    if (r < 0) {
        ds_db_rollback(c->db);
        if (f != stdin)
            fclose(f);
        return ctl_fail("could not submit the batch");
    }

    struct idset ids = { 0 };
    struct ds_buf buf = { 0 };
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    long lineno = 0, nvalid = 0, nbad = 0;
    char err[512];
    while (r == 0 && (len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        char *text = line;
        size_t l = (size_t)len;
        if (lineno == 1 && l >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0) {
            /* a UTF-8 byte order mark, as some Windows editors write */
            text += 3;
            l -= 3;
        }
        while (l > 0 && (text[l - 1] == '\n' || text[l - 1] == '\r'))
            l--;
        size_t k = 0;
        while (k < l && (text[k] == ' ' || text[k] == '\t'))
            k++;
        if (k == l)
            continue; /* blank line */
        struct ctl_request req;
        int bad = ctl_request_parse_line(text, l, lineno, &o->params, &req, err, sizeof err);
        if (!bad && req.custom_id) {
            long prev = idset_add(&ids, req.custom_id, lineno);
            if (prev) {
                snprintf(err, sizeof err, "custom_id '%.100s' is already used on line %ld",
                         req.custom_id, prev);
                ctl_request_done(&req);
                bad = -1;
            }
        }
        if (bad) {
            nbad++;
            if (o->skip_invalid)
                ctl_warn("%s: line %ld: %s, skipped", fname, lineno, err);
            else if (nbad <= MAX_REPORTED_ERRORS)
                ctl_error("%s: line %ld: %s", fname, lineno, err);
            continue;
        }
        if (nbad == 0 || o->skip_invalid) {
            ctl_request_copy_row(&req, lineno, &buf);
            nvalid++;
            if (buf.len >= COPY_CHUNK)
                r = copy_flush(c, &buf);
        }
        ctl_request_done(&req);
    }
    bool read_error = ferror(f);
    free(line);
    if (f != stdin)
        fclose(f);
    idset_free(&ids);

    bool abort_copy = r < 0 || read_error || (nbad && !o->skip_invalid) || nvalid == 0;
    if (r == 0 && !abort_copy)
        r = copy_flush(c, &buf);
    ds_buf_free(&buf);
    if (r < 0) {
        ds_db_rollback(c->db);
        return ctl_fail("could not submit the batch");
    }
    if (read_error) {
        end_copy(c, "input error");
        ds_db_rollback(c->db);
        ctl_error("could not read '%s'", fname);
        return CTL_EXIT_ERROR;
    }
    if (nbad && !o->skip_invalid) {
        end_copy(c, "invalid input");
        ds_db_rollback(c->db);
        if (nbad > MAX_REPORTED_ERRORS)
            ctl_error("%s: %ld more invalid lines", fname, nbad - MAX_REPORTED_ERRORS);
        ctl_error("%s: %ld invalid line%s: nothing was submitted", fname, nbad,
                  nbad == 1 ? "" : "s");
        return CTL_EXIT_ERROR;
    }
    if (nvalid == 0) {
        end_copy(c, "no input");
        ds_db_rollback(c->db);
        ctl_error("%s: no requests", fname);
        return CTL_EXIT_ERROR;
    }
    int64_t n = 0, first = 0, last = 0;
    r = end_copy(c, NULL);
    if (r == 0)
        r = insert_jobs(c, batch_id, o, &n, &first, &last);
    if (r == 0)
        r = ds_db_commit(c->db);
    if (r < 0) {
        ds_db_rollback(c->db);
        return ctl_fail("could not submit the batch");
    }
    if (c->json) {
        json_t *j = json_pack("{s:s, s:I, s:I, s:I, s:b, s:I}", "batch_id", batch_id, "jobs",
                              (json_int_t)n, "first_id", (json_int_t)first, "last_id",
                              (json_int_t)last, "contiguous", last - first + 1 == n, "skipped",
                              (json_int_t)nbad);
        /* the id as a number */
        json_object_set_new(j, "batch_id", json_integer(strtoll(batch_id, NULL, 10)));
        ctl_print_json(j, true);
        json_decref(j);
    } else if (c->quiet) {
        printf("%s\n", batch_id);
    } else {
        /* (another client's jobs inserted at the same time take ids among these) */
        printf("batch %s: %" PRId64 " jobs (ids %" PRId64 "..%" PRId64 "%s)", batch_id, n, first,
               last, last - first + 1 == n ? "" : ", other jobs among them");
        if (nbad)
            printf(", %ld invalid lines skipped", nbad);
        printf("\n");
    }
    return CTL_EXIT_OK;
}

int ctl_cmd_submit(struct ctl *c, int argc, char **argv)
{
    enum {
        O_CHAT = 256, O_SYSTEM, O_SKIP, O_META, O_MAXTOK, O_TEMP, O_TOPP, O_TOPK, O_SEED,
        O_STOP, O_SPEC, O_PRIO, O_ATTEMPTS, O_RUNAFTER, O_DELAY, O_EXPAT, O_EXPIN
    };
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "prompt", required_argument, NULL, 'p' },
        { "chat", no_argument, NULL, O_CHAT },
        { "system", required_argument, NULL, O_SYSTEM },
        { "file", required_argument, NULL, 'f' },
        { "skip-invalid", no_argument, NULL, O_SKIP },
        { "metadata", required_argument, NULL, O_META },
        { "model", required_argument, NULL, 'm' },
        { "max-tokens", required_argument, NULL, O_MAXTOK },
        { "temperature", required_argument, NULL, O_TEMP },
        { "top-p", required_argument, NULL, O_TOPP },
        { "top-k", required_argument, NULL, O_TOPK },
        { "seed", required_argument, NULL, O_SEED },
        { "stop", required_argument, NULL, O_STOP },
        { "spec-mode", required_argument, NULL, O_SPEC },
        { "priority", required_argument, NULL, O_PRIO },
        { "max-attempts", required_argument, NULL, O_ATTEMPTS },
        { "run-after", required_argument, NULL, O_RUNAFTER },
        { "delay", required_argument, NULL, O_DELAY },
        { "expires-at", required_argument, NULL, O_EXPAT },
        { "expires-in", required_argument, NULL, O_EXPIN },
        { NULL, 0, NULL, 0 },
    };
    struct submit_opts o = { 0 };
    ctl_params_init(&o.params);
    o.params.model = getenv("DSPARK_MODEL");
    if (o.params.model && !*o.params.model)
        o.params.model = NULL;
    char *stops[CTL_STOP_MAX + 1];
    int64_t v;
    int opt, rc = CTL_EXIT_OK;
    while ((opt = getopt_long(argc, argv, CTL_COMMON_SHORTOPTS "p:f:m:", opts, NULL)) != -1) {
        if (ctl_common_opt(c, opt, optarg))
            continue;
        switch (opt) {
        case 'h':
            submit_usage(stdout);
            return CTL_EXIT_OK;
        case 'p': o.prompt = optarg; break;
        case O_CHAT: o.chat = true; break;
        case O_SYSTEM: o.system = optarg; o.chat = true; break;
        case 'f': o.file = optarg; break;
        case O_SKIP: o.skip_invalid = true; break;
        case O_META: o.metadata = optarg; break;
        case 'm': o.params.model = optarg; break;
        case O_MAXTOK:
            if (ctl_parse_int64("submit", "--max-tokens", optarg, 1, CTL_MAX_TOKENS_MAX, &v))
                return CTL_EXIT_USAGE;
            o.params.max_tokens = v;
            break;
        case O_TEMP:
            if (ctl_parse_double("submit", "--temperature", optarg, &o.params.temperature))
                return CTL_EXIT_USAGE;
            break;
        case O_TOPP:
            if (ctl_parse_double("submit", "--top-p", optarg, &o.params.top_p))
                return CTL_EXIT_USAGE;
            break;
        case O_TOPK:
            if (ctl_parse_int64("submit", "--top-k", optarg, 0, INT32_MAX, &v))
                return CTL_EXIT_USAGE;
            o.params.top_k = v;
            break;
        case O_SEED:
            if (ctl_parse_int64("submit", "--seed", optarg, INT64_MIN, INT64_MAX, &o.params.seed))
                return CTL_EXIT_USAGE;
            o.params.has_seed = true;
            break;
        case O_STOP:
            if (o.params.nstop == CTL_STOP_MAX)
                return ctl_usage_error("submit ", "at most %d --stop strings", CTL_STOP_MAX);
            stops[o.params.nstop++] = optarg;
            o.params.stop = stops;
            break;
        case O_SPEC: o.spec_mode = optarg; break;
        case O_PRIO:
            if (ctl_parse_int64("submit", "--priority", optarg, -1000, 1000, &v))
                return CTL_EXIT_USAGE;
            o.priority = optarg;
            break;
        case O_ATTEMPTS:
            if (ctl_parse_int64("submit", "--max-attempts", optarg, 1, 100, &v))
                return CTL_EXIT_USAGE;
            o.max_attempts = optarg;
            break;
        case O_RUNAFTER: o.run_after = optarg; break;
        case O_DELAY: o.delay = optarg; break;
        case O_EXPAT: o.expires_at = optarg; break;
        case O_EXPIN: o.expires_in = optarg; break;
        default:
            submit_usage(stderr);
            return CTL_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        if (o.prompt || o.file || optind + 1 < argc)
            return ctl_usage_error("submit ", "give one prompt, as PROMPT or --prompt, or --file");
        o.prompt = argv[optind];
    }
    if (!o.prompt == !o.file)
        return ctl_usage_error("submit ", "give either a prompt (PROMPT, --prompt) or --file");
    if (o.expires_at && o.expires_in)
        return ctl_usage_error("submit ", "give --expires-at or --expires-in, not both");
    if (o.file && (o.chat || o.system))
        return ctl_usage_error("submit ", "--chat and --system apply to a single prompt");
    if (o.params.model && (!*o.params.model || strlen(o.params.model) > CTL_MODEL_BYTES_MAX))
        return ctl_usage_error("submit ", "--model must have 1 to %d bytes", CTL_MODEL_BYTES_MAX);
    char buf[256];
    if (*ctl_params_check(&o.params, buf, sizeof buf))
        return ctl_usage_error("submit ", "%s", buf);
    rc = o.file ? submit_file(c, &o) : submit_prompt(c, &o);
    return rc;
}
