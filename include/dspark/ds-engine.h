/* ds-engine.h: the decoding engine: many sequences advanced together, one
 * round at a time, each round one forward pass of the target over a flattened
 * ragged batch (prefill chunks of new sequences and the decode or verification
 * tokens of running ones).
 *
 * Usage: ds_engine_new → ds_engine_submit (any time) → ds_engine_step until
 * ds_engine_active() is 0, collecting finished sequences with
 * ds_engine_take_finished. Not thread-safe: one thread drives an engine. */
#ifndef DS_ENGINE_H
#define DS_ENGINE_H

#include <stdio.h>
#include <stdbool.h>
#include <stdint.h>

#include "dspark/ds-err.h"
#include "dspark/ds-sampler.h"

struct ds_model;
struct ds_draft;
struct ds_engine;

#define DS_MAX_BLOCK 32           /* largest draft block (gamma) supported */
#define DS_SPEC_FIXED_MAX 64      /* fixed:N's largest N, as the jobs table allows (a round verifies at most the
                                     draft's block) */

enum ds_spec_kind {
    DS_SPEC_NONE = 0,             /* target-only decoding */
    DS_SPEC_FIXED,                /* verify fixed_len drafts every round (at most the draft's block) */
    DS_SPEC_THRESHOLD,            /* cut at the first c_k < threshold */
    DS_SPEC_DSPARK,               /* Algorithm 1: causal greedy admission with early stop */
    DS_SPEC_DSPARK_ASYNC,         /* capacity from predictions two rounds old, top-K admission */
};

struct ds_spec_mode {
    enum ds_spec_kind kind;
    int fixed_len;                /* DS_SPEC_FIXED */
    float threshold;              /* DS_SPEC_THRESHOLD */
};

/* Parse "none", "dspark", "dspark-async", "fixed:N", "threshold:X". */
int ds_spec_mode_parse(const char *s, struct ds_spec_mode *ret) DS_MUSTCHECK;
/* Format a mode back to its text form into buf. */
void ds_spec_mode_format(const struct ds_spec_mode *m, char *buf, size_t cap);

enum ds_backend {
    DS_BACKEND_CPU = 0,           /* f32 on the CPU (engine/forward-cpu.c) */
    DS_BACKEND_CUDA,              /* bf16 on one GPU (engine/forward-cuda.c) */
};

/* Parse "cpu", "cuda" or "auto" (cuda where this build has it and a GPU exists). */
int ds_backend_parse(const char *s, enum ds_backend *ret) DS_MUSTCHECK;
const char *ds_backend_name(enum ds_backend b);

struct ds_engine_opts {
    enum ds_backend backend;      /* where the target and its draft run */
    int device;                   /* CUDA device index */
    bool cublas;                  /* CUDA: cuBLAS products, faster but not batch-invariant */
    bool cuda_graphs;             /* CUDA: replay graphs of earlier passes of the same shape */
    bool cuda_host_sampling;      /* CUDA: sample on the host from copied logits (as the CPU backend), not on the GPU */
    int gemm_ranges;              /* CUDA: the products (target and draft) split k into at most this many
                                   * ranges (0: the kernels' choice, which fills the GPU at one row); 4: faster
                                   * passes of 4 rows and more, slower ones of 1 or 2 (bench/RESULTS.md) */
    double gpu_memory_fraction;   /* CUDA: share of free GPU memory for the KV cache (0: 0.85) */
    int n_threads;                /* 0: all CPUs */
    int kv_pages;                 /* 0: sized from max_seqs x max context */
    int page_size;                /* 0: 16 */
    int max_context;              /* 0: the model's max_position_embeddings */
    int max_seqs;                 /* sequences decoded at once (0: 64) */
    int prefill_chunk;            /* prompt tokens per round over all sequences (0: 512) */
    struct ds_spec_mode spec;     /* default speculation for requests that do not say */
};

struct ds_request {
    const int32_t *prompt;        /* [n_prompt] */
    int n_prompt;
    int max_tokens;
    struct ds_sampling sampling;
    const int32_t *stop_ids;      /* [n_stop_ids]; NULL: the model's eos ids */
    int n_stop_ids;
    const char *const *stop;      /* [n_stop] stop strings (need the tokenizer) */
    int n_stop;
    bool prompt_logits;           /* keep the logits of every prompt position */
    const struct ds_spec_mode *spec; /* NULL: the engine default */
    void *user;
};

/* Per-sequence statistics (names follow vLLM's where one exists). Only tokens
 * actually emitted count. */
struct ds_seq_stats {
    int prompt_tokens;
    int output_tokens;
    int rounds;                   /* decoding rounds after the prefill */
    long num_draft_tokens;        /* drafted (gamma per round with a draft) */
    long num_verified_tokens;     /* sent to the target for verification (sum of l_r) */
    long num_accepted_tokens;     /* accepted drafts */
    double mean_acceptance_length; /* tau: (accepted + bonus) per round */
    int32_t verified_by_position[DS_MAX_BLOCK];  /* rounds that verified position k+1 */
    int32_t accepted_by_position[DS_MAX_BLOCK];  /* rounds that accepted position k+1 */
    int32_t reached_by_position[DS_MAX_BLOCK];   /* rounds that verified k+1 with 1..k accepted */
    int block_size;               /* gamma, 0 without a draft */
    double time_to_first_token_s; /* from submit */
    double e2e_latency_s;
    double decode_tokens_per_s;   /* output tokens after the first / decode time */
};

struct ds_result {
    int id;                       /* as returned by ds_engine_submit */
    void *user;
    int32_t *ids;                 /* [n_ids] generated ids (malloc'ed; owned by the result) */
    int n_ids;
    char *text;                   /* decoded output (NULL without a tokenizer); stop string cut */
    size_t text_len;
    const char *finish_reason;    /* "stop", "length", "cancelled", "error" */
    int error;                    /* 0 or a negative DS_E* code */
    char error_detail[512];
    float *prompt_logits;         /* [n_prompt, V] when asked for */
    struct ds_seq_stats stats;
};

int ds_engine_new(struct ds_model *target, struct ds_draft *draft, const struct ds_engine_opts *opts,
                  struct ds_engine **ret) DS_MUSTCHECK;
struct ds_engine *ds_engine_free(struct ds_engine *e);

/* Queue a request; it joins the next rounds while capacity allows. A request
 * the engine can tell is bad (empty prompt, longer than the context, ids out of
 * the vocabulary) is refused here with DS_EINVAL and a detail. */
int ds_engine_submit(struct ds_engine *e, const struct ds_request *req, int *ret_id) DS_MUSTCHECK;
/* Run one round over every active sequence. */
int ds_engine_step(struct ds_engine *e) DS_MUSTCHECK;
/* Sequences queued or running. */
int ds_engine_active(const struct ds_engine *e);
/* Move up to max finished results into out (the caller frees each with ds_result_free). */
int ds_engine_take_finished(struct ds_engine *e, struct ds_result **out, int max);
/* Stop a sequence at the end of the current round (finish_reason "cancelled"). */
int ds_engine_cancel(struct ds_engine *e, int id);
struct ds_result *ds_result_free(struct ds_result *r);

/* Free KV capacity in tokens (queued requests' reservations taken off, in whole pages), and what
 * a request would need (prompt + max_tokens + block). */
long ds_engine_free_tokens(const struct ds_engine *e);
long ds_engine_request_tokens(const struct ds_engine *e, int n_prompt, int max_tokens);
/* The most KV room a request takes beyond its prompt and max_tokens: the speculative block (one
 * token without a draft) and the rounding up to whole pages. */
long ds_engine_request_overhead(const struct ds_engine *e);

/* Where the engine's rounds spent their wall-clock time since it was created (or
 * since its step-time profile was measured). A pass ends when its results are on
 * the host: greedy ids, logits, or the draws' ids. Where the GPU draws every row,
 * nothing comes back before the next round, and its time counts with the rest. */
struct ds_engine_time {
    long steps;                 /* ds_engine_step calls that ran a round */
    long drafting_steps;        /* of them, rounds that drafted */
    double step_s;              /* in those calls */
    double pass_s;              /* in target passes */
    double draft_s;             /* in draft phases, to the drafts on the host (the GPU's earlier
                                   work that the drafts wait for included) */
    double profile_pass_s;      /* what the profile SPS(B) gives for the same passes (0 without one) */
};
void ds_engine_time(const struct ds_engine *e, struct ds_engine_time *ret);
/* Write one JSON line per round to f (NULL: none): the target pass's tokens,
 * the sequences that drafted, and the seconds of the draft phase, the pass and
 * the rest of the round, with the profile's time for the pass. With sync, each
 * round and each pass waits for the GPU at its end, so that a phase's time is
 * its own work (queued work otherwise lands in whichever phase waits next);
 * that costs the overlap of host and GPU. */
void ds_engine_set_round_log(struct ds_engine *e, FILE *f, bool sync);

/* The throughput table SPS(B) that the dspark schedulers use (engines with a draft). */
struct ds_sps;
/* Measure SPS(B) with the target at the given context length, capped at the
 * engine's max_context - 1 (B from 1 to max_seqs x (1 + γ)), median of reps
 * timed passes each; a few seconds. Returns the context it measured at, or a
 * negative error. */
int ds_engine_profile_sps(struct ds_engine *e, int context, int reps) DS_MUSTCHECK;
int ds_engine_set_sps(struct ds_engine *e, const struct ds_sps *t) DS_MUSTCHECK;
const struct ds_sps *ds_engine_sps(const struct ds_engine *e);

#endif
