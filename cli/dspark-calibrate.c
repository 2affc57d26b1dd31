/* dspark-calibrate: fit STS (sequential temperature scaling) temperatures of a
 * DSpark confidence head from traces of full-length rounds (dspark-spec.md §3).
 *
 * Input: dspark-generate --trace files made with --spec fixed:γ at one sampling
 * temperature. Each round gives raw confidence logits z_1..z_γ and the number
 * of accepted drafts a; the prefix label y_k is 1 iff a >= k. For k = 1..γ in
 * turn, T_k is chosen on a log grid to minimise the expected calibration error
 * (20 equal-width bins) of Π_{i<=k} σ(z_i / T_i) against y_k, earlier T fixed.
 * The result is merged into DRAFT/sts.json under the traces' temperature.
 * --held-out FILE scores the fitted temperatures on other traces as well. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_G 32
#define BINS 20

struct round {
    float z[MAX_G];
    int accepted;
    int labelled;   /* positions with a label (past an accepted stop token there is none) */
};

static double sigmoid(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

/* ECE of predictions p against labels y over rounds with a label at position k. */
static double ece(const struct round *r, int n, int k, const double *T, int g)
{
    double conf[BINS] = {0}, acc[BINS] = {0};
    long cnt[BINS] = {0}, total = 0;
    (void)g;
    for (int i = 0; i < n; i++) {
        if (r[i].labelled < k + 1)
            continue;
        double p = 1;
        for (int j = 0; j <= k; j++)
            p *= sigmoid(r[i].z[j] / T[j]);
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
                    *r = realloc(*r, (size_t)(*cap = *cap ? 2 * *cap : 1024) * sizeof **r);
                struct round *x = &(*r)[(*n)++];
                for (int k = 0; k < gg; k++)
                    x->z[k] = (float)json_number_value(json_array_get(z, (size_t)k));
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

static void usage(FILE *f)
{
    fprintf(f, "usage: dspark-calibrate --draft DIR [--dry-run] [--json] [--held-out TRACE.jsonl] TRACE.jsonl...\n"
               "\n"
               "Fit per-position confidence temperatures (STS) from traces of full-length\n"
               "rounds (dspark-generate --trace FILE --spec fixed:GAMMA) made at one sampling\n"
               "temperature, and merge them into DIR/sts.json under that temperature.\n"
               "Prints ECE before (T = 1) and after, per position; with --held-out, also on\n"
               "those traces (made the same way from other prompts), which the fit never sees.\n");
}

int main(int argc, char **argv)
{
    const char *draft = NULL, *held_out = NULL;
    bool dry = false, as_json = false;
    static const struct option opts[] = {{"draft", required_argument, NULL, 'd'}, {"dry-run", no_argument, NULL, 'n'},
                                         {"json", no_argument, NULL, 'j'}, {"held-out", required_argument, NULL, 'o'},
                                         {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == 'd') draft = optarg;
        else if (c == 'n') dry = true;
        else if (c == 'j') as_json = true;
        else if (c == 'o') held_out = optarg;
        else if (c == 'h') { usage(stdout); return 0; }
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
    double ones[MAX_G], T[MAX_G], before[MAX_G], after[MAX_G], h_before[MAX_G], h_after[MAX_G];
    for (int k = 0; k < g; k++)
        ones[k] = 1, T[k] = 1;
    for (int k = 0; k < g; k++) {
        before[k] = ece(r, n, k, ones, g);
        double best = INFINITY, bt = 1;
        for (int i = 0; i <= 200; i++) {
            T[k] = exp(log(0.05) + (log(20.0) - log(0.05)) * i / 200.0);
            double e = ece(r, n, k, T, g);
            if (e < best - 1e-12)
                best = e, bt = T[k];
        }
        T[k] = bt;
        after[k] = best;
    }
    for (int k = 0; k < g && held_out; k++) {
        h_before[k] = ece(h, nh, k, ones, g);
        h_after[k] = ece(h, nh, k, T, g);
    }
    if (as_json) {
        printf("{\"rounds\":%d,\"temperature\":%g,\"sts\":[", n, temp);
        for (int k = 0; k < g; k++)
            printf("%s%.5g", k ? "," : "", T[k]);
        printf("],\"ece_before\":[");
        for (int k = 0; k < g; k++)
            printf("%s%.5f", k ? "," : "", before[k]);
        printf("],\"ece_after\":[");
        for (int k = 0; k < g; k++)
            printf("%s%.5f", k ? "," : "", after[k]);
        if (held_out) {
            printf("],\"held_out_rounds\":%d,\"held_out_ece_before\":[", nh);
            for (int k = 0; k < g; k++)
                printf("%s%.5f", k ? "," : "", h_before[k]);
            printf("],\"held_out_ece_after\":[");
            for (int k = 0; k < g; k++)
                printf("%s%.5f", k ? "," : "", h_after[k]);
        }
        printf("]}\n");
    } else {
        printf("%d full-length rounds at sampling temperature %g", n, temp);
        if (held_out)
            printf("; %d held out", nh);
        printf("\n%-9s %10s %12s %12s", "position", "T_k", "ECE before", "ECE after");
        if (held_out)
            printf(" %16s %16s", "held-out before", "held-out after");
        printf("\n");
        for (int k = 0; k < g; k++) {
            printf("%-9d %10.4f %11.2f%% %11.2f%%", k + 1, T[k], 100 * before[k], 100 * after[k]);
            if (held_out)
                printf(" %15.2f%% %15.2f%%", 100 * h_before[k], 100 * h_after[k]);
            printf("\n");
        }
    }
    if (dry)
        return 0;
    char path[4200], key[32];
    snprintf(path, sizeof path, "%s/sts.json", draft);
    snprintf(key, sizeof key, "%g", temp);
    json_t *root = json_load_file(path, 0, NULL);
    if (!root)
        root = json_pack("{s:i,s:i,s:{}}", "format", 1, "block_size", g, "temperatures");
    json_t *temps = json_object_get(root, "temperatures");
    if (!json_is_object(temps)) {
        fprintf(stderr, "dspark-calibrate: '%s' has no \"temperatures\" object\n", path);
        return 1;
    }
    json_t *arr = json_array(), *eb = json_array(), *ea = json_array();
    for (int k = 0; k < g; k++) {
        json_array_append_new(arr, json_real(round(T[k] * 1e5) / 1e5));
        json_array_append_new(eb, json_real(round(before[k] * 1e5) / 1e5));
        json_array_append_new(ea, json_real(round(after[k] * 1e5) / 1e5));
    }
    json_object_set_new(temps, key, arr);
    const char *names[2] = {"ece_before", "ece_after"};
    json_t *vals[2] = {eb, ea};
    for (int i = 0; i < 2; i++) {
        json_t *o = json_object_get(root, names[i]);
        if (!json_is_object(o)) {
            o = json_object();
            json_object_set_new(root, names[i], o);
        }
        json_object_set_new(o, key, vals[i]);
    }
    if (json_dump_file(root, path, JSON_INDENT(1)) != 0) {
        fprintf(stderr, "dspark-calibrate: could not write '%s'\n", path);
        return 1;
    }
    fprintf(stderr, "dspark-calibrate: wrote temperatures for %s to '%s'\n", key, path);
    json_decref(root);
    free(r);
    free(h);
    return 0;
}
