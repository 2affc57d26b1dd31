/* ds-sampler.h: counter-based randomness and sampling distributions.
 *
 * Every random draw is a pure function of (seed, position, slot) through
 * Philox4x32-10, so a job replays exactly and CPU and GPU runs of one job can be
 * compared. The sampling distribution of a row of logits is softmax(logits / T)
 * cut to the top-k tokens, then to the smallest top-p nucleus, renormalized;
 * T < 1e-5 means greedy (a one-hot at the first maximum). */
#ifndef DS_SAMPLER_H
#define DS_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

#define DS_GREEDY_TEMPERATURE 1e-5f

struct ds_sampling {
    float temperature;   /* < 1e-5: greedy */
    float top_p;         /* (0, 1]; 1 = off */
    int top_k;           /* 0 = off */
    uint64_t seed;
};

/* Random-stream slots: which draw at a position a uniform is for. */
enum ds_slot {
    DS_SLOT_TARGET = 0,       /* plain sampling / bonus / correction token */
    DS_SLOT_ACCEPT = 1,       /* acceptance test of the draft token at this position */
    DS_SLOT_DRAFT = 2,        /* the draft's own sample for this position */
};

void ds_philox4x32(uint64_t key, uint64_t ctr_hi, uint64_t ctr_lo, uint32_t out[4]);
/* A uniform in [0, 1) with 24 random bits. */
float ds_uniform(uint64_t seed, uint64_t position, uint32_t slot);

static inline bool ds_sampling_is_greedy(const struct ds_sampling *s)
{
    return s->temperature < DS_GREEDY_TEMPERATURE;
}

/* Index of the first maximum. */
int32_t ds_argmax(const float *x /* [n] */, int n);

/* The sampling distribution of one row of logits: softmax(logits / T) in
 * float (expf, the sum in double), then with top-k and/or top-p the kept
 * prefix of the ranking by probability (ties: lower id first; top-p: the
 * shortest prefix whose running double sum reaches top_p of the candidates'),
 * renormalized; the rest 0. Greedy gives a one-hot. scratch: [2 n], the
 * ranking's (may be NULL for a row without top-k or top-p). */
void ds_probs(const float *logits /* [n] */, int n, const struct ds_sampling *s, float *probs /* [n] out */,
              uint64_t *scratch /* [2 n] */);
/* Inverse-CDF draw in index order: the first i with cumsum(probs)[i] > u * sum(probs). */
int32_t ds_sample_probs(const float *probs /* [n] */, int n, float u);
/* The correction draw of a rejected draft: from norm(max(0, p - q)), or from p
 * when that mass is below 1e-8. tmp: [n] scratch. */
int32_t ds_sample_residual(const float *p /* [n] */, const float *q /* [n] */, int n, float u, float *tmp /* [n] */);

#endif
