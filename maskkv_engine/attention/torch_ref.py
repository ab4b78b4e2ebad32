"""The ``torch`` backend: gather pages, then tiled online-softmax attention. CPU default and the reference.

Keys are visited in fixed tiles of ``TILE`` tokens (cached pages first, then the sequence's own
tokens), with the running max / sum / accumulator of the online softmax in float32 (float64 for
float64 models). Tiles are fixed, so a sequence's result never depends on the other sequences of
the batch: padding tiles are exact no-ops. That is what makes batch invariance bitwise on the CPU.
"""

from __future__ import annotations

import math

import torch

from maskkv_engine.attention.backend import AttentionBackend
from maskkv_engine.attention.metadata import PAD_MULTIPLE, AttentionMetadata

TILE = PAD_MULTIPLE  # query rows and keys per tile


class _OnlineSoftmax:
    """Running (max, sum, weighted values) over key tiles, per query row."""

    def __init__(self, q_tiles: torch.Tensor, scale: float):
        # q_tiles: [S, H_kv, n_qtiles, TILE, D] in the compute dtype
        self.q = q_tiles * scale
        shape = q_tiles.shape[:-1] + (1,)
        self.m = torch.full(shape, -math.inf, dtype=q_tiles.dtype, device=q_tiles.device)
        self.l = torch.zeros(shape, dtype=q_tiles.dtype, device=q_tiles.device)
        self.acc = torch.zeros_like(q_tiles)

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """k, v: [S, H_kv, TILE, D]; valid: [S, H_kv, TILE]."""
        scores = torch.matmul(self.q, k.unsqueeze(2).transpose(-1, -2))  # [S, H, nq, TILE, TILE]
        scores = scores.masked_fill(~valid[:, :, None, None, :], -math.inf)
        m_new = torch.maximum(self.m, scores.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(scores - m_safe)
        correction = torch.exp(self.m - m_safe)
        self.l = self.l * correction + p.sum(-1, keepdim=True)
        self.acc = self.acc * correction + torch.matmul(p, v.unsqueeze(2))
        self.m = m_new

    def result(self) -> torch.Tensor:
        return self.acc / self.l


def _length_buckets(meta: AttentionMetadata) -> list[torch.Tensor]:
    """Sequence indices grouped by padded length (powers of two times TILE), so a batch mixing full
    passes over long prompts with short cached steps never pads the short ones to the long ones."""
    longest = torch.maximum(meta.q.lens, meta.kv.lens).cpu()
    tiles = (longest + TILE - 1) // TILE
    bucket = torch.ceil(torch.log2(tiles.double())).long()
    return [(bucket == b).nonzero().squeeze(-1) for b in torch.unique(bucket)]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        buckets = _length_buckets(meta)
        if len(buckets) == 1:
            return self._forward_bucket(layer, q, k, v, meta)
        out = q.new_empty(q.shape)
        for seqs in buckets:
            sub = meta.select(seqs.to(meta.q.index.device))
            out[sub.q.index[sub.q.valid]] = self._forward_bucket(layer, q, k, v, sub)
        return out

    def _forward_bucket(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        out_dtype = q.dtype
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        n_q, d = q.shape[1], q.shape[2]
        n_kv = k.shape[1]
        group = n_q // n_kv
        s, lpad = meta.q.index.shape

        # [S, Lpad, H_q, D] -> [S, H_kv, G * Lpad / TILE, TILE, D]: query head i belongs to kv head i // G
        qp = q[meta.q.index].to(compute).view(s, lpad, n_kv, group, d).permute(0, 2, 3, 1, 4)
        q_tiles = qp.reshape(s, n_kv, group * lpad // TILE, TILE, d)
        state = _OnlineSoftmax(q_tiles, 1.0 / math.sqrt(d))

        if meta.block_tables is not None:
            self._visit_pages(state, layer, meta, compute)

        kd = k[meta.kv.index].to(compute).permute(0, 2, 1, 3)  # [S, H_kv, Lkpad, D]
        vd = v[meta.kv.index].to(compute).permute(0, 2, 1, 3)
        for t0 in range(0, kd.shape[2], TILE):
            valid = meta.kv.valid[:, None, t0 : t0 + TILE].expand(s, n_kv, TILE)
            state.update(kd[:, :, t0 : t0 + TILE], vd[:, :, t0 : t0 + TILE], valid)

        out = state.result().view(s, n_kv, group, lpad, d).permute(0, 3, 1, 2, 4).reshape(s, lpad, n_q, d)
        return out[meta.q.valid].to(out_dtype)

    @staticmethod
    def _visit_pages(state: _OnlineSoftmax, layer: int, meta: AttentionMetadata, compute: torch.dtype) -> None:
        assert meta.k_pool is not None and meta.v_pool is not None and meta.cached_lens is not None
        block_size = meta.block_size
        per_tile = max(1, TILE // block_size)  # pages per key tile
        tables = meta.block_tables[layer]  # [S, H_kv, P]
        lens = meta.cached_lens[layer]  # [S, H_kv]
        s, n_kv, n_pages = tables.shape
        if int(lens.max()) == 0:
            return
        pad = (-n_pages) % per_tile
        if pad:  # pad to whole tiles so a tile's shape never depends on the batch
            tables = torch.cat([tables, tables.new_zeros(s, n_kv, pad)], dim=-1)
        used_pages = -(-int(lens.max()) // block_size)
        tile_tokens = per_tile * block_size
        offsets = torch.arange(tile_tokens, device=tables.device)
        for p0 in range(0, used_pages, per_tile):
            pages = tables[:, :, p0 : p0 + per_tile]
            kt = meta.k_pool[pages].reshape(s, n_kv, tile_tokens, -1).to(compute)
            vt = meta.v_pool[pages].reshape(s, n_kv, tile_tokens, -1).to(compute)
            valid = (p0 * block_size + offsets)[None, None, :] < lens[:, :, None]
            state.update(kt, vt, valid)
