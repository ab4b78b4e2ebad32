"""Refresh strategies by name; ``refresh_config`` keys are the strategy's dataclass fields."""

from __future__ import annotations

from typing import Any

from maskkv_engine.config import build_component
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


def register_refresh(name: str, cls: type[RefreshStrategy]) -> None:
    """Register a refresh strategy class in-process under ``name``."""
    REFRESH_STRATEGIES[name] = cls


def get_refresh(name: str, config: dict[str, Any] | None = None) -> RefreshStrategy:
    if name not in REFRESH_STRATEGIES:
        raise ValueError(f"refresh={name!r} is not known (allowed: {sorted(REFRESH_STRATEGIES)})")
    return build_component(REFRESH_STRATEGIES[name], config, "refresh", name)
