"""Plain PyTorch reference of the DSpark draft model (Qwen3 flavour).

Written from dspark-spec.md sections 1-3: the state-dict keys, the block
forward pass, the Markov heads (vanilla, gated, rnn) and the confidence head.
Everything is computed in float32 on the CPU, one request at a time, with no
KV cache: the context K/V are recomputed from the context features on every
call, which is mathematically what the cached engine must reproduce.

Import it from the other scripts of this directory:

    from dspark_reference import DSparkDraft, build_draft_config, load_deepspec

Tensor shapes are written as [rows, cols]; S is the context length (= start),
g the block size (gamma), H the hidden size, V the vocabulary size, r the
Markov rank, m the number of captured target layers.
"""

import copy
import json
import os

import torch
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------
# configuration helpers


def rope_theta_of(cfg):
    """RoPE base from a Qwen3 config dict: 'rope_theta' or 'rope_parameters'."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        rtype = rp.get("rope_type", "default")
        if rtype not in ("default", None):
            raise ValueError("unsupported rope_type %r" % (rtype,))
        return float(rp["rope_theta"])
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    raise ValueError("config has neither rope_theta nor rope_parameters.rope_theta")


def head_dim_of(cfg):
    hd = cfg.get("head_dim")
    if hd is None:
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(hd)


def build_draft_config(target_config, *, num_draft_layers, target_layer_ids,
                       block_size, mask_token_id, markov_rank,
                       markov_head_type="vanilla", enable_confidence_head=True,
                       confidence_head_with_markov=True, num_anchors=512,
                       dtype_name="bfloat16"):
    """Draft config.json dict: a deep copy of the target config with the
    DeepSpec fields overridden or added (spec section 1)."""
    n_target = int(target_config["num_hidden_layers"])
    ids = [int(i) for i in target_layer_ids]
    prev = None
    for i in ids:
        if not (i == -1 or 0 <= i < n_target):
            raise ValueError("target_layer_id %d out of range" % i)
        if prev is not None and i <= prev:
            raise ValueError("target_layer_ids must be strictly increasing")
        prev = i
    if markov_rank < 0:
        raise ValueError("markov_rank must be >= 0")
    if enable_confidence_head and confidence_head_with_markov and markov_rank == 0:
        raise ValueError("confidence_head_with_markov needs markov_rank > 0")

    cfg = copy.deepcopy(dict(target_config))
    cfg["architectures"] = ["Qwen3DSparkModel"]
    cfg["num_target_layers"] = n_target
    cfg["num_hidden_layers"] = int(num_draft_layers)
    cfg["block_size"] = int(block_size)
    cfg["tie_word_embeddings"] = False
    cfg["layer_types"] = ["full_attention"] * int(num_draft_layers)
    cfg["mask_token_id"] = int(mask_token_id)
    cfg["target_layer_ids"] = ids
    cfg["num_anchors"] = int(num_anchors)
    cfg["enable_confidence_head"] = bool(enable_confidence_head)
    cfg.pop("confidence_head_with_markov", None)
    if enable_confidence_head:
        cfg["confidence_head_with_markov"] = bool(confidence_head_with_markov)
    cfg["markov_rank"] = int(markov_rank)
    cfg.pop("markov_head_type", None)
    if markov_rank > 0:
        if markov_head_type not in ("vanilla", "gated", "rnn"):
            raise ValueError("unknown markov_head_type %r" % (markov_head_type,))
        cfg["markov_head_type"] = markov_head_type
    if dtype_name is not None:
        cfg["dtype"] = dtype_name
        cfg.pop("torch_dtype", None)
    return cfg


# --------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: x * rsqrt(mean(x^2) + eps) * w, over the last dim, fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = float(eps)

    def forward(self, x):
        xf = x.float()
        var = xf.pow(2).mean(-1, keepdim=True)
        return self.weight.float() * (xf * torch.rsqrt(var + self.eps))


def rope_inv_freq(head_dim, theta):
    """inv_freq[i] = 1 / theta^(2i / hd), computed in fp32 as Hugging Face does."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta ** exps)


def apply_rope(x, positions, theta):
    """Rotate-half (NeoX) RoPE. x: [n, heads, hd]; positions: [n] int64."""
    hd = x.shape[-1]
    inv_freq = rope_inv_freq(hd, theta)                            # [hd/2]
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [n, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)                        # [n, hd]
    cos = emb.cos()[:, None, :]
    sin = emb.sin()[:, None, :]
    x1 = x[..., : hd // 2]
    x2 = x[..., hd // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class DraftAttention(nn.Module):
    def __init__(self, hidden, n_heads, n_kv, head_dim, eps):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv = n_kv
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def context_kv(self, ctx, ctx_pos, theta):
        """K/V of context rows: k_norm(C Wk^T) with RoPE, and C Wv^T.
        ctx: [S, H] (no input_layernorm). Returns ([S, nKV, hd], [S, nKV, hd])."""
        S = ctx.shape[0]
        k = self.k_norm(self.k_proj(ctx).view(S, self.n_kv, self.head_dim))
        v = self.v_proj(ctx).view(S, self.n_kv, self.head_dim)
        return apply_rope(k, ctx_pos, theta), v

    def forward(self, xn, blk_pos, ctx_k, ctx_v, theta, causal=False):
        """xn: [g, H] normed block stream; ctx_k/ctx_v: [S, nKV, hd].
        Attention is non-causal over [context ; block] unless causal=True
        (causal is only used by the self-check against the HF target)."""
        g = xn.shape[0]
        q = self.q_norm(self.q_proj(xn).view(g, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(xn).view(g, self.n_kv, self.head_dim))
        v = self.v_proj(xn).view(g, self.n_kv, self.head_dim)
        q = apply_rope(q, blk_pos, theta)
        k = apply_rope(k, blk_pos, theta)
        k_all = torch.cat([ctx_k, k], dim=0)                      # [S+g, nKV, hd]
        v_all = torch.cat([ctx_v, v], dim=0)
        rep = self.n_heads // self.n_kv
        # query head h reads KV head h // rep
        k_all = k_all.repeat_interleave(rep, dim=1)               # [S+g, nH, hd]
        v_all = v_all.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k_all) * (self.head_dim ** -0.5)
        if causal:
            S = ctx_k.shape[0]
            n = S + g
            qi = torch.arange(g)[:, None] + S
            ki = torch.arange(n)[None, :]
            mask = ki > qi                                         # [g, S+g]
            scores = scores.masked_fill(mask[None, :, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        out = torch.einsum("hqk,khd->qhd", probs, v_all)          # [g, nH, hd]
        return self.o_proj(out.reshape(g, self.n_heads * self.head_dim))


class DraftMLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, hidden, inter, n_heads, n_kv, head_dim, eps):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.self_attn = DraftAttention(hidden, n_heads, n_kv, head_dim, eps)
        self.mlp = DraftMLP(hidden, inter)

    def forward(self, x, blk_pos, ctx, ctx_pos, theta, causal=False):
        """x: [g, H] block stream; ctx: [S, H] context features."""
        ctx_k, ctx_v = self.self_attn.context_kv(ctx, ctx_pos, theta)
        xn = self.input_layernorm(x)
        x = x + self.self_attn(xn, blk_pos, ctx_k, ctx_v, theta, causal=causal)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class MarkovHead(nn.Module):
    """W1 = markov_w1 [V, r] (embedding), W2 = markov_w2 [V, r] (Linear r->V)."""

    def __init__(self, vocab, rank, hidden, kind):
        super().__init__()
        self.kind = kind
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = nn.Linear(rank, vocab, bias=False)
        if kind == "gated":
            self.gate_proj = nn.Linear(hidden + rank, rank, bias=True)
        elif kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden, 3 * rank, bias=True)
        elif kind != "vanilla":
            raise ValueError("unknown markov head type %r" % (kind,))

    def prev_embedding(self, prev_id):
        return self.markov_w1.weight[int(prev_id)].float()        # [r]

    def step(self, u_k, h_k, prev_id, state):
        """One sequential step. u_k: [V] base logits, h_k: [H] normed hidden.
        Returns (corrected logits [V], new state)."""
        e = self.prev_embedding(prev_id)
        if self.kind == "vanilla":
            return u_k + self.markov_w2(e), state
        if self.kind == "gated":
            gate = torch.sigmoid(self.gate_proj(torch.cat([h_k, e], dim=-1)))
            return u_k + self.markov_w2(gate * e), state
        # rnn: z = [s_{k-1}; W1[prev]; h_k], split order g, c, o
        z = torch.cat([state, e, h_k], dim=-1)
        out = self.joint_proj(z)
        g_raw, c_raw, o_raw = torch.split(out, self.rank, dim=-1)
        gs = torch.sigmoid(g_raw)
        new_state = gs * state + (1.0 - gs) * torch.tanh(c_raw)
        return u_k + self.markov_w2(torch.tanh(o_raw)), new_state


class ConfidenceHead(nn.Module):
    def __init__(self, in_dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, 1, bias=True)

    def forward(self, feats):
        return self.proj(feats).squeeze(-1).float()


# --------------------------------------------------------------------------
# the draft model


class DSparkDraft(nn.Module):
    """DSpark draft, state-dict keys exactly as DeepSpec (no 'model.' prefix).

    config: a draft config dict (see build_draft_config), i.e. the target's
    Qwen3 config with the DeepSpec fields."""

    def __init__(self, config):
        super().__init__()
        cfg = dict(config)
        self.config = cfg
        H = int(cfg["hidden_size"])
        V = int(cfg["vocab_size"])
        inter = int(cfg["intermediate_size"])
        nh = int(cfg["num_attention_heads"])
        nkv = int(cfg.get("num_key_value_heads") or nh)
        hd = head_dim_of(cfg)
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        if cfg.get("attention_bias", False):
            raise ValueError("attention_bias is not supported")
        if nh % nkv != 0:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.hidden = H
        self.vocab = V
        self.theta = rope_theta_of(cfg)
        self.block_size = int(cfg["block_size"])
        self.mask_token_id = int(cfg["mask_token_id"])
        self.target_layer_ids = [int(i) for i in cfg["target_layer_ids"]]
        m = len(self.target_layer_ids)
        r = int(cfg.get("markov_rank", 0))
        self.markov_rank = r

        self.embed_tokens = nn.Embedding(V, H)
        self.lm_head = nn.Linear(H, V, bias=False)
        self.fc = nn.Linear(m * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, eps)
        self.layers = nn.ModuleList([
            DraftLayer(H, inter, nh, nkv, hd, eps)
            for _ in range(int(cfg["num_hidden_layers"]))
        ])
        self.norm = RMSNorm(H, eps)

        self.markov_head = None
        if r > 0:
            self.markov_head = MarkovHead(V, r, H, str(cfg["markov_head_type"]).lower())

        self.confidence_head = None
        self.confidence_with_markov = False
        if bool(cfg.get("enable_confidence_head", False)):
            self.confidence_with_markov = bool(cfg.get("confidence_head_with_markov", False))
            if self.confidence_with_markov and self.markov_head is None:
                raise ValueError("confidence_head_with_markov needs a Markov head")
            in_dim = H + (r if self.confidence_with_markov else 0)
            self.confidence_head = ConfidenceHead(in_dim)

    # ---- context side

    @torch.no_grad()
    def context_features(self, target_hidden_list):
        """C = RMSNorm_hidden_norm(fc(concat F)).

        target_hidden_list: list of m tensors [S, H] in target_layer_ids order
        (HF hidden_states[l + 1], hidden_states[0] for l = -1), or one tensor
        [S, m*H] already concatenated. Returns [S, H]."""
        if isinstance(target_hidden_list, (list, tuple)):
            feats = torch.cat([t.float() for t in target_hidden_list], dim=-1)
        else:
            feats = target_hidden_list.float()
        return self.hidden_norm(self.fc(feats))

    # ---- block side

    def block_hidden(self, ctx_feats, anchor_id, start):
        """Normed block output h [g, H] for anchor at position start.
        ctx_feats: [start, H], the context features of positions 0..start-1."""
        ctx = ctx_feats.float()
        if ctx.shape[0] != start:
            raise ValueError("context has %d rows, start is %d" % (ctx.shape[0], start))
        g = self.block_size
        ids = torch.full((g,), self.mask_token_id, dtype=torch.long)
        ids[0] = int(anchor_id)
        x = self.embed_tokens.weight[ids].float()                 # [g, H]
        blk_pos = torch.arange(start, start + g, dtype=torch.long)
        ctx_pos = torch.arange(0, start, dtype=torch.long)
        for layer in self.layers:
            x = layer(x, blk_pos, ctx, ctx_pos, self.theta)
        return self.norm(x)

    @torch.no_grad()
    def draft_block(self, ctx_feats, anchor_id, start, temperature=0.0, generator=None):
        """One draft round (spec 2.2-2.5 and 3).

        Returns a dict with
          base        [g, V]  U_k = lm_head(h_k)
          corrected   [g, V]  l_k (Markov-corrected; equals base without a head)
          conf        [g]     raw confidence logits z_k (None without the head)
          drafts      list of g ints, d_k (argmax of l_k at temperature 0)
          hidden      [g, H]  h
        """
        h = self.block_hidden(ctx_feats, anchor_id, start)        # [g, H]
        base = self.lm_head(h).float()                            # [g, V]
        g = self.block_size
        corrected = torch.empty_like(base)
        conf = torch.empty(g, dtype=torch.float32) if self.confidence_head is not None else None
        drafts = []
        prev = int(anchor_id)
        state = None
        if self.markov_head is not None and self.markov_head.kind == "rnn":
            state = torch.zeros(self.markov_rank, dtype=torch.float32)
        for k in range(g):
            if self.markov_head is not None:
                lk, state = self.markov_head.step(base[k], h[k], prev, state)
            else:
                lk = base[k]
            corrected[k] = lk
            if conf is not None:
                if self.confidence_with_markov:
                    feats = torch.cat([h[k], self.markov_head.prev_embedding(prev)], dim=-1)
                else:
                    feats = h[k]
                conf[k] = self.confidence_head(feats)
            if temperature < 1e-5:
                d = int(torch.argmax(lk).item())                  # first index on ties
            else:
                q = torch.softmax(lk.float() / float(temperature), dim=-1)
                d = int(torch.multinomial(q, 1, generator=generator).item())
            drafts.append(d)
            prev = d
        return {"base": base, "corrected": corrected, "conf": conf,
                "drafts": drafts, "hidden": h}

    # ---- serialisation

    def deepspec_state_dict(self, omit_embed_head=False):
        sd = {}
        for k, v in self.state_dict().items():
            if omit_embed_head and k in ("embed_tokens.weight", "lm_head.weight"):
                continue
            sd[k] = v.detach().cpu().contiguous()
        return sd

    def save_deepspec(self, out_dir, config_dict, dtype=torch.bfloat16, omit_embed_head=False):
        """Write DeepSpec's directory format: config.json + model.safetensors.

        config_dict: the TARGET's config dict; it is copied and the draft fields
        are overridden/added exactly as build_draft_config does, from this
        model's own settings."""
        from safetensors.torch import save_file

        c = self.config
        dtype_name = str(dtype).split(".")[-1]
        cfg = build_draft_config(
            config_dict,
            num_draft_layers=len(self.layers),
            target_layer_ids=self.target_layer_ids,
            block_size=self.block_size,
            mask_token_id=self.mask_token_id,
            markov_rank=self.markov_rank,
            markov_head_type=c.get("markov_head_type", "vanilla"),
            enable_confidence_head=self.confidence_head is not None,
            confidence_head_with_markov=self.confidence_with_markov,
            num_anchors=int(c.get("num_anchors", 512)),
            dtype_name=dtype_name,
        )
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        sd = {k: v.to(dtype).contiguous()
              for k, v in self.deepspec_state_dict(omit_embed_head).items()}
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return cfg


def load_deepspec(path, embed_tokens=None, lm_head=None):
    """Load a DeepSpec draft directory into a float32 DSparkDraft.

    embed_tokens / lm_head ([V, H]) are used when the file lacks them (the
    target's own tensors); when the file has them they are used as stored."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = DSparkDraft(cfg)
    sd = {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    if "embed_tokens.weight" not in sd:
        if embed_tokens is None:
            raise ValueError("draft lacks embed_tokens.weight and none was given")
        sd["embed_tokens.weight"] = embed_tokens.float()
    if "lm_head.weight" not in sd:
        if lm_head is None:
            raise ValueError("draft lacks lm_head.weight and none was given")
        sd["lm_head.weight"] = lm_head.float()
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model


def round_to_bf16_(module):
    """Round every parameter in place to the nearest bfloat16 value (kept fp32)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


__all__ = [
    "DSparkDraft", "build_draft_config", "load_deepspec", "round_to_bf16_",
    "apply_rope", "rope_inv_freq", "rope_theta_of", "head_dim_of", "RMSNorm",
]
