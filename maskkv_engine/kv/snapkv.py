"""SnapKV (Li et al. 2024): an observation window at the end of the prompt votes, max-pooled, with
uniform budgets (``kv/scorers/snapkv.py`` + ``kv/allocators/uniform.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.allocators.uniform import UniformAllocator
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.scorers.snapkv import SnapKVScorer


@dataclass
class SnapKVPolicy(KVPolicy):
    name = "snapkv"

    scorer: Scorer = field(default_factory=SnapKVScorer)
    allocator: Allocator = field(default_factory=UniformAllocator)
