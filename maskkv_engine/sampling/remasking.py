"""Token choice and confidence at masked positions, as LLaDA's and Dream's released decoders compute them.

Each function takes the logits of the candidate positions of ONE request ``[C, V]`` and that request's
``torch.Generator``, so its random draws never depend on the rest of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def llada_choose(
    logits: torch.Tensor, temperature: float, remasking: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA: Gumbel-max sampling in float64 (argmax when temperature is 0), then a confidence per position.

    'low_confidence': the float64 softmax probability of the chosen token; 'random': a uniform draw.
    """
    if temperature > 0:
        noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
        x0 = torch.argmax(logits.double().exp() / (-torch.log(noise)) ** temperature, dim=-1)
    else:
        x0 = torch.argmax(logits, dim=-1)
    if remasking == "low_confidence":
        p = F.softmax(logits.double(), dim=-1)
        confidence = torch.gather(p, -1, x0[:, None]).squeeze(-1)
    elif remasking == "random":
        confidence = torch.rand(x0.shape, dtype=torch.float64, generator=generator, device=logits.device)
    else:
        raise ValueError(f"remasking={remasking!r} is not a LLaDA rule (allowed: 'low_confidence', 'random')")
    return x0, confidence


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the first token above the threshold
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_choose(
    logits: torch.Tensor,
    alg: str,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``sample_tokens``: (confidence, token) per position, confidence by the algorithm.

    'maskgit_plus' (alias 'low_confidence'): probability of the chosen token; 'topk_margin': top-1 minus
    top-2 probability; 'entropy': negative entropy; 'origin': same as maskgit_plus (its confidence is unused).
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p(logits, top_p)
    if top_k is not None:
        logits = _top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        confidence = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    elif alg not in ("maskgit_plus", "low_confidence", "origin"):
        raise ValueError(
            f"remasking={alg!r} is not a Dream algorithm (allowed: origin, maskgit_plus, topk_margin, entropy)"
        )
    return x0, confidence
