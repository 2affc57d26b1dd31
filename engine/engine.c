/* engine.c: sequences, admission, and the decoding round (target-only part).
 *
 * A sequence holds its prompt and output tokens and a target KV view whose
 * length counts the tokens the target has processed. While that is less than
 * the prompt, the sequence is prefilling (in chunks); after, its last token is
 * the anchor of the next round: target-only decoding feeds it and samples one
 * token; speculative decoding (spec.c) feeds it with verified drafts. KV pages
 * for the whole sequence are reserved at admission, so a running sequence never
 * runs out of cache. */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dspark/ds-cuda.h"
#include "dspark/ds-draft.h"
#include "dspark/ds-engine.h"
#include "dspark/ds-model.h"
#include "dspark/ds-sched.h"
#include "dspark/ds-tokenizer.h"
#include "draft-ops.h"
#include "engine-impl.h"

double ds_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int ds_spec_mode_parse(const char *s, struct ds_spec_mode *ret)
{
    struct ds_spec_mode m = {0};
    char *end;
    if (strcmp(s, "none") == 0) {
        m.kind = DS_SPEC_NONE;
    } else if (strcmp(s, "dspark") == 0) {
        m.kind = DS_SPEC_DSPARK;
    } else if (strcmp(s, "dspark-async") == 0) {
        m.kind = DS_SPEC_DSPARK_ASYNC;
    } else if (strncmp(s, "fixed:", 6) == 0) {
        m.kind = DS_SPEC_FIXED;
        long n = strtol(s + 6, &end, 10);
        if (end == s + 6 || *end || n < 0 || n > DS_SPEC_FIXED_MAX)
            return ds_seterr(DS_EINVAL, "speculation mode '%s': length must be an integer in 0..%d", s,
                             DS_SPEC_FIXED_MAX);
        m.fixed_len = (int)n;
    } else if (strncmp(s, "threshold:", 10) == 0) {
        m.kind = DS_SPEC_THRESHOLD;
        double x = strtod(s + 10, &end);
        if (end == s + 10 || *end || !(x >= 0 && x <= 1))
            return ds_seterr(DS_EINVAL, "speculation mode '%s': threshold must be a number in 0..1", s);
        m.threshold = (float)x;
    } else {
        return ds_seterr(DS_EINVAL,
                         "unknown speculation mode '%s' (expected none, dspark, dspark-async, fixed:N, threshold:X)",
                         s);
    }
    *ret = m;
    return 0;
}

void ds_spec_mode_format(const struct ds_spec_mode *m, char *buf, size_t cap)
{
    switch (m->kind) {
    case DS_SPEC_NONE: snprintf(buf, cap, "none"); break;
    case DS_SPEC_FIXED: snprintf(buf, cap, "fixed:%d", m->fixed_len); break;
    case DS_SPEC_THRESHOLD: snprintf(buf, cap, "threshold:%g", m->threshold); break;
    case DS_SPEC_DSPARK: snprintf(buf, cap, "dspark"); break;
    case DS_SPEC_DSPARK_ASYNC: snprintf(buf, cap, "dspark-async"); break;
    }
}

int ds_backend_parse(const char *s, enum ds_backend *ret)
{
    if (strcmp(s, "cpu") == 0) {
        *ret = DS_BACKEND_CPU;
    } else if (strcmp(s, "cuda") == 0) {
        *ret = DS_BACKEND_CUDA;
    } else if (strcmp(s, "auto") == 0) {
        *ret = ds_cuda_available() ? DS_BACKEND_CUDA : DS_BACKEND_CPU;
    } else {
        return ds_seterr(DS_EINVAL, "unknown backend '%s' (expected cpu, cuda or auto)", s);
    }
    return 0;
}

const char *ds_backend_name(enum ds_backend b)
{
    return b == DS_BACKEND_CUDA ? "cuda" : "cpu";
}

/* Whether a sequence in the pass reads the target's argmax (a greedy one). */
static bool pass_needs_argmax(const struct ds_engine *e)
{
    for (int i = 0; i < e->n_seqs; i++) {
        const struct ds_seq *s = e->seqs[i];
        if (((s->state == DS_SEQ_PREFILL && s->chunk > 0) || s->state == DS_SEQ_DECODE) &&
            ds_sampling_is_greedy(&s->sampling))
            return true;
    }
    return false;
}

static int forward(struct ds_engine *e, const struct ds_batch *b)
{
    if (e->cuda) {
        /* ids are enough when every row is greedy or draws on the GPU: the logits stay there; and
         * when every row draws there, nothing comes back (the draws wait for the pass on the GPU) */
        struct ds_batch c = *b;
        if (c.argmax && !ds_engine_needs_logits(e)) {
            c.logits = NULL;
            if (e->device_sampling && !pass_needs_argmax(e))
                c.argmax = NULL;
        }
        return ds_cuda_forward(e->cuda, &e->kv, &c);
    }
    int r = ds_model_forward(e->target, e->fwd, &e->kv, b);
    if (r == 0 && b->argmax)
        for (int i = 0; i < b->n_logits; i++)
            b->argmax[i] = ds_argmax(b->logits + (size_t)i * e->target->cfg.vocab_size, e->target->cfg.vocab_size);
    return r;
}

int ds_engine_forward(struct ds_engine *e, const struct ds_batch *b)
{
    double t0 = ds_now();
    int r = forward(e, b);
    if (r == 0 && e->round_sync && e->cuda)
        r = ds_cuda_sync(e->cuda);   /* a pass that brings nothing back ends on the GPU, not here */
    e->time.pass_s += ds_now() - t0;
    e->last_pass_tokens = b->n_tokens;
    if (e->sps.n > 0 && b->n_tokens > 0)
        e->time.profile_pass_s += 1.0 / ds_sps_at(&e->sps, b->n_tokens);
    return r;
}

void ds_engine_set_round_log(struct ds_engine *e, FILE *f, bool sync)
{
    e->round_log = f;
    e->round_sync = sync;
}

void ds_engine_time(const struct ds_engine *e, struct ds_engine_time *ret)
{
    *ret = e->time;
}

/* The GPU side of an engine: weights, then a KV cache sized from free memory. */
static int cuda_init(struct ds_engine *e, struct ds_engine_opts *o)
{
    struct ds_cuda_opts co = {.device = o->device, .cublas = o->cublas, .graphs = o->cuda_graphs,
                              .max_ranges = o->gemm_ranges};
    int r = ds_cuda_target_new(e->target, &co, &e->cuda);
    if (r < 0)
        return r;
    int max_pages = (o->max_context + DS_MAX_BLOCK + o->page_size) / o->page_size + 1;
    if (o->kv_pages <= 0) {
        double frac = o->gpu_memory_fraction > 0 ? o->gpu_memory_fraction : 0.85;
        int max_tokens = o->prefill_chunk + o->max_seqs * (1 + DS_MAX_BLOCK);
        size_t draft_page = e->draft ? ds_cuda_draft_page_bytes(e->draft, o->page_size) : 0;
        long fit = ds_cuda_pages_for_memory(e->cuda, o->page_size, frac, max_tokens, draft_page);
        long want = (long)o->max_seqs * max_pages;
        o->kv_pages = (int)(want < fit ? want : fit);
        if (o->kv_pages < max_pages)
            return ds_seterr(DS_ENOMEM, "the GPU has room for %ld KV pages, less than one full context (%d pages)",
                             fit, max_pages);
    }
    return ds_cuda_kv_alloc(e->cuda, o->kv_pages, o->page_size, max_pages);
}

int ds_engine_new(struct ds_model *target, struct ds_draft *draft, const struct ds_engine_opts *opts,
                  struct ds_engine **ret)
{
    struct ds_engine *e = ds_xcalloc(1, sizeof *e);
    struct ds_engine_opts o = opts ? *opts : (struct ds_engine_opts){0};
    int r;
    e->target = target;
    e->draft = draft;
    if (draft && (r = ds_draft_check_weights(draft)) < 0)
        goto fail;
    if (o.page_size <= 0)
        o.page_size = 16;
    if (o.max_seqs <= 0)
        o.max_seqs = 64;
    if (o.prefill_chunk <= 0)
        o.prefill_chunk = 512;
    if (o.max_context <= 0 || o.max_context > target->cfg.max_position_embeddings)
        o.max_context = target->cfg.max_position_embeddings > 0 ? target->cfg.max_position_embeddings : 4096;
    if (o.backend == DS_BACKEND_CUDA && (r = cuda_init(e, &o)) < 0)
        goto fail;
    if (o.kv_pages <= 0) {
        /* room for max_seqs full contexts, but at most a quarter of the machine's memory:
         * a long-context model (Qwen3: 40960 positions) would ask for far more */
        const struct ds_qwen3_config *c = &target->cfg;
        double page_bytes = 2.0 * c->num_hidden_layers * c->num_key_value_heads * c->head_dim * sizeof(float) *
                            o.page_size;
        double want = (double)o.max_seqs * ((o.max_context + DS_MAX_BLOCK + o.page_size) / o.page_size);
        double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
        double cap = ram > 0 ? ram / 4 / page_bytes : want;
        o.kv_pages = (int)(want < cap ? want : cap);
        if (o.kv_pages < 1)
            o.kv_pages = 1;
    }
    e->opts = o;
    e->device_sampling = e->cuda && !o.cuda_host_sampling;
    e->gamma = draft ? ds_draft_block_size(draft) : 0;
    if ((r = ds_pool_new(o.n_threads, &e->pool)) < 0)
        goto fail;
    if ((r = ds_forward_ctx_new(target, e->pool, &e->fwd)) < 0)
        goto fail;
    const struct ds_qwen3_config *c = &target->cfg;
    if ((r = (e->cuda ? ds_kv_pool_init_pages : ds_kv_pool_init)(&e->kv, c->num_hidden_layers,
                                                                 c->num_key_value_heads, c->head_dim, o.page_size,
                                                                 o.kv_pages)) < 0)
        goto fail;
    if (draft && (r = ds_spec_init(e)) < 0)
        goto fail;
    if (e->cuda) {
        /* every buffer of the largest pass now: a running engine allocates no GPU memory */
        int n_capture = draft ? ds_draft_config(draft)->n_target_layers : 0;
        int max_tokens = o.prefill_chunk + o.max_seqs * (1 + e->gamma);
        if ((r = ds_cuda_reserve(e->cuda, max_tokens, o.max_seqs, n_capture)) < 0)
            goto fail;
        if (draft && (r = ds_cuda_draft_new(e->cuda, draft, o.max_seqs, &e->cuda_draft)) < 0)
            goto fail;
    }
    *ret = e;
    return 0;
fail:
    ds_engine_free(e);
    return r;
}

static void seq_free(struct ds_engine *e, struct ds_seq *s)
{
    if (!s)
        return;
    ds_kv_release(&e->kv, &s->kv);
    ds_spec_seq_done(e, s);
    free(s->tokens);
    free(s->stop_ids);
    for (int i = 0; i < s->n_stop; i++)
        free(s->stop[i]);
    free(s->stop);
    free(s->text);
    free(s->prompt_logits);
    free(s);
}

struct ds_engine *ds_engine_free(struct ds_engine *e)
{
    if (!e)
        return NULL;
    for (int i = 0; i < e->n_seqs; i++)
        seq_free(e, e->seqs[i]);
    free(e->seqs);
    for (int i = 0; i < e->n_done; i++)
        ds_result_free(e->done[i]);
    free(e->done);
    ds_spec_done(e);
    ds_sps_done(&e->sps);
    ds_kv_pool_done(&e->kv);
    ds_forward_ctx_free(e->fwd);
    ds_cuda_draft_free(e->cuda_draft);
    ds_cuda_target_free(e->cuda);
    ds_pool_free(e->pool);
    free(e->b_tokens);
    free(e->b_pos);
    free(e->b_seq);
    free(e->b_kv);
    free(e->b_rows);
    free(e->logits);
    free(e->argmax);
    free(e->captured);
    free(e->probs);
    free(e->scratch);
    free(e->draws);
    free(e->draw_acc);
    free(e->draw_next);
    free(e->row_draw);
    free(e);
    return NULL;
}

struct ds_cuda_target *ds_engine_cuda_target(struct ds_engine *e)
{
    return e->cuda;
}

long ds_engine_request_tokens(const struct ds_engine *e, int n_prompt, int max_tokens)
{
    return (long)n_prompt + max_tokens + e->gamma + 1;
}

long ds_engine_request_overhead(const struct ds_engine *e)
{
    return ds_engine_request_tokens(e, 0, 0) + e->kv.page_size - 1;
}

long ds_engine_free_tokens(const struct ds_engine *e)
{
    return (long)e->kv.n_free * e->kv.page_size - e->reserved_queued;
}

int ds_engine_submit(struct ds_engine *e, const struct ds_request *req, int *ret_id)
{
    const struct ds_model *m = e->target;
    int V = m->cfg.vocab_size;
    if (req->n_prompt <= 0)
        return ds_seterr(DS_EINVAL, "the prompt is empty");
    if (req->max_tokens <= 0)
        return ds_seterr(DS_EINVAL, "max_tokens must be positive (got %d)", req->max_tokens);
    long need = ds_engine_request_tokens(e, req->n_prompt, req->max_tokens);
    if (need > e->opts.max_context + e->gamma + 1)
        return ds_seterr(DS_EINVAL, "prompt of %d tokens plus max_tokens %d exceeds the context of %d tokens",
                         req->n_prompt, req->max_tokens, e->opts.max_context);
    if (ds_kv_pages_for(&e->kv, (int)need) > e->kv.n_pages)
        return ds_seterr(DS_EINVAL, "request needs %ld tokens of KV cache, more than the pool holds (%d)", need,
                         e->kv.n_pages * e->kv.page_size);
    for (int i = 0; i < req->n_prompt; i++)
        if (req->prompt[i] < 0 || req->prompt[i] >= V)
            return ds_seterr(DS_EINVAL, "prompt token %d (id %d) is outside the vocabulary of %d", i,
                             req->prompt[i], V);
    const struct ds_sampling *sp = &req->sampling;
    if (!(sp->temperature >= 0) || !isfinite(sp->temperature))
        return ds_seterr(DS_EINVAL, "temperature must be a finite number >= 0");
    if (!(sp->top_p > 0 && sp->top_p <= 1))
        return ds_seterr(DS_EINVAL, "top_p must be in (0, 1]");
    if (sp->top_k < 0)
        return ds_seterr(DS_EINVAL, "top_k must be >= 0");
    if (req->n_stop > 0 && !m->tok)
        return ds_seterr(DS_EINVAL, "stop strings need the model's tokenizer, and '%s' has none", m->dir);

    struct ds_seq *s = ds_xcalloc(1, sizeof *s);
    s->id = ++e->last_id;
    s->user = req->user;
    s->cap = req->n_prompt + req->max_tokens + e->gamma + 2;
    s->tokens = ds_xmalloc((size_t)s->cap * sizeof *s->tokens);
    memcpy(s->tokens, req->prompt, (size_t)req->n_prompt * sizeof *s->tokens);
    s->n_tokens = s->n_prompt = req->n_prompt;
    s->max_tokens = req->max_tokens;
    s->sampling = req->sampling;
    if (req->stop_ids) {
        s->n_stop_ids = req->n_stop_ids;
        s->stop_ids = ds_xmalloc((size_t)(s->n_stop_ids + 1) * sizeof *s->stop_ids);
        memcpy(s->stop_ids, req->stop_ids, (size_t)s->n_stop_ids * sizeof *s->stop_ids);
    } else {
        s->n_stop_ids = m->gen.n_eos > 0 ? m->gen.n_eos : m->cfg.n_eos;
        s->stop_ids = ds_xmalloc((size_t)(s->n_stop_ids + 1) * sizeof *s->stop_ids);
        memcpy(s->stop_ids, m->gen.n_eos > 0 ? m->gen.eos_token_id : m->cfg.eos_token_id,
               (size_t)s->n_stop_ids * sizeof *s->stop_ids);
    }
    if (req->n_stop > 0) {
        s->stop = ds_xcalloc((size_t)req->n_stop, sizeof *s->stop);
        for (int i = 0; i < req->n_stop; i++) {
            s->stop[s->n_stop] = ds_xstrdup(req->stop[i]);
            if (*s->stop[s->n_stop])
                s->n_stop++;
            else
                free(s->stop[s->n_stop]);
        }
    }
    s->want_prompt_logits = req->prompt_logits;
    s->spec = req->spec ? *req->spec : e->opts.spec;
    if (!e->draft)
        s->spec.kind = DS_SPEC_NONE;
    s->state = DS_SEQ_QUEUED;
    s->t_submit = ds_now();
    s->stats.prompt_tokens = req->n_prompt;
    s->stats.block_size = e->gamma;
    s->need_tokens = need;
    s->queued_tokens = (long)ds_kv_pages_for(&e->kv, (int)need) * e->kv.page_size;
    e->reserved_queued += s->queued_tokens;
    if (e->n_seqs == e->cap_seqs) {
        e->cap_seqs = e->cap_seqs ? 2 * e->cap_seqs : 16;
        e->seqs = ds_xrealloc(e->seqs, (size_t)e->cap_seqs * sizeof *e->seqs);
    }
    e->seqs[e->n_seqs++] = s;
    *ret_id = s->id;
    return 0;
}

int ds_engine_active(const struct ds_engine *e)
{
    return e->n_seqs;
}

int ds_engine_cancel(struct ds_engine *e, int id)
{
    for (int i = 0; i < e->n_seqs; i++)
        if (e->seqs[i]->id == id) {
            e->seqs[i]->cancel = true;
            return 0;
        }
    return ds_seterr(DS_EINVAL, "no active sequence %d", id);
}

/* ---- finishing ---- */
void ds_seq_finish(struct ds_engine *e, struct ds_seq *s, const char *reason)
{
    (void)e;
    if (s->state == DS_SEQ_DONE)
        return;
    s->state = DS_SEQ_DONE;
    s->finish_reason = reason;
    s->t_done = ds_now();
}

static struct ds_result *make_result(struct ds_engine *e, struct ds_seq *s)
{
    struct ds_result *r = ds_xcalloc(1, sizeof *r);
    r->id = s->id;
    r->user = s->user;
    r->n_ids = s->n_tokens - s->n_prompt;
    r->ids = ds_xmalloc((size_t)(r->n_ids + 1) * sizeof *r->ids);
    memcpy(r->ids, s->tokens + s->n_prompt, (size_t)r->n_ids * sizeof *r->ids);
    r->finish_reason = s->finish_reason ? s->finish_reason : "error";
    r->error = s->error;
    snprintf(r->error_detail, sizeof r->error_detail, "%s", s->error_detail);
    if (e->target->tok) {
        if (s->text_done) {
            r->text = s->text;
            r->text_len = s->text_len;
            s->text = NULL;
        } else {
            /* text of the output without a final stop id; ids past the tokenizer's (the model's vocab
             * can be larger) add nothing, as they add nothing to the stop strings' text */
            int n = r->n_ids;
            if (n > 0 && ds_seq_is_stop_id(s, r->ids[n - 1]))
                n--;
            if (ds_tokenizer_decode_known(e->target->tok, r->ids, (size_t)n, &r->text, &r->text_len) < 0) {
                r->text = ds_xstrdup("");
                r->text_len = 0;
            }
        }
    }
    r->prompt_logits = s->prompt_logits;
    s->prompt_logits = NULL;
    r->stats = s->stats;
    r->stats.output_tokens = r->n_ids;
    double t_first = s->t_first > 0 ? s->t_first : s->t_done;
    r->stats.time_to_first_token_s = t_first - s->t_submit;
    r->stats.e2e_latency_s = s->t_done - s->t_submit;
    r->stats.decode_tokens_per_s =
        r->n_ids > 1 && s->t_done > t_first ? (r->n_ids - 1) / (s->t_done - t_first) : 0;
    long rounds = r->stats.rounds;
    r->stats.mean_acceptance_length =
        rounds > 0 ? (double)s->emitted_in_rounds / (double)rounds : 0;
    return r;
}

static void collect_finished(struct ds_engine *e)
{
    int j = 0;
    for (int i = 0; i < e->n_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        if (s->state != DS_SEQ_DONE) {
            e->seqs[j++] = s;
            continue;
        }
        if (e->n_done == e->cap_done) {
            e->cap_done = e->cap_done ? 2 * e->cap_done : 16;
            e->done = ds_xrealloc(e->done, (size_t)e->cap_done * sizeof *e->done);
        }
        e->done[e->n_done++] = make_result(e, s);
        if (!s->admitted)
            e->reserved_queued -= s->queued_tokens;
        seq_free(e, s);
    }
    e->n_seqs = j;
}

int ds_engine_take_finished(struct ds_engine *e, struct ds_result **out, int max)
{
    int n = e->n_done < max ? e->n_done : max;
    if (n <= 0)
        return 0;   /* (e->done may still be NULL: no copies of nothing) */
    memcpy(out, e->done, (size_t)n * sizeof *out);
    memmove(e->done, e->done + n, (size_t)(e->n_done - n) * sizeof *e->done);
    e->n_done -= n;
    return n;
}

struct ds_result *ds_result_free(struct ds_result *r)
{
    if (!r)
        return NULL;
    free(r->ids);
    free(r->text);
    free(r->prompt_logits);
    free(r);
    return NULL;
}

/* ---- tokens ---- */
bool ds_seq_is_stop_id(const struct ds_seq *s, int32_t id)
{
    for (int i = 0; i < s->n_stop_ids; i++)
        if (s->stop_ids[i] == id)
            return true;
    return false;
}

/* Append one emitted token; returns true when the sequence finished with it. */
bool ds_seq_emit(struct ds_engine *e, struct ds_seq *s, int32_t id)
{
    if (s->n_tokens == s->n_prompt)
        s->t_first = ds_now();
    s->tokens[s->n_tokens++] = id;
    if (ds_seq_is_stop_id(s, id)) {
        ds_seq_finish(e, s, "stop");
        return true;
    }
    if (s->n_stop > 0) {
        char buf[512];
        int nb = ds_tokenizer_token_bytes(e->target->tok, id, buf, sizeof buf);
        if (nb > 0) {
            s->text = ds_xrealloc(s->text, s->text_len + (size_t)nb + 1);
            memcpy(s->text + s->text_len, buf, (size_t)nb);
            size_t old = s->text_len;
            s->text_len += (size_t)nb;
            s->text[s->text_len] = 0;
            /* the stop string that starts first in the text (several may end in this token's bytes) */
            char *first = NULL;
            for (int i = 0; i < s->n_stop; i++) {
                size_t sl = strlen(s->stop[i]);
                size_t from = old + 1 > sl ? old + 1 - sl : 0;
                char *hit = s->text_len >= sl ? memmem(s->text + from, s->text_len - from, s->stop[i], sl) : NULL;
                if (hit && (!first || hit < first))
                    first = hit;
            }
            if (first) {
                s->text_len = (size_t)(first - s->text);
                s->text[s->text_len] = 0;
                s->text_done = true;
                ds_seq_finish(e, s, "stop");
                return true;
            }
        }
    }
    if (s->n_tokens - s->n_prompt >= s->max_tokens) {
        if (s->n_stop > 0)
            s->text_done = true;
        ds_seq_finish(e, s, "length");
        return true;
    }
    return false;
}

/* The target's token for position n_tokens from one row of logits: argmax when
 * greedy, else a draw from the sampling distribution keyed by (seed, position). */
int32_t ds_seq_sample(struct ds_engine *e, struct ds_seq *s, int row)
{
    int V = e->target->cfg.vocab_size;
    if (ds_sampling_is_greedy(&s->sampling))
        return e->argmax[row];
    if (e->device_sampling)
        return e->draw_next[e->row_draw[row]];   /* drawn by ds_draws_run */
    const float *logits = e->logits + (size_t)row * V;
    ds_probs(logits, V, &s->sampling, e->probs, e->scratch);
    return ds_sample_probs(e->probs, V, ds_uniform(s->sampling.seed, (uint64_t)s->n_tokens, DS_SLOT_TARGET));
}

/* A target-only round for one sequence: its anchor was fed, emit the next token. */
void ds_seq_decode_one(struct ds_engine *e, struct ds_seq *s, int row)
{
    s->kv.len += 1;
    s->stats.rounds++;
    s->emitted_in_rounds++;
    ds_seq_emit(e, s, ds_seq_sample(e, s, row));
}

bool ds_engine_needs_logits(const struct ds_engine *e)
{
    for (int i = 0; i < e->n_seqs; i++) {
        const struct ds_seq *s = e->seqs[i];
        bool prefill = s->state == DS_SEQ_PREFILL && s->chunk > 0;
        if (prefill && s->want_prompt_logits)
            return true;
        if ((prefill || s->state == DS_SEQ_DECODE) && !ds_sampling_is_greedy(&s->sampling) && !e->device_sampling)
            return true;
    }
    return false;
}

/* ---- draws on the GPU ---- */
void ds_draws_begin(struct ds_engine *e, int n_rows)
{
    e->n_draws = 0;
    for (int i = 0; i < n_rows; i++)
        e->row_draw[i] = -1;
}

void ds_draw_chain(struct ds_engine *e, struct ds_seq *s, int row, int len, const int32_t *drafts, int q_block)
{
    if (e->n_draws == e->cap_draws) {
        e->cap_draws = e->cap_draws ? 2 * e->cap_draws : 64;
        e->draws = ds_xrealloc(e->draws, (size_t)e->cap_draws * sizeof *e->draws);
        e->draw_acc = ds_xrealloc(e->draw_acc, (size_t)e->cap_draws * sizeof *e->draw_acc);
        e->draw_next = ds_xrealloc(e->draw_next, (size_t)e->cap_draws * sizeof *e->draw_next);
    }
    /* the token drawn from `row` is the one at position n_tokens (kv.len + 1 while decoding) */
    e->draws[e->n_draws] = (struct ds_cuda_chain){.row = row, .len = len, .drafts = drafts, .q_block = q_block,
                                                  .sampling = s->sampling, .position = (uint64_t)s->n_tokens};
    e->row_draw[row] = e->n_draws++;
}

void ds_draw_plain(struct ds_engine *e, struct ds_seq *s, int row)
{
    if (!ds_sampling_is_greedy(&s->sampling))
        ds_draw_chain(e, s, row, 0, NULL, -1);
}

int ds_draws_run(struct ds_engine *e)
{
    if (e->n_draws == 0)
        return 0;
    return ds_cuda_sample(e->cuda, e->cuda_draft, e->n_draws, e->draws, e->draw_acc, e->draw_next);
}

/* Do passes need full logits rows on the host? Always on the CPU backend; on
 * CUDA with device sampling only for requests that keep their prompt logits
 * (a superset of ds_engine_needs_logits, so the buffer exists whenever a pass
 * copies into it). */
static bool host_logits_needed(const struct ds_engine *e)
{
    if (!e->cuda || !e->device_sampling)
        return true;
    for (int i = 0; i < e->n_seqs; i++)
        if (e->seqs[i]->want_prompt_logits)
            return true;
    return false;
}

/* ---- the round ---- */
int ds_engine_ensure_batch(struct ds_engine *e, int n_tokens, int n_rows, int n_capture)
{
    if (n_tokens > e->cap_b) {
        e->cap_b = n_tokens;
        e->b_tokens = ds_xrealloc(e->b_tokens, (size_t)n_tokens * sizeof *e->b_tokens);
        e->b_pos = ds_xrealloc(e->b_pos, (size_t)n_tokens * sizeof *e->b_pos);
        e->b_seq = ds_xrealloc(e->b_seq, (size_t)n_tokens * sizeof *e->b_seq);
        e->b_rows = ds_xrealloc(e->b_rows, (size_t)n_tokens * sizeof *e->b_rows);
    }
    size_t V = e->target->cfg.vocab_size, H = e->target->cfg.hidden_size;
    if ((size_t)n_rows > e->cap_rows) {
        e->argmax = ds_xrealloc(e->argmax, (size_t)n_rows * sizeof *e->argmax);
        e->row_draw = ds_xrealloc(e->row_draw, (size_t)n_rows * sizeof *e->row_draw);
        e->cap_rows = (size_t)n_rows;
    }
    if ((size_t)n_rows > e->cap_logits && host_logits_needed(e)) {
        float *p = realloc(e->logits, (size_t)n_rows * V * sizeof(float));
        if (!p)
            return ds_seterr(DS_ENOMEM, "could not allocate logits for %d rows", n_rows);
        e->logits = p;
        e->cap_logits = (size_t)n_rows;
    }
    size_t cap_feat = (size_t)n_tokens * n_capture * H;
    if (cap_feat > e->cap_captured) {
        float *p = realloc(e->captured, cap_feat * sizeof(float));
        if (!p)
            return ds_seterr(DS_ENOMEM, "could not allocate features for %d tokens", n_tokens);
        e->captured = p;
        e->cap_captured = cap_feat;
    }
    ds_engine_ensure_probs(e);
    return 0;
}

void ds_engine_ensure_probs(struct ds_engine *e)
{
    size_t V = (size_t)e->target->cfg.vocab_size;
    if (!e->probs) {
        e->probs = ds_xmalloc(V * 2 * sizeof *e->probs);
        e->scratch = ds_xmalloc(V * 2 * sizeof *e->scratch);
    }
}

/* Admit queued sequences in order while there is room. */
static void admit(struct ds_engine *e)
{
    int running = 0;
    for (int i = 0; i < e->n_seqs; i++)
        running += e->seqs[i]->admitted;
    for (int i = 0; i < e->n_seqs && running < e->opts.max_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        if (s->admitted || s->state == DS_SEQ_DONE)
            continue;
        if (ds_kv_reserve(&e->kv, &s->kv, (int)s->need_tokens) < 0)
            break; /* first come, first served: wait for room */
        s->admitted = true;
        e->reserved_queued -= s->queued_tokens;
        s->state = DS_SEQ_PREFILL;
        running++;
    }
}

int ds_engine_step(struct ds_engine *e)
{
    int r;
    for (int i = 0; i < e->n_seqs; i++)
        if (e->seqs[i]->cancel && e->seqs[i]->state != DS_SEQ_DONE)
            ds_seq_finish(e, e->seqs[i], "cancelled");
    collect_finished(e);
    admit(e);
    if (e->round_sync && e->cuda && (r = ds_cuda_sync(e->cuda)) < 0)
        return r;
    double t0 = ds_now(), pass0 = e->time.pass_s, draft0 = e->time.draft_s, prof0 = e->time.profile_pass_s;
    e->last_drafting = 0;
    if (e->draft) {
        r = ds_spec_round(e);
    } else {
        r = ds_plain_round(e);
    }
    if (r == 0 && e->round_sync && e->cuda)
        r = ds_cuda_sync(e->cuda);   /* the round's queued work (the draft contexts) is its own */
    if (e->time.pass_s != pass0) {   /* a round ran (it has a target pass) */
        double step = ds_now() - t0;
        e->time.steps++;
        e->time.step_s += step;
        if (e->round_log) {
            double pass = e->time.pass_s - pass0, draft = e->time.draft_s - draft0;
            fprintf(e->round_log,
                    "{\"step\": %ld, \"tokens\": %d, \"drafting\": %d, \"draft_s\": %.7f, \"pass_s\": %.7f, "
                    "\"rest_s\": %.7f, \"profile_pass_s\": %.7f}\n",
                    e->time.steps, e->last_pass_tokens, e->last_drafting, draft, pass, step - pass - draft,
                    e->time.profile_pass_s - prof0);
        }
    }
    collect_finished(e);
    return r;
}

/* Plan the prefill part of a round: for each prefilling sequence, how many
 * prompt tokens it feeds this round (at least one sequence makes progress). */
int ds_plan_prefill(struct ds_engine *e, int *ret_tokens)
{
    int budget = e->opts.prefill_chunk, total = 0;
    for (int i = 0; i < e->n_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        s->chunk = 0;
        if (s->state != DS_SEQ_PREFILL || !s->admitted)
            continue;
        int left = s->n_prompt - s->kv.len;
        int take = left < budget ? left : budget;
        if (take <= 0 && total == 0)
            take = left < e->opts.prefill_chunk ? left : e->opts.prefill_chunk;
        if (take <= 0)
            continue;
        s->chunk = take;
        budget -= take;
        total += take;
    }
    *ret_tokens = total;
    return 0;
}

/* Add a sequence's prefill chunk to the batch; logits rows for the chunk's
 * last token when it ends the prompt, or for every token when asked. */
void ds_batch_add_prefill(struct ds_engine *e, struct ds_seq *s, int seq_index, int *n_tok, int *n_rows)
{
    for (int k = 0; k < s->chunk; k++) {
        int t = (*n_tok)++;
        int pos = s->kv.len + k;
        e->b_tokens[t] = s->tokens[pos];
        e->b_pos[t] = pos;
        e->b_seq[t] = seq_index;
        bool last = pos == s->n_prompt - 1;
        if (s->want_prompt_logits || last)
            e->b_rows[(*n_rows)++] = t;
    }
}

/* Logits rows of s's prefill chunk: one per token when the prompt logits are
 * kept, else one for the last prompt token when the chunk ends the prompt. */
static int prefill_rows(const struct ds_seq *s)
{
    return s->want_prompt_logits ? s->chunk : (s->kv.len + s->chunk == s->n_prompt);
}

int ds_prefill_draw_row(const struct ds_seq *s, int first)
{
    return s->kv.len + s->chunk == s->n_prompt ? first + prefill_rows(s) - 1 : -1;
}

/* After the pass: copy prompt logits, advance the cache, and sample the first
 * token when the prompt is done. row points at the sequence's first logits row. */
void ds_finish_prefill(struct ds_engine *e, struct ds_seq *s, int *row)
{
    size_t V = e->target->cfg.vocab_size;
    int n_rows = prefill_rows(s);
    if (s->want_prompt_logits) {
        if (!s->prompt_logits)
            s->prompt_logits = ds_xmalloc((size_t)s->n_prompt * V * sizeof(float));
        memcpy(s->prompt_logits + (size_t)s->kv.len * V, e->logits + (size_t)*row * V,
               (size_t)s->chunk * V * sizeof(float));
    }
    s->kv.len += s->chunk;
    if (s->kv.len == s->n_prompt) {
        s->state = DS_SEQ_DECODE;
        ds_seq_emit(e, s, ds_seq_sample(e, s, *row + n_rows - 1));
    }
    *row += n_rows;
}

int ds_plain_round(struct ds_engine *e)
{
    int n_prefill, r;
    ds_plan_prefill(e, &n_prefill);
    int n_decode = 0;
    for (int i = 0; i < e->n_seqs; i++)
        n_decode += e->seqs[i]->state == DS_SEQ_DECODE;
    int n_tokens = n_prefill + n_decode;
    if (n_tokens == 0)
        return 0;
    int max_rows = n_tokens;
    if ((r = ds_engine_ensure_batch(e, n_tokens, max_rows, 0)) < 0)
        return r;
    int n_tok = 0, n_rows = 0;
    if (e->n_seqs > e->cap_bkv) {
        e->cap_bkv = e->n_seqs;
        e->b_kv = ds_xrealloc(e->b_kv, (size_t)e->cap_bkv * sizeof *e->b_kv);
    }
    for (int i = 0; i < e->n_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        e->b_kv[i] = &s->kv;
        if (s->state == DS_SEQ_PREFILL && s->chunk > 0) {
            ds_batch_add_prefill(e, s, i, &n_tok, &n_rows);
        } else if (s->state == DS_SEQ_DECODE) {
            int t = n_tok++;
            e->b_tokens[t] = s->tokens[s->kv.len];
            e->b_pos[t] = s->kv.len;
            e->b_seq[t] = i;
            e->b_rows[n_rows++] = t;
        }
    }
    struct ds_batch b = {
        .n_tokens = n_tok, .tokens = e->b_tokens, .pos = e->b_pos, .seq = e->b_seq, .kv = e->b_kv,
        .n_logits = n_rows, .logit_rows = e->b_rows, .logits = e->logits, .argmax = e->argmax,
    };
    if ((r = ds_engine_forward(e, &b)) < 0)
        return r;
    if (e->device_sampling) {
        /* the sampled rows' tokens, drawn on the GPU in one go */
        ds_draws_begin(e, n_rows);
        for (int i = 0, row = 0; i < e->n_seqs; i++) {
            struct ds_seq *s = e->seqs[i];
            if (s->state == DS_SEQ_PREFILL && s->chunk > 0) {
                int dr = ds_prefill_draw_row(s, row);
                if (dr >= 0)
                    ds_draw_plain(e, s, dr);
                row += prefill_rows(s);
            } else if (s->state == DS_SEQ_DECODE) {
                ds_draw_plain(e, s, row++);
            }
        }
        if ((r = ds_draws_run(e)) < 0)
            return r;
    }
    int row = 0;
    for (int i = 0; i < e->n_seqs; i++) {
        struct ds_seq *s = e->seqs[i];
        if (s->state == DS_SEQ_PREFILL && s->chunk > 0) {
            ds_finish_prefill(e, s, &row);
        } else if (s->state == DS_SEQ_DECODE) {
            ds_seq_decode_one(e, s, row++);
        }
    }
    return 0;
}
