"""Load a dLLM from a local directory: config.json plus one or several safetensors files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.models.registry import resolve_architecture

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,  # exactness tests only
}


def read_hf_config(path: str | os.PathLike) -> dict:
    root = Path(path)
    cfg_file = root / "config.json"
    if not root.is_dir():
        raise ValueError(f"model={str(path)!r} is not a local directory (model hubs are not used: pass a path)")
    if not cfg_file.is_file():
        raise ValueError(f"model={str(path)!r} has no config.json")
    with cfg_file.open() as f:
        return json.load(f)


def resolve_dtype(dtype: str | torch.dtype, config_dtype: str, device: torch.device) -> torch.dtype:
    """'auto': float32 on the CPU (bf16 matmuls are slow there), the checkpoint's half type on GPUs."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported (allowed: {sorted(DTYPES)} or 'auto')")
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(config_dtype, torch.bfloat16) if config_dtype in ("bfloat16", "float16") else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported (allowed: 'auto', {', '.join(map(repr, DTYPES))})")
    return DTYPES[dtype]


def safetensors_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        with index.open() as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({root / name for name in weight_map.values()})
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise ValueError(f"model.safetensors.index.json names shard files that are missing: {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model={str(root)!r} has no *.safetensors weights (load_format='dummy' for random weights)")
    return files


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    load_format: str = "auto",
    seed: int = 0,
) -> tuple[nn.Module, DiffusionLMConfig]:
    """Build the model named by config.json ``architectures`` and fill it from the checkpoint.

    ``load_format='dummy'`` gives random weights of the right shapes (speed benchmarks of big shapes).
    """
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format={load_format!r} is not supported (allowed: 'auto', 'safetensors', 'dummy')")
    device = torch.device(device)
    hf_config = read_hf_config(path)
    _, spec = resolve_architecture(hf_config)
    cfg = spec.parse_config(hf_config)
    torch_dtype = resolve_dtype(dtype, cfg.torch_dtype, device)

    with torch.device("meta"):
        model = spec.model_class(cfg)
    expected = {name: p for name, p in model.named_parameters()}
    if load_format == "dummy":
        state = _random_state(expected, seed, torch_dtype, device)
    else:
        state = _read_state(Path(path), expected, torch_dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary = type(model.rotary)(cfg.head_dim, cfg.rope_theta, in_float32=cfg.rope_in_float32).to(device)
    model.eval().requires_grad_(False)
    return model, cfg


def _read_state(root: Path, expected: dict, dtype: torch.dtype, device: torch.device) -> dict:
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file in safetensors_files(root):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in expected:
                    unexpected.append(name)
                    continue
                tensor = f.get_tensor(name)
                want = tuple(expected[name].shape)
                if tuple(tensor.shape) != want:
                    raise ValueError(f"weight {name} has shape {tuple(tensor.shape)} in {file.name}, expected {want}")
                state[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected weights {sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise ValueError(f"checkpoint at {str(root)!r} does not match its config.json: " + "; ".join(parts))
    return state


def _random_state(expected: dict, seed: int, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    state = {}
    for name, p in expected.items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight") or ".norm." in name:
            state[name] = torch.ones(p.shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            state[name] = torch.zeros(p.shape, dtype=dtype, device=device)
        else:
            t = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
            state[name] = t.to(device=device, dtype=dtype)
    return state
