"""Independent single-sequence decoders with KV reuse, transcribed from the official code of each
method (NVlabs/Fast-dLLM llada/generate.py, maomaocun/dLLM-cache dllm_cache/hooks/cache_hook_LLaDA.py,
VILA-Lab/Elastic-Cache llada/generate.py + model/modeling_llada.py; see shared/REFRESH.md) on top of
the naive float64 LLaDA, to compare the batched paged engine with.

Greedy, LLaDA low-confidence remasking, batch of one, the prompt cached in full. Where the engine
deliberately differs from the official code (docs/refresh.md), the decoder says so at that line.
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


def _attention_out(m: NaiveLLaDA, layer, q, keys, values):
    """Attention block output (after attn_out) of queries q over the given keys / values."""
    v = values.transpose(0, 1).repeat_interleave(m.nh // m.nkv, dim=0)
    att = (m.probs(q, keys) @ v).transpose(0, 1).reshape(q.shape[0], m.d)
    return att @ m.w[f"model.transformer.blocks.{layer}.attn_out.weight"].T


def _mlp_out(m: NaiveLLaDA, layer, x):
    """MLP block output (after ff_out), without the residual."""
    p = f"model.transformer.blocks.{layer}."
    h = m.rms(x, m.w[p + "ff_norm.weight"])
    gate, up = h @ m.w[p + "ff_proj.weight"].T, h @ m.w[p + "up_proj.weight"].T
    return (F.silu(gate) * up) @ m.w[p + "ff_out.weight"].T


def dllm_cache_generate(m: NaiveLLaDA, prompt, steps, gen_length, block_length, mask_id, K_p, K_r, rho):
    """dLLM-Cache as its official LLaDA hook runs it (cache_hook_feature): per forward s (1-based) and
    layer, the prompt is refreshed when (s-1) % K_p == 0, the response when (s-1) % K_r == 0, layer 0
    always both. Cached per part: K, V, attention output, MLP output. V-verify runs only when
    0 < rho <= 1 (the hook's ``transfer``); only then is the response V replaced between refreshes."""
    p, n, num_layers = len(prompt), len(prompt) + gen_length, m.num_layers
    x = torch.full((n,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt)
    pos_p, pos_g = list(range(p)), list(range(p, n))
    transfer = 0 < rho <= 1
    cache: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    s = 0
    for b in range(num_blocks):
        lo, hi = p + b * block_length, p + (b + 1) * block_length
        n_masks = int((x[lo:hi] == mask_id).sum())
        counts = [n_masks // spb + (i < n_masks % spb) for i in range(spb)]
        for i in range(spb):
            s += 1
            h = m.embed(x.tolist())
            for layer in range(num_layers):
                c = cache[layer]
                ref_g = (s - 1) % K_r == 0 or layer == 0
                ref_p = (s - 1) % K_p == 0 or layer == 0
                idx = None
                if ref_g and ref_p:  # both: everything recomputed
                    q, k, v = m.qkv(layer, h, list(range(n)))
                    c["pk"], c["pv"], c["gk"], c["gv"] = k[:p].clone(), v[:p].clone(), k[p:].clone(), v[p:].clone()
                    att = _attention_out(m, layer, q, k, v)
                    c["ap"], c["ag"] = att[:p].clone(), att[p:].clone()
                elif ref_g:  # response only: prompt K/V and attention from the cache
                    q, k, v = m.qkv(layer, h[p:], pos_g)
                    c["gk"], c["gv"] = k.clone(), v.clone()
                    c["ag"] = _attention_out(m, layer, q, torch.cat([c["pk"], k]), torch.cat([c["pv"], v]))
                    att = torch.cat([c["ap"], c["ag"]])
                else:
                    if ref_p:
                        qp, kp, vp = m.qkv(layer, h[:p], pos_p)
                        c["pk"], c["pv"] = kp.clone(), vp.clone()
                    if transfer:  # V-verify: V of every response row, the least similar rows recomputed
                        qg, kg, vg = m.qkv(layer, h[p:], pos_g)
                        sim = F.cosine_similarity(vg.reshape(gen_length, -1), c["gv"].reshape(gen_length, -1), dim=-1)
                        idx = torch.topk(sim, int(gen_length * rho), largest=False).indices
                        c["gv"] = vg.clone()
                        c["gk"][idx] = kg[idx]
                    keys, values = torch.cat([c["pk"], c["gk"]]), torch.cat([c["pv"], c["gv"]])
                    if ref_p:
                        queries = torch.cat([qp, qg[idx]]) if transfer else qp
                        out = _attention_out(m, layer, queries, keys, values)
                        c["ap"] = out[:p].clone()
                        if transfer:
                            c["ag"][idx] = out[p:]
                    elif transfer:
                        c["ag"][idx] = _attention_out(m, layer, qg[idx], keys, values)
                    att = torch.cat([c["ap"], c["ag"]])
                h = h + att
                if ref_g and ref_p:
                    mlp = _mlp_out(m, layer, h)
                    c["mp"], c["mg"] = mlp[:p].clone(), mlp[p:].clone()
                elif ref_g:
                    c["mg"] = _mlp_out(m, layer, h[p:])
                else:
                    rows = h[:p] if ref_p else h[:0]
                    if transfer:
                        rows = torch.cat([rows, h[p:][idx]])
                    out = _mlp_out(m, layer, rows)
                    if ref_p:
                        c["mp"] = out[:p].clone()
                    if transfer:
                        c["mg"][idx] = out[out.shape[0] - idx.numel() :]
                h = h + torch.cat([c["mp"], c["mg"]])
            logits = m.logits(h)
            cand = (x[lo:hi] == mask_id).nonzero().squeeze(-1) + lo
            if counts[i] > 0:
                _commit(x, logits[cand], cand, counts[i], mask_id)
    return x[p:].tolist()


def elastic_generate(
    m: NaiveLLaDA, prompt, gen_length, mask_id, eos_ids, gamma=0.9, window=16, track_num=1, block_caching=True,
    early_stop=True, block_length=None, steps=None, threshold=None, return_steps=False,
):  # fmt: skip
    """Elastic-Cache as its official LLaDA code runs it (generate_with_elastic_cache and
    LLaDABlock.attention), with the engine's documented adaptations: the prompt's K/V are frozen after
    the first pass and tracked tokens are response positions.

    window: an int (sliding window of the leftmost masks, one token per step unless ``threshold``), or
    'block' (the window is the current block; LLaDA's fixed schedule with ``block_length`` / ``steps``).
    return_steps: also return the number of forward passes.
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
    # official `masked_position`: the decoding region's masks (response rows); cut ONCE, at the first step
    # that commits an EOS, to the masks before the leftmost EOS committed by that step
    region = torch.arange(gen_length)
    decoded_eos = False

    def candidates():
        if window == "block":
            lo = block * block_length
            return (x[p + lo : p + lo + block_length] == mask_id).nonzero().squeeze(-1) + lo + p
        return region[:window] + p

    def tracked_from(layer, mrows_q, keys, key_pos):
        """Official: attention summed over heads and the queried mask rows; the region's masks score 0
        (masks cut off by the early stop do not); the top ``track_num``. Adaptation: only response
        positions that are not region masks can be tracked, so nothing is tracked before one exists."""
        probs = m.probs(mrows_q, keys)  # [H, w, m]
        score = torch.zeros(n, dtype=torch.float64)
        score.index_add_(0, key_pos, probs.sum(dim=(0, 1)))
        score = score[p:]
        allowed = torch.ones(gen_length, dtype=torch.bool)
        allowed[region] = False
        idx = allowed.nonzero().squeeze(-1)
        top = torch.topk(score[idx], min(track_num, idx.numel())).indices
        track[layer] = idx[top]

    new_rows = torch.zeros(0, dtype=torch.long)
    first = True
    num_steps = 0
    while True:
        if window == "block":
            region = (x[p:] == mask_id).nonzero().squeeze(-1)
        cand = candidates()
        if cand.numel() == 0:
            break
        wrows = cand - p  # active rows of the window
        mrows = wrows if block_caching else region  # official `query_masked_position`
        if first:
            h = m.embed(x.tolist())
            pos_all = torch.arange(n)
            for layer in range(num_layers):
                xc[layer] = h[p:].clone()
                q, k, v = m.qkv(layer, h, pos_all.tolist())
                qc[layer], kc[layer], vc[layer] = q[p:].clone(), k[p:].clone(), v[p:].clone()
                pk[layer], pv[layer] = k[:p].clone(), v[:p].clone()
                tracked_from(layer, q[mrows + p], k, pos_all)
                h = m.finish(layer, h, q, k, v)
            logits = m.logits(h[cand])
            first = False
        else:
            t_rows = torch.unique(torch.cat(list(track.values())))
            rows = [wrows, new_rows, t_rows]
            if not block_caching:
                rows.append(region)
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
                    if t_rows.numel():
                        a_old = m.probs(q_old, torch.cat([pk[layer], k_old]))
                        a_new = m.probs(qc[layer][t_rows], keys)
                        if F.cosine_similarity(a_old, a_new, dim=0).mean() < gamma:
                            start = layer + 1
                    m_local = torch.searchsorted(qrows, mrows)
                    tracked_from(layer, q[m_local], keys, torch.arange(n))
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
                    tracked_from(layer, q[mrows], keys, torch.arange(n))
                    h = m.finish(layer, h, q, keys, values)
            out_rows = wrows if start < num_layers else torch.searchsorted(qrows, wrows)
            logits = m.logits(h[out_rows])
        num_steps += 1
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
            region = region[~torch.isin(region, committed - p)]
            eos_pos = committed[torch.isin(x[committed], eos)] - p
            if early_stop and not decoded_eos and eos_pos.numel():
                decoded_eos = True
                region = region[region < int(eos_pos.min())]
        new_rows = committed - p
    out = x[p:].tolist()
    return (out, num_steps) if return_steps else out
