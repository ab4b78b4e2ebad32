"""The KV policy contract: for one request, how many prompt tokens each (layer, kv_head) keeps, and which.

A policy is a *scorer* (which tokens matter, ``kv/scorers/``) composed with an *allocator* (how many
tokens each layer and head keeps, ``kv/allocators/``), kvpress style: any scorer goes with any
allocator, so a new combination is configuration, not a class. The named policies (``maskkv``,
``snapkv``, ...) are presets: a default scorer and allocator each (``kv/maskkv.py`` etc.). The machinery
that runs them during the first pass and writes pages lives once, in ``kv/prefill_capture.py``.

Budgets are known before the forward pass whenever the allocator only needs a calibration profile
(or nothing): then eviction happens layer by layer and only one layer of full KV ever exists. When an
allocator needs per-request statistics and no profile is there, the capture keeps every layer's full
prompt KV until the pass ends (more peak memory, said in a warning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.allocators.uniform import UniformAllocator
from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.scorers.mask_voting import MaskVotingScorer
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext

__all__ = ["BudgetPlan", "KVPolicy", "ModelStats", "PolicyContext"]  # the types, re-exported for old imports


@dataclass
class KVPolicy:
    """``scorer`` + ``allocator``. The capture calls the methods below, which delegate to the two parts;
    a subclass may still override any of them (e.g. ``score``) to write a policy in one class."""

    scorer: Scorer = field(default_factory=MaskVotingScorer)
    allocator: Allocator = field(default_factory=UniformAllocator)

    name: ClassVar[str] = "base"
    caches: ClassVar[bool] = True  # False: no KV kept, every step recomputes the whole sequence
    default_budget: ClassVar[int] = 256  # average KV pairs per head when neither engine nor request sets one

    def __post_init__(self) -> None:
        if not isinstance(self.scorer, Scorer):
            raise ValueError(f"scorer={self.scorer!r} must be a Scorer (maskkv_engine.kv.scorers)")
        if not isinstance(self.allocator, Allocator):
            raise ValueError(f"allocator={self.allocator!r} must be an Allocator (maskkv_engine.kv.allocators)")
        if not self.scorer.ranks and not self.allocator.keeps_all:
            raise ValueError(
                f"scorer {self.scorer.name!r} ranks no tokens, so it cannot prune: it pairs only with "
                f"allocator 'keep_all' (got {self.allocator.name!r})"
            )

    @property
    def needs_scores(self) -> bool:
        """Whether the capture must run the scorer's attention (not when every token is kept anyway)."""
        return self.scorer.ranks and not self.allocator.keeps_all

    @property
    def needs_stats(self) -> bool:
        """Whether the allocator needs layer importance / prompt preference (a profile, or online)."""
        return self.allocator.needs_stats

    # ---- allocator -------------------------------------------------------------------------------
    def plan(self, ctx: PolicyContext, stats: ModelStats | None) -> BudgetPlan:
        """Budgets for one request; ``stats`` is the profile, or the request's own (online) stats."""
        return self.allocator.plan(ctx, stats, self.scorer.window(ctx))

    def plan_from_profile(self, ctx: PolicyContext, profile: ModelStats | None) -> BudgetPlan:
        """The plan before the forward pass (the engine's planner asks this): the allocator's, unless a
        subclass wrote its own ``plan``, which then decides alone."""
        if type(self).plan is not KVPolicy.plan:
            return self.plan(ctx, profile)
        return self.allocator.plan_from_profile(ctx, profile, self.scorer.window(ctx))

    def split_heads(
        self,
        layer: int,
        layer_total: int,
        scores: torch.Tensor,
        ctx: PolicyContext,
        preference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-head budgets of one layer from its scores [H_kv, n] (and this request's prompt preference
        [H_kv] at the layer when the plan asked for it); used only with ``per_layer`` plans."""
        if preference is None:  # allocators written before preference existed take four arguments
            return self.allocator.split_heads(layer, layer_total, scores, ctx)
        return self.allocator.split_heads(layer, layer_total, scores, ctx, preference)

    # ---- scorer ----------------------------------------------------------------------------------
    def observation(self, ctx: PolicyContext) -> slice:
        """Which query positions vote for the cached keys."""
        return self.scorer.observation(ctx)

    def score(self, probs: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
        """probs [G, n_obs, n_total] of one KV group -> a score per cached token [n_cached]; top-k kept."""
        return self.scorer.score(probs, ctx)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "scorer": self.scorer.describe(), "allocator": self.allocator.describe()}
