"""LLaDA's low-confidence remasking (generate.py): Gumbel-max sampling in float64 (argmax when greedy); the
confidence of a position is the float64 softmax probability of its chosen token. For Dream the same name is
an alias of maskgit_plus, as Dream's generation code treats it."""

from __future__ import annotations

from maskkv_engine.sampling.remasking import dream_choose, llada_choose
from maskkv_engine.sampling.rules.base import DREAM, LLADA, DecodingRule


class LowConfidence(DecodingRule):
    name = "low_confidence"
    families = (LLADA, DREAM)

    def choose(self, logits, params, dream, generator):
        if dream:
            return dream_choose(logits, "maskgit_plus", params.temperature, params.top_p, params.top_k, generator)
        return llada_choose(logits, params.temperature, "low_confidence", generator)
