"""Building blocks shared by the LLaDA and Dream models (inference only).

Every matmul that mixes tokens of several requests goes through :func:`batch_invariant_linear` on the
CPU: BLAS picks different kernels (and so different rounding) by the number of rows, which would make
a request's tokens depend on what else shares its batch. Multiplying in fixed row tiles removes that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROW_TILE = 32  # rows per matmul tile on the CPU; fixed so results never depend on the batch


def batch_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` computed in fixed tiles of ``ROW_TILE`` rows (bitwise batch invariant)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows = x2.shape[0]
    pad = (-rows) % ROW_TILE
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    out = torch.matmul(x2.view(-1, ROW_TILE, x2.shape[1]), weight.t()).view(-1, weight.shape[0])[:rows]
    if bias is not None:
        out = out + bias
    return out.view(*shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-invariant on the CPU; cuBLAS on GPUs."""
    if x.device.type == "cpu":
        return batch_invariant_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameter names) whose CPU forward is batch invariant."""

    def reset_parameters(self) -> None:  # inference only: weights always come from a checkpoint
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:  # inference only: weights always come from a checkpoint
        pass


class RMSNorm(nn.Module):
    """RMSNorm as LLaDA and Qwen2 compute it: statistics in float32, cast back, then the weight."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32) if dtype != torch.float64 else x
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding for explicit token positions (kept prompt tokens keep theirs).

    ``in_float32``: LLaDA rotates in float32 (``rope_full_precision``); Qwen2/Dream in the model dtype.
    """

    def __init__(self, head_dim: int, theta: float, in_float32: bool):
        super().__init__()
        self.head_dim = head_dim
        self.in_float32 = in_float32
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (cos, sin), shaped [T, 1, head_dim] to broadcast over heads."""
        # float64 models (used by exactness tests) rotate in float64 end to end.
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        inv_freq = self.inv_freq  # a buffer: on the positions' device already
        if table_dtype == torch.float64:
            j = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device)
            inv_freq = 1.0 / (self.theta ** (j / self.head_dim))
        freqs = positions.to(table_dtype)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if table_dtype == torch.float32 and not self.in_float32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos[:, None, :], sin[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]."""
        dtype = x.dtype
        xr = x.to(cos.dtype)
        half = xr.shape[-1] // 2
        rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
        return (xr * cos + rotated * sin).to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
