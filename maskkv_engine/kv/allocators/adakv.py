"""AdaKV (Feng et al. 2024): each layer keeps the uniform total, split between its heads by a global
top-k over all heads' scores, after every head is guaranteed a floor of ``floor_alpha`` of the per-head
average. The split depends on the layer's scores, so the plan is per layer and the capture asks
``split_heads`` once the layer is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.budgets import total_budget
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


@dataclass
class AdaKVAllocator(Allocator):
    name = "adakv"

    floor_alpha: float = 0.2  # share of the per-head average every head keeps at least

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
        floor = min(int(self.floor_alpha * layer_total / num_heads), n)
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        ranked = torch.gather(scores, 1, order)  # each head's scores, best first
        budgets = torch.full((num_heads,), floor, dtype=torch.long)
        rest = layer_total - floor * num_heads
        if rest > 0 and floor < n:
            pool = ranked[:, floor:].reshape(-1)  # what is left after the floors, all heads together
            picks = torch.topk(pool, min(rest, pool.numel())).indices
            budgets += torch.bincount(picks // (n - floor), minlength=num_heads)
        return budgets
