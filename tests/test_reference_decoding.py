"""kv_policy='none' is the reference decoder: token-for-token parity with the released decoding loops."""

from __future__ import annotations

import pytest

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.models.forward import full_forward_logits
from tests.conftest import prompt_ids
from tests.reference_decoders import dream_generate, llada_generate


@pytest.fixture(scope="module")
def llada_llm(llada_gqa_dir):
    return LLM(str(llada_gqa_dir), kv_policy="none")


@pytest.fixture(scope="module")
def dream_llm(dream_dir):
    return LLM(str(dream_dir), kv_policy="none")


def _logits_fn(llm):
    model = llm.llm_engine.model
    return lambda x: full_forward_logits(model, [x])[0]


@pytest.mark.parametrize(
    "gen_length,steps,block_length,cfg",
    [(16, 16, 16, 0.0), (16, 8, 8, 0.0), (24, 6, 8, 0.0), (12, 12, 4, 0.0), (16, 8, 8, 1.5)],
)
def test_llada_none_matches_reference(llada_llm, gen_length, steps, block_length, cfg):
    mask = llada_llm.llm_engine.model_config.mask_token_id
    for seed, n in [(0, 9), (1, 30)]:
        prompt = prompt_ids(n, seed=seed)
        expected = llada_generate(_logits_fn(llada_llm), prompt, steps, gen_length, block_length, mask, cfg)
        sp = SamplingParams(
            gen_length=gen_length, steps=steps, block_length=block_length, cfg_scale=cfg, stop_at_eos=False
        )
        out = llada_llm.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("gen_length,steps", [(16, 16), (16, 5), (20, 7)])
def test_dream_none_matches_reference(dream_llm, alg, gen_length, steps):
    mask = dream_llm.llm_engine.model_config.mask_token_id
    for seed, n in [(2, 8), (3, 25)]:
        prompt = prompt_ids(n, seed=seed)
        expected = dream_generate(_logits_fn(dream_llm), prompt, steps, gen_length, mask, alg)
        sp = SamplingParams(gen_length=gen_length, steps=steps, remasking=alg, stop_at_eos=False)
        out = dream_llm.generate({"prompt_token_ids": prompt}, sp, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected


def test_stop_at_eos_truncates_reference_output_exactly(llada_dir):
    """Stopping early once the text before the first EOS is final gives exactly the reference's text."""
    llm = LLM(str(llada_dir), kv_policy="none")
    eng = llm.llm_engine
    eos = eng.model_config.eos_token_ids[0]
    mask = eng.model_config.mask_token_id
    # bias the model towards EOS so that it shows up: scale the LM head row of EOS up
    head = eng.model.model.transformer["ff_out"].weight
    head[eos] *= 3.0
    found = 0
    for seed in range(6):
        prompt = prompt_ids(12, seed=seed)
        ref = llada_generate(_logits_fn(llm), prompt, 16, 16, 8, mask)
        out = llm.generate(
            {"prompt_token_ids": prompt}, SamplingParams(gen_length=16, steps=16, block_length=8), use_tqdm=False
        )
        cut = ref.index(eos) if eos in ref else len(ref)
        assert out[0].outputs[0].token_ids == ref[:cut]
        assert out[0].outputs[0].finish_reason == ("stop" if eos in ref else "length")
        found += eos in ref
    assert found, "the test needs at least one output that contains EOS"
