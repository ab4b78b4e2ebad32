"""Refresh strategies by name; ``refresh_config`` keys are the strategy's dataclass fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from maskkv_engine.refresh.base import RefreshStrategy
from maskkv_engine.refresh.dllm_cache import DLLMCache
from maskkv_engine.refresh.elastic import ElasticCache
from maskkv_engine.refresh.every_step import EveryStep
from maskkv_engine.refresh.fast_dllm import FastDLLM, FastDLLMDual

REFRESH_STRATEGIES: dict[str, type[RefreshStrategy]] = {
    "every_step": EveryStep,
    "fast_dllm": FastDLLM,
    "fast_dllm_dual": FastDLLMDual,
    "dllm_cache": DLLMCache,
    "elastic": ElasticCache,
}


def get_refresh(name: str, config: dict[str, Any] | None = None) -> RefreshStrategy:
    if name not in REFRESH_STRATEGIES:
        raise ValueError(f"refresh={name!r} is not known (allowed: {sorted(REFRESH_STRATEGIES)})")
    cls = REFRESH_STRATEGIES[name]
    config = dict(config or {})
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"refresh_config has unknown key(s) {unknown} for refresh={name!r} (allowed: {sorted(allowed)})"
        )
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"refresh_config for refresh={name!r}: {e}") from e
