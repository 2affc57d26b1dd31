#!/usr/bin/env python3
"""Make reference fixtures for DSpark drafts paired with the 'pair-target'.

Usage: make_draft_fixtures.py OUTDIR     (after make_target_fixtures.py OUTDIR)

Loads OUTDIR/models/pair-target with transformers, builds seeded random drafts
in DeepSpec's checkpoint format under OUTDIR/drafts/<name>/ (bf16
safetensors, no 'model.' prefix), and writes, under OUTDIR/drafts/<name>/ref/,
the draft outputs that the PyTorch reference in dspark_reference.py computes
(float32, CPU) for a fixed token sequence at two anchor positions.
All binary files are raw little-endian float32 with no header.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import Qwen3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dspark_reference import (  # noqa: E402
    DSparkDraft, DraftLayer, RMSNorm, build_draft_config, head_dim_of,
    load_deepspec, rope_theta_of, round_to_bf16_,
)

TARGET = "pair-target"
SEQ_SEED = 3001
SEQ_LEN = 40
FIRST_ID = 4                  # sequence ids in [4, V): no pad/bos/eos (0..3)
MASK_TOKEN_ID = 500
GAMMA = 7
DRAFT_LAYERS = 2
RANK = 16
STARTS = [24, 31]
# The mask id also appears as an ordinary token: once in the context and once
# as the anchor of the start-31 block (spec section 10, note 11).
MASK_AS_TOKEN_AT = [10, 31]

VARIANTS = [
    dict(name="draft-vanilla", seed=2001, layer_ids=[0, 2], rank=RANK,
         kind="vanilla", conf=True, omit=False),
    dict(name="draft-gated", seed=2002, layer_ids=[0, 2], rank=RANK,
         kind="gated", conf=True, omit=False),
    dict(name="draft-rnn", seed=2003, layer_ids=[0, 2], rank=RANK,
         kind="rnn", conf=True, omit=False),
    dict(name="draft-dflash", seed=2004, layer_ids=[0, 2], rank=0,
         kind=None, conf=False, omit=False),
    dict(name="draft-vanilla-noconf", seed=2005, layer_ids=[0, 2], rank=RANK,
         kind="vanilla", conf=False, omit=False),
    dict(name="draft-m3-noembed", seed=2006, layer_ids=[-1, 1, 2], rank=RANK,
         kind="vanilla", conf=True, omit=True),
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
    arr = tensor.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4")
    arr.tofile(path)
    return list(arr.shape)


def expected_keys(n_layers, rank, kind, conf, omit):
    keys = ["fc.weight", "hidden_norm.weight", "norm.weight"]
    if not omit:
        keys += ["embed_tokens.weight", "lm_head.weight"]
    for i in range(n_layers):
        p = "layers.%d." % i
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        keys += [p + "self_attn.%s.weight" % n
                 for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
        keys += [p + "mlp.%s.weight" % n for n in ("gate_proj", "up_proj", "down_proj")]
    if rank > 0:
        keys += ["markov_head.markov_w1.weight", "markov_head.markov_w2.weight"]
        if kind == "gated":
            keys += ["markov_head.gate_proj.weight", "markov_head.gate_proj.bias"]
        if kind == "rnn":
            keys += ["markov_head.joint_proj.weight", "markov_head.joint_proj.bias"]
    if conf:
        keys += ["confidence_head.proj.weight", "confidence_head.proj.bias"]
    return sorted(keys)


def init_draft(draft, seed):
    """Seeded init of everything except embed_tokens / lm_head (copied from
    the target): norm weights 1 + N(0, 0.1), Markov tables N(0, 0.5), biases
    N(0, 0.5), other linears N(0, 1/fan_in) with o_proj and down_proj doubled,
    as in make_target_fixtures.py, so that drafts depend on the context."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name in ("embed_tokens.weight", "lm_head.weight"):
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "markov_w1" in name or "markov_w2" in name:
                p.copy_(0.5 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            elif name.endswith(".weight") and p.dim() == 2:
                gain = 2.0 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.copy_(gain * p.shape[1] ** -0.5 * noise)
            else:
                raise RuntimeError("unexpected parameter %s" % name)


def check_layer_math(target, tcfg, seq, hs, logits):
    """Check the reference's layer code against transformers: run the target's
    own decoder layers through DraftLayer in causal mode and compare with the
    HF hidden states and logits; then check the context K/V path by feeding
    the first rows of layer 0 as (pre-normed) context."""
    H = int(tcfg["hidden_size"])
    L = int(tcfg["num_hidden_layers"])
    nh = int(tcfg["num_attention_heads"])
    nkv = int(tcfg["num_key_value_heads"])
    hd = head_dim_of(tcfg)
    eps = float(tcfg["rms_norm_eps"])
    theta = rope_theta_of(tcfg)
    inter = int(tcfg["intermediate_size"])
    sd = {k: v.float() for k, v in target.state_dict().items()}
    T = len(seq)
    pos = torch.arange(T, dtype=torch.long)
    empty = torch.zeros(0, H)
    empty_pos = torch.zeros(0, dtype=torch.long)
    worst = 0.0
    with torch.no_grad():
        x = sd["model.embed_tokens.weight"][torch.tensor(seq)]
        layers = []
        for i in range(L):
            prefix = "model.layers.%d." % i
            layer = DraftLayer(H, inter, nh, nkv, hd, eps)
            layer.load_state_dict({k[len(prefix):]: v for k, v in sd.items()
                                   if k.startswith(prefix)}, strict=True)
            layers.append(layer)
        x0 = x
        for i, layer in enumerate(layers):
            x = layer(x, pos, empty, empty_pos, theta, causal=True)
            if i < L - 1:
                worst = max(worst, float((x - hs[i + 1]).abs().max()))
        norm = RMSNorm(H, eps)
        norm.weight.copy_(sd["model.norm.weight"])
        head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        mine = norm(x) @ head.t()
        worst_logits = float((mine - logits).abs().max())

        P = 17
        full = layers[0](x0, pos, empty, empty_pos, theta, causal=True)
        ctx = layers[0].input_layernorm(x0[:P])
        split = layers[0](x0[P:], pos[P:], ctx, pos[:P], theta, causal=True)
        worst_ctx = float((full[P:] - split).abs().max())
    print("layer-math check vs transformers: hidden %.2e, logits %.2e, context path %.2e"
          % (worst, worst_logits, worst_ctx))
    if worst > 5e-4 or worst_logits > 2e-3 or worst_ctx > 1e-4:
        raise RuntimeError("reference layer math disagrees with transformers")


def main(argv):
    if len(argv) != 2:
        print("usage: %s OUTDIR" % argv[0], file=sys.stderr)
        return 2
    outdir = argv[1]
    torch.set_num_threads(1)
    tdir = os.path.join(outdir, "models", TARGET)
    if not os.path.exists(os.path.join(tdir, "config.json")):
        print("%s: run make_target_fixtures.py first" % tdir, file=sys.stderr)
        return 1
    with open(os.path.join(tdir, "config.json")) as f:
        tcfg = json.load(f)
    target = Qwen3ForCausalLM.from_pretrained(tdir, dtype=torch.float32,
                                              attn_implementation="eager")
    target.eval()
    V = int(tcfg["vocab_size"])
    L = int(tcfg["num_hidden_layers"])
    if not 0 <= MASK_TOKEN_ID < V:
        raise RuntimeError("mask id outside the vocabulary")

    rng = np.random.RandomState(SEQ_SEED)
    seq = [int(x) for x in rng.randint(FIRST_ID, V, size=SEQ_LEN)]
    for p in MASK_AS_TOKEN_AT:
        seq[p] = MASK_TOKEN_ID

    x = torch.tensor([seq], dtype=torch.long)
    with torch.no_grad():
        out = target(input_ids=x, attention_mask=torch.ones_like(x),
                     output_hidden_states=True, use_cache=False)
    hs = [h[0].float() for h in out.hidden_states]                # L+1 of [40, H]
    logits = out.logits[0].float()                                 # [40, V]
    if len(hs) != L + 1:
        raise RuntimeError("target returned %d hidden states" % len(hs))
    check_layer_math(target, tcfg, seq, hs, logits)

    ddir_all = os.path.join(outdir, "drafts")
    os.makedirs(ddir_all, exist_ok=True)
    seq_info = {
        "target": TARGET,
        "sequence": seq,
        "target_argmax": [int(t) for t in logits.argmax(-1).tolist()],
        "mask_token_id": MASK_TOKEN_ID,
        "mask_as_token_at": MASK_AS_TOKEN_AT,
        "seq_hidden_shape": [L + 1, SEQ_LEN, int(tcfg["hidden_size"])],
        "seq_hidden_note": "seq_hidden.f32 = HF hidden_states of the target over the "
                           "sequence: [0] embedding output, [l+1] output of layer l, "
                           "[L] after the final norm",
    }
    write_f32(os.path.join(ddir_all, "seq_hidden.f32"), torch.stack(hs))
    dump_json(os.path.join(ddir_all, "sequence.json"), seq_info)

    t_embed = target.model.embed_tokens.weight.detach().float()
    t_head = target.lm_head.weight.detach().float()
    if not torch.equal(t_embed, t_embed.to(torch.bfloat16).float()) \
            or not torch.equal(t_head, t_head.to(torch.bfloat16).float()):
        raise RuntimeError("pair-target weights are not bf16-exact")

    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    for var in VARIANTS:
        name = var["name"]
        cfg = build_draft_config(
            tcfg, num_draft_layers=DRAFT_LAYERS, target_layer_ids=var["layer_ids"],
            block_size=GAMMA, mask_token_id=MASK_TOKEN_ID, markov_rank=var["rank"],
            markov_head_type=var["kind"] or "vanilla",
            enable_confidence_head=var["conf"],
            confidence_head_with_markov=var["conf"] and var["rank"] > 0,
            dtype_name="bfloat16")
        if L - 1 in cfg["target_layer_ids"]:
            raise RuntimeError("the final target layer cannot be captured")
        torch.manual_seed(var["seed"])
        draft = DSparkDraft(cfg)
        init_draft(draft, var["seed"])
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(t_embed)
            draft.lm_head.weight.copy_(t_head)
        round_to_bf16_(draft)
        draft.eval()

        ddir = os.path.join(ddir_all, name)
        shutil.rmtree(ddir, ignore_errors=True)
        saved_cfg = draft.save_deepspec(ddir, tcfg, dtype=torch.bfloat16,
                                        omit_embed_head=var["omit"])
        if saved_cfg != cfg:
            raise RuntimeError("%s: saved config differs from the built one" % name)

        from safetensors import safe_open
        with safe_open(os.path.join(ddir, "model.safetensors"), framework="pt") as f:
            keys = sorted(f.keys())
            dtypes = sorted({str(f.get_tensor(k).dtype) for k in keys})
        want = expected_keys(DRAFT_LAYERS, var["rank"], var["kind"], var["conf"], var["omit"])
        if keys != want:
            raise RuntimeError("%s: keys %s, expected %s" % (name, keys, want))
        if dtypes != ["torch.bfloat16"]:
            raise RuntimeError("%s: dtypes %s" % (name, dtypes))

        # Compute from the files as saved (bf16 values, float32 math).
        ref = load_deepspec(ddir, embed_tokens=t_embed, lm_head=t_head)
        for k, v in draft.state_dict().items():
            if not torch.equal(v, ref.state_dict()[k]):
                raise RuntimeError("%s: %s differs after reload" % (name, k))

        feats = [hs[0] if l == -1 else hs[l + 1] for l in cfg["target_layer_ids"]]
        rdir = os.path.join(ddir, "ref")
        os.makedirs(rdir)
        files = {}
        drafts = {}
        margins = {}
        conf_sig = {}
        with torch.no_grad():
            for start in STARTS:
                ctx = ref.context_features([f[:start] for f in feats])   # [start, H]
                res = ref.draft_block(ctx, seq[start], start, temperature=0.0)
                stem = "start%d_" % start
                files[stem + "base.f32"] = write_f32(os.path.join(rdir, stem + "base.f32"),
                                                     res["base"])
                files[stem + "corrected.f32"] = write_f32(
                    os.path.join(rdir, stem + "corrected.f32"), res["corrected"])
                if res["conf"] is not None:
                    files[stem + "conf.f32"] = write_f32(os.path.join(rdir, stem + "conf.f32"),
                                                         res["conf"])
                    conf_sig[str(start)] = [float(v) for v in torch.sigmoid(res["conf"])]
                drafts[str(start)] = res["drafts"]
                top = torch.topk(res["corrected"], 2, dim=-1).values
                margins[str(start)] = [float(v) for v in (top[:, 0] - top[:, 1])]
                if start == 31:
                    files["ctx31.f32"] = write_f32(os.path.join(rdir, "ctx31.f32"), ctx)
        summary = {
            "name": name,
            "target": TARGET,
            "sequence": seq,
            "starts": STARTS,
            "anchors": {str(s): seq[s] for s in STARTS},
            "drafts": drafts,
            "draft_margins": margins,
            "confidence_sigmoid": conf_sig,
            "gamma": GAMMA,
            "target_layer_ids": cfg["target_layer_ids"],
            "markov_rank": var["rank"],
            "markov_head_type": var["kind"],
            "enable_confidence_head": var["conf"],
            "file_has_embed_and_lm_head": not var["omit"],
            "mask_token_id": MASK_TOKEN_ID,
            "temperature": 0.0,
            "dtype_compute": "float32",
            "stored_dtype": "bfloat16",
            "files": {k: {"shape": v, "dtype": "float32", "byte_order": "little"}
                      for k, v in files.items()},
        }
        summary.update(versions)
        dump_json(os.path.join(rdir, "ref.json"), summary)
        print("%-22s m=%d rank=%-2d %-7s conf=%-5s drafts24=%s drafts31=%s"
              % (name, len(feats), var["rank"], var["kind"] or "-", var["conf"],
                 drafts["24"], drafts["31"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
