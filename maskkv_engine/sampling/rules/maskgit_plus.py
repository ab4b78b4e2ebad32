"""Dream's maskgit_plus: the confidence of a position is the probability of its chosen token. (Dream's sample_tokens, with temperature, top_p and top_k.)"""

from __future__ import annotations

from maskkv_engine.sampling.remasking import dream_choose
from maskkv_engine.sampling.rules.base import DREAM, DecodingRule


class MaskGITPlus(DecodingRule):
    name = "maskgit_plus"
    families = (DREAM,)

    def choose(self, logits, params, dream, generator):
        return dream_choose(logits, "maskgit_plus", params.temperature, params.top_p, params.top_k, generator)
