"""PyramidKV (Cai et al. 2024) as the MaskKV paper's baseline: SnapKV's scorer with a pyramid of
layer budgets (``kv/scorers/snapkv.py`` + ``kv/allocators/pyramidkv.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.allocators.pyramidkv import PyramidKVAllocator
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.scorers.snapkv import SnapKVScorer


@dataclass
class PyramidKVPolicy(KVPolicy):
    name = "pyramidkv"

    scorer: Scorer = field(default_factory=SnapKVScorer)
    allocator: Allocator = field(default_factory=PyramidKVAllocator)
