#!/usr/bin/env python3
"""Single-thread encode throughput of Hugging Face `tokenizers` (the
counterpart of bench-tokenizer).

Every turn of every line ({"turns": [str, ...]}) of the files is encoded once
per run, one string at a time (Tokenizer.encode(text, add_special_tokens=False)),
with TOKENIZERS_PARALLELISM=false; one warm-up pass first. Prints the median
run as MB/s (bytes of UTF-8) and tokens/s; with --json, one JSON object.

    python3 bench/bench_tokenizer_hf.py --tokenizer tokenizer.json [--runs N] [--json] FILE.jsonl...
"""
import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def load_turns(paths):
    texts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                turns = obj.get("turns") if isinstance(obj, dict) else None
                if not isinstance(turns, list):
                    sys.exit(f"bench_tokenizer_hf: {p}:{n}: no \"turns\" array")
                texts.extend(t for t in turns if isinstance(t, str))
    return texts


def main():
    ap = argparse.ArgumentParser(description="Single-thread encode throughput of Hugging Face tokenizers.")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json, or a directory holding one")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("files", nargs="+", help="JSONL files with a \"turns\" list per line")
    args = ap.parse_args()
    if args.runs < 1:
        sys.exit("bench_tokenizer_hf: --runs must be at least 1")
    try:
        import tokenizers
        from tokenizers import Tokenizer
    except ImportError as e:
        sys.exit(f"bench_tokenizer_hf: cannot import the Hugging Face `tokenizers` package: {e}")

    path = args.tokenizer
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    texts = load_turns(args.files)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(path)
    load_s = time.perf_counter() - t0

    times = []
    tokens = 0
    for r in range(-1, args.runs):
        n = 0
        s = time.perf_counter()
        for t in texts:
            n += len(tok.encode(t, add_special_tokens=False).ids)
        e = time.perf_counter() - s
        if r >= 0:
            times.append(e)
        tokens = n
    med = statistics.median(times)
    res = {
        "impl": f"hf-tokenizers-{tokenizers.__version__}",
        "texts": len(texts),
        "bytes": nbytes,
        "tokens": tokens,
        "runs": args.runs,
        "median_s": round(med, 6),
        "best_s": round(min(times), 6),
        "mb_per_s": round(nbytes / med / 1e6, 3),
        "tokens_per_s": round(tokens / med),
        "load_s": round(load_s, 3),
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['impl']}: {len(texts)} texts, {nbytes} bytes, {tokens} tokens; median of {args.runs} runs "
              f"{med:.4f} s (best {min(times):.4f} s): {res['mb_per_s']:.2f} MB/s, {res['tokens_per_s']} tokens/s "
              f"(load {load_s:.2f} s)")


if __name__ == "__main__":
    main()
