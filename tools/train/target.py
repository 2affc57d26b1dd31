"""Stage 3 and the target-side helpers: the Qwen3 target (transformers
Qwen3ForCausalLM), its training loop, evaluation, batched generation, the tap
that captures the draft's context features, and the Hugging Face export.
"""
import copy
import json
import math
import time

import torch
import torch.nn.functional as F


def build(vocab_size, a, eot):
    """A freshly initialised Qwen3ForCausalLM (fp32 weights) from the settings in a."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim, max_position_embeddings=a.max_pos, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": float(a.rope_theta)},
        tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
        max_window_layers=a.layers, bos_token_id=eot, eos_token_id=eot, initializer_range=0.02)
    model = Qwen3ForCausalLM(cfg)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        model.lm_head.weight = model.model.embed_tokens.weight      # make the tie explicit
    return model


class Tap:
    """Runs the target over whole sequences and captures the outputs of the decoder
    layers in layer_ids (-1: the embedding output), concatenated in list order."""

    def __init__(self, model, layer_ids):
        self.model, self.layer_ids, self.buf = model, list(layer_ids), {}
        for l in self.layer_ids:
            mod = model.model.embed_tokens if l < 0 else model.model.layers[l]
            mod.register_forward_hook(self._hook(l))

    def _hook(self, l):
        def hook(_mod, _inp, out):
            self.buf[l] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    @torch.no_grad()
    def __call__(self, ids):
        """ids [B, S] -> (logits [B, S, V], feats [B, S, m*H]) in the model's dtype."""
        logits = self.model(input_ids=ids, use_cache=False).logits
        feats = torch.cat([self.buf[l] for l in self.layer_ids], dim=-1)
        self.buf.clear()
        return logits, feats


class Planner:
    """Fixes a loop's step count from its measured speed: after `probe` steps the
    total becomes min(max_steps, what fits in budget_s)."""

    def __init__(self, max_steps, budget_s, probe=10):
        self.total, self.budget, self.probe = max_steps, budget_s, probe
        self.t0 = None

    def update(self, step, device):
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.time()
        elif step == self.probe and self.t0 is not None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - self.t0) / (self.probe - 2)
            self.total = max(self.probe + 1, min(self.total, int(self.budget * 0.97 / per)))
        return self.total


def lr_at(step, total, warmup, peak, floor=0.0):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor * peak + (1 - floor) * peak * 0.5 * (1 + math.cos(math.pi * t))


def windows(stream, n, length, gen):
    """n random windows of length+1 tokens from a 1-D token tensor on the device."""
    starts = torch.randint(0, stream.numel() - length - 1, (n,), generator=gen, device=stream.device)
    return stream[starts[:, None] + torch.arange(length + 1, device=stream.device)].long()


def train(model, stream, a, dev, log):
    """Train on random windows of the packed train stream; return metrics."""
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=a.target_lr, betas=(0.9, 0.95), eps=1e-8)
    warm = max(20, min(200, int(0.04 * a.target_steps)))
    plan = Planner(a.target_steps, a.target_budget, probe=min(20, warm))
    model.train()
    losses, step, t0 = [], 0, time.time()
    while step < plan.total:
        x = windows(stream, a.target_batch, a.target_seq, gen)
        lr = lr_at(step, plan.total, warm, a.target_lr, floor=0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        plan.update(step, dev)
        if step % 50 == 0 or step == plan.total:
            losses.append([step, round(loss.item(), 4)])
            log(f"  target step {step}/{plan.total} loss {loss.item():.3f} lr {lr:.2e} "
                f"{time.time() - t0:.0f}s")
    model.eval()
    return {"steps": step, "tokens_seen": step * a.target_batch * a.target_seq,
            "train_loss": losses, "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def eval_loss(model, stream, length, max_windows, dev):
    """Mean next-token cross-entropy over consecutive windows of a token stream."""
    n = min(max_windows, (stream.numel() - 1) // length)
    if n == 0:
        return float("nan")
    tot = 0.0
    for i in range(0, n, 16):
        m = min(16, n - i)
        starts = torch.arange(i, i + m, device=stream.device) * length
        x = stream[starts[:, None] + torch.arange(length + 1, device=stream.device)].long()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        tot += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               x[:, 1:].reshape(-1), reduction="sum").item()
    return tot / (n * length)


@torch.no_grad()
def generate(model, prompts, n_new, greedy, gen):
    """Continue equal-length prompts [B, P] by n_new tokens, sampling at temperature 1
    (pure multinomial, no top-k/top-p) or greedily; return [B, n_new]."""
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    cache, toks = out.past_key_values, []
    for i in range(n_new):
        logits = out.logits[:, -1].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
        toks.append(nxt)
        if i + 1 < n_new:
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    return torch.stack(toks, 1)


def repetition(tokens):
    """Share of distinct 4-grams among a generation's 4-grams (1.0: no repetition)."""
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / max(1, len(grams))


def inference_copy(model):
    """A bf16 copy for distillation, calibration and export (the shipped weights)."""
    m = copy.deepcopy(model).to(torch.bfloat16).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def export(model_bf16, out_dir, eos_ids, pad_id):
    model_bf16.save_pretrained(out_dir)          # transformers 5: always model.safetensors
    with open(f"{out_dir}/generation_config.json", "w") as f:
        json.dump({"bos_token_id": pad_id, "eos_token_id": eos_ids, "pad_token_id": pad_id,
                   "do_sample": False}, f, indent=2)
