"""How many masked tokens each denoising step commits, as the released decoders count them."""

from __future__ import annotations

import torch


def llada_transfer_counts(mask_count: int, steps: int) -> list[int]:
    """LLaDA's ``get_num_transfer_tokens``: a block's masks spread evenly over its steps, extras first.

    10 masks over 4 steps commit 3, 3, 2, 2.
    """
    base, extra = divmod(mask_count, steps)
    return [base + 1 if i < extra else base for i in range(steps)]


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    """Dream's ``linspace(1, eps, steps + 1)`` in float32, as its generation code builds it."""
    return torch.linspace(1, eps, steps + 1)


def dream_transfer_count(num_masks: int, step: int, steps: int, eps: float) -> int:
    """Dream: ``int(num_masks * (1 - s / t))`` in float32; the last step commits every mask left."""
    if step >= steps - 1:
        return num_masks
    ts = dream_timesteps(steps, eps)
    t, s = ts[step], ts[step + 1]
    n = torch.tensor(num_masks, dtype=torch.long) / 1  # float32 like mask_index.sum() / batch
    return int(n * (1 - s / t))


def dream_transfer_probability(step: int, steps: int, eps: float) -> torch.Tensor:
    """Dream 'origin': each masked position is revealed with probability 1 - s/t (1 at the last step)."""
    if step >= steps - 1:
        return torch.tensor(1.0)
    ts = dream_timesteps(steps, eps)
    return 1 - ts[step + 1] / ts[step]
