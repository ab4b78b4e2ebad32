"""The data a KV policy reads (a request's shape, the model's statistics) and returns (a budget plan).

Kept apart from the policy classes so that scorers and allocators can use them without importing the
composition that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    per_head [L, H_kv]: exact. Or per_layer [L] (sum over heads), split between heads by the allocator
    once the layer has run: from the layer's scores (AdaKV), or, with ``needs_preference``, from this
    request's prompt preference at that layer (MaskKV's head budgets over a profile's layer budgets).
    ``max_pages`` bounds what the plan can need, for admission.
    """

    per_head: torch.Tensor | None = None
    per_layer: torch.Tensor | None = None
    needs_preference: bool = False  # the capture measures each layer's prompt preference for split_heads

    def max_pages(self, block_size: int, num_kv_heads: int) -> int:
        """Pages (of ``block_size`` tokens of one head) the plan can need: exact for a per-head plan."""
        if self.per_head is not None:
            return int(((self.per_head + block_size - 1) // block_size).sum())
        assert self.per_layer is not None
        # each head wastes less than one page of rounding
        return int(((self.per_layer + block_size - 1) // block_size).sum()) + num_kv_heads * int(self.per_layer.numel())


@dataclass
class PolicyContext:
    """The shape facts a policy needs to plan one request (all counts in tokens).

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
