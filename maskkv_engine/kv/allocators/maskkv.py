"""MaskKV's budgets (arXiv 2510.09309, A.1-A.2): boundary-aware layer budgets, prompt-preference heads.

Layers: the total (budget x L per head) is split into a base k_base = beta * budget per layer and an
importance part, shared between the boundary layers (first and last) and the middle layers in proportion
to their summed layer importance I(l) = 1 - mean cos(h_in, h_out); each layer of a group gets an equal
share of it. Heads: inside a layer, head h gets alpha * k_l + (1 - alpha) * H * k_l * P̂[l, h], with P̂
the head's prompt preference (the mask queries' attention mass on the prompt) normalised over the layer.
Both statistics come from a calibration profile, or from the request itself online.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.budgets import finalize_budgets
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


@dataclass
class MaskKVAllocator(Allocator):
    name = "maskkv"
    needs_stats = True

    alpha: float = 0.1  # head base rate
    beta: float = 0.4  # layer base rate
    boundary_layers: tuple[int, ...] = field(default=(0, -1))  # negative indices count from the end
    profile_path: str | None = None  # calibration profile (default: maskkv_profile.json next to the model)

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1]")
        self.boundary_layers = tuple(int(i) for i in self.boundary_layers)

    def layer_budgets(self, num_layers: int, budget: float, importance: torch.Tensor) -> torch.Tensor:
        """Average per-head budget of each layer [L] (real-valued; sums to budget * L)."""
        boundary = sorted({i % num_layers for i in self.boundary_layers})
        middle = [i for i in range(num_layers) if i not in boundary]
        imp = importance.double().clamp(min=0)
        k_base = self.beta * budget
        k_imp = (1.0 - self.beta) * budget * num_layers
        groups = [g for g in (boundary, middle) if g]
        sums = [float(imp[g].sum()) for g in groups]
        whole = sum(sums)
        out = torch.full((num_layers,), k_base, dtype=torch.float64)
        for g, s in zip(groups, sums):
            share = k_imp * (s / whole if whole > 0 else len(g) / num_layers)
            out[g] += share / len(g)
        return out

    def head_wish(self, layer_budget: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
        """[L, H] = alpha * k_l + (1 - alpha) * H * k_l * P̂[l, h]."""
        num_heads = preference.shape[1]
        pref = preference.double().clamp(min=0)
        norm = pref.sum(dim=1, keepdim=True)
        p_hat = torch.where(norm > 0, pref / norm.clamp(min=1e-30), torch.full_like(pref, 1.0 / num_heads))
        k = layer_budget.double()[:, None]
        return self.alpha * k + (1.0 - self.alpha) * num_heads * k * p_hat

    def plan(self, ctx: PolicyContext, stats: ModelStats | None, window: int = 0) -> BudgetPlan:
        if stats is None:
            raise ValueError("maskkv needs layer importance and prompt preference (a profile or online statistics)")
        layer = self.layer_budgets(ctx.num_layers, float(ctx.budget), stats.layer_importance)
        wish = self.head_wish(layer, stats.prompt_preference)
        return BudgetPlan(per_head=finalize_budgets(wish, ctx.n_cached, ctx.budget))
