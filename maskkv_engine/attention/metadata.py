"""What one forward pass needs to know about its sequences, set once before the forward (nano-vllm style).

The tokens of all sequences in a step are packed into one stream ``[T, ...]`` with no padding. Each
sequence's queries attend, bidirectionally, to

* the cached prompt KV held in pages for it: per (layer, kv_head) a page list and a kept length,
  which may differ between heads and layers (MaskKV keeps a different number of tokens per head), and
* its dense keys: the K/V of its own tokens computed in this step, plus, for refresh strategies, the
  cached K/V of response tokens that are not recomputed this step.

Queries and dense keys have separate layouts, like flash-attention's varlen API (``cu_seqlens_q`` /
``cu_seqlens_k``): a sequence's queries are contiguous rows of ``q``, its dense keys contiguous rows of
``k`` / ``v``. In the common case (every token of the step is both a query and a key) the two are one.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from maskkv_engine.attention.backend import AttentionBackend

PAD_MULTIPLE = 64  # per-sequence padding used by tiled backends; fixed so tiles never depend on the batch


class RowLayout:
    """Varlen layout of one packed tensor: ``lens`` [S], ``cu`` [S+1] (and ``offsets``, the same as a Python
    list), ``index`` [S, Lpad] (packed row of each sequence's j-th entry, padding points at row 0), ``valid``
    [S, Lpad]. Lpad % PAD_MULTIPLE == 0. ``index`` / ``valid`` are built on first use: the torch backend
    never reads them, and a step builds a layout per layer when refresh strategies reshape it."""

    def __init__(
        self,
        lens: torch.Tensor,
        cu: torch.Tensor,
        index: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        offsets: list[int] | None = None,
    ):
        self.lens = lens
        self.cu = cu
        self._index = index
        self._valid = valid
        self.offsets = cu.tolist() if offsets is None else offsets

    @classmethod
    def build(cls, lens: list[int], device: torch.device) -> RowLayout:
        offsets = [0, *itertools.accumulate(lens)]
        return cls(
            torch.tensor(lens, dtype=torch.long, device=device),
            torch.tensor(offsets, dtype=torch.long, device=device),
            offsets=offsets,
        )

    def _build_index(self) -> None:
        lens = self.lens.cpu()
        longest = int(lens.max()) if lens.numel() else 0
        lpad = max(PAD_MULTIPLE, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        j = torch.arange(lpad)
        valid = j[None, :] < lens[:, None]
        index = torch.where(valid, self.cu.cpu()[:-1, None] + j[None, :], torch.zeros((), dtype=torch.long))
        self._index, self._valid = index.to(self.cu.device), valid.to(self.cu.device)

    @property
    def index(self) -> torch.Tensor:
        if self._index is None:
            self._build_index()
        return self._index

    @property
    def valid(self) -> torch.Tensor:
        if self._valid is None:
            self._build_index()
        return self._valid

    def select(self, seqs: torch.Tensor) -> RowLayout:
        """Some sequences only (rows still index the whole packed tensor; padding shrinks to fit)."""
        lens = self.lens[seqs]
        lpad = max(PAD_MULTIPLE, -(-int(lens.max()) // PAD_MULTIPLE) * PAD_MULTIPLE)
        return RowLayout(lens, self.cu, self.index[seqs, :lpad], self.valid[seqs, :lpad])


@dataclass
class AttentionMetadata:
    """Layout of one attention call.

    q:  queries, [S] sequences packed into the rows of the q tensor.
    kv: dense keys, packed into the rows of the k / v tensors (often the same layout as q).
    block_tables: [L, S, H_kv, P] page ids of each sequence's cached prompt KV, or None when none is cached.
    cached_lens:  [L, S, H_kv] tokens held in those pages (0 for a sequence without cache).
    k_pool, v_pool: [num_pages, block_size, head_dim] page pools shared by all layers and heads.
    """

    q: RowLayout
    kv: RowLayout
    block_tables: torch.Tensor | None = None
    cached_lens: torch.Tensor | None = None
    k_pool: torch.Tensor | None = None
    v_pool: torch.Tensor | None = None

    # the q layout, under the names varlen kernels use
    @property
    def seq_lens(self) -> torch.Tensor:
        return self.q.lens

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return self.q.cu

    @property
    def cu_seqlens_k(self) -> torch.Tensor:
        return self.kv.cu

    @property
    def q_index(self) -> torch.Tensor:
        return self.q.index

    @property
    def same_layout(self) -> bool:
        return self.kv is self.q

    @property
    def num_seqs(self) -> int:
        return int(self.q.lens.numel())

    @property
    def block_size(self) -> int:
        assert self.k_pool is not None
        return int(self.k_pool.shape[1])

    def select(self, seqs: torch.Tensor) -> AttentionMetadata:
        """The same call restricted to some sequences (used to bucket sequences by length)."""
        q = self.q.select(seqs)
        return AttentionMetadata(
            q=q,
            kv=q if self.same_layout else self.kv.select(seqs),
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
        kv_lens: list[int] | None = None,
        block_tables: torch.Tensor | None = None,
        cached_lens: torch.Tensor | None = None,
        k_pool: torch.Tensor | None = None,
        v_pool: torch.Tensor | None = None,
    ) -> AttentionMetadata:
        q = RowLayout.build(seq_lens, device)
        kv = q if kv_lens is None or kv_lens == seq_lens else RowLayout.build(kv_lens, device)
        return cls(
            q=q,
            kv=kv,
            block_tables=None if block_tables is None else block_tables.to(device),
            cached_lens=None if cached_lens is None else cached_lens.to(device),
            k_pool=k_pool,
            v_pool=v_pool,
        )


@dataclass
class ForwardContext:
    """Set around one model forward; read by the attention layers.

    ``hooks`` (a ``StepHooks``) sees every layer's q/k/v and residuals and may shape the step: which
    rows are recomputed, what cached K/V joins the keys, how outputs merge with caches. None on a
    plain full pass.
    """

    attn: AttentionMetadata
    backend: AttentionBackend
    hooks: Any = None
    chunk_rows: int | None = None  # query-chunked full passes: attention and MLP over this many rows at a time


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError(
            "model forward called outside set_forward_context(); use ModelRunner or full_forward_logits()"
        )
    return _CONTEXT


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = previous
