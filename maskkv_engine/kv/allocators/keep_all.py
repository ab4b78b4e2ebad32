"""Keep all (``full``): every head of every layer keeps every cached token, whatever the budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


@dataclass
class KeepAllAllocator(Allocator):
    name = "keep_all"
    keeps_all = True

    def plan(self, ctx: PolicyContext, stats: ModelStats | None, window: int = 0) -> BudgetPlan:
        return BudgetPlan(per_head=torch.full((ctx.num_layers, ctx.num_kv_heads), ctx.n_cached, dtype=torch.long))
