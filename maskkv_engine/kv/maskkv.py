"""MaskKV (arXiv 2510.09309): Mask-Voting token choice with boundary-aware layer budgets and
prompt-preference head budgets (``kv/scorers/mask_voting.py`` + ``kv/allocators/maskkv.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.allocators.maskkv import MaskKVAllocator
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.scorers.mask_voting import MaskVotingScorer


@dataclass
class MaskKVPolicy(KVPolicy):
    name = "maskkv"

    scorer: Scorer = field(default_factory=MaskVotingScorer)
    allocator: Allocator = field(default_factory=MaskKVAllocator)
