#!/usr/bin/env python3
"""Calibration experiment for the draft's confidences (pure Python, no numpy).

Reads dspark-generate --trace files made with --spec fixed:GAMMA (the "draft_prob"
field included), fits per-position confidence maps on the FIT traces only, and
prints the expected calibration error (20 equal-width bins) of the prefix
survival prod_{i<=k} c_i against the prefix label y_k = [accepted >= k], per
position, on the HELD traces and in-sample on FIT.  Rounds and labels follow
cli/dspark-calibrate.c: full-length rounds only; a round that ended on an
accepted stop token (no bonus token committed) has labels up to its accepted
count only.

Variants (c_k is the conditional confidence at position k):
  raw z          c = sigmoid(z)
  STS            c = sigmoid(z / T), T on dspark-calibrate's log grid, sequentially
  z Platt        c = sigmoid(a z + b)
  p raw          c = p                 (the draft's own probability of its token)
  p Platt        c = sigmoid(b logit(p) + c)
  z + p          c = sigmoid(alpha z + beta logit(p) + gamma)
  constant       c = the conditional acceptance rate at k on FIT (no information:
                 a reference for what ECE alone rewards)
  prefix Platt   the prefix survival S_k of "z + p, LR" mapped once more,
                 sigmoid(a_k logit(S_k) + b_k), fitted by logistic regression of
                 y_k on all labelled rounds (kept non-increasing in k)
The Brier score of the prefix survival is printed beside the ECE: a map can
lower its ECE by giving up information (the constant map has ECE near 0
in-sample), never its Brier score.
Each of z Platt, p Platt and z + p is fitted two ways:
  LR   per position, logistic regression (maximum likelihood) on the rounds whose
       first k-1 drafts were accepted, label [accepted >= k];
  ECE  sequentially, k = 1..GAMMA, minimising the prefix-survival ECE on FIT with
       the earlier positions' maps fixed (Nelder-Mead from several starts).

With --split-parity the rounds of both arguments are pooled and split by
sequence instead: odd sequence ids (prompts 1, 3, 5... of each trace file) fit,
even ones are held out, so both halves draw on the same prompt sets.

--bootstrap N resamples the HELD sequences (whole prompts, with replacement) N
times and prints the spread of the per-position acceptance rates and of the
held-out ECE of the z + p LR map: how much of the held-out error a different
draw of prompts alone would move.

usage: calibration-study.py [--json OUT] [--no-ece-fit] [--no-reference] [--split-parity]
                    [--bootstrap N] FIT.jsonl[,FIT2.jsonl...] HELD.jsonl[,HELD2.jsonl...]
"""
import json
import math
import random
import struct
import sys

BINS = 20
EPS_P = 1e-6


def f32(x):
    """x rounded to a C float, as dspark-calibrate keeps z."""
    return struct.unpack("f", struct.pack("f", x))[0]


def sigmoid(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def logit(p):
    p = min(max(p, EPS_P), 1.0 - EPS_P)
    return math.log(p / (1.0 - p))


class Round:
    __slots__ = ("z", "lp", "p", "accepted", "labelled", "seq", "key")


def read_traces(paths):
    rounds, g, temp = [], None, None
    for path in paths:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                o = json.loads(line)
                z = o["confidence"]
                if g is None:
                    g, temp = len(z), o["temperature"]
                if len(z) != g or abs(o["temperature"] - temp) > 1e-9:
                    sys.exit("calibration-study: '%s' line %d: traces mix block sizes or temperatures" % (path, lineno))
                if o["verify_len"] != g:
                    continue
                dp = o.get("draft_prob")
                if dp is None or any(v is None for v in dp):
                    sys.exit("calibration-study: '%s' line %d: no draft_prob (make traces with the CPU backend)"
                             % (path, lineno))
                r = Round()
                r.z = [f32(v) for v in z]
                r.p = dp
                r.lp = [logit(v) for v in dp]
                r.accepted = o["accepted"]
                r.seq = o["seq"]
                r.key = (path, r.seq)
                r.labelled = r.accepted if len(o["committed"]) <= r.accepted else g
                rounds.append(r)
    return rounds, g, temp


def ece(pred, lab):
    """ECE of predictions pred against 0/1 labels lab, BINS equal-width bins."""
    n = len(pred)
    if n == 0:
        return 0.0
    conf = [0.0] * BINS
    acc = [0] * BINS
    for p, y in zip(pred, lab):
        b = int(p * BINS)
        if b >= BINS:
            b = BINS - 1
        conf[b] += p
        acc[b] += y
    return sum(abs(acc[b] - conf[b]) for b in range(BINS)) / n


# ---- the maps: params -> conditional confidence from (z, logit p, p) ----

def feats(form, r, k):
    if form == "z":
        return (r.z[k],)
    if form == "p":
        return (r.lp[k],)
    if form == "zp":
        return (r.z[k], r.lp[k])
    raise ValueError(form)


def cond(form, theta, r, k):
    """Conditional confidence of round r at position k (0-based) under map form/theta."""
    if form == "const":
        return theta[0]
    if form == "raw":
        return sigmoid(r.z[k])
    if form == "praw":
        return r.p[k]
    if form == "sts":
        return sigmoid(r.z[k] / theta[0])
    x = feats(form, r, k)
    return sigmoid(sum(w * v for w, v in zip(theta, x)) + theta[-1])


def n_params(form):
    return {"raw": 0, "praw": 0, "sts": 1, "z": 2, "p": 2, "zp": 3}[form]


def survival(form, thetas, rounds, g):
    """[round][k] prefix survival for every round."""
    if form == "pp":
        base = survival("zp", thetas["base"], rounds, g)
        out = []
        for row in base:
            prev, new = 1.0, []
            for k in range(g):
                a, b = thetas["platt"][k]
                prev = min(prev, sigmoid(a * logit(row[k]) + b))
                new.append(prev)
            out.append(new)
        return out
    out = []
    for r in rounds:
        s, row = 1.0, []
        for k in range(g):
            s *= cond(form, thetas[k] if thetas else None, r, k)
            row.append(s)
        out.append(row)
    return out


def ece_per_position(form, thetas, rounds, g, brier=False):
    """ECE (or, with brier, the Brier score) of the prefix survival at every position."""
    surv = survival(form, thetas, rounds, g)
    res = []
    for k in range(g):
        pred = [surv[i][k] for i, r in enumerate(rounds) if r.labelled >= k + 1]
        lab = [1 if r.accepted >= k + 1 else 0 for r in rounds if r.labelled >= k + 1]
        if brier:
            res.append(sum((p - y) ** 2 for p, y in zip(pred, lab)) / max(len(lab), 1))
        else:
            res.append(ece(pred, lab))
    return res


# ---- fits ----

def fit_sts(rounds, g):
    """dspark-calibrate's fit: T_k on a 201-point log grid 0.05..20, sequentially."""
    thetas = []
    prev = [1.0] * len(rounds)
    for k in range(g):
        idx = [i for i, r in enumerate(rounds) if r.labelled >= k + 1]
        lab = [1 if rounds[i].accepted >= k + 1 else 0 for i in idx]
        best, bt = float("inf"), 1.0
        for j in range(201):
            T = math.exp(math.log(0.05) + (math.log(20.0) - math.log(0.05)) * j / 200.0)
            pred = [prev[i] * sigmoid(rounds[i].z[k] / T) for i in idx]
            e = ece(pred, lab)
            if e < best - 1e-12:
                best, bt = e, T
        thetas.append((bt,))
        prev = [prev[i] * sigmoid(rounds[i].z[k] / bt) for i in range(len(rounds))]
    return thetas


def logreg(X, y, l2=1e-4, iters=50):
    """Maximum-likelihood logistic regression (Newton), weights for X columns then bias."""
    d = len(X[0]) + 1
    w = [0.0] * d
    n = len(y)
    for _ in range(iters):
        grad = [0.0] * d
        hess = [[0.0] * d for _ in range(d)]
        for x, t in zip(X, y):
            xv = list(x) + [1.0]
            p = sigmoid(sum(a * b for a, b in zip(w, xv)))
            r = p - t
            s = p * (1 - p)
            for a in range(d):
                grad[a] += r * xv[a]
                for b in range(d):
                    hess[a][b] += s * xv[a] * xv[b]
        for a in range(d - 1):   # a little ridge on the weights, none on the bias
            grad[a] += l2 * n * w[a]
            hess[a][a] += l2 * n
        step = solve(hess, grad)
        w = [a - b for a, b in zip(w, step)]
        if max(abs(v) for v in step) < 1e-10:
            break
    return tuple(w)


def solve(A, b):
    """Gaussian elimination with partial pivoting (small systems)."""
    n = len(b)
    M = [row[:] + [b[i]] for i, row in enumerate(A)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(M[r][c]))
        M[c], M[piv] = M[piv], M[c]
        if abs(M[c][c]) < 1e-300:
            return [0.0] * n
        for r in range(c + 1, n):
            f = M[r][c] / M[c][c]
            for j in range(c, n + 1):
                M[r][j] -= f * M[c][j]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (M[r][n] - sum(M[r][j] * x[j] for j in range(r + 1, n))) / M[r][r]
    return x


def fit_lr(form, rounds, g):
    thetas = []
    for k in range(g):
        sel = [r for r in rounds if r.accepted >= k and r.labelled >= k + 1]
        X = [feats(form, r, k) for r in sel]
        y = [1 if r.accepted >= k + 1 else 0 for r in sel]
        thetas.append(logreg(X, y))
    return thetas


def fit_const(rounds, g):
    out = []
    for k in range(g):
        sel = [r for r in rounds if r.accepted >= k and r.labelled >= k + 1]
        out.append((sum(r.accepted >= k + 1 for r in sel) / max(len(sel), 1),))
    return out


def fit_prefix_platt(rounds, g, base):
    """Platt map of the prefix survival of the z + p map (base), per position."""
    surv = survival("zp", base, rounds, g)
    platt = []
    for k in range(g):
        idx = [i for i, r in enumerate(rounds) if r.labelled >= k + 1]
        X = [(logit(surv[i][k]),) for i in idx]
        y = [1 if rounds[i].accepted >= k + 1 else 0 for i in idx]
        platt.append(logreg(X, y))
    return {"base": base, "platt": platt}


def nelder_mead(f, x0, step, iters=400, tol=1e-9):
    d = len(x0)
    pts = [list(x0)]
    for i in range(d):
        x = list(x0)
        x[i] += step[i]
        pts.append(x)
    vals = [f(x) for x in pts]
    for _ in range(iters):
        order = sorted(range(d + 1), key=lambda i: vals[i])
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if vals[-1] - vals[0] < tol and max(abs(pts[-1][j] - pts[0][j]) for j in range(d)) < 1e-7:
            break
        cen = [sum(p[j] for p in pts[:-1]) / d for j in range(d)]
        xr = [cen[j] + (cen[j] - pts[-1][j]) for j in range(d)]
        fr = f(xr)
        if fr < vals[0]:
            xe = [cen[j] + 2 * (cen[j] - pts[-1][j]) for j in range(d)]
            fe = f(xe)
            if fe < fr:
                pts[-1], vals[-1] = xe, fe
            else:
                pts[-1], vals[-1] = xr, fr
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = [cen[j] + 0.5 * (pts[-1][j] - cen[j]) for j in range(d)]
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                for i in range(1, d + 1):
                    pts[i] = [pts[0][j] + 0.5 * (pts[i][j] - pts[0][j]) for j in range(d)]
                    vals[i] = f(pts[i])
    i = min(range(d + 1), key=lambda i: vals[i])
    return pts[i], vals[i]


def fit_ece(form, rounds, g, starts, restarts=6, seed=1):
    """Sequential prefix-ECE minimisation, starting from each position's LR fit
    (starts) and perturbations of it; keeps the lowest in-sample ECE."""
    rng = random.Random(seed)
    thetas = []
    prev = [1.0] * len(rounds)
    for k in range(g):
        idx = [i for i, r in enumerate(rounds) if r.labelled >= k + 1]
        lab = [1 if rounds[i].accepted >= k + 1 else 0 for i in idx]
        X = [feats(form, rounds[i], k) for i in idx]
        pv = [prev[i] for i in idx]

        def obj(th):
            pred = [q * sigmoid(sum(w * v for w, v in zip(th, x)) + th[-1]) for q, x in zip(pv, X)]
            return ece(pred, lab)

        cands = [list(starts[k])]
        for _ in range(restarts):
            cands.append([v + rng.gauss(0, 0.5) * max(abs(v), 0.5) for v in starts[k]])
        best, bv = None, float("inf")
        for c in cands:
            x, v = nelder_mead(obj, c, [0.3 * max(abs(t), 0.3) for t in c])
            if v < bv - 1e-12:
                best, bv = x, v
        thetas.append(tuple(best))
        prev = [prev[i] * cond(form, best, rounds[i], k) for i in range(len(rounds))]
    return thetas


def base_rates(rounds, g):
    """P(y_k = 1) and the conditional acceptance rate per position."""
    pr, cr = [], []
    for k in range(g):
        lab = [r for r in rounds if r.labelled >= k + 1]
        pr.append(sum(r.accepted >= k + 1 for r in lab) / max(len(lab), 1))
        sel = [r for r in rounds if r.accepted >= k and r.labelled >= k + 1]
        cr.append((sum(r.accepted >= k + 1 for r in sel) / max(len(sel), 1), len(sel)))
    return pr, cr


def noise_floor(form, thetas, rounds, g, reps=20, seed=7):
    """Mean ECE of the map's own predictions against labels drawn from them (a
    perfectly calibrated predictor on this many rounds): the finite-sample floor.
    Labels are drawn as a chain: y_k ~ Bernoulli(c_k) given y_{k-1} = 1."""
    rng = random.Random(seed)
    surv = survival(form, thetas, rounds, g)
    tot = [0.0] * g
    for _ in range(reps):
        acc = []
        for row in surv:
            a, s_prev = 0, 1.0
            for k in range(g):
                c = row[k] / s_prev if s_prev > 0 else 0.0
                if rng.random() < c:
                    a += 1
                    s_prev = row[k]
                else:
                    break
            acc.append(a)
        for k in range(g):
            pred = [surv[i][k] for i, r in enumerate(rounds) if r.labelled >= k + 1]
            lab = [1 if acc[i] >= k + 1 else 0 for i, r in enumerate(rounds) if r.labelled >= k + 1]
            tot[k] += ece(pred, lab)
    return [t / reps for t in tot]


def bootstrap(form, thetas, rounds, g, n, seed=3):
    """Resample whole sequences of rounds n times: per position, the spread of
    P(y_k = 1) and of the conditional acceptance rate, and the ECE of the map."""
    rng = random.Random(seed)
    by_seq = {}
    for r in rounds:
        by_seq.setdefault(r.key, []).append(r)
    keys = sorted(by_seq)
    pr, cr, ec = [[] for _ in range(g)], [[] for _ in range(g)], [[] for _ in range(g)]
    for _ in range(n):
        sample = [r for _k in keys for r in by_seq[rng.choice(keys)]]
        p_rates, c_rates = base_rates(sample, g)
        e = ece_per_position(form, thetas, sample, g)
        for k in range(g):
            pr[k].append(p_rates[k])
            cr[k].append(c_rates[k][0])
            ec[k].append(e[k])
    return len(keys), pr, cr, ec


def sd(v):
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1))


def quantile(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))]


def fmt_row(name, vals):
    return "| %s | %s | %.2f%% |" % (name, " | ".join("%.2f%%" % (100 * v) for v in vals), 100 * max(vals))


def main(argv):
    out_json, do_ece, do_ref, parity, n_boot = None, True, True, False, 0
    args = []
    i = 0
    while i < len(argv):
        if argv[i] == "--json":
            out_json = argv[i + 1]
            i += 2
        elif argv[i] == "--no-ece-fit":
            do_ece = False
            i += 1
        elif argv[i] == "--no-reference":
            do_ref = False
            i += 1
        elif argv[i] == "--bootstrap":
            n_boot = int(argv[i + 1])
            i += 2
        elif argv[i] == "--split-parity":
            parity = True
            i += 1
        else:
            args.append(argv[i])
            i += 1
    if len(args) != 2:
        sys.exit(__doc__.split("\n\n")[-1].strip())
    fit, g, temp = read_traces(args[0].split(","))
    held, gh, temp_h = read_traces(args[1].split(","))
    if gh != g or abs(temp_h - temp) > 1e-9:
        sys.exit("calibration-study: FIT and HELD traces differ in block size or temperature")
    if parity:
        pool = fit + held
        fit = [r for r in pool if r.seq % 2 == 1]
        held = [r for r in pool if r.seq % 2 == 0]
        print("split by sequence parity: odd sequences fit, even ones held out")
    print("sampling temperature %g, block size %d: %d FIT / %d HELD full-length rounds"
          % (temp, g, len(fit), len(held)))
    pf, cf = base_rates(fit, g)
    ph, ch = base_rates(held, g)
    hdr = "| | " + " | ".join("k=%d" % (k + 1) for k in range(g)) + " | max |"
    sep = "|" + "---|" * (g + 2)
    print("\nlabels")
    print(hdr.replace(" max |", ""))
    print(sep[:-4])
    print("| P(y_k=1) FIT | " + " | ".join("%.3f" % v for v in pf) + " |")
    print("| P(y_k=1) HELD | " + " | ".join("%.3f" % v for v in ph) + " |")
    print("| P(acc k \\| prefix) FIT | " + " | ".join("%.3f" % v for v, _ in cf) + " |")
    print("| P(acc k \\| prefix) HELD | " + " | ".join("%.3f" % v for v, _ in ch) + " |")
    print("| rounds reaching k FIT | " + " | ".join("%d" % n for _, n in cf) + " |")
    print("| rounds reaching k HELD | " + " | ".join("%d" % n for _, n in ch) + " |")

    variants = []
    variants.append(("raw z", "raw", None))
    variants.append(("STS (dspark-calibrate grid)", "sts", fit_sts(fit, g)))
    variants.append(("p raw", "praw", None))
    variants.append(("constant (FIT rates)", "const", fit_const(fit, g)))
    lr = {}
    for form, name in (("z", "z Platt"), ("p", "p Platt"), ("zp", "z + p")):
        lr[form] = fit_lr(form, fit, g)
        variants.append((name + ", LR", form, lr[form]))
        if do_ece:
            variants.append((name + ", seq. ECE", form, fit_ece(form, fit, g, lr[form])))
    variants.append(("prefix Platt of z + p LR", "pp", fit_prefix_platt(fit, g, lr["zp"])))

    results = []
    print("\nECE of the prefix survival (fitted on FIT only)")
    print("| variant, set | " + hdr[4:])
    print(sep)
    for name, form, th in variants:
        eh = ece_per_position(form, th, held, g)
        ef = ece_per_position(form, th, fit, g)
        print(fmt_row(name + ", HELD", eh))
        print(fmt_row(name + ", FIT", ef))
        bh = ece_per_position(form, th, held, g, brier=True)
        bf = ece_per_position(form, th, fit, g, brier=True)
        results.append({"variant": name, "form": form, "params": th, "held": eh, "fit": ef,
                        "brier_held": bh, "brier_fit": bf})

    print("\nBrier score of the prefix survival on HELD (lower is better; fitted on FIT only)")
    print("| variant | " + hdr[4:].replace(" max |", " mean |"))
    print(sep)
    for r in results:
        b = r["brier_held"]
        print("| %s | %s | %.4f |" % (r["variant"], " | ".join("%.4f" % v for v in b), sum(b) / g))

    print("\nfitted parameters (per position k = 1..%d)" % g)
    for r in results:
        th = r["params"]
        if isinstance(th, dict):
            th = th["platt"]
        if th:
            print("%-28s %s" % (r["variant"], "  ".join("(" + ", ".join("%.4g" % v for v in t) + ")" for t in th)))

    # reference points: the same forms fitted on HELD itself (an optimistic bound),
    # and the finite-sample floor of a perfectly calibrated predictor
    if do_ref:
        print("\nreference: fitted on HELD and scored on HELD (no transfer, in-sample bound)")
        print("| variant | " + hdr[4:])
        print(sep)
        for form, name in (("z", "z Platt"), ("p", "p Platt"), ("zp", "z + p")):
            th = fit_lr(form, held, g)
            print(fmt_row(name + ", LR on HELD", ece_per_position(form, th, held, g)))
            if do_ece:
                th = fit_ece(form, held, g, th)
                print(fmt_row(name + ", seq. ECE on HELD", ece_per_position(form, th, held, g)))
        th = fit_sts(held, g)
        print(fmt_row("STS on HELD", ece_per_position("sts", th, held, g)))
    print("\nfinite-sample floor: ECE of a calibrated predictor (labels drawn from the z + p LR map) on HELD")
    print("| | " + hdr[4:])
    print(sep)
    print(fmt_row("floor", noise_floor("zp", lr["zp"], held, g)))
    if n_boot:
        n_seq, pr, cr, ec = bootstrap("zp", lr["zp"], held, g, n_boot)
        print("\nbootstrap over the %d HELD sequences (%d resamples)" % (n_seq, n_boot))
        print(hdr.replace(" max |", ""))
        print(sep[:-4])
        print("| sd of P(y_k=1) | " + " | ".join("%.2f%%" % (100 * sd(v)) for v in pr) + " |")
        print("| sd of P(acc k \\| prefix) | " + " | ".join("%.2f%%" % (100 * sd(v)) for v in cr) + " |")
        for name, q in (("5%", 0.05), ("median", 0.5), ("95%", 0.95)):
            print("| ECE z + p LR (resampled), %s | " % name
                  + " | ".join("%.2f%%" % (100 * quantile(v, q)) for v in ec) + " |")
    sys.stdout.flush()

    if out_json:
        with open(out_json, "w") as f:
            json.dump({"temperature": temp, "block_size": g, "fit_rounds": len(fit), "held_rounds": len(held),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
