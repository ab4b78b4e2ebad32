"""The ``torch`` backend: per sequence, gather its pages into contiguous K/V, then one SDPA call.

For each sequence of the step and each kv head, the keys are [the head's kept prompt tokens, read out
of its pages] + [the sequence's dense keys]; softmax runs over both at once. A sequence's pages are
read with one indexed gather of whole pages (block table -> pool), so a cached step costs what a
dense-cache decoder's step costs: a copy of the cached K/V plus ``scaled_dot_product_attention``.

One call per sequence covers all its kv heads. Under ``full`` every head keeps the same length: no
padding, no mask. A MaskKV sequence's heads keep different lengths: each head's keys are read up to
the longest head's length and a boolean mask hides the rows past its own (exact: they get weight 0;
pages are zeroed when handed out, so those rows are finite). The G query heads of a kv head are
folded into the query rows ([H_kv, G * n, D]) instead of repeating K/V for them (GQA).

Batch invariance (bitwise on the CPU): every call sees one sequence only, with shapes that depend on
that sequence alone, so a request's output never depends on what else shares the step. The tiled
online softmax lives in the triton kernel, where it is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskkv_engine.attention.backend import AttentionBackend
from maskkv_engine.attention.metadata import AttentionMetadata


def _fold(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """q [n, H_q, D] -> [H_kv, G * n, D]: the G query heads of kv head h become rows of head h."""
    n, n_q, d = q.shape
    group = n_q // n_kv
    return q.view(n, n_kv, group, d).permute(1, 2, 0, 3).reshape(n_kv, group * n, d)


def _unfold(o: torch.Tensor, n: int) -> torch.Tensor:
    """[H_kv, G * n, D] -> [n, H_q, D] (inverse of ``_fold``)."""
    n_kv, rows, d = o.shape
    group = rows // n
    return o.view(n_kv, group, n, d).permute(2, 0, 1, 3).reshape(n, n_kv * group, d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [h, m, D], k / v [h, L, D] -> [h, m, D]. Bidirectional: ``mask`` [h, 1, L] (True = attend) only
    hides the padding rows of heads that keep fewer tokens than the sequence's longest head."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=None if mask is None else mask[None])[0]


class _Pages:
    """One layer's pages and kept lengths, read one sequence at a time."""

    def __init__(self, layer: int, meta: AttentionMetadata, compute: torch.dtype, workspace: dict):
        assert meta.k_pool is not None and meta.v_pool is not None and meta.cached_lens is not None
        lens = meta.cached_lens if meta.cached_lens_host is None else meta.cached_lens_host  # host: no device read
        self.lens: list[list[int]] = lens[layer].tolist()  # [S][H_kv]
        self.tables = meta.block_tables[layer]  # [S, H_kv, P]
        self.k_pool, self.v_pool = meta.k_pool, meta.v_pool
        self.block_size = meta.block_size
        self.compute = compute
        self.workspace = workspace

    def held(self, s: int) -> bool:
        return any(self.lens[s])

    def attend(self, s: int, qf: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor) -> torch.Tensor:
        """qf [H_kv, m, D] folded queries; kd / vd [H_kv, nk, D] dense keys -> [H_kv, m, D]."""
        lens = self.lens[s]
        longest = max(lens)
        k, v = self._keys(s, longest, kd, vd)
        if min(lens) == longest:
            return _sdpa(qf, k, v)
        # heads keeping fewer tokens than the longest: their rows [n_h, longest) are masked out
        pos = torch.arange(k.shape[1], device=qf.device)
        kept = torch.tensor(lens, device=qf.device)[:, None]
        return _sdpa(qf, k, v, ((pos < kept) | (pos >= longest))[:, None, :])

    def _keys(self, s: int, n: int, kd: torch.Tensor, vd: torch.Tensor):
        """[the first n page rows of every head] + [dense keys]: [H_kv, n + nk, D] for K and for V.

        One indexed read of whole pages, with room for the dense keys after them: the table gets
        placeholder pages (page 0) for that room, and the dense keys overwrite, from row n on, the
        tail of the last page and the placeholders. Rows past a head's own kept length (a shorter
        head's table padding points at page 0) are finite, and masked out by ``attend``."""
        bs, nk = self.block_size, kd.shape[1]
        used = -(-n // bs)
        room = -(-(n + nk) // bs) - used
        table = F.pad(self.tables[s, :, :used], (0, room))  # [H_kv, used + room]
        shape = (table.shape[0], table.shape[1] * bs, self.k_pool.shape[-1])
        out = []
        for name, pool, dense in (("k", self.k_pool, kd), ("v", self.v_pool, vd)):
            rows = self._buffer(name, pool, table.numel() * bs * shape[2]).view(table.numel(), bs, shape[2])
            torch.index_select(pool, 0, table.reshape(-1), out=rows)
            rows = rows.view(shape).to(self.compute)
            rows[:, n : n + nk] = dense
            out.append(rows[:, : n + nk])
        return out

    def _buffer(self, name: str, pool: torch.Tensor, numel: int) -> torch.Tensor:
        """A reused buffer for the gathered pages: a fresh multi-MiB tensor per call costs its page faults
        (a third of the read at 8k tokens per head). Only read within the call that fills it."""
        buf = self.workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != pool.dtype or buf.device != pool.device:
            buf = torch.empty(numel, dtype=pool.dtype, device=pool.device)
            self.workspace[name] = buf
        return buf[:numel]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        self._workspace: dict[str, torch.Tensor] = {}  # gathered-page buffers, reused across calls

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        n_kv = k.shape[1]
        q_cu = meta.q.offsets
        kv_cu = meta.kv.offsets
        pages = _Pages(layer, meta, compute, self._workspace) if meta.block_tables is not None else None
        out = q.new_empty(q.shape)
        for s in range(len(q_cu) - 1):
            q0, q1 = q_cu[s], q_cu[s + 1]
            if q1 == q0:
                continue
            keys = slice(kv_cu[s], kv_cu[s + 1])
            qf = _fold(q[q0:q1].to(compute), n_kv)
            kd = k[keys].to(compute).transpose(0, 1)  # [H_kv, nk, D]
            vd = v[keys].to(compute).transpose(0, 1)
            if pages is not None and pages.held(s):
                o = pages.attend(s, qf, kd, vd)
            else:
                o = _sdpa(qf, kd, vd)
            out[q0:q1] = _unfold(o, q1 - q0).to(out.dtype)
        return out
