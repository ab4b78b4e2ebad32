"""AdaKV (Feng et al. 2024) as the MaskKV paper's baseline: SnapKV's scorer with per-layer budgets
split between heads by a global top-k mixed with a floor (``kv/scorers/snapkv.py`` + ``kv/allocators/adakv.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from maskkv_engine.kv.allocators.adakv import AdaKVAllocator
from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.scorers.snapkv import SnapKVScorer


@dataclass
class AdaKVPolicy(KVPolicy):
    name = "adakv"

    scorer: Scorer = field(default_factory=SnapKVScorer)
    allocator: Allocator = field(default_factory=AdaKVAllocator)
