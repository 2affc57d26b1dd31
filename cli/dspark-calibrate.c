/* dspark-calibrate: fit STS (sequential temperature scaling) temperatures of a
 * DSpark confidence head from traces of full-length rounds (dspark-spec.md §3).
 *
 * Input: dspark-generate --trace files made with --spec fixed:γ at one sampling
 * temperature. Each round gives raw confidence logits z_1..z_γ and the number
 * of accepted drafts a; the prefix label y_k is 1 iff a >= k. For k = 1..γ in
 * turn, T_k is chosen on a log grid to minimise the expected calibration error
 * (20 equal-width bins) of Π_{i<=k} σ(z_i / T_i) against y_k, earlier T fixed.
 *
 * When every round also carries the draft's own probability p_k of each draft
 * (CPU traces, and GPU traces of greedy drafts: "draft_prob"), a (z, p) map is
 * fitted the same sequential way: c_k = σ(α_k z_k + β_k logit p_k + γ_k), each
 * position started from its logistic regression on the rounds that reached it
 * and refined by Nelder-Mead on the prefix ECE. At T = 0 a temperature alone cannot carry the
 * head's confidences; p_k can (bench/RESULTS.md).
 *
 * The result is merged into DRAFT/sts.json under the traces' temperature.
 * --held-out FILE scores the fitted temperatures (and map) on other traces. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_G 32
#define BINS 20

/* sts.json's objects keyed by temperature beside "temperatures"; "maps" (2 on) only with a (z, p) map */
static const char *const per_set[4] = {"ece_before", "ece_after", "maps", "ece_after_map"};

struct round {
    float z[MAX_G];
    float lp[MAX_G];  /* logit of the draft's probability of its token (with has_p) */
    bool has_p;
    int accepted;
    int labelled;   /* positions with a label (past an accepted stop token there is none) */
};

/* realloc that ends the program on failure (this tool has no partial result to keep) */
static void *must_realloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "dspark-calibrate: out of memory (requested %zu bytes)\n", n);
        exit(1);
    }
    return q;
}

static double sigmoid(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

/* The map's conditional confidence at position k of round x. */
static double map_conf(const double *m /* [3] */, const struct round *x, int k)
{
    return sigmoid(m[0] * x->z[k] + m[1] * x->lp[k] + m[2]);
}

/* ECE of the prefix survivals pred[i] of rounds i labelled at position k. */
static double ece_of(const struct round *r, int n, int k, const double *pred)
{
    double conf[BINS] = {0}, acc[BINS] = {0};
    long cnt[BINS] = {0}, total = 0;
    for (int i = 0; i < n; i++) {
        if (r[i].labelled < k + 1)
            continue;
        double p = pred[i];
        int b = (int)(p * BINS);
        if (b >= BINS)
            b = BINS - 1;
        conf[b] += p;
        acc[b] += r[i].accepted >= k + 1;
        cnt[b]++;
        total++;
    }
    if (total == 0)
        return 0;
    double e = 0;
    for (int b = 0; b < BINS; b++)
        if (cnt[b])
            e += fabs(acc[b] - conf[b]) / (double)total;
    return e;
}

/* ECE at position k of Π_{i<=k} σ(z_i / T_i) (map NULL) or of the (z, p) map's survival. */
static double ece(const struct round *r, int n, int k, const double *T, const double (*map)[3])
{
    double *pred = must_realloc(NULL, (size_t)n * sizeof *pred);
    for (int i = 0; i < n; i++) {
        double p = 1;
        for (int j = 0; j <= k; j++)
            p *= map ? map_conf(map[j], &r[i], j) : sigmoid(r[i].z[j] / T[j]);
        pred[i] = p;
    }
    double e = ece_of(r, n, k, pred);
    free(pred);
    return e;
}

/* Solve the 3 x 3 system A x = b (Gaussian elimination, partial pivoting); false if singular. */
static bool solve3(double A[3][3], double b[3], double x[3])
{
    for (int c = 0; c < 3; c++) {
        int piv = c;
        for (int i = c + 1; i < 3; i++)
            if (fabs(A[i][c]) > fabs(A[piv][c]))
                piv = i;
        if (fabs(A[piv][c]) < 1e-300)
            return false;
        for (int j = 0; j < 3; j++) {
            double t = A[c][j];
            A[c][j] = A[piv][j], A[piv][j] = t;
        }
        double t = b[c];
        b[c] = b[piv], b[piv] = t;
        for (int i = c + 1; i < 3; i++) {
            double f = A[i][c] / A[c][c];
            for (int j = c; j < 3; j++)
                A[i][j] -= f * A[c][j];
            b[i] -= f * b[c];
        }
    }
    for (int i = 2; i >= 0; i--) {
        double s = b[i];
        for (int j = i + 1; j < 3; j++)
            s -= A[i][j] * x[j];
        x[i] = s / A[i][i];
    }
    return true;
}

/* Logistic regression (Newton, a small ridge on the two weights) of [a >= k + 1] on (z_k, logit p_k)
 * over the rounds whose first k drafts were accepted. */
static void fit_lr(const struct round *r, int n, int k, double m[3])
{
    m[0] = m[1] = m[2] = 0;
    long used = 0;
    for (int it = 0; it < 50; it++) {
        double g[3] = {0}, H[3][3] = {{0}}, step[3];
        used = 0;
        for (int i = 0; i < n; i++) {
            if (r[i].accepted < k || r[i].labelled < k + 1)
                continue;
            double x[3] = {r[i].z[k], r[i].lp[k], 1}, p = map_conf(m, &r[i], k), d = p - (r[i].accepted >= k + 1);
            for (int a = 0; a < 3; a++) {
                g[a] += d * x[a];
                for (int b = 0; b < 3; b++)
                    H[a][b] += p * (1 - p) * x[a] * x[b];
            }
            used++;
        }
        for (int a = 0; a < 2; a++) {
            g[a] += 1e-4 * used * m[a];
            H[a][a] += 1e-4 * used;
        }
        if (!used || !solve3(H, g, step))
            return;
        double big = 0;
        for (int a = 0; a < 3; a++) {
            m[a] -= step[a];
            big = fmax(big, fabs(step[a]));
        }
        if (big < 1e-10)
            break;
    }
}

/* What the map fit minimises at position k: the prefix ECE of prev[i] · map_conf(m, round i, k),
 * plus MAP_PULL times the squared distance of m from the logistic regression's lr, so that among
 * maps of about equal ECE the fit stays near the likelihood's (ECE alone is flat and noisy in m). */
#define MAP_PULL 1e-2
static double map_objective(const struct round *r, int n, int k, const double *prev, const double m[3],
                            const double lr[3], double *pred)
{
    for (int i = 0; i < n; i++)
        pred[i] = prev[i] * map_conf(m, &r[i], k);
    double d2 = 0;
    for (int a = 0; a < 3; a++)
        d2 += (m[a] - lr[a]) * (m[a] - lr[a]);
    return ece_of(r, n, k, pred) + MAP_PULL * d2;
}

/* Nelder-Mead on map_objective from x (3 parameters); x becomes the best point, its value returned. */
static double nelder_mead(const struct round *r, int n, int k, const double *prev, const double lr[3], double *pred,
                          double x[3])
{
    double P[4][3], v[4];
    for (int i = 0; i < 4; i++) {
        memcpy(P[i], x, sizeof P[i]);
        if (i)
            P[i][i - 1] += 0.3 * fmax(fabs(x[i - 1]), 0.3);
        v[i] = map_objective(r, n, k, prev, P[i], lr, pred);
    }
    for (int it = 0; it < 400; it++) {
        for (int i = 1; i < 4; i++)   /* sort by value */
            for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
                double t = v[j];
                v[j] = v[j - 1], v[j - 1] = t;
                for (int a = 0; a < 3; a++) {
                    t = P[j][a];
                    P[j][a] = P[j - 1][a], P[j - 1][a] = t;
                }
            }
        double spread = 0;
        for (int a = 0; a < 3; a++)
            spread = fmax(spread, fabs(P[3][a] - P[0][a]));
        if (v[3] - v[0] < 1e-9 && spread < 1e-7)
            break;
        double c[3], xr[3], xe[3], xc[3];
        for (int a = 0; a < 3; a++) {
            c[a] = (P[0][a] + P[1][a] + P[2][a]) / 3;
            xr[a] = 2 * c[a] - P[3][a];
            xe[a] = 3 * c[a] - 2 * P[3][a];
            xc[a] = 0.5 * (c[a] + P[3][a]);
        }
        double fr = map_objective(r, n, k, prev, xr, lr, pred);
        if (fr < v[0]) {
            double fe = map_objective(r, n, k, prev, xe, lr, pred);
            memcpy(P[3], fe < fr ? xe : xr, sizeof P[3]);
            v[3] = fe < fr ? fe : fr;
        } else if (fr < v[2]) {
            memcpy(P[3], xr, sizeof P[3]);
            v[3] = fr;
        } else {
            double fc = map_objective(r, n, k, prev, xc, lr, pred);
            if (fc < v[3]) {
                memcpy(P[3], xc, sizeof P[3]);
                v[3] = fc;
            } else {
                for (int i = 1; i < 4; i++) {
                    for (int a = 0; a < 3; a++)
                        P[i][a] = 0.5 * (P[0][a] + P[i][a]);
                    v[i] = map_objective(r, n, k, prev, P[i], lr, pred);
                }
            }
        }
    }
    int best = 0;
    for (int i = 1; i < 4; i++)
        if (v[i] < v[best])
            best = i;
    memcpy(x, P[best], sizeof P[best]);
    return v[best];
}

/* A normal deviate from a seeded xorshift generator (Box-Muller): the fit is reproducible. */
static double gauss(uint64_t *st)
{
    double u[2];
    for (int i = 0; i < 2; i++) {
        *st ^= *st << 13, *st ^= *st >> 7, *st ^= *st << 17;
        u[i] = ((double)(*st >> 11) + 0.5) / 9007199254740992.0;
    }
    return sqrt(-2 * log(u[0])) * cos(6.283185307179586 * u[1]);
}

/* The sequential (z, p) map fit: per position, Nelder-Mead from the logistic regression, from the
 * fitted temperature (1 / T, 0, 0), from p alone (0, 1, 0) and from six random perturbations of
 * the best of those; the lowest prefix ECE wins. */
static void fit_map(const struct round *r, int n, int g, const double *T, double (*map)[3], double *after)
{
    double *prev = must_realloc(NULL, (size_t)n * sizeof *prev), *pred = must_realloc(NULL, (size_t)n * sizeof *pred);
    uint64_t st = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < n; i++)
        prev[i] = 1;
    for (int k = 0; k < g; k++) {
        double starts[3][3] = {{0, 0, 0}, {1 / T[k], 0, 0}, {0, 1, 0}};
        fit_lr(r, n, k, starts[0]);
        double best = INFINITY;
        for (int s = 0; s < 3 + 6; s++) {
            double x[3];
            for (int a = 0; a < 3; a++)
                x[a] = s < 3 ? starts[s][a] : map[k][a] + 0.5 * gauss(&st) * fmax(fabs(map[k][a]), 0.5);
            double v = nelder_mead(r, n, k, prev, starts[0], pred, x);
            if (v < best - 1e-12) {
                best = v;
                memcpy(map[k], x, sizeof map[k]);
            }
        }
        for (int i = 0; i < n; i++)
            pred[i] = prev[i] * map_conf(map[k], &r[i], k);
        after[k] = ece_of(r, n, k, pred);
        for (int i = 0; i < n; i++)
            prev[i] *= map_conf(map[k], &r[i], k);
    }
    free(prev);
    free(pred);
}

/* Append the full-length rounds of trace file path to *r (n, cap); every file
 * must share one block size g and one temperature (-1 before the first). */
static int read_traces(const char *path, struct round **r, int *n, int *cap, int *g, double *temp)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "dspark-calibrate: could not open '%s': %s\n", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t lc = 0;
    int lineno = 0, rc = 0;
    while (rc == 0 && getline(&line, &lc, f) > 0) {
        lineno++;
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        json_t *z = json_object_get(o, "confidence"), *cm = json_object_get(o, "committed");
        if (!o || !json_is_array(z) || !json_is_integer(json_object_get(o, "verify_len"))) {
            fprintf(stderr, "dspark-calibrate: '%s' line %d: not a trace line\n", path, lineno);
            rc = -1;
        } else {
            int gg = (int)json_array_size(z), vl = (int)json_integer_value(json_object_get(o, "verify_len"));
            double t = json_number_value(json_object_get(o, "temperature"));
            if (*g < 0)
                *g = gg, *temp = t;
            if (gg != *g || gg > MAX_G || fabs(t - *temp) > 1e-9) {
                fprintf(stderr, "dspark-calibrate: '%s' line %d: traces mix block sizes or temperatures\n", path,
                        lineno);
                rc = -1;
            } else if (json_is_null(json_array_get(z, 0))) {
                fprintf(stderr, "dspark-calibrate: the draft has no confidence head (null confidences)\n");
                rc = -1;
            } else if (vl == gg) { /* full-length rounds only */
                if (*n == *cap)
                    *r = must_realloc(*r, (size_t)(*cap = *cap ? 2 * *cap : 1024) * sizeof **r);
                struct round *x = &(*r)[(*n)++];
                json_t *dp = json_object_get(o, "draft_prob");
                x->has_p = json_is_array(dp) && (int)json_array_size(dp) == gg;
                for (int k = 0; k < gg; k++) {
                    x->z[k] = (float)json_number_value(json_array_get(z, (size_t)k));
                    json_t *pk = x->has_p ? json_array_get(dp, (size_t)k) : NULL;
                    if (!json_is_number(pk)) {
                        x->has_p = false;
                        continue;
                    }
                    /* as the engine clamps it */
                    double p = fmin(fmax(json_number_value(pk), 1e-6), 1 - 1e-6);
                    x->lp[k] = (float)log(p / (1 - p));
                }
                x->accepted = (int)json_integer_value(json_object_get(o, "accepted"));
                /* a round that ended on an accepted stop token emitted no bonus: no labels after it */
                int committed = (int)json_array_size(cm);
                x->labelled = committed <= x->accepted ? x->accepted : gg;
            }
        }
        json_decref(o);
    }
    free(line);
    fclose(f);
    return rc;
}

/* The sts.json at path to merge a fit of g positions into, or a new one when
 * there is none; NULL (said) when it cannot be read or is not one of g
 * positions: it is then left as it is. */
static json_t *read_sts(const char *path, int g)
{
    struct stat sb;
    if (stat(path, &sb) != 0) {
        if (errno == ENOENT)
            return json_pack("{s:i,s:i,s:{}}", "format", 1, "block_size", g, "temperatures");
        fprintf(stderr, "dspark-calibrate: '%s': %s\n", path, strerror(errno));
        return NULL;
    }
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        fprintf(stderr, "dspark-calibrate: '%s': %s (line %d); not replaced\n", path, jerr.text, jerr.line);
        return NULL;
    }
    json_t *bs = json_object_get(root, "block_size");
    if (!json_is_object(json_object_get(root, "temperatures")) ||
        (bs && (!json_is_integer(bs) || json_integer_value(bs) != g))) {
        fprintf(stderr, "dspark-calibrate: '%s' is not an sts.json of %d positions; not replaced\n", path, g);
        json_decref(root);
        return NULL;
    }
    return root;
}

/* Print ,"name":[v_0,...,v_{n-1}], values as %.5g (general) or %.5f. */
static void json_list(const char *name, bool general, const double *v, int n)
{
    printf(",\"%s\":[", name);
    for (int k = 0; k < n; k++) {
        if (k)
            putchar(',');
        printf(general ? "%.5g" : "%.5f", v[k]);
    }
    putchar(']');
}

static void usage(FILE *f)
{
    fprintf(f, "usage: dspark-calibrate --draft DIR [--dry-run] [--json] [--no-map] [--held-out TRACE.jsonl]\n"
               "                        TRACE.jsonl...\n"
               "\n"
               "Fit per-position confidence temperatures (STS) from traces of full-length\n"
               "rounds (dspark-generate --trace FILE --spec fixed:GAMMA) made at one sampling\n"
               "temperature, and merge them into DIR/sts.json under that temperature.\n"
               "When the traces carry the draft's own probabilities (CPU traces; GPU traces\n"
               "of greedy runs), also fit a (z, p) map, c_k = sigmoid(a_k z_k + b_k logit p_k\n"
               "+ c_k), which the engine then uses in place of the temperatures wherever it\n"
               "knows p_k (every draft on the CPU, greedy drafts on the GPU; --no-map:\n"
               "temperatures only).\n"
               "Prints ECE before (T = 1) and after, per position; with --held-out, also on\n"
               "those traces (made the same way from other prompts), which the fit never sees.\n"
               "--dry-run: print the fit without writing DIR/sts.json; --json: print it as JSON.\n"
               "--version: print the version.\n");
}

int main(int argc, char **argv)
{
    const char *draft = NULL, *held_out = NULL;
    bool dry = false, as_json = false, no_map = false;
    static const struct option opts[] = {{"draft", required_argument, NULL, 'd'}, {"dry-run", no_argument, NULL, 'n'},
                                         {"json", no_argument, NULL, 'j'}, {"held-out", required_argument, NULL, 'o'},
                                         {"no-map", no_argument, NULL, 'm'}, {"version", no_argument, NULL, 'V'},
                                         {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == 'd') draft = optarg;
        else if (c == 'n') dry = true;
        else if (c == 'j') as_json = true;
        else if (c == 'o') held_out = optarg;
        else if (c == 'm') no_map = true;
        else if (c == 'h') { usage(stdout); return 0; }
        else if (c == 'V') { printf("dspark-calibrate (dspark) %s\n", PACKAGE_VERSION); return 0; }
        else { usage(stderr); return 2; }
    }
    if (!draft || optind >= argc) {
        usage(stderr);
        return 2;
    }
    struct round *r = NULL, *h = NULL;
    int n = 0, cap = 0, nh = 0, cap_h = 0, g = -1;
    double temp = -1;
    for (int a = optind; a < argc; a++)
        if (read_traces(argv[a], &r, &n, &cap, &g, &temp) < 0)
            return 1;
    if (held_out && read_traces(held_out, &h, &nh, &cap_h, &g, &temp) < 0)
        return 1;
    if (n < 50) {
        fprintf(stderr, "dspark-calibrate: only %d full-length rounds; make traces with --spec fixed:%d\n", n, g);
        return 1;
    }
    if (held_out && nh < 50) {
        fprintf(stderr, "dspark-calibrate: only %d full-length rounds in '%s'\n", nh, held_out);
        return 1;
    }
    /* The draft refuses an sts.json whose sets do not have its block size of numbers: check
     * before fitting, and read the file to merge into (one that cannot be read is not replaced). */
    char path[4200], key[32];
    snprintf(path, sizeof path, "%s/config.json", draft);
    json_t *cfg = json_load_file(path, 0, NULL);
    json_t *bs = json_object_get(cfg, "block_size");
    if (json_is_integer(bs) && json_integer_value(bs) != g) {
        fprintf(stderr, "dspark-calibrate: the traces' rounds have %d drafts, the draft's block_size is %"
                        JSON_INTEGER_FORMAT ": they were made with another draft (trace again with --draft %s)\n",
                g, json_integer_value(bs), draft);
        return 1;
    }
    json_decref(cfg);
    snprintf(path, sizeof path, "%s/sts.json", draft);
    json_t *root = dry ? NULL : read_sts(path, g);   /* (--dry-run writes nothing: it reads nothing) */
    if (!dry && !root)
        return 1;
    double ones[MAX_G], T[MAX_G], before[MAX_G], after[MAX_G], h_before[MAX_G], h_after[MAX_G];
    double map[MAX_G][3], after_map[MAX_G], h_after_map[MAX_G];
    for (int k = 0; k < g; k++)
        ones[k] = 1, T[k] = 1;
    for (int k = 0; k < g; k++) {
        before[k] = ece(r, n, k, ones, NULL);
        double best = INFINITY, bt = 1;
        for (int i = 0; i <= 200; i++) {
            T[k] = exp(log(0.05) + (log(20.0) - log(0.05)) * i / 200.0);
            double e = ece(r, n, k, T, NULL);
            if (e < best - 1e-12)
                best = e, bt = T[k];
        }
        T[k] = bt;
        after[k] = best;
    }
    bool with_map = !no_map;
    for (int i = 0; i < n && with_map; i++)
        with_map = r[i].has_p;
    for (int i = 0; i < nh && with_map; i++)
        with_map = h[i].has_p;
    if (with_map)
        fit_map(r, n, g, T, map, after_map);
    else if (!no_map)
        fprintf(stderr, "dspark-calibrate: the traces do not all carry draft_prob (CPU and greedy GPU traces do): "
                        "fitting temperatures only\n");
    for (int k = 0; k < g && held_out; k++) {
        h_before[k] = ece(h, nh, k, ones, NULL);
        h_after[k] = ece(h, nh, k, T, NULL);
        if (with_map)
            h_after_map[k] = ece(h, nh, k, T, map);
    }
    if (as_json) {
        printf("{\"rounds\":%d,\"temperature\":%g", n, temp);
        json_list("sts", true, T, g);
        json_list("ece_before", false, before, g);
        json_list("ece_after", false, after, g);
        if (held_out) {
            printf(",\"held_out_rounds\":%d", nh);
            json_list("held_out_ece_before", false, h_before, g);
            json_list("held_out_ece_after", false, h_after, g);
        }
        if (with_map) {
            printf(",\"map\":[");
            for (int k = 0; k < g; k++)
                printf("%s[%.6g,%.6g,%.6g]", k ? "," : "", map[k][0], map[k][1], map[k][2]);
            printf("]");
            json_list("ece_after_map", false, after_map, g);
            if (held_out)
                json_list("held_out_ece_after_map", false, h_after_map, g);
        }
        printf("}\n");
    } else {
        printf("%d full-length rounds at sampling temperature %g", n, temp);
        if (held_out)
            printf("; %d held out", nh);
        printf("\n%-9s %10s %12s %12s", "position", "T_k", "ECE before", "ECE after");
        if (with_map)
            printf(" %12s", "(z,p) map");
        if (held_out)
            printf(" %16s %16s", "held-out before", "held-out after");
        if (held_out && with_map)
            printf(" %16s", "held-out map");
        printf("\n");
        for (int k = 0; k < g; k++) {
            printf("%-9d %10.4f %11.2f%% %11.2f%%", k + 1, T[k], 100 * before[k], 100 * after[k]);
            if (with_map)
                printf(" %11.2f%%", 100 * after_map[k]);
            if (held_out)
                printf(" %15.2f%% %15.2f%%", 100 * h_before[k], 100 * h_after[k]);
            if (held_out && with_map)
                printf(" %15.2f%%", 100 * h_after_map[k]);
            printf("\n");
        }
    }
    if (dry)
        return 0;
    snprintf(key, sizeof key, "%g", temp);
    json_t *temps = json_object_get(root, "temperatures");
    /* the draft refuses a temperature twice ("0.7", "0.70") and more than 8 sets: replace a set of this
     * temperature under any spelling, and refuse a ninth */
    const char *k0;
    json_t *v0;
    void *tmp_it;
    size_t n_sets = 0;
    json_object_foreach_safe(temps, tmp_it, k0, v0) {
        char *end;
        double at = strtod(k0, &end);
        if (end != k0 && !*end && fabs(at - temp) < 1e-6 && strcmp(k0, key) != 0) {
            for (int b = 0; b < 4; b++)
                if (json_is_object(json_object_get(root, per_set[b])))
                    json_object_del(json_object_get(root, per_set[b]), k0);
            json_object_del(temps, k0);
        }
        else if (strcmp(k0, key) != 0)
            n_sets++;
    }
    if (n_sets >= 8) {
        fprintf(stderr, "dspark-calibrate: '%s' holds 8 sets of temperatures, the most a draft loads; remove one "
                        "first\n", path);
        return 1;
    }
    json_t *arr = json_array(), *eb = json_array(), *ea = json_array();
    for (int k = 0; k < g; k++) {
        json_array_append_new(arr, json_real(round(T[k] * 1e5) / 1e5));
        json_array_append_new(eb, json_real(round(before[k] * 1e5) / 1e5));
        json_array_append_new(ea, json_real(round(after[k] * 1e5) / 1e5));
    }
    json_object_set_new(temps, key, arr);
    json_t *mp = json_array(), *em = json_array();
    for (int k = 0; k < g && with_map; k++) {
        json_array_append_new(mp, json_pack("[f,f,f]", round(map[k][0] * 1e6) / 1e6, round(map[k][1] * 1e6) / 1e6,
                                            round(map[k][2] * 1e6) / 1e6));
        json_array_append_new(em, json_real(round(after_map[k] * 1e5) / 1e5));
    }
    json_t *vals[4] = {eb, ea, mp, em};   /* (in per_set's order) */
    for (int i = 0; i < 4; i++) {
        if (i >= 2 && !with_map) {   /* a map fitted with earlier temperatures is dropped, not kept stale */
            json_t *o = json_object_get(root, per_set[i]);
            if (json_is_object(o) && json_object_get(o, key)) {
                json_object_del(o, key);
                if (i == 2)
                    fprintf(stderr, "dspark-calibrate: removed the earlier (z, p) map for %s\n", key);
            }
            json_decref(vals[i]);
            continue;
        }
        json_t *o = json_object_get(root, per_set[i]);
        if (!json_is_object(o)) {
            o = json_object();
            json_object_set_new(root, per_set[i], o);
        }
        json_object_set_new(o, key, vals[i]);
    }
    /* (beside it, then renamed over it: a crash leaves the old file or the new one) */
    char tmp[4300];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", path, (int)getpid());
    if (json_dump_file(root, tmp, JSON_INDENT(1)) != 0 || rename(tmp, path) != 0) {
        fprintf(stderr, "dspark-calibrate: could not write '%s': %s\n", path, strerror(errno));
        unlink(tmp);
        return 1;
    }
    fprintf(stderr, "dspark-calibrate: wrote temperatures%s for %s to '%s'\n", with_map ? " and a (z, p) map" : "",
            key, path);
    json_decref(root);
    free(r);
    free(h);
    return 0;
}
