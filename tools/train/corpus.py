"""Stage 1: the code corpus.

Collects the Python source files installed on this host (the standard library and
the site-packages of every installed distribution), keeps those whose licence is
permissive, filters and deduplicates them, shuffles them by seed and splits off a
held-out part.  The manifest records what was used and under which licence.
"""
import hashlib
import importlib.metadata as md
import os
import random
import re
import sys
import sysconfig

# Licence words we accept, and words that make us leave a package out.  A package
# whose metadata names no permissive licence is left out as "unknown".
PERMISSIVE = re.compile(r"\b(MIT|BSD|0BSD|Apache|PSF|Python Software Foundation|ISC|Unlicense|"
                        r"Zlib|CC0|HPND|Historical Permission|Python-2\.0)\b", re.I)
RESTRICTIVE = re.compile(r"\b(L|A)?GPL|\bMPL|Mozilla|\bEPL|Eclipse|CDDL|\bEUPL|copyleft|"
                         r"Proprietary|Commercial", re.I)
# Text that the tokenizer would turn into special tokens: files holding it are dropped.
SPECIAL_TEXT = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<think>", "</think>")

MIN_BYTES, MAX_BYTES = 256, 200_000
MAX_LINE, MAX_MEAN_LINE = 1000, 100


def licence_of(dist):
    """Return (licence text, accepted) from a distribution's METADATA."""
    meta = dist.metadata
    parts = []
    expr = meta.get("License-Expression")
    lic = meta.get("License")
    if expr:
        parts.append(expr.strip())
    elif lic and lic.strip() and lic.strip().upper() != "UNKNOWN":
        parts.append(lic.strip().splitlines()[0][:120])
    for c in meta.get_all("Classifier") or []:
        if c.startswith("License ::"):
            parts.append(c.split("::")[-1].strip())
    text = "; ".join(dict.fromkeys(parts)) or "unknown"
    ok = bool(PERMISSIVE.search(text)) and not RESTRICTIVE.search(text)
    return text, ok


def dist_files(dist):
    """The files of a distribution: its RECORD, else the packages named in top_level.txt."""
    if dist.files:
        return dist.files
    files = []
    for top in (dist.read_text("top_level.txt") or "").split():
        root = str(dist.locate_file(top))
        for r, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            files += [os.path.join(r, n) for n in sorted(names)]
        if os.path.isfile(root + ".py"):
            files.append(root + ".py")
    return files


def find_sources():
    """List (source name, version, licence, accepted, [paths]) for stdlib and distributions."""
    sources = []
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    sources.append(("python-stdlib", sys.version.split()[0], "PSF-2.0", True, paths))
    seen = set()
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        name = dist.metadata.get("Name")
        if not name or name.lower() in seen:
            continue
        seen.add(name.lower())
        text, ok = licence_of(dist)
        paths = sorted(str(dist.locate_file(f)) for f in dist_files(dist) if str(f).endswith(".py"))
        if paths:
            sources.append((name, dist.version, text, ok, paths))
    return sources


def read_source(path):
    """Return the file's text, or None with the reason it was dropped."""
    try:
        size = os.path.getsize(path)
        if size < MIN_BYTES or size > MAX_BYTES:
            return None, "size"
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None, "unreadable or not utf-8"
    text = text.replace("\r\n", "\n")
    if "\x00" in text or any(s in text for s in SPECIAL_TEXT):
        return None, "binary or special-token text"
    lines = text.split("\n")
    if max(map(len, lines)) > MAX_LINE or len(text) / len(lines) > MAX_MEAN_LINE:
        return None, "long lines"
    return text, None


def build(seed, max_mb, max_mb_per_source, holdout_frac, log=print):
    """Return (train texts, held-out texts, manifest)."""
    rng = random.Random(seed)
    hashes = set()
    docs = []                           # (source index, text)
    manifest = {"seed": seed, "python": sys.version.split()[0],
                "filters": {"bytes": [MIN_BYTES, MAX_BYTES], "max_line": MAX_LINE,
                            "max_mean_line": MAX_MEAN_LINE, "dedup": "sha256 of the file",
                            "max_mb": max_mb, "max_mb_per_source": max_mb_per_source,
                            "licence_rule": "keep a source only if its licence is permissive"},
                "sources": []}
    for name, version, lic, ok, paths in find_sources():
        entry = {"name": name, "version": version, "licence": lic, "used": ok,
                 "files_found": len(paths), "files_used": 0, "bytes_used": 0, "files_heldout": 0}
        manifest["sources"].append(entry)
        if not ok:
            entry["reason"] = "licence not known to be permissive"
            continue
        paths = list(paths)
        rng.shuffle(paths)
        budget = int(max_mb_per_source * 1e6)
        for p in paths:
            if entry["bytes_used"] >= budget:
                break
            text, _why = read_source(p)
            if text is None:
                continue
            h = hashlib.sha256(text.encode()).digest()
            if h in hashes:
                continue
            hashes.add(h)
            docs.append((len(manifest["sources"]) - 1, text))
            entry["files_used"] += 1
            entry["bytes_used"] += len(text.encode())
    rng.shuffle(docs)
    total, kept = 0, []
    for d in docs:                       # the overall cap, on a seeded shuffle
        if total >= max_mb * 1e6:
            manifest["sources"][d[0]]["files_used"] -= 1
            manifest["sources"][d[0]]["bytes_used"] -= len(d[1].encode())
            continue
        total += len(d[1].encode())
        kept.append(d)
    n_held = max(8, int(len(kept) * holdout_frac))
    held, train = kept[:n_held], kept[n_held:]
    for i, _ in held:
        manifest["sources"][i]["files_heldout"] += 1
    manifest["totals"] = {"files": len(kept), "bytes": total,
                          "train_files": len(train), "heldout_files": len(held),
                          "sources_used": sum(1 for s in manifest["sources"]
                                              if s["used"] and s["files_used"]),
                          "sources_left_out": [s["name"] for s in manifest["sources"] if not s["used"]]}
    log(f"corpus: {len(kept)} files, {total / 1e6:.1f} MB from "
        f"{manifest['totals']['sources_used']} sources; {len(held)} held out; "
        f"{len(manifest['totals']['sources_left_out'])} sources left out for their licence")
    return [t for _, t in train], [t for _, t in held], manifest


# A function header followed by a docstring: the shape of the evaluation prompts.  The
# pattern starts with the literal "def" (fast to search); the line start is checked apart.
DEF_DOC = re.compile(r'def[ \t]+\w+[ \t]*\((?:[^()]|\([^()]*\))*\)[^:\n]*:[ \t]*\n[ \t]+[rRuU]?("""|\'\'\')')


def docstring_ends(text):
    """Yield the character offsets just after each 'def ...:' + docstring (after its newline)."""
    for m in DEF_DOC.finditer(text):
        line = text.rfind("\n", 0, m.start()) + 1
        if text[line:m.start()].strip() not in ("", "async"):
            continue
        close = text.find(m.group(1), m.end())
        if close < 0:
            continue
        nl = text.find("\n", close + 3)
        if nl >= 0:
            yield nl + 1
