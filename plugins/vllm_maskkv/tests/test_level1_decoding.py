"""Level 1 in maskkv-engine: ``LLM(path, backend="vllm")`` decodes exactly like our reference decoder.

Our scheduler, denoising loop, schedules and sampler; vLLM's forward. The reference is our own
``kv_policy="none"`` engine, itself token-for-token equal to the released LLaDA / Dream loops.
"""

from __future__ import annotations

import pytest

from maskkv_engine import LLM, SamplingParams
from tests.conftest import MAX_MODEL_LEN, prompt_ids

PROMPTS = [prompt_ids(9, seed=0), prompt_ids(30, seed=1), prompt_ids(17, seed=2)]


def _engines(path):
    ref = LLM(str(path), kv_policy="none", max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True)
    via_vllm = LLM(str(path), kv_policy="none", backend="vllm", max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True)
    return ref, via_vllm


@pytest.fixture(scope="module")
def llada(llada_dir):
    ref, via_vllm = _engines(llada_dir)
    yield ref, via_vllm
    via_vllm.llm_engine.runner.shutdown()


@pytest.fixture(scope="module")
def dream(dream_dir):
    ref, via_vllm = _engines(dream_dir)
    yield ref, via_vllm
    via_vllm.llm_engine.runner.shutdown()


def _generate(llm, params: SamplingParams) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)  # one batch
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(gen_length=16, steps=16, block_length=16, stop_at_eos=False),
        SamplingParams(gen_length=24, steps=6, block_length=8, stop_at_eos=False),
        SamplingParams(gen_length=16, steps=8, block_length=8, cfg_scale=1.5, stop_at_eos=False),
        SamplingParams(gen_length=16, steps=8, temperature=0.7, remasking="random", seed=7, stop_at_eos=False),
    ],
    ids=["one-block", "three-blocks", "cfg", "random-sampled"],
)
def test_llada_vllm_backend_equals_reference(llada, params):
    ref, via_vllm = llada
    expected = _generate(ref, params)
    assert all(len(t) == params.gen_length for t in expected)
    assert _generate(via_vllm, params) == expected


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(gen_length=16, steps=16, remasking="maskgit_plus", stop_at_eos=False),
        SamplingParams(gen_length=20, steps=7, remasking="topk_margin", stop_at_eos=False),
        SamplingParams(gen_length=16, steps=5, remasking="entropy", stop_at_eos=False),
        SamplingParams(gen_length=16, steps=8, remasking="origin", temperature=0.5, seed=3, stop_at_eos=False),
    ],
    ids=["maskgit_plus", "topk_margin", "entropy", "origin-sampled"],
)
def test_dream_vllm_backend_equals_reference(dream, params):
    ref, via_vllm = dream
    expected = _generate(ref, params)
    assert _generate(via_vllm, params) == expected


def test_vllm_backend_refuses_kv_policies(llada_dir):
    with pytest.raises(ValueError, match="kv_policy='maskkv'"):
        LLM(str(llada_dir), kv_policy="maskkv", backend="vllm")


def test_unknown_backend_is_refused(llada_dir):
    with pytest.raises(ValueError, match="backend='tgi'"):
        LLM(str(llada_dir), kv_policy="none", backend="tgi")
