/* job.c: dspark-worker's jobs: reading a claimed row, turning its prompt into
 * token ids (raw text, chat messages rendered with the model's chat format in
 * non-thinking mode, or the ids themselves), building the engine request, and
 * the finish_jobs items with their statistics. */
#include "config.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "dspark/ds-log.h"
#include "dspark/ds-model.h"
#include "dspark/ds-tokenizer.h"
#include "worker.h"

const char *wlog_worker_id;

void wlog(int level, int64_t job_id, const char *fmt, ...)
{
    if (level > ds_log_get_level())
        return;
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    struct ds_log_ctx ctx = {.job_id = job_id, .worker_id = wlog_worker_id};
    ds_log_ctx(level, &ctx, "%s", buf);
}

void wjob_free(struct wjob *j)
{
    if (!j)
        return;
    free(j->model);
    free(j->prompt);
    free(j->messages);
    free(j->prompt_ids);
    free(j->stop);
    free(j->spec_mode);
    free(j);
}

static char *col_str(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : ds_xstrdup(PQgetvalue(res, row, col));
}

struct wjob *wjob_from_row(const void *pgresult, int row)
{
    const PGresult *res = pgresult;
    struct wjob *j = ds_xcalloc(1, sizeof *j);
    j->id = strtoll(PQgetvalue(res, row, 0), NULL, 10);
    j->attempt = atoi(PQgetvalue(res, row, 1));
    j->batch_id = strtoll(PQgetvalue(res, row, 2), NULL, 10);
    j->model = col_str(res, row, 3);
    j->prompt = col_str(res, row, 4);
    j->messages = col_str(res, row, 5);
    j->prompt_ids = col_str(res, row, 6);
    j->max_tokens = atoi(PQgetvalue(res, row, 7));
    j->temperature = strtod(PQgetvalue(res, row, 8), NULL);
    j->top_p = strtod(PQgetvalue(res, row, 9), NULL);
    j->top_k = atoi(PQgetvalue(res, row, 10));
    j->has_seed = !PQgetisnull(res, row, 11);
    j->seed = j->has_seed ? strtoll(PQgetvalue(res, row, 11), NULL, 10) : 0;
    j->stop = col_str(res, row, 12);
    j->spec_mode = col_str(res, row, 13);
    j->queue_wait_s = PQgetisnull(res, row, 14) ? 0 : strtod(PQgetvalue(res, row, 14), NULL);
    return j;
}

static int tokenize_text(const struct ds_model *m, const char *name, const char *text, int32_t **ret, int *ret_n)
{
    if (!m->tok)
        return ds_seterr(DS_EINVAL, "model '%s' has no tokenizer: submit the prompt as token ids (prompt_ids)",
                         name);
    int32_t *ids;
    size_t n;
    int r = ds_tokenizer_encode(m->tok, text, strlen(text), &ids, &n);
    if (r < 0)
        return r;
    if (n > (size_t)INT32_MAX) {
        free(ids);
        return ds_seterr(DS_EINVAL, "the prompt is too long (%zu tokens)", n);
    }
    *ret = ids;
    *ret_n = (int)n;
    return 0;
}

int wjob_tokenize(const struct ds_model *m, const char *name, const struct wjob *j, int32_t **ret, int *ret_n)
{
    if (j->prompt)
        return tokenize_text(m, name, j->prompt, ret, ret_n);
    json_error_t jerr;
    if (j->prompt_ids) {
        json_t *a = json_loads(j->prompt_ids, 0, &jerr);
        if (!json_is_array(a)) {
            json_decref(a);
            return ds_seterr(DS_EFORMAT, "prompt_ids is not an array of token ids");
        }
        size_t n = json_array_size(a);
        int32_t *ids = ds_xmalloc((n + 1) * sizeof *ids);
        for (size_t i = 0; i < n; i++) {
            json_t *v = json_array_get(a, i);
            json_int_t x = json_is_integer(v) ? json_integer_value(v) : -1;
            if (x < 0 || x > INT32_MAX) {
                free(ids);
                json_decref(a);
                return ds_seterr(DS_EINVAL, "prompt_ids[%zu] is not a token id", i);
            }
            ids[i] = (int32_t)x;
        }
        json_decref(a);
        *ret = ids;
        *ret_n = (int)n;
        return 0;
    }
    if (j->messages) {
        json_t *a = json_loads(j->messages, 0, &jerr);
        if (!json_is_array(a) || json_array_size(a) == 0) {
            json_decref(a);
            return ds_seterr(DS_EFORMAT, "messages is not a non-empty array");
        }
        size_t n = json_array_size(a);
        struct ds_chat_message *msgs = ds_xcalloc(n, sizeof *msgs);
        int r = 0;
        for (size_t i = 0; i < n && r == 0; i++) {
            json_t *o = json_array_get(a, i);
            msgs[i].role = json_string_value(json_object_get(o, "role"));
            msgs[i].content = json_string_value(json_object_get(o, "content"));
            if (!msgs[i].role || !msgs[i].content)
                r = ds_seterr(DS_EFORMAT, "messages[%zu] needs string \"role\" and \"content\"", i);
        }
        char *text = NULL;
        if (r == 0)
            r = ds_chat_render(msgs, n, true, false, &text);
        if (r == 0)
            r = tokenize_text(m, name, text, ret, ret_n);
        free(text);
        free(msgs);
        json_decref(a);
        return r;
    }
    return ds_seterr(DS_EINVAL, "the job has no prompt, messages or prompt_ids");
}

int wjob_request(const struct wjob *j, struct ds_request *req, struct wreq_keep *keep)
{
    memset(keep, 0, sizeof *keep);
    req->max_tokens = j->max_tokens;
    req->sampling.temperature = (float)j->temperature;
    /* (the table takes any top_p > 0 as a double: one below float's least normal keeps the top token) */
    req->sampling.top_p = j->top_p > 0 && j->top_p < FLT_MIN ? FLT_MIN : (float)j->top_p;
    req->sampling.top_k = j->top_k;
    /* without a seed a job's draws are still fixed: its id is the seed */
    req->sampling.seed = (uint64_t)(j->has_seed ? j->seed : j->id);
    if (!isfinite(j->temperature))
        return ds_seterr(DS_EINVAL, "temperature must be a finite number");
    if (j->spec_mode && *j->spec_mode) {
        if (ds_spec_mode_parse(j->spec_mode, &keep->spec) < 0)
            return -DS_EINVAL;
        req->spec = &keep->spec;
    }
    if (j->stop) {
        json_error_t jerr;
        json_t *a = json_loads(j->stop, 0, &jerr);
        if (!json_is_array(a)) {
            json_decref(a);
            return ds_seterr(DS_EFORMAT, "stop is not an array of strings");
        }
        size_t n = json_array_size(a);
        keep->stop = ds_xcalloc(n + 1, sizeof *keep->stop);
        for (size_t i = 0; i < n; i++) {
            const char *s = json_string_value(json_array_get(a, i));
            if (s)
                keep->stop[keep->n_stop++] = ds_xstrdup(s);
        }
        json_decref(a);
        req->stop = (const char *const *)keep->stop;
        req->n_stop = keep->n_stop;
    }
    return 0;
}

void wreq_keep_done(struct wreq_keep *k)
{
    for (int i = 0; i < k->n_stop; i++)
        free(k->stop[i]);
    free(k->stop);
    k->stop = NULL;
    k->n_stop = 0;
}

/* Length of the valid UTF-8 sequence at s (n bytes available), 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80)
        return c ? 1 : 0;
    if (c >= 0xc2 && c <= 0xdf)
        len = 2, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef)
        len = 3, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4)
        len = 4, min = 0x10000;
    else
        return 0;
    if (len > n)
        return 0;
    unsigned cp = c & (0x7f >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

json_t *wjson_text(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    char *out = ds_xmalloc(len * 3 + 1);
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_seq(p + i, len - i);
        if (k == 0) {
            memcpy(out + o, "\xef\xbf\xbd", 3); /* U+FFFD */
            o += 3;
            i++;
        } else {
            memcpy(out + o, p + i, k);
            o += k;
            i += k;
        }
    }
    json_t *v = json_stringn(out, o);
    free(out);
    return v ? v : json_string("");
}

static void set_real(json_t *o, const char *key, double v)
{
    if (isfinite(v))
        json_object_set_new(o, key, json_real(v));
}

static json_t *stats_base(const struct widentity *id, const struct wjob *j)
{
    json_t *st = json_object();
    set_real(st, "queue_wait_s", j->queue_wait_s);
    if (!id)
        return st;
    json_object_set_new(st, "device", json_string(id->device));
    json_object_set_new(st, "model", json_string(id->model));
    json_object_set_new(st, "model_checksum", json_string(id->model_checksum));
    if (id->draft[0]) {
        json_object_set_new(st, "draft", json_string(id->draft));
        json_object_set_new(st, "draft_checksum", json_string(id->draft_checksum));
    }
    if (j->n_prompt > 0)
        json_object_set_new(st, "prompt_tokens", json_integer(j->n_prompt));
    return st;
}

static json_t *item_base(const struct wjob *j, const char *state)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_integer(j->id));
    json_object_set_new(o, "attempt", json_integer(j->attempt));
    json_object_set_new(o, "state", json_string(state));
    return o;
}

json_t *wfailed_json(const struct widentity *id, const struct wjob *j, const char *error)
{
    json_t *o = item_base(j, "failed");
    json_object_set_new(o, "finish_reason", json_string("error"));
    json_object_set_new(o, "error", wjson_text(error, strlen(error)));
    json_t *st = stats_base(id, j);
    json_object_set_new(st, "output_tokens", json_integer(0));
    json_object_set_new(o, "stats", st);
    return o;
}

json_t *wresult_json(const struct widentity *id, const struct wjob *j, const struct ds_result *r, double ttft_extra)
{
    const char *state = "succeeded";
    if (r->error != 0 || strcmp(r->finish_reason, "error") == 0)
        state = "failed";
    else if (strcmp(r->finish_reason, "cancelled") == 0)
        state = "cancelled";
    json_t *o = item_base(j, state);
    json_object_set_new(o, "finish_reason", json_string(r->finish_reason));
    if (strcmp(state, "failed") == 0)
        json_object_set_new(o, "error", wjson_text(r->error_detail[0] ? r->error_detail : "the engine failed",
                                                   strlen(r->error_detail[0] ? r->error_detail : "the engine failed")));
    if (r->text)
        json_object_set_new(o, "output_text", wjson_text(r->text, r->text_len));
    json_t *ids = json_array();
    for (int i = 0; i < r->n_ids; i++)
        json_array_append_new(ids, json_integer(r->ids[i]));
    json_object_set_new(o, "output_ids", ids);

    const struct ds_seq_stats *s = &r->stats;
    json_t *st = stats_base(id, j);
    json_object_set_new(st, "prompt_tokens", json_integer(s->prompt_tokens));
    json_object_set_new(st, "output_tokens", json_integer(r->n_ids));
    /* no token, no time to the first one (NULL, not the whole run, which would
     * skew the percentiles) */
    if (r->n_ids > 0)
        set_real(st, "time_to_first_token_s", s->time_to_first_token_s + ttft_extra);
    /* decoding speed needs two tokens, and acceptance a round: NULL otherwise (not 0, which would skew the
     * medians as well) */
    if (r->n_ids > 1)
        set_real(st, "decode_tokens_per_s", s->decode_tokens_per_s);
    json_object_set_new(st, "rounds", json_integer(s->rounds));
    if (s->block_size > 0) {
        json_object_set_new(st, "num_draft_tokens", json_integer(s->num_draft_tokens));
        json_object_set_new(st, "num_verified_tokens", json_integer(s->num_verified_tokens));
        json_object_set_new(st, "num_accepted_tokens", json_integer(s->num_accepted_tokens));
        if (s->rounds > 0) {
            set_real(st, "mean_acceptance_length", s->mean_acceptance_length);
            set_real(st, "mean_verify_len", (double)s->num_verified_tokens / s->rounds);
        }
        json_t *acc = json_array(), *ver = json_array();
        for (int k = 0; k < s->block_size && k < DS_MAX_BLOCK; k++) {
            json_array_append_new(acc, json_integer(s->accepted_by_position[k]));
            /* the column's meaning (dspark(7)): verified with every earlier position accepted */
            json_array_append_new(ver, json_integer(s->reached_by_position[k]));
        }
        json_object_set_new(st, "acceptance_by_position", acc);
        json_object_set_new(st, "verified_by_position", ver);
    }
    json_object_set_new(o, "stats", st);
    return o;
}
