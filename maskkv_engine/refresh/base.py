"""The refresh contract: per request and step, which positions are recomputed and what cached state is
reused. Independent of the KV policy (which prompt KV exists) and of the decoding rule (how many tokens a
step commits).

A strategy builds one ``RefreshState`` per request. Before each step the state returns a ``StepPlan``
(the contiguous positions the step feeds to the model, whether it is a full pass, whether it reads the
prompt pages); during the step its layer hooks may recompute only some of those rows and fill the rest
from its caches. All hook indices are *local*: 0 is the plan's first position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from maskkv_engine.refresh.view import RequestView


@dataclass
class StepPlan:
    """What one request computes in one step: positions [start, end) of its sequence.

    full_pass: the whole sequence, prompt included (the first pass, a refresh, or every pass of 'none').
    capture:   the first pass: the KV policy chooses what to keep and writes the pages.
    rewrite:   a refresh pass: the kept prompt tokens' K/V are rewritten from this pass (no re-selection).
    use_pages: the step's queries read the prompt pages (never on full passes: the prompt is computed).
    """

    start: int
    end: int
    full_pass: bool = False
    capture: bool = False
    rewrite: bool = False
    use_pages: bool = False

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class RefreshState:
    """Per-request state of a refresh strategy. The base class is a plain step: every planned row is
    recomputed from fresh K/V, nothing is cached beyond the prompt pages."""

    def __init__(self, request: RequestView):
        self.request = request  # read only: the strategy decides rows, it never changes the request
        self.plan: StepPlan | None = None
        self.layers_recomputed = 0  # (step, layer) pairs where every planned row was recomputed
        self.layers_total = 0

    # ---- before / after a step ---------------------------------------------------------------------
    def plan_step(self) -> StepPlan:
        """Decided here once for every strategy: without a cache every pass is full (the reference decoder);
        before the prompt KV exists the pass is the capturing first pass; after it, the strategy's own plan.
        ``before_plan`` runs first at every step, for the strategy's bookkeeping."""
        r = self.request
        self.before_plan()
        if not r.uses_cache:
            self.plan = StepPlan(0, r.num_tokens, full_pass=True)
        elif not r.kv_ready:
            self.plan = StepPlan(0, r.num_tokens, full_pass=True, capture=True)
        else:
            self.plan = self.plan_cached_step()
        return self.plan

    def before_plan(self) -> None:
        """Per-step bookkeeping that every pass needs, the first one included."""

    def plan_cached_step(self) -> StepPlan:
        """A step once the prompt KV is in pages: by default the response, reading the pages."""
        r = self.request
        return StepPlan(r.n_cached, r.num_tokens, use_pages=True)

    def after_step(self, num_layers: int, committed: torch.Tensor) -> None:
        """Called once the step's tokens are committed (``committed``: their positions)."""
        self.layers_recomputed += num_layers
        self.layers_total += num_layers

    @property
    def custom_layers(self) -> bool:
        """True when the layer hooks below do more than a plain step (the step context then asks them)."""
        return type(self).rows is not RefreshState.rows or type(self).prepare is not RefreshState.prepare

    # ---- layer hooks (local row indices) ----------------------------------------------------------
    def rows(self, layer: int) -> torch.Tensor | None:
        """Rows whose attention and MLP are recomputed at ``layer`` (None: all)."""
        return None

    def prepare(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Fresh q/k/v of the plan's rows -> (k, v) of those rows as keys (cached values may replace fresh
        ones) and optional extra cached keys (k, v of positions not in the plan)."""
        return k, v, None, None

    def merge(self, layer: int, x: torch.Tensor, rows: torch.Tensor | None, x1: torch.Tensor, attn_out, mlp_out):
        """Output of every planned row (see StepHooks.merge); None: plain ``x1 + mlp_out``."""
        return None


class RefreshStrategy:
    """A named strategy with its hyperparameters (published defaults) as dataclass fields."""

    name: ClassVar[str] = "base"
    needs_cache: ClassVar[bool] = True  # meaningless with kv_policy='none' (it keeps no KV to reuse)

    def new_state(self, request: RequestView) -> RefreshState:
        return RefreshState(request)

    def cache_bytes_per_token(self, cfg, dtype_bytes: int) -> int:
        """Bytes a request's state keeps outside the page pool per token it recomputes (0: nothing), so that
        the pool sizing on a GPU leaves room for them (engine/gpu_memory.py)."""
        return 0

    def decoding_region(self, request: RequestView) -> dict | None:
        """A decoding region other than the rule's block schedule, by name and options (Elastic's sliding
        window: ``{"region": "sliding_window", ...}``); None keeps the schedule. The engine builds it."""
        return None

    def check(self, request: RequestView) -> None:
        """Refuse a combination that makes no sense, with a clear error, before the request starts."""
