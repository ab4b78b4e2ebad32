"""LLaDA's reference decoder (``generate`` of the LLaDA repository), greedy, for a batch of prompts.

Block semi-autoregressive: `gen_length` split into blocks of `block_length`; each block's masks are
unmasked over its share of `steps` (the extra tokens go to the first steps); each step commits the
masked positions of the current block with the highest softmax probability of their argmax token
(low-confidence remasking). No cache: every step runs the full sequence, as the reference does.
"""

from __future__ import annotations

import torch


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps]: how many tokens each step commits (the remainder goes to the first steps)."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    out = base.expand(-1, steps).clone()
    for i in range(out.shape[0]):
        out[i, : remainder[i]] += 1
    return out


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    mask_id: int,
    gen_length: int,
    steps: int | None = None,
    block_length: int | None = None,
) -> torch.Tensor:
    """prompt [B, L] (equal lengths) -> generated tokens [B, gen_length], greedy low-confidence."""
    steps = gen_length if steps is None else steps
    block_length = gen_length if block_length is None else block_length
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError("gen_length must be a multiple of block_length, and steps of the block count")
    b, n = prompt.shape
    x = torch.full((b, n + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :n] = prompt
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for blk in range(num_blocks):
        start, end = n + blk * block_length, n + (blk + 1) * block_length
        transfer = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block).tolist()
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(x)
            x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits.double(), dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = x0_p.masked_fill(~mask_index, -float("inf"))
            for j in range(b):
                k = transfer[j][i]
                if k:
                    idx = torch.topk(confidence[j], k).indices
                    x[j, idx] = x0[j, idx]
    return x[:, n:]
