"""The ``torch`` backend: per sequence, gather its pages into contiguous K/V, then one SDPA call.

For each sequence of the step and each kv head, the keys are [the head's kept prompt tokens, read out
of its pages] + [the sequence's dense keys]; softmax runs over both at once. The pages of a head are
read with one indexed gather (block table -> token rows of the pool), so a cached step costs what a
dense-cache decoder's step costs: a copy of the cached K/V plus ``scaled_dot_product_attention``.

Kv heads that keep the same number of tokens (every head under ``full``) share one call; a MaskKV
sequence, whose heads keep different lengths, makes one call per distinct length: no padding and no
mask, so what is computed is exactly softmax attention over the kept keys. The G query heads of a kv
head are folded into the query rows ([H_kv, G * n, D]) instead of repeating K/V for them (GQA).

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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [h, m, D], k / v [h, L, D] -> [h, m, D]; no mask (dLLMs attend both ways)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


class _Pages:
    """One layer's pages: token rows of the pool for every (sequence, kv head), built once per call."""

    def __init__(self, layer: int, meta: AttentionMetadata, compute: torch.dtype):
        assert meta.k_pool is not None and meta.v_pool is not None and meta.cached_lens is not None
        lens = meta.cached_lens[layer]  # [S, H_kv]
        self.lens: list[list[int]] = lens.tolist()
        longest = max((max(row) for row in self.lens), default=0)
        bs = meta.block_size
        used = -(-longest // bs)
        tables = meta.block_tables[layer, :, :, :used]  # [S, H_kv, used]
        offsets = torch.arange(bs, device=tables.device)
        self.rows = (tables[..., None] * bs + offsets).flatten(2)  # [S, H_kv, used * bs]
        d = meta.k_pool.shape[-1]
        self.k_pool = meta.k_pool.view(-1, d)
        self.v_pool = meta.v_pool.view(-1, d)
        self.compute = compute

    def held(self, s: int) -> bool:
        return any(self.lens[s])

    def attend(self, s: int, qf: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor) -> torch.Tensor:
        """qf [H_kv, m, D] folded queries; kd / vd [H_kv, nk, D] dense keys -> [H_kv, m, D]."""
        lens = self.lens[s]
        n_kv = len(lens)
        if all(n == lens[0] for n in lens):
            return _sdpa(qf, *self._keys(s, list(range(n_kv)), lens[0], kd, vd))
        out = torch.empty_like(qf)
        for n in sorted(set(lens)):
            heads = [h for h in range(n_kv) if lens[h] == n]
            sel = torch.tensor(heads, device=qf.device)
            out[sel] = _sdpa(qf[sel], *self._keys(s, heads, n, kd[sel], vd[sel]))
        return out

    def _keys(self, s: int, heads: list[int], n: int, kd: torch.Tensor, vd: torch.Tensor):
        """[kept tokens of these heads (n each)] + [dense keys], contiguous: [h, n + nk, D] for K and V."""
        if n == 0:
            return kd, vd
        rows = self.rows[s, heads[0] : heads[0] + 1] if len(heads) == 1 else self.rows[s, heads]
        idx = rows[:, :n].reshape(-1)
        shape = (len(heads), n, self.k_pool.shape[-1])
        kp = self.k_pool.index_select(0, idx).view(shape).to(self.compute)
        vp = self.v_pool.index_select(0, idx).view(shape).to(self.compute)
        return torch.cat([kp, kd], dim=1), torch.cat([vp, vd], dim=1)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        n_kv = k.shape[1]
        q_cu = meta.q.offsets
        kv_cu = meta.kv.offsets
        pages = _Pages(layer, meta, compute) if meta.block_tables is not None else None
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
