/* ds-sched.h: choosing verification lengths (dspark-spec.md §5), as pure functions.
 *
 * Inputs are prefix survivals a[r][j] = Π_{i≤j} c_{r,i} (calibrated
 * confidences, non-increasing in j) for R sequences and γ positions, row-major
 * [R, γ], and the engine's throughput table SPS(B) (target steps per second at
 * B tokens in the pass). A plan gives each sequence a verification length
 * ℓ_r ∈ 0..cap[r]; the pass then holds B = extra + Σ(1 + ℓ_r) tokens and is
 * expected to commit τ = Σ(1 + Σ_{j≤ℓ_r} a[r][j]) tokens. */
#ifndef DS_SCHED_H
#define DS_SCHED_H

#include <stdint.h>

#include "dspark/ds-err.h"

/* SPS(B): measured points, B ascending; between points the earlier (floor)
 * value holds (the cost curve is a staircase), past the last the time grows linearly. */
struct ds_sps {
    int n;
    int *b;          /* [n] token counts, ascending */
    double *sps;     /* [n] steps per second */
};

double ds_sps_at(const struct ds_sps *t, int b);
int ds_sps_save(const struct ds_sps *t, const char *path) DS_MUSTCHECK;
int ds_sps_load(const char *path, struct ds_sps *ret) DS_MUSTCHECK;
void ds_sps_done(struct ds_sps *t);
/* Make the table non-increasing in B (pool-adjacent-violators on step time). */
void ds_sps_monotone(struct ds_sps *t);

/* Algorithm 1: causal greedy admission by descending a with early stop at the
 * first non-improvement of Θ = τ · SPS(B). Lossless. extra: other tokens in the
 * pass (prefill, sequences not scheduled here). cap may be NULL (γ for all). */
void ds_sched_dspark(const float *a, int R, int gamma, const int *cap, int extra, const struct ds_sps *sps,
                     int *len);
/* The same, starting from every sequence verifying min(floor_len, cap) drafts.
 * Lossless when floor_len does not depend on this round's drafts. */
void ds_sched_dspark_from(const float *a, int R, int gamma, const int *cap, int extra, const struct ds_sps *sps,
                          int floor_len, int *len);
/* The fixed verification length with the best Θ for R sequences whose mean
 * survivals (from earlier rounds) are mean_a[γ]: "never worse than the best
 * fixed length" as a floor for Algorithm 1. */
int ds_sched_best_fixed(const double *mean_a, int R, int gamma, int extra, const struct ds_sps *sps);
/* The capacity K (draft tokens to admit) of the asynchronous variant: the
 * global argmax of Θ along the same greedy path, without early stop. */
int ds_sched_capacity(const float *a, int R, int gamma, const int *cap, int extra, const struct ds_sps *sps);
/* Admit the global top-K of a (ties: earlier position, then earlier sequence). */
void ds_sched_topk(const float *a, int R, int gamma, const int *cap, int K, int *len);
/* Static threshold on the conditional confidences c: ℓ_r = the first k with c_k < θ. */
void ds_sched_threshold(const float *c, int R, int gamma, const int *cap, float theta, int *len);

#endif
