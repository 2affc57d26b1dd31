/* request.c: parse and validate generation requests (see request.h).
 *
 * Accepted lines:
 *   OpenAI Batch:  {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
 *                   "body": {"model": "...", "messages": [...], "max_tokens": 64, ...}}
 *                  url "/v1/completions" takes "prompt" (text, or token ids) instead.
 *   DeepSpec:      {"turns": ["first user turn", ...]} (the first turn becomes one
 *                  user message; custom_id from "custom_id", "question_id" or "line-N")
 * The checks mirror the constraints of sql/001-schema.sql so that a bad line is
 * reported with its number before anything reaches the database. */
#include "config.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "dspark/ds-err.h"
#include "dspark/ds-tokenizer.h"
#include "request.h"

void ctl_params_init(struct ctl_params *p)
{
    memset(p, 0, sizeof *p);
    p->max_tokens = 1024;
    p->temperature = 1.0;
    p->top_p = 1.0;
    p->top_k = 0;
}

const char *ctl_params_check(const struct ctl_params *p, char *buf, size_t size)
{
    if (p->max_tokens < 1 || p->max_tokens > CTL_MAX_TOKENS_MAX)
        snprintf(buf, size, "max_tokens must be between 1 and %d, got %" PRId64,
                 CTL_MAX_TOKENS_MAX, p->max_tokens);
    else if (!isfinite(p->temperature) || p->temperature < 0 ||
             p->temperature > CTL_TEMPERATURE_MAX)
        snprintf(buf, size, "temperature must be a finite number between 0 and 100, got %g",
                 p->temperature);
    else if (!isfinite(p->top_p) || p->top_p <= 0 || p->top_p > 1)
        snprintf(buf, size, "top_p must be above 0 and at most 1, got %g", p->top_p);
    else if (p->top_k < 0 || p->top_k > INT32_MAX)
        snprintf(buf, size, "top_k must be 0 (off) or positive, got %" PRId64, p->top_k);
    else if (p->nstop > CTL_STOP_MAX)
        snprintf(buf, size, "at most %d stop strings, got %zu", CTL_STOP_MAX, p->nstop);
    else {
        buf[0] = 0;
        for (size_t i = 0; i < p->nstop; i++) {
            size_t n = strlen(p->stop[i]);
            if (n < 1 || n > CTL_STOP_BYTES_MAX) {
                snprintf(buf, size, "stop strings must have 1 to %d bytes, got %zu",
                         CTL_STOP_BYTES_MAX, n);
                break;
            }
        }
    }
    return buf;
}

void ctl_request_done(struct ctl_request *r)
{
    free(r->custom_id);
    free(r->model);
    free(r->prompt);
    free(r->messages);
    free(r->prompt_ids);
    for (size_t i = 0; i < r->nstop; i++)
        free(r->stop[i]);
    free(r->stop);
    memset(r, 0, sizeof *r);
}

static int fail(char *err, size_t errsize, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errsize, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsize, fmt, ap);
    va_end(ap);
    return -1;
}

/* Start a request from the defaults. */
static void request_from_defaults(struct ctl_request *r, const struct ctl_params *d)
{
    memset(r, 0, sizeof *r);
    r->model = d->model ? ds_xstrdup(d->model) : NULL;
    r->max_tokens = d->max_tokens;
    r->temperature = d->temperature;
    r->top_p = d->top_p;
    r->top_k = d->top_k;
    r->has_seed = d->has_seed;
    r->seed = d->seed;
    if (d->nstop) {
        r->stop = ds_xcalloc(d->nstop, sizeof *r->stop);
        for (size_t i = 0; i < d->nstop; i++)
            r->stop[i] = ds_xstrdup(d->stop[i]);
        r->nstop = d->nstop;
    }
}

static int check_request(struct ctl_request *r, const char *where, char *err, size_t errsize)
{
    char buf[256];
    if (!r->model)
        return fail(err, errsize, "%smodel: missing (give it in the request or with --model)",
                    where);
    size_t ml = strlen(r->model);
    if (ml < 1 || ml > CTL_MODEL_BYTES_MAX)
        return fail(err, errsize, "%smodel: must have 1 to %d bytes", where, CTL_MODEL_BYTES_MAX);
    struct ctl_params p = {
        .max_tokens = r->max_tokens, .temperature = r->temperature, .top_p = r->top_p,
        .top_k = r->top_k, .stop = r->stop, .nstop = r->nstop,
    };
    if (*ctl_params_check(&p, buf, sizeof buf))
        return fail(err, errsize, "%s%s", where, buf);
    size_t n;
    if (r->prompt && (n = strlen(r->prompt)) > CTL_PROMPT_BYTES_MAX)
        return fail(err, errsize, "%sprompt: must have at most %d bytes, got %zu", where, CTL_PROMPT_BYTES_MAX, n);
    if (r->messages && (n = strlen(r->messages)) > CTL_PROMPT_BYTES_MAX)
        return fail(err, errsize, "%smessages: must have at most %d bytes of JSON, got %zu", where,
                    CTL_PROMPT_BYTES_MAX, n);
    return 0;
}

/* body.<name> as an integer in [lo, hi] (absent: keep *v). */
static int get_int(json_t *obj, const char *name, const char *where, int64_t lo, int64_t hi,
                   int64_t *v, char *err, size_t errsize)
{
    json_t *x = json_object_get(obj, name);
    if (!x || json_is_null(x))
        return 0;
    if (json_is_real(x) && json_real_value(x) == floor(json_real_value(x)) &&
        fabs(json_real_value(x)) < 9e15) {
        *v = (int64_t)json_real_value(x);
    } else if (!json_is_integer(x)) {
        return fail(err, errsize, "%s%s: must be an integer", where, name);
    } else {
        *v = json_integer_value(x);
    }
    if (*v < lo || *v > hi)
        return fail(err, errsize, "%s%s: must be an integer between %" PRId64 " and %" PRId64
                    ", got %" PRId64, where, name, lo, hi, *v);
    return 0;
}

static int get_real(json_t *obj, const char *name, const char *where, double *v, char *err,
                    size_t errsize)
{
    json_t *x = json_object_get(obj, name);
    if (!x || json_is_null(x))
        return 0;
    if (!json_is_number(x))
        return fail(err, errsize, "%s%s: must be a number", where, name);
    *v = json_number_value(x);
    return 0;
}

/* The text of a message's content (ds_chat_content_text: a string, or text parts joined with newlines). */
static int content_text(json_t *c, const char *where, size_t i, char **ret, char *err,
                        size_t errsize)
{
    const char *why = NULL;
    long part = -1;
    *ret = ds_chat_content_text(c, &why, &part);
    if (*ret)
        return 0;
    if (part >= 0)
        return fail(err, errsize, "%smessages[%zu].content[%ld]: %s", where, i, part, why);
    return fail(err, errsize, "%smessages[%zu].content: %s", where, i, why);
}

static int parse_messages(json_t *msgs, const char *where, struct ctl_request *r, char *err,
                          size_t errsize)
{
    if (!json_is_array(msgs) || json_array_size(msgs) == 0)
        return fail(err, errsize, "%smessages: must be a non-empty array", where);
    json_t *out = json_array();
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        if (!json_is_object(m)) {
            json_decref(out);
            return fail(err, errsize, "%smessages[%zu]: must be an object", where, i);
        }
        json_t *role = json_object_get(m, "role");
        const char *rs = json_is_string(role) ? json_string_value(role) : NULL;
        if (!rs || (strcmp(rs, "system") != 0 && strcmp(rs, "user") != 0 &&
                    strcmp(rs, "assistant") != 0 && strcmp(rs, "developer") != 0 &&
                    strcmp(rs, "tool") != 0)) {
            json_decref(out);
            return fail(err, errsize,
                        "%smessages[%zu].role: must be system, developer, user, assistant or tool",
                        where, i);
        }
        char *text = NULL;
        if (content_text(json_object_get(m, "content"), where, i, &text, err, errsize) < 0) {
            json_decref(out);
            return -1;
        }
        /* "developer" is the newer name of "system" */
        json_array_append_new(out, json_pack("{s:s, s:s}", "role",
                                             strcmp(rs, "developer") == 0 ? "system" : rs,
                                             "content", text));
        free(text);
    }
    r->messages = json_dumps(out, JSON_COMPACT);
    json_decref(out);
    return 0;
}

static int parse_token_ids(json_t *a, const char *where, struct ctl_request *r, char *err,
                           size_t errsize)
{
    size_t n = json_array_size(a), i;
    if (n < 1 || n > CTL_PROMPT_IDS_MAX)
        return fail(err, errsize, "%sprompt: must hold 1 to %d token ids", where,
                    CTL_PROMPT_IDS_MAX);
    r->prompt_ids = ds_xmalloc(n * sizeof *r->prompt_ids);
    json_t *x;
    json_array_foreach(a, i, x) {
        if (!json_is_integer(x) || json_integer_value(x) < 0 ||
            json_integer_value(x) > INT32_MAX)
            return fail(err, errsize, "%sprompt[%zu]: token ids must be non-negative integers",
                        where, i);
        r->prompt_ids[i] = json_integer_value(x);
    }
    r->nprompt_ids = n;
    return 0;
}

static int parse_prompt(json_t *p, const char *where, struct ctl_request *r, char *err,
                        size_t errsize)
{
    if (json_is_string(p)) {
        if (strlen(json_string_value(p)) != json_string_length(p))
            return fail(err, errsize, "%sprompt: contains a NUL character", where);
        r->prompt = ds_xstrdup(json_string_value(p));
        return 0;
    }
    if (!json_is_array(p) || json_array_size(p) == 0)
        return fail(err, errsize, "%sprompt: must be a string, or an array of token ids", where);
    json_t *first = json_array_get(p, 0);
    if (json_is_integer(first))
        return parse_token_ids(p, where, r, err, errsize);
    if (json_array_size(p) > 1)
        return fail(err, errsize, "%sprompt: only one prompt per request is supported", where);
    if (json_is_string(first) || json_is_array(first))
        return parse_prompt(first, where, r, err, errsize);
    return fail(err, errsize, "%sprompt: must be a string, or an array of token ids", where);
}

static int parse_stop(json_t *s, const char *where, struct ctl_request *r, char *err,
                      size_t errsize)
{
    if (!s || json_is_null(s))
        return 0;
    for (size_t i = 0; i < r->nstop; i++)
        free(r->stop[i]);
    free(r->stop);
    r->stop = NULL;
    r->nstop = 0;
    if (json_is_string(s)) {
        r->stop = ds_xcalloc(1, sizeof *r->stop);
        r->stop[0] = ds_xstrdup(json_string_value(s));
        r->nstop = 1;
        return 0;
    }
    if (!json_is_array(s))
        return fail(err, errsize, "%sstop: must be a string or an array of strings", where);
    size_t n = json_array_size(s), i;
    if (n > CTL_STOP_MAX)
        return fail(err, errsize, "%sstop: at most %d strings, got %zu", where, CTL_STOP_MAX, n);
    r->stop = ds_xcalloc(n ? n : 1, sizeof *r->stop);
    json_t *x;
    json_array_foreach(s, i, x) {
        if (!json_is_string(x))
            return fail(err, errsize, "%sstop[%zu]: must be a string", where, i);
        r->stop[r->nstop++] = ds_xstrdup(json_string_value(x));
    }
    return 0;
}

/* Options with no effect here must have their neutral value. */
static int check_unsupported(json_t *body, const char *where, char *err, size_t errsize)
{
    json_t *x;
    if ((x = json_object_get(body, "n")) && !json_is_null(x) &&
        !(json_is_integer(x) && json_integer_value(x) == 1))
        return fail(err, errsize, "%sn: only 1 is supported", where);
    if ((x = json_object_get(body, "stream")) && json_is_true(x))
        return fail(err, errsize, "%sstream: streaming is not supported in batches", where);
    if ((x = json_object_get(body, "logprobs")) && !json_is_null(x) && !json_is_false(x))
        return fail(err, errsize, "%slogprobs: not supported", where);
    static const char *const zero[] = { "presence_penalty", "frequency_penalty" };
    for (size_t i = 0; i < 2; i++)
        if ((x = json_object_get(body, zero[i])) && !json_is_null(x) &&
            !(json_is_number(x) && json_number_value(x) == 0))
            return fail(err, errsize, "%s%s: not supported (must be 0)", where, zero[i]);
    if ((x = json_object_get(body, "tools")) && !json_is_null(x))
        return fail(err, errsize, "%stools: tool calls are not supported", where);
    return 0;
}

static int parse_openai(json_t *root, const struct ctl_params *d, struct ctl_request *r,
                        char *err, size_t errsize)
{
    json_t *cid = json_object_get(root, "custom_id");
    if (!json_is_string(cid))
        return fail(err, errsize, "custom_id: missing or not a string");
    size_t cl = json_string_length(cid);
    if (cl < 1 || cl > CTL_CUSTOM_ID_BYTES_MAX || strlen(json_string_value(cid)) != cl)
        return fail(err, errsize, "custom_id: must have 1 to %d bytes", CTL_CUSTOM_ID_BYTES_MAX);
    json_t *method = json_object_get(root, "method");
    if (method && !(json_is_string(method) && strcmp(json_string_value(method), "POST") == 0))
        return fail(err, errsize, "method: must be \"POST\"");
    json_t *url = json_object_get(root, "url");
    const char *u = json_is_string(url) ? json_string_value(url) : NULL;
    bool chat;
    if (u && strcmp(u, "/v1/chat/completions") == 0)
        chat = true;
    else if (u && strcmp(u, "/v1/completions") == 0)
        chat = false;
    else
        return fail(err, errsize, "url: must be \"/v1/chat/completions\" or \"/v1/completions\"");
    json_t *body = json_object_get(root, "body");
    if (!json_is_object(body))
        return fail(err, errsize, "body: missing or not an object");

    request_from_defaults(r, d);
    r->custom_id = ds_xstrdup(json_string_value(cid));
    const char *w = "body.";
    json_t *model = json_object_get(body, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model))
            return fail(err, errsize, "body.model: must be a string");
        free(r->model);
        r->model = ds_xstrdup(json_string_value(model));
    }
    if (chat) {
        if (json_object_get(body, "prompt"))
            return fail(err, errsize, "body.prompt: not allowed for /v1/chat/completions (use messages)");
        if (parse_messages(json_object_get(body, "messages"), w, r, err, errsize) < 0)
            return -1;
    } else {
        if (json_object_get(body, "messages"))
            return fail(err, errsize, "body.messages: not allowed for /v1/completions (use prompt)");
        json_t *p = json_object_get(body, "prompt");
        if (!p)
            return fail(err, errsize, "body.prompt: missing");
        if (parse_prompt(p, w, r, err, errsize) < 0)
            return -1;
    }
    if (get_int(body, "max_tokens", w, 1, CTL_MAX_TOKENS_MAX, &r->max_tokens, err, errsize) < 0 ||
        get_int(body, "max_completion_tokens", w, 1, CTL_MAX_TOKENS_MAX, &r->max_tokens, err,
                errsize) < 0 ||
        get_real(body, "temperature", w, &r->temperature, err, errsize) < 0 ||
        get_real(body, "top_p", w, &r->top_p, err, errsize) < 0)
        return -1;
    int64_t k = r->top_k;
    if (get_int(body, "top_k", w, -1, INT32_MAX, &k, err, errsize) < 0)
        return -1;
    r->top_k = k < 0 ? 0 : k; /* -1 means off, as in vLLM */
    json_t *seed = json_object_get(body, "seed");
    if (seed && !json_is_null(seed)) {
        if (!json_is_integer(seed))
            return fail(err, errsize, "body.seed: must be an integer");
        r->has_seed = true;
        r->seed = json_integer_value(seed);
    }
    if (parse_stop(json_object_get(body, "stop"), w, r, err, errsize) < 0 ||
        check_unsupported(body, w, err, errsize) < 0)
        return -1;
    return check_request(r, w, err, errsize);
}

static int parse_turns(json_t *root, long lineno, const struct ctl_params *d,
                       struct ctl_request *r, char *err, size_t errsize)
{
    json_t *turns = json_object_get(root, "turns");
    if (!json_is_array(turns) || json_array_size(turns) == 0 ||
        !json_is_string(json_array_get(turns, 0)))
        return fail(err, errsize, "turns: must be a non-empty array of strings");
    json_t *t0 = json_array_get(turns, 0);
    if (strlen(json_string_value(t0)) != json_string_length(t0))
        return fail(err, errsize, "turns[0]: contains a NUL character");
    request_from_defaults(r, d);
    json_t *cid = json_object_get(root, "custom_id");
    json_t *qid = json_object_get(root, "question_id");
    char buf[64];
    if (json_is_null(cid))
        cid = NULL;   /* as if absent */
    if (json_is_null(qid))
        qid = NULL;
    if (cid && !json_is_string(cid) && !json_is_integer(cid))
        return fail(err, errsize, "custom_id: must be a string or an integer");
    if (qid && !json_is_string(qid) && !json_is_integer(qid))
        return fail(err, errsize, "question_id: must be a string or an integer");
    if (json_is_string(cid))
        r->custom_id = ds_xstrdup(json_string_value(cid));
    else if (json_is_integer(cid)) {
        snprintf(buf, sizeof buf, "%" JSON_INTEGER_FORMAT, json_integer_value(cid));
        r->custom_id = ds_xstrdup(buf);
    } else if (json_is_string(qid))
        r->custom_id = ds_xstrdup(json_string_value(qid));
    else if (json_is_integer(qid)) {
        snprintf(buf, sizeof buf, "%" JSON_INTEGER_FORMAT, json_integer_value(qid));
        r->custom_id = ds_xstrdup(buf);
    } else {
        snprintf(buf, sizeof buf, "line-%ld", lineno);
        r->custom_id = ds_xstrdup(buf);
    }
    size_t cl = strlen(r->custom_id);
    if (cl < 1 || cl > CTL_CUSTOM_ID_BYTES_MAX)
        return fail(err, errsize, "custom_id: must have 1 to %d bytes", CTL_CUSTOM_ID_BYTES_MAX);
    json_t *msgs = json_pack("[{s:s, s:O}]", "role", "user", "content", t0);
    r->messages = json_dumps(msgs, JSON_COMPACT);
    json_decref(msgs);
    return check_request(r, "", err, errsize);
}

/* ---- the fast path ----
 * Most files hold one shape of line: an OpenAI Batch request with string
 * values, a messages array of {role, content} strings, and numbers. A small
 * scanner takes such a line straight to a request; anything else (another
 * key, a duplicate key, null, content parts, \u0000, invalid UTF-8, a value
 * out of range, a syntax error, ...) makes it give up, and the line goes
 * through jansson and the checks above, which word the errors. So the fast
 * path never decides that a line is bad, and it accepts only lines that the
 * general path accepts with the same result. */

struct scan {
    const char *p, *end;
    struct ds_buf str;   /* the last string, decoded */
};

static void scan_ws(struct scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static bool scan_char(struct scan *s, char c)
{
    scan_ws(s);
    if (s->p < s->end && *s->p == c) {
        s->p++;
        return true;
    }
    return false;
}

static int hex4(const char *p)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else
            return -1;
    }
    return v;
}

/* Length of the valid UTF-8 sequence at p (strict: no overlong forms, no
 * surrogates, at most U+10FFFF), 0 if invalid. */
static size_t utf8_len(const unsigned char *p, const unsigned char *end)
{
    unsigned c = p[0];
    size_t n;
    unsigned min, v;
    if (c < 0xC2)
        return 0;
    else if (c < 0xE0)
        n = 2, min = 0x80, v = c & 0x1F;
    else if (c < 0xF0)
        n = 3, min = 0x800, v = c & 0x0F;
    else if (c < 0xF5)
        n = 4, min = 0x10000, v = c & 0x07;
    else
        return 0;
    if ((size_t)(end - p) < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (p[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return 0;
    return n;
}

static void put_utf8(struct ds_buf *b, unsigned v)
{
    char u[4];
    size_t n;
    if (v < 0x80)
        u[0] = (char)v, n = 1;
    else if (v < 0x800)
        u[0] = (char)(0xC0 | v >> 6), u[1] = (char)(0x80 | (v & 0x3F)), n = 2;
    else if (v < 0x10000)
        u[0] = (char)(0xE0 | v >> 12), u[1] = (char)(0x80 | ((v >> 6) & 0x3F)),
        u[2] = (char)(0x80 | (v & 0x3F)), n = 3;
    else
        u[0] = (char)(0xF0 | v >> 18), u[1] = (char)(0x80 | ((v >> 12) & 0x3F)),
        u[2] = (char)(0x80 | ((v >> 6) & 0x3F)), u[3] = (char)(0x80 | (v & 0x3F)), n = 4;
    ds_buf_put(b, u, n);
}

/* A string into s->str (decoded, NUL-terminated, no NUL inside). */
static bool scan_string(struct scan *s)
{
    scan_ws(s);
    if (s->p >= s->end || *s->p != '"')
        return false;
    s->p++;
    s->str.len = 0;
    ds_buf_put(&s->str, "", 0);
    for (;;) {
        const char *run = s->p;
        while (s->p < s->end && (unsigned char)*s->p >= 0x20 && (unsigned char)*s->p < 0x80 &&
               *s->p != '"' && *s->p != '\\')
            s->p++;
        ds_buf_put(&s->str, run, (size_t)(s->p - run));
        if (s->p >= s->end)
            return false;
        unsigned char c = (unsigned char)*s->p;
        if (c == '"') {
            s->p++;
            return true;
        }
        if (c < 0x20)
            return false;
        if (c >= 0x80) {
            size_t n = utf8_len((const unsigned char *)s->p, (const unsigned char *)s->end);
            if (!n)
                return false;
            ds_buf_put(&s->str, s->p, n);
            s->p += n;
            continue;
        }
        /* an escape */
        if (s->end - s->p < 2)
            return false;
        char e = s->p[1];
        const char *plain = NULL;
        switch (e) {
        case '"': plain = "\""; break;
        case '\\': plain = "\\"; break;
        case '/': plain = "/"; break;
        case 'b': plain = "\b"; break;
        case 'f': plain = "\f"; break;
        case 'n': plain = "\n"; break;
        case 'r': plain = "\r"; break;
        case 't': plain = "\t"; break;
        case 'u': break;
        default: return false;
        }
        if (plain) {
            ds_buf_put(&s->str, plain, 1);
            s->p += 2;
            continue;
        }
        if (s->end - s->p < 6)
            return false;
        int v = hex4(s->p + 2);
        if (v <= 0)
            return false; /* \u0000 too: the general path says why */
        s->p += 6;
        if (v >= 0xDC00 && v <= 0xDFFF)
            return false;
        if (v >= 0xD800 && v <= 0xDBFF) {
            if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u')
                return false;
            int lo = hex4(s->p + 2);
            if (lo < 0xDC00 || lo > 0xDFFF)
                return false;
            s->p += 6;
            v = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00);
        }
        put_utf8(&s->str, (unsigned)v);
    }
}

/* A number token; *is_int when it has no fraction or exponent. The token is
 * copied to buf (NUL-terminated). */
static bool scan_number(struct scan *s, char *buf, size_t size, bool *is_int)
{
    scan_ws(s);
    const char *p = s->p, *e = s->end;
    if (p < e && *p == '-')
        p++;
    if (p >= e || *p < '0' || *p > '9')
        return false;
    if (*p == '0')
        p++;
    else
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    *is_int = true;
    if (p < e && *p == '.') {
        *is_int = false;
        p++;
        if (p >= e || *p < '0' || *p > '9')
            return false;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        *is_int = false;
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        if (p >= e || *p < '0' || *p > '9')
            return false;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    size_t n = (size_t)(p - s->p);
    if (n + 1 > size)
        return false;
    memcpy(buf, s->p, n);
    buf[n] = 0;
    s->p = p;
    return true;
}

static bool scan_int(struct scan *s, int64_t *v)
{
    char buf[24];
    bool is_int;
    if (!scan_number(s, buf, sizeof buf, &is_int) || !is_int || strlen(buf) > 18)
        return false;
    *v = strtoll(buf, NULL, 10);
    return true;
}

static bool scan_real(struct scan *s, double *v)
{
    char buf[64];
    bool is_int;
    if (!scan_number(s, buf, sizeof buf, &is_int))
        return false;
    if (is_int && strlen(buf) > 18)
        return false;
    *v = strtod(buf, NULL);
    return isfinite(*v);
}

/* A JSON string value, escaped (the inverse of scan_string). */
static void json_put_string(struct ds_buf *b, const char *v)
{
    ds_buf_puts(b, "\"");
    const char *run = v;
    for (; *v; v++) {
        unsigned char c = (unsigned char)*v;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        ds_buf_put(b, run, (size_t)(v - run));
        char esc[8];
        switch (c) {
        case '"': ds_buf_puts(b, "\\\""); break;
        case '\\': ds_buf_puts(b, "\\\\"); break;
        case '\b': ds_buf_puts(b, "\\b"); break;
        case '\f': ds_buf_puts(b, "\\f"); break;
        case '\n': ds_buf_puts(b, "\\n"); break;
        case '\r': ds_buf_puts(b, "\\r"); break;
        case '\t': ds_buf_puts(b, "\\t"); break;
        default:
            snprintf(esc, sizeof esc, "\\u%04X", c);
            ds_buf_puts(b, esc);
        }
        run = v + 1;
    }
    ds_buf_puts(b, run);
    ds_buf_puts(b, "\"");
}

/* "messages": [{"role": R, "content": C}, ...] as compact JSON in *out. */
static bool scan_messages(struct scan *s, struct ds_buf *out)
{
    if (!scan_char(s, '['))
        return false;
    ds_buf_puts(out, "[");
    size_t n = 0;
    if (scan_char(s, ']'))
        return false; /* empty: the general path says so */
    do {
        if (!scan_char(s, '{'))
            return false;
        char *role = NULL;
        bool have_content = false;
        size_t mark = 0;
        do {
            if (!scan_string(s) || !scan_char(s, ':'))
                goto fail;
            if (strcmp(s->str.data, "role") == 0 && !role) {
                if (!scan_string(s))
                    goto fail;
                const char *r = s->str.data;
                if (strcmp(r, "system") != 0 && strcmp(r, "user") != 0 &&
                    strcmp(r, "assistant") != 0 && strcmp(r, "developer") != 0 &&
                    strcmp(r, "tool") != 0)
                    goto fail;
                role = ds_xstrdup(strcmp(r, "developer") == 0 ? "system" : r);
            } else if (strcmp(s->str.data, "content") == 0 && !have_content) {
                if (!scan_string(s))
                    goto fail;
                have_content = true;
                /* kept in place: written once the role is known */
                mark = out->len;
                json_put_string(out, s->str.data);
            } else {
                goto fail;
            }
        } while (scan_char(s, ','));
        if (!scan_char(s, '}') || !role || !have_content)
            goto fail;
        {
            /* out ends with the content string: put the object around it */
            size_t clen = out->len - mark;
            char *content = ds_xmalloc(clen + 1);
            memcpy(content, out->data + mark, clen);
            content[clen] = 0;
            out->len = mark;
            ds_buf_puts(out, n ? ",{\"role\":" : "{\"role\":");
            json_put_string(out, role);
            ds_buf_puts(out, ",\"content\":");
            ds_buf_put(out, content, clen);
            ds_buf_puts(out, "}");
            free(content);
        }
        free(role);
        n++;
        continue;
    fail:
        free(role);
        return false;
    } while (scan_char(s, ','));
    if (!scan_char(s, ']'))
        return false;
    ds_buf_puts(out, "]");
    return true;
}

/* 1 when the line was taken into *r, 0 when the general path must decide. */
static int parse_line_fast(const char *line, size_t len, const struct ctl_params *d,
                           struct ctl_request *r)
{
    struct scan s = { .p = line, .end = line + len };
    struct ds_buf msgs = { 0 };
    enum { K_CID = 1, K_METHOD = 2, K_URL = 4, K_BODY = 8 };
    enum { B_MODEL = 1, B_MSGS = 2, B_PROMPT = 4, B_MAXTOK = 8, B_TEMP = 16, B_TOPP = 32,
           B_SEED = 64, B_STOP = 128 };
    unsigned seen = 0, bseen = 0;
    int chat = -1; /* from the url */
    char err[8];

    request_from_defaults(r, d);
    if (!scan_char(&s, '{'))
        goto fail;
    do {
        if (!scan_string(&s) || !scan_char(&s, ':'))
            goto fail;
        const char *k = s.str.data;
        if (strcmp(k, "custom_id") == 0 && !(seen & K_CID)) {
            seen |= K_CID;
            if (!scan_string(&s) || s.str.len < 1 || s.str.len > CTL_CUSTOM_ID_BYTES_MAX)
                goto fail;
            r->custom_id = ds_xstrdup(s.str.data);
        } else if (strcmp(k, "method") == 0 && !(seen & K_METHOD)) {
            seen |= K_METHOD;
            if (!scan_string(&s) || strcmp(s.str.data, "POST") != 0)
                goto fail;
        } else if (strcmp(k, "url") == 0 && !(seen & K_URL)) {
            seen |= K_URL;
            if (!scan_string(&s))
                goto fail;
            if (strcmp(s.str.data, "/v1/chat/completions") == 0)
                chat = 1;
            else if (strcmp(s.str.data, "/v1/completions") == 0)
                chat = 0;
            else
                goto fail;
        } else if (strcmp(k, "body") == 0 && !(seen & K_BODY)) {
            seen |= K_BODY;
            if (!scan_char(&s, '{'))
                goto fail;
            if (scan_char(&s, '}'))
                goto fail; /* no model, no prompt */
            do {
                if (!scan_string(&s) || !scan_char(&s, ':'))
                    goto fail;
                const char *b = s.str.data;
                if (strcmp(b, "model") == 0 && !(bseen & B_MODEL)) {
                    bseen |= B_MODEL;
                    if (!scan_string(&s))
                        goto fail;
                    free(r->model);
                    r->model = ds_xstrdup(s.str.data);
                } else if (strcmp(b, "messages") == 0 && !(bseen & B_MSGS)) {
                    bseen |= B_MSGS;
                    if (!scan_messages(&s, &msgs))
                        goto fail;
                } else if (strcmp(b, "prompt") == 0 && !(bseen & B_PROMPT)) {
                    bseen |= B_PROMPT;
                    if (!scan_string(&s))
                        goto fail;
                    r->prompt = ds_xstrdup(s.str.data);
                } else if (strcmp(b, "max_tokens") == 0 && !(bseen & B_MAXTOK)) {
                    bseen |= B_MAXTOK;
                    if (!scan_int(&s, &r->max_tokens))
                        goto fail;
                } else if (strcmp(b, "temperature") == 0 && !(bseen & B_TEMP)) {
                    bseen |= B_TEMP;
                    if (!scan_real(&s, &r->temperature))
                        goto fail;
                } else if (strcmp(b, "top_p") == 0 && !(bseen & B_TOPP)) {
                    bseen |= B_TOPP;
                    if (!scan_real(&s, &r->top_p))
                        goto fail;
                } else if (strcmp(b, "seed") == 0 && !(bseen & B_SEED)) {
                    bseen |= B_SEED;
                    if (!scan_int(&s, &r->seed))
                        goto fail;
                    r->has_seed = true;
                } else if (strcmp(b, "stop") == 0 && !(bseen & B_STOP)) {
                    bseen |= B_STOP;
                    for (size_t i = 0; i < r->nstop; i++)
                        free(r->stop[i]);
                    free(r->stop);
                    r->stop = NULL;
                    r->nstop = 0;
                    if (scan_char(&s, '[')) {
                        r->stop = ds_xcalloc(CTL_STOP_MAX, sizeof *r->stop);
                        if (!scan_char(&s, ']')) {
                            do {
                                if (r->nstop == CTL_STOP_MAX || !scan_string(&s))
                                    goto fail;
                                r->stop[r->nstop++] = ds_xstrdup(s.str.data);
                            } while (scan_char(&s, ','));
                            if (!scan_char(&s, ']'))
                                goto fail;
                        }
                    } else {
                        if (!scan_string(&s))
                            goto fail;
                        r->stop = ds_xcalloc(1, sizeof *r->stop);
                        r->stop[r->nstop++] = ds_xstrdup(s.str.data);
                    }
                } else {
                    goto fail;
                }
            } while (scan_char(&s, ','));
            if (!scan_char(&s, '}'))
                goto fail;
        } else {
            goto fail;
        }
    } while (scan_char(&s, ','));
    if (!scan_char(&s, '}'))
        goto fail;
    scan_ws(&s);
    if (s.p != s.end || !(seen & K_CID) || !(seen & K_URL) || !(seen & K_BODY))
        goto fail;
    if (chat == 1) {
        if (!(bseen & B_MSGS) || (bseen & B_PROMPT))
            goto fail;
        r->messages = msgs.data;
        msgs.data = NULL;
    } else {
        if (!(bseen & B_PROMPT) || (bseen & B_MSGS))
            goto fail;
    }
    if (check_request(r, "", err, sizeof err) < 0)
        goto fail;
    ds_buf_free(&msgs);
    ds_buf_free(&s.str);
    return 1;
fail:
    ds_buf_free(&msgs);
    ds_buf_free(&s.str);
    ctl_request_done(r);
    return 0;
}

int ctl_request_parse_line(const char *line, size_t len, long lineno,
                           const struct ctl_params *defaults, struct ctl_request *ret,
                           char *err, size_t errsize)
{
    json_error_t jerr;
    memset(ret, 0, sizeof *ret);
    if (parse_line_fast(line, len, defaults, ret))
        return 0;
    json_t *root = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return fail(err, errsize, "invalid JSON: %s (column %d)", jerr.text, jerr.column);
    int r;
    if (!json_is_object(root))
        r = fail(err, errsize, "must be a JSON object");
    else if (json_object_get(root, "turns"))
        r = parse_turns(root, lineno, defaults, ret, err, errsize);
    else
        r = parse_openai(root, defaults, ret, err, errsize);
    json_decref(root);
    if (r < 0)
        ctl_request_done(ret);
    return r;
}

int ctl_request_from_prompt(const char *prompt, bool chat, const char *system,
                            const struct ctl_params *params, struct ctl_request *ret,
                            char *err, size_t errsize)
{
    request_from_defaults(ret, params);
    if (chat) {
        json_t *msgs = json_array();
        if (system) {
            json_t *s = json_pack("{s:s, s:s}", "role", "system", "content", system);
            if (!s) {
                json_decref(msgs);
                ctl_request_done(ret);
                return fail(err, errsize, "system message: not valid UTF-8");
            }
            json_array_append_new(msgs, s);
        }
        json_t *m = json_pack("{s:s, s:s}", "role", "user", "content", prompt);
        if (!m) {
            json_decref(msgs);
            ctl_request_done(ret);
            return fail(err, errsize, "prompt: not valid UTF-8");
        }
        json_array_append_new(msgs, m);
        ret->messages = json_dumps(msgs, JSON_COMPACT);
        json_decref(msgs);
    } else {
        ret->prompt = ds_xstrdup(prompt);
    }
    if (check_request(ret, "", err, errsize) < 0) {
        ctl_request_done(ret);
        return -1;
    }
    return 0;
}

/* COPY text format: backslash, newline, carriage return and tab escaped. */
static void copy_text(struct ds_buf *b, const char *s)
{
    const char *run = s;
    for (; *s; s++) {
        const char *esc = NULL;
        switch (*s) {
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        default: continue;
        }
        ds_buf_put(b, run, (size_t)(s - run));
        ds_buf_puts(b, esc);
        run = s + 1;
    }
    ds_buf_put(b, run, (size_t)(s - run));
}

static void copy_field(struct ds_buf *b, const char *s, bool last)
{
    if (s)
        copy_text(b, s);
    else
        ds_buf_puts(b, "\\N");
    ds_buf_puts(b, last ? "\n" : "\t");
}

/* Decimal text of v into buf (at least 21 bytes). */
static const char *fmt_int(int64_t v, char *buf)
{
    char tmp[24];
    size_t n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    size_t o = 0;
    if (v < 0)
        buf[o++] = '-';
    while (n)
        buf[o++] = tmp[--n];
    buf[o] = 0;
    return buf;
}

/* Text of v that reads back as the same double (at least 32 bytes). */
static const char *fmt_real(double v, char *buf, size_t size)
{
    if (v == floor(v) && fabs(v) < 1e15)
        return fmt_int((int64_t)v, buf);
    snprintf(buf, size, "%.17g", v);
    return buf;
}

void ctl_request_copy_row(const struct ctl_request *r, long seq, struct ds_buf *out)
{
    char num[64];
    copy_field(out, fmt_int(seq, num), false);
    copy_field(out, r->custom_id, false);
    copy_field(out, r->model, false);
    copy_field(out, r->prompt, false);
    copy_field(out, r->messages, false);
    if (r->prompt_ids) {
        struct ds_buf a = { 0 };
        ds_buf_puts(&a, "{");
        for (size_t i = 0; i < r->nprompt_ids; i++) {
            snprintf(num, sizeof num, i ? ",%" PRId64 : "%" PRId64, r->prompt_ids[i]);
            ds_buf_puts(&a, num);
        }
        ds_buf_puts(&a, "}");
        copy_field(out, a.data, false);
        ds_buf_free(&a);
    } else {
        copy_field(out, NULL, false);
    }
    copy_field(out, fmt_int(r->max_tokens, num), false);
    copy_field(out, fmt_real(r->temperature, num, sizeof num), false);
    copy_field(out, fmt_real(r->top_p, num, sizeof num), false);
    copy_field(out, fmt_int(r->top_k, num), false);
    if (r->has_seed) {
        copy_field(out, fmt_int(r->seed, num), false);
    } else {
        copy_field(out, NULL, false);
    }
    if (r->nstop) {
        /* array literal: every element quoted, with " and \ escaped */
        struct ds_buf a = { 0 };
        ds_buf_puts(&a, "{");
        for (size_t i = 0; i < r->nstop; i++) {
            ds_buf_puts(&a, i ? ",\"" : "\"");
            for (const char *p = r->stop[i]; *p; p++) {
                if (*p == '"' || *p == '\\')
                    ds_buf_puts(&a, "\\");
                ds_buf_put(&a, p, 1);
            }
            ds_buf_puts(&a, "\"");
        }
        ds_buf_puts(&a, "}");
        copy_field(out, a.data, true);
        ds_buf_free(&a);
    } else {
        copy_field(out, NULL, true);
    }
}
