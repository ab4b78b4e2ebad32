"""The decoding-rule contract: token choice and confidence at masked positions, then which of them commit.

A rule is named by ``SamplingParams.remasking`` and found in the registry (built-ins plus the entry-point
group ``maskkv_engine.decoding_rules``). It sees only one request's logits, its SamplingParams, its place in
the schedule (the decoding state) and its own random generator, so its draws never depend on the batch.

``choose`` gives a token and a confidence per candidate; ``select`` picks the candidates that commit: the
schedule's count by confidence (LLaDA / Dream), or Fast-dLLM's parallel rules when ``threshold`` /
``factor`` are set (selection.py). A rule with no confidence (Dream's ``origin``) overrides ``commit``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from maskkv_engine.sampling.selection import rank_factor, rank_threshold, select_sampled, select_top_k
from maskkv_engine.sampling_params import SamplingParams

LLADA, DREAM = "llada", "dream"


class DecodingRule:
    name: ClassVar[str] = "base"
    families: ClassVar[tuple[str, ...]] = (LLADA, DREAM)  # the model families the rule was defined for
    has_confidence: ClassVar[bool] = True  # False: threshold / factor cannot apply

    def validate(self, params: SamplingParams, dream: bool) -> None:
        """Refuse, with the field named, what this rule cannot do for this model family."""
        from maskkv_engine.sampling.registry import get_rule, rule_names  # the registry imports the rules

        family = DREAM if dream else LLADA
        if family not in self.families:
            raise ValueError(
                f"SamplingParams.remasking={self.name!r} is not a {'Dream' if dream else 'LLaDA'} rule "
                f"(allowed: {rule_names(family)})"
            )
        if params.parallel_decoding and not self.has_confidence:
            raise ValueError(
                f"SamplingParams.remasking={self.name!r} has no confidence: threshold / factor need a rule that "
                f"has one (allowed: {[n for n in rule_names(family) if get_rule(n).has_confidence]})"
            )

    def choose(
        self, logits: torch.Tensor, params: SamplingParams, dream: bool, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, confidence) for each candidate row of ``logits`` [C, V]."""
        raise NotImplementedError

    def rank(
        self, confidence: torch.Tensor, params: SamplingParams, state, dream: bool, generator
    ) -> tuple[torch.Tensor, int | torch.Tensor]:
        """(candidates, how many of them commit): the first ``count`` indices commit. The count of the parallel
        rules stays a 0-d device tensor, read with the batch's tokens. Dream with ``alg_temp`` draws the
        schedule's count from softmax(confidence / alg_temp) instead of taking the most confident."""
        if params.threshold is not None:
            return rank_threshold(confidence, params.threshold)
        if params.factor is not None:
            return rank_factor(confidence, params.factor)
        k = state.num_to_commit(int(confidence.numel()))
        if dream and params.alg_temp:
            chosen = select_sampled(confidence, k, params.alg_temp, generator)
        else:
            chosen = select_top_k(confidence, k)
        return chosen, int(chosen.numel())

    def select(self, confidence: torch.Tensor, params: SamplingParams, state, dream: bool, generator) -> torch.Tensor:
        """Indices of the candidates that commit this step."""
        order, count = self.rank(confidence, params, state, dream, generator)
        return order[: int(count)]

    def ranked_commit(
        self, logits: torch.Tensor, params: SamplingParams, state, dream: bool, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
        """(candidates, their tokens, how many commit), nothing read to the host. A rule that overrides
        ``commit`` or ``select`` (its count known only once chosen) gives its choice with its length."""
        cls = type(self)
        if cls.commit is not DecodingRule.commit or cls.select is not DecodingRule.select:
            chosen, tokens = self.commit(logits, params, state, dream, generator)
            return chosen, tokens, int(chosen.numel())
        x0, confidence = self.choose(logits, params, dream, generator)
        order, count = self.rank(confidence, params, state, dream, generator)
        return order, x0[order], count

    def commit(
        self, logits: torch.Tensor, params: SamplingParams, state, dream: bool, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices of the committed candidates, their tokens)."""
        x0, confidence = self.choose(logits, params, dream, generator)
        chosen = self.select(confidence, params, state, dream, generator)
        return chosen, x0[chosen]
