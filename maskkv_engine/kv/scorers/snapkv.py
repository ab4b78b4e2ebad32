"""SnapKV's scorer (Li et al. 2024): the last ``window_size`` prompt tokens vote for the rest.

Votes are max-pooled (kernel 7) so the neighbours of a hit survive together; the window itself is always
kept, latest first, so it shrinks when the budget is smaller than it. PyramidKV, AdaKV and
SqueezeAttention use this scorer, as in the MaskKV paper's baselines.

In a dLLM the window queries attend bidirectionally, so their softmax runs over all keys (prompt and
response masks), exactly as the model's own attention does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.types import PolicyContext


@dataclass
class SnapKVScorer(Scorer):
    name = "snapkv"

    window_size: int = 32  # observation window (tokens)
    kernel_size: int = 7  # pooling kernel (tokens), odd
    pooling: str = "maxpool"

    def __post_init__(self) -> None:
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"window_size={self.window_size!r} must be an integer >= 1")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size!r} must be an odd integer >= 1")
        if self.pooling not in ("maxpool", "avgpool"):
            raise ValueError(f"pooling={self.pooling!r} must be 'maxpool' or 'avgpool'")

    def window(self, ctx: PolicyContext) -> int:
        return min(self.window_size, ctx.n_cached)

    def observation(self, ctx: PolicyContext) -> slice:
        return slice(ctx.n_cached - self.window(ctx), ctx.n_cached)

    def score(self, probs: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
        n, w = ctx.n_cached, self.window(ctx)
        votes = probs[:, :, : n - w].sum(dim=1).mean(dim=0)  # [n - w]
        if votes.numel():
            pool = F.max_pool1d if self.pooling == "maxpool" else F.avg_pool1d
            pad = self.kernel_size // 2
            votes = pool(votes[None, None], kernel_size=self.kernel_size, stride=1, padding=pad)[0, 0]
            if self.pooling == "avgpool":
                votes = votes[: n - w]
        # window tokens outrank every vote (a vote sums at most w probabilities); the latest first,
        # so a budget smaller than the window keeps the last tokens
        window = (w + 1.0) + torch.arange(w, dtype=probs.dtype, device=probs.device)
        return torch.cat([votes, window])
