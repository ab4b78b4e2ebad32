"""Architecture name (config.json ``architectures``) -> config parser and model class."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.models.dream import DreamModel, parse_dream_config
from maskkv_engine.models.errors import CheckpointError
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
    if hf_config.get("architectures") is None:
        raise ValueError(f"architectures is missing (a list naming one of {sorted(MODEL_REGISTRY)})")
    archs = hf_config["architectures"]
    if isinstance(archs, str):
        archs = [archs]
    if isinstance(archs, list):
        for arch in archs:
            if isinstance(arch, str) and arch in MODEL_REGISTRY:
                return arch, MODEL_REGISTRY[arch]
    raise ValueError(f"architectures={archs!r} is not supported (supported: {sorted(MODEL_REGISTRY)})")


def parse_config(hf_config: dict, source: str | os.PathLike = "config.json") -> DiffusionLMConfig:
    """The normalised config; any bad field raises CheckpointError naming ``source`` (the file) and the field."""
    try:
        _, spec = resolve_architecture(hf_config)
        return spec.parse_config(hf_config)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(source, str(e)) from e
