/* main.c: dsparkctl, the command-line client of the dspark job queue:
 * subcommand dispatch, shared options, connection, and output helpers. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

static const struct {
    const char *name;
    int (*fn)(struct ctl *, int, char **);
    const char *summary;
} commands[] = {
    { "db", ctl_cmd_db, "create, migrate or inspect the database schema" },
    { "submit", ctl_cmd_submit, "submit one prompt or a JSONL file of requests" },
    { "status", ctl_cmd_status, "show the queue, a batch or jobs" },
    { "list", ctl_cmd_list, "list jobs or batches" },
    { "wait", ctl_cmd_wait, "wait until jobs finish (progress on a terminal)" },
    { "watch", ctl_cmd_wait, "print job state changes until they finish" },
    { "cancel", ctl_cmd_cancel, "cancel jobs or a batch" },
    { "resubmit", ctl_cmd_resubmit, "send a batch's failed or cancelled jobs again" },
    { "results", ctl_cmd_results, "print results in the OpenAI Batch output format" },
    { "stats", ctl_cmd_stats, "acceptance, latency and throughput statistics" },
    { "workers", ctl_cmd_workers, "list the GPU workers" },
    { "keygen", ctl_cmd_keygen, "make a CURVE key pair for remote events" },
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: dsparkctl [--dsn DSN] [--json] COMMAND [OPTIONS] [ARGS]\n"
            "\n"
            "Client of the dspark LLM generation queue.\n"
            "\n"
            "Commands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-9s %s\n", commands[i].name, commands[i].summary);
    fprintf(f,
            "\n"
            "Options (also accepted after the command):\n"
            "  -d, --dsn DSN   PostgreSQL connection string or URI\n"
            "                  (default: $DSPARK_DSN, else the PG* environment)\n"
            "      --json      machine-readable output\n"
            "  -q, --quiet     print less\n"
            "  -h, --help      this help; 'dsparkctl COMMAND --help' for a command\n"
            "      --version   print the version (before the command only)\n"
            "\n"
            "Exit status: 0 success, 1 error, 2 usage error, 3 (wait) some jobs failed\n"
            "or were cancelled, 4 (wait) timed out. See dsparkctl(1).\n");
}

void ctl_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("dsparkctl: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void ctl_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("dsparkctl: warning: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int ctl_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("dsparkctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\ntry 'dsparkctl %s--help'\n", cmd ? cmd : "");
    va_end(ap);
    return CTL_EXIT_USAGE;
}

int ctl_fail(const char *context)
{
    if (context)
        ctl_error("%s: %s", context, ds_errdetail());
    else
        ctl_error("%s", ds_errdetail());
    return CTL_EXIT_ERROR;
}

int ctl_common_opt(struct ctl *c, int opt, const char *arg)
{
    switch (opt) {
    case 'd':
        c->dsn = arg;
        return 1;
    case 'J':
        c->json = true;
        return 1;
    case 'q':
        c->quiet = true;
        return 1;
    default:
        return 0;
    }
}

int ctl_connect(struct ctl *c, bool check_schema)
{
    if (!c->db) {
        const char *dsn = c->dsn ? c->dsn : getenv("DSPARK_DSN");
        int r = ds_db_connect(dsn, "dsparkctl", &c->db);
        if (r < 0)
            return ctl_fail(NULL);
    }
    if (check_schema && ds_db_check_schema(c->db) < 0)
        return ctl_fail(NULL);
    return 0;
}

int ctl_parse_int64(const char *cmd, const char *opt, const char *s, int64_t lo, int64_t hi,
                    int64_t *ret)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        char c1[64];
        snprintf(c1, sizeof c1, "%s ", cmd);
        ctl_usage_error(c1, "%s must be an integer between %lld and %lld, got '%s'", opt,
                        (long long)lo, (long long)hi, s);
        return -1;
    }
    *ret = v;
    return 0;
}

int ctl_parse_double(const char *cmd, const char *opt, const char *s, double *ret)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end) {
        char c1[64];
        snprintf(c1, sizeof c1, "%s ", cmd);
        ctl_usage_error(c1, "%s must be a number, got '%s'", opt, s);
        return -1;
    }
    *ret = v;
    return 0;
}

static int cmp_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

int ctl_parse_ids(const char *cmd, int argc, char **argv, int first, int64_t **ret_ids,
                  size_t *ret_n)
{
    int64_t *ids = NULL;
    size_t n = 0, cap = 0;
    char c1[64];
    snprintf(c1, sizeof c1, "%s ", cmd);
    for (int i = first; i < argc; i++) {
        char *s = ds_xstrdup(argv[i]), *save = NULL;
        for (char *tok = strtok_r(s, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            char *end, *dash = strchr(tok + 1, '-');
            long long a, b;
            errno = 0;
            a = strtoll(tok, &end, 10);
            if (dash && end == dash)
                b = strtoll(dash + 1, &end, 10);
            else
                b = a;
            if (errno || *end || end == tok || a < 1 || b < a || b - a > 10000000) {
                ctl_usage_error(c1, "bad job id '%s' (ids are positive integers, or ranges A-B)",
                                tok);
                free(s);
                free(ids);
                return -1;
            }
            for (long long v = a;; v++) {   /* (v <= b would overflow at the largest id) */
                if (n == cap)
                    ids = ds_xrealloc(ids, (cap = cap ? cap * 2 : 16) * sizeof *ids);
                ids[n++] = v;
                if (v == b)
                    break;
            }
        }
        free(s);
    }
    /* in increasing order, each once ("1-5 3-8" names eight jobs) */
    if (n > 1) {
        qsort(ids, n, sizeof *ids, cmp_id);
        size_t k = 1;
        for (size_t i = 1; i < n; i++)
            if (ids[i] != ids[k - 1])
                ids[k++] = ids[i];
        n = k;
    }
    *ret_ids = ids;
    *ret_n = n;
    return 0;
}

int ctl_parse_selection(const char *cmd, int argc, char **argv, int first, const char *batch, char **ret_idarr,
                        size_t *ret_n)
{
    int64_t *ids = NULL;
    size_t n = 0;
    if (ctl_parse_ids(cmd, argc, argv, first, &ids, &n) < 0)
        return CTL_EXIT_USAGE;
    if (!n == !batch) {
        free(ids);
        char c1[64];
        snprintf(c1, sizeof c1, "%s ", cmd);
        return ctl_usage_error(c1, "give job ids or --batch (not both)");
    }
    *ret_idarr = n ? ds_db_int64_array(ids, n) : NULL;
    *ret_n = n;
    free(ids);
    return 0;
}

int ctl_query_json(struct ctl *c, const char *sql, int nparams, const char *const *params,
                   json_t **ret)
{
    PGresult *res;
    int r = ds_db_exec(c->db, sql, nparams, params, &res);
    if (r < 0)
        return r;
    json_t *arr = json_array();
    int n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        if (PQgetisnull(res, i, 0)) {
            json_array_append_new(arr, json_null());
            continue;
        }
        json_error_t jerr;
        json_t *v = json_loads(PQgetvalue(res, i, 0), JSON_DECODE_ANY, &jerr);
        if (!v) {
            PQclear(res);
            json_decref(arr);
            return ds_seterr(DS_EFORMAT, "the server sent bad JSON: %s", jerr.text);
        }
        json_array_append_new(arr, v);
    }
    PQclear(res);
    *ret = arr;
    return 0;
}

void ctl_print_json(json_t *v, bool compact)
{
    size_t flags = JSON_ENCODE_ANY | JSON_REAL_PRECISION(10) |
                   (compact ? JSON_COMPACT : JSON_INDENT(2));
    json_dumpf(v, stdout, flags);
    fputc('\n', stdout);
}

struct ctl_table {
    int ncols;
    char **cells; /* rows * ncols, row 0 = titles */
    size_t nrows, cap;
    bool *right;
};

struct ctl_table *ctl_table_new(int ncols, const char *const *titles)
{
    struct ctl_table *t = ds_xcalloc(1, sizeof *t);
    t->ncols = ncols;
    t->right = ds_xcalloc((size_t)ncols, sizeof *t->right);
    ctl_table_add(t, titles);
    return t;
}

void ctl_table_add(struct ctl_table *t, const char *const *cells)
{
    if (t->nrows == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 16;
        t->cells = ds_xrealloc(t->cells, t->cap * (size_t)t->ncols * sizeof *t->cells);
    }
    for (int i = 0; i < t->ncols; i++)
        t->cells[t->nrows * (size_t)t->ncols + (size_t)i] = ds_xstrdup(cells[i] ? cells[i] : "-");
    t->nrows++;
}

void ctl_table_right(struct ctl_table *t, int col)
{
    t->right[col] = true;
}

/* Display width of UTF-8 text: count the bytes that start a character. */
static int text_width(const char *s)
{
    int w = 0;
    for (; *s; s++)
        w += ((unsigned char)*s & 0xC0) != 0x80;
    return w;
}

void ctl_table_print(struct ctl_table *t, FILE *f)
{
    int *w = ds_xcalloc((size_t)t->ncols, sizeof *w);
    for (size_t r = 0; r < t->nrows; r++)
        for (int c = 0; c < t->ncols; c++) {
            int cw = text_width(t->cells[r * (size_t)t->ncols + (size_t)c]);
            if (cw > w[c])
                w[c] = cw;
        }
    for (size_t r = 0; r < t->nrows; r++) {
        for (int c = 0; c < t->ncols; c++) {
            const char *s = t->cells[r * (size_t)t->ncols + (size_t)c];
            int pad = w[c] - text_width(s);
            bool last = c == t->ncols - 1;
            if (t->right[c])
                fprintf(f, "%*s%s", pad, "", s);
            else
                fprintf(f, "%s%*s", s, last ? 0 : pad, "");
            if (!last)
                fputs("  ", f);
        }
        fputc('\n', f);
    }
    free(w);
}

struct ctl_table *ctl_table_free(struct ctl_table *t)
{
    if (!t)
        return NULL;
    for (size_t i = 0; i < t->nrows * (size_t)t->ncols; i++)
        free(t->cells[i]);
    free(t->cells);
    free(t->right);
    free(t);
    return NULL;
}

const char *ctl_cell(json_t *v, char *buf, size_t size)
{
    if (!v || json_is_null(v))
        return "-";
    if (json_is_string(v)) {
        /* one line: replace control characters */
        const char *s = json_string_value(v);
        snprintf(buf, size, "%s", s);
        size_t n = strlen(buf);
        if (n < strlen(s)) {
            /* cut: not inside a UTF-8 character (s[n], the first byte left
             * out, continues one: drop that character's first bytes too) */
            while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
                n--;
            buf[n] = 0;
        }
        for (char *p = buf; *p; p++)
            if ((unsigned char)*p < 0x20)
                *p = ' ';
        return buf;
    }
    if (json_is_integer(v)) {
        snprintf(buf, size, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return buf;
    }
    if (json_is_real(v)) {
        snprintf(buf, size, "%.4g", json_real_value(v));
        return buf;
    }
    if (json_is_boolean(v))
        return json_is_true(v) ? "yes" : "no";
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    snprintf(buf, size, "%s", s ? s : "?");
    free(s);
    return buf;
}

const char *ctl_cell_real(json_t *v, int decimals, char *buf, size_t size)
{
    if (!v || !json_is_number(v))
        return "-";
    double x = json_number_value(v);
    if (!isfinite(x))
        return "-";
    snprintf(buf, size, "%.*f", decimals, x);
    return buf;
}

int main(int argc, char **argv)
{
    struct ctl c = { 0 };
    static const struct option opts[] = {
        CTL_COMMON_LONGOPTS,
        { "version", no_argument, NULL, 'V' },
        { NULL, 0, NULL, 0 },
    };
    int opt;
    /* "+": stop at the command name; its options are the command's */
    while ((opt = getopt_long(argc, argv, "+" CTL_COMMON_SHORTOPTS, opts, NULL)) != -1) {
        if (ctl_common_opt(&c, opt, optarg))
            continue;
        switch (opt) {
        case 'h':
            usage(stdout);
            return CTL_EXIT_OK;
        case 'V':
            printf("dsparkctl %s (schema version %d)\n", PACKAGE_VERSION, DS_SCHEMA_VERSION);
            return CTL_EXIT_OK;
        default:
            usage(stderr);
            return CTL_EXIT_USAGE;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return CTL_EXIT_USAGE;
    }
    const char *name = argv[optind];
    int rc = -1;
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(name, commands[i].name) == 0) {
            int sub_argc = argc - optind;
            char **sub_argv = argv + optind;
            optind = 0; /* reinitialise getopt for the command */
            rc = commands[i].fn(&c, sub_argc, sub_argv);
            break;
        }
    if (rc < 0) {
        fprintf(stderr, "dsparkctl: unknown command '%s'\n", name);
        usage(stderr);
        rc = CTL_EXIT_USAGE;
    }
    ds_db_free(c.db);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        if (rc == CTL_EXIT_OK)
            ctl_error("could not write the output: %s", strerror(errno));
        return rc == CTL_EXIT_OK ? CTL_EXIT_ERROR : rc;
    }
    return rc;
}
