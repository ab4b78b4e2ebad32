"""SqueezeAttention (Wang et al. 2024) as the MaskKV paper's baseline: SnapKV's scorer with layer
budgets from 3 clusters of layer importance (``kv/scorers/snapkv.py`` + ``kv/allocators/squeeze.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.allocators.squeeze import SqueezeAllocator
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.scorers.snapkv import SnapKVScorer


@dataclass
class SqueezeAttentionPolicy(KVPolicy):
    name = "squeeze"

    scorer: Scorer = field(default_factory=SnapKVScorer)
    allocator: Allocator = field(default_factory=SqueezeAllocator)
