"""Policies by name: the built-ins, plus third-party ones from the ``maskkv_engine.kv_policies`` entry points."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from maskkv_engine.config import build_component
from maskkv_engine.kv.adakv import AdaKVPolicy
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.full import FullCachePolicy
from maskkv_engine.kv.maskkv import MaskKVPolicy
from maskkv_engine.kv.none import NoCachePolicy
from maskkv_engine.kv.pyramidkv import PyramidKVPolicy
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


def available_policies() -> dict[str, type[KVPolicy]]:
    found = dict(BUILTIN_POLICIES)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = ep  # loaded lazily in get_policy
    return found


def register_policy(name: str, cls: type[KVPolicy]) -> None:
    """Register a policy class in-process (the entry point group does the same for installed packages)."""
    BUILTIN_POLICIES[name] = cls


def get_policy(name: str, config: dict[str, Any] | None = None) -> KVPolicy:
    """Build the policy ``name`` with ``config`` as its fields; unknown names and fields fail clearly."""
    policies = available_policies()
    if name not in policies:
        raise ValueError(f"kv_policy={name!r} is not known (allowed: {sorted(policies)})")
    cls = policies[name]
    if not isinstance(cls, type):
        cls = cls.load()
        if not (isinstance(cls, type) and issubclass(cls, KVPolicy)):
            raise ValueError(f"entry point {name!r} in {ENTRY_POINT_GROUP} does not name a KVPolicy subclass")
    return build_component(cls, config, "kv_policy", name)
