"""A small batched reference of chain speculative decoding with full verification
(dspark-spec.md section 4), used for STS calibration rounds and the informational
evaluation.  Each round the target recomputes the whole sequence (no KV cache: the
models are tiny), which also yields the context features for the next draft round.
"""
import numpy as np
import torch
import torch.nn.functional as F


def pick(logits, temp, gen):
    """Sample (or argmax at temp 0) from logits [B, V]."""
    if temp <= 1e-5:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temp, -1), 1, generator=gen).squeeze(1)


def draft_proposer(draft, emb_w, lm_w, autocast):
    """Propose gamma tokens with a DSpark/DFlash draft; returns (d, q, z, lengths)."""
    g = draft.block_size

    def propose(feats, buf, start, temp, gen):
        B = buf.shape[0]
        with autocast():
            h = draft.hidden(feats, buf, start[:, None], emb_w)[:, 0]    # [B, g, H]
            U = F.linear(h, lm_w).float()                                 # [B, g, V]
            prev = buf.gather(1, start[:, None]).squeeze(1)
            ds, qs, zs = [], [], []
            for k in range(g):
                l = U[:, k] + draft.markov(prev)
                z = draft.confidence(h[:, k], prev)
                if z is not None:
                    zs.append(z.float())
                if temp <= 1e-5:
                    tok = l.argmax(-1)
                else:
                    q = torch.softmax(l / temp, -1)
                    tok = torch.multinomial(q, 1, generator=gen).squeeze(1)
                    qs.append(q)
                ds.append(tok)
                prev = tok
        q = torch.stack(qs, 1) if qs else None
        z = torch.stack(zs, 1) if zs else None
        return torch.stack(ds, 1), q, z, torch.full((B,), g, device=buf.device)
    return propose


def ngram_proposer(gamma, vocab, n_max=3, n_min=1):
    """Prompt-lookup baseline, as transformers' PromptLookupCandidateGenerator does it: the
    earliest earlier occurrence of the last n tokens (n from n_max down to n_min) proposes
    the up to gamma tokens that followed it."""

    def propose(feats, buf, start, temp, gen):
        B = buf.shape[0]
        rows, st = buf.cpu().numpy(), start.cpu().numpy()
        d = np.zeros((B, gamma), dtype=np.int64)
        ell = np.zeros(B, dtype=np.int64)
        for b in range(B):
            seq = rows[b, :st[b] + 1]
            for n in range(n_max, n_min - 1, -1):
                if len(seq) <= n:
                    continue
                win = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
                hits = np.nonzero((win == seq[-n:]).all(1))[0]
                if len(hits):
                    cont = seq[hits[0] + n:hits[0] + n + gamma]
                    d[b, :len(cont)], ell[b] = cont, len(cont)
                    break
        d = torch.from_numpy(d).to(buf.device)
        q = F.one_hot(d, vocab).float() if temp > 1e-5 else None
        return d, q, None, torch.from_numpy(ell).to(buf.device)
    return propose


@torch.no_grad()
def run(tap, propose, prompts, max_new, temp, gen, stop_ids, gamma, pad_id):
    """Decode every prompt (a list of token lists) for up to max_new tokens.  Returns a
    dict with tau (emitted tokens per round, bonus included), per-position accept
    counts, the outputs, and per-round confidence logits z / prefix labels y / valid
    mask (for STS; y_k = 1 iff drafts 1..k were all accepted)."""
    dev = tap.model.device
    B = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], device=dev)
    cap = int(plen.max()) + max_new + 2 * gamma + 2
    buf = torch.full((B, cap), pad_id, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        buf[b, :len(p)] = torch.tensor(p, device=dev)
    stop = torch.tensor(sorted(stop_ids), device=dev)
    ar = torch.arange(B, device=dev)
    kk = torch.arange(gamma, device=dev)
    logits, feats = tap(buf[:, :int(plen.max())])
    first = pick(logits[ar, plen - 1].float(), temp, gen)
    buf[ar, plen] = first
    lens, emitted = plen + 1, torch.ones(B, dtype=torch.long, device=dev)
    done = torch.isin(first, stop) | (emitted >= max_new)
    rounds = tokens = 0
    acc_count = torch.zeros(gamma, dtype=torch.long, device=dev)
    prop_count = torch.zeros(gamma, dtype=torch.long, device=dev)
    Z, Y, M = [], [], []
    while not bool(done.all()):
        act = ~done
        start = lens - 1
        d, q, z, ell = propose(feats, buf, start, temp, gen)
        pos = lens[:, None] + kk                                          # draft positions
        fill = torch.where(kk < ell[:, None], d, torch.full_like(d, pad_id))
        buf[ar[act][:, None], pos[act]] = fill[act]
        S = int(lens.max()) + gamma
        logits, feats = tap(buf[:, :S])
        tl = logits[ar[:, None], start[:, None] + torch.arange(gamma + 1, device=dev)].float()
        if temp <= 1e-5:
            ok = d == tl[:, :gamma].argmax(-1)
        else:
            p = torch.softmax(tl / temp, -1)                              # [B, g+1, V]
            pd = p[:, :gamma].gather(-1, d[..., None]).squeeze(-1)
            qd = q.gather(-1, d[..., None]).squeeze(-1)
            u = torch.rand(B, gamma, generator=gen, device=dev)
            ok = u < (pd / qd.clamp_min(1e-8)).clamp(max=1.0)
        ok &= kk < ell[:, None]
        acc = ok.long().cumprod(-1)                                       # [B, g] prefix accepted
        a = acc.sum(-1)
        stop_hit = torch.isin(d, stop) & acc.bool()
        has_stop = stop_hit.any(-1)
        first_stop = stop_hit.long().argmax(-1)
        # correction (a < ell) or bonus (a == ell) token from the target at position start + a
        ta = tl[ar, a]
        if temp <= 1e-5:
            extra = ta.argmax(-1)
        else:
            pa = torch.softmax(ta / temp, -1)
            qa = q[ar, a.clamp(max=gamma - 1)]
            resid = (pa - qa).clamp_min(0)
            use_resid = (a < ell) & (resid.sum(-1) > 1e-8)
            dist = torch.where(use_resid[:, None], resid, pa)
            extra = torch.multinomial(dist / dist.sum(-1, keepdim=True), 1, generator=gen).squeeze(1)
        n_commit = torch.where(has_stop, first_stop + 1, a + 1)
        n_emit = torch.minimum(n_commit, max_new - emitted)
        write = act & ~has_stop
        buf[ar[write], (lens + a)[write]] = extra[write]
        if z is not None:
            valid = (kk[None] <= torch.where(has_stop, first_stop, gamma)[:, None]) & (kk < ell[:, None])
            Z.append(z[act].cpu())
            Y.append(acc[act].cpu())
            M.append(valid[act].cpu())
        rounds += int(act.sum())
        tokens += int(n_emit[act].sum())
        acc_count += acc[act].sum(0)
        prop_count += (kk < ell[:, None])[act].long().sum(0)
        new_done = has_stop | (torch.isin(extra, stop) & ~has_stop) | (emitted + n_emit >= max_new)
        lens = torch.where(act, lens + n_commit, lens)
        emitted = torch.where(act, emitted + n_emit, emitted)
        done = done | (act & new_done)
    outs = [buf[b, int(plen[b]):int(plen[b]) + int(emitted[b])].tolist() for b in range(B)]
    res = {"tau": tokens / max(1, rounds), "rounds": rounds, "tokens": tokens,
           "accept_rate": (acc_count.float() / prop_count.clamp_min(1)).tolist(), "outputs": outs}
    if Z:
        res["z"], res["y"], res["m"] = (torch.cat(Z).numpy(), torch.cat(Y).numpy(),
                                        torch.cat(M).numpy())
    return res
