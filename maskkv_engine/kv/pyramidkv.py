"""PyramidKV: SnapKV scoring with a pyramid of layer budgets (most in the first layer, fewest in the
last, arithmetic in between), as its official code schedules it with beta = 20."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.kv.base import BudgetPlan, ModelStats, PolicyContext
from maskkv_engine.kv.budgets import finalize_budgets, layer_wish_to_heads
from maskkv_engine.kv.snapkv import SnapKVPolicy


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    name = "pyramidkv"

    beta: float = 20.0

    def layer_budgets(self, ctx: PolicyContext) -> torch.Tensor:
        """Per-head budget of each layer: window + an arithmetic sequence from max_num down to min_num
        whose mean is the non-window budget; the top is capped by the prompt like the official code."""
        num_layers, budget = ctx.num_layers, float(ctx.budget)
        w = float(min(self.window_size, ctx.budget, ctx.n_cached))
        rest = budget - w
        if num_layers == 1 or rest <= 0:
            return torch.full((num_layers,), budget, dtype=torch.float64)
        min_num = rest / self.beta
        max_num = 2 * rest - min_num
        if max_num >= ctx.n_cached - w:
            max_num = max(ctx.n_cached - w, 0.0)
            min_num = 2 * rest - max_num
        step = (max_num - min_num) / (num_layers - 1)
        return w + max_num - step * torch.arange(num_layers, dtype=torch.float64)

    def plan(self, ctx: PolicyContext, stats: ModelStats | None) -> BudgetPlan:
        wish = layer_wish_to_heads(self.layer_budgets(ctx), ctx.num_kv_heads)
        return BudgetPlan(per_head=finalize_budgets(wish, ctx.n_cached, ctx.budget))
