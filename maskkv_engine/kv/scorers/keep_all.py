"""Keep all (``full``): no scoring at all. Every cached token is kept, so ranking them would only cost
an attention pass; it pairs with the keep-all allocator only (a pruning allocator needs a ranking)."""

from __future__ import annotations

from dataclasses import dataclass

from maskkv_engine.kv.scorers.base import Scorer


@dataclass
class KeepAllScorer(Scorer):
    name = "keep_all"
    ranks = False
