"""Policies, scorers and allocators by name, and the one place a ``kv_policy_config`` is read.

A named policy is a preset (a default scorer + allocator). ``kv_policy_config`` may swap either part by
name (``{"allocator": "pyramidkv"}``) and sets hyperparameters with flat keys, each routed to the part
that has a field of that name (``{"window_size": 8}`` to SnapKV's scorer, ``{"beta": 10}`` to the
allocator in use). Third-party policies come from the ``maskkv_engine.kv_policies`` entry points.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any

from maskkv_engine.config import build_component
from maskkv_engine.kv.adakv import AdaKVPolicy
from maskkv_engine.kv.allocators.adakv import AdaKVAllocator
from maskkv_engine.kv.allocators.base import Allocator
from maskkv_engine.kv.allocators.keep_all import KeepAllAllocator
from maskkv_engine.kv.allocators.maskkv import MaskKVAllocator
from maskkv_engine.kv.allocators.pyramidkv import PyramidKVAllocator
from maskkv_engine.kv.allocators.squeeze import SqueezeAllocator
from maskkv_engine.kv.allocators.uniform import UniformAllocator
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.full import FullCachePolicy
from maskkv_engine.kv.maskkv import MaskKVPolicy
from maskkv_engine.kv.none import NoCachePolicy
from maskkv_engine.kv.pyramidkv import PyramidKVPolicy
from maskkv_engine.kv.scorers.base import Scorer
from maskkv_engine.kv.scorers.keep_all import KeepAllScorer
from maskkv_engine.kv.scorers.mask_voting import MaskVotingScorer
from maskkv_engine.kv.scorers.snapkv import SnapKVScorer
from maskkv_engine.kv.snapkv import SnapKVPolicy
from maskkv_engine.kv.squeeze import SqueezeAttentionPolicy

ENTRY_POINT_GROUP = "maskkv_engine.kv_policies"

BUILTIN_POLICIES: dict[str, type[KVPolicy]] = {
    "none": NoCachePolicy,
    "full": FullCachePolicy,
    "maskkv": MaskKVPolicy,
    "snapkv": SnapKVPolicy,
    "pyramidkv": PyramidKVPolicy,
    "adakv": AdaKVPolicy,
    "squeeze": SqueezeAttentionPolicy,
}
SCORERS: dict[str, type[Scorer]] = {c.name: c for c in (MaskVotingScorer, SnapKVScorer, KeepAllScorer)}
ALLOCATORS: dict[str, type[Allocator]] = {
    c.name: c
    for c in (UniformAllocator, PyramidKVAllocator, AdaKVAllocator, SqueezeAllocator, MaskKVAllocator, KeepAllAllocator)
}


def available_policies() -> dict[str, type[KVPolicy]]:
    found = dict(BUILTIN_POLICIES)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = ep  # loaded lazily in get_policy
    return found


def register_policy(name: str, cls: type[KVPolicy]) -> None:
    """Register a policy class in-process (the entry point group does the same for installed packages)."""
    BUILTIN_POLICIES[name] = cls


def register_scorer(cls: type[Scorer]) -> None:
    """Make a scorer nameable in ``kv_policy_config={"scorer": cls.name}``."""
    SCORERS[cls.name] = cls


def register_allocator(cls: type[Allocator]) -> None:
    """Make an allocator nameable in ``kv_policy_config={"allocator": cls.name}``."""
    ALLOCATORS[cls.name] = cls


def _policy_class(name: str) -> type[KVPolicy]:
    policies = available_policies()
    if name not in policies:
        raise ValueError(f"kv_policy={name!r} is not known (allowed: {sorted(policies)})")
    cls = policies[name]
    if not isinstance(cls, type):
        cls = cls.load()
        if not (isinstance(cls, type) and issubclass(cls, KVPolicy)):
            raise ValueError(f"entry point {name!r} in {ENTRY_POINT_GROUP} does not name a KVPolicy subclass")
    return cls


def _part(table: dict[str, type], kind: str, chosen: Any, default: type) -> type:
    if chosen is None:
        return default
    if chosen not in table:
        raise ValueError(f"kv_policy_config[{kind!r}]={chosen!r} is not known (allowed: {sorted(table)})")
    return table[chosen]


def _fields(cls: type, skip: tuple[str, ...] = ()) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.name not in skip} if dataclasses.is_dataclass(cls) else set()


def get_policy(name: str, config: dict[str, Any] | None = None) -> KVPolicy:
    """Build the policy ``name``: its preset scorer and allocator, either swapped by name with the
    ``scorer`` / ``allocator`` keys, and every other key routed to the part with a field of that name.
    Unknown names and keys, and bad values, fail here with the field named."""
    cls = _policy_class(name)
    config = dict(config or {})
    chosen = {"scorer": config.pop("scorer", None), "allocator": config.pop("allocator", None)}
    preset = cls()
    if not cls.caches and any(v is not None for v in chosen.values()):
        raise ValueError(f"kv_policy={name!r} keeps no KV: kv_policy_config cannot set a scorer or allocator")
    scorer_cls = _part(SCORERS, "scorer", chosen["scorer"], type(preset.scorer))
    allocator_cls = _part(ALLOCATORS, "allocator", chosen["allocator"], type(preset.allocator))
    parts = {
        "policy": _fields(cls, skip=("scorer", "allocator")),
        "scorer": _fields(scorer_cls),
        "allocator": _fields(allocator_cls),
    }
    allowed = sorted(set().union(*parts.values()) | ({"scorer", "allocator"} if cls.caches else set()))
    unknown = sorted(k for k in config if not any(k in names for names in parts.values()))
    if unknown:
        parts_in_use = f" (scorer {scorer_cls.name!r}, allocator {allocator_cls.name!r})" if cls.caches else ""
        raise ValueError(
            f"kv_policy_config has unknown key(s) {unknown} for kv_policy={name!r}{parts_in_use} (allowed: {allowed})"
        )
    routed: dict[str, dict[str, Any]] = {part: {} for part in parts}
    for key, value in config.items():
        owners = [part for part, names in parts.items() if key in names]
        if len(owners) > 1:
            raise ValueError(f"kv_policy_config key {key!r} is a field of both the {owners[0]} and the {owners[1]}")
        routed[owners[0]][key] = value
    scorer = build_component(scorer_cls, routed["scorer"], "kv_policy", name)
    allocator = build_component(allocator_cls, routed["allocator"], "kv_policy", name)
    return build_component(cls, {**routed["policy"], "scorer": scorer, "allocator": allocator}, "kv_policy", name)
