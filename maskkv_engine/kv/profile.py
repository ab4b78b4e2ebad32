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
    """The profile at ``explicit`` (must exist), else ``<model>/maskkv_profile.json`` if present, else None."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ValueError(f"kv_policy_config['profile_path']={explicit!r} does not exist")
    else:
        path = Path(model_path) / PROFILE_FILE
        if not path.is_file():
            return None
    data = json.loads(path.read_text())
    layers, heads = model_config.num_layers, model_config.num_kv_heads
    imp = torch.tensor(data["layer_importance"], dtype=torch.float64)
    pref = torch.tensor(data["prompt_preference"], dtype=torch.float64)
    if imp.shape != (layers,) or pref.shape != (layers, heads):
        raise ValueError(
            f"profile {str(path)!r} is for {tuple(pref.shape)} (layers, kv heads), the model has ({layers}, {heads})"
        )
    return ModelStats(layer_importance=imp, prompt_preference=pref)
