"""Commits tokens at masked positions from a step's logits: the remasking rule of each request.

One request at a time, on that request's own generator: a request's random draws, and so its tokens,
never depend on which other requests share the batch.
"""

from __future__ import annotations

import torch

from maskkv_engine.request import Request
from maskkv_engine.sampling.logprobs import record_logprobs
from maskkv_engine.sampling.registry import get_rule


class Sampler:
    """``num_real_tokens``: ids at or above it are padding rows of the embedding (no token of the tokenizer);
    they and the mask id can never be committed: a committed mask would leave its position masked forever
    (a request that never ends, or a dropped position), whatever the model outputs."""

    def __init__(self, mask_id: int, num_real_tokens: int):
        self.mask_id = mask_id
        self.num_real_tokens = num_real_tokens

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with the ids that may never be committed set to -inf."""
        logits = logits.clone()
        logits[:, self.num_real_tokens :] = float("-inf")
        logits[:, self.mask_id] = float("-inf")
        return logits

    def commit(self, request: Request, positions: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """positions [C] (absolute, masked), logits [C, V] for them. The request's decoding rule chooses what
        commits; this writes it into the request's canvas, advances its schedule, and returns the positions."""
        scores = logits  # what the model gave: logprobs report these, not the restricted ones
        rule = get_rule(request.params.remasking)
        chosen, tokens = rule.commit(
            self.allowed(logits), request.params, request.state, request.logits_shift, request.generator
        )
        return self._write(request, positions, chosen, tokens, scores)

    @staticmethod
    def _write(request: Request, positions, chosen, tokens, logits: torch.Tensor) -> torch.Tensor:
        chosen = chosen.cpu()
        committed = positions.cpu()[chosen]
        tokens = tokens.cpu().to(torch.long)
        if request.params.logprobs is not None:  # SamplingParams.logprobs: scores at the commit step
            record_logprobs(request, committed, tokens, logits[chosen.to(logits.device)])
        request.tokens[committed] = tokens
        request.state.advance(request.tokens, request.mask_id)
        return committed
