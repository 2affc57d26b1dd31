"""Train dspark's small model pair in one seeded run on one GPU:

  1 corpus      Python sources installed on this host (permissive licences only)
  2 tokenizer   byte-level BPE laid out as Qwen3's, with the chat and mask tokens
  3 target      Qwen3ForCausalLM trained on the corpus, exported as a HF directory
  4 distill     fresh continuations of code prompts sampled from the target
  5 drafts      a DSpark draft and a DFlash-form draft trained against the frozen
                target on those continuations, exported in DeepSpec's format
  6 sts         confidence temperatures per block position (greedy and T=1)
  7 eval        tau with full verification, DSpark vs DFlash vs n-gram lookup

Usage: recipe.py OUT [--seed N] [--quick] (see README.md).
"""
import argparse
import json
import os
import random
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch

import corpus
import draft as dmod
import spec
import sts
import target
import tok

FULL = dict(
    max_mb=160, max_mb_per_source=40, holdout_frac=0.03, vocab=4096, tok_train_mb=40,
    hidden=256, intermediate=768, layers=6, heads=8, kv_heads=4, head_dim=32, max_pos=1024,
    rope_theta=10000.0,
    target_seq=1024, target_batch=64, target_lr=2e-3, target_steps=40000, target_budget=170,
    distill_len=512, prompt_lens=(64, 96, 128, 160, 192, 256), gen_batch=8192,
    gen_max_seqs=65536, gen_budget=75, greedy_every=4, docstring_frac=0.7,
    draft_layers=3, markov_rank=256, block=7, anchors=256, draft_batch=32, draft_lr=1.5e-3,
    draft_epochs=1.0, draft_budget=150,
    sts_prompts=512, sts_new=128, eval_prompts=164, eval_new=128, spec_batch=256)
QUICK = dict(
    max_mb=6, max_mb_per_source=1.5, tok_train_mb=6, target_seq=256, target_batch=16,
    target_steps=40, target_budget=20, distill_len=192, prompt_lens=(64, 96), gen_batch=64,
    gen_max_seqs=128, gen_budget=20, anchors=32, draft_batch=8, draft_budget=20,
    sts_prompts=32, sts_new=24, eval_prompts=8, eval_new=24, spec_batch=64)
BUDGETS = ("target_budget", "gen_budget", "draft_budget")


class Run:
    """Progress lines with elapsed time, per-stage timings, and train-log.json."""

    def __init__(self, out, data):
        self.out, self.t0, self.data = out, time.time(), data
        self.data["stages"] = {}

    def log(self, msg):
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)

    @contextmanager
    def stage(self, name):
        self.log(f"== {name}")
        st, t = {}, time.time()
        self.data["stages"][name] = st
        try:
            yield st
        except BaseException as e:
            st["error"] = repr(e)
            self.save()
            raise
        st["seconds"] = round(time.time() - t, 1)
        self.data["total_seconds"] = round(time.time() - self.t0, 1)
        self.log(f"== {name} done in {st['seconds']:.1f}s")
        self.save()

    def save(self):
        with open(os.path.join(self.out, "train-log.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=float)


def settings(args):
    a = dict(FULL)
    if args.quick:
        a.update(QUICK)
    for k in BUDGETS:
        a[k] *= args.budget_scale
    a.update(seed=args.seed, quick=args.quick, draft_layers=args.draft_layers or a["draft_layers"],
             markov_rank=args.markov_rank if args.markov_rank is not None else a["markov_rank"])
    L = a["layers"]
    spread = sorted({round(1 + i * (L - 3) / 2) for i in range(3)})     # 1 .. L-2
    a["target_layer_ids"] = args.target_layer_ids or ([1, 3, 4] if L == 6 else spread)
    assert all(0 <= l < L - 1 for l in a["target_layer_ids"]), "target_layer_ids must avoid the last layer"
    return SimpleNamespace(**a)


def humaneval_path(arg):
    if arg:
        return arg if os.path.exists(arg) else None
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for p in (os.path.join(repo, "shared/data/eval/humaneval.jsonl"),
              os.path.join(repo, "../shared/data/eval/humaneval.jsonl")):
        if os.path.exists(p):
            return p
    return None


def humaneval_prompts(path):
    """The code of each HumanEval problem (the ```python block of its first turn),
    ending after its docstring: a raw completion prompt."""
    import re
    out = []
    with open(path) as f:
        for line in f:
            t = json.loads(line)["turns"][0]
            m = re.search(r"```python\n(.*?)```", t, re.S)
            out.append((m.group(1) if m else t).rstrip() + "\n")
    return out


def def_prompts(tk, texts, n, rng, per_doc=3):
    """Up to n (text window, cut) pairs ending right after a def + docstring."""
    order = list(range(len(texts)))
    rng.shuffle(order)
    cands = []
    for i in order:
        ends = list(corpus.docstring_ends(texts[i]))
        rng.shuffle(ends)
        cands += [(i, e) for e in ends[:per_doc]]
        if len(cands) >= n:
            break
    return cands[:n]


def encode_window(tk, text, e, width, eot):
    """Tokens of text[e-width:e]; a cut first token is dropped, a document start gets <|endoftext|>."""
    ids = tk.encode(text[max(0, e - width):e], add_special_tokens=False).ids
    return ids[1:] if e > width else [eot] + ids


def fixed_prompts(tk, texts, cands, P, stream, n, rng, eot):
    """n prompts of exactly P tokens: docstring ends from cands, left-filled from the packed
    stream when short (as in training windows)."""
    picks = [cands[rng.randrange(len(cands))] for _ in range(n)]
    encs = tk.encode_batch([texts[i][max(0, e - 8 * P):e] for i, e in picks], add_special_tokens=False)
    out = []
    for (i, e), enc in zip(picks, encs):
        ids = enc.ids[1:] if e > 8 * P else [eot] + enc.ids
        if len(ids) < P:
            s = rng.randrange(0, len(stream) - P)
            ids = stream[s:s + P - len(ids)].tolist() + ids
        out.append(ids[-P:])
    return out


def distill(tgt, tk, train_txt, stream_np, a, dev, R, st):
    """Generate continuations; returns (ids [N, L] int32 on dev, prompt lengths [N])."""
    rng = random.Random(a.seed + 1)
    gen = torch.Generator(device=dev).manual_seed(a.seed + 1)
    eot = tk.token_to_id("<|endoftext|>")
    cands = def_prompts(tk, train_txt, 20000 if not a.quick else 500, rng)
    st["docstring_candidates"] = len(cands)
    stream = torch.from_numpy(stream_np.astype(np.int64)).to(dev)
    seqs, plens, t0, last, b = [], [], time.time(), 0.0, 0
    n = 0
    while n < a.gen_max_seqs and (time.time() - t0) + last < a.gen_budget:
        t1 = time.time()
        P = a.prompt_lens[b % len(a.prompt_lens)]
        n_doc = int(a.gen_batch * a.docstring_frac) if cands else 0
        doc = fixed_prompts(tk, train_txt, cands, P, stream_np, n_doc, rng, eot) if n_doc else []
        starts = torch.randint(0, len(stream) - P, (a.gen_batch - n_doc,), generator=gen, device=dev)
        rnd = stream[starts[:, None] + torch.arange(P, device=dev)]
        prompts = torch.cat([torch.tensor(doc, dtype=torch.long, device=dev).view(-1, P), rnd])
        greedy = (b % a.greedy_every) == a.greedy_every - 1
        cont = target.generate(tgt, prompts, a.distill_len - P, greedy, gen)
        seqs.append(torch.cat([prompts, cont], 1).to(torch.int32))
        plens.append(torch.full((len(prompts),), P, device=dev))
        n += len(prompts)
        b += 1
        last = time.time() - t1
        R.log(f"  distill batch {b}: {len(prompts)} x ({P} + {a.distill_len - P}) "
              f"{'greedy' if greedy else 'T=1'} in {last:.1f}s")
    st.update(sequences=n, batches=b, seq_len=a.distill_len, greedy_share=
              sum(1 for i in range(b) if i % a.greedy_every == a.greedy_every - 1) / max(1, b))
    return torch.cat(seqs), torch.cat(plens)


def new_draft(tcfg, a, mask_id, dspark, dev):
    c = dmod.draft_config(tcfg, a.draft_layers, a.target_layer_ids, a.block, mask_id,
                          a.markov_rank if dspark else 0, dspark and a.markov_rank >= 0,
                          a.anchors)
    return dmod.Draft(c).to(dev)


def train_drafts(tap, tgt, drafts, data, plens, a, dev, R, st):
    """Train the drafts side by side on the same batches and anchors."""
    emb_w, lm_w = tgt.model.embed_tokens.weight, tgt.lm_head.weight
    N, L = data.shape
    n_val = min(256, max(a.draft_batch, N // 20))
    order = torch.randperm(N, generator=torch.Generator().manual_seed(a.seed + 2)).to(dev)
    val, perm, train_n = order[:n_val], order[n_val:], N - n_val
    opts = {k: torch.optim.AdamW(d.parameters(), lr=a.draft_lr, betas=(0.9, 0.95),
                                 weight_decay=0.0) for k, (d, _) in drafts.items()}
    steps_max = max(1, int(a.draft_epochs * train_n / a.draft_batch))
    warm = max(10, min(100, int(0.04 * steps_max)))
    plan = target.Planner(steps_max, a.draft_budget, probe=10)
    gen = torch.Generator(device=dev).manual_seed(a.seed + 3)
    ac = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)
    hist = {k: [] for k in drafts}
    step, t0 = 0, time.time()

    def batch(idx):
        ids = data[idx].long()
        mask = torch.arange(L, device=dev)[None] >= plens[idx][:, None]
        return ids, mask

    while step < plan.total:
        idx = perm[(torch.arange(a.draft_batch, device=dev) + step * a.draft_batch) % train_n]
        ids, mask = batch(idx)
        tlogits, feats = tap(ids)
        anchors, keep = dmod.sample_anchors(mask, a.anchors, gen)
        lr = target.lr_at(step, plan.total, warm, a.draft_lr)
        ms = {}
        for k, (d, is_dspark) in drafts.items():
            for g in opts[k].param_groups:
                g["lr"] = lr
            with ac():
                h = d.hidden(feats, ids, anchors, emb_w)
                loss, ms[k] = dmod.losses(d, h, lm_w, ids, mask, anchors, keep, tlogits, is_dspark)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
        step += 1
        plan.update(step, dev)
        if step % 50 == 0 or step == plan.total:
            for k in drafts:
                hist[k].append(dict(step=step, **{n: round(v, 4) for n, v in ms[k].items()}))
            R.log(f"  drafts step {step}/{plan.total} lr {lr:.2e} " + " | ".join(
                f"{k} loss {ms[k]['loss']:.3f} tau~{ms[k]['tau_t1_est']:.2f} top1 {ms[k]['top1_match']:.2f}"
                for k in drafts) + f" {time.time() - t0:.0f}s")
    st.update(steps=step, sequences_seen=step * a.draft_batch, train_sequences=train_n,
              epochs=round(step * a.draft_batch / train_n, 3), anchors_per_sequence=a.anchors,
              history=hist)
    # held-out distilled sequences: the same losses and estimates, no update
    for d, _ in drafts.values():
        d.eval()
    with torch.no_grad():
        res = {k: [] for k in drafts}
        for i in range(0, n_val, a.draft_batch):
            ids, mask = batch(val[i:i + a.draft_batch])
            tlogits, feats = tap(ids)
            anchors, keep = dmod.sample_anchors(mask, a.anchors, gen)
            for k, (d, is_dspark) in drafts.items():
                with ac():
                    h = d.hidden(feats, ids, anchors, emb_w)
                    res[k].append(dmod.losses(d, h, lm_w, ids, mask, anchors, keep, tlogits, is_dspark)[1])
        st["heldout"] = {k: {n: round(float(np.mean([m[n] for m in v])), 4) for n in v[0]}
                         for k, v in res.items()}
    R.log(f"  held-out distilled sequences: {st['heldout']}")


def fix_target_config(path, cfg):
    """Make sure config.json spells out every field a loader needs."""
    with open(path) as f:
        c = json.load(f)
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "max_position_embeddings", "tie_word_embeddings", "hidden_act", "attention_bias",
              "bos_token_id", "eos_token_id", "model_type"):
        if c.get(k) is None and getattr(cfg, k, None) is not None:
            c[k] = getattr(cfg, k)
    rp = c.get("rope_parameters") or {}
    c.setdefault("rope_theta", rp.get("rope_theta", getattr(cfg, "rope_theta", None)))
    c["architectures"] = ["Qwen3ForCausalLM"]
    with open(path, "w") as f:
        json.dump(c, f, indent=2)
    return c


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run with tiny steps")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="scale the time budgets of the training stages")
    p.add_argument("--humaneval", help="humaneval.jsonl for the final evaluation (found by default)")
    p.add_argument("--draft-layers", type=int)
    p.add_argument("--markov-rank", type=int)
    p.add_argument("--target-layer-ids", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--with-embeddings", action="store_true",
                   help="also store embed_tokens/lm_head in the drafts (they equal the target's)")
    args = p.parse_args()
    a = settings(args)
    os.makedirs(args.out, exist_ok=True)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    import tokenizers
    import transformers
    R = Run(args.out, {"seed": a.seed, "quick": a.quick, "settings": vars(a),
                       "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                    "transformers": transformers.__version__,
                                    "tokenizers": tokenizers.__version__},
                       "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"})
    R.log(f"seed {a.seed}{' (quick)' if a.quick else ''} on {R.data['device']}, output {args.out}")
    ac = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)
    tdir = os.path.join(args.out, "dspark-tiny-target")
    ddirs = {"dspark": os.path.join(args.out, "dspark-tiny-draft"),
             "dflash": os.path.join(args.out, "dspark-tiny-dflash")}

    with R.stage("corpus") as st:
        train_txt, held_txt, manifest = corpus.build(a.seed, a.max_mb, a.max_mb_per_source,
                                                     a.holdout_frac, R.log)
        with open(os.path.join(args.out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        st.update(manifest["totals"])
        st.pop("sources_left_out", None)

    with R.stage("tokenizer") as st:
        sample, size = [], 0
        for t in train_txt:
            if size > a.tok_train_mb * 1e6:
                break
            sample.append(t)
            size += len(t)
        tk = tok.train(sample, a.vocab)
        st.update(tok.check(tk, held_txt[:200]), vocab=tk.get_vocab_size(with_added_tokens=True),
                  trained_on_mb=round(size / 1e6, 1))
        eot, im_end, mask_id = (tk.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|mask|>"))
        train_stream = tok.pack(tok.encode_docs(tk, train_txt), eot)
        held_stream = tok.pack(tok.encode_docs(tk, held_txt), eot)
        st.update(train_tokens=int(train_stream.size), heldout_tokens=int(held_stream.size),
                  bytes_per_token=round(sum(len(t.encode()) for t in train_txt)
                                        / max(1, train_stream.size), 3))
        R.log(f"  vocab {st['vocab']}, {st['train_tokens']} train tokens "
              f"({st['bytes_per_token']} bytes/token), round-trip failures {st['roundtrip_failures']}")
    V = (tk.get_vocab_size(with_added_tokens=True) + 63) // 64 * 64

    with R.stage("target") as st:
        model = target.build(V, a, eot).to(dev)
        st["parameters"] = sum(p.numel() for p in model.parameters())
        R.log(f"  Qwen3 target: {st['parameters'] / 1e6:.2f}M parameters, vocab {V}, "
              f"attention {getattr(model.config, '_attn_implementation', '?')}")
        stream = torch.from_numpy(train_stream.astype(np.int32)).to(dev)
        held = torch.from_numpy(held_stream.astype(np.int32)).to(dev)
        st.update(target.train(model, stream, a, dev, R.log))
        st["eval_loss"] = round(target.eval_loss(model, held, a.target_seq, 64, dev), 4)
        st["train_window_loss"] = round(target.eval_loss(model, stream, a.target_seq, 64, dev), 4)
        tgt = target.inference_copy(model)
        del model
        st["eval_loss_bf16"] = round(target.eval_loss(tgt, held, a.target_seq, 64, dev), 4)
        R.log(f"  held-out loss {st['eval_loss']} (bf16 {st['eval_loss_bf16']}), "
              f"train windows {st['train_window_loss']}")
        rng = random.Random(a.seed + 7)
        cands = def_prompts(tk, held_txt, 16, rng)
        if cands:
            pr = fixed_prompts(tk, held_txt, cands, 128, train_stream, 16, rng, eot)
            out = target.generate(tgt, torch.tensor(pr, device=dev), 128, True, None).tolist()
            st["greedy_distinct_4grams"] = round(float(np.mean([target.repetition(o) for o in out])), 3)
            st["greedy_sample"] = tk.decode(pr[0][-40:]) + "<<PROMPT END>>" + tk.decode(out[0])
            R.log(f"  greedy distinct 4-grams {st['greedy_distinct_4grams']}; sample:\n"
                  + st["greedy_sample"][:600])
        os.makedirs(tdir, exist_ok=True)
        target.export(tgt, tdir, [eot, im_end], eot)
        tok.save(tk, tdir, a.max_pos)
        tcfg = fix_target_config(os.path.join(tdir, "config.json"), tgt.config)
        del stream

    with R.stage("distill") as st:
        data, plens = distill(tgt, tk, train_txt, train_stream, a, dev, R, st)

    with R.stage("drafts") as st:
        tap = target.Tap(tgt, a.target_layer_ids)
        drafts = {"dspark": (new_draft(tcfg, a, mask_id, True, dev), True),
                  "dflash": (new_draft(tcfg, a, mask_id, False, dev), False)}
        st["parameters"] = {k: sum(p.numel() for p in d.parameters()) for k, (d, _) in drafts.items()}
        R.log(f"  drafts: {st['parameters']} parameters, layers {a.draft_layers}, "
              f"target layers {a.target_layer_ids}, markov rank {a.markov_rank}, block {a.block}")
        train_drafts(tap, tgt, drafts, data, plens, a, dev, R, st)
        del data
        for k, (d, _) in drafts.items():
            os.makedirs(ddirs[k], exist_ok=True)
            emb = ((tgt.model.embed_tokens.weight, tgt.lm_head.weight) if args.with_embeddings
                   else (None, None))
            st.setdefault("tensors", {})[k] = len(dmod.export(d, ddirs[k], *emb))
        sizes = {n: dir_bytes(x) for n, x in [("target", tdir)] + list(ddirs.items())}
        st["shipped_bytes"] = dict(sizes, total=sum(sizes.values()))
        R.log(f"  shipped size {sum(sizes.values()) / 1e6:.2f} MB {sizes}"
              + ("  ** over 32 MB **" if sum(sizes.values()) > 32e6 else ""))

    emb_w, lm_w = tgt.model.embed_tokens.weight, tgt.lm_head.weight
    stops = {eot, im_end}
    rng = random.Random(a.seed + 11)
    cands = def_prompts(tk, held_txt, a.sts_prompts + a.eval_prompts, rng, per_doc=4)
    maxp = a.max_pos - max(a.sts_new, a.eval_new) - 2 * a.block - 2
    held_prompts = [encode_window(tk, held_txt[i], e, rng.randint(300, 2000), eot)[-maxp:]
                    for i, e in cands]
    held_prompts = [p for p in held_prompts if len(p) >= 16]

    def decode(prop, prompts, new, temp, seed):
        gen = torch.Generator(device=dev).manual_seed(seed)
        res = []
        for i in range(0, len(prompts), a.spec_batch):
            res.append(spec.run(tap, prop, prompts[i:i + a.spec_batch], new, temp, gen, stops,
                                a.block, eot))
        out = {"tau": sum(r["tokens"] for r in res) / max(1, sum(r["rounds"] for r in res)),
               "rounds": sum(r["rounds"] for r in res),
               "accept_rate": np.average([r["accept_rate"] for r in res], axis=0,
                                         weights=[r["rounds"] for r in res]).round(4).tolist(),
               "outputs": sum((r["outputs"] for r in res), [])}
        if "z" in res[0]:
            out.update({k: np.concatenate([r[k] for r in res]) for k in ("z", "y", "m")})
        return out

    props = {"dspark": spec.draft_proposer(drafts["dspark"][0], emb_w, lm_w, ac),
             "dflash": spec.draft_proposer(drafts["dflash"][0], emb_w, lm_w, ac),
             "ngram": spec.ngram_proposer(a.block, V)}

    with R.stage("sts") as st:
        cal = held_prompts[:a.sts_prompts]
        js = {"format": 1, "block_size": a.block, "temperatures": {}, "ece_before": {}, "ece_after": {}}
        for temp in (0, 1):
            r = decode(props["dspark"], cal, a.sts_new, float(temp), a.seed + 20 + temp)
            T, before, after = sts.calibrate(r["z"], r["y"], r["m"])
            js["temperatures"][str(temp)], js["ece_before"][str(temp)] = T, before
            js["ece_after"][str(temp)] = after
            st[f"t{temp}"] = {"rounds": int(r["rounds"]), "tau": round(r["tau"], 3),
                              "temperatures": T, "ece_before": before, "ece_after": after}
            try:
                sts.plot(os.path.join(ddirs["dspark"], f"reliability-t{temp}.png"), r["z"], r["y"],
                         r["m"], T, f"DSpark prefix survival, sampling T={temp}")
            except ImportError as e:
                R.log(f"  no reliability diagram: {e}")
            R.log(f"  T={temp}: {r['rounds']} rounds, tau {r['tau']:.2f}; ECE before {before} after {after}")
        with open(os.path.join(ddirs["dspark"], "sts.json"), "w") as f:
            json.dump(js, f, indent=1)

    with R.stage("eval") as st:
        he = humaneval_path(args.humaneval)
        if he:
            prompts = [tk.encode(t, add_special_tokens=False).ids[-maxp:] for t in humaneval_prompts(he)]
            st["prompts"] = f"HumanEval ({os.path.basename(he)}), raw code prompts"
        else:
            prompts = held_prompts[a.sts_prompts:]
            st["prompts"] = "held-out corpus prompts (HumanEval file not found)"
        prompts = prompts[:a.eval_prompts]
        st["n_prompts"], st["max_new_tokens"] = len(prompts), a.eval_new
        outs = {}
        if not prompts:
            # (the calibration took every held-out prompt the corpus gave)
            R.log("  no evaluation prompts: the HumanEval file was not found and the calibration used "
                  "every held-out prompt; pass --humaneval FILE (the models are exported)")
            st["skipped"] = "no prompts"
        else:
            for temp in (0, 1):
                for k, prop in props.items():
                    r = decode(prop, prompts, a.eval_new, float(temp), a.seed + 30 + temp)
                    st[f"{k}_t{temp}"] = {"tau": round(r["tau"], 3), "rounds": r["rounds"],
                                          "accept_rate": r["accept_rate"]}
                    outs[(k, temp)] = r["outputs"]
                    R.log(f"  T={temp} {k:6s} tau {r['tau']:.3f} accept@k {r['accept_rate']}")
            same = sum(o1 == o2 == o3 for o1, o2, o3 in zip(*(outs[(k, 0)] for k in props)))
            st["greedy_outputs_identical"] = f"{same}/{len(prompts)}"
            st["tau_ratio_t1_dspark_over_dflash"] = round(
                st["dspark_t1"]["tau"] / max(1e-9, st["dflash_t1"]["tau"]), 3)
            R.log(f"  greedy outputs identical across the three proposers: {same}/{len(prompts)}; "
                  f"T=1 tau ratio DSpark/DFlash {st['tau_ratio_t1_dspark_over_dflash']}")

    R.log("stage timings: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in R.data["stages"].items())
          + f"; total {R.data['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
