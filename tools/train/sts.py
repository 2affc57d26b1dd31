"""Sequential Temperature Scaling (dspark-spec.md section 3): per block position k,
in order, a temperature T_k for the confidence logit z_k chosen by grid search to
minimise the expected calibration error of the prefix survival prod_{i<=k} sigmoid(z_i/T_i)
against the observed prefix acceptance y_k, earlier temperatures held fixed.
"""
import numpy as np

BINS = 20
GRID = np.geomspace(0.05, 20.0, 241)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ece(p, y, bins=BINS):
    """Expected calibration error with equal-width bins; p [..., N] (leading dims batched)."""
    p = np.asarray(p, dtype=np.float64)
    if p.shape[-1] == 0:
        return np.full(p.shape[:-1], np.nan)
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    flat = p.reshape(-1, p.shape[-1])
    fidx = idx.reshape(-1, p.shape[-1])
    out = np.empty(flat.shape[0])
    for r in range(flat.shape[0]):
        sp = np.bincount(fidx[r], weights=flat[r], minlength=bins)
        sy = np.bincount(fidx[r], weights=y, minlength=bins)
        out[r] = np.abs(sp - sy).sum() / len(y)
    return out.reshape(p.shape[:-1])


def calibrate(z, y, m):
    """z, y, m [R, gamma]: confidence logits, prefix labels, valid mask.  Returns
    (temperatures, ece_before, ece_after) as lists of length gamma."""
    R, g = z.shape
    temps, before, after = [], [], []
    raw = np.ones(R)
    cal = np.ones(R)
    for k in range(g):
        v = m[:, k].astype(bool)
        yk = y[v, k].astype(np.float64)
        raw = raw * sigmoid(z[:, k])
        if v.sum() == 0:
            temps.append(1.0)
            before.append(None)
            after.append(None)
            continue
        cand = cal[None, v] * sigmoid(z[None, v, k] / GRID[:, None])    # [grid, n]
        errs = ece(cand, yk)
        t = float(GRID[int(np.argmin(errs))])
        cal = cal * sigmoid(z[:, k] / t)
        temps.append(round(t, 5))
        before.append(round(float(ece(raw[v], yk)), 5))
        after.append(round(float(ece(cal[v], yk)), 5))
    return temps, before, after


def survivals(z, temps):
    return np.cumprod(sigmoid(z / np.asarray(temps)[None]), axis=1)


def plot(path, z, y, m, temps, title):
    """Reliability diagram of the prefix survival per position, before and after STS."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for ax, (name, t) in zip(axes, [("raw", [1.0] * z.shape[1]), ("after STS", temps)]):
        s = survivals(z, t)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for k in range(z.shape[1]):
            v = m[:, k].astype(bool)
            if v.sum() == 0:
                continue
            p, yk = s[v, k], y[v, k].astype(np.float64)
            idx = np.minimum((p * BINS).astype(np.int64), BINS - 1)
            n = np.bincount(idx, minlength=BINS)
            keep = n >= 10
            mp = np.bincount(idx, weights=p, minlength=BINS)[keep] / n[keep]
            my = np.bincount(idx, weights=yk, minlength=BINS)[keep] / n[keep]
            ax.plot(mp, my, marker="o", ms=3, lw=1,
                    label=f"k={k + 1} ECE {100 * ece(p, yk):.1f}%")
        ax.set_title(f"{title}: {name}")
        ax.set_xlabel("predicted prefix survival")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("observed prefix acceptance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
