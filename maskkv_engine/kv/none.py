"""``none``: no cache. Every step recomputes the whole sequence: the released reference decoder. Its
scorer and allocator are never run (``caches = False``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.allocators.keep_all import KeepAllAllocator
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.scorers.keep_all import KeepAllScorer


@dataclass
class NoCachePolicy(KVPolicy):
    name = "none"
    caches = False

    scorer: Scorer = field(default_factory=KeepAllScorer)
    allocator: Allocator = field(default_factory=KeepAllAllocator)
