#!/usr/bin/env python3
"""Target step time of Hugging Face `transformers` (the baseline column of the
GPU step-time bench).

A Qwen3ForCausalLM with random bf16 weights is built from a config (nothing is
downloaded) with the real Qwen3-0.6B / -4B / -8B shapes. For every R (sequences)
a DynamicCache is filled with random K/V so that each sequence already holds
--ctx positions; then ONE forward of R x q new tokens with past_key_values is
timed (torch.cuda.Event), the cache cropped back to --ctx after every step so
each repetition sees the same context. Warm-up --warmup steps, median of --reps.
Logits are computed for every new token (as a verify pass needs them).

Also measured in the same run: device-to-device copy bandwidth (bytes read +
bytes written per second) and, per model, the parameter bytes (sum of
numel * 2, shared tensors once), which give the weight-streaming floor
floor_ms = param_bytes / copy bandwidth.

Output: one JSON line per point (and one per model, one for the copy
bandwidth, one header line) on stdout and in --out, then a markdown table.
Points that run out of memory print status "oom"; points that do not fit the
per-point or whole-run time budget print "skipped"; other failures "error"
with the exception text. The run stops starting new work once --budget-s
(counted from process start, imports included) is nearly used up.

    python3 bench/bench_step_hf.py --out hf-step.jsonl
    python3 bench/bench_step_hf.py --models 4b --rs 1,8,32,64,128,256 --qs 1,4,8 \\
        --impl eager,sdpa --reps 5 --budget-s 280 --out hf-step-4b.jsonl
"""
import time

T0 = time.monotonic()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name: (hidden, layers, heads, kv heads, head_dim, intermediate, vocab, tied)
SHAPES = {
    "0.6b": (1024, 28, 16, 8, 128, 3072, 151936, True),
    "4b": (2560, 36, 32, 8, 128, 9728, 151936, True),
    "8b": (4096, 36, 32, 8, 128, 12288, 151936, False),
}

# seconds kept in reserve at the end of the budget for cleanup and the table
END_MARGIN_S = 4.0


def log(msg):
    print(f"bench_step_hf: {msg}", file=sys.stderr, flush=True)


def int_list(s):
    return [int(x) for x in s.split(",") if x.strip()]


def str_list(s):
    return [x.strip() for x in s.split(",") if x.strip()]


class Bench:
    def __init__(self, args, torch):
        self.args = args
        self.torch = torch
        self.deadline = T0 + args.budget_s
        self.records = []
        self.out = open(args.out, "w", encoding="utf-8") if args.out else None

    def left(self):
        return self.deadline - time.monotonic()

    def emit(self, rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()
        self.records.append(rec)

    def is_oom(self, e):
        oom_cls = getattr(self.torch.cuda, "OutOfMemoryError", None)
        return (oom_cls is not None and isinstance(e, oom_cls)) or "out of memory" in str(e).lower()

    def free(self):
        gc.collect()
        try:
            self.torch.cuda.synchronize()
        except Exception:  # a sticky CUDA error is reported by the next point
            pass
        self.torch.cuda.empty_cache()

    # ---- device copy bandwidth ----

    def copy_bandwidth(self):
        torch = self.torch
        n = self.args.copy_mib << 20
        a = torch.empty(n, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        a.fill_(1)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        iters = 20
        s.record()
        for _ in range(iters):
            b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        ms = s.elapsed_time(e) / iters
        del a, b
        self.free()
        return 2 * n / (ms / 1e3)  # bytes read + written per second

    # ---- model ----

    def build_model(self, name, impl):
        torch = self.torch
        from transformers import Qwen3Config, Qwen3ForCausalLM

        hidden, layers, heads, kv_heads, head_dim, inter, vocab, tied = SHAPES[name]
        kw = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            hidden_act="silu",
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=tied,
            use_cache=True,
            attention_bias=False,
            attn_implementation=impl,
        )
        try:
            cfg = Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw)
        except (TypeError, ValueError):
            cfg = Qwen3Config(rope_theta=1e6, **kw)
        if getattr(cfg, "rope_theta", None) not in (None, 1e6):
            try:  # an older config that ignored rope_parameters
                cfg.rope_theta = 1e6
            except Exception:
                pass

        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                model = Qwen3ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        if any(p.dtype != torch.bfloat16 for p in model.parameters()):
            model.to(torch.bfloat16)
        if any(p.device.type != "cuda" for p in model.parameters()):
            model.to("cuda")
        model.eval()
        model.requires_grad_(False)
        return model, cfg

    def set_impl(self, model, impl):
        try:
            model.set_attn_implementation(impl)
        except Exception as e:  # older versions: the layers read the config at run time
            log(f"set_attn_implementation('{impl}') failed ({e}); setting config._attn_implementation")
            model.config._attn_implementation = impl
        got = getattr(model.config, "_attn_implementation", None)
        if got != impl:
            raise RuntimeError(f"attention implementation is '{got}', wanted '{impl}'")

    # ---- KV cache ----

    def build_cache(self, cfg, R):
        torch = self.torch
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=cfg)
        except TypeError:
            cache = DynamicCache()
        shape = (R, cfg.num_key_value_heads, self.args.ctx, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
            v = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
            cache.update(k, v, i)
            del k, v
        torch.cuda.synchronize()
        self.check_cache(cache, cfg)
        return cache

    def check_cache(self, cache, cfg):
        n = int(cache.get_seq_length())
        if n != self.args.ctx:
            raise RuntimeError(f"cache holds {n} positions, expected {self.args.ctx}")
        try:
            last = int(cache.get_seq_length(cfg.num_hidden_layers - 1))
        except TypeError:  # no per-layer form: layer 0 has to do
            last = n
        if last != self.args.ctx:
            raise RuntimeError(f"last layer of the cache holds {last} positions, expected {self.args.ctx}")

    def crop_cache(self, cache, cfg):
        ctx = self.args.ctx
        if hasattr(cache, "crop"):
            cache.crop(ctx)
        elif hasattr(cache, "layers"):
            for layer in cache.layers:
                layer.keys = layer.keys[..., :ctx, :]
                layer.values = layer.values[..., :ctx, :]
        else:
            for i in range(len(cache.key_cache)):
                cache.key_cache[i] = cache.key_cache[i][..., :ctx, :]
                cache.value_cache[i] = cache.value_cache[i][..., :ctx, :]
        self.check_cache(cache, cfg)

    # ---- one point ----

    def step(self, model, cache, cfg, ids):
        torch = self.torch
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        s.record()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        e.record()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
        ms = s.elapsed_time(e)
        logits_shape = list(out.logits.shape)
        del out
        self.crop_cache(cache, cfg)
        return ms, wall, logits_shape

    def point(self, model, cache, cfg, base, R, q):
        torch = self.torch
        args = self.args
        rec = dict(base, kind="point", R=R, q=q, ctx=args.ctx, tokens=R * q)
        avail = min(args.point_budget_s, self.left() - END_MARGIN_S)
        if avail <= 0:
            rec.update(status="skipped", reason="run budget used up")
            return rec
        t_start = time.monotonic()
        ids = torch.randint(0, cfg.vocab_size, (R, q), device="cuda")
        est = None
        for _ in range(args.warmup):
            _, est, shape = self.step(model, cache, cfg, ids)
            if shape[:2] != [R, q]:
                raise RuntimeError(f"logits shape {shape}, expected [{R}, {q}, vocab]")
            if time.monotonic() - t_start + est / 1e3 > avail:
                rec.update(status="skipped", reason=f"step {est:.1f} ms (warm-up) exceeds the time left "
                           f"for this point ({avail:.1f} s)", warm_ms=round(est, 3))
                return rec
        reps = args.reps
        if est is not None:
            room = avail - (time.monotonic() - t_start)
            reps = max(0, min(reps, int(room / (est / 1e3))))
            if reps < 1:
                rec.update(status="skipped", reason="no time left for a timed step", warm_ms=round(est, 3))
                return rec
        times, walls = [], []
        for _ in range(reps):
            if times and time.monotonic() - t_start + walls[-1] / 1e3 > avail:
                break
            ms, wall, _ = self.step(model, cache, cfg, ids)
            times.append(ms)
            walls.append(wall)
        med = statistics.median(times)
        rec.update(
            status="ok",
            reps=len(times),
            ms=round(med, 4),
            ms_min=round(min(times), 4),
            ms_max=round(max(times), 4),
            wall_ms=round(statistics.median(walls), 4),
            tok_s=round(R * q / (med / 1e3), 1),
        )
        if len(times) < args.reps:
            rec["reps_reduced"] = True
        return rec

    def fail(self, rec, e):
        rec.update(status="oom" if self.is_oom(e) else "error", error=f"{type(e).__name__}: {e}"[:2000])
        return rec

    # ---- one model ----

    def run_model(self, name, copy_bps):
        torch = self.torch
        args = self.args
        base = {"model": name}
        if self.left() < max(args.model_min_s, END_MARGIN_S + 1):
            self.emit(dict(base, kind="model", status="skipped", reason="run budget used up"))
            return
        t = time.monotonic()
        model = cfg = None
        try:
            model, cfg = self.build_model(name, args.impl[0])
        except Exception as e:
            self.emit(self.fail(dict(base, kind="model"), e))
            model = cfg = None
            self.free()
            return
        params = list(model.parameters())  # shared (tied) tensors once
        param_bytes = sum(p.numel() * 2 for p in params)
        emb = model.get_input_embeddings().weight
        out_emb = model.get_output_embeddings()
        tied = out_emb is not None and out_emb.weight.data_ptr() == emb.data_ptr()
        embed_bytes = emb.numel() * 2
        # the embedding table is only gathered from unless it is also the lm_head
        streamed_bytes = param_bytes - (0 if tied else embed_bytes)
        floor_ms = param_bytes / copy_bps * 1e3 if copy_bps else None
        base.update(param_bytes=param_bytes, floor_ms=round(floor_ms, 4) if floor_ms else None)
        self.emit(dict(
            base,
            kind="model",
            status="ok",
            n_params=sum(p.numel() for p in params),
            embed_bytes=embed_bytes,
            tied=tied,
            streamed_bytes=streamed_bytes,
            streamed_floor_ms=round(streamed_bytes / copy_bps * 1e3, 4) if copy_bps else None,
            build_s=round(time.monotonic() - t, 2),
            shape=dict(zip(("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab",
                            "tied_config"), SHAPES[name])),
        ))
        del params, emb, out_emb

        with torch.inference_mode():
            for R in args.rs:
                if self.left() < END_MARGIN_S + 1:
                    for impl in args.impl:
                        for q in args.qs:
                            self.emit(dict(base, kind="point", impl=impl, R=R, q=q, ctx=args.ctx, tokens=R * q,
                                           status="skipped", reason="run budget used up"))
                    continue
                cache = None
                try:
                    cache = self.build_cache(cfg, R)
                    cache_err = None
                except Exception as e:
                    cache_err = e
                    cache = None
                    self.free()
                for impl in args.impl:
                    impl_err = cache_err
                    if impl_err is None:
                        try:
                            self.set_impl(model, impl)
                        except Exception as e:
                            impl_err = e
                    for q in args.qs:
                        rec = dict(base, kind="point", impl=impl, R=R, q=q, ctx=args.ctx, tokens=R * q)
                        if impl_err is not None:
                            self.emit(self.fail(rec, impl_err))
                            continue
                        try:
                            rec = self.point(model, cache, cfg, dict(base, impl=impl), R, q)
                        except Exception as e:
                            rec = self.fail(rec, e)
                            self.free()
                            try:  # a failed step may leave some layers longer
                                self.crop_cache(cache, cfg)
                            except Exception:
                                try:
                                    cache = None
                                    self.free()
                                    cache = self.build_cache(cfg, R)
                                except Exception as e2:
                                    impl_err = cache_err = e2
                        self.emit(rec)
                        log(f"{name} {impl} R={R} q={q}: {rec['status']}"
                            + (f" {rec['ms']:.3f} ms" if rec["status"] == "ok" else ""))
                del cache
                self.free()
        del model, cfg
        self.free()

    # ---- table ----

    def table(self):
        args = self.args
        pts = {}
        models = {}
        for r in self.records:
            if r.get("kind") == "point":
                pts[(r["model"], r["impl"], r["R"], r["q"])] = r
            elif r.get("kind") == "model":
                models[r["model"]] = r
        lines = []
        hdr = ["model", "R", "q", "tokens"] + [f"{i} ms" for i in args.impl] + ["floor ms"]
        hdr += [f"{i}/floor" for i in args.impl]
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "---|" * len(hdr))
        for name in args.models:
            m = models.get(name, {})
            floor = m.get("floor_ms")
            for R in args.rs:
                for q in args.qs:
                    row = [name, str(R), str(q), str(R * q)]
                    ratios = []
                    for impl in args.impl:
                        r = pts.get((name, impl, R, q))
                        if r is None:
                            row.append(m.get("status", "-") if m.get("status") != "ok" else "-")
                            ratios.append("-")
                        elif r["status"] == "ok":
                            row.append(f"{r['ms']:.3f}")
                            ratios.append(f"{r['ms'] / floor:.1f}x" if floor else "-")
                        else:
                            row.append(r["status"])
                            ratios.append("-")
                    row.append(f"{floor:.3f}" if floor else "-")
                    lines.append("| " + " | ".join(row + ratios) + " |")
        notes = []
        for name in args.models:
            m = models.get(name)
            if m and m.get("status") == "ok":
                notes.append(f"- {name}: {m['n_params']:,} parameters, {m['param_bytes']:,} bytes bf16 "
                             f"(tied embeddings: {m['tied']}), floor {m['floor_ms']} ms "
                             f"(without the gather-only embedding table: {m['streamed_floor_ms']} ms)")
            elif m:
                notes.append(f"- {name}: {m.get('status')} {m.get('reason', m.get('error', ''))}")
        return "\n".join(lines + [""] + notes)


def main():
    ap = argparse.ArgumentParser(description="transformers target step time on random Qwen3-shaped models.")
    ap.add_argument("--models", default="0.6b,4b,8b", help="comma list of %s (default: %%(default)s)"
                    % ",".join(SHAPES))
    ap.add_argument("--rs", default="1,8,32,64,128,256", help="sequences per step (default: %(default)s)")
    ap.add_argument("--qs", default="1,4,8", help="new tokens per sequence (default: %(default)s)")
    ap.add_argument("--impl", default="eager,sdpa", help="attention implementations (default: %(default)s)")
    ap.add_argument("--ctx", type=int, default=1024, help="positions already cached per sequence (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per point (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per point, median reported (default: %(default)s)")
    ap.add_argument("--point-budget-s", type=float, default=20.0,
                    help="most seconds for one point; fewer reps or skipped beyond it (default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=280.0,
                    help="seconds for the whole run from process start (default: %(default)s)")
    ap.add_argument("--model-min-s", type=float, default=15.0,
                    help="least seconds left to start another model (default: %(default)s)")
    ap.add_argument("--copy-mib", type=int, default=2048, help="buffer for the copy bandwidth (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON lines to this file")
    args = ap.parse_args()
    args.models = str_list(args.models.lower())
    args.rs = int_list(args.rs)
    args.qs = int_list(args.qs)
    args.impl = str_list(args.impl)
    for m in args.models:
        if m not in SHAPES:
            sys.exit(f"bench_step_hf: unknown model '{m}' (known: {', '.join(SHAPES)})")
    if not args.impl or not args.rs or not args.qs:
        sys.exit("bench_step_hf: --impl, --rs and --qs must not be empty")
    if args.reps < 1 or args.warmup < 0 or args.ctx < 1 or min(args.rs) < 1 or min(args.qs) < 1:
        sys.exit("bench_step_hf: --reps, --ctx, R and q must be positive, --warmup not negative")

    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"bench_step_hf: cannot import torch/transformers: {e}")
    if not torch.cuda.is_available():
        sys.exit("bench_step_hf: no CUDA device")
    torch.manual_seed(args.seed)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args, torch)
    bench.emit({
        "kind": "meta",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0),
        "ctx": args.ctx,
        "warmup": args.warmup,
        "reps": args.reps,
        "budget_s": args.budget_s,
        "import_s": round(time.monotonic() - T0, 2),
    })
    copy_bps = None
    try:
        copy_bps = bench.copy_bandwidth()
        bench.emit({"kind": "copy_bw", "bytes": args.copy_mib << 20, "gbps": round(copy_bps / 1e9, 1),
                    "note": "bytes read + bytes written per second, device-to-device copy"})
    except Exception as e:
        bench.emit(bench.fail({"kind": "copy_bw"}, e))
    try:
        for name in args.models:
            bench.run_model(name, copy_bps)
    except KeyboardInterrupt:
        log("interrupted; printing what was measured")
    print()
    print(bench.table(), flush=True)
    if bench.out:
        bench.out.close()
    log(f"done in {time.monotonic() - T0:.1f} s")


if __name__ == "__main__":
    main()
