"""Independent single-sequence decoders with KV reuse, written from the methods' descriptions
(shared/REFRESH.md) on top of the naive float64 LLaDA, to compare the batched paged engine with.

Greedy, LLaDA low-confidence remasking, batch of one, the prompt cached in full.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.naive_llada import NaiveLLaDA
from tests.reference_decoders import never_commit_mask


def _commit(x, logits, cand, k, mask_id, threshold=None):
    """LLaDA low-confidence commit of k candidates (or Fast-dLLM's threshold rule) at positions ``cand``."""
    p = F.softmax(never_commit_mask(logits, mask_id).double(), dim=-1)
    conf, x0 = p.max(dim=-1)
    if threshold is not None:
        order = torch.argsort(conf, descending=True, stable=True)
        keep = conf[order] >= threshold
        keep[0] = True
        idx = order[keep]
    else:
        idx = torch.topk(conf, min(k, cand.numel())).indices
    x[cand[idx]] = x0[idx]
    return cand[idx]


def prefix_cache_generate(m: NaiveLLaDA, prompt, steps, gen_length, block_length, mask_id, dual=False):
    """Fast-dLLM: at each block boundary a full pass (its logits are the block's first step) caches the
    K/V outside the block; in-block steps recompute [block start, N) (dual: only the block)."""
    p, n = len(prompt), len(prompt) + gen_length
    x = torch.full((n,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt)
    steps_per_block = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        s, e = p + b * block_length, p + (b + 1) * block_length
        counts = [
            block_length // steps_per_block + (i < block_length % steps_per_block) for i in range(steps_per_block)
        ]
        logits, per_layer = m.forward(x.tolist())
        cached = torch.cat([torch.arange(0, s), torch.arange(e, n)]) if dual else torch.arange(0, s)
        ck = [k[cached] for _, k, _ in per_layer]
        cv = [v[cached] for _, _, v in per_layer]
        for i in range(steps_per_block):
            if i > 0:
                rows = torch.arange(s, e if dual else n)
                logits_rows, _ = m.forward(x[rows].tolist(), rows.tolist(), ck, cv)
                logits = torch.zeros(n, logits_rows.shape[1], dtype=logits_rows.dtype)
                logits[rows] = logits_rows
            cand = (x[s:e] == mask_id).nonzero().squeeze(-1) + s
            _commit(x, logits[cand], cand, counts[i], mask_id)
    return x[p:].tolist()


def elastic_generate(
    m: NaiveLLaDA, prompt, gen_length, mask_id, eos_ids, gamma=0.9, window=16, track_num=1, block_caching=True,
    early_stop=True, block_length=None, steps=None, threshold=None,
):  # fmt: skip
    """Elastic-Cache as its official LLaDA code runs it, with the engine's documented adaptations: the
    prompt's K/V are frozen after the first pass and tracked tokens are response positions.

    window: an int (sliding window of the leftmost masks, one token per step unless ``threshold``), or
    'block' (the window is the current block; LLaDA's fixed schedule with ``block_length`` / ``steps``).
    """
    p, n, num_layers = len(prompt), len(prompt) + gen_length, m.num_layers
    x = torch.full((n,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt)
    eos = torch.tensor(eos_ids)
    act = torch.arange(p, n)  # active positions
    xc, qc, kc, vc = {}, {}, {}, {}  # per layer, active rows
    pk, pv = {}, {}  # per layer, frozen prompt K/V
    track: dict[int, torch.Tensor] = {}
    block, step_in_block, counts = 0, 0, None
    spb = None if window != "block" else steps // (gen_length // block_length)

    def candidates():
        resp = x[p:]
        if window == "block":
            lo = block * block_length
            return (resp[lo : lo + block_length] == mask_id).nonzero().squeeze(-1) + lo + p
        masks = (resp == mask_id).nonzero().squeeze(-1)
        stops = torch.isin(resp, eos).nonzero()
        if early_stop and stops.numel():
            masks = masks[masks < int(stops[0])]
        return masks[:window] + p

    def tracked_from(layer, wrows_q, keys, key_pos):
        probs = m.probs(wrows_q, keys)  # [H, w, m]
        score = torch.zeros(n, dtype=torch.float64)
        score.index_add_(0, key_pos, probs.sum(dim=(0, 1)))
        score = score[p:]
        score[x[p:] == mask_id] = 0.0
        track[layer] = torch.topk(score, min(track_num, score.numel())).indices

    new_rows = torch.zeros(0, dtype=torch.long)
    first = True
    while True:
        cand = candidates()
        if cand.numel() == 0:
            break
        wrows = cand - p  # active rows of the window
        if first:
            h = m.embed(x.tolist())
            pos_all = torch.arange(n)
            for layer in range(num_layers):
                xc[layer] = h[p:].clone()
                q, k, v = m.qkv(layer, h, pos_all.tolist())
                qc[layer], kc[layer], vc[layer] = q[p:].clone(), k[p:].clone(), v[p:].clone()
                pk[layer], pv[layer] = k[:p].clone(), v[:p].clone()
                tracked_from(layer, q[cand], k, pos_all)
                h = m.finish(layer, h, q, k, v)
            logits = m.logits(h[cand])
            first = False
        else:
            t_rows = torch.unique(torch.cat(list(track.values())))
            rows = [wrows, new_rows, t_rows]
            if not block_caching:
                rows.append((x[p:] == mask_id).nonzero().squeeze(-1))
            qrows = torch.unique(torch.cat(rows))
            start = num_layers
            h = m.embed(x[act[qrows]].tolist())
            for layer in range(num_layers):
                if layer < start:  # reuse: only the queried rows
                    xc[layer][qrows] = h
                    q, k, v = m.qkv(layer, h, act[qrows].tolist())
                    q_old, k_old = qc[layer][t_rows].clone(), kc[layer].clone()
                    kc[layer][qrows], vc[layer][qrows], qc[layer][qrows] = k, v, q
                    keys = torch.cat([pk[layer], kc[layer]])
                    values = torch.cat([pv[layer], vc[layer]])
                    a_old = m.probs(q_old, torch.cat([pk[layer], k_old]))
                    a_new = m.probs(qc[layer][t_rows], keys)
                    if F.cosine_similarity(a_old, a_new, dim=0).mean() < gamma:
                        start = layer + 1
                    w_local = torch.searchsorted(qrows, wrows)
                    tracked_from(layer, q[w_local], keys, torch.arange(n))
                    h = m.finish(layer, h, q, keys, values)
                else:  # refresh: every active row from its cached layer input
                    if layer == start:
                        full = xc[layer].clone()
                        full[qrows] = h
                        h = full
                    xc[layer] = h.clone()
                    q, k, v = m.qkv(layer, h, act.tolist())
                    qc[layer], kc[layer], vc[layer] = q.clone(), k.clone(), v.clone()
                    keys, values = torch.cat([pk[layer], k]), torch.cat([pv[layer], v])
                    tracked_from(layer, q[wrows], keys, torch.arange(n))
                    h = m.finish(layer, h, q, keys, values)
            out_rows = wrows if start < num_layers else torch.searchsorted(qrows, wrows)
            logits = m.logits(h[out_rows])
        if window == "block":
            if counts is None:
                counts = [cand.numel() // spb + (i < cand.numel() % spb) for i in range(spb)]
            committed = _commit(x, logits, cand, counts[step_in_block], mask_id, threshold)
            step_in_block += 1
            if step_in_block == spb:
                block, step_in_block, counts = block + 1, 0, None
                if block == gen_length // block_length:
                    break
        else:
            committed = _commit(x, logits, cand, 1, mask_id, threshold)
        new_rows = committed - p
    return x[p:].tolist()
