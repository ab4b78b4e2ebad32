"""Level 2 (experimental): LLaDA decoded natively by vLLM's DiffusionScheduler.

What it computes is prefix-cache block decoding, not LLaDA's exact decoder: the prompt's KV is written
once at prefill from the prompt alone, each block (canvas) is denoised against that KV plus the KV of the
blocks committed before it, and a finished block's KV is written once, when it is committed. See
``reference.py`` for the same computation written plainly in torch.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURE = "LLaDADiffusionLM"


def llada_diffusion_kwargs(block_length: int, steps_per_block: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(path, **kwargs)`` that decode an ``LLaDAModelLM`` checkpoint on level 2.

    block_length: LLaDA's semi-autoregressive block, in tokens (= vLLM's diffusion canvas).
    steps_per_block: denoising steps per block (LLaDA's ``steps / (gen_length / block_length)``).
    """
    return {
        "hf_overrides": {"architectures": [ARCHITECTURE]},
        "diffusion_config": {"canvas_length": block_length, "max_denoising_steps": steps_per_block},
    }
