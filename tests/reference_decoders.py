"""The released LLaDA and Dream decoding loops, restated for tests (batch of one, whole-sequence logits).

They take ``logits_fn(x) -> [N, V]`` (the model's own per-position logits over the full sequence)
and recompute everything every step, exactly like the official ``generate`` functions. The engine's
``kv_policy="none"`` must reproduce them token for token.

One deliberate difference from the official loops, as in the engine: the mask id is never committed
(``never_commit_mask``). The official code can write the mask id back (a random model predicts it), which
leaves that position masked; trained checkpoints never predict it, so their outputs are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def never_commit_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The logits with the mask id at -inf (the engine's Sampler does the same)."""
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    return logits


def llada_generate(logits_fn, prompt, steps, gen_length, block_length, mask_id, cfg_scale=0.0):
    """LLaDA's generate(): greedy, low_confidence remasking, semi-autoregressive blocks."""
    p = len(prompt)
    x = torch.full((p + gen_length,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        lo, hi = p + b * block_length, p + (b + 1) * block_length
        n_masks = int((x[lo:hi] == mask_id).sum())
        counts = [
            n_masks // steps_per_block + (1 if i < n_masks % steps_per_block else 0) for i in range(steps_per_block)
        ]
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                cond, uncond = logits_fn(x), logits_fn(un_x)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = logits_fn(x)
            logits = never_commit_mask(logits, mask_id)
            x0 = torch.argmax(logits, dim=-1)
            probs = F.softmax(logits.double(), dim=-1)
            x0_p = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
            x0_p[hi:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-float("inf"), dtype=torch.float64))
            if counts[i] > 0:
                idx = torch.topk(confidence, counts[i]).indices
                x[idx] = x0[idx]
    return x[p:].tolist()


def dream_generate(logits_fn, prompt, steps, gen_length, mask_id, alg, eps=1e-3):
    """Dream's _sample(): greedy (temperature 0), algorithms maskgit_plus / topk_margin / entropy."""
    p = len(prompt)
    x = torch.full((p + gen_length,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = logits_fn(x)
        logits = torch.cat([logits[:1], logits[:-1]], dim=0)  # token i predicted from position i-1
        mask_logits = never_commit_mask(logits[mask_index].float(), mask_id)
        t, s = timesteps[i], timesteps[i + 1]
        probs = torch.softmax(mask_logits, dim=-1)
        confidence, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            top2 = torch.sort(probs, dim=-1, descending=True).values
            confidence = top2[:, 0] - top2[:, 1]
        elif alg == "entropy":
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        num_mask = mask_index.sum() / 1
        n = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        full_conf = torch.full(x.shape, -torch.inf, dtype=confidence.dtype)
        full_conf[mask_index] = confidence
        if n > 0:
            idx = torch.topk(full_conf, n).indices
            x_ = torch.full_like(x, mask_id)
            x_[mask_index] = x0
            x[idx] = x_[idx]
    return x[p:].tolist()
