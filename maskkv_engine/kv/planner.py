"""Per request: the policy's budget plan, the pages it may need, and whether it is decided online."""

from __future__ import annotations

import logging

from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext
from maskkv_engine.models.config import DiffusionLMConfig

logger = logging.getLogger(__name__)


class KVPlanner:
    def __init__(
        self,
        policy: KVPolicy,
        model_config: DiffusionLMConfig,
        block_size: int,
        profile: ModelStats | None = None,
    ):
        self.policy = policy
        self.model_config = model_config
        self.block_size = block_size
        self.profile = profile
        self._warned = False

    @property
    def online(self) -> bool:
        """Budgets need per-request statistics: prefill keeps every layer's full prompt KV until the end."""
        return self.policy.caches and self.policy.needs_stats and self.profile is None

    def budget(self, request_budget: int | None, engine_budget: int | None) -> int:
        return request_budget or engine_budget or self.policy.default_budget

    def context(self, n_cached: int, n_prompt: int, n_total: int, budget: int) -> PolicyContext:
        cfg = self.model_config
        return PolicyContext(cfg.num_layers, cfg.num_kv_heads, n_cached, n_prompt, n_total, budget)

    def plan(self, ctx: PolicyContext) -> BudgetPlan | None:
        """The plan before the forward pass, or None when it must be decided online."""
        if not self.policy.caches:
            return None
        if self.online:
            if not self._warned:
                logger.warning(
                    "kv_policy=%r has no calibration profile for this model: budgets are computed online for "
                    "each request, which holds every layer's full prompt KV during prefill (higher peak memory). "
                    "Run `maskkv calibrate --model PATH` to write one next to the model.",
                    self.policy.name,
                )
                self._warned = True
            return None
        return self.policy.plan_from_profile(ctx, self.profile)

    def pages_needed(self, ctx: PolicyContext, plan: BudgetPlan | None) -> int:
        """Pages to reserve at admission: exact for a per-head plan, an upper bound otherwise."""
        if not self.policy.caches:
            return 0
        h = self.model_config.num_kv_heads
        per_head_full = -(-ctx.n_cached // self.block_size)
        full = ctx.num_layers * h * per_head_full
        if plan is not None:
            return min(plan.max_pages(self.block_size, h), full)
        total = ctx.num_layers * h * min(ctx.budget, ctx.n_cached)
        return min(-(-total // self.block_size) + ctx.num_layers * h, full)
