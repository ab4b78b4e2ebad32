"""``none``: no cache. Every step recomputes the whole sequence: the released reference decoder."""

from __future__ import annotations

from dataclasses import dataclass

from maskkv_engine.kv.base import KVPolicy


@dataclass
class NoCachePolicy(KVPolicy):
    name = "none"
    caches = False
    needs_scores = False
