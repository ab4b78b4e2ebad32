"""LLaDA's random remasking (generate.py): tokens as low-confidence chooses them, but the positions that commit
are ranked by a uniform draw instead of by confidence."""

from __future__ import annotations

from maskkv_engine.sampling.remasking import llada_choose
from maskkv_engine.sampling.rules.base import LLADA, DecodingRule


class RandomRemasking(DecodingRule):
    name = "random"
    families = (LLADA,)

    def choose(self, logits, params, dream, generator):
        return llada_choose(logits, params.temperature, "random", generator)
