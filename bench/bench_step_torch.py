#!/usr/bin/env python3
"""Target step time of a compiled PyTorch Qwen3 (a second baseline beside
bench_step_hf.py): what PyTorch's own compiler reaches on the same shapes.

The step is written in plain PyTorch ops with random bf16 weights of the real
Qwen3-0.6B / -4B / -8B shapes (nothing downloaded): embedding, and per layer
RMSNorm, the fused q/k/v product, per-head q/k RMSNorm, RoPE (theta 1e6), the
new K/V rows written into a static cache of --ctx + q positions per sequence,
scaled_dot_product_attention over it (GQA), the o product, RMSNorm, the fused
gate/up product, SwiGLU and the down product; then the final norm and every
new token's logits (tied embeddings for 0.6B and 4B, as Qwen3 ties them; the
8B's separate lm_head has the same shape, so the same bytes are read).
Two forms of each point, both captured in ONE CUDA graph and timed by graph
replays (torch.cuda.Event, median of --reps):
  eager     the ops as PyTorch runs them one by one (cuBLAS products, the
            SDPA backend PyTorch picks);
  compiled  torch.compile(fullgraph=True, dynamic=False): inductor's fused
            Triton kernels around cuBLAS products and the attention kernel it
            picks (one compilation per point: tens of seconds each).
No batch invariance is asked of either. The two forms' logits are compared
(relative L2) as a sanity check: they round differently, and random weights
amplify that over the layers, so only a large difference means a wrong graph.

Also measured: the device-to-device copy bandwidth (bytes read + written per
second, as bench-step-cuda and bench_step_hf.py count it) and the parameter
bytes, which give floor_ms = parameter bytes / copy bandwidth.

Output: one JSON line per point on stdout (and in --out), then a markdown
table; --profile POINTS prints a per-kernel table (torch.profiler) of five
compiled replays for those points on stderr.

    python3 bench/bench_step_torch.py --models 4b --points 1x1,8x1,64x1 --compile 1x1,64x1
"""
import argparse
import json
import statistics
import sys
import time

T0 = time.monotonic()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_step_hf import SHAPES  # noqa: E402  (the real shapes, as the transformers baseline builds them)

DEV, DT = "cuda", torch.bfloat16


def log(msg):
    print(f"bench_step_torch [{time.monotonic() - T0:6.1f} s]: {msg}", file=sys.stderr, flush=True)


def points_arg(s):
    """"RxQ,RxQ" -> [(R, Q), ...]"""
    out = []
    for p in s.split(","):
        if p.strip():
            r, q = p.lower().split("x")
            out.append((int(r), int(q)))
    return out


def copy_bandwidth(mib):
    n = mib << 20
    a = torch.ones(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(20):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    ms = s.elapsed_time(e) / 20
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / (ms / 1e3)


def make_weights(shape, seed):
    """Random bf16 weights: (embedding [V, H], layers, final norm [H], parameter bytes)."""
    H, L, nH, nKV, hd, I, V, tied = shape
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, device=DEV, dtype=DT, generator=g) * 0.02

    def ones(n):
        return torch.ones(n, device=DEV, dtype=DT)

    emb = rnd(V, H)
    layers = [dict(n1=ones(H), wqkv=rnd((nH + 2 * nKV) * hd, H), qn=ones(hd), kn=ones(hd), wo=rnd(H, nH * hd),
                   n2=ones(H), wgu=rnd(2 * I, H), wd=rnd(H, I)) for _ in range(L)]
    nf = ones(H)
    # a separate lm_head's bytes count in the floor (the step reads the embedding's in its place)
    nbytes = 2 * (emb.numel() * (1 if tied else 2) + nf.numel() +
                  sum(t.numel() for lw in layers for t in lw.values()))
    return emb, layers, nf, nbytes


def rmsnorm(x, w, eps=1e-6):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def make_step(shape, emb, layers, nf, caches, R, q, ctx, cos, sin, mask):
    """The step for R sequences of q new tokens at positions ctx .. ctx + q - 1: ids [R, q] -> logits [R, q, V]."""
    H, L, nH, nKV, hd, I, V, _ = shape

    def step(ids):
        h = F.embedding(ids, emb)                                         # [R, q, H]
        for lw, (kc, vc) in zip(layers, caches):                          # kc, vc: [R, nKV, ctx + q, hd]
            qkv = rmsnorm(h, lw["n1"]) @ lw["wqkv"].t()                   # [R, q, (nH + 2 nKV) hd]
            qh = rmsnorm(qkv[..., : nH * hd].view(R, q, nH, hd), lw["qn"])
            k = rmsnorm(qkv[..., nH * hd: (nH + nKV) * hd].view(R, q, nKV, hd), lw["kn"])
            v = qkv[..., (nH + nKV) * hd:].view(R, q, nKV, hd)
            qh = (qh * cos + rotate_half(qh) * sin).transpose(1, 2)        # [R, nH, q, hd]
            k = (k * cos + rotate_half(k) * sin).transpose(1, 2)          # [R, nKV, q, hd]
            kc[:, :, ctx:ctx + q].copy_(k)
            vc[:, :, ctx:ctx + q].copy_(v.transpose(1, 2))
            o = F.scaled_dot_product_attention(qh, kc, vc, attn_mask=mask, enable_gqa=True)   # [R, nH, q, hd]
            h = h + o.transpose(1, 2).reshape(R, q, nH * hd) @ lw["wo"].t()
            gu = rmsnorm(h, lw["n2"]) @ lw["wgu"].t()                     # [R, q, 2 I]
            h = h + (F.silu(gu[..., :I]) * gu[..., I:]) @ lw["wd"].t()
        return rmsnorm(h, nf) @ emb.t()                                   # [R, q, V]
    return step


def time_in_graph(fn, ids, reps, profile):
    """Warm fn up on a side stream, capture one call in a CUDA graph, time `reps` replays (median ms)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(ids)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(ids)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=80),
              file=sys.stderr, flush=True)
    del graph
    return statistics.median(times), out


def run_point(args, name, shape, weights, R, q, compile_it, profile):
    H, L, nH, nKV, hd, I, V, _ = shape
    emb, layers, nf, nbytes = weights
    ctx = args.ctx
    caches = [(torch.randn(R, nKV, ctx + q, hd, device=DEV, dtype=DT),
               torch.randn(R, nKV, ctx + q, hd, device=DEV, dtype=DT)) for _ in range(L)]
    pos = torch.arange(ctx, ctx + q, device=DEV, dtype=torch.float32)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, hd, 2, device=DEV, dtype=torch.float32) / hd))
    angles = torch.outer(pos, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)                          # [q, hd]
    cos = angles.cos().to(DT)[None, :, None, :]
    sin = angles.sin().to(DT)[None, :, None, :]
    mask = None                                                           # one new token sees every position
    if q > 1:                                                             # new token i sees positions <= ctx + i
        j = torch.arange(ctx + q, device=DEV)
        mask = (j[None, :] <= (ctx + torch.arange(q, device=DEV))[:, None])[None, None]
    ids = torch.randint(0, V, (R, q), device=DEV)
    step = make_step(shape, emb, layers, nf, caches, R, q, ctx, cos, sin, mask)
    rec = dict(kind="point", model=name, R=R, q=q, ctx=ctx, param_bytes=nbytes)
    ms, out_eager = time_in_graph(step, ids, args.reps, False)
    rec["eager_ms"] = round(ms, 4)
    log(f"{name} R {R} q {q}: eager ops in one graph {ms:.3f} ms")
    if compile_it:
        if time.monotonic() - T0 > args.budget_s:
            rec["compiled_status"] = "skipped (budget)"
        else:
            t = time.monotonic()
            try:
                compiled = torch.compile(step, dynamic=False, fullgraph=True)
                ms, out = time_in_graph(compiled, ids, args.reps, profile)
                diff = (out.float() - out_eager.float()).norm() / out_eager.float().norm()
                rec.update(compiled_ms=round(ms, 4), compile_s=round(time.monotonic() - t, 1),
                           compiled_vs_eager_rel_l2=round(diff.item(), 5), compiled_status="ok")
                log(f"{name} R {R} q {q}: compiled in one graph {ms:.3f} ms (compiled in {time.monotonic() - t:.0f} s)")
            except Exception as e:  # report and go on with the next point
                rec["compiled_status"] = f"error: {str(e)[:300]}"
                log(f"{name} R {R} q {q}: compile failed: {e}")
    del caches, step
    torch.cuda.empty_cache()
    return rec


def main():
    ap = argparse.ArgumentParser(description="compiled PyTorch target step time on random Qwen3-shaped models.")
    ap.add_argument("--models", default="4b", help="comma list of %s (default: %%(default)s)" % ",".join(SHAPES))
    ap.add_argument("--points", default="1x1,8x1,64x1", help="R x q points, eager form (default: %(default)s)")
    ap.add_argument("--compile", default="1x1", help="points also compiled (default: %(default)s; '' for none)")
    ap.add_argument("--profile", default="", help="compiled points whose kernels are listed on stderr")
    ap.add_argument("--ctx", type=int, default=1024, help="positions already cached per sequence (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays per point (default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="no compilation starts after this many seconds (default: %(default)s)")
    ap.add_argument("--copy-mib", type=int, default=1024, help="buffer for the copy bandwidth (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON lines to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_step_torch: no CUDA device", file=sys.stderr)
        return 77
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in SHAPES:
            ap.error(f"unknown model {m!r}")
    points, to_compile, to_profile = points_arg(args.points), set(points_arg(args.compile)), set(points_arg(args.profile))
    torch._dynamo.config.cache_size_limit = max(64, len(points) * 2)
    out = open(args.out, "w", encoding="utf-8") if args.out else None

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    bw = copy_bandwidth(args.copy_mib)
    emit(dict(kind="copy", bytes_per_s=bw, torch=torch.__version__, device=torch.cuda.get_device_name()))
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    for name in models:
        shape = SHAPES[name]
        weights = make_weights(shape, args.seed)
        for R, q in points:
            rec = run_point(args, name, shape, weights, R, q, (R, q) in to_compile, (R, q) in to_profile)
            rec["floor_ms"] = round(weights[3] / bw * 1e3, 4)
            emit(rec)
            rows.append(rec)
        del weights
        torch.cuda.empty_cache()

    print(f"\n# {torch.cuda.get_device_name()}, torch {torch.__version__}; copy {bw / 1e9:.0f} GB/s (read + write); "
          f"context {args.ctx}; median of {args.reps} graph replays\n")
    print("| model | R | q | eager ops in one graph ms | torch.compile in one graph ms | floor ms | eager / floor "
          "| compiled / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r.get("compiled_ms")
        cs = f"{c:.3f}" if c is not None else (r.get("compiled_status") or "-")
        cf = f"{c / r['floor_ms']:.2f}" if c is not None else "-"
        print(f"| {r['model']} | {r['R']} | {r['q']} | {r['eager_ms']:.3f} | {cs} | {r['floor_ms']:.3f} | "
              f"{r['eager_ms'] / r['floor_ms']:.2f} | {cf} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
