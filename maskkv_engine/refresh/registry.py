"""Refresh strategies by name: the built-ins, plus third-party ones from the ``maskkv_engine.refresh_strategies``
entry points or ``register_refresh``; ``refresh_config`` keys are the strategy's dataclass fields."""

from __future__ import annotations

from typing import Any

from maskkv_engine.config import build_component, registered_class
from maskkv_engine.refresh.base import RefreshStrategy
from maskkv_engine.refresh.dllm_cache import DLLMCache
from maskkv_engine.refresh.elastic import ElasticCache
from maskkv_engine.refresh.every_step import EveryStep
from maskkv_engine.refresh.fast_dllm import FastDLLM, FastDLLMDual

ENTRY_POINT_GROUP = "maskkv_engine.refresh_strategies"

REFRESH_STRATEGIES: dict[str, type[RefreshStrategy]] = {
    "every_step": EveryStep,
    "fast_dllm": FastDLLM,
    "fast_dllm_dual": FastDLLMDual,
    "dllm_cache": DLLMCache,
    "elastic": ElasticCache,
}


def register_refresh(name: str, cls: type[RefreshStrategy]) -> None:
    """Register a refresh strategy class in-process under ``name`` (the entry point group does the same)."""
    REFRESH_STRATEGIES[name] = cls


def strategy_class(name: str) -> type[RefreshStrategy]:
    return registered_class(REFRESH_STRATEGIES, ENTRY_POINT_GROUP, RefreshStrategy, name, "refresh")


def get_refresh(name: str, config: dict[str, Any] | None = None) -> RefreshStrategy:
    return build_component(strategy_class(name), config, "refresh", name)
