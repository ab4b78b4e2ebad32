"""LLaDA's classifier-free guidance, in one place: the unconditional branch and how it mixes with the
conditional logits (LLaDA's generate.py: ``un_logits + (cfg_scale + 1) * (logits - un_logits)``)."""

from __future__ import annotations

import torch


def unconditional_tokens(tokens: torch.Tensor, prompt_len: int, mask_id: int) -> torch.Tensor:
    """The sequence of the unconditional branch: the prompt masked out, the canvas as it is."""
    uncond = tokens.clone()
    uncond[:prompt_len] = mask_id
    return uncond


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    return uncond + (cfg_scale + 1) * (cond - uncond)


def num_branches(cfg_scale: float) -> int:
    """Sequences a request computes per step: two with guidance."""
    return 2 if cfg_scale > 0 else 1
