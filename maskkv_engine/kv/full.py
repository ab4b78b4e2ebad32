"""``full``: cache every prompt token's KV once (after the first pass) and recompute the response each
step; nothing is scored (``kv/scorers/keep_all.py`` + ``kv/allocators/keep_all.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.allocators.keep_all import KeepAllAllocator
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.scorers.keep_all import KeepAllScorer


@dataclass
class FullCachePolicy(KVPolicy):
    name = "full"

    scorer: Scorer = field(default_factory=KeepAllScorer)
    allocator: Allocator = field(default_factory=KeepAllAllocator)
