"""Query-chunked attention: a long sequence's queries attend in chunks of rows, so the attention scores
of a first pass over a long prompt take ``chunk x n`` memory per head instead of ``n x n``.

Only sequences with more query rows than the chunk and no cached pages at the layer (full passes: a
first pass, every pass of ``none``, a refresh's full pass) are chunked; each chunk of their queries
attends to all of the sequence's keys with ``scaled_dot_product_attention`` (no mask: dLLMs attend both
ways). The other sequences of the step go to the backend in one call, exactly as without chunking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from maskkv_engine.attention.metadata import AttentionMetadata
from maskkv_engine.attention.transfer import to_device

if TYPE_CHECKING:
    from maskkv_engine.attention.backend import AttentionBackend


def dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Some query rows of one sequence over all its keys: q [m, H_q, D], k / v [n, H_kv, D] -> [m, H_q, D]."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None].to(compute),
        k.transpose(0, 1)[None].to(compute),
        v.transpose(0, 1)[None].to(compute),
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1).to(q.dtype)


def chunked_attention(
    backend: AttentionBackend,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    chunk: int,
) -> torch.Tensor:
    """``backend.forward`` with the queries of long full-pass sequences taken ``chunk`` rows at a time."""
    q_cu, kv_cu = meta.q.offsets, meta.kv.offsets  # host lists: planning reads nothing from the device
    q_lens = [b - a for a, b in zip(q_cu, q_cu[1:])]
    cached = meta.cached_lens if meta.cached_lens_host is None else meta.cached_lens_host
    held = [0] * len(q_lens) if meta.block_tables is None else cached[layer].sum(dim=-1).tolist()
    long = [s for s, n in enumerate(q_lens) if n > chunk and held[s] == 0]
    if not long:
        return backend.forward(layer, q, k, v, meta)
    out = q.new_empty(q.shape)
    rest = [s for s in range(len(q_lens)) if s not in set(long)]
    if rest:
        host = [torch.cat([torch.arange(cu[s], cu[s + 1]) for s in rest]) for cu in (q_cu, kv_cu)]
        q_rows, kv_rows, seqs = to_device([*host, torch.tensor(rest)], q.device)
        sub = AttentionMetadata.build(
            [q_lens[s] for s in rest],
            q.device,
            kv_lens=[kv_cu[s + 1] - kv_cu[s] for s in rest],
            block_tables=None if meta.block_tables is None else meta.block_tables[:, seqs],
            cached_lens=None if meta.cached_lens is None else cached[:, rest if cached.device.type == "cpu" else seqs],
            k_pool=meta.k_pool,
            v_pool=meta.v_pool,
        )
        out[q_rows] = backend.forward(layer, q[q_rows], k[kv_rows], v[kv_rows], sub)
    for s in long:
        keys, values = k[kv_cu[s] : kv_cu[s + 1]], v[kv_cu[s] : kv_cu[s + 1]]
        for a in range(q_cu[s], q_cu[s + 1], chunk):
            b = min(a + chunk, q_cu[s + 1])
            out[a:b] = dense_rows(q[a:b], keys, values)
    return out
