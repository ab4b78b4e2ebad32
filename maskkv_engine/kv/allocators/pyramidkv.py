"""PyramidKV (Cai et al. 2024): a pyramid of layer budgets, most in the first layer and fewest in the
last, arithmetic in between, scheduled as its official code does with ``beta`` = 20
(Zefan-Cai/PyramidKV, ``pyramidkv/pyramidkv_utils.py``, ``PyramidKVCluster.update_kv``).

Each layer gets the scorer's window (tokens it always keeps; 0 for Mask-Voting) plus its step of the
arithmetic sequence over the rest of the budget; heads of a layer share its budget evenly. A top that
would exceed the prompt is capped there (the bottom rises to keep the mean); one layer, or no budget
beyond the window, gives a flat schedule.

Short prompts fall back to uniform SnapKV, as the official code does: when the prompt is shorter than
twice the budget beyond the window (``n_cached < 2 * (budget - window)``) every layer keeps the same
budget. (A prompt no longer than the budget keeps everything, which the budget clamp already gives.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.budgets import finalize_budgets, layer_wish_to_heads
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


@dataclass
class PyramidKVAllocator(Allocator):
    name = "pyramidkv"

    beta: float = 20.0  # ratio of the first layer's non-window budget to the last's, before capping

    def layer_budgets(self, ctx: PolicyContext, window: int) -> torch.Tensor:
        """Average per-head budget of each layer [L] (real-valued)."""
        num_layers, budget = ctx.num_layers, float(ctx.budget)
        w = float(min(window, ctx.budget, ctx.n_cached))
        rest = budget - w
        if num_layers == 1 or rest <= 0 or ctx.n_cached < 2 * rest:
            return torch.full((num_layers,), budget, dtype=torch.float64)
        min_num = rest / self.beta
        max_num = 2 * rest - min_num
        if max_num >= ctx.n_cached - w:
            max_num = max(ctx.n_cached - w, 0.0)
            min_num = 2 * rest - max_num
        step = (max_num - min_num) / (num_layers - 1)
        return w + max_num - step * torch.arange(num_layers, dtype=torch.float64)

    def plan(self, ctx: PolicyContext, stats: ModelStats | None, window: int = 0) -> BudgetPlan:
        wish = layer_wish_to_heads(self.layer_budgets(ctx, window), ctx.num_kv_heads)
        return BudgetPlan(per_head=finalize_budgets(wish, ctx.n_cached, ctx.budget))
