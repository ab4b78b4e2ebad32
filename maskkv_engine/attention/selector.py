"""Picks the attention backend: triton on CUDA, torch on the CPU; ``attention_backend=`` overrides."""

from __future__ import annotations

import torch

from maskkv_engine.attention.backend import AttentionBackend
from maskkv_engine.attention.torch_ref import TorchAttentionBackend

BACKENDS = ("torch", "triton", "xformers")


def get_attention_backend(name: str | None, device: torch.device) -> AttentionBackend:
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from maskkv_engine.attention.triton_paged import TritonAttentionBackend

        return TritonAttentionBackend(device)
    if name == "xformers":
        from maskkv_engine.attention.xformers_paged import XFormersAttentionBackend

        return XFormersAttentionBackend(device)
    raise ValueError(f"attention_backend={name!r} is not known (allowed: {BACKENDS} or None for automatic)")
