"""A step's small host tensors (token ids, positions, layouts, page tables) moved to the device in one copy.

Each blocking copy from pageable host memory synchronizes the stream: a step that moved its ten inputs one
by one waited ten times. Packed into one int64 buffer (pinned on CUDA) they go in one ``non_blocking`` copy
that queues behind the previous step's kernels, and each input is a view of the device buffer. The same path
runs on the CPU (where ``.to`` returns the packed buffer itself), so the views are tested there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host integer tensors -> int64 tensors of the same shapes on ``device``, from one copy. A tensor already
    on another device than the CPU (a slice of an earlier step's metadata) is returned as it is."""
    host = [t for t in tensors if t.device.type == "cpu"]
    flat = [t.reshape(-1).long() for t in host]
    sizes = [f.numel() for f in flat]
    if not flat:
        return list(tensors)
    if torch.device(device).type == "cuda":  # pinned: the copy is asynchronous, queued on the stream
        packed = torch.cat(flat, out=torch.empty(sum(sizes), dtype=torch.long, pin_memory=True))
    else:
        packed = torch.cat(flat)
    moved = packed.to(device, non_blocking=True).split(sizes)
    views = iter([m.view(t.shape) for m, t in zip(moved, host)])
    return [next(views) if t.device.type == "cpu" else t for t in tensors]
