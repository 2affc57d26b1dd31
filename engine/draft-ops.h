/* draft-ops.h: the draft's operations, called by the speculative round (spec.c)
 * and by the tests. All run on the CPU backend with batch-invariant numerics. */
#ifndef DS_DRAFT_OPS_H
#define DS_DRAFT_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "dspark/ds-gemm.h"
#include "draft-impl.h"

#define DS_SCRATCH_SLOTS 12

/* Growable scratch buffers, one set per caller. */
struct ds_draft_scratch {
    float *buf[DS_SCRATCH_SLOTS];
    size_t cap[DS_SCRATCH_SLOTS];
};
float *ds_scratch(struct ds_draft_scratch *s, int slot, size_t n);
void ds_scratch_done(struct ds_draft_scratch *s);

int ds_draft_block_size(const struct ds_draft *d);
/* Free the host weights (the GPU copy serves); returns the bytes freed. */
size_t ds_draft_release_weights(struct ds_draft *d);
/* 0, or DS_EINVAL when the host weights were released. */
int ds_draft_check_weights(const struct ds_draft *d) DS_MUSTCHECK;
int ds_draft_cache_reserve(const struct ds_draft *d, struct ds_draft_cache *c, int cap) DS_MUSTCHECK;
void ds_draft_cache_done(struct ds_draft_cache *c);

/* Project n context rows: row t is the captured features feats[t] [m H] of the
 * token at position pos[t] of the sequence whose cache is caches[t]. The caller
 * moves each cache's len. */
int ds_draft_add_context(const struct ds_draft *d, struct ds_pool *pool, int n, const float *feats /* [n, m H] */,
                         struct ds_draft_cache *const *caches /* [n] */, const int32_t *pos /* [n] */,
                         struct ds_draft_scratch *s) DS_MUSTCHECK;

/* Blocks of R sequences: anchor[i] at position start[i] (= its context length)
 * then γ−1 masks. h_out gets the final-normed states [R γ, H] and U_out the
 * base logits [R γ, V], sequence-major. */
int ds_draft_block(const struct ds_draft *d, struct ds_pool *pool, int R, struct ds_draft_cache *const *caches,
                   const int32_t *anchor, const int32_t *start, float *h_out, float *U_out,
                   struct ds_draft_scratch *s) DS_MUSTCHECK;

/* One Markov position for R sequences: logits[i] = U[i] + W2·m(prev[i], h[i], state[i])
 * and z[i] = the raw confidence logit (NaN without a confidence head; z may be
 * NULL). U rows have stride ldU, h rows ldh; state [R, r] is the rnn head's
 * state (zero before position 1), unused by other heads. */
int ds_draft_markov_step(const struct ds_draft *d, struct ds_pool *pool, int R, const int32_t *prev,
                         const float *U, int ldU, const float *h, int ldh, float *state, float *logits /* [R, V] */,
                         float *z /* [R] */, struct ds_draft_scratch *s) DS_MUSTCHECK;

/* STS temperatures [γ] for a sampling temperature. */
bool ds_draft_sts(const struct ds_draft *d, float sampling_t, float *out_t /* [gamma] */,
                  float (*out_map)[3] /* [gamma][3] */);

#endif
