#!/usr/bin/env python3
"""Make reference fixtures for Qwen3 targets with Hugging Face transformers.

Usage: make_target_fixtures.py OUTDIR

Builds small random-weight Qwen3ForCausalLM models (seeded), saves each as a
Hugging Face directory OUTDIR/models/<name>/ and writes, under
OUTDIR/models/<name>/ref/, the logits, hidden states and greedy continuation
that transformers computes for fixed prompts (float32, CPU, eager attention).
All binary files are raw little-endian arrays with no header; shapes are in
ref.json. See README.md in this directory for the layout.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

VOCAB = 512
BOS_ID = 1
EOS_IDS = [2, 3]
PAD_ID = 0
FIRST_PROMPT_ID = 4          # prompts use ids in [4, VOCAB): no pad/bos/eos
PROMPT_LEN = 24
NEW_TOKENS = 64
N_BATCH = 16
BATCH_MIN_LEN = 5
BATCH_MAX_LEN = 40
MAX_POS = 512

# name, seed, sizes, tying, rope base, sharding (bytes per shard or None),
# stored dtype, and whether the f32 weights are rounded to bf16 values.
MODELS = [
    dict(name="tiny-tied-gqa4", seed=1001, hidden=64, layers=3, heads=8, kv_heads=2,
         head_dim=16, inter=128, tied=True, theta=1e6, shard=None,
         store="float32", bf16_exact=False),
    dict(name="tiny-untied-gqa2-hd", seed=1002, hidden=64, layers=4, heads=4, kv_heads=2,
         head_dim=32, inter=96, tied=False, theta=1e6, shard=300000,
         store="float32", bf16_exact=False),
    dict(name="tiny-mha", seed=1003, hidden=48, layers=2, heads=3, kv_heads=3,
         head_dim=24, inter=80, tied=False, theta=10000.0, shard=None,
         store="bfloat16", bf16_exact=False),
    # The draft fixtures use this one. Its weights are stored in float32 but
    # every value is exactly representable in bfloat16, so that the bf16
    # drafts carry bit-identical copies of its embedding and lm_head.
    dict(name="pair-target", seed=1004, hidden=64, layers=4, heads=4, kv_heads=2,
         head_dim=16, inter=128, tied=True, theta=1e6, shard=None,
         store="float32", bf16_exact=True),
]


def dump_json(path, obj):
    """JSON with one top-level key per line and compact values."""
    items = list(obj.items())
    with open(path, "w") as f:
        f.write("{\n")
        for i, (k, v) in enumerate(items):
            f.write("  %s: %s%s\n" % (json.dumps(k), json.dumps(v, separators=(", ", ": ")),
                                       "," if i + 1 < len(items) else ""))
        f.write("}\n")


def write_f32(path, tensor):
    """Raw little-endian float32, C order. Returns the shape."""
    arr = tensor.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    arr.tofile(path)
    return list(arr.shape)


def write_i32(path, ids):
    arr = np.asarray(ids, dtype="<i4")
    arr.tofile(path)
    return list(arr.shape)


def make_config(spec):
    return Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        head_dim=spec["head_dim"],
        hidden_act="silu",
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec["tied"],
        rope_parameters={"rope_type": "default", "rope_theta": float(spec["theta"])},
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_IDS[0],
    )


def init_weights(model, seed, bf16_exact):
    """Seeded init, wider than the default so that the layers, not the token's
    own embedding, dominate the logits (with the default init a tied model
    just repeats its input token): embeddings N(0, 0.5), untied lm_head
    N(0, 0.25), norm weights 1 + N(0, 0.1), linears N(0, 1/fan_in) with
    o_proj and down_proj doubled (N(0, 4/fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() lists a tied lm_head only once (as the embedding)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            elif name == "lm_head.weight":
                p.copy_(0.25 * noise)
            elif name.endswith("proj.weight") and p.dim() == 2:
                gain = 2.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.copy_(gain * p.shape[1] ** -0.5 * noise)
            else:
                raise RuntimeError("unexpected parameter %s" % name)
            if bf16_exact:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
        # If the tie is not (yet) in place, make the values equal anyway: the
        # saved tied checkpoint keeps only the embedding.
        if model.config.tie_word_embeddings and \
                model.lm_head.weight is not model.model.embed_tokens.weight:
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)


def random_ids(rng, n):
    return [int(x) for x in rng.randint(FIRST_PROMPT_ID, VOCAB, size=n)]


def check_saved_files(mdir, spec):
    files = sorted(os.listdir(mdir))
    if not os.path.exists(os.path.join(mdir, "config.json")):
        raise RuntimeError("%s: config.json missing" % mdir)
    if spec["shard"]:
        index_path = os.path.join(mdir, "model.safetensors.index.json")
        if not os.path.exists(index_path):
            raise RuntimeError("%s: expected a sharded checkpoint, got %s" % (mdir, files))
        with open(index_path) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
        if len(shards) < 2:
            raise RuntimeError("%s: only %d shard(s)" % (mdir, len(shards)))
        return {"sharded": True, "shards": shards}
    if not os.path.exists(os.path.join(mdir, "model.safetensors")):
        raise RuntimeError("%s: model.safetensors missing, got %s" % (mdir, files))
    return {"sharded": False, "shards": ["model.safetensors"]}


def forward_all(model, ids):
    """Logits [T, V], HF hidden_states tuple (L+1 entries of [T, H]) and the raw
    output of every decoder layer [L, T, H] (captured by hooks, i.e. before
    the final norm, also for the last layer)."""
    layers = model.model.layers
    captured = [None] * len(layers)

    def make_hook(i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured[i] = out.detach().clone()
        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            out = model(input_ids=x, attention_mask=torch.ones_like(x),
                        output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in captured):
        raise RuntimeError("a decoder layer hook did not fire")
    hs = tuple(h[0].float() for h in out.hidden_states)
    raw = torch.stack([c[0].float() for c in captured])          # [L, T, H]
    return out.logits[0].float(), hs, raw


def last_logits(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    return out.logits[0, -1].float()


def greedy_full_recompute(model, prompt, n):
    """Plain greedy loop without a KV cache; also returns top1 - top2 margins."""
    seq = list(prompt)
    ids, margins = [], []
    for _ in range(n):
        lg = last_logits(model, seq)
        top = torch.topk(lg, 2)
        nxt = int(torch.argmax(lg).item())
        ids.append(nxt)
        margins.append(float(top.values[0] - top.values[1]))
        seq.append(nxt)
    return ids, margins


def greedy_generate(model, prompt, n):
    """transformers generate(), greedy, with EOS disabled."""
    model.generation_config.eos_token_id = None
    x = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                             do_sample=False, max_new_tokens=n, pad_token_id=PAD_ID)
    new = [int(t) for t in out[0, len(prompt):].tolist()]
    if len(new) != n:
        raise RuntimeError("generate returned %d new tokens, wanted %d" % (len(new), n))
    return new


def make_one(outdir, spec, versions):
    name = spec["name"]
    mdir = os.path.join(outdir, "models", name)
    shutil.rmtree(mdir, ignore_errors=True)
    os.makedirs(mdir)

    torch.manual_seed(spec["seed"])
    config = make_config(spec)
    model = Qwen3ForCausalLM(config)
    init_weights(model, spec["seed"], spec["bf16_exact"])
    model.eval()

    gen_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=list(EOS_IDS),
                                  pad_token_id=PAD_ID, do_sample=False)
    if spec["store"] == "bfloat16":
        model = model.to(torch.bfloat16)
    model.generation_config = gen_config
    save_kwargs = {}
    if spec["shard"]:
        save_kwargs["max_shard_size"] = spec["shard"]
    model.save_pretrained(mdir, **save_kwargs)
    gen_config.save_pretrained(mdir)
    file_info = check_saved_files(mdir, spec)

    # Reference computations use the directory as saved, loaded back in float32
    # (for the bf16 model: from the bf16-rounded weights).
    ref = Qwen3ForCausalLM.from_pretrained(mdir, dtype=torch.float32,
                                           attn_implementation="eager")
    ref.eval()
    mem_sd = model.state_dict()
    ref_sd = ref.state_dict()
    for k, v in mem_sd.items():
        if k not in ref_sd or not torch.equal(v.float(), ref_sd[k].float()):
            raise RuntimeError("%s: tensor %s differs after reload" % (name, k))
    if spec["tied"] and not torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight):
        raise RuntimeError("%s: lm_head is not tied after reload" % name)

    L, H = spec["layers"], spec["hidden"]
    rng = np.random.RandomState(spec["seed"] + 17)
    prompt = random_ids(rng, PROMPT_LEN)

    rdir = os.path.join(mdir, "ref")
    os.makedirs(rdir)
    files = {}

    logits, hs, raw = forward_all(ref, prompt)
    if len(hs) != L + 1:
        raise RuntimeError("%s: %d hidden states, wanted %d" % (name, len(hs), L + 1))
    for l in range(L - 1):
        if not torch.allclose(raw[l], hs[l + 1], rtol=0, atol=1e-6):
            raise RuntimeError("%s: hook output of layer %d != hidden_states[%d]" % (name, l, l + 1))
    with torch.no_grad():
        renormed = ref.model.norm(raw[L - 1])
    if not torch.allclose(renormed, hs[L], rtol=1e-5, atol=1e-5):
        raise RuntimeError("%s: hidden_states[L] is not norm(last layer output)" % name)

    files["prompt.i32"] = {"shape": write_i32(os.path.join(rdir, "prompt.i32"), prompt),
                           "dtype": "int32"}
    files["logits.f32"] = {"shape": write_f32(os.path.join(rdir, "logits.f32"), logits)}
    files["hidden.f32"] = {"shape": write_f32(os.path.join(rdir, "hidden.f32"), raw)}
    files["embed.f32"] = {"shape": write_f32(os.path.join(rdir, "embed.f32"), hs[0])}
    files["final.f32"] = {"shape": write_f32(os.path.join(rdir, "final.f32"), hs[L])}

    gen_ids = greedy_generate(ref, prompt, NEW_TOKENS)
    loop_ids, margins = greedy_full_recompute(ref, prompt, NEW_TOKENS)
    agree = gen_ids == loop_ids
    if not agree:
        first = next(i for i in range(NEW_TOKENS) if gen_ids[i] != loop_ids[i])
        print("WARNING: %s: generate() and the full-recompute greedy loop differ at step %d "
              "(margin %.3g)" % (name, first, margins[first]), file=sys.stderr)
    greedy = {"prompt_ids": prompt, "new_ids": gen_ids,
              "new_ids_full_recompute": loop_ids, "agree": agree,
              "top1_top2_margins": margins, "min_margin": min(margins),
              "eos_disabled": True, "max_new_tokens": NEW_TOKENS}
    dump_json(os.path.join(rdir, "greedy.json"), greedy)

    lens = [int(n) for n in rng.randint(BATCH_MIN_LEN, BATCH_MAX_LEN + 1, size=N_BATCH)]
    lens[0], lens[1] = BATCH_MIN_LEN, BATCH_MAX_LEN
    batch = [random_ids(rng, n) for n in lens]
    batch_last = torch.stack([last_logits(ref, p) for p in batch])   # [16, V]
    files["batch_last_logits.f32"] = {
        "shape": write_f32(os.path.join(rdir, "batch_last_logits.f32"), batch_last)}
    for fname, info in files.items():
        info.setdefault("dtype", "float32")
        info["byte_order"] = "little"

    with open(os.path.join(mdir, "config.json")) as f:
        saved_cfg = json.load(f)
    summary = {
        "name": name,
        "prompt_ids": prompt,
        "greedy_ids": gen_ids,
        "greedy_agree_full_recompute": agree,
        "greedy_min_margin": min(margins),
        "batch_prompts": batch,
        "vocab": VOCAB,
        "hidden": H,
        "layers": L,
        "heads": spec["heads"],
        "kv_heads": spec["kv_heads"],
        "head_dim": spec["head_dim"],
        "intermediate": spec["inter"],
        "rope_theta": spec["theta"],
        "tie_word_embeddings": spec["tied"],
        "T": PROMPT_LEN,
        "eos_token_ids": EOS_IDS,
        "stored_dtype": spec["store"],
        "bf16_exact_values": spec["bf16_exact"] or spec["store"] == "bfloat16",
        "dtype_compute": "float32",
        "device": "cpu",
        "attn_implementation": "eager",
        "weights": file_info,
        "saved_config_keys": sorted(saved_cfg.keys()),
        "hidden_note": "hidden.f32[l] is the raw output of decoder layer l (pre final norm); "
                       "equals HF hidden_states[l+1] for l < L-1. final.f32 is HF "
                       "hidden_states[L] (after the final norm); embed.f32 is hidden_states[0].",
        "files": files,
    }
    summary.update(versions)
    dump_json(os.path.join(rdir, "ref.json"), summary)
    print("%-22s layers=%d hidden=%d shards=%d greedy_agree=%s min_margin=%.3g"
          % (name, L, H, len(file_info["shards"]), agree, min(margins)))


def main(argv):
    if len(argv) != 2:
        print("usage: %s OUTDIR" % argv[0], file=sys.stderr)
        return 2
    outdir = argv[1]
    os.makedirs(os.path.join(outdir, "models"), exist_ok=True)
    torch.set_num_threads(1)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__,
                "numpy": np.__version__}
    for spec in MODELS:
        make_one(outdir, spec, versions)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
