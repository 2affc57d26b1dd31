/* sched.c: verification-length scheduling (see ds-sched.h) and the SPS table. */
#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "dspark/ds-sched.h"

double ds_sps_at(const struct ds_sps *t, int b)
{
    if (!t || t->n == 0)
        return 1.0;
    if (b <= t->b[0])
        return t->sps[0];
    for (int i = t->n - 1; i >= 0; i--) {
        if (b >= t->b[i]) {
            if (i == t->n - 1 && b > t->b[i]) {
                /* extrapolate: step time grows with the slope of the last segment, or proportionally */
                double tl = 1.0 / t->sps[i], slope = tl / t->b[i];
                if (t->n >= 2 && t->b[i] > t->b[i - 1]) {
                    double s2 = (tl - 1.0 / t->sps[i - 1]) / (t->b[i] - t->b[i - 1]);
                    if (s2 > 0)
                        slope = s2;
                }
                return 1.0 / (tl + slope * (b - t->b[i]));
            }
            return t->sps[i];
        }
    }
    return t->sps[0];
}

void ds_sps_monotone(struct ds_sps *t)
{
    /* step time must be non-decreasing in B: pool adjacent violators on 1/sps */
    int n = t->n;
    double *val = ds_xmalloc((size_t)n * sizeof *val), *w = ds_xmalloc((size_t)n * sizeof *w);
    int *cnt = ds_xmalloc((size_t)n * sizeof *cnt), k = 0;
    for (int i = 0; i < n; i++) {
        val[k] = 1.0 / t->sps[i];
        w[k] = 1;
        cnt[k] = 1;
        while (k > 0 && val[k - 1] > val[k]) {
            val[k - 1] = (val[k - 1] * w[k - 1] + val[k] * w[k]) / (w[k - 1] + w[k]);
            w[k - 1] += w[k];
            cnt[k - 1] += cnt[k];
            k--;
        }
        k++;
    }
    int i = 0;
    for (int b = 0; b < k; b++)
        for (int c = 0; c < cnt[b]; c++)
            t->sps[i++] = 1.0 / val[b];
    free(val), free(w), free(cnt);
}

int ds_sps_save(const struct ds_sps *t, const char *path)
{
    json_t *o = json_object(), *b = json_array(), *s = json_array();
    for (int i = 0; i < t->n; i++) {
        json_array_append_new(b, json_integer(t->b[i]));
        json_array_append_new(s, json_real(t->sps[i]));
    }
    json_object_set_new(o, "format", json_integer(1));
    json_object_set_new(o, "tokens", b);
    json_object_set_new(o, "steps_per_s", s);
    /* written beside it and renamed over it, so that a reader (another worker
     * sharing the path) never sees half a file */
    size_t n = strlen(path) + 32;
    char *tmp = malloc(n);
    if (!tmp) {
        json_decref(o);
        return ds_seterr(DS_ENOMEM, "out of memory");
    }
    snprintf(tmp, n, "%s.tmp.%ld", path, (long)getpid());
    int r = json_dump_file(o, tmp, JSON_INDENT(1));
    json_decref(o);
    if (r == 0 && rename(tmp, path) != 0)
        r = -1;
    if (r != 0)
        unlink(tmp);
    free(tmp);
    return r == 0 ? 0 : ds_seterr(DS_EIO, "could not write '%s'", path);
}

int ds_sps_load(const char *path, struct ds_sps *ret)
{
    json_error_t e;
    json_t *o = json_load_file(path, 0, &e);
    if (!o)
        return ds_seterr(DS_EFORMAT, "file '%s': %s", path, e.text);
    json_t *b = json_object_get(o, "tokens"), *s = json_object_get(o, "steps_per_s");
    int r = 0;
    size_t n = json_array_size(b);
    if (!json_is_array(b) || !json_is_array(s) || n == 0 || n != json_array_size(s)) {
        r = ds_seterr(DS_EFORMAT, "file '%s': expected equal, non-empty \"tokens\" and \"steps_per_s\" arrays", path);
        goto out;
    }
    struct ds_sps t = {.n = (int)n, .b = ds_xmalloc(n * sizeof(int)), .sps = ds_xmalloc(n * sizeof(double))};
    for (size_t i = 0; i < n; i++) {
        t.b[i] = (int)json_integer_value(json_array_get(b, i));
        t.sps[i] = json_number_value(json_array_get(s, i));
        if (t.b[i] <= 0 || (i > 0 && t.b[i] <= t.b[i - 1]) || !(t.sps[i] > 0)) {
            ds_sps_done(&t);
            r = ds_seterr(DS_EFORMAT, "file '%s': entry %zu is not increasing and positive", path, i);
            goto out;
        }
    }
    *ret = t;
out:
    json_decref(o);
    return r;
}

void ds_sps_done(struct ds_sps *t)
{
    free(t->b);
    free(t->sps);
    memset(t, 0, sizeof *t);
}

/* ---- the greedy path ---- */
struct cand {
    float a;
    int r, j;
};

static int by_a_desc(const void *x, const void *y)
{
    const struct cand *p = x, *q = y;
    if (p->a != q->a)
        return p->a > q->a ? -1 : 1;
    if (p->j != q->j)
        return p->j - q->j;
    return p->r - q->r;
}

/* Candidates (r, j) with a > 0 and j < cap[r], sorted by descending a. */
static struct cand *candidates(const float *a, int R, int gamma, const int *cap, int *ret_n)
{
    struct cand *c = ds_xmalloc((size_t)(R * gamma + 1) * sizeof *c);
    int n = 0;
    for (int r = 0; r < R; r++) {
        int lim = cap ? cap[r] : gamma;
        for (int j = 0; j < lim && j < gamma; j++) {
            float v = a[(size_t)r * gamma + j];
            if (!(v > 0))
                break; /* survivals only shrink: nothing after a zero */
            c[n++] = (struct cand){v, r, j};
        }
    }
    qsort(c, (size_t)n, sizeof *c, by_a_desc);
    *ret_n = n;
    return c;
}

void ds_sched_dspark(const float *a, int R, int gamma, const int *cap, int extra, const struct ds_sps *sps,
                     int *len)
{
    ds_sched_dspark_from(a, R, gamma, cap, extra, sps, 0, len);
}

int ds_sched_best_fixed(const double *mean_a, int R, int gamma, int extra, const struct ds_sps *sps)
{
    double tau = R, best = tau * ds_sps_at(sps, extra + R);
    int L = 0;
    for (int j = 0; j < gamma; j++) {
        tau += R * mean_a[j];
        double th = tau * ds_sps_at(sps, extra + R * (j + 2));
        if (th > best) {
            best = th;
            L = j + 1;
        }
    }
    return L;
}

void ds_sched_dspark_from(const float *a, int R, int gamma, const int *cap, int extra, const struct ds_sps *sps,
                          int floor_len, int *len)
{
    int n;
    struct cand *c = candidates(a, R, gamma, cap, &n);
    int B = extra + R;
    double tau = R;
    /* the floor: a length fixed before this round's drafts existed */
    for (int r = 0; r < R; r++) {
        int lim = cap ? cap[r] : gamma, l = floor_len < lim ? floor_len : lim;
        len[r] = 0;
        while (len[r] < l && a[(size_t)r * gamma + len[r]] > 0) {
            tau += a[(size_t)r * gamma + len[r]];
            len[r]++;
            B++;
        }
    }
    double best = tau * ds_sps_at(sps, B);
    for (int i = 0; i < n; i++) {
        if (c[i].j < len[c[i].r])
            continue; /* inside the floor */
        /* the path is prefix-consistent: a never increases along j */
        if (c[i].j != len[c[i].r])
            break;
        double t2 = tau + c[i].a, th = t2 * ds_sps_at(sps, B + 1);
        if (!(th > best))
            break; /* early stop: what follows may depend on tokens not yet admitted */
        tau = t2;
        B++;
        best = th;
        len[c[i].r] = c[i].j + 1;
    }
    free(c);
}

int ds_sched_capacity(const float *a, int R, int gamma, const int *cap, int extra, const struct ds_sps *sps)
{
    int n;
    struct cand *c = candidates(a, R, gamma, cap, &n);
    double tau = R, best = tau * ds_sps_at(sps, extra + R);
    int K = 0;
    for (int i = 0; i < n; i++) {
        tau += c[i].a;
        double th = tau * ds_sps_at(sps, extra + R + i + 1);
        if (th > best) {
            best = th;
            K = i + 1;
        }
    }
    free(c);
    return K;
}

void ds_sched_topk(const float *a, int R, int gamma, const int *cap, int K, int *len)
{
    int n;
    struct cand *c = candidates(a, R, gamma, cap, &n);
    for (int r = 0; r < R; r++)
        len[r] = 0;
    for (int i = 0; i < n && i < K; i++)
        if (c[i].j == len[c[i].r])
            len[c[i].r] = c[i].j + 1;
    free(c);
}

void ds_sched_threshold(const float *c, int R, int gamma, const int *cap, float theta, int *len)
{
    for (int r = 0; r < R; r++) {
        int lim = cap ? cap[r] : gamma, k = 0;
        while (k < lim && k < gamma && c[(size_t)r * gamma + k] >= theta)
            k++;
        len[r] = k;
    }
}
