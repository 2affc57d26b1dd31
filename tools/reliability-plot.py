#!/usr/bin/env python3
"""Reliability diagrams of a draft's prefix survival from engine traces.

Reads dspark-generate --trace files (--spec fixed:GAMMA, one sampling
temperature; CPU traces carry "draft_prob") and the draft's sts.json, and
draws one panel per confidence map: raw sigma(z), the STS temperatures of that
temperature, and the (z, p) map where sts.json has one. Rounds, labels and the
20-bin ECE follow cli/dspark-calibrate.c. Score traces the fit never saw.

usage: reliability-plot.py --sts DRAFT/sts.json --out FILE.png [--title TEXT] [--floor N] TRACE.jsonl...
--floor N also prints, per map and position, the ECE that a perfectly calibrated
predictor would show on these rounds: labels drawn N times from the map's own
conditional confidences (mean and 95th percentile).
Needs matplotlib (Debian: python3-matplotlib).
"""
import argparse
import json
import math
import random
import sys

BINS = 20


def sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def read(paths):
    rounds, temp = [], None
    for path in paths:
        for line in open(path):
            o = json.loads(line)
            z, g = o["confidence"], len(o["confidence"])
            if o["verify_len"] != g or z[0] is None:
                continue
            temp = o["temperature"] if temp is None else temp
            if abs(o["temperature"] - temp) > 1e-9:
                sys.exit("reliability-plot.py: the traces mix sampling temperatures")
            p = o.get("draft_prob")
            acc = o["accepted"]
            labelled = acc if len(o["committed"]) <= acc else g
            rounds.append((z, p if p and None not in p else None, acc, labelled))
    if not rounds:
        sys.exit("reliability-plot.py: no full-length rounds with confidences")
    return rounds, temp


def ece_bins(pred, lab):
    n, conf, acc = [0] * BINS, [0.0] * BINS, [0.0] * BINS
    for p, y in zip(pred, lab):
        b = min(int(p * BINS), BINS - 1)
        n[b] += 1
        conf[b] += p
        acc[b] += y
    e = sum(abs(acc[b] - conf[b]) for b in range(BINS)) / max(len(pred), 1)
    pts = [(conf[b] / n[b], acc[b] / n[b]) for b in range(BINS) if n[b] >= 10]
    return e, pts


def floor_table(name, rounds, f, g, reps):
    """ECE of labels drawn from the map's own conditionals: what calibration alone would show."""
    rng = random.Random(5)
    conds = [[f(z, p, k) for k in range(g)] for z, p, acc, lab in rounds]
    sims = [[] for _ in range(g)]
    for _ in range(reps):
        drawn = []
        for c in conds:
            n = 0
            while n < g and rng.random() < c[n]:
                n += 1
            drawn.append(n)
        for k in range(g):
            sel = [i for i, r in enumerate(rounds) if r[3] >= k + 1]
            surv = [math.prod(conds[i][:k + 1]) for i in sel]
            sims[k].append(ece_bins(surv, [1 if drawn[i] >= k + 1 else 0 for i in sel])[0])
    print("%s: finite-sample floor, mean (95th percentile), k = 1..%d: %s" % (
        name, g, "  ".join("%.2f (%.2f)" % (100 * sum(s) / reps, 100 * sorted(s)[int(0.95 * reps)]) for s in sims)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--sts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--floor", type=int, default=0)
    a = ap.parse_args()
    rounds, temp = read(a.traces)
    sts = json.load(open(a.sts))
    key = min(sts["temperatures"], key=lambda k: abs(float(k) - temp))
    temps = sts["temperatures"][key]
    g = len(rounds[0][0])
    maps = {"raw": lambda z, p, k: sigmoid(z[k]), "STS": lambda z, p, k: sigmoid(z[k] / temps[k])}
    m = sts.get("maps", {}).get(key)
    if m and all(r[1] for r in rounds):
        def zp(z, p, k):
            q = min(max(p[k], 1e-6), 1 - 1e-6)
            return sigmoid(m[k][0] * z[k] + m[k][1] * math.log(q / (1 - q)) + m[k][2])
        maps["(z, p) map"] = zp
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 4.6), sharey=True)
    for ax, (name, f) in zip(axes, maps.items()):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        surv = []
        for z, p, acc, lab in rounds:
            s, row = 1.0, []
            for k in range(g):
                s *= f(z, p, k)
                row.append(s)
            surv.append(row)
        worst = 0
        for k in range(g):
            sel = [i for i, r in enumerate(rounds) if r[3] >= k + 1]
            e, pts = ece_bins([surv[i][k] for i in sel], [1 if rounds[i][2] >= k + 1 else 0 for i in sel])
            worst = max(worst, e)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, lw=1,
                    label="k=%d ECE %.1f%%" % (k + 1, 100 * e))
        if a.floor > 0:
            floor_table(name, rounds, f, g, a.floor)
        ax.set_title("%s %s (worst %.1f%%)" % (a.title, name, 100 * worst))
        ax.set_xlabel("predicted prefix survival")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("observed prefix acceptance")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print("reliability-plot.py: %d rounds at temperature %g, wrote %s" % (len(rounds), temp, a.out))


if __name__ == "__main__":
    main()
