"""The DSpark draft (and its DFlash form) as dspark-spec.md sections 1-3 describe it:
parameter names match the DeepSpec checkpoint keys (no "model." prefix), the block
is [anchor, mask x (gamma-1)], context keys/values come from fc + hidden_norm over
the captured target layers, attention is non-causal over context + block.

Training follows DeepSpec's recipe: many anchors per sequence trained at once with
a block-sparse attention mask, teacher-forced Markov head, and the losses
0.1 * CE(corrected logits) + 0.9 * L1(draft probs, target probs) + 1.0 * BCE(confidence),
weighted per block position by exp(-k/4) (k = 0..gamma-1).  The DFlash form uses
CE of the base logits alone.
"""
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rope(x, cos, sin):
    """x [B, S, heads, hd]; cos, sin [B, S, hd]."""
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def attend(q, k, v, mask):
    """q [B, nH, Q, hd], k/v [B, nH, S, hd], mask [B, 1, Q, S] (True: attend)."""
    q, k = q.to(v.dtype), k.to(v.dtype)
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s.float(), -1).to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, hd = c["hidden_size"], c["head_dim"]
        self.nh, self.nkv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], hd
        self.q_proj = nn.Linear(H, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, c["rms_norm_eps"])
        self.k_norm = RMSNorm(hd, c["rms_norm_eps"])

    def forward(self, x, ctx, rq, rc, mask):
        """x [B, Q, H] block stream (normed), ctx [B, L, H] context features."""
        B, Q, _ = x.shape
        L = ctx.shape[1]
        q = rope(self.q_norm(self.q_proj(x).view(B, Q, self.nh, self.hd)), *rq)
        kb = rope(self.k_norm(self.k_proj(x).view(B, Q, self.nkv, self.hd)), *rq)
        kc = rope(self.k_norm(self.k_proj(ctx).view(B, L, self.nkv, self.hd)), *rc)
        vb = self.v_proj(x).view(B, Q, self.nkv, self.hd)
        vc = self.v_proj(ctx).view(B, L, self.nkv, self.hd)
        rep = self.nh // self.nkv
        k = torch.cat([kc, kb.to(kc.dtype)], 1).transpose(1, 2).repeat_interleave(rep, 1)
        v = torch.cat([vc, vb], 1).transpose(1, 2).repeat_interleave(rep, 1)
        o = attend(q.transpose(1, 2), k, v, mask)                       # [B, nH, Q, hd]
        return self.o_proj(o.transpose(1, 2).reshape(B, Q, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, I = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = MLP(c)

    def forward(self, x, ctx, rq, rc, mask):
        x = x + self.self_attn(self.input_layernorm(x), ctx, rq, rc, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    """Vanilla head: the logit bias W2 . W1[prev] (W1 an embedding table [V, r])."""

    def __init__(self, V, r):
        super().__init__()
        self.markov_w1 = nn.Embedding(V, r)
        self.markov_w2 = nn.Linear(r, V, bias=False)

    def forward(self, prev):
        return self.markov_w2(self.markov_w1(prev))


class ConfidenceHead(nn.Module):
    def __init__(self, n_in):
        super().__init__()
        self.proj = nn.Linear(n_in, 1)

    def forward(self, feats):
        return self.proj(feats).squeeze(-1).float()


class Draft(nn.Module):
    def __init__(self, c):
        """c: the draft's config.json as a dict (see draft_config)."""
        super().__init__()
        self.c = c
        H, m = c["hidden_size"], len(c["target_layer_ids"])
        self.block_size, self.mask_token_id = c["block_size"], c["mask_token_id"]
        self.fc = nn.Linear(m * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, c["rms_norm_eps"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(H, c["rms_norm_eps"])
        r = c["markov_rank"]
        self.markov_head = MarkovHead(c["vocab_size"], r) if r > 0 else None
        self.confidence_head = None
        if c["enable_confidence_head"]:
            self.confidence_head = ConfidenceHead(H + (r if c["confidence_head_with_markov"] else 0))
        theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
        hd = c["head_dim"]
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd),
                             persistent=False)
        for mod in self.modules():                       # HF's init: N(0, 0.02), zero biases
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)

    def _rope(self, pos):
        f = pos[..., None].float() * self.inv_freq                       # [B, S, hd/2]
        emb = torch.cat([f, f], -1)
        return emb.cos(), emb.sin()

    def hidden(self, feats, ids, anchors, emb_w):
        """feats [B, L, m*H] target features of positions 0..L-1; ids [B, >=max anchor+1];
        anchors [B, A] block start positions.  Block a attends to the context positions
        < a and to its own gamma slots.  Returns the normed hidden h [B, A, gamma, H]."""
        B, L, _ = feats.shape
        A, g = anchors.shape[1], self.block_size
        dev = feats.device
        ctx = self.hidden_norm(self.fc(feats))                           # [B, L, H]
        blk = torch.full((B, A, g), self.mask_token_id, dtype=torch.long, device=dev)
        blk[:, :, 0] = ids.gather(1, anchors)
        x = F.embedding(blk.view(B, A * g), emb_w)                       # [B, Q, H]
        pos_q = (anchors[:, :, None] + torch.arange(g, device=dev)).view(B, A * g)
        rq = self._rope(pos_q)
        rc = self._rope(torch.arange(L, device=dev)[None].expand(B, L))
        q_anchor = anchors.repeat_interleave(g, dim=1)                   # [B, Q]
        ctx_ok = torch.arange(L, device=dev)[None, None, :] < q_anchor[:, :, None]
        bid = torch.arange(A * g, device=dev) // g
        blk_ok = (bid[:, None] == bid[None, :]).expand(B, -1, -1)
        mask = torch.cat([ctx_ok, blk_ok], -1)[:, None]                  # [B, 1, Q, L+Q]
        for layer in self.layers:
            x = layer(x, ctx, rq, rc, mask)
        return self.norm(x).view(B, A, g, -1)

    def markov(self, prev):
        return self.markov_head(prev).float() if self.markov_head is not None else 0.0

    def confidence(self, h, prev):
        if self.confidence_head is None:
            return None
        if self.c.get("confidence_head_with_markov"):
            h = torch.cat([h, self.markov_head.markov_w1(prev).to(h.dtype)], -1)
        return self.confidence_head(h)


def sample_anchors(loss_mask, n, gen):
    """DeepSpec's sampler: up to n distinct random anchors per sequence among positions
    p with loss_mask[p] and loss_mask[p+1]; returns (anchors [B, n] sorted, keep [B, n])."""
    cand = loss_mask[:, :-1] & loss_mask[:, 1:]                          # [B, L-1]
    r = torch.rand(cand.shape, generator=gen, device=cand.device)
    r = torch.where(cand, r, torch.full_like(r, 2.0))
    n = min(n, cand.shape[1])
    order = r.argsort(-1)[:, :n]
    keep = r.gather(1, order) < 2.0
    anchors = torch.where(keep, order, torch.zeros_like(order))
    anchors, idx = anchors.sort(-1)
    return anchors, keep.gather(1, idx)


POS_DECAY = 4.0


def losses(draft, h, lm_w, ids, loss_mask, anchors, keep, tlogits, dspark):
    """Training losses for one batch.  h [B, A, g, H] from draft.hidden; tlogits [B, L, V]
    target logits over the same sequences.  Returns (loss, metrics dict of floats)."""
    B, L = ids.shape
    A, g = anchors.shape[1], draft.block_size
    dev = ids.device
    k = torch.arange(g, device=dev)
    lab_pos = anchors[:, :, None] + k + 1                                # [B, A, g]
    safe = lab_pos.clamp(max=L - 1)
    labels = ids.gather(1, safe.view(B, -1)).view(B, A, g)
    valid = (lab_pos < L) & loss_mask.gather(1, safe.view(B, -1)).view(B, A, g) & keep[:, :, None]
    valid = valid.int().cumprod(-1).bool()
    w = valid.float() * torch.exp(-k.float() / POS_DECAY)
    wsum = w.sum().clamp_min(1e-6)
    prev = torch.cat([ids.gather(1, anchors)[:, :, None], labels[:, :, :-1]], -1)
    U = F.linear(h, lm_w).float()                                        # [B, A, g, V]
    logits = U + draft.markov(prev) if dspark else U
    ce = (F.cross_entropy(logits.flatten(0, 2), labels.flatten(), reduction="none")
          * w.flatten()).sum() / wsum
    with torch.no_grad():
        tpos = (anchors[:, :, None] + k).clamp(max=L - 1)
        tl = tlogits[torch.arange(B, device=dev)[:, None, None], tpos].float()   # [B, A, g, V]
        pt = torch.softmax(tl, -1)
        top1 = (logits.argmax(-1) == tl.argmax(-1)).float()
    with torch.set_grad_enabled(dspark and torch.is_grad_enabled()):
        tv = (torch.softmax(logits, -1) - pt).abs().sum(-1)              # L1 distance [B, A, g]
    acc = (1 - 0.5 * tv.detach()).clamp(0, 1)                            # T=1 acceptance c*
    m = {"ce": ce.item()}
    if dspark:
        l1 = (tv * w).sum() / wsum
        z = draft.confidence(h, prev)
        bce = (F.binary_cross_entropy_with_logits(z, acc, reduction="none") * w).sum() / wsum
        loss = 0.1 * ce + 0.9 * l1 + 1.0 * bce
        m.update(l1=l1.item(), bce=bce.item())
    else:
        loss = ce
    vf = valid.float()
    m["tau_t1_est"] = (1 + ((acc * vf).cumprod(-1)).sum(-1))[keep].mean().item()
    m["top1_match"] = ((top1 * vf).sum() / vf.sum().clamp_min(1)).item()
    m["loss"] = loss.item()
    return loss, m


def draft_config(target_cfg, layers, layer_ids, block, mask_id, rank, confidence, anchors):
    """DeepSpec's draft config: the target's config.json with the draft's fields."""
    c = json.loads(json.dumps(target_cfg))
    c.update(architectures=["Qwen3DSparkModel"], num_hidden_layers=layers,
             num_target_layers=target_cfg["num_hidden_layers"], block_size=block,
             mask_token_id=mask_id, target_layer_ids=list(layer_ids),
             layer_types=["full_attention"] * layers, tie_word_embeddings=False,
             markov_rank=rank, enable_confidence_head=confidence, num_anchors=anchors,
             max_window_layers=layers)
    c.pop("markov_head_type", None)
    c.pop("confidence_head_with_markov", None)
    if rank > 0:
        c["markov_head_type"] = "vanilla"
    if confidence:
        c["confidence_head_with_markov"] = rank > 0
    return c


def export(draft, out_dir, emb_w=None, lm_w=None):
    """config.json + model.safetensors (bf16); embed_tokens/lm_head only if given."""
    sd = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in draft.state_dict().items()}
    if emb_w is not None:
        sd["embed_tokens.weight"] = emb_w.detach().to(torch.bfloat16).cpu().clone()
        sd["lm_head.weight"] = lm_w.detach().to(torch.bfloat16).cpu().clone()
    save_file(sd, f"{out_dir}/model.safetensors", metadata={"format": "pt"})
    with open(f"{out_dir}/config.json", "w") as f:
        json.dump(draft.c, f, indent=2)
    return sorted(sd)
