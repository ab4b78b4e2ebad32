"""AdaKV (Feng et al. 2024): each layer keeps the uniform total, split between its heads by how many of
each head's scores make a top-k taken over all the layer's heads together, mixed with a uniform floor.

As the official code does (FFY0/AdaKV, ``adaptive_snapkv/monkeypatch/snapkv_utils.py``,
``AdaptiveSnapKVCluster.update_kv_gqa``): ``c_h`` = how many of head h's scores are in the flattened
top-(layer total) of all heads' scores; head h keeps ``(1 - floor_alpha) * c_h + floor_alpha * per-head
average``, so every head keeps at least ``floor_alpha`` of the average. The split depends on the layer's
scores, so the plan is per layer and the capture asks ``split_heads`` once the layer is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.budgets import integerize, total_budget, water_fill
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


@dataclass
class AdaKVAllocator(Allocator):
    name = "adakv"

    floor_alpha: float = 0.2  # share of the per-head average every head keeps at least

    def __post_init__(self) -> None:
        if not isinstance(self.floor_alpha, (int, float)) or not 0.0 <= self.floor_alpha <= 1.0:
            raise ValueError(f"floor_alpha={self.floor_alpha!r} must be a number in [0, 1]")

    def plan(self, ctx: PolicyContext, stats: ModelStats | None, window: int = 0) -> BudgetPlan:
        per_layer = total_budget(1, ctx.num_kv_heads, ctx.budget, ctx.n_cached)
        return BudgetPlan(per_layer=torch.full((ctx.num_layers,), per_layer, dtype=torch.long))

    def split_heads(
        self,
        layer: int,
        layer_total: int,
        scores: torch.Tensor,
        ctx: PolicyContext,
        preference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_heads, n = scores.shape
        # each head's share of the flattened top-k (ties: lower head first, so the split is deterministic)
        order = torch.argsort(scores.reshape(-1).double(), descending=True, stable=True)
        counts = torch.bincount(order[: min(layer_total, order.numel())] // n, minlength=num_heads)
        wish = (1.0 - self.floor_alpha) * counts.double() + self.floor_alpha * (layer_total / num_heads)
        return integerize(water_fill(wish, float(n), float(layer_total)), n, layer_total)
