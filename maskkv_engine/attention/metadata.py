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

from maskkv_engine.attention.transfer import to_device

if TYPE_CHECKING:
    from maskkv_engine.attention.backend import AttentionBackend

PAD_MULTIPLE = 64  # per-sequence padding used by tiled backends; fixed so tiles never depend on the batch


class RowLayout:
    """Varlen layout of one packed tensor: ``lens`` [S], ``cu`` [S+1] (on the device; ``offsets`` is ``cu`` as a
    host list), ``index`` [S, Lpad] (packed row of each sequence's j-th entry, padding points at row 0),
    ``valid`` [S, Lpad]. Lpad % PAD_MULTIPLE == 0. ``index`` / ``valid`` are built on the device on first use,
    Lpad from the host offsets: the torch backend never reads them, and nothing is read back."""

    def __init__(self, lens: torch.Tensor, cu: torch.Tensor, offsets: list[int]):
        self.lens = lens
        self.cu = cu
        self.offsets = offsets
        self._index: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None

    @staticmethod
    def host(lens: list[int]) -> tuple[list[int], torch.Tensor]:
        """(offsets, the host tensor [lens..., offsets...]) that ``from_device`` splits once it is moved."""
        offsets = [0, *itertools.accumulate(lens)]
        return offsets, torch.tensor([*lens, *offsets], dtype=torch.long)

    @classmethod
    def from_device(cls, offsets: list[int], moved: torch.Tensor) -> RowLayout:
        """The layout from the moved ``host`` tensor (its two halves are views of it)."""
        n = len(offsets) - 1
        return cls(moved[:n], moved[n:], offsets)

    @classmethod
    def build(cls, lens: list[int], device: torch.device) -> RowLayout:
        offsets, host = cls.host(lens)
        (moved,) = to_device([host], device)
        return cls.from_device(offsets, moved)

    def _build_index(self) -> None:
        lens = [b - a for a, b in zip(self.offsets, self.offsets[1:])]
        longest = max(lens, default=0)
        lpad = max(PAD_MULTIPLE, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        j = torch.arange(lpad, device=self.cu.device)
        valid = j[None, :] < self.lens[:, None]
        self._index = torch.where(
            valid, self.cu[:-1, None] + j[None, :], torch.zeros((), dtype=torch.long, device=j.device)
        )
        self._valid = valid

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
    cached_lens_host: torch.Tensor | None = None  # the same on the host (planning without a device read)

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
        """From host lists / tensors (block_tables [L, S, H_kv, P], cached_lens [L, S, H_kv]), in one copy."""
        meta, _ = cls.build_with(seq_lens, device, [], kv_lens, block_tables, cached_lens, k_pool, v_pool)
        return meta

    @classmethod
    def build_with(
        cls,
        seq_lens: list[int],
        device: torch.device,
        extra: list[torch.Tensor],
        kv_lens: list[int] | None = None,
        block_tables: torch.Tensor | None = None,
        cached_lens: torch.Tensor | None = None,
        k_pool: torch.Tensor | None = None,
        v_pool: torch.Tensor | None = None,
    ) -> tuple[AttentionMetadata, list[torch.Tensor]]:
        """``build``, moving the host tensors ``extra`` (the step's token ids, positions...) in the same copy;
        returns the metadata and ``extra`` on the device. ``cached_lens_host`` keeps the host copy of
        ``cached_lens`` for backends that plan on the host."""
        same = kv_lens is None or kv_lens == seq_lens
        q_offsets, q_host = RowLayout.host(seq_lens)
        kv_offsets, kv_host = (q_offsets, q_host) if same else RowLayout.host(kv_lens)
        host = [q_host, *([] if same else [kv_host])]
        paged = [] if block_tables is None else [block_tables, cached_lens]
        moved = to_device([*host, *paged, *extra], device)
        q = RowLayout.from_device(q_offsets, moved[0])
        kv = q if same else RowLayout.from_device(kv_offsets, moved[1])
        tables = moved[len(host) : len(host) + len(paged)]
        meta = cls(
            q=q,
            kv=kv,
            block_tables=tables[0] if paged else None,
            cached_lens=tables[1] if paged else None,
            k_pool=k_pool,
            v_pool=v_pool,
            cached_lens_host=cached_lens if paged and cached_lens.device.type == "cpu" else None,
        )
        return meta, moved[len(host) + len(paged) :]


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
