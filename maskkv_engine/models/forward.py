"""Run a model outside the engine: one full bidirectional pass over whole sequences.

For tests, calibration and other integrations that want per-position logits of a model loaded
by this package, without a scheduler or KV pages.
"""

from __future__ import annotations

import torch
from torch import nn

from maskkv_engine.attention.backend import AttentionBackend
from maskkv_engine.attention.metadata import AttentionMetadata, ForwardContext, set_forward_context
from maskkv_engine.attention.torch_ref import TorchAttentionBackend


@torch.no_grad()
def full_forward_logits(
    model: nn.Module,
    sequences: list[list[int]] | list[torch.Tensor],
    backend: AttentionBackend | None = None,
    hooks=None,
    chunk_rows: int | None = None,
) -> list[torch.Tensor]:
    """Per-position logits [len, vocab] of each sequence, all sequences packed into one pass.

    Logits are in the model's own convention: for Dream (``logits_shift``), row i predicts token i+1.
    ``chunk_rows``: attention and MLP over that many query rows at a time (the engine's ``prefill_chunk_size``).
    """
    device = next(model.parameters()).device
    ids = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    lens = [int(t.numel()) for t in ids]
    input_ids = torch.cat(ids).to(device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    meta = AttentionMetadata.build(lens, device)
    ctx = ForwardContext(attn=meta, backend=backend or TorchAttentionBackend(), hooks=hooks, chunk_rows=chunk_rows)
    with set_forward_context(ctx):
        hidden = model(input_ids, positions)
    logits = model.compute_logits(hidden)
    return list(torch.split(logits, lens))
