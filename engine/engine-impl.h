/* engine-impl.h: the engine's private structures, shared by engine.c (sequences
 * and target-only rounds) and spec.c (speculative rounds). */
#ifndef DS_ENGINE_IMPL_H
#define DS_ENGINE_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dspark/ds-engine.h"
#include "dspark/ds-gemm.h"
#include "dspark/ds-model.h"
#include "dspark/ds-sched.h"

enum ds_seq_state { DS_SEQ_QUEUED, DS_SEQ_PREFILL, DS_SEQ_DECODE, DS_SEQ_DONE };

struct ds_spec_seq;   /* per-sequence draft state (spec.c) */
struct ds_cuda_chain; /* one sequence's draws on the GPU (ds-cuda.h) */
struct ds_spec;       /* engine-wide draft state (spec.c) */

struct ds_seq {
    int id;
    void *user;
    enum ds_seq_state state;
    bool admitted;               /* KV pages reserved */
    bool cancel;
    long need_tokens;            /* KV positions reserved at admission */
    long queued_tokens;          /* what that takes of the pool, in whole pages (counted while queued) */
    int32_t *tokens;             /* [cap] prompt then output */
    int n_tokens, n_prompt, cap;
    int max_tokens;
    struct ds_sampling sampling;
    struct ds_spec_mode spec;
    int32_t *stop_ids;           /* [n_stop_ids] */
    int n_stop_ids;
    char **stop;                 /* [n_stop] stop strings */
    int n_stop;
    char *text;                  /* output bytes so far (only with stop strings) */
    size_t text_len;
    bool text_done;              /* text is final (cut at a stop string) */
    bool want_prompt_logits;
    float *prompt_logits;        /* [n_prompt, V] */
    struct ds_kv_seq kv;         /* target cache; kv.len = tokens processed */
    int chunk;                   /* prompt tokens fed this round */
    struct ds_spec_seq *draft;   /* NULL without a draft */
    double t_submit, t_first, t_done;
    const char *finish_reason;
    int error;
    char error_detail[512];
    long emitted_in_rounds;      /* tokens emitted by decoding rounds (for tau) */
    struct ds_seq_stats stats;
};

struct ds_engine {
    struct ds_model *target;
    struct ds_draft *draft;
    struct ds_engine_opts opts;
    int gamma;                   /* draft block size, 0 without a draft */
    struct ds_pool *pool;
    struct ds_forward_ctx *fwd;  /* CPU backend */
    struct ds_cuda_target *cuda; /* CUDA backend */
    struct ds_cuda_draft *cuda_draft; /* the draft on the GPU (CUDA backend with a draft) */
    struct ds_kv_pool kv;        /* K/V rows on the host (CPU) or only the page lists (CUDA) */
    struct ds_seq **seqs;        /* [n_seqs] queued and running, in arrival order */
    int n_seqs, cap_seqs;
    struct ds_result **done;     /* [n_done] finished, not yet taken */
    int n_done, cap_done;
    int last_id;
    long reserved_queued;        /* KV tokens promised to queued sequences */
    /* batch buffers */
    int32_t *b_tokens, *b_pos, *b_seq, *b_rows;   /* [cap_b] */
    int cap_b;
    struct ds_kv_seq **b_kv;     /* [cap_bkv] */
    int cap_bkv;
    float *logits;               /* [cap_logits, V] on the host: the CPU backend, host sampling, and
                                    prompt logits (NULL on CUDA with device sampling until asked) */
    int32_t *argmax;             /* [cap_rows] each logits row's argmax, every pass */
    size_t cap_logits, cap_rows;
    float *captured;             /* [cap_captured] features of the pass */
    size_t cap_captured;
    float *probs;                /* [2 V] */
    uint64_t *scratch;           /* [2 V] ds_probs' */
    /* device sampling (CUDA): sampled rows draw on the GPU, only ids come back */
    bool device_sampling;        /* the CUDA backend without opts.cuda_host_sampling */
    struct ds_cuda_chain *draws; /* [cap_draws] the pass's draws, in row order */
    int32_t *draw_acc, *draw_next; /* [cap_draws] accepted drafts and the token after them */
    int n_draws, cap_draws;
    int32_t *row_draw;           /* [cap_rows] the draw starting at a logits row, else -1 */
    struct ds_spec *spec;
    struct ds_sps sps;           /* SPS(B): target steps per second at B tokens */
    struct ds_engine_time time;  /* ds_engine_time() */
    /* ds_engine_set_round_log: one line per round; with round_sync, each phase waits for the GPU */
    FILE *round_log;
    bool round_sync;
    int last_pass_tokens;        /* the last target pass's tokens */
    int last_drafting;           /* sequences that drafted in the last round */
};

double ds_now(void);
bool ds_seq_is_stop_id(const struct ds_seq *s, int32_t id);
bool ds_seq_emit(struct ds_engine *e, struct ds_seq *s, int32_t id);
void ds_seq_finish(struct ds_engine *e, struct ds_seq *s, const char *reason);
int ds_plan_prefill(struct ds_engine *e, int *ret_tokens);
void ds_batch_add_prefill(struct ds_engine *e, struct ds_seq *s, int seq_index, int *n_tok, int *n_rows);
void ds_finish_prefill(struct ds_engine *e, struct ds_seq *s, int *row);
int ds_plain_round(struct ds_engine *e);
/* One target pass on the engine's backend. */
int ds_engine_forward(struct ds_engine *e, const struct ds_batch *b);
/* The next token of s from logits row `row` of the pass (its argmax when greedy). */
int32_t ds_seq_sample(struct ds_engine *e, struct ds_seq *s, int row);
void ds_seq_decode_one(struct ds_engine *e, struct ds_seq *s, int row);
/* The logits row whose token ends s's prompt this round (first: the chunk's first row), or -1. */
int ds_prefill_draw_row(const struct ds_seq *s, int first);
/* Device sampling: start the draws of a pass of n_rows logits rows, add them in
 * row order (ds_draw_plain: a draw for s's next token from one row, nothing for
 * a greedy s; ds_draw_chain: the verification of len drafts of block row
 * q_block), then run them all at once; ds_seq_sample then reads the results. */
void ds_draws_begin(struct ds_engine *e, int n_rows);
void ds_draw_plain(struct ds_engine *e, struct ds_seq *s, int row);
void ds_draw_chain(struct ds_engine *e, struct ds_seq *s, int row, int len, const int32_t *drafts, int q_block);
int ds_draws_run(struct ds_engine *e);
/* Whether the pass must bring its logits to the host: some row belongs to a
 * prompt whose logits are kept, or to a sampling sequence that draws on the
 * host (else ids suffice). */
bool ds_engine_needs_logits(const struct ds_engine *e);
/* Size the batch buffers for a pass of n_tokens with n_rows logits and n_capture captured layers. */
int ds_engine_ensure_batch(struct ds_engine *e, int n_tokens, int n_rows, int n_capture);
/* e->probs [2 V] and e->scratch [2 V] (ds_probs' ranking), once. */
void ds_engine_ensure_probs(struct ds_engine *e);

/* spec.c */
int ds_draft_block_size(const struct ds_draft *d);
int ds_spec_init(struct ds_engine *e);
void ds_spec_done(struct ds_engine *e);
void ds_spec_seq_done(struct ds_engine *e, struct ds_seq *s);
int ds_spec_round(struct ds_engine *e);

#endif
