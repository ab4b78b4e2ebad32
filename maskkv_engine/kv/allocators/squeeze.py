"""SqueezeAttention (Wang et al. 2024): layer budgets from layer importance.

Layers are clustered into ``num_groups`` groups by the cosine similarity of their attention sub-layer's
input and output (1-D k-means); the group that changes the hidden state least gets ``squeeze_ratio`` of
the average budget, and what it frees is spread evenly over the other layers. Heads of a layer share
its budget evenly. The similarities come from the calibration profile (layer importance =
1 - similarity), or are measured online per request. ``squeeze_ratio`` is the paper's hyperparameter p
(the least important group's share of the average budget); its default 0.4 is the setting the paper
uses (it was 0.3 here before).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.budgets import finalize_budgets, layer_wish_to_heads
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """Deterministic Lloyd's k-means on scalars (centroids start at evenly spaced quantiles)."""
    v = values.double()
    centroids = torch.quantile(v, torch.linspace(0, 1, k, dtype=torch.float64))
    labels = torch.zeros_like(v, dtype=torch.long)
    for _ in range(iters):
        labels = torch.argmin((v[:, None] - centroids[None, :]).abs(), dim=1)
        new = torch.stack([v[labels == j].mean() if (labels == j).any() else centroids[j] for j in range(k)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return labels


@dataclass
class SqueezeAllocator(Allocator):
    name = "squeeze"
    needs_stats = True

    num_groups: int = 3
    squeeze_ratio: float = 0.4  # share of the average budget the least important group keeps
    profile_path: str | None = None  # calibration profile (default: maskkv_profile.json next to the model)

    def layer_budgets(self, ctx: PolicyContext, importance: torch.Tensor) -> torch.Tensor:
        """Average per-head budget of each layer [L] (real-valued; sums to budget * L)."""
        num_layers, budget = ctx.num_layers, float(ctx.budget)
        similarity = 1.0 - importance.double()
        if num_layers < self.num_groups or torch.allclose(similarity, similarity[0].expand_as(similarity)):
            return torch.full((num_layers,), budget, dtype=torch.float64)
        labels = kmeans_1d(similarity, self.num_groups)
        means = torch.stack(
            [
                similarity[labels == j].mean() if (labels == j).any() else torch.tensor(-1.0)
                for j in range(self.num_groups)
            ]
        )
        lazy = labels == int(torch.argmax(means))  # most similar in/out: the least important layers
        n_lazy = int(lazy.sum())
        out = torch.full((num_layers,), budget, dtype=torch.float64)
        out[lazy] = budget * self.squeeze_ratio
        out[~lazy] = (budget * num_layers - budget * self.squeeze_ratio * n_lazy) / (num_layers - n_lazy)
        return out

    def plan(self, ctx: PolicyContext, stats: ModelStats | None, window: int = 0) -> BudgetPlan:
        if stats is None:
            raise ValueError("squeeze needs layer importance (a profile or online statistics)")
        wish = layer_wish_to_heads(self.layer_budgets(ctx, stats.layer_importance), ctx.num_kv_heads)
        return BudgetPlan(per_head=finalize_budgets(wish, ctx.n_cached, ctx.budget))
