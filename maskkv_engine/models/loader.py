"""Load a dLLM from a local directory: config.json plus one or several safetensors files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.models.errors import CheckpointError
from maskkv_engine.models.registry import parse_config, resolve_architecture

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,  # exactness tests only
}


def read_hf_config(path: str | os.PathLike) -> dict:
    """config.json as a dict; CheckpointError (naming the file) when it is absent, not JSON or not an object."""
    root = Path(path)
    cfg_file = root / "config.json"
    if not root.is_dir():
        raise CheckpointError(path, "is not a local directory (model hubs are not used: pass a path)")
    if not cfg_file.is_file():
        raise CheckpointError(path, "has no config.json (the file that names the architecture and its sizes)")
    _check_inside(root, cfg_file, cfg_file)
    return read_json_object(cfg_file)


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold one object (config.json, the shard index, a profile)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(file, f"is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(file, f"must hold a JSON object, got a {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike) -> DiffusionLMConfig:
    """The checkpoint's normalised config, every field checked (CheckpointError names config.json and the field)."""
    return parse_config(read_hf_config(path), source=Path(path) / "config.json")


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


def _allowed_roots(root: Path) -> list[Path]:
    """Where a checkpoint's files may live: its own folder, and for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>``, whose files are links into ``../../blobs``) that repo's blobs."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def _check_inside(root: Path, file: Path, source: Path, entry: str | None = None) -> Path:
    """Refuse a file (an index entry, or a symlink) that resolves outside the model folder: loading a
    checkpoint must never read files it does not contain. ``entry``: the name as the index spells it."""
    name = entry if entry is not None else file.name
    try:
        real = file.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(source, f"{name!r} cannot be resolved ({e})") from e
    if not any(real.is_relative_to(r) for r in _allowed_roots(root)):
        raise CheckpointError(source, f"{name!r} resolves to {str(real)!r}, outside the model directory: refused")
    return real


def safetensors_files(root: Path) -> list[Path]:
    """The weight files: the shards named by model.safetensors.index.json, else every *.safetensors."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        _check_inside(root, index, index)
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(index, f"weight_map={weight_map!r} must be a non-empty object (tensor name -> shard)")
        bad = [n for n in weight_map.values() if not isinstance(n, str) or not n]
        if bad:
            raise CheckpointError(index, f"weight_map values {bad[:4]} must be shard file names")
        for name in sorted(set(weight_map.values())):
            _check_inside(root, root / name, index, entry=name)
        files = sorted({root / name for name in weight_map.values()})
        missing = [str(p.relative_to(root)) for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(index, f"weight_map names shard files that are missing: {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(root, "has no *.safetensors weights (load_format='dummy' for random weights)")
    for file in files:
        _check_inside(root, file, file)
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
    cfg = parse_config(hf_config, source=Path(path) / "config.json")
    _, spec = resolve_architecture(hf_config)
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


# safetensors dtype names of the float types a checkpoint may store (cast to the dtype asked for)
FLOAT_STORAGE = {"F64", "F32", "F16", "BF16"}


def _read_state(root: Path, expected: dict, dtype: torch.dtype, device: torch.device) -> dict:
    files = safetensors_files(root)
    index = root / "model.safetensors.index.json"
    source = index if index.is_file() else files[0] if len(files) == 1 else root
    state: dict[str, torch.Tensor] = {}
    found_in: dict[str, Path] = {}
    unexpected: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in found_in:
                        raise CheckpointError(file, f"tensor {name} is also in {found_in[name].name}")
                    found_in[name] = file
                    if name not in expected:
                        unexpected.append(name)
                        continue
                    state[name] = _read_tensor(f, file, name, tuple(expected[name].shape), dtype, device)
        except SafetensorError as e:
            raise CheckpointError(file, f"is not a readable safetensors file ({e})") from e
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected weights {sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(source, "does not match its config.json: " + "; ".join(parts))
    return state


def _read_tensor(f, file: Path, name: str, want: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One tensor, its storage type and shape checked before it is read, its values after."""
    header = f.get_slice(name)
    stored = header.get_dtype()
    if stored not in FLOAT_STORAGE:
        raise CheckpointError(
            file,
            f"tensor {name} is stored as {stored} (allowed: {sorted(FLOAT_STORAGE)}; quantized weights are not supported)",
        )
    shape = tuple(header.get_shape())
    if shape != want:
        raise CheckpointError(file, f"weight {name} has shape {shape}, expected {want}")
    source = f.get_tensor(name)
    tensor = source.to(device=device, dtype=dtype)
    if not _all_finite(tensor):
        where = "" if not _all_finite(source) else f" after conversion to {str(dtype).removeprefix('torch.')}"
        raise CheckpointError(file, f"tensor {name} holds NaN or Inf values{where}")
    return tensor


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """In chunks, so an 8B model's embedding does not need a second embedding-sized bool tensor."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def _random_state(
    expected: dict, seed: int, dtype: torch.dtype, device: torch.device, draw_device: str | torch.device = "cpu"
) -> dict:
    """Random weights (``load_format='dummy'``): N(0, 0.02) in float32, ones for norms, zeros for biases.
    Drawn on the CPU by default, so a seed gives the same model on every device; a GPU benchmark may draw
    on the device itself (``draw_device``), which for 8B parameters saves a minute."""
    gen = torch.Generator(device=draw_device).manual_seed(seed)
    state = {}
    for name, p in expected.items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight") or ".norm." in name:
            state[name] = torch.ones(p.shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            state[name] = torch.zeros(p.shape, dtype=dtype, device=device)
        else:
            t = torch.empty(p.shape, dtype=torch.float32, device=draw_device).normal_(0.0, 0.02, generator=gen)
            state[name] = t.to(device=device, dtype=dtype)
    return state
