"""The KV policy contract: for one request, how many prompt tokens each (layer, kv_head) keeps, and which.

A policy is a *scorer* (which tokens matter, from the attention of some observation queries) plus an
*allocator* (how many tokens each layer and head keeps), kvpress style. The machinery that runs them
during the prefill pass and writes pages lives once, in ``kv/prefill_capture.py``.

Budgets are known before the forward pass whenever the allocator only needs a calibration profile
(or nothing): then eviction happens layer by layer and only one layer of full KV ever exists. When an
allocator needs per-request statistics and no profile is there, the capture keeps every layer's full
prompt KV until the pass ends (more peak memory, said in a warning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class ModelStats:
    """What the allocators may need about the model, per request (online) or from calibration (profile).

    layer_importance:  [L]       1 - mean cos(h_in, h_out) of each attention sub-layer.
    prompt_preference: [L, H_kv] share of the mask queries' attention mass that lands on prompt keys.
    """

    layer_importance: torch.Tensor
    prompt_preference: torch.Tensor


@dataclass
class BudgetPlan:
    """How many cached tokens each (layer, kv_head) keeps.

    per_head [L, H_kv]: exact. Or per_layer [L] (sum over heads), split between heads by the policy from
    the layer's scores (AdaKV). ``max_pages`` bounds what the plan can need, for admission.
    """

    per_head: torch.Tensor | None = None
    per_layer: torch.Tensor | None = None

    def max_pages(self, block_size: int, num_kv_heads: int) -> int:
        if self.per_head is not None:
            return int(((self.per_head + block_size - 1) // block_size).sum())
        assert self.per_layer is not None
        # each head wastes less than one page of rounding
        return int(((self.per_layer + block_size - 1) // block_size).sum()) + num_kv_heads * int(self.per_layer.numel())


@dataclass
class PolicyContext:
    """The shape facts a policy needs to plan one request.

    Positions [0, n_cached) may be cached (Dream: the prompt minus its last token, whose hidden state
    predicts the first response token); [n_prompt, n_total) are the response's [MASK] positions.
    """

    num_layers: int
    num_kv_heads: int
    n_cached: int
    n_prompt: int
    n_total: int
    budget: int  # average KV pairs per head the request may keep

    @property
    def mask_queries(self) -> slice:
        return slice(self.n_prompt, self.n_total)


class KVPolicy:
    """Base class. Subclasses are dataclasses with their hyperparameters as fields (published defaults)."""

    name: ClassVar[str] = "base"
    caches: ClassVar[bool] = True  # False: no KV kept, every step recomputes the whole sequence
    needs_scores: ClassVar[bool] = True  # False: keeps every token, no attention scoring
    needs_stats: ClassVar[bool] = False  # allocator needs layer importance / prompt preference
    default_budget: ClassVar[int] = 256

    # ---- allocator -------------------------------------------------------------------------------
    def plan(self, ctx: PolicyContext, stats: ModelStats | None) -> BudgetPlan:
        """Budgets for one request; ``stats`` is the profile, or the request's own (online) stats."""
        return BudgetPlan(per_head=uniform_budgets(ctx))

    def split_heads(self, layer: int, layer_total: int, scores: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
        """Per-head budgets of one layer from its scores [H_kv, n]; used only with ``per_layer`` plans."""
        raise NotImplementedError

    # ---- scorer ----------------------------------------------------------------------------------
    def observation(self, ctx: PolicyContext) -> slice:
        """Which query positions vote for the cached keys (default: the [MASK] response positions)."""
        return ctx.mask_queries

    def score(self, probs: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
        """probs [G, n_obs, n_total]: softmax attention of the observation queries of one KV group's G
        query heads over all keys. Returns a score per cached token [n_cached]; the top-k are kept.
        Default (Mask-Voting): summed over the queries, averaged over the group."""
        return probs[:, :, : ctx.n_cached].sum(dim=1).mean(dim=0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def uniform_budgets(ctx: PolicyContext) -> torch.Tensor:
    """Every (layer, head) keeps min(budget, n_cached)."""
    keep = min(ctx.budget, ctx.n_cached)
    return torch.full((ctx.num_layers, ctx.num_kv_heads), keep, dtype=torch.long)
