"""The offline API: prompt forms, batch invariance, and clear errors for bad input before any work."""

from __future__ import annotations

import pytest

from maskkv_engine import LLM, SamplingParams
from tests.conftest import prompt_ids


@pytest.fixture(scope="module")
def llm_none(llada_dir):
    return LLM(str(llada_dir), kv_policy="none")


@pytest.fixture(scope="module")
def llm_full(llada_dir):
    return LLM(str(llada_dir), kv_policy="full")


def test_string_prompts_with_tokenizer(llm_none):
    sp = SamplingParams(gen_length=8, steps=8, stop_at_eos=False)
    outs = llm_none.generate(["w1 w2 w3", "w5 w6"], sp, use_tqdm=False)
    assert [o.prompt for o in outs] == ["w1 w2 w3", "w5 w6"]
    assert outs[0].prompt_token_ids == llm_none.tokenizer.encode("w1 w2 w3")
    assert len(outs[0].outputs[0].token_ids) == 8
    assert outs[0].outputs[0].text == llm_none.tokenizer.decode(outs[0].outputs[0].token_ids, skip_special_tokens=True)
    single = llm_none.generate("w1 w2 w3", sp, use_tqdm=False)
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_chat_applies_the_template(llm_none):
    sp = SamplingParams(gen_length=4, steps=4, stop_at_eos=False)
    out = llm_none.chat([{"role": "user", "content": "w3 w4"}], sp, use_tqdm=False)[0]
    tok = llm_none.tokenizer
    assert out.prompt_token_ids == llm_none.apply_chat_template([{"role": "user", "content": "w3 w4"}])
    assert out.prompt_token_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_token_id_prompts_without_tokenizer(llada_gqa_dir):
    llm = LLM(str(llada_gqa_dir), kv_policy="none")
    assert llm.tokenizer is None
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(gen_length=4, steps=4), use_tqdm=False)[0]
    assert out.outputs[0].text == "" and out.prompt is None
    with pytest.raises(ValueError, match="has no tokenizer"):
        llm.generate("hello", use_tqdm=False)


def test_skip_tokenizer_init(llada_dir):
    llm = LLM(str(llada_dir), kv_policy="none", skip_tokenizer_init=True)
    assert llm.tokenizer is None


@pytest.mark.parametrize("policy", ["none", "full"])
@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 123)])
def test_batch_invariance_three_prompts(request, policy, temperature, seed):
    """Three prompts of different lengths batched give the same tokens as each alone."""
    llm = request.getfixturevalue(f"llm_{policy}")
    prompts = [{"prompt_token_ids": prompt_ids(n, seed=n)} for n in (5, 37, 70)]
    params = [
        SamplingParams(gen_length=16, steps=8, block_length=8, temperature=temperature, seed=seed),
        SamplingParams(gen_length=24, steps=12, block_length=8, temperature=temperature, seed=seed),
        SamplingParams(gen_length=8, steps=8, temperature=temperature, seed=None if seed is None else seed + 1),
    ]
    batched = llm.generate(prompts, params, use_tqdm=False)
    for prompt, sp, out in zip(prompts, params, batched):
        alone = llm.generate(prompt, sp, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids


def test_sampling_is_reproducible_under_a_seed(llm_none):
    sp = SamplingParams(gen_length=16, steps=8, block_length=8, temperature=1.0, seed=5, stop_at_eos=False)
    a = llm_none.generate({"prompt_token_ids": prompt_ids(10)}, sp, use_tqdm=False)[0].outputs[0].token_ids
    b = llm_none.generate({"prompt_token_ids": prompt_ids(10)}, sp, use_tqdm=False)[0].outputs[0].token_ids
    sp.seed = 6
    c = llm_none.generate({"prompt_token_ids": prompt_ids(10)}, sp, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b and a != c


def test_generate_progress_bar(llm_none, capsys):
    llm_none.generate([{"prompt_token_ids": [5, 6]}] * 2, SamplingParams(gen_length=2, steps=2), use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(gen_length=0), "gen_length=0 must be an integer >= 1"),
        (dict(gen_length=16, block_length=5), "block_length=5 must divide gen_length=16"),
        (dict(gen_length=16, block_length=8, steps=5), "steps=5 must be a multiple of the number of blocks"),
        (dict(temperature=-0.5), "temperature=-0.5 must be a number >= 0"),
        (dict(remasking=""), "remasking='' must be a decoding rule's name"),
        (dict(kv_budget=0), "kv_budget=0 must be an integer >= 1"),
        (dict(top_p=1.5), "top_p=1.5 must be in"),
        (dict(threshold=0.9, factor=1.0), "threshold or factor, not both"),
    ],
)
def test_sampling_params_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SamplingParams(**kwargs)


def test_an_unknown_decoding_rule_is_refused_with_the_names_that_exist(llm_full):
    """Which rule names exist is the registry's to say (a plugin can add one), checked when the request is added."""
    with pytest.raises(ValueError, match=r"remasking='greedy' is not known \(allowed: \[.*'low_confidence'"):
        llm_full.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(remasking="greedy"), use_tqdm=False)
    assert not llm_full.llm_engine.has_unfinished_requests()


def test_request_errors_leave_the_engine_clean(llm_full, llada_dir):
    eng = llm_full.llm_engine
    good = {"prompt_token_ids": [5, 6, 7]}
    cases = [
        ([good, {"prompt_token_ids": []}], SamplingParams(gen_length=4), "prompt is empty"),
        ([good, {"prompt_token_ids": [5] * 5000}], SamplingParams(gen_length=4), "exceeds max_model_len"),
        ([good, {"prompt_token_ids": [5, 999]}], SamplingParams(gen_length=4), "outside the vocabulary"),
        ([good], SamplingParams(gen_length=4, remasking="entropy"), "not a LLaDA rule"),
        ([good], SamplingParams(gen_length=4, cfg_scale=1.0), "cfg_scale > 0 runs with kv_policy='none' only"),
        ([good, {"tokens": [1]}], SamplingParams(gen_length=4), "needs the key 'prompt_token_ids'"),
    ]
    for prompts, sp, message in cases:
        with pytest.raises(ValueError, match=message):
            llm_full.generate(prompts, sp, use_tqdm=False)
        assert not eng.has_unfinished_requests()
        assert eng.block_manager.num_used_pages == 0 and eng.block_manager.num_reserved_pages == 0
    with pytest.raises(ValueError, match="got 2 sampling_params for 1 prompts"):
        llm_full.generate([good], [SamplingParams(), SamplingParams()], use_tqdm=False)
    # and the engine still works
    assert llm_full.generate(good, SamplingParams(gen_length=4, steps=4), use_tqdm=False)[0].finished


def test_engine_option_errors(llada_dir):
    with pytest.raises(ValueError, match="kv_policy='snapkv2' is not known"):
        LLM(str(llada_dir), kv_policy="snapkv2")
    with pytest.raises(TypeError, match=r"unknown engine option\(s\) \['max_seqs'\]"):
        LLM(str(llada_dir), max_seqs=4)
    with pytest.raises(ValueError, match="block_size=0 must be"):
        LLM(str(llada_dir), block_size=0)
    with pytest.raises(ValueError, match="attention_backend='flash' is not known"):
        LLM(str(llada_dir), attention_backend="flash")
    with pytest.raises(ValueError, match="kv_budget=-1 must be"):
        LLM(str(llada_dir), kv_budget=-1)
