/* cfg.c: the INI configuration reader (see ds-cfg.h).
 *
 * A load parses the whole text into a shadow array of values (one per table
 * key, starting from the defaults), swaps them into the keys' storage for the
 * table's check across keys, and swaps the old ones back if anything failed, so
 * a file with an error changes nothing. Parse errors are collected: the detail
 * carries the first one and counts the rest. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "dspark/ds-cfg.h"
#include "dspark/ds-log.h"

#define CFG_FILE_MAX (1 << 20)   /* refuse configuration files above 1 MiB */
#define CFG_LINE_MAX 4096

union cfg_val {
    int i;
    double d;
    bool b;
    char *s;
    int64_t ms;
};

struct cfg_parse {
    const struct ds_cfg_table *t;
    const char *name;        /* file name for messages */
    union cfg_val *vals;     /* [n_keys] */
    int *line_of;            /* [n_keys]: line that set the key, 0 = default */
    char first_err[768];
    int n_err;
};

static void parse_error(struct cfg_parse *p, int line, const char *fmt, ...) DS_PRINTF(3, 4);

static void parse_error(struct cfg_parse *p, int line, const char *fmt, ...)
{
    if (p->n_err++ > 0)
        return;
    char msg[640];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (line > 0)
        snprintf(p->first_err, sizeof p->first_err, "'%s' line %d: %s", p->name, line, msg);
    else
        snprintf(p->first_err, sizeof p->first_err, "'%s': %s", p->name, msg);
}

/* ---- value parsers (no side effects; messages into err) ---- */

static bool bounded(const struct ds_cfg_key *k)
{
    return !(k->min == 0 && k->max == 0);
}

/* Whether [s, end) is written in decimal: digits, a point, a sign, and an
 * exponent where allowed (strtod also reads hex, "inf" and "nan"). */
static bool decimal_text(const char *s, const char *end, bool exponent)
{
    if (end == s || strspn(s, exponent ? "+-0123456789.eE" : "+-0123456789.") < (size_t)(end - s))
        return false;
    const char *digit = strpbrk(s, "0123456789");
    return digit && digit < end;
}

int ds_cfg_parse_duration(const char *s, int64_t *ret_ms)
{
    static const struct { const char *unit; double ms; } units[] = {
        { "ms", 1 }, { "s", 1000 }, { "sec", 1000 }, { "min", 60000 },
        { "h", 3600000 }, { "d", 86400000 },
    };
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (!decimal_text(s, end, false) || errno != 0 || !isfinite(v))
        return ds_seterr(DS_ECONFIG, "invalid duration '%s' (expected a number with a unit: ms, s, min, h, d)", s);
    while (*end == ' ')
        end++;
    double mul = 1000;   /* bare number: seconds */
    if (*end) {
        size_t i;
        for (i = 0; i < sizeof units / sizeof units[0]; i++)
            if (strcmp(end, units[i].unit) == 0)
                break;
        if (i == sizeof units / sizeof units[0])
            return ds_seterr(DS_ECONFIG, "invalid unit '%s' in duration '%s' (expected ms, s, min, h or d)", end, s);
        mul = units[i].ms;
    }
    double ms = v * mul;
    if (ms > 9.0e15 || ms < -9.0e15)
        return ds_seterr(DS_ECONFIG, "duration '%s' is too large", s);
    *ret_ms = (int64_t)llround(ms);
    return 0;
}

static void format_ms(int64_t ms, char *buf, size_t size)
{
    static const struct { const char *unit; int64_t ms; } units[] = {
        { "d", 86400000 }, { "h", 3600000 }, { "min", 60000 }, { "s", 1000 },
    };
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (ms != 0 && ms % units[i].ms == 0) {
            snprintf(buf, size, "%" PRId64 "%s", ms / units[i].ms, units[i].unit);
            return;
        }
    snprintf(buf, size, "%" PRId64 "ms", ms);
}

static int parse_bool(const char *s, bool *ret)
{
    static const char *yes[] = { "on", "true", "yes", "1" }, *no[] = { "off", "false", "no", "0" };
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *ret = true;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *ret = false;
            return 0;
        }
    }
    return -1;
}

/* Parse `text` for key k into *out. Returns 0, or -1 with a message in err. */
static int parse_value(const struct ds_cfg_key *k, const char *text, union cfg_val *out,
                       char *err, size_t errsize)
{
    bool secret = k->flags & DS_CFG_SECRET;
    const char *shown = secret ? "********" : text;
    switch (k->type) {
    case DS_CFG_INT: {
        char *end;
        errno = 0;
        long long v = strtoll(text, &end, 10);
        if (end == text || *end || errno != 0) {
            snprintf(err, errsize, "invalid value '%s' for key '%s': expected an integer", shown, k->name);
            return -1;
        }
        double lo = bounded(k) ? k->min : (double)INT32_MIN, hi = bounded(k) ? k->max : (double)INT32_MAX;
        if ((double)v < lo || (double)v > hi) {
            snprintf(err, errsize, "value %lld for key '%s' is out of range (%.0f .. %.0f)", v, k->name, lo, hi);
            return -1;
        }
        out->i = (int)v;
        return 0;
    }
    case DS_CFG_DOUBLE: {
        char *end;
        errno = 0;
        double v = strtod(text, &end);
        if (!decimal_text(text, end, true) || *end || errno != 0 || !isfinite(v)) {
            snprintf(err, errsize, "invalid value '%s' for key '%s': expected a finite number", shown, k->name);
            return -1;
        }
        if (bounded(k) && (v < k->min || v > k->max)) {
            snprintf(err, errsize, "value %g for key '%s' is out of range (%g .. %g)", v, k->name, k->min, k->max);
            return -1;
        }
        out->d = v;
        return 0;
    }
    case DS_CFG_BOOL:
        if (parse_bool(text, &out->b) < 0) {
            snprintf(err, errsize, "invalid value '%s' for key '%s': expected on or off", shown, k->name);
            return -1;
        }
        return 0;
    case DS_CFG_STRING: {
        size_t len = strlen(text);
        if (k->max > 0 && (double)len > k->max) {
            snprintf(err, errsize, "value for key '%s' is too long (%zu bytes, at most %.0f)", k->name, len, k->max);
            return -1;
        }
        if (k->min > 0 && (double)len < k->min) {
            snprintf(err, errsize, "value for key '%s' must not be empty", k->name);
            return -1;
        }
        out->s = ds_xstrdup(text);
        return 0;
    }
    case DS_CFG_DURATION: {
        int64_t ms;
        if (ds_cfg_parse_duration(text, &ms) < 0) {
            snprintf(err, errsize, "key '%s': %s", k->name, ds_errdetail());
            return -1;
        }
        if (bounded(k) && ((double)ms < k->min || (double)ms > k->max)) {
            char lo[32], hi[32];
            format_ms((int64_t)k->min, lo, sizeof lo);
            format_ms((int64_t)k->max, hi, sizeof hi);
            snprintf(err, errsize, "value '%s' for key '%s' is out of range (%s .. %s)", text, k->name, lo, hi);
            return -1;
        }
        out->ms = ms;
        return 0;
    }
    case DS_CFG_ENUM: {
        size_t n = 0, used = 0;
        for (; k->choices && k->choices[n]; n++)
            if (strcasecmp(text, k->choices[n]) == 0) {
                out->i = (int)n;
                return 0;
            }
        used = (size_t)snprintf(err, errsize, "invalid value '%s' for key '%s': expected one of", shown, k->name);
        for (size_t i = 0; i < n && used < errsize; i++)
            used += (size_t)snprintf(err + used, errsize - used, "%s %s", i ? "," : "", k->choices[i]);
        return -1;
    }
    }
    snprintf(err, errsize, "key '%s' has an unknown type", k->name);
    return -1;
}

static void val_free(const struct ds_cfg_key *k, union cfg_val *v)
{
    if (k->type == DS_CFG_STRING) {
        free(v->s);
        v->s = NULL;
    }
}

static void vals_free(const struct ds_cfg_table *t, union cfg_val *vals)
{
    if (!vals)
        return;
    for (size_t i = 0; i < t->n_keys; i++)
        val_free(&t->keys[i], &vals[i]);
    free(vals);
}

static void load_current(const struct ds_cfg_key *k, union cfg_val *v)
{
    switch (k->type) {
    case DS_CFG_INT:
    case DS_CFG_ENUM: v->i = *(int *)k->ptr; break;
    case DS_CFG_DOUBLE: v->d = *(double *)k->ptr; break;
    case DS_CFG_BOOL: v->b = *(bool *)k->ptr; break;
    case DS_CFG_STRING: v->s = *(char **)k->ptr; break;
    case DS_CFG_DURATION: v->ms = *(int64_t *)k->ptr; break;
    }
}

static bool val_equal(const struct ds_cfg_key *k, const union cfg_val *a, const union cfg_val *b)
{
    switch (k->type) {
    case DS_CFG_INT:
    case DS_CFG_ENUM: return a->i == b->i;
    case DS_CFG_DOUBLE: return a->d == b->d;
    case DS_CFG_BOOL: return a->b == b->b;
    case DS_CFG_STRING: return strcmp(a->s ? a->s : "", b->s ? b->s : "") == 0;
    case DS_CFG_DURATION: return a->ms == b->ms;
    }
    return false;
}

const char *ds_cfg_format(const struct ds_cfg_key *k, char *buf, size_t size)
{
    union cfg_val v;
    load_current(k, &v);
    if (k->flags & DS_CFG_SECRET) {
        snprintf(buf, size, "%s", v.s && *v.s ? "********" : "");
        return buf;
    }
    switch (k->type) {
    case DS_CFG_INT: snprintf(buf, size, "%d", v.i); break;
    case DS_CFG_DOUBLE: snprintf(buf, size, "%g", v.d); break;
    case DS_CFG_BOOL: snprintf(buf, size, "%s", v.b ? "on" : "off"); break;
    case DS_CFG_STRING: snprintf(buf, size, "%s", v.s ? v.s : ""); break;
    case DS_CFG_DURATION: format_ms(v.ms, buf, size); break;
    case DS_CFG_ENUM: {
        size_t n = 0;
        while (k->choices && k->choices[n])
            n++;
        snprintf(buf, size, "%s", v.i >= 0 && (size_t)v.i < n ? k->choices[v.i] : "?");
        break;
    }
    }
    return buf;
}

/* Fill vals with the defaults. Returns 0 or -DS_ECONFIG (bad default). */
static int parse_defaults(const struct ds_cfg_table *t, union cfg_val *vals)
{
    char err[512];
    for (size_t i = 0; i < t->n_keys; i++) {
        const struct ds_cfg_key *k = &t->keys[i];
        if (parse_value(k, k->def ? k->def : "", &vals[i], err, sizeof err) < 0) {
            /* an empty default of a bounded string is allowed (a required key) */
            if (k->type == DS_CFG_STRING && !k->def) {
                vals[i].s = ds_xstrdup("");
                continue;
            }
            return ds_seterr(DS_ECONFIG, "default of [%s] %s: %s", k->section, k->name, err);
        }
    }
    return 0;
}

static bool section_known(const struct ds_cfg_table *t, const char *sec)
{
    for (size_t i = 0; i < t->n_keys; i++)
        if (strcmp(t->keys[i].section, sec) == 0)
            return true;
    return false;
}

static bool section_skipped(const struct ds_cfg_table *t, const char *sec)
{
    for (size_t i = 0; t->skip_sections && t->skip_sections[i]; i++)
        if (strcmp(t->skip_sections[i], sec) == 0)
            return true;
    return false;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r'))
        s[--n] = 0;
    return s;
}

/* Turn the raw text after '=' into the value: unquote, or cut a trailing comment.
 * Returns 0 or -1 with a message, which quotes none of the text when secret. Works in place. */
static int unquote(char *raw, bool secret, char **ret, char *err, size_t errsize)
{
    char *s = trim(raw);
    if (*s == '"') {
        char *w = s, *r = s + 1;
        for (; *r && *r != '"'; r++) {
            if (*r == '\\') {
                r++;
                if (*r == '"' || *r == '\\')
                    *w++ = *r;
                else if (*r == 'n')
                    *w++ = '\n';
                else if (*r == 't')
                    *w++ = '\t';
                else {
                    snprintf(err, errsize, "invalid escape '\\%c' in quoted value", *r ? *r : ' ');
                    return -1;
                }
                continue;
            }
            *w++ = *r;
        }
        if (*r != '"') {
            snprintf(err, errsize, "unterminated quoted value");
            return -1;
        }
        char *rest = trim(r + 1);
        if (*rest && *rest != '#' && *rest != ';') {
            if (secret)   /* (it may hold the secret: a password after a closing quote) */
                snprintf(err, errsize, "unexpected text after quoted value");
            else
                snprintf(err, errsize, "unexpected text '%s' after quoted value", rest);
            return -1;
        }
        *w = 0;
        *ret = s;
        return 0;
    }
    for (char *c = s; *c; c++)
        if ((*c == '#' || *c == ';') && c > s && (c[-1] == ' ' || c[-1] == '\t')) {
            *c = 0;
            break;
        }
    *ret = trim(s);
    return 0;
}

static void parse_text(struct cfg_parse *p, const char *text)
{
    const struct ds_cfg_table *t = p->t;
    char section[128] = "";
    bool skipping = false, have_section = false;
    int lineno = 0;
    const char *cur = text;
    while (*cur) {
        const char *nl = strchr(cur, '\n');
        size_t len = nl ? (size_t)(nl - cur) : strlen(cur);
        char line[CFG_LINE_MAX];
        lineno++;
        if (len >= sizeof line) {
            parse_error(p, lineno, "line is too long (more than %d bytes)", CFG_LINE_MAX - 1);
            cur = nl ? nl + 1 : cur + len;
            continue;
        }
        memcpy(line, cur, len);
        line[len] = 0;
        cur = nl ? nl + 1 : cur + len;
        char *s = trim(line);
        if (*s == 0 || *s == '#' || *s == ';')
            continue;
        if (*s == '[') {
            char *end = strchr(s, ']');
            char *after = end ? trim(end + 1) : NULL;
            if (!end || (*after && *after != '#' && *after != ';')) {
                parse_error(p, lineno, "malformed section header '%s'", s);
                skipping = true;
                continue;
            }
            *end = 0;
            char *name = trim(s + 1);
            snprintf(section, sizeof section, "%s", name);
            have_section = true;
            skipping = false;
            if (section_skipped(t, section))
                skipping = true;
            else if (!section_known(t, section)) {
                parse_error(p, lineno, "unknown section [%s]", section);
                skipping = true;
            }
            continue;
        }
        if (skipping)
            continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            parse_error(p, lineno, "expected 'key = value', found '%s'", s);
            continue;
        }
        *eq = 0;
        char *key = trim(s);
        if (!*key) {
            parse_error(p, lineno, "missing key before '='");
            continue;
        }
        if (!have_section) {
            parse_error(p, lineno, "key '%s' appears before any [section]", key);
            continue;
        }
        size_t ki;
        for (ki = 0; ki < t->n_keys; ki++)
            if (strcmp(t->keys[ki].section, section) == 0 && strcmp(t->keys[ki].name, key) == 0)
                break;
        if (ki == t->n_keys) {
            parse_error(p, lineno, "unknown key '%s' in section [%s]", key, section);
            continue;
        }
        const struct ds_cfg_key *k = &t->keys[ki];
        if (p->line_of[ki] > 0) {
            parse_error(p, lineno, "key '%s' in section [%s] is already set on line %d", key, section, p->line_of[ki]);
            continue;
        }
        char err[512], *value;
        if (unquote(eq + 1, k->flags & DS_CFG_SECRET, &value, err, sizeof err) < 0) {
            parse_error(p, lineno, "key '%s': %s", key, err);
            continue;
        }
        union cfg_val v;
        if (parse_value(k, value, &v, err, sizeof err) < 0) {
            parse_error(p, lineno, "%s", err);
            continue;
        }
        val_free(k, &p->vals[ki]);
        p->vals[ki] = v;
        p->line_of[ki] = lineno;
    }
}

/* Parse text into a fresh value array; on success *ret_vals owns it, and
 * *ret_line_of ([n_keys]: the line that set each key, 0 = its default). */
static int parse_all(const struct ds_cfg_table *t, const char *text, const char *name, union cfg_val **ret_vals,
                     int **ret_line_of)
{
    struct cfg_parse p = { .t = t, .name = name };
    p.vals = ds_xcalloc(t->n_keys ? t->n_keys : 1, sizeof *p.vals);
    p.line_of = ds_xcalloc(t->n_keys ? t->n_keys : 1, sizeof *p.line_of);
    int r = parse_defaults(t, p.vals);
    if (r < 0) {
        vals_free(t, p.vals);
        free(p.line_of);
        return r;
    }
    parse_text(&p, text);
    if (p.n_err > 0) {
        vals_free(t, p.vals);
        free(p.line_of);
        if (p.n_err > 1)
            return ds_seterr(DS_ECONFIG, "%s (and %d more error%s)", p.first_err, p.n_err - 1, p.n_err > 2 ? "s" : "");
        return ds_seterr(DS_ECONFIG, "%s", p.first_err);
    }
    *ret_vals = p.vals;
    *ret_line_of = p.line_of;
    return 0;
}

/* Exchange v with the value in key k's storage. */
static void swap_one(const struct ds_cfg_key *k, union cfg_val *v)
{
    union cfg_val cur;
    load_current(k, &cur);
    switch (k->type) {
    case DS_CFG_INT:
    case DS_CFG_ENUM: *(int *)k->ptr = v->i; break;
    case DS_CFG_DOUBLE: *(double *)k->ptr = v->d; break;
    case DS_CFG_BOOL: *(bool *)k->ptr = v->b; break;
    case DS_CFG_STRING: *(char **)k->ptr = v->s; break;   /* (ownership goes with the pointer) */
    case DS_CFG_DURATION: *(int64_t *)k->ptr = v->ms; break;
    }
    *v = cur;
}

/* Exchange the values in vals ([n_keys]) with those in the keys' storage: every
 * key, or only the reloadable ones. Done twice, it changes nothing. */
static void swap_values(const struct ds_cfg_table *t, union cfg_val *vals, bool reloadable_only)
{
    for (size_t i = 0; i < t->n_keys; i++)
        if (!reloadable_only || (t->keys[i].flags & DS_CFG_RELOADABLE))
            swap_one(&t->keys[i], &vals[i]);
}

/* Run the table's check on the values in the keys' storage. On error the
 * detail names the file, and the line that set the key the check named
 * (`what`, when given, goes before the check's words). */
static int run_check(const struct ds_cfg_table *t, const char *name, const int *line_of, const char *what)
{
    if (!t->check)
        return 0;
    const void *key = NULL;
    int r = t->check(&key);
    if (r >= 0)
        return 0;
    int line = 0;
    for (size_t i = 0; key && i < t->n_keys; i++)
        if (t->keys[i].ptr == key)
            line = line_of[i];
    char detail[768];
    snprintf(detail, sizeof detail, "%s", ds_errdetail());
    if (line > 0)
        return ds_seterr(-r, "'%s' line %d: %s%s", name, line, what ? what : "", detail);
    return ds_seterr(-r, "'%s': %s%s", name, what ? what : "", detail);
}

static int read_file(const char *path, char **ret)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return ds_seterr(DS_ECONFIG, "could not open configuration file '%s': %s", path, strerror(errno));
    char *buf = ds_xmalloc(CFG_FILE_MAX + 1);
    size_t n = fread(buf, 1, CFG_FILE_MAX + 1, f);
    int rerr = ferror(f);
    fclose(f);
    if (rerr) {
        free(buf);
        return ds_seterr(DS_EIO, "could not read configuration file '%s'", path);
    }
    if (n > CFG_FILE_MAX) {
        free(buf);
        return ds_seterr(DS_ECONFIG, "configuration file '%s' is larger than %d bytes", path, CFG_FILE_MAX);
    }
    buf[n] = 0;
    if (strlen(buf) != n) {
        free(buf);
        return ds_seterr(DS_ECONFIG, "configuration file '%s' contains a NUL byte", path);
    }
    *ret = buf;
    return 0;
}

int ds_cfg_defaults(const struct ds_cfg_table *t)
{
    return ds_cfg_load_string(t, "", "defaults");
}

int ds_cfg_load_string(const struct ds_cfg_table *t, const char *text, const char *name)
{
    union cfg_val *vals;
    int *line_of;
    int r = parse_all(t, text, name, &vals, &line_of);
    if (r < 0)
        return r;
    swap_values(t, vals, false);   /* (vals now holds the old values) */
    r = run_check(t, name, line_of, NULL);
    if (r < 0)
        swap_values(t, vals, false);
    vals_free(t, vals);
    free(line_of);
    return r;
}

int ds_cfg_load(const struct ds_cfg_table *t, const char *path)
{
    char *text;
    int r = read_file(path, &text);
    if (r < 0)
        return r;
    r = ds_cfg_load_string(t, text, path);
    free(text);
    return r;
}

int ds_cfg_reload_string(const struct ds_cfg_table *t, const char *text, const char *name,
                         int *ret_changed, int *ret_ignored)
{
    union cfg_val *vals;
    int *line_of;
    int r = parse_all(t, text, name, &vals, &line_of);
    if (r < 0)
        return r;
    /* the whole file, as a start would check it */
    swap_values(t, vals, false);
    r = run_check(t, name, line_of, NULL);
    swap_values(t, vals, false);
    if (r < 0)
        goto out;
    /* the values in force: the new reloadable ones, every other kept */
    swap_values(t, vals, true);   /* (vals now holds the old values of the reloadable keys) */
    r = run_check(t, name, line_of, "with the keys that need a restart unchanged, ");
    if (r < 0) {
        swap_values(t, vals, true);
        goto out;
    }
    int changed = 0, ignored = 0;
    for (size_t i = 0; i < t->n_keys; i++) {
        const struct ds_cfg_key *k = &t->keys[i];
        union cfg_val cur;
        load_current(k, &cur);
        if (val_equal(k, &cur, &vals[i]))
            continue;
        if (k->flags & DS_CFG_RELOADABLE) {
            char old[256], now[256];
            swap_one(k, &vals[i]);
            ds_cfg_format(k, old, sizeof old);
            swap_one(k, &vals[i]);
            ds_cfg_format(k, now, sizeof now);
            ds_log(DS_LOG_INFO, "parameter '%s.%s' changed from '%s' to '%s'", k->section, k->name, old, now);
            changed++;
        } else {
            ds_log(DS_LOG_WARNING, "parameter '%s.%s' cannot be changed without restarting, ignoring",
                   k->section, k->name);
            ignored++;
        }
    }
    if (ret_changed)
        *ret_changed = changed;
    if (ret_ignored)
        *ret_ignored = ignored;
out:
    vals_free(t, vals);
    free(line_of);
    return r;
}

int ds_cfg_reload(const struct ds_cfg_table *t, const char *path, int *ret_changed, int *ret_ignored)
{
    char *text;
    int r = read_file(path, &text);
    if (r < 0)
        return r;
    r = ds_cfg_reload_string(t, text, path, ret_changed, ret_ignored);
    free(text);
    return r;
}

void ds_cfg_free(const struct ds_cfg_table *t)
{
    for (size_t i = 0; i < t->n_keys; i++)
        if (t->keys[i].type == DS_CFG_STRING) {
            char **s = t->keys[i].ptr;
            free(*s);
            *s = NULL;
        }
}

void ds_cfg_dump(const struct ds_cfg_table *t, FILE *f, bool current)
{
    const char *sec = NULL;
    for (size_t i = 0; i < t->n_keys; i++) {
        const struct ds_cfg_key *k = &t->keys[i];
        if (!sec || strcmp(sec, k->section) != 0) {
            fprintf(f, "%s[%s]\n", sec ? "\n" : "", k->section);
            sec = k->section;
        }
        char buf[1024];
        const char *v;
        if (current)
            v = ds_cfg_format(k, buf, sizeof buf);
        else
            v = k->def ? k->def : "";
        bool quote = strpbrk(v, "#;\"\\\n\t") != NULL || (*v && (v[0] == ' ' || v[strlen(v) - 1] == ' '));
        fprintf(f, "# %s%s\n", k->help ? k->help : "", (k->flags & DS_CFG_RELOADABLE) ? " (reloadable)" : "");
        if (quote) {
            fprintf(f, "%s%s = \"", current ? "" : "#", k->name);
            for (const char *c = v; *c; c++) {
                if (*c == '"' || *c == '\\')
                    fputc('\\', f);
                if (*c == '\n' || *c == '\t')   /* (as escapes: the file is read a line at a time) */
                    fprintf(f, "\\%c", *c == '\n' ? 'n' : 't');
                else
                    fputc(*c, f);
            }
            fprintf(f, "\"\n");
        } else {
            fprintf(f, "%s%s = %s\n", current ? "" : "#", k->name, v);
        }
    }
}
