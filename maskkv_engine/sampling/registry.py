"""Decoding rules by name (``SamplingParams.remasking``): the built-ins, plus third-party ones from the
``maskkv_engine.decoding_rules`` entry points or ``register_rule``."""

from __future__ import annotations

from maskkv_engine.config import registered_class
from maskkv_engine.sampling.rules.base import DecodingRule
from maskkv_engine.sampling.rules.entropy import Entropy
from maskkv_engine.sampling.rules.low_confidence import LowConfidence
from maskkv_engine.sampling.rules.maskgit_plus import MaskGITPlus
from maskkv_engine.sampling.rules.origin import Origin
from maskkv_engine.sampling.rules.random_remasking import RandomRemasking
from maskkv_engine.sampling.rules.topk_margin import TopKMargin

ENTRY_POINT_GROUP = "maskkv_engine.decoding_rules"

RULES: dict[str, type[DecodingRule]] = {
    rule.name: rule for rule in (LowConfidence, RandomRemasking, Origin, MaskGITPlus, TopKMargin, Entropy)
}


def get_rule(name: str) -> DecodingRule:
    return registered_class(RULES, ENTRY_POINT_GROUP, DecodingRule, name, "SamplingParams.remasking")()


def rule_names(family: str) -> list[str]:
    """The rules defined for a model family ('llada' or 'dream')."""
    return sorted(n for n, cls in RULES.items() if family in cls.families)


def register_rule(cls: type[DecodingRule]) -> None:
    """Register a decoding rule in-process under ``cls.name`` (the entry point group does the same)."""
    RULES[cls.name] = cls
