"""Uniform: every (layer, head) keeps min(budget, n_cached) tokens (SnapKV's own allocation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


def uniform_budgets(ctx: PolicyContext) -> torch.Tensor:
    """[L, H_kv] all min(budget, n_cached)."""
    keep = min(ctx.budget, ctx.n_cached)
    return torch.full((ctx.num_layers, ctx.num_kv_heads), keep, dtype=torch.long)


@dataclass
class UniformAllocator(Allocator):
    name = "uniform"

    def plan(self, ctx: PolicyContext, stats: ModelStats | None, window: int = 0) -> BudgetPlan:
        return BudgetPlan(per_head=uniform_budgets(ctx))
