"""Where one request stands in its denoising schedule, and which masked positions it may commit next.

LLaDA (no logit shift): semi-autoregressive blocks; each block's masks are spread over its steps.
Dream (shifted logits): one block, ``steps`` steps on Dream's timestep schedule.
With ``threshold`` / ``factor`` (parallel decoding) a block ends when it has no mask left, whatever ``steps``.
"""

from __future__ import annotations

import torch

from maskkv_engine.sampling.schedule import dream_transfer_count, llada_transfer_counts
from maskkv_engine.sampling_params import SamplingParams


class DenoiseState:
    def __init__(self, params: SamplingParams, prompt_len: int, dream: bool):
        self.params = params
        self.prompt_len = prompt_len
        self.dream = dream
        self.block = 0
        self.step_in_block = 0  # steps taken in the current block (fixed schedule)
        self.dream_step = 0
        self.counts: list[int] | None = None  # LLaDA: tokens to commit at each step of the block

    @property
    def block_range(self) -> tuple[int, int]:
        """Absolute positions [start, end) of the current block."""
        bl = self.params.block_length
        start = self.prompt_len + self.block * bl
        return start, start + bl

    def finished(self, tokens: torch.Tensor, mask_id: int) -> bool:
        if self.block >= self.params.num_blocks:
            return True
        if self.dream and not self.params.parallel_decoding and self.dream_step >= self.params.steps:
            return True
        return not bool((tokens[self.prompt_len :] == mask_id).any())

    def candidates(self, tokens: torch.Tensor, mask_id: int) -> torch.Tensor:
        """Masked positions this step may commit, in ascending order (absolute positions)."""
        start, end = self.block_range
        return (tokens[start:end] == mask_id).nonzero().squeeze(-1) + start

    def num_to_commit(self, num_candidates: int) -> int:
        """Fixed schedules only: how many of the candidates this step commits."""
        p = self.params
        if self.dream:
            return dream_transfer_count(num_candidates, self.dream_step, p.steps, p.eps)
        if self.counts is None:
            self.counts = llada_transfer_counts(num_candidates, p.steps_per_block)
        return self.counts[self.step_in_block]

    def skip_empty_steps(self, tokens: torch.Tensor, mask_id: int) -> None:
        """Advance past fixed-schedule steps that would commit nothing: their forward pass changes nothing."""
        p = self.params
        if p.parallel_decoding or (self.dream and p.remasking == "origin"):
            return
        while not self.finished(tokens, mask_id):
            n = int(self.candidates(tokens, mask_id).numel())
            if n > 0 and self.num_to_commit(n) > 0:
                return
            self.advance(tokens, mask_id)

    def advance(self, tokens: torch.Tensor, mask_id: int) -> None:
        """Called after each step (and for each skipped step)."""
        p = self.params
        if self.dream:
            self.dream_step += 1
            if p.parallel_decoding and not bool((tokens[self.prompt_len :] == mask_id).any()):
                self.block = p.num_blocks
            return
        if p.parallel_decoding:
            if self.candidates(tokens, mask_id).numel() == 0:
                self._next_block()
            return
        self.step_in_block += 1
        if self.step_in_block >= p.steps_per_block:
            self._next_block()

    def _next_block(self) -> None:
        self.block += 1
        self.step_in_block = 0
        self.counts = None
