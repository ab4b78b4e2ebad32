"""The attention backend contract, and the one function the models call."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from maskkv_engine.attention.chunked import chunked_attention
from maskkv_engine.attention.metadata import AttentionMetadata, get_forward_context


class AttentionBackend(ABC):
    """Bidirectional attention of packed queries over [cached pages of their head] + [their dense keys].

    Each (sequence, layer, kv_head) is its own variable-length sequence with G = H_q / H_kv query
    heads; query head i reads kv head i // G. No causal mask anywhere: dLLMs attend both ways.
    """

    name: str = "base"

    @abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q [Tq, H_q, D] laid out by ``meta.q``; k / v [Tk, H_kv, D] by ``meta.kv`` -> [Tq, H_q, D]."""


def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Called by every attention layer with the fresh q/k/v of all packed rows; returns the attention
    output of the rows the step computes at this layer (all of them on a plain pass)."""
    ctx = get_forward_context()
    meta = ctx.attn
    if ctx.hooks is not None:
        q, k, v, meta = ctx.hooks.prepare_attention(layer, q, k, v, meta)
    if q.shape[0] == 0:  # a refresh step may recompute no row at all in a layer
        return q.new_empty(q.shape)
    if ctx.chunk_rows is not None and q.shape[0] > ctx.chunk_rows:
        return chunked_attention(ctx.backend, layer, q, k, v, meta, ctx.chunk_rows)
    return ctx.backend.forward(layer, q, k, v, meta)
