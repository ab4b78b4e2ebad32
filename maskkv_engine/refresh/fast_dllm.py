"""Fast-dLLM's block-wise approximate KV cache (NVlabs/Fast-dLLM), on top of the pruned prompt pages.

At each block boundary, fused with the block's first decoding step, one full pass recomputes the
whole sequence: it rewrites the kept prompt tokens' K/V in their pages (the prompt is not re-pruned:
evicted tokens stay evicted) and caches the K/V of the response outside the current block. Within the
block, each step recomputes:
* ``fast_dllm`` (prefix cache): the current block and the whole masked suffix, with the committed
  blocks' K/V from the cache;
* ``fast_dllm_dual`` (DualCache): the current block only, with the committed blocks and the masked
  suffix from the cache (stale since the block started).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from maskkv_engine.refresh.base import RefreshState, RefreshStrategy, StepPlan


class FastDLLMState(RefreshState):
    def __init__(self, request, dual: bool):
        super().__init__(request)
        self.dual = dual
        self.cached_block = -1
        self.planned_block = 0
        self.cache_k: dict[int, torch.Tensor] = {}  # layer -> [n, H_kv, D] K of the cached response positions
        self.cache_v: dict[int, torch.Tensor] = {}
        self.cached_positions = torch.zeros(0, dtype=torch.long)

    def _span(self) -> tuple[int, int, int]:
        """(stream start, stream end, block start) for the current block."""
        r = self.request
        block_start, block_end = r.block_range
        return r.logit_rows(block_start), (block_end if self.dual else r.num_tokens), block_start

    def before_plan(self) -> None:
        self.planned_block = self.request.block

    def plan_cached_step(self) -> StepPlan:
        """Idempotent until the step runs: a block boundary is a full pass (rewriting the kept prompt KV),
        then in-block steps."""
        r = self.request
        if r.block != self.cached_block:
            return StepPlan(0, r.num_tokens, full_pass=True, rewrite=True)
        start, end, _ = self._span()
        return StepPlan(start, end, use_pages=True)

    def prepare(self, layer, q, k, v):
        if self.plan.full_pass:  # the boundary pass: cache the response outside the block (absolute positions)
            start, end, _ = self._span()
            positions = [torch.arange(self.request.n_cached, start)]
            if self.dual:
                positions.append(torch.arange(end, self.request.num_tokens))
            self.cached_positions = torch.cat(positions).to(k.device)
            self.cache_k[layer] = k[self.cached_positions].clone()
            self.cache_v[layer] = v[self.cached_positions].clone()
            return k, v, None, None
        if self.cached_positions.numel() == 0:
            return k, v, None, None
        return k, v, self.cache_k[layer], self.cache_v[layer]

    def after_step(self, num_layers, committed) -> None:
        super().after_step(num_layers, committed)
        if self.plan.full_pass:  # the cache now holds what this block's boundary pass saw
            self.cached_block = self.planned_block


@dataclass
class FastDLLM(RefreshStrategy):
    name = "fast_dllm"
    dual: ClassVar[bool] = False  # the dual cache also keeps the rows after the current block

    def cache_bytes_per_token(self, cfg, dtype_bytes: int) -> int:
        """K and V of every layer for the cached positions."""
        return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes

    def new_state(self, request) -> RefreshState:
        return FastDLLMState(request, dual=self.dual)


@dataclass
class FastDLLMDual(FastDLLM):
    name = "fast_dllm_dual"
    dual: ClassVar[bool] = True
