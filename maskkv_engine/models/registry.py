"""Architecture name (config.json ``architectures``) -> config parser and model class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.models.dream import DreamModel, parse_dream_config
from maskkv_engine.models.llada import LLaDAModelLM, parse_llada_config


@dataclass(frozen=True)
class ModelSpec:
    parse_config: Callable[[dict], DiffusionLMConfig]
    model_class: type[nn.Module]


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "LLaDAModelLM": ModelSpec(parse_llada_config, LLaDAModelLM),
    "DreamModel": ModelSpec(parse_dream_config, DreamModel),
}


def resolve_architecture(hf_config: dict) -> tuple[str, ModelSpec]:
    """Dispatch on ``architectures`` (never on model_type: fine-tunes often keep the arch, rename the type)."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return arch, MODEL_REGISTRY[arch]
    raise ValueError(f"config.json: architectures={archs!r} is not supported (supported: {sorted(MODEL_REGISTRY)})")


def parse_config(hf_config: dict) -> DiffusionLMConfig:
    _, spec = resolve_architecture(hf_config)
    return spec.parse_config(hf_config)
