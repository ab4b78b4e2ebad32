"""Dream's topk_margin: the confidence of a position is its top-1 minus top-2 probability. (Dream's sample_tokens, with temperature, top_p and top_k.)"""

from __future__ import annotations

from maskkv_engine.sampling.remasking import dream_choose
from maskkv_engine.sampling.rules.base import DREAM, DecodingRule


class TopKMargin(DecodingRule):
    name = "topk_margin"
    families = (DREAM,)

    def choose(self, logits, params, dream, generator):
        return dream_choose(logits, "topk_margin", params.temperature, params.top_p, params.top_k, generator)
