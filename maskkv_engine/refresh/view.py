"""What a refresh strategy sees of its request: a read-only view of its rows, schedule and kept prompt KV.

A strategy decides which rows a step recomputes; it never changes the request, its decoding state or the
page pool. The engine builds the view with a reader of the request's kept prompt KV (the block manager's,
read only), so refresh/ imports nothing from engine/ and holds no reference to the pool itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from maskkv_engine.models.config import logit_rows

if TYPE_CHECKING:
    from maskkv_engine.request import Request
    from maskkv_engine.sampling_params import SamplingParams

# (request id, layer) -> (K [H_kv, P, D], V, kept lengths [H_kv], positions [H_kv, P]) or None if none kept
PromptKVReader = Callable[[str, int], "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None"]


class RequestView:
    __slots__ = ("_req", "_read_prompt_kv")

    def __init__(self, request: Request, read_prompt_kv: PromptKVReader | None = None):
        self._req = request
        self._read_prompt_kv = read_prompt_kv

    # ---- the request's shape and status -----------------------------------------------------------
    @property
    def request_id(self) -> str:
        return self._req.request_id

    @property
    def params(self) -> SamplingParams:
        return self._req.params

    @property
    def tokens(self) -> torch.Tensor:
        """The canvas (prompt + response); read it, never write it."""
        return self._req.tokens

    @property
    def prompt_len(self) -> int:
        return self._req.prompt_len

    @property
    def n_cached(self) -> int:
        return self._req.n_cached

    @property
    def num_tokens(self) -> int:
        return self._req.num_tokens

    @property
    def num_layers(self) -> int:
        return self._req.num_layers

    @property
    def mask_id(self) -> int:
        return self._req.mask_id

    @property
    def logits_shift(self) -> bool:
        return self._req.logits_shift

    @property
    def uses_cache(self) -> bool:
        return self._req.uses_cache

    @property
    def kv_ready(self) -> bool:
        return self._req.kv_ready

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self._req.stop_token_ids

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._req.eos_token_ids

    # ---- its decoding schedule ---------------------------------------------------------------------
    @property
    def block(self) -> int:
        return self._req.state.block

    @property
    def block_range(self) -> tuple[int, int]:
        return self._req.state.block_range

    def logit_rows(self, positions):
        """Rows whose hidden state predicts ``positions`` (Dream's logits are shifted by one)."""
        return logit_rows(positions, self._req.logits_shift)

    def candidates(self) -> torch.Tensor:
        """Masked positions the coming step may commit (absolute, ascending)."""
        return self._req.state.candidates(self._req.tokens, self._req.mask_id)

    def region(self) -> torch.Tensor:
        """The masks still to decode (absolute): a sliding window's region, else every mask of the response."""
        region = getattr(self._req.state, "region", None)
        if region is not None:
            return region(self._req.tokens, self._req.mask_id)
        return (self._req.response == self._req.mask_id).nonzero().squeeze(-1) + self._req.prompt_len

    # ---- its kept prompt KV ------------------------------------------------------------------------
    def prompt_kv(self, layer: int):
        """The kept prompt tokens of ``layer`` (K, V, lengths, positions per KV head), or None."""
        if self._read_prompt_kv is None or not self._req.uses_cache:
            return None
        return self._read_prompt_kv(self._req.request_id, layer)
