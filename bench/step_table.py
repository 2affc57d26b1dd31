#!/usr/bin/env python3
"""The step-time table of issue 5: bench-step-cuda's points beside
bench_step_hf.py's, one row per (shape, R, q).

    python3 bench/step_table.py STEP.jsonl HF.jsonl

STEP.jsonl is `bench-step-cuda --json` (invariant and cuBLAS products, the
floor of its own run); HF.jsonl is `bench_step_hf.py --out` (transformers eager
and sdpa on the same shapes). Prints a markdown table with the invariant step
against the floor and against cuBLAS, the better transformers time and how many
times faster the invariant step is; points transformers did not finish show
their status. Then one summary line per shape and overall, the same count
against transformers eager alone (the comparison issue 5 names), and, where
STEP.jsonl has the weights + KV floor (the weights and the K and V rows the
pass must read, at the same copy bandwidth), the points where a tenth of the
transformers time is below that floor: there no engine can be 10x faster.
"""
import json
import sys


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    ours = [p for p in read_jsonl(argv[1]) if "invariant_ms" in p]
    best = {}       # (model, R, q) -> (ms, impl)
    eager = {}      # (model, R, q) -> ms of transformers eager
    status = {}     # (model, R, q) -> the status of points that did not finish
    for p in read_jsonl(argv[2]):
        if p.get("kind") != "point":
            continue
        key = (p["model"], p["R"], p["q"])
        if p.get("status") == "ok":
            if key not in best or p["ms"] < best[key][0]:
                best[key] = (p["ms"], p["impl"])
            if p["impl"] == "eager":
                eager[key] = p["ms"]
        else:
            status.setdefault(key, p.get("status", "?"))
    with_kv = any("memory_floor_ms" in p for p in ours)
    kv_head, kv_rule = (" weights + KV floor ms |", "---|") if with_kv else ("", "")
    print("| shape | R | q | tokens | invariant ms | cuBLAS ms | floor ms | invariant / floor "
          f"| invariant / cuBLAS |{kv_head} best transformers ms | transformers / invariant |")
    print(f"|---|---|---|---|---|---|---|---|---|{kv_rule}---|---|")
    speedups = {}
    eager_speedups = []
    below_floor = []   # points where transformers / 10 is under the weights + KV floor
    for p in ours:
        key = (p["model"], p["R"], p["q"])
        inv, cub, floor = p["invariant_ms"], p.get("cublas_ms", -1.0), p["floor_ms"]
        cub_s = f"{cub:.3f}" if cub > 0 else "-"
        ratio_s = f"{inv / cub:.2f}" if cub > 0 else "-"
        mem = p.get("memory_floor_ms")
        kv_s = (f" {mem:.3f} |" if mem is not None else " - |") if with_kv else ""
        if key in eager:
            eager_speedups.append(eager[key] / inv)
        if key in best:
            hf_ms, impl = best[key]
            if mem is not None and hf_ms / 10 < mem:
                below_floor.append(f"{p['model']} R {p['R']} q {p['q']}")
            speed = hf_ms / inv
            speedups.setdefault(p["model"], []).append(speed)
            hf_s, speed_s = f"{hf_ms:.1f} ({impl})", f"{speed:.1f}"
        else:
            hf_s, speed_s = status.get(key, "not run"), "-"
        print(f"| {p['model']} | {p['R']} | {p['q']} | {p['tokens']} | {inv:.3f} | {cub_s} | {floor:.3f} "
              f"| {inv / floor:.2f} | {ratio_s} |{kv_s} {hf_s} | {speed_s} |")
    print()
    every = [s for v in speedups.values() for s in v]
    for model, v in speedups.items():
        print(f"- {model}: {min(v):.1f}-{max(v):.1f}x faster than transformers; at least 10x at "
              f"{sum(s >= 10 for s in v)} of {len(v)} points")
    if every:
        print(f"- all: {min(every):.1f}-{max(every):.1f}x; at least 10x at {sum(s >= 10 for s in every)} "
              f"of {len(every)} points")
    if eager_speedups:
        print(f"- against transformers eager alone: {min(eager_speedups):.1f}-{max(eager_speedups):.1f}x; at "
              f"least 10x at {sum(s >= 10 for s in eager_speedups)} of {len(eager_speedups)} points")
    if with_kv:
        print(f"- a tenth of the transformers time is under the weights + KV floor at {len(below_floor)} of "
              f"{len(every)} points" + (": " + ", ".join(below_floor) if below_floor else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
