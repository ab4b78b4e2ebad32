"""Which candidate positions a step commits: a fixed count (top-k), or Fast-dLLM's parallel rules.

All functions take one request's candidate confidences ``[C]`` and return indices into them. The parallel
rules commit a prefix of the candidates ranked by confidence, of a length only the device knows: their
``rank_*`` forms return that ranking and the length as a 0-d tensor, so the sampler reads every request's
choice to the host in one copy per step instead of a sync per request.
"""

from __future__ import annotations

import torch


def select_top_k(confidence: torch.Tensor, k: int) -> torch.Tensor:
    """The k most confident candidates (LLaDA / Dream fixed schedules)."""
    k = min(k, confidence.numel())
    if k <= 0:
        return confidence.new_zeros(0, dtype=torch.long)
    return torch.topk(confidence, k).indices


def select_sampled(
    confidence: torch.Tensor, k: int, alg_temp: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Dream with ``alg_temp`` > 0: draw k positions from softmax(confidence / alg_temp), no replacement."""
    k = min(k, confidence.numel())
    if k <= 0:
        return confidence.new_zeros(0, dtype=torch.long)
    weights = torch.softmax(confidence.float() / alg_temp, dim=-1)
    return torch.multinomial(weights, k, generator=generator)


def rank_threshold(confidence: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM: always the most confident candidate, plus every other with confidence >= threshold.
    (candidates by confidence, how many of them commit: a 0-d tensor on the confidence's device)."""
    order = torch.argsort(confidence, descending=True, stable=True)
    keep = confidence[order] >= threshold  # sorted descending: a prefix
    keep[:1] = True
    return order, keep.long().cumprod(0).sum()


def select_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    order, count = rank_threshold(confidence, threshold)
    return order[: int(count)]


def rank_factor(confidence: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM's factor rule: the longest confident prefix with c(n) >= 1 - factor / (n + 1).

    As the official code does it: the top-1 is always committed, and when the first failure is at the
    last candidate, all candidates are committed. Returns (candidates by confidence, count as a 0-d tensor).
    """
    m = confidence.numel()
    order = torch.argsort(confidence, descending=True, stable=True)
    if m == 0:
        return order, torch.zeros((), dtype=torch.long, device=confidence.device)
    i = torch.arange(m, dtype=torch.float64, device=confidence.device)
    bound = torch.where(i == 0, -1.0, 1.0 - factor / (i + 2))  # float64, as the official Python floats
    fail = confidence[order].double() < bound
    first = torch.where(fail.any(), fail.long().argmax(), m - 1)
    return order, torch.where((first == 0) | (first == m - 1), first + 1, first)


def select_factor(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    order, count = rank_factor(confidence, factor)
    return order[: int(count)]
