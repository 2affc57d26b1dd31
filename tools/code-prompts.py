#!/usr/bin/env python3
"""Raw-completion prompts from Python sources, for calibration and benchmarks.

Each prompt is a window of a source file that ends just after a function's
signature (and docstring, when it has one), as HumanEval's prompts do: up to
--lines lines before it, at most --chars characters. Files and windows are
chosen with a seeded generator, so a run is reproducible.

usage: code-prompts.py [--count N] [--seed S] [--lines L] [--chars C] DIR... > prompts.jsonl
Writes one {"prompt": TEXT, "source": PATH} object per line (dspark-generate --prompts).
"""
import argparse
import json
import os
import random
import re
import sys

DEF = re.compile(r"^(\s*)(async\s+)?def\s+\w+\s*\(")


def windows(text, lines_before, max_chars):
    """Every prompt window of one file: a def's signature (and docstring) with lines before it."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not DEF.match(line):
            continue
        end = i
        while end < len(lines) and not lines[end].rstrip().endswith(":"):
            end += 1   # a signature over several lines
        if end >= len(lines) - 1:
            continue
        nxt = lines[end + 1].strip()
        if nxt.startswith(('"""', "'''")):   # keep the docstring
            q = nxt[:3]
            j = end + 1
            if not (len(nxt) > 3 and nxt.endswith(q)):
                j += 1
                while j < len(lines) and q not in lines[j]:
                    j += 1
            end = j
        start = max(0, i - lines_before)
        text_w = "\n".join(lines[start:end + 1]) + "\n"
        while len(text_w) > max_chars and start < i:
            start += 1
            text_w = "\n".join(lines[start:end + 1]) + "\n"
        if len(text_w) <= max_chars and end + 1 < len(lines):
            out.append(text_w)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lines", type=int, default=30)
    ap.add_argument("--chars", type=int, default=1500)
    a = ap.parse_args()
    files = []
    for d in a.dirs:
        for root, dirs, names in os.walk(d):
            dirs.sort()
            files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    if not files:
        sys.exit("code-prompts.py: no .py files under " + " ".join(a.dirs))
    rng = random.Random(a.seed)
    rng.shuffle(files)
    n = 0
    for path in files:   # at most two windows per file, so that many files contribute
        try:
            text = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError):
            continue
        ws = windows(text, a.lines, a.chars)
        for w in rng.sample(ws, min(2, len(ws))):
            print(json.dumps({"prompt": w, "source": path}))
            n += 1
            if n == a.count:
                return
    print("code-prompts.py: only %d prompts found" % n, file=sys.stderr)


if __name__ == "__main__":
    main()
