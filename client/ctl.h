/* ctl.h: internal interfaces of dsparkctl (client/). */
#ifndef DS_CTL_H
#define DS_CTL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

#include "dspark/ds-db.h"

/* Exit codes (documented in dsparkctl(1)). */
enum {
    CTL_EXIT_OK = 0,
    CTL_EXIT_ERROR = 1,   /* any error: connection, database, input */
    CTL_EXIT_USAGE = 2,   /* bad command line */
    CTL_EXIT_FAILED = 3,  /* wait: every job finished, some failed or were cancelled */
    CTL_EXIT_TIMEOUT = 4, /* wait: --timeout passed first */
};

/* Options shared by every subcommand. */
struct ctl {
    const char *dsn;    /* --dsn, else $DSPARK_DSN, else libpq's PG* environment */
    bool json;          /* --json */
    bool quiet;         /* --quiet */
    struct ds_db *db;
};

/* The long options every subcommand accepts, and their handling: an entry
 * list to append to a getopt_long table, and a handler returning 1 when it
 * took the option. */
#define CTL_COMMON_LONGOPTS                                   \
    { "dsn", required_argument, NULL, 'd' },                  \
    { "json", no_argument, NULL, 'J' },                       \
    { "quiet", no_argument, NULL, 'q' },                      \
    { "help", no_argument, NULL, 'h' }
#define CTL_COMMON_SHORTOPTS "d:qh"
int ctl_common_opt(struct ctl *c, int opt, const char *arg);

/* Print "dsparkctl: error: ..." (or the given prefix) to stderr. */
void ctl_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void ctl_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Usage error: message plus "try 'dsparkctl CMD --help'", returns CTL_EXIT_USAGE. */
int ctl_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Connect (once) and, when check_schema, refuse an unknown schema version.
 * Prints the error; returns 0 or CTL_EXIT_ERROR. */
int ctl_connect(struct ctl *c, bool check_schema);
/* Print the error detail of a failed ds_* call with a context; returns CTL_EXIT_ERROR. */
int ctl_fail(const char *context);

/* Parse helpers: 0 on success, -1 (with a usage message printed) otherwise. */
int ctl_parse_int64(const char *cmd, const char *opt, const char *s, int64_t lo, int64_t hi,
                    int64_t *ret);
int ctl_parse_double(const char *cmd, const char *opt, const char *s, double *ret);
/* Collect job ids from argv[first..argc) ("12", "12,13", "10-20"), sorted, each once; usage error on bad input. */
int ctl_parse_ids(const char *cmd, int argc, char **argv, int first, int64_t **ret_ids,
                  size_t *ret_n);
/* The jobs a command acts on: ids from argv[first..argc) or --batch (batch, or
 * NULL), exactly one of the two. *ret_idarr gets the ids as a PostgreSQL array
 * literal (NULL with --batch; the caller frees it), *ret_n their count.
 * Returns 0, or CTL_EXIT_USAGE after a usage message. */
int ctl_parse_selection(const char *cmd, int argc, char **argv, int first, const char *batch, char **ret_idarr,
                        size_t *ret_n);

/* Run a query whose single column is one JSON document per row, and return
 * the rows as a JSON array (new reference). */
int ctl_query_json(struct ctl *c, const char *sql, int nparams, const char *const *params,
                   json_t **ret);
/* Print a JSON value followed by a newline to stdout (compact when lines). */
void ctl_print_json(json_t *v, bool compact);

/* A plain text table (column titles, then rows of strings). */
struct ctl_table;
struct ctl_table *ctl_table_new(int ncols, const char *const *titles);
/* Add one row of ncols strings (copied; NULL prints as "-"). */
void ctl_table_add(struct ctl_table *t, const char *const *cells);
/* Right-align column col (numbers). */
void ctl_table_right(struct ctl_table *t, int col);
void ctl_table_print(struct ctl_table *t, FILE *f);
struct ctl_table *ctl_table_free(struct ctl_table *t);
/* Format a JSON scalar for a table cell into buf (NULL/null -> "-"). */
const char *ctl_cell(json_t *v, char *buf, size_t size);
/* A number with a fixed number of decimals, or "-". */
const char *ctl_cell_real(json_t *v, int decimals, char *buf, size_t size);

/* Subcommands: argc/argv start at the subcommand's name. */
int ctl_cmd_db(struct ctl *c, int argc, char **argv);
int ctl_cmd_submit(struct ctl *c, int argc, char **argv);
int ctl_cmd_status(struct ctl *c, int argc, char **argv);
int ctl_cmd_list(struct ctl *c, int argc, char **argv);
int ctl_cmd_wait(struct ctl *c, int argc, char **argv); /* also "watch" */
int ctl_cmd_cancel(struct ctl *c, int argc, char **argv);
int ctl_cmd_resubmit(struct ctl *c, int argc, char **argv); /* in cmd-results.c */
int ctl_cmd_results(struct ctl *c, int argc, char **argv);
int ctl_cmd_stats(struct ctl *c, int argc, char **argv);
int ctl_cmd_workers(struct ctl *c, int argc, char **argv);
int ctl_cmd_keygen(struct ctl *c, int argc, char **argv); /* in cmd-wait.c */

#endif
