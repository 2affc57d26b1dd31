/* ds-cfg.h: the INI configuration file (/etc/dspark/dspark.conf) read through one
 * table per program.
 *
 * File syntax: "[section]" headers; "key = value" lines; blank lines and lines
 * starting with '#' or ';' are ignored; a value may be double-quoted ("a b # c",
 * with \" and \\ escapes); an unquoted value ends at " #" or " ;" (a comment) and
 * is trimmed. Keys are lower case with underscores. A key given twice, an unknown
 * key, an unknown section or an out-of-range value is an error naming the line.
 *
 * Each program describes every key it reads in one table; sections it does not
 * read are listed in `skip_sections` and ignored wholesale (dsparkctl skips
 * [dsparkd], for instance). A key missing from the file takes its default, so
 * removing a line and reloading restores the default.
 *
 * A table may name a check across keys (`check`): a load runs it on the file's
 * values before it keeps any, so a file it refuses changes nothing either.
 *
 * Reload (SIGHUP): the file is parsed and checked completely first, as a start
 * would; on any error nothing changes. Then reloadable keys (DS_CFG_RELOADABLE)
 * take their new values, the check runs again on the values now in force (the
 * others kept), and every other changed key is reported with a warning and keeps
 * its value. */
#ifndef DS_CFG_H
#define DS_CFG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "dspark/ds-err.h"

enum ds_cfg_type {
    DS_CFG_INT,       /* int *; min/max bound the value */
    DS_CFG_DOUBLE,    /* double *; min/max bound the value; NaN and infinities refused */
    DS_CFG_BOOL,      /* bool *; on/off, true/false, yes/no, 1/0 */
    DS_CFG_STRING,    /* char ** (owned by the table: ds_cfg_free()); max > 0 bounds the length */
    DS_CFG_DURATION,  /* int64_t * in milliseconds; "250ms", "5s", "10min", "2h", "7d"; a bare
                       * number is in seconds; min/max in milliseconds */
    DS_CFG_ENUM,      /* int *: index into `choices` (NULL-terminated) */
};

enum {
    DS_CFG_RELOADABLE = 1u << 0,   /* SIGHUP applies a new value */
    DS_CFG_SECRET = 1u << 1,       /* never echoed in messages or dumps */
};

struct ds_cfg_key {
    const char *section;           /* "dsparkd", "worker", "database", "events" */
    const char *name;              /* "heartbeat_interval" */
    enum ds_cfg_type type;
    void *ptr;                     /* where the value lives (see the type) */
    double min, max;               /* bounds (see the type); min == max == 0: unbounded */
    const char *def;               /* default, written as it would be in the file; NULL = empty string */
    unsigned flags;                /* DS_CFG_RELOADABLE, DS_CFG_SECRET */
    const char *const *choices;    /* DS_CFG_ENUM only */
    const char *help;              /* one line for --help and the manual */
};

struct ds_cfg_table {
    const struct ds_cfg_key *keys;
    size_t n_keys;
    const char *const *skip_sections;   /* NULL-terminated list of sections read by other programs */
    /* Checks across keys (NULL: none), called with the values to check in the
     * keys' storage. On an error it returns it (ds_seterr) and sets *ret_key to
     * the `ptr` of the key the error is about (or leaves it NULL); the detail
     * then names the file, and the line that set that key. */
    int (*check)(const void **ret_key);
};

/* Set every key to its default. Fails only on a bad default (a programming error). */
int ds_cfg_defaults(const struct ds_cfg_table *t) DS_MUSTCHECK;

/* Read `path` and set every key (file value or default). On error (the table's
 * check included) no key changes and the detail names the file and line
 * ("'/etc/dspark/dspark.conf' line 12: unknown key 'foo' in section [dsparkd]");
 * later parse errors are counted in the detail. */
int ds_cfg_load(const struct ds_cfg_table *t, const char *path) DS_MUSTCHECK;
/* The same from a string (for tests and --check-config of stdin); `name` appears in messages. */
int ds_cfg_load_string(const struct ds_cfg_table *t, const char *text, const char *name) DS_MUSTCHECK;

/* Re-read `path` for SIGHUP: on error (the check refusing the file, or the
 * values in force once the reloadable keys took theirs) nothing changes;
 * otherwise reloadable keys change, other changed keys are logged as ignored
 * (warning). *ret_changed counts
 * keys that took a new value, *ret_ignored those that need a restart (either may be NULL). */
int ds_cfg_reload(const struct ds_cfg_table *t, const char *path,
                  int *ret_changed, int *ret_ignored) DS_MUSTCHECK;
int ds_cfg_reload_string(const struct ds_cfg_table *t, const char *text, const char *name,
                         int *ret_changed, int *ret_ignored) DS_MUSTCHECK;

/* Free the strings the table owns (sets the pointers to NULL). */
void ds_cfg_free(const struct ds_cfg_table *t);

/* Format the current value of key k as it would appear in the file ("30s", "on").
 * Secret values come out as "********". Returns buf. */
const char *ds_cfg_format(const struct ds_cfg_key *k, char *buf, size_t size);

/* Parse a duration ("250ms", "5s", "10min", "2h", "7d"; bare = seconds) into
 * milliseconds. */
int ds_cfg_parse_duration(const char *s, int64_t *ret_ms) DS_MUSTCHECK;

/* Write the table as a configuration file to f: every key with its help line,
 * its current value (current) or its default (!current). */
void ds_cfg_dump(const struct ds_cfg_table *t, FILE *f, bool current);

#endif
