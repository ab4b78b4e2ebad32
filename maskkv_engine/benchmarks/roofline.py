"""The floor under a denoise step: the bytes it must read and the FLOPs it must do, against the device's
measured matmul peak and memory bandwidth (measured in the same run as the steps they judge).

A step computes ``rows`` positions (the response for a cached step; prompt + response for a full pass)
through every layer. It must read every weight once (all layers and the LM head; the embedding table
only for its rows, negligible) and the KV it attends to that lives in memory (the kept prompt pages;
activations of the step itself are not counted). FLOPs: 2 per weight per row for the projections and
the MLP, 4 * keys * head_dim per query head and row for attention (QK^T and PV), and the LM head for
the rows whose logits are taken.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from maskkv_engine.models.config import DiffusionLMConfig


@dataclass
class DevicePeak:
    flops: float  # FLOP/s of a large matmul in the benchmark dtype
    bandwidth: float  # bytes/s of a large copy (read + write counted)

    def describe(self) -> str:
        return f"matmul peak {self.flops / 1e9:.0f} GFLOP/s, copy bandwidth {self.bandwidth / 1e9:.1f} GB/s"


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times) if device.type == "cpu" else statistics.median(times)


def measure_peak(
    device: torch.device, dtype: torch.dtype, matmul_size: int | None = None, copy_bytes: int | None = None
) -> DevicePeak:
    """Best of a few 2048^3 (CPU) / 8192^3 (GPU) matmuls, and a 256 MiB (CPU) / 2 GiB (GPU) copy (the defaults;
    ``matmul_size`` / ``copy_bytes`` override them, e.g. for a quick toy run).

    On a shared CPU the best time is the least contended one: the floor it gives is optimistic, so the
    distance to it is an upper bound on what better kernels could win.
    """
    n = matmul_size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _best_time(lambda: torch.matmul(a, b), device, 10 if device.type == "cuda" else 3)
    flops = 2 * n**3 / seconds
    size = copy_bytes or ((2 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    seconds = _best_time(lambda: dst.copy_(src), device, 10 if device.type == "cuda" else 5)
    return DevicePeak(flops=flops, bandwidth=2 * size / seconds)


def weight_bytes(cfg: DiffusionLMConfig, element_size: int) -> int:
    """Every projection and MLP weight plus the LM head (the embedding table is only gathered)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = d * cfg.num_heads * hd * 2 + 2 * d * cfg.num_kv_heads * hd + 3 * d * cfg.intermediate_size
    return (cfg.num_layers * per_layer + cfg.vocab_size * d) * element_size


def step_flops(cfg: DiffusionLMConfig, rows: int, keys_per_head: float, logit_rows: int) -> float:
    """FLOPs of one step over ``rows`` positions; ``keys_per_head``: mean keys a query head attends to,
    averaged over layers (kept prompt tokens + the step's own rows)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer_weights = d * cfg.num_heads * hd * 2 + 2 * d * cfg.num_kv_heads * hd + 3 * d * cfg.intermediate_size
    linear = 2 * rows * per_layer_weights * cfg.num_layers
    attention = 4 * rows * keys_per_head * hd * cfg.num_heads * cfg.num_layers
    head = 2 * logit_rows * d * cfg.vocab_size
    return float(linear + attention + head)


@dataclass
class StepFloor:
    flops: float
    bytes: float
    seconds: float  # max(flops / peak, bytes / bandwidth)
    bound: str  # "compute" or "memory"


def step_floor(
    cfg: DiffusionLMConfig,
    peak: DevicePeak,
    element_size: int,
    rows: int,
    keys_per_head: float,
    kv_bytes: float,
    logit_rows: int,
) -> StepFloor:
    flops = step_flops(cfg, rows, keys_per_head, logit_rows)
    nbytes = weight_bytes(cfg, element_size) + kv_bytes
    compute, memory = flops / peak.flops, nbytes / peak.bandwidth
    return StepFloor(flops, nbytes, max(compute, memory), "compute" if compute >= memory else "memory")
