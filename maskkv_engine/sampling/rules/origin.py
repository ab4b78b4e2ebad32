"""Dream's origin: each masked position is revealed with probability 1 - s/t of the step (all at the last
step), its token sampled then. It has no confidence, so no threshold / factor rule applies."""

from __future__ import annotations

import torch

from maskkv_engine.sampling.remasking import dream_choose
from maskkv_engine.sampling.rules.base import DREAM, DecodingRule
from maskkv_engine.sampling.schedule import dream_transfer_probability


class Origin(DecodingRule):
    name = "origin"
    families = (DREAM,)
    has_confidence = False

    def commit(self, logits, params, state, dream, generator):
        prob = dream_transfer_probability(state.dream_step, params.steps, params.eps)
        reveal = torch.rand(logits.shape[:1], generator=generator, device=logits.device) < prob.to(logits.device)
        chosen = reveal.nonzero().squeeze(-1)
        if not chosen.numel():
            return chosen, chosen
        x0, _ = dream_choose(logits[chosen], "origin", params.temperature, params.top_p, params.top_k, generator)
        return chosen, x0
