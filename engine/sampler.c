/* sampler.c: Philox4x32-10 uniforms and sampling distributions (see ds-sampler.h). */
#include "config.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-sampler.h"

void ds_philox4x32(uint64_t key, uint64_t ctr_hi, uint64_t ctr_lo, uint32_t out[4])
{
    uint32_t c0 = (uint32_t)ctr_lo, c1 = (uint32_t)(ctr_lo >> 32), c2 = (uint32_t)ctr_hi,
             c3 = (uint32_t)(ctr_hi >> 32);
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
        c0 = n0, c1 = n1, c2 = n2, c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

float ds_uniform(uint64_t seed, uint64_t position, uint32_t slot)
{
    uint32_t r[4];
    ds_philox4x32(seed, slot, position, r);
    return (float)(r[0] >> 8) * (1.0f / 16777216.0f);
}

int32_t ds_argmax(const float *x, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* A float's bits (for non-negative floats, ordered as the values). */
static inline uint32_t float_bits(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

/* The first `need` places of the ranking by probability, descending, ties by
 * lower id (and perhaps more), as (bits << 32 | id) (non-negative floats order
 * like their bits): the tokens from the highest 11-bit bucket of the bits down
 * to the one that holds the need-th, then a stable LSD radix sort of those on
 * the bits, one byte a pass, skipping bytes they all share, from id order.
 * ranked, tmp: [n]. Returns ranked or tmp, whichever holds them. */
static uint64_t *rank_by_prob(const float *probs, int n, int need, uint64_t *ranked, uint64_t *tmp)
{
    uint32_t floor_bits = 0;
    if (need < n) {
        size_t count[2048] = {0};
        for (int i = 0; i < n; i++)
            count[float_bits(probs[i]) >> 21]++;
        size_t above = 0;
        int top = 2047;
        while (top > 0 && above + count[top] < (size_t)need)
            above += count[top--];
        floor_bits = (uint32_t)top << 21;
    }
    uint32_t all_or = 0, all_and = 0xffffffffu;
    int m = 0;
    for (int i = 0; i < n; i++) {
        uint32_t b = float_bits(probs[i]);
        if (b < floor_bits)
            continue;
        all_or |= b;
        all_and &= b;
        ranked[m++] = (uint64_t)b << 32 | (uint32_t)i;
    }
    uint64_t *src = ranked, *dst = tmp;
    for (int shift = 32; shift < 64; shift += 8) {
        if ((((all_or ^ all_and) >> (shift - 32)) & 0xffu) == 0)
            continue;   /* every token has this byte */
        size_t start[256] = {0};
        for (int i = 0; i < m; i++)
            start[0xffu - ((src[i] >> shift) & 0xffu)]++;   /* larger bytes first */
        size_t at = 0;
        for (int d = 0; d < 256; d++) {
            size_t c = start[d];
            start[d] = at;
            at += c;
        }
        for (int i = 0; i < m; i++)
            dst[start[0xffu - ((src[i] >> shift) & 0xffu)]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    return src;
}

static inline float ranked_prob(uint64_t r)
{
    uint32_t b = (uint32_t)(r >> 32);
    float f;
    memcpy(&f, &b, 4);
    return f;
}

void ds_probs(const float *logits, int n, const struct ds_sampling *s, float *probs, uint64_t *scratch)
{
    if (n <= 0)
        return;
    if (ds_sampling_is_greedy(s)) {
        memset(probs, 0, (size_t)n * sizeof *probs);
        probs[ds_argmax(logits, n)] = 1.0f;
        return;
    }
    float inv_t = 1.0f / s->temperature;
    float mx = -INFINITY;
    for (int i = 0; i < n; i++)
        if (logits[i] > mx)
            mx = logits[i];
    double sum = 0;
    for (int i = 0; i < n; i++) {
        probs[i] = expf((logits[i] - mx) * inv_t);
        sum += probs[i];
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++)
        probs[i] *= inv;
    bool cut_k = s->top_k > 0 && s->top_k < n, cut_p = s->top_p > 0 && s->top_p < 1;
    if (!cut_k && !cut_p)
        return;
    /* rank tokens by probability (ties: lower id first), keep a prefix of the ranking */
    int keep = cut_k ? s->top_k : n;
    const uint64_t *rank = rank_by_prob(probs, n, keep, scratch, scratch + n);   /* [>= keep] */
    double kept = 0;   /* the kept prefix's mass, summed in ranking order */
    for (int i = 0; i < keep; i++)
        kept += ranked_prob(rank[i]);
    if (cut_p) {
        /* smallest prefix whose share of the (top-k) mass reaches top_p */
        double acc = 0;
        int j = 0;
        while (j < keep) {
            acc += ranked_prob(rank[j++]);
            if (acc >= s->top_p * kept)
                break;
        }
        keep = j;
        kept = acc;
    }
    float renorm = (float)(1.0 / kept);
    /* the kept tokens: above the last kept one's bits, or equal with an id up to its */
    uint32_t last_bits = (uint32_t)(rank[keep - 1] >> 32);
    int32_t last_id = (int32_t)(uint32_t)rank[keep - 1];
    for (int i = 0; i < n; i++) {
        uint32_t b = float_bits(probs[i]);
        probs[i] = b > last_bits || (b == last_bits && i <= last_id) ? probs[i] * renorm : 0.0f;
    }
}

int32_t ds_sample_residual(const float *p, const float *q, int n, float u, float *tmp)
{
    double mass = 0;
    for (int i = 0; i < n; i++) {
        float r = p[i] - q[i];
        tmp[i] = r > 0 ? r : 0;
        mass += tmp[i];
    }
    return ds_sample_probs(mass > 1e-8 ? tmp : p, n, u);
}

int32_t ds_sample_probs(const float *probs, int n, float u)
{
    double total = 0;
    for (int i = 0; i < n; i++)
        total += probs[i];
    double target = (double)u * total, acc = 0;
    int32_t last = -1;
    for (int i = 0; i < n; i++) {
        if (probs[i] <= 0)
            continue;
        acc += probs[i];
        last = i;
        if (acc > target)
            return i;
    }
    return last >= 0 ? last : 0;
}
