"""The ``xformers`` backend: gather each (sequence, kv head) into one contiguous varlen block, then
xformers' memory-efficient attention with a block-diagonal bias (no causal mask).

Each (sequence, kv head) becomes one block of the bias: its queries are the G query heads of that kv
head times the sequence's tokens (row = token * G + g), its keys are the head's kept prompt tokens
(gathered from the pages) followed by the sequence's own K/V of this step. All blocks share one
attention "head", so GQA and per-head budgets need nothing special. The gather copies the kept K/V
once per step; the ``triton`` backend reads the pages in place and is the fast path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maskkv_engine.attention.backend import AttentionBackend
from maskkv_engine.attention.metadata import AttentionMetadata


@dataclass
class VarlenBlocks:
    """Queries and keys of every (sequence, kv head) block, packed back to back, in (seq, head) order."""

    q: torch.Tensor  # [Mq, D]
    k: torch.Tensor  # [Mk, D]
    v: torch.Tensor  # [Mk, D]
    q_seqlens: list[int]  # per block: tokens * G
    kv_seqlens: list[int]  # per block: kept tokens + tokens
    q_token: torch.Tensor  # [Mq] packed token of each query row
    q_head: torch.Tensor  # [Mq] query head of each query row


def _local_index(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For blocks of ``lengths`` rows laid back to back: the block of each row and its index inside it."""
    block = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return block, torch.arange(block.numel(), device=lengths.device) - starts[block]


def gather_varlen(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> VarlenBlocks:
    """Pack q [T, H_q, D] and the keys each (sequence, kv head) sees into varlen blocks (no Python loops)."""
    n_q, d = q.shape[1], q.shape[2]
    n_kv = k.shape[1]
    group = n_q // n_kv
    seq_lens = meta.seq_lens.repeat_interleave(n_kv)  # queries per block, block b = seq * H_kv + head
    starts = meta.cu_seqlens[:-1].repeat_interleave(n_kv)
    kv_lens = meta.kv.lens.repeat_interleave(n_kv)  # dense keys per block
    kv_starts = meta.cu_seqlens_k[:-1].repeat_interleave(n_kv)
    heads = torch.arange(n_kv, device=q.device).repeat(meta.num_seqs)
    if meta.block_tables is None:
        cached = torch.zeros_like(seq_lens)
    else:
        assert meta.cached_lens is not None
        cached = meta.cached_lens[layer].reshape(-1).to(seq_lens.dtype)

    qb, qi = _local_index(seq_lens * group)
    q_token = starts[qb] + qi // group
    q_head = heads[qb] * group + qi % group

    kb, ki = _local_index(cached + kv_lens)
    from_pages = ki < cached[kb]
    dense_token = kv_starts[kb] + ki - cached[kb]
    k_rows = torch.empty(ki.numel(), d, dtype=k.dtype, device=k.device)
    v_rows = torch.empty_like(k_rows)
    dense = ~from_pages
    k_rows[dense] = k[dense_token[dense], heads[kb[dense]]]
    v_rows[dense] = v[dense_token[dense], heads[kb[dense]]]
    if meta.block_tables is not None:
        assert meta.k_pool is not None and meta.v_pool is not None
        page_size = meta.block_size
        tables = meta.block_tables[layer].reshape(-1, meta.block_tables.shape[-1])  # [S * H_kv, P]
        b, i = kb[from_pages], ki[from_pages]
        slots = tables[b, i // page_size] * page_size + i % page_size
        k_rows[from_pages] = meta.k_pool.reshape(-1, d)[slots].to(k.dtype)
        v_rows[from_pages] = meta.v_pool.reshape(-1, d)[slots].to(v.dtype)
    return VarlenBlocks(
        q=q[q_token, q_head],
        k=k_rows,
        v=v_rows,
        q_seqlens=(seq_lens * group).tolist(),
        kv_seqlens=(cached + kv_lens).tolist(),
        q_token=q_token,
        q_head=q_head,
    )


class XFormersAttentionBackend(AttentionBackend):
    name = "xformers"

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        try:
            from xformers.ops import memory_efficient_attention
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask
        except ImportError as e:
            raise RuntimeError(
                "attention_backend='xformers' needs the xformers package built for this torch "
                "(pip install xformers); otherwise use attention_backend='triton' (GPU) or 'torch'"
            ) from e
        if self.device.type != "cuda":
            raise RuntimeError(
                f"attention_backend='xformers' needs a CUDA device (got {self.device}); on the CPU use "
                "attention_backend='torch'"
            )
        self._attention = memory_efficient_attention
        self._mask = BlockDiagonalMask
        try:  # a wheel built for another torch / CUDA imports fine and fails at the first call
            x = torch.zeros(1, 8, 1, 64, dtype=torch.float16, device=self.device)
            memory_efficient_attention(x, x, x, attn_bias=BlockDiagonalMask.from_seqlens([8]))
        except Exception as e:
            raise RuntimeError(
                f"xformers is installed but its CUDA attention ops do not run here ({e}); "
                "use attention_backend='triton' or 'torch'"
            ) from e

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        blocks = gather_varlen(layer, q, k, v, meta)
        bias = self._mask.from_seqlens(blocks.q_seqlens, blocks.kv_seqlens)
        rows = self._attention(
            blocks.q[None, :, None],  # [1, Mq, 1, D]: one batch row, one head, blocks on the diagonal
            blocks.k[None, :, None],
            blocks.v[None, :, None],
            attn_bias=bias,
            scale=1.0 / math.sqrt(q.shape[-1]),
        )
        out = torch.empty_like(q)
        out[blocks.q_token, blocks.q_head] = rows[0, :, 0]
        return out
