"""Dream's entropy: the confidence of a position is the negative entropy of its distribution. (Dream's sample_tokens, with temperature, top_p and top_k.)"""

from __future__ import annotations

from maskkv_engine.sampling.remasking import dream_choose
from maskkv_engine.sampling.rules.base import DREAM, DecodingRule


class Entropy(DecodingRule):
    name = "entropy"
    families = (DREAM,)

    def choose(self, logits, params, dream, generator):
        return dream_choose(logits, "entropy", params.temperature, params.top_p, params.top_k, generator)
