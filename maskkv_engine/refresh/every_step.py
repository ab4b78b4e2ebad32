"""``every_step`` (the default): the response is recomputed at every step; the prompt's (pruned) KV is
written once, by the first pass, and read from pages afterwards."""

from __future__ import annotations

from dataclasses import dataclass

from maskkv_engine.refresh.base import RefreshStrategy


@dataclass
class EveryStep(RefreshStrategy):
    name = "every_step"
    needs_cache = False  # with kv_policy='none' it is the reference decoder
