#!/usr/bin/env python3
"""Write a tiny random-weight Qwen3 target and DSpark draft with a 16-token
vocabulary (plain Python, no dependencies), for tests that enumerate the
target's exact output distribution. Seeded: the output is reproducible.

usage: make_tiny_pair.py OUTDIR   ->  OUTDIR/models/tiny-v16, OUTDIR/drafts/tiny-v16-draft
"""
import json
import os
import random
import struct
import sys

V, H, L, NH, NKV, HD, I = 16, 16, 2, 2, 1, 8, 24
GAMMA, RANK = 4, 4


def write_safetensors(path, tensors, dtype="F32"):
    header, blobs, off = {}, [], 0
    for name, (shape, vals) in tensors.items():
        blob = struct.pack("<%df" % len(vals), *vals)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        off += len(blob)
        blobs.append(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def rand(rng, shape, std, base=0.0):
    n = 1
    for s in shape:
        n *= s
    return (shape, [base + rng.gauss(0, std) for _ in range(n)])


def layer(rng, prefix, t):
    t[prefix + "input_layernorm.weight"] = rand(rng, [H], 0.1, 1.0)
    t[prefix + "post_attention_layernorm.weight"] = rand(rng, [H], 0.1, 1.0)
    t[prefix + "self_attn.q_proj.weight"] = rand(rng, [NH * HD, H], 0.3)
    t[prefix + "self_attn.k_proj.weight"] = rand(rng, [NKV * HD, H], 0.3)
    t[prefix + "self_attn.v_proj.weight"] = rand(rng, [NKV * HD, H], 0.3)
    t[prefix + "self_attn.o_proj.weight"] = rand(rng, [H, NH * HD], 0.3)
    t[prefix + "self_attn.q_norm.weight"] = rand(rng, [HD], 0.1, 1.0)
    t[prefix + "self_attn.k_norm.weight"] = rand(rng, [HD], 0.1, 1.0)
    t[prefix + "mlp.gate_proj.weight"] = rand(rng, [I, H], 0.3)
    t[prefix + "mlp.up_proj.weight"] = rand(rng, [I, H], 0.3)
    t[prefix + "mlp.down_proj.weight"] = rand(rng, [H, I], 0.3)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    rng = random.Random(20261128)
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": V, "hidden_size": H,
        "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV,
        "head_dim": HD, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "attention_bias": False, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": None, "eos_token_id": 15,
    }
    tdir = os.path.join(out, "models", "tiny-v16")
    os.makedirs(tdir, exist_ok=True)
    json.dump(config, open(os.path.join(tdir, "config.json"), "w"), indent=1)
    json.dump({"eos_token_id": [15]}, open(os.path.join(tdir, "generation_config.json"), "w"), indent=1)
    t = {"model.embed_tokens.weight": rand(rng, [V, H], 0.6)}
    for i in range(L):
        layer(rng, "model.layers.%d." % i, t)
    t["model.norm.weight"] = rand(rng, [H], 0.1, 1.0)
    write_safetensors(os.path.join(tdir, "model.safetensors"), t)
    embed = t["model.embed_tokens.weight"]

    dconf = dict(config)
    dconf.update({
        "architectures": ["Qwen3DSparkModel"], "num_hidden_layers": 1, "num_target_layers": L, "block_size": GAMMA,
        "mask_token_id": 14, "target_layer_ids": [-1, 0], "layer_types": ["full_attention"],
        "tie_word_embeddings": False, "markov_rank": RANK, "markov_head_type": "vanilla",
        "enable_confidence_head": True, "confidence_head_with_markov": True, "num_anchors": 512,
    })
    ddir = os.path.join(out, "drafts", "tiny-v16-draft")
    os.makedirs(ddir, exist_ok=True)
    json.dump(dconf, open(os.path.join(ddir, "config.json"), "w"), indent=1)
    d = {"embed_tokens.weight": embed, "lm_head.weight": embed,
         "fc.weight": rand(rng, [H, 2 * H], 0.2), "hidden_norm.weight": rand(rng, [H], 0.1, 1.0)}
    layer(rng, "layers.0.", d)
    d["norm.weight"] = rand(rng, [H], 0.1, 1.0)
    d["markov_head.markov_w1.weight"] = rand(rng, [V, RANK], 0.5)
    d["markov_head.markov_w2.weight"] = rand(rng, [V, RANK], 0.5)
    d["confidence_head.proj.weight"] = rand(rng, [1, H + RANK], 0.3)
    d["confidence_head.proj.bias"] = ([1], [0.5])
    write_safetensors(os.path.join(ddir, "model.safetensors"), d)


if __name__ == "__main__":
    main()
