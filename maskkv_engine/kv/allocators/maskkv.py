"""MaskKV's budgets (arXiv 2510.09309, A.1-A.2): boundary-aware layer budgets, prompt-preference heads.

Layers: the total (budget x L per head) is split into a base k_base = beta * budget per layer and an
importance part, shared between the boundary layers (first and last) and the middle layers in proportion
to their summed layer importance I(l) = 1 - mean cos(h_in, h_out); each layer of a group gets an equal
share of it. Heads: inside a layer, head h gets alpha * k_l + (1 - alpha) * H * k_l * P̂[l, h], with P̂
the head's prompt preference (the mask queries' attention mass on the prompt) normalised over the layer.
Both statistics come from the request itself online (no profile: every layer's prompt KV is held until
the pass ends). With a calibration profile, as the paper does ("offline layer-wise, adaptive head-wise"):
the layer budgets come from the profile, known before the pass, and with ``head_budgets="request"``
(the default) each layer's head budgets come from THIS request's prompt preference, measured in its
first pass at that layer (it needs only that layer's attention), so eviction stays layer by layer;
``head_budgets="profile"`` takes the head budgets from the profile too (fixed per model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.budgets import finalize_budgets, integerize, water_fill
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


@dataclass
class MaskKVAllocator(Allocator):
    name = "maskkv"
    needs_stats = True

    alpha: float = 0.1  # head base rate
    beta: float = 0.4  # layer base rate
    boundary_layers: tuple[int, ...] = field(default=(0, -1))  # negative indices count from the end
    profile_path: str | None = None  # calibration profile (default: maskkv_profile.json next to the model)
    head_budgets: str = "request"  # with a profile: "request" (this request's preference) | "profile"

    def __post_init__(self) -> None:
        if self.head_budgets not in ("request", "profile"):
            raise ValueError(f"head_budgets={self.head_budgets!r} must be 'request' or 'profile'")
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

    def plan_from_profile(self, ctx: PolicyContext, profile: ModelStats | None, window: int = 0) -> BudgetPlan:
        """Layer budgets from the profile; head budgets per request (``head_budgets="request"``) or from
        the profile. The layer totals are exactly those of the profile's per-head plan."""
        plan = self.plan(ctx, profile, window)
        if self.head_budgets == "profile":
            return plan
        assert plan.per_head is not None
        return BudgetPlan(per_layer=plan.per_head.sum(dim=1), needs_preference=True)

    def split_heads(
        self,
        layer: int,
        layer_total: int,
        scores: torch.Tensor,
        ctx: PolicyContext,
        preference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head budgets of one layer from this request's prompt preference [H_kv] at the layer: the
        paper's alpha * k_l + (1 - alpha) * H * k_l * P̂[h], clamped and integerised to ``layer_total``."""
        if preference is None:
            raise ValueError("maskkv's per-request head budgets need the layer's prompt preference")
        num_heads = int(preference.numel())
        k_l = torch.tensor([layer_total / num_heads], dtype=torch.float64)
        wish = self.head_wish(k_l, preference.reshape(1, num_heads))[0]
        cap = ctx.n_cached
        return integerize(water_fill(wish, float(cap), float(layer_total)), cap, layer_total)
