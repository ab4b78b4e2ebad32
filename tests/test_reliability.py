"""No request can crash, change or stall another (issue 14): each defect found by a hostile user, reproduced
through the public API."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.kv.registry import BUILTIN_POLICIES, register_policy
from maskkv_engine.kv.snapkv import SnapKVPolicy
from maskkv_engine.models.random_checkpoint import llada_config, write_checkpoint
from maskkv_engine.refresh.base import RefreshState, RefreshStrategy
from maskkv_engine.refresh.registry import REFRESH_STRATEGIES, register_refresh
from tests.combinations import assert_pool_empty

POISONED_PROMPT_LEN = 13


@pytest.fixture(scope="module")
def gqa4_dir(tmp_path_factory):
    """4 layers, GQA, no calibration profile: maskkv / squeeze measure their statistics online."""
    path = tmp_path_factory.mktemp("gqa4")
    write_checkpoint(path, llada_config(d_model=64, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=256), seed=2)
    return path


MIXED = [
    {"prompt_token_ids": list(range(2, 40))},
    {"prompt_token_ids": [5, 6, 7]},
    {"prompt_token_ids": list(range(2, 30))},
]


@pytest.mark.parametrize("policy", ["maskkv", "squeeze"])
@pytest.mark.parametrize("refresh", ["elastic", "dllm_cache"])
def test_online_statistics_ignore_the_rows_other_requests_compute(gqa4_dir, policy, refresh):
    """The issue's reproduction: a first pass that shares its step with a refresh state computing only some
    rows crashed (IndexError) or, for squeeze, silently changed its budgets."""
    llm = LLM(str(gqa4_dir), kv_policy=policy, kv_budget=4, device="cpu", max_num_seqs=2, skip_tokenizer_init=True)
    params = [
        SamplingParams(gen_length=32, refresh=refresh),
        SamplingParams(gen_length=4),
        SamplingParams(gen_length=8),
    ]
    together = llm.generate(MIXED, params, use_tqdm=False)
    assert_pool_empty(llm)
    for prompt, sp, out in zip(MIXED, params, together):
        alone = llm.generate(prompt, sp, use_tqdm=False)[0]
        assert out.error is None
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.metrics.kv_tokens_kept == alone.metrics.kv_tokens_kept
    assert_pool_empty(llm)


@dataclass
class PoisonedPolicy(SnapKVPolicy):
    """A third-party policy with a bug: its scorer raises on one prompt length."""

    name = "poisoned"

    def score(self, probs, ctx):
        if ctx.n_prompt == POISONED_PROMPT_LEN:
            raise RuntimeError("scorer bug")
        return super().score(probs, ctx)


@pytest.fixture
def poisoned_policy():
    register_policy("poisoned", PoisonedPolicy)
    yield
    BUILTIN_POLICIES.pop("poisoned")


def test_a_failing_step_finishes_its_requests_with_an_error_and_the_engine_goes_on(llada_dir, poisoned_policy):
    llm = LLM(str(llada_dir), kv_policy="poisoned", kv_budget=4, device="cpu", max_num_seqs=8, num_pages=256)
    engine = llm.llm_engine
    good = SamplingParams(gen_length=8, block_length=4, seed=1)
    engine.add_request("early", {"prompt_token_ids": list(range(3, 20))}, good)
    engine.step()  # its first pass runs alone: it is cached and denoising when the poisoned pass fails
    engine.add_request("bad", {"prompt_token_ids": list(range(3, 3 + POISONED_PROMPT_LEN))}, good)
    engine.add_request("neighbour", {"prompt_token_ids": list(range(3, 25))}, good)
    outputs = {o.request_id: o for o in engine.step()}
    # the forward pass that failed held all three: each of them ends with the error, nothing is left held
    assert set(outputs) == {"early", "bad", "neighbour"}
    for out in outputs.values():
        assert out.finished and out.outputs[0].finish_reason == "error"
        assert "scorer bug" in out.error
    assert_pool_empty(llm)
    # the engine serves the next call, and gives the same tokens it gives on a fresh engine
    again = llm.generate({"prompt_token_ids": list(range(3, 25))}, good, use_tqdm=False)[0]
    fresh = LLM(str(llada_dir), kv_policy="snapkv", kv_budget=4, device="cpu", num_pages=256)
    expected = fresh.generate({"prompt_token_ids": list(range(3, 25))}, good, use_tqdm=False)[0]
    assert again.error is None and again.outputs[0].token_ids == expected.outputs[0].token_ids
    assert_pool_empty(llm)


class FailingAfterStep(RefreshState):
    def after_step(self, num_layers, committed):
        if self.request.prompt_len == POISONED_PROMPT_LEN:
            raise RuntimeError("refresh bookkeeping bug")
        super().after_step(num_layers, committed)


@dataclass
class FailingRefresh(RefreshStrategy):
    name = "failing"

    def new_state(self, request):
        return FailingAfterStep(request)


@pytest.fixture
def failing_refresh():
    register_refresh("failing", FailingRefresh)
    yield
    REFRESH_STRATEGIES.pop("failing")


def test_one_requests_failing_bookkeeping_leaves_its_neighbours_untouched(llada_dir, failing_refresh):
    """An error after the forward (commit, refresh bookkeeping) is that request's alone: the others of the
    same step keep going and get exactly their tokens alone."""
    llm = LLM(str(llada_dir), kv_policy="maskkv", kv_budget=4, device="cpu", max_num_seqs=8, num_pages=256)
    sp = SamplingParams(gen_length=8, block_length=4, seed=3, refresh="failing")
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (9, POISONED_PROMPT_LEN, 21)]
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error" and "refresh bookkeeping bug" in outs[1].error
    for i in (0, 2):
        alone = llm.generate(prompts[i], sp, use_tqdm=False)[0]
        assert outs[i].error is None and outs[i].outputs[0].token_ids == alone.outputs[0].token_ids
    assert_pool_empty(llm)


def _favour(llm: LLM, ids: slice | int) -> None:
    """Make the model's output favour ``ids`` at every position, whatever its input: the sampler must cope
    with whatever a model outputs (a random or broken checkpoint predicts its own mask id)."""
    model = llm.llm_engine.model
    compute_logits = model.compute_logits

    def favouring(hidden):
        logits = compute_logits(hidden).clone()
        logits[:, ids] += 1e4
        return logits

    model.compute_logits = favouring


@pytest.mark.parametrize(
    "kw",
    [
        {"remasking": "origin", "temperature": 0.5},
        {"remasking": "maskgit_plus"},
        {"remasking": "entropy", "threshold": 0.9},
        {"remasking": "topk_margin", "factor": 1.0},
        {"remasking": "maskgit_plus", "temperature": 1.0, "top_k": 3},
        {"remasking": "maskgit_plus", "refresh": "elastic"},
    ],
)
def test_the_mask_id_is_never_committed_and_every_position_is_filled(dream_dir, kw):
    """Committing the mask id left a position masked forever: a request stepping without end with a threshold
    (24,000 steps over HTTP), a dropped token without."""
    llm = LLM(str(dream_dir), kv_policy="full", device="cpu", skip_tokenizer_init=True)
    mask = llm.llm_engine.model_config.mask_token_id
    _favour(llm, mask)
    sp = SamplingParams(gen_length=16, stop_at_eos=False, seed=0, **kw)
    out = llm.generate({"prompt_token_ids": list(range(3, 30))}, sp, use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    assert len(tokens) == 16 and mask not in tokens
    assert out.metrics.num_steps <= 16
    assert_pool_empty(llm)


@pytest.mark.parametrize("kw", [{}, {"remasking": "random"}, {"temperature": 1.0}, {"threshold": 0.9}])
def test_llada_never_commits_its_mask_id(llada_dir, kw):
    llm = LLM(str(llada_dir), kv_policy="maskkv", kv_budget=4, device="cpu")
    mask = llm.llm_engine.model_config.mask_token_id
    _favour(llm, mask)
    sp = SamplingParams(gen_length=8, block_length=4, stop_at_eos=False, seed=0, **kw)
    out = llm.generate({"prompt_token_ids": list(range(3, 30))}, sp, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8 and mask not in out.outputs[0].token_ids
    assert_pool_empty(llm)


def test_origin_with_a_threshold_is_refused_clearly(dream_dir):
    llm = LLM(str(dream_dir), kv_policy="full", device="cpu", skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="origin.*confidence"):
        llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(remasking="origin", threshold=0.9))
    with pytest.raises(ValueError, match="elastic.*origin"):
        llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(remasking="origin", refresh="elastic"))
    assert_pool_empty(llm)


def test_padding_rows_of_the_embedding_are_never_committed(tmp_path):
    """LLaDA pads its embedding beyond vocab_size (``embedding_size``): those rows are no tokens."""
    cfg = llada_config(d_model=32, n_layers=2, n_heads=2, vocab_size=64)
    cfg["embedding_size"] = 96
    write_checkpoint(tmp_path, cfg, seed=5)
    llm = LLM(str(tmp_path), kv_policy="full", device="cpu", skip_tokenizer_init=True)
    _favour(llm, slice(64, None))
    out = llm.generate({"prompt_token_ids": [3, 4, 5, 6]}, SamplingParams(gen_length=8, stop_at_eos=False))[0]
    assert all(t < 64 and t != cfg["mask_token_id"] for t in out.outputs[0].token_ids)
    assert len(out.outputs[0].token_ids) == 8


def test_interrupted_generate_frees_what_it_held(llada_dir):
    llm = LLM(str(llada_dir), kv_policy="maskkv", kv_budget=4, device="cpu", num_pages=256)
    engine = llm.llm_engine
    calls = {"n": 0}
    step = engine.step

    def interrupting_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    engine.step = interrupting_step
    with pytest.raises(KeyboardInterrupt):
        llm.generate([{"prompt_token_ids": list(range(3, 20))}] * 3, SamplingParams(gen_length=16), use_tqdm=False)
    engine.step = step
    assert_pool_empty(llm)
