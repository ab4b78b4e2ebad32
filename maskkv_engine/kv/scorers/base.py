"""Scorer: which prompt tokens matter, from the softmax attention of some observation queries.

A scorer never decides how many tokens are kept (that is the allocator's job), so any scorer composes
with any allocator. The capture (``kv/prefill_capture.py``) computes, per KV head, the attention of the
scorer's observation queries over all keys and hands it to ``score``; it keeps the top-k of the result.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from maskkv_engine.kv.types import PolicyContext


class Scorer:
    """Base class. Subclasses are dataclasses with their hyperparameters as fields (published defaults)."""

    name: ClassVar[str] = "base"
    ranks: ClassVar[bool] = True  # False: gives no scores (keep_all); pairs only with a keep-all allocator

    def observation(self, ctx: PolicyContext) -> slice:
        """Which query positions vote for the cached keys (default: the [MASK] response positions)."""
        return ctx.mask_queries

    def score(self, probs: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
        """probs [G, n_obs, n_total]: softmax attention of the observation queries of one KV group's G
        query heads over all keys. Returns one score per cached token [n_cached]."""
        raise NotImplementedError

    def window(self, ctx: PolicyContext) -> int:
        """Tokens at the end of the cached prompt this scorer always keeps (SnapKV's observation window);
        schedules that set them aside per layer (PyramidKV) read it. 0 for scorers without one."""
        return 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **(asdict(self) if is_dataclass(self) else {})}
