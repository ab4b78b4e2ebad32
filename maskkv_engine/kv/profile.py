"""Calibration profiles: layer importance and head prompt preference, stored next to the model (JSON).

With a profile, budgets are known before a request's forward pass, so prefill evicts layer by layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from maskkv_engine.kv.types import ModelStats
from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.models.errors import CheckpointError
from maskkv_engine.models.loader import read_json_object

PROFILE_FILE = "maskkv_profile.json"


def save_profile(
    path: str | os.PathLike, stats: ModelStats, model_config: DiffusionLMConfig, meta: dict | None = None
) -> Path:
    out = Path(path)
    if out.is_dir():
        out = out / PROFILE_FILE
    data = {
        "architecture": model_config.architecture,
        "num_layers": model_config.num_layers,
        "num_kv_heads": model_config.num_kv_heads,
        "layer_importance": [float(x) for x in stats.layer_importance],
        "prompt_preference": [[float(x) for x in row] for row in stats.prompt_preference],
        "calibration": meta or {},
    }
    out.write_text(json.dumps(data, indent=1))
    return out


def load_profile(model_path: str, model_config: DiffusionLMConfig, explicit: str | None = None) -> ModelStats | None:
    """The profile at ``explicit`` (must exist), else ``<model>/maskkv_profile.json`` if present, else None.

    A profile that is not JSON, lacks a field, or was measured on another shape raises CheckpointError
    naming the file and the field: a wrong profile would silently give every head the wrong budget.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ValueError(f"kv_policy_config['profile_path']={explicit!r} does not exist")
    else:
        path = Path(model_path) / PROFILE_FILE
        if not path.is_file():
            return None
    data = read_json_object(path)
    layers, heads = model_config.num_layers, model_config.num_kv_heads
    imp = _matrix(path, data, "layer_importance", (layers,), "layers")
    pref = _matrix(path, data, "prompt_preference", (layers, heads), "layers, kv heads")
    return ModelStats(layer_importance=imp, prompt_preference=pref)


def _matrix(path: Path, data: dict, key: str, shape: tuple[int, ...], dims: str) -> torch.Tensor:
    """One numeric field of the profile, of exactly the model's shape, finite and >= 0."""
    if key not in data:
        raise CheckpointError(path, f"{key} is missing (a list of shape ({dims}) = {shape})")
    try:
        value = torch.tensor(data[key], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"{key} must be a list of numbers of shape ({dims}) = {shape} ({e})") from e
    if tuple(value.shape) != shape:
        raise CheckpointError(
            path, f"{key} is for {tuple(value.shape)} ({dims}), the model has {shape}: calibrated for another model?"
        )
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
        raise CheckpointError(path, f"{key} must hold finite numbers >= 0")
    return value
