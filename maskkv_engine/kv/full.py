"""``full``: cache every prompt token's KV once (after the first pass); recompute the response each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.kv.base import BudgetPlan, KVPolicy, ModelStats, PolicyContext


@dataclass
class FullCachePolicy(KVPolicy):
    name = "full"
    needs_scores = False

    def plan(self, ctx: PolicyContext, stats: ModelStats | None) -> BudgetPlan:
        return BudgetPlan(per_head=torch.full((ctx.num_layers, ctx.num_kv_heads), ctx.n_cached, dtype=torch.long))
