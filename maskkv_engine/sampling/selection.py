"""Which candidate positions a step commits: a fixed count (top-k), or Fast-dLLM's parallel rules.

All functions take one request's candidate confidences ``[C]`` and return indices into them.
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


def select_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM: always the most confident candidate, plus every other with confidence >= threshold."""
    if confidence.numel() == 0:
        return confidence.new_zeros(0, dtype=torch.long)
    order = torch.argsort(confidence, descending=True, stable=True)
    keep = confidence[order] >= threshold
    keep[0] = True
    return order[keep]


def select_factor(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule: the longest confident prefix with c(n) >= 1 - factor / (n + 1).

    As the official code does it: the top-1 is always committed, and when the first failure is at the
    last candidate, all candidates are committed.
    """
    m = confidence.numel()
    if m == 0:
        return confidence.new_zeros(0, dtype=torch.long)
    order = torch.argsort(confidence, descending=True, stable=True)
    ranked = confidence[order].tolist()
    n = m - 1
    for i in range(m):
        bound = -1.0 if i == 0 else 1.0 - factor / (i + 2)
        if ranked[i] < bound:
            n = i
            break
    if n == 0 or n == m - 1:
        n += 1
    return order[:n]
