"""Elastic-Cache's decoding region: a sliding window of the leftmost masks instead of LLaDA's blocks.

A refresh strategy asks for it by name (``RefreshStrategy.decoding_region``); the engine builds it with
``denoise_state_for`` so that refresh/ never reaches into sampling/.
"""

from __future__ import annotations

import torch

from maskkv_engine.sampling.denoise_state import DenoiseState
from maskkv_engine.sampling_params import SamplingParams


class SlidingWindowState(DenoiseState):
    """Elastic's decoding region and window. The region is every mask of the response until the first
    step that commits a stop token; from then on, only the masks before the leftmost stop token that
    step committed (the official code cuts once: a stop token committed later, even further left, does
    not cut again). The window is the region's leftmost ``window`` masks. One token per step unless a
    threshold / factor rule is set; steps and blocks do not apply."""

    def __init__(self, params, prompt_len: int, dream: bool, window: int, early_stop: bool, stop_ids: tuple[int, ...]):
        super().__init__(params, prompt_len, dream)
        self.window = window
        self.early_stop = early_stop
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)
        self.cut: int | None = None  # response index of the stop token that ended the region

    def _settle(self, tokens) -> None:
        """Fix the cut the first time the canvas holds a stop token. Tokens only enter the canvas through
        a step's commits, so at that moment its leftmost stop token is the leftmost one the step committed."""
        if self.cut is None and self.early_stop and self.stop_ids.numel():
            stops = torch.isin(tokens[self.prompt_len :], self.stop_ids).nonzero()
            if stops.numel():
                self.cut = int(stops[0])

    def region(self, tokens, mask_id) -> torch.Tensor:
        """The decoding region's masks (absolute positions, ascending)."""
        self._settle(tokens)
        masks = (tokens[self.prompt_len :] == mask_id).nonzero().squeeze(-1)
        if self.cut is not None:
            masks = masks[masks < self.cut]
        return masks + self.prompt_len

    def candidates(self, tokens, mask_id):
        return self.region(tokens, mask_id)[: self.window]

    def num_to_commit(self, num_candidates: int) -> int:
        return 1

    def finished(self, tokens, mask_id) -> bool:
        return self.candidates(tokens, mask_id).numel() == 0

    def skip_empty_steps(self, tokens, mask_id) -> None:
        return

    def advance(self, tokens, mask_id) -> None:
        self._settle(tokens)


def denoise_state_for(params: SamplingParams, prompt_len: int, dream: bool, region: dict | None) -> DenoiseState:
    """The decoding state of a request: its rule's block schedule, or the region its refresh strategy asks for."""
    if region is None:
        return DenoiseState(params, prompt_len, dream)
    kind = region.get("region")
    if kind != "sliding_window":
        raise ValueError(f"decoding region {kind!r} is not known (allowed: 'sliding_window')")
    return SlidingWindowState(
        params, prompt_len, dream, region["window"], region["early_stop"], tuple(region["stop_ids"])
    )
