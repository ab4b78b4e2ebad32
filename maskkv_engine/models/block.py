"""The transformer block flow shared by LLaDA and Dream, with the step's hooks in their places.

Pre-norm: x1 = x + out_proj(attention(rope(qkv(norm1(x))))); out = x1 + mlp(norm2(x1)). q/k/v are
projected for every packed row (refresh strategies compare or reuse them); attention and MLP run for
the rows the step recomputes, and ``merge`` fills the other rows from their caches.

With ``chunk_rows`` set (the engine's ``prefill_chunk_size``), the q/k/v projections with RoPE, attention
(``attention/chunked.py``) and the MLP run over chunks of that many rows, so a long full pass never holds
its n x n scores, its n x intermediate MLP activations, or the normed rows, raw projections and RoPE
temporaries of every row at once; the hooks still see every row's q/k/v, residuals and outputs at once.
What a layer holds for all n rows is then its input, q/k/v, and the attention and residual outputs, and
each is dropped as soon as the block has read it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from maskkv_engine.attention.backend import attention
from maskkv_engine.attention.metadata import get_forward_context

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def block_forward(
    layer: int,
    x: torch.Tensor,
    norm1: Callable[[torch.Tensor], torch.Tensor],
    qkv: Callable[[torch.Tensor, slice], QKV],  # (norm1(x[rows]), rows)
    out_proj: Callable[[torch.Tensor], torch.Tensor],
    norm2: Callable[[torch.Tensor], torch.Tensor],
    mlp: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    ctx = get_forward_context()
    hooks = ctx.hooks
    q, k, v = _in_chunks(lambda r: qkv(norm1(x[r]), r), x.shape[0], ctx.chunk_rows)  # post-RoPE, [T, H, D]
    o = attention(layer, q, k, v)  # [rows, H_q, D]; the hooks decide the rows while preparing it
    del q, k, v  # what a hook keeps of them it holds itself
    rows = hooks.rows(layer) if hooks is not None else None
    x_rows = x if rows is None else x[rows]
    a = out_proj(o.reshape(o.shape[0], o.shape[1] * o.shape[2]))
    del o
    x1 = x_rows + a
    if hooks is not None:
        hooks.on_attention_residual(layer, x_rows, x1)
    (m,) = _in_chunks(lambda r: (mlp(norm2(x1[r])),), x1.shape[0], ctx.chunk_rows)
    if hooks is None:
        return x1.add_(m)
    return hooks.merge(layer, x, rows, x1, a, m)


def _in_chunks(fn: Callable[[slice], tuple[torch.Tensor, ...]], n: int, chunk: int | None) -> tuple[torch.Tensor, ...]:
    """``fn(rows)`` for all n rows, ``chunk`` rows at a time into full-length outputs (``fn`` is row-wise,
    so the values are those of one call, up to matmul blocking)."""
    if chunk is None or n <= chunk:
        return fn(slice(0, n))
    first = fn(slice(0, chunk))
    out = tuple(t.new_empty((n, *t.shape[1:])) for t in first)
    for o, t in zip(out, first):
        o[:chunk] = t
    del first
    for a in range(chunk, n, chunk):
        for o, t in zip(out, fn(slice(a, a + chunk))):
            o[a : a + chunk] = t
    return out
