"""Refresh strategies and parallel decoding: exactness where they reduce to each other, parity with
independent implementations, the rules themselves, batch invariance, metrics and errors."""

from __future__ import annotations

import pytest
import torch

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.refresh.dllm_cache import DLLMCache
from maskkv_engine.refresh.elastic import ElasticCache
from tests.conftest import prompt_ids
from tests.naive_llada import NaiveLLaDA
from tests.reference_refresh import elastic_generate, prefix_cache_generate


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


PROMPTS = [{"prompt_token_ids": prompt_ids(n, seed=n)} for n in (12, 40)]


@pytest.fixture(scope="module")
def naive(llada_gqa_dir):
    return NaiveLLaDA(llada_gqa_dir)


@pytest.mark.parametrize("fixture", ["llada_gqa_dir", "dream_dir"])
def test_dllm_cache_reduces_to_none_and_full(request, fixture):
    path = str(request.getfixturevalue(fixture))
    sp = SamplingParams(gen_length=16, steps=8, stop_at_eos=False)
    none = tokens(LLM(path, kv_policy="none").generate(PROMPTS, sp, use_tqdm=False))
    full = tokens(LLM(path, kv_policy="full").generate(PROMPTS, sp, use_tqdm=False))
    every = LLM(path, kv_policy="full", refresh="dllm_cache", refresh_config={"K_p": 1, "K_r": 1})
    assert tokens(every.generate(PROMPTS, sp, use_tqdm=False)) == none
    frozen = LLM(path, kv_policy="full", refresh="dllm_cache", refresh_config={"K_p": 1000, "K_r": 1, "rho": 0.0})
    assert tokens(frozen.generate(PROMPTS, sp, use_tqdm=False)) == full
    assert none != full, "the test needs the cached prompt to make a difference"


def test_fast_dllm_single_block_is_prefix_caching(llada_gqa_dir, naive):
    """block_length = gen_length, fixed schedule: equals prefix caching computed independently."""
    llm = LLM(str(llada_gqa_dir), kv_policy="full", refresh="fast_dllm", dtype="float64")
    mask = llm.llm_engine.model_config.mask_token_id
    for prompt in PROMPTS:
        ids = prompt["prompt_token_ids"]
        expected = prefix_cache_generate(naive, ids, 8, 16, 16, mask)
        out = llm.generate(prompt, SamplingParams(gen_length=16, steps=8, stop_at_eos=False), use_tqdm=False)
        assert out[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("dual", [False, True])
def test_fast_dllm_blocks_match_an_independent_implementation(llada_gqa_dir, naive, dual):
    refresh = "fast_dllm_dual" if dual else "fast_dllm"
    llm = LLM(str(llada_gqa_dir), kv_policy="full", refresh=refresh, dtype="float64")
    mask = llm.llm_engine.model_config.mask_token_id
    sp = SamplingParams(gen_length=24, steps=12, block_length=8, stop_at_eos=False)
    for prompt in PROMPTS:
        expected = prefix_cache_generate(naive, prompt["prompt_token_ids"], 12, 24, 8, mask, dual=dual)
        assert llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids == expected
    # and the boundary passes are the only full passes: one per block
    out = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0]
    assert out.metrics.num_full_passes == 3 and out.metrics.num_steps == 12


@pytest.mark.parametrize(
    "cfg",
    [
        dict(window=16),
        dict(window=4, gamma=0.999),
        dict(window=4, gamma=2.0, block_caching=False),
        dict(window=4, gamma=0.5, block_caching=False, track_num=2),
        dict(window="block"),
        dict(window="block", gamma=2.0, early_stop=False),
    ],
)
def test_elastic_matches_an_independent_implementation(llada_gqa_dir, naive, cfg):
    llm = LLM(str(llada_gqa_dir), kv_policy="full", refresh="elastic", refresh_config=cfg, dtype="float64")
    eng = llm.llm_engine
    mask = eng.model_config.mask_token_id
    block = cfg["window"] == "block"
    sp = SamplingParams(gen_length=16, steps=8 if block else None, block_length=8 if block else None, stop_at_eos=False)
    for prompt in PROMPTS:
        expected = elastic_generate(
            naive, prompt["prompt_token_ids"], 16, mask, list(eng.stop_token_ids),
            gamma=cfg.get("gamma", 0.9), window=cfg["window"], block_caching=cfg.get("block_caching", True),
            early_stop=cfg.get("early_stop", True), track_num=cfg.get("track_num", 1), block_length=8, steps=8,
        )  # fmt: skip
        out = llm.generate(prompt, sp, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == [t for t in expected if t != mask]


def test_elastic_gamma_above_one_refreshes_every_layer_after_the_first(llada_gqa_dir):
    llm = LLM(str(llada_gqa_dir), kv_policy="full", refresh="elastic", refresh_config={"gamma": 2.0, "window": "block"})
    out = llm.generate(
        PROMPTS[1], SamplingParams(gen_length=16, steps=16, block_length=8, stop_at_eos=False), use_tqdm=False
    )[0]
    layers = llm.llm_engine.model_config.num_layers
    steps = out.metrics.num_steps
    # step 0 is a full pass; step 1 tracks nothing (no response token was committed when step 0 chose the
    # tracked tokens), so it has no drift test; every later step reuses layer 0 and refreshes the rest
    expected = (layers + (steps - 2) * (layers - 1)) / (steps * layers)
    assert out.metrics.recompute_fraction == pytest.approx(expected)
    never = LLM(
        str(llada_gqa_dir), kv_policy="full", refresh="elastic", refresh_config={"gamma": -2.0, "window": "block"}
    )
    out = never.generate(
        PROMPTS[1], SamplingParams(gen_length=16, steps=16, block_length=8, stop_at_eos=False), use_tqdm=False
    )[0]
    assert out.metrics.recompute_fraction == pytest.approx(1.0 / out.metrics.num_steps)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_threshold_above_one_is_the_one_token_schedule(llada_gqa_dir, policy):
    """LLaDA: a threshold above 1 commits only the top-1, i.e. the fixed schedule with steps = gen_length."""
    llm = LLM(str(llada_gqa_dir), kv_policy=policy)
    fixed = SamplingParams(gen_length=16, steps=16, block_length=8, stop_at_eos=False)
    parallel = SamplingParams(gen_length=16, block_length=8, threshold=1.5, stop_at_eos=False)
    a, b = llm.generate(PROMPTS, fixed, use_tqdm=False), llm.generate(PROMPTS, parallel, use_tqdm=False)
    assert tokens(a) == tokens(b)
    assert all(o.metrics.committed_per_step == [1] * 16 for o in b)


def test_dream_threshold_above_one_commits_one_token_per_step(dream_dir):
    # (Dream's own fixed schedule is not one token per step: its timesteps commit most tokens at the end)
    llm = LLM(str(dream_dir), kv_policy="full")
    out = llm.generate(PROMPTS, SamplingParams(gen_length=16, threshold=1.5, stop_at_eos=False), use_tqdm=False)
    assert all(o.metrics.committed_per_step == [1] * 16 for o in out)


def test_parallel_decoding_commits_several_tokens_per_step(llada_gqa_dir):
    llm = LLM(str(llada_gqa_dir), kv_policy="full")
    out = llm.generate(
        PROMPTS[1], SamplingParams(gen_length=16, block_length=8, threshold=0.05, stop_at_eos=False), use_tqdm=False
    )[0]
    assert out.metrics.num_steps < 16 and max(out.metrics.committed_per_step) > 1
    assert sum(out.metrics.committed_per_step) == 16
    out = llm.generate(
        PROMPTS[1], SamplingParams(gen_length=16, block_length=8, factor=4.0, stop_at_eos=False), use_tqdm=False
    )[0]
    assert sum(out.metrics.committed_per_step) == 16 and out.metrics.num_steps < 16


def test_v_verify_recomputes_the_least_similar_rows():
    """Hand-built V: the rows whose V changed most are the ones recomputed."""
    from maskkv_engine.refresh.base import StepPlan
    from maskkv_engine.refresh.dllm_cache import DLLMCacheState

    class Req:
        n_cached, num_tokens, kv_ready = 4, 12, True

    state = DLLMCacheState(Req(), DLLMCache(K_p=100, K_r=100, rho=0.25))
    state.plan = StepPlan(4, 12, use_pages=True)
    state.refresh_response = False
    g = torch.Generator().manual_seed(0)
    v_old = torch.randn(8, 2, 4, generator=g)
    v_new = v_old.clone()
    v_new[5] = -v_old[5]  # opposite direction: similarity -1
    v_new[2] = v_old[2] + 3.0 * torch.randn(2, 4, generator=g)  # strongly changed
    v_new[7] = v_old[7] * 2.0  # scaled: similarity 1, must not be chosen
    state.k[1], state.v[1] = torch.zeros(8, 2, 4), v_old
    k_new = torch.ones(8, 2, 4)
    k_out, v_out, _, _ = state.prepare(1, torch.zeros(8, 4, 4), k_new, v_new)
    assert state.rows(1).tolist() == [2, 5]  # floor(0.25 * 8) = 2 rows, the least similar
    assert torch.equal(v_out, v_new) and torch.equal(state.v[1], v_new)
    assert torch.equal(k_out[2], k_new[2]) and torch.equal(k_out[0], torch.zeros(2, 4))


def test_drift_test_picks_the_first_drifting_layer():
    """Attention of the tracked token is unchanged in layers 0-1 and changes in layer 2: refresh from 3."""
    from maskkv_engine.refresh.base import StepPlan
    from maskkv_engine.refresh.elastic import ElasticState

    class Req:
        n_cached, num_tokens, prompt_len, kv_ready, uses_cache = 0, 6, 0, True, False
        logits_shift, request_id, mask_id = False, "r", 99
        tokens = torch.tensor([5, 6, 7, 99, 99, 99])

        def prompt_kv(self, layer):  # no prompt cached: only the active rows are keys
            return None

    state = ElasticState(Req(), ElasticCache(gamma=0.9), num_layers=5)
    state.plan = StepPlan(0, 6, use_pages=False)
    state.query_rows = torch.tensor([0, 3])
    state.tracked = torch.tensor([0])
    state.window_rows = torch.tensor([3])
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 2, 8, generator=g)
    k = torch.randn(6, 2, 8, generator=g)
    v = torch.randn(6, 2, 8, generator=g)
    for layer in range(5):
        state.q[layer], state.k[layer], state.v[layer] = q.clone(), k.clone(), v.clone()
    for layer in range(3):
        k_now = k.clone()
        if layer == 2:
            # one head's keys move (the similarity is a cosine across heads: a change shared by every
            # head would not count as drift)
            k_now[:, 0] = -4.0 * k[:, 0]
        state.prepare(layer, q, k_now, v)
        assert state.start == (3 if layer == 2 else 5)
    assert state.rows(2).tolist() == [0, 3] and state.rows(3) is None


@pytest.mark.parametrize("policy", ["maskkv", "full"])
def test_mixed_refresh_and_thresholds_in_one_batch_are_batch_invariant(llada_gqa_dir, policy):
    llm = LLM(str(llada_gqa_dir), kv_policy=policy, kv_budget=8)
    settings = [
        dict(),
        dict(refresh="fast_dllm"),
        dict(refresh="fast_dllm_dual", threshold=0.3),
        dict(refresh="dllm_cache", refresh_config={"K_p": 5, "K_r": 3}),
        dict(refresh="elastic"),
        dict(refresh="elastic", refresh_config={"window": "block", "gamma": 0.5}, factor=2.0),
        dict(threshold=0.2),
    ]
    prompts = [{"prompt_token_ids": prompt_ids(10 + 9 * i, seed=i)} for i in range(len(settings))]
    params = [SamplingParams(gen_length=16, steps=16, block_length=8, **s) for s in settings]
    batched = tokens(llm.generate(prompts, params, use_tqdm=False))
    alone = [tokens(llm.generate(p, sp, use_tqdm=False))[0] for p, sp in zip(prompts, params)]
    assert batched == alone
    assert llm.llm_engine.block_manager.num_used_pages == 0


@pytest.mark.parametrize("fixture", ["llada_gqa_dir", "dream_dir"])
def test_refresh_sees_a_first_pass_split_by_layers(request, fixture):
    """A small step token budget splits long first passes by layers: every refresh strategy must still
    see them (it caches per-layer state during the first pass) and give the tokens of an unsplit run."""
    path = str(request.getfixturevalue(fixture))
    settings = [
        dict(refresh="fast_dllm"),
        dict(refresh="fast_dllm_dual", threshold=0.3),
        dict(refresh="dllm_cache", refresh_config={"K_p": 5, "K_r": 3}),
        dict(refresh="elastic"),
        dict(refresh="elastic", refresh_config={"window": "block", "gamma": 0.5}),
    ]
    prompts = [{"prompt_token_ids": prompt_ids(40 + 9 * i, seed=i)} for i in range(len(settings))]
    blocks = dict(block_length=8) if fixture == "llada_gqa_dir" else {}  # Dream: one block
    params = [SamplingParams(gen_length=16, steps=16, stop_at_eos=False, **blocks, **s) for s in settings]
    whole = LLM(path, kv_policy="full")
    split = LLM(path, kv_policy="full", max_num_batched_tokens=40)
    expected = tokens(whole.generate(prompts, params, use_tqdm=False))
    got = tokens(split.generate(prompts, params, use_tqdm=False))
    assert got == expected
    assert split.llm_engine.block_manager.num_used_pages == 0


def test_refresh_metrics(llada_gqa_dir):
    llm = LLM(str(llada_gqa_dir), kv_policy="full", refresh="dllm_cache", refresh_config={"K_p": 100, "K_r": 4})
    out = llm.generate(
        PROMPTS[0], SamplingParams(gen_length=16, steps=16, block_length=8, stop_at_eos=False), use_tqdm=False
    )[0]
    m = out.metrics
    layers = llm.llm_engine.model_config.num_layers
    refreshes = 4  # forwards 1, 5, 9, 13 refresh the response; the others only layer 0
    assert m.num_steps == 16
    assert m.recompute_fraction == pytest.approx((refreshes * layers + 12) / (16 * layers))
    assert m.committed_per_step == [1] * 16


def test_refresh_errors(llada_gqa_dir):
    with pytest.raises(ValueError, match="refresh='warp' is not known"):
        LLM(str(llada_gqa_dir), refresh="warp")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['K'\] for refresh='dllm_cache'"):
        LLM(str(llada_gqa_dir), refresh="dllm_cache", refresh_config={"K": 3})
    with pytest.raises(ValueError, match="K_p=0 must be an integer >= 1"):
        LLM(str(llada_gqa_dir), refresh="dllm_cache", refresh_config={"K_p": 0})
    llm = LLM(str(llada_gqa_dir), kv_policy="none")
    with pytest.raises(ValueError, match="refresh='elastic' reuses cached KV, but kv_policy='none' keeps none"):
        llm.generate(PROMPTS[0], SamplingParams(gen_length=8, refresh="elastic"), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_layer_that_recomputes_no_row_at_all(llada_gqa_dir):
    """dLLM-Cache with rho * G < 1 recomputes no response row between refreshes: attention gets no query."""
    llm = LLM(
        str(llada_gqa_dir), kv_policy="full", refresh="dllm_cache", refresh_config={"K_p": 100, "K_r": 100, "rho": 0.25}
    )
    out = llm.generate(PROMPTS[0], SamplingParams(gen_length=3, steps=3, stop_at_eos=False), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
