"""StepHooks: what a step may do at each layer, called by the shared block flow (models/block.py).

The default is a plain pass: every row computed, keys = the rows' own fresh K/V (+ pages). The engine's
StepContext overrides these to run KV policies (choose and write prompt pages) and refresh strategies
(recompute a subset of rows, reuse cached K/V and outputs for the rest).
"""

from __future__ import annotations

import torch

from maskkv_engine.attention.metadata import AttentionMetadata


class StepHooks:
    def rows(self, layer: int) -> torch.Tensor | None:
        """Packed rows whose attention output and MLP are computed at ``layer`` (None: all of them)."""
        return None

    def prepare_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Fresh post-RoPE q/k/v of every packed row -> the queries, dense keys and layout the backend gets."""
        return q, k, v, meta

    def on_attention_residual(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """Residual stream before and after the attention sub-layer (rows as computed)."""

    def merge(
        self,
        layer: int,
        x: torch.Tensor,
        rows: torch.Tensor | None,
        x1: torch.Tensor,
        attn_out: torch.Tensor,
        mlp_out: torch.Tensor,
    ) -> torch.Tensor:
        """The layer's output for every packed row. ``x``: the layer input (all rows); for the computed
        ``rows``: ``x1`` = x + attn_out, and the attention and MLP outputs."""
        assert rows is None, "a step that skips rows must say how to fill them"
        return x1 + mlp_out
