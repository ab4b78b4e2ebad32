"""Presets: ``LLM(preset="paper")`` is the MaskKV paper's setting, and explicit options win over it."""

from __future__ import annotations

import pytest

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.presets import engine_options, sampling_params
from tests.conftest import prompt_ids


def test_paper_preset_is_maskkv_over_dllm_cache():
    opts = engine_options("paper", {})
    assert opts["kv_policy"] == "maskkv" and opts["kv_budget"] == 256
    assert opts["refresh"] == "dllm_cache" and opts["refresh_config"] == {"K_p": 50, "K_r": 5, "rho": 0.25}
    assert sampling_params("paper").block_length == 8
    assert sampling_params("paper", gen_length=16, block_length=16).block_length == 16, "overrides win"
    with pytest.raises(ValueError, match=r"preset='papers' is not known \(allowed: \['paper'\]\)"):
        engine_options("papers", {})


def test_llm_with_the_paper_preset_matches_the_same_options_given_by_hand(calibrated_llada):
    paper = LLM(str(calibrated_llada), preset="paper", kv_budget=12)  # an explicit option wins
    cfg = paper.llm_engine.config
    assert cfg.kv_policy == "maskkv" and cfg.kv_budget == 12 and cfg.refresh == "dllm_cache"
    assert cfg.refresh_config == {"K_p": 50, "K_r": 5, "rho": 0.25}
    by_hand = LLM(
        str(calibrated_llada), kv_budget=12, refresh="dllm_cache", refresh_config={"K_p": 50, "K_r": 5, "rho": 0.25}
    )
    prompts = [{"prompt_token_ids": prompt_ids(40, seed=3)}]
    got = paper.generate(prompts, use_tqdm=False)  # the preset's SamplingParams: blocks of 8
    want = by_hand.generate(prompts, SamplingParams(block_length=8), use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert got[0].metrics.num_steps == want[0].metrics.num_steps
