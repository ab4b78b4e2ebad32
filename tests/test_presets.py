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


def test_cli_flags_pass_the_preset_and_the_chunk_size():
    """``maskkv serve --preset paper``: the preset's engine options under the flags given."""
    from maskkv_engine.entrypoints.cli import build_parser
    from maskkv_engine.entrypoints.openai.cli_args import engine_kwargs_from_args

    args = build_parser().parse_args(["serve", "--preset", "paper", "--kv-budget", "64", "--prefill-chunk-size", "128"])
    kw = engine_kwargs_from_args(args)
    assert kw["kv_policy"] == "maskkv" and kw["kv_budget"] == 64 and kw["prefill_chunk_size"] == 128
    assert kw["refresh"] == "dllm_cache" and kw["refresh_config"] == {"K_p": 50, "K_r": 5, "rho": 0.25}
    kw = engine_kwargs_from_args(build_parser().parse_args(["serve", "--kv-policy", "full"]))
    assert kw["kv_policy"] == "full" and "refresh" not in kw and "prefill_chunk_size" not in kw
    assert engine_kwargs_from_args(build_parser().parse_args(["serve"]))["kv_policy"] == "maskkv"


def test_cli_generate_with_the_paper_preset(capsys):
    """``maskkv generate --preset paper``: budget 256 per head and the preset's blocks of 8 under the flags."""
    import json
    from pathlib import Path

    from maskkv_engine.entrypoints.cli import main

    example = Path(__file__).parents[1] / "examples" / "needle_1k.txt"
    argv = ["generate", "--chat", "--prompt-file", str(example), "--preset", "paper", "--prefill-chunk-size", "256"]
    assert main([*argv, "--gen-length", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    llm = LLM(preset="paper")
    cfg = llm.llm_engine.model_config
    assert out["kv_tokens_kept"] == 256 * cfg.num_layers * cfg.num_kv_heads and out["text"] == "61"
    assert main([*argv, "--gen-length", "12", "--json"]) == 2  # the preset's block_length 8 does not divide 12
    assert "block_length=8" in capsys.readouterr().err
    assert main([*argv, "--gen-length", "12", "--block-length", "4", "--json"]) == 0  # the flag wins
