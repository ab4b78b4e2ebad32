"""Combinations are where bugs live: every kv_policy (with and without a profile) x refresh x decoding rule x
model family (LLaDA / Dream, GQA and not), mixed in one batch, gives each request exactly the tokens it gets
alone, and the pool is empty afterwards (pages, reservations, transient bytes).

Found by this test before it existed: an online MaskKV / SqueezeAttention first pass sharing a step with a
refresh state that recomputes only some rows crashed (IndexError) or changed its budgets; the sampler could
commit the mask id, so a request never ended or lost a position.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.combinations import MODEL_CASES, POLICIES, assert_pool_empty, build_models, make_llm, request_cases

_ENGINES: dict = {}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("combinations"))


def _engine(paths, case, policy):
    key = (case.name, policy)
    if key not in _ENGINES:
        _ENGINES[key] = make_llm(paths[case.name], policy)
    return _ENGINES[key]


@st.composite
def mixed_batches(draw):
    case = draw(st.sampled_from(MODEL_CASES))
    policy = draw(st.sampled_from(POLICIES))
    requests = draw(st.lists(request_cases(case.dream, policy), min_size=2, max_size=4))
    return case, policy, requests


HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


@settings(max_examples=40, deadline=None, suppress_health_check=HEALTH)
@given(batch=mixed_batches())
def test_mixed_batch_gives_each_request_its_tokens_alone(model_paths, batch):
    _check_batch(model_paths, batch)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=HEALTH)
@given(batch=mixed_batches())
def test_many_mixed_batches(model_paths, batch):
    _check_batch(model_paths, batch)


def _check_batch(model_paths, batch):
    case, policy, requests = batch
    llm = _engine(model_paths, case, policy)
    prompts = [{"prompt_token_ids": list(r.prompt)} for r in requests]
    params = [r.params(case.dream) for r in requests]
    together = llm.generate(prompts, params, use_tqdm=False)
    assert_pool_empty(llm)
    for prompt, sp, out in zip(prompts, params, together):
        alone = llm.generate(prompt, sp, use_tqdm=False)[0]
        assert out.error is None and alone.error is None, out.error or alone.error
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, (case.name, policy, sp)
        assert out.outputs[0].finish_reason == alone.outputs[0].finish_reason
        assert out.metrics.num_steps == alone.metrics.num_steps
        mask_id = llm.llm_engine.model_config.mask_token_id
        assert mask_id not in out.outputs[0].token_ids
        if not sp.stop_at_eos:  # every position is committed: none dropped, none left masked
            assert len(out.outputs[0].token_ids) == sp.gen_length
        assert out.metrics.num_steps <= max(sp.steps, sp.gen_length)
    assert_pool_empty(llm)
