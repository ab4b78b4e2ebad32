"""Allocator: how many cached tokens each (layer, KV head) keeps, for one request.

An allocator never looks at which tokens are kept (that is the scorer's job), so any allocator composes
with any scorer. It turns a request's shape (and, if it ``needs_stats``, the model's layer importance and
head prompt preference) into a ``BudgetPlan`` before the forward pass, which is what lets the capture
evict layer by layer. ``kv/budgets.py`` turns a real-valued wish into exact integer budgets.

The contract every allocator keeps (tests/test_kv_contract.py): the request keeps exactly
``L x H_kv x min(budget, n_cached)`` tokens in total and no head more than ``n_cached``; the keep-all
allocator (``full``) is the one exception, it keeps every cached token whatever the budget.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


class Allocator:
    """Base class. Subclasses are dataclasses with their hyperparameters as fields (published defaults)."""

    name: ClassVar[str] = "base"
    needs_stats: ClassVar[bool] = False  # plan() needs layer importance / prompt preference
    keeps_all: ClassVar[bool] = False  # every cached token, whatever the budget (no scoring needed)

    def plan(self, ctx: PolicyContext, stats: ModelStats | None, window: int = 0) -> BudgetPlan:
        """Budgets (tokens) for one request. ``stats``: the profile, or the request's own (online) stats;
        ``window``: the tokens the scorer always keeps per head (``Scorer.window``)."""
        raise NotImplementedError

    def plan_from_profile(self, ctx: PolicyContext, profile: ModelStats | None, window: int = 0) -> BudgetPlan:
        """The plan made before the forward pass, from the calibration profile (None: no statistics). An
        allocator may leave part of it to the pass itself (a ``per_layer`` plan); default: ``plan``."""
        return self.plan(ctx, profile, window)

    def split_heads(
        self,
        layer: int,
        layer_total: int,
        scores: torch.Tensor,
        ctx: PolicyContext,
        preference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-head budgets [H_kv] of one layer from its scores [H_kv, n_cached] (and, for a plan with
        ``needs_preference``, this request's prompt preference [H_kv] at the layer); only for
        ``per_layer`` plans, whose split depends on what the layer saw (AdaKV, MaskKV over a profile)."""
        raise NotImplementedError(f"allocator {self.name!r} makes per-head plans")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **(asdict(self) if is_dataclass(self) else {})}
