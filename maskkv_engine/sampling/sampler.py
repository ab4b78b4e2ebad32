"""Commits tokens at masked positions from a step's logits: the remasking rule of each request.

One request at a time, on that request's own generator: a request's random draws, and so its tokens,
never depend on which other requests share the batch.
"""

from __future__ import annotations

import torch

from maskkv_engine.request import Request
from maskkv_engine.sampling.logprobs import record_logprobs
from maskkv_engine.sampling.remasking import dream_choose, llada_choose
from maskkv_engine.sampling.schedule import dream_transfer_probability
from maskkv_engine.sampling.selection import select_factor, select_sampled, select_threshold, select_top_k


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
        """positions [C] (absolute, masked), logits [C, V] for them. Writes the committed tokens into the
        request's canvas, advances its schedule, and returns the committed positions."""
        scores = logits  # what the model gave: logprobs report these, not the restricted ones
        logits = self.allowed(logits)
        p = request.params
        state = request.state
        gen = request.generator
        if request.logits_shift:  # Dream
            if p.remasking == "origin":
                prob = dream_transfer_probability(state.dream_step, p.steps, p.eps)
                reveal = torch.rand(positions.shape, generator=gen, device=logits.device) < prob.to(logits.device)
                chosen = reveal.nonzero().squeeze(-1)
                if chosen.numel():
                    x0, _ = dream_choose(logits[chosen], "origin", p.temperature, p.top_p, p.top_k, gen)
                else:
                    x0 = chosen
                return self._write(request, positions, chosen, x0, all_tokens=False, logits=scores)
            x0, confidence = dream_choose(logits, p.remasking, p.temperature, p.top_p, p.top_k, gen)
            if p.parallel_decoding:
                chosen = self._parallel(confidence, p)
            else:
                k = state.num_to_commit(int(positions.numel()))
                if p.alg_temp:
                    chosen = select_sampled(confidence, k, p.alg_temp, gen)
                else:
                    chosen = select_top_k(confidence, k)
        else:  # LLaDA
            x0, confidence = llada_choose(logits, p.temperature, p.remasking, gen)
            if p.parallel_decoding:
                chosen = self._parallel(confidence, p)
            else:
                chosen = select_top_k(confidence, state.num_to_commit(int(positions.numel())))
        return self._write(request, positions, chosen, x0, all_tokens=True, logits=scores)

    @staticmethod
    def _parallel(confidence: torch.Tensor, p) -> torch.Tensor:
        if p.threshold is not None:
            return select_threshold(confidence, p.threshold)
        return select_factor(confidence, p.factor)

    @staticmethod
    def _write(request: Request, positions, chosen, x0, all_tokens: bool, logits: torch.Tensor) -> torch.Tensor:
        chosen = chosen.cpu()
        committed = positions.cpu()[chosen]
        tokens = (x0.cpu()[chosen] if all_tokens else x0.cpu()).to(torch.long)
        if request.params.logprobs is not None:  # SamplingParams.logprobs: scores at the commit step
            record_logprobs(request, committed, tokens, logits[chosen.to(logits.device)])
        request.tokens[committed] = tokens
        request.state.advance(request.tokens, request.mask_id)
        return committed
