"""What one forward pass needs to know about its sequences, set once before the forward (nano-vllm style).

The tokens of all sequences in a step are packed into one stream ``[T, ...]`` with no padding. Each
sequence attends, bidirectionally, to

* the cached KV held in pages for it: per (layer, kv_head) a page list and a kept length, which may
  differ between heads and layers (MaskKV keeps a different number of prompt tokens per head), and
* the K/V of its own tokens computed in this step (the "dense" part).

A full pass of the reference decoder is the case with no cached KV: every token is in the dense part.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from maskkv_engine.attention.backend import AttentionBackend

PAD_MULTIPLE = 64  # per-sequence query padding used by tiled backends; fixed so tiles never depend on the batch


@dataclass
class AttentionMetadata:
    """Packed-sequence layout of one forward pass.

    seq_lens:     [S] tokens of each sequence in this pass (the dense part).
    cu_seqlens:   [S+1] offsets of each sequence in the packed stream.
    q_index:      [S, Lpad] packed row of each sequence's j-th token; padding points at row 0.
    q_valid:      [S, Lpad] True for real tokens. Lpad is a multiple of PAD_MULTIPLE.
    block_tables: [L, S, H_kv, P] page ids of each sequence's cached KV, or None when nothing is cached.
    cached_lens:  [L, S, H_kv] tokens held in those pages (0 for a sequence without cache).
    k_pool, v_pool: [num_pages, block_size, head_dim] page pools shared by all layers and heads.
    """

    seq_lens: torch.Tensor
    cu_seqlens: torch.Tensor
    q_index: torch.Tensor
    q_valid: torch.Tensor
    block_tables: torch.Tensor | None = None
    cached_lens: torch.Tensor | None = None
    k_pool: torch.Tensor | None = None
    v_pool: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.numel())

    @property
    def block_size(self) -> int:
        assert self.k_pool is not None
        return int(self.k_pool.shape[1])

    def select(self, seqs: torch.Tensor) -> AttentionMetadata:
        """The same pass restricted to some sequences (rows still index the whole packed stream); the
        query padding shrinks to what those sequences need."""
        lens = self.seq_lens[seqs]
        lpad = -(-int(lens.max()) // PAD_MULTIPLE) * PAD_MULTIPLE
        return AttentionMetadata(
            seq_lens=lens,
            cu_seqlens=self.cu_seqlens,  # offsets of the whole stream; use q_index for rows
            q_index=self.q_index[seqs, :lpad],
            q_valid=self.q_valid[seqs, :lpad],
            block_tables=None if self.block_tables is None else self.block_tables[:, seqs],
            cached_lens=None if self.cached_lens is None else self.cached_lens[:, seqs],
            k_pool=self.k_pool,
            v_pool=self.v_pool,
        )

    @classmethod
    def build(
        cls,
        seq_lens: list[int],
        device: torch.device,
        block_tables: torch.Tensor | None = None,
        cached_lens: torch.Tensor | None = None,
        k_pool: torch.Tensor | None = None,
        v_pool: torch.Tensor | None = None,
    ) -> AttentionMetadata:
        lens = torch.tensor(seq_lens, dtype=torch.long)
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.long)
        cu[1:] = torch.cumsum(lens, 0)
        longest = max(seq_lens)
        lpad = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
        j = torch.arange(lpad)
        valid = j[None, :] < lens[:, None]
        index = torch.where(valid, cu[:-1, None] + j[None, :], torch.zeros((), dtype=torch.long))
        return cls(
            seq_lens=lens.to(device),
            cu_seqlens=cu.to(device),
            q_index=index.to(device),
            q_valid=valid.to(device),
            block_tables=None if block_tables is None else block_tables.to(device),
            cached_lens=None if cached_lens is None else cached_lens.to(device),
            k_pool=k_pool,
            v_pool=v_pool,
        )


@dataclass
class ForwardContext:
    """Set around one model forward; read by the attention layers."""

    attn: AttentionMetadata
    backend: AttentionBackend
    # Optional observer of every layer's post-RoPE q/k/v and attention sub-layer residuals: prefill
    # eviction (a KV policy choosing what to keep) and calibration use it. None on plain steps.
    kv_hook: Any = None


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("model forward called outside set_forward_context(); use ModelRunner or forward_full()")
    return _CONTEXT


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = previous
