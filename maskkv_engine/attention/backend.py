"""The attention backend contract, and the one function the models call."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from maskkv_engine.attention.metadata import AttentionMetadata, get_forward_context


class AttentionBackend(ABC):
    """Bidirectional attention of packed queries over [cached pages of their head] + [their own dense KV].

    Each (sequence, layer, kv_head) is its own variable-length sequence with G = H_q / H_kv query
    heads; query head i reads kv head i // G. No causal mask anywhere: dLLMs attend both ways.
    """

    name: str = "base"

    @abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q [T, H_q, D], k/v [T, H_kv, D] (post-RoPE, packed) -> [T, H_q, D]."""


def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Called by every attention layer: lets the step's KV hook see q/k/v, then runs the backend."""
    ctx = get_forward_context()
    if ctx.kv_hook is not None:
        ctx.kv_hook.on_qkv(layer, q, k, v)
    return ctx.backend.forward(layer, q, k, v, ctx.attn)


def residual_hook(layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
    """Called with the residual stream before and after each attention sub-layer (layer importance)."""
    ctx = get_forward_context()
    if ctx.kv_hook is not None:
        ctx.kv_hook.on_attention_residual(layer, h_in, h_out)
