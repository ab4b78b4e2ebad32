"""Parity with the official refresh code on the branches where the engine once deviated (issue 14):
engine tokens == the reference decoders (tests/reference_refresh.py, transcribed from the official code),
float64, tiny random LLaDA checkpoints."""

from __future__ import annotations

import pytest
import torch

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.models.random_checkpoint import llada_config, write_checkpoint
from maskkv_engine.refresh.dllm_cache import DLLMCache, DLLMCacheState
from tests.conftest import prompt_ids
from tests.naive_llada import NaiveLLaDA
from tests.reference_refresh import dllm_cache_generate


@pytest.fixture(scope="module")
def llada4_dir(tmp_path_factory):
    """Four layers: a stale prompt row at layer 1 reaches the response through the prompt K/V of layer 2+."""
    path = tmp_path_factory.mktemp("llada4")
    write_checkpoint(path, llada_config(d_model=64, n_layers=4, n_heads=4, vocab_size=256), seed=5)
    return path


def test_dllm_cache_rho_zero_keeps_the_cached_response_v(llada4_dir):
    """rho = 0: no V-verify, so the response V is never replaced between response refreshes, and the
    prompt rows of a prompt-only refresh (forward 6: (6-1) % 5 == 0, (6-1) % 3 != 0) attend to the V
    cached at the last response refresh (official: `transfer = 0 < transfer_ratio <= 1`)."""
    naive = NaiveLLaDA(llada4_dir)
    mask = naive.cfg["mask_token_id"]
    prompt = prompt_ids(32, seed=4)
    cfg = {"K_p": 5, "K_r": 3, "rho": 0.0}
    expected = dllm_cache_generate(naive, prompt, 32, 32, 8, mask, **cfg)
    llm = LLM(str(llada4_dir), kv_policy="full", refresh="dllm_cache", refresh_config=cfg, dtype="float64")
    sp = SamplingParams(gen_length=32, steps=32, block_length=8, stop_at_eos=False)
    assert llm.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("rho", [0.25, 1.0])
def test_dllm_cache_v_verify_matches_the_official_hook(llada4_dir, rho):
    naive = NaiveLLaDA(llada4_dir)
    mask = naive.cfg["mask_token_id"]
    cfg = {"K_p": 5, "K_r": 3, "rho": rho}
    llm = LLM(str(llada4_dir), kv_policy="full", refresh="dllm_cache", refresh_config=cfg, dtype="float64")
    sp = SamplingParams(gen_length=32, steps=32, block_length=8, stop_at_eos=False)
    for seed in (4, 7):
        prompt = prompt_ids(32, seed=seed)
        expected = dllm_cache_generate(naive, prompt, 32, 32, 8, mask, **cfg)
        assert llm.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_v_verify_cosine_keeps_float64():
    """Similarities 1 - 5e-13 and 1 - 2e-12 are both 1.0 in float32: the choice must be made in float64."""

    class Req:
        n_cached, num_tokens, kv_ready = 0, 4, True

    from maskkv_engine.refresh.base import StepPlan

    state = DLLMCacheState(Req(), DLLMCache(K_p=100, K_r=100, rho=0.25))
    state.plan = StepPlan(0, 4, use_pages=True)
    state.refresh_response = False
    v_old = torch.zeros(4, 1, 2, dtype=torch.float64)
    v_old[:, 0, 0] = 1.0
    v_new = v_old.clone()
    v_new[1, 0, 1] = 1e-6  # cosine 1 - 5e-13
    v_new[3, 0, 1] = 2e-6  # cosine 1 - 2e-12: the least similar
    state.k[1], state.v[1] = torch.zeros(4, 1, 2, dtype=torch.float64), v_old
    q = torch.zeros(4, 1, 2, dtype=torch.float64)
    state.prepare(1, q, torch.ones(4, 1, 2, dtype=torch.float64), v_new)
    assert state.rows(1).tolist() == [3]
