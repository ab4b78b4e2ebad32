"""The KV page pool on a GPU, sized from measured memory (vLLM's profile run, for a bidirectional prefill).

A fixed share left for activations is wrong both ways: too much for a plain policy (pages wasted), too little
for refresh caches that live outside the pool. So, after the weights load, the engine runs the largest step
the scheduler can issue (one layer over every token of it, in ``prefill_chunk_size`` query chunks as a first
pass runs it: a bidirectional prefill splits by layers and query rows, not by keys) plus the logits of a full
batch of candidates, and reads the peak. The pool gets what is left of
``total * gpu_memory_utilization`` after memory outside torch (the CUDA context, other processes), the
weights, 1.1x the measured activations and the refresh caches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from maskkv_engine.attention.metadata import AttentionMetadata, ForwardContext, set_forward_context

ACTIVATION_MARGIN = 1.1  # the profile's shapes are the largest, but allocator fragmentation is not measured
CANDIDATES_PER_SEQ = 32  # logit rows a request asks for in one step (a block of 32 masks)


@dataclass(frozen=True)
class GPUMemory:
    """Bytes: the device's ``total`` and ``free`` (cudaMemGetInfo), what torch's allocator holds (reserved),
    the weights, and the profile run's peak above the weights."""

    total: int
    free: int
    torch_reserved: int
    weights: int
    activation: int

    @property
    def outside_torch(self) -> int:
        """The CUDA context and other processes: used, but not by this process's allocator."""
        return self.total - self.free - self.torch_reserved


def pool_pages(mem: GPUMemory, utilization: float, refresh_bytes: int, page_bytes: int) -> int:
    """Pages of ``page_bytes`` that fit ``utilization`` of the device; a clear error when none do."""
    needed = mem.outside_torch + mem.weights + ACTIVATION_MARGIN * mem.activation + refresh_bytes
    pages = int((mem.total * utilization - needed) // page_bytes)
    if pages < 1:
        gib = 2**30
        least = (needed + page_bytes) / mem.total
        fix = (
            f"raise it to at least {least:.3f} (allowed: (0, 1])"
            if least <= 1
            else "the model does not fit this device even at 1.0: lower max_num_batched_tokens / max_model_len"
        )
        raise ValueError(
            f"CacheConfig.gpu_memory_utilization={utilization} leaves no room for KV pages on a "
            f"{mem.total / gib:.1f} GiB device: weights {mem.weights / gib:.2f} GiB, activations "
            f"{mem.activation / gib:.2f} GiB (x{ACTIVATION_MARGIN}), refresh caches {refresh_bytes / gib:.2f} GiB, "
            f"outside torch {mem.outside_torch / gib:.2f} GiB; {fix}"
        )
    return pages


@torch.no_grad()
def profile_step(
    model: nn.Module, backend, tokens: int, logit_rows: int, kv_shape: tuple[int, int], chunk_rows: int | None
) -> None:
    """The largest step: one layer over ``tokens`` tokens as a first pass runs it, the full-layer K/V a capture
    holds, and the logits (and the sampler's float64 copy) of ``logit_rows`` candidates. Token id 0 and random
    weights give the real shapes, which are all the memory depends on."""
    device = next(model.parameters()).device
    meta = AttentionMetadata.build([tokens], device)
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    positions = torch.arange(tokens, device=device)
    with set_forward_context(ForwardContext(attn=meta, backend=backend, chunk_rows=chunk_rows)):
        hidden = model.run_layers(model.embed(ids), positions, 0, 1)
    held = hidden.new_empty(2, tokens, *kv_shape)  # a capture keeps the layer's K/V [H_kv, D] meanwhile
    logits = model.compute_logits(hidden[:logit_rows])
    logits.double().softmax(dim=-1)
    del held


def measure(model: nn.Module, run: Callable[[], None], device: torch.device) -> GPUMemory:
    """Weights, the peak of ``run()`` above them, and the device's memory as torch and CUDA report it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    activation = torch.cuda.max_memory_allocated(device) - weights
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return GPUMemory(total, free, torch.cuda.memory_reserved(device), weights, activation)
