"""Parity with the official refresh code on the branches where the engine once deviated (issue 14):
engine tokens == the reference decoders (tests/reference_refresh.py, transcribed from the official code),
float64, tiny random LLaDA checkpoints."""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.models.random_checkpoint import llada_config, write_checkpoint
from maskkv_engine.refresh.base import StepPlan
from maskkv_engine.refresh.dllm_cache import DLLMCache, DLLMCacheState
from maskkv_engine.refresh.elastic import ElasticCache, ElasticState
from maskkv_engine.sampling.sliding_window import denoise_state_for
from tests.conftest import prompt_ids
from tests.naive_llada import NaiveLLaDA
from tests.reference_refresh import dllm_cache_generate, elastic_generate

PROMPT = {"prompt_token_ids": prompt_ids(40, seed=40)}


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


# ---- Elastic-Cache ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_llada_dir(llada_gqa_dir, tmp_path_factory):
    """The GQA LLaDA with EOS made likely: its output row is the model's most predicted token's row plus
    a little of its own, so EOS is committed often and at several places of one response."""
    path = tmp_path_factory.mktemp("eos_llada")
    cfg = llada_config(d_model=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=256)
    write_checkpoint(path, cfg, seed=2)
    base = NaiveLLaDA(llada_gqa_dir)
    counts = collections.Counter()
    for seed in range(4):
        ids = prompt_ids(16, seed=seed) + [cfg["mask_token_id"]] * 24
        counts.update(base.forward(ids)[0].argmax(-1).tolist())
    favourite = counts.most_common(1)[0][0]
    weights = load_file(str(path / "model.safetensors"))
    head = weights["model.transformer.ff_out.weight"]
    head[cfg["eos_token_id"]] = head[favourite] + 0.3 * head[cfg["eos_token_id"]]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _elastic(path, cfg):
    return LLM(str(path), kv_policy="full", refresh="elastic", refresh_config=cfg, dtype="float64")


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_elastic_early_stop_cuts_the_region_once(eos_llada_dir, stop_at_eos):
    """The official code cuts the decoding region once, at the first step that commits an EOS, to the
    masks before it; an EOS committed later further left does not cut again. On this case cutting at the
    current canvas's first EOS every step stopped after 9 steps instead of 12."""
    naive = NaiveLLaDA(eos_llada_dir)
    llm = _elastic(eos_llada_dir, {"window": 8})
    eng = llm.llm_engine
    mask, stops = eng.model_config.mask_token_id, list(eng.stop_token_ids)
    prompt = prompt_ids(16, seed=2)
    expected, steps = elastic_generate(naive, prompt, 24, mask, stops, window=8, return_steps=True)
    # the case: decoding went on to the right of an EOS that was not the first one committed
    text = "".join("E" if t in stops else ("M" if t == mask else ".") for t in expected)
    assert "E." in text.rstrip("M")
    out = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(gen_length=24, stop_at_eos=stop_at_eos), use_tqdm=False
    )
    got = out[0].outputs[0].token_ids
    if stop_at_eos:
        first = min(i for i, t in enumerate(expected) if t in stops)
        assert got == expected[:first]
    else:
        assert got == [t for t in expected if t != mask]
        assert out[0].metrics.num_steps == steps


@pytest.mark.parametrize("seed", [12, 3])
def test_elastic_without_block_caching_tracks_from_every_queried_mask(llada_gqa_dir, seed):
    """block_caching=False queries every mask of the region; the most attended token is picked from the
    attention of all of them (official: `att_weight[:, :, query_masked_position]`), not the window's."""
    naive = NaiveLLaDA(llada_gqa_dir)
    cfg = {"window": 16, "gamma": 0.5, "block_caching": False}
    llm = _elastic(llada_gqa_dir, cfg)
    eng = llm.llm_engine
    mask = eng.model_config.mask_token_id
    prompt = prompt_ids(seed, seed=seed)
    expected = elastic_generate(naive, prompt, 64, mask, list(eng.stop_token_ids), gamma=0.5, block_caching=False)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(gen_length=64, stop_at_eos=False), use_tqdm=False)
    assert out[0].outputs[0].token_ids == [t for t in expected if t != mask]


@pytest.mark.parametrize("track_num", [1, 3])
def test_elastic_tracks_nothing_before_a_response_token_is_committed(llada_gqa_dir, track_num):
    """The first pass has no committed response token to track (the official code would track prompt
    tokens, which are frozen here): step 1 has no drift test, so even gamma > 1 refreshes nothing there;
    every later step refreshes layers 1..L-1."""
    llm = _elastic(llada_gqa_dir, {"gamma": 2.0, "window": 16, "track_num": track_num})
    out = llm.generate(PROMPT, SamplingParams(gen_length=16, stop_at_eos=False), use_tqdm=False)[0]
    layers, steps = llm.llm_engine.model_config.num_layers, out.metrics.num_steps
    assert out.metrics.recompute_fraction == pytest.approx((layers + (steps - 2) * (layers - 1)) / (steps * layers))


def test_elastic_tracks_only_committed_tokens_when_fewer_than_track_num():
    """track_num=3 with one committed response token: only that token is tracked, never a mask."""

    class Req:
        n_cached, num_tokens, prompt_len, kv_ready, uses_cache = 0, 6, 0, True, False
        logits_shift, request_id, mask_id = False, "r", 99
        tokens = torch.tensor([99, 99, 7, 99, 99, 99])

    state = ElasticState(Req(), ElasticCache(track_num=3), num_layers=1)
    state.plan = StepPlan(0, 6, full_pass=True, capture=True)
    state.mask_rows = state.window_rows = torch.tensor([0, 1, 3])
    state.region_positions = torch.tensor([0, 1, 3, 4, 5])
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(6, 2, 4, generator=g, dtype=torch.float64),
        torch.randn(6, 2, 4, generator=g, dtype=torch.float64),
    )
    state._track(0, q, k, full=True)
    assert state.track[0].tolist() == [2]
    state.region_positions = torch.tensor([0, 1, 3])  # 4 and 5 cut off by an early stop: trackable
    state._track(0, q, k, full=True)
    assert sorted(state.track[0].tolist()) == [2, 4, 5]


def test_elastic_early_stop_cuts_at_the_model_eos_unless_asked_for_every_stop_token():
    """Official: the cut is at `eos_id` only; a chat end-of-turn token the engine also stops on does not cut
    unless stop_tokens='all'."""

    class Req:
        params, prompt_len, logits_shift, num_layers = SamplingParams(gen_length=6), 2, False, 1
        stop_token_ids, eos_token_ids = (5, 6), (5,)

    tokens = torch.tensor([1, 2, 99, 6, 99, 99, 5, 99])  # end-of-turn (6) at 1, EOS (5) at 4
    for stop_tokens, region in (("eos", [2, 4, 5]), ("all", [2])):
        req = Req()
        spec = ElasticCache(stop_tokens=stop_tokens).decoding_region(req)
        state = denoise_state_for(req.params, req.prompt_len, req.logits_shift, spec)
        assert state.region(tokens, 99).tolist() == region
    with pytest.raises(ValueError, match="stop_tokens='eot' must be 'eos' or 'all'"):
        ElasticCache(stop_tokens="eot")
