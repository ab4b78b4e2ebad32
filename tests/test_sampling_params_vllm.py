"""vLLM's names on the Python API: aliases, n, stop strings / ids, logprobs, prompt dicts, chat keywords."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.sampling_params import DEFAULT_COMPLETION_MAX_TOKENS, DEFAULT_GEN_LENGTH

PROMPT = "w1 w2 w3 w4 w5 w6"


@pytest.fixture(scope="module")
def llm(llada_dir):
    return LLM(str(llada_dir), kv_policy="full")


def _gen(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0]


# ---- SamplingParams itself -------------------------------------------------------------------------
def test_max_tokens_is_gen_length():
    assert SamplingParams.gen_length == DEFAULT_GEN_LENGTH and DEFAULT_COMPLETION_MAX_TOKENS == 16
    sp = SamplingParams(max_tokens=24)
    assert sp.gen_length == 24 and sp.max_tokens == 24 and sp.steps == 24
    assert SamplingParams(gen_length=24, max_tokens=24).gen_length == 24
    with pytest.raises(ValueError, match="max_tokens=24 and gen_length=32 disagree"):
        SamplingParams(gen_length=32, max_tokens=24)
    with pytest.raises(ValueError, match=r"SamplingParams.max_tokens=0 must be an integer >= 1"):
        SamplingParams(max_tokens=0)
    # the alias is not a field: replacing gen_length never meets a stale max_tokens
    assert dataclasses.replace(sp, gen_length=8, steps=8, block_length=8).max_tokens == 8


def test_ignore_eos_is_not_stop_at_eos():
    assert SamplingParams(ignore_eos=True).stop_at_eos is False
    assert SamplingParams(stop_at_eos=False).ignore_eos is True
    assert SamplingParams().ignore_eos is False
    with pytest.raises(ValueError, match="ignore_eos=True and stop_at_eos=True disagree"):
        SamplingParams(ignore_eos=True, stop_at_eos=True)
    with pytest.raises(ValueError, match="ignore_eos=1 must be a bool"):
        SamplingParams(ignore_eos=1)


@pytest.mark.parametrize(
    "name, hint",
    [("gen_lenght", "did you mean gen_length?"), ("max_token", "did you mean max_tokens?"), ("stop_token_id", "did you mean stop_token_ids?"), ("temprature", "did you mean temperature?")],
)  # fmt: skip
def test_unknown_keyword_names_the_closest(name, hint):
    with pytest.raises(TypeError, match=re.escape(f"unknown keyword '{name}' ({hint})")):
        SamplingParams(**{name: 1})


def test_unsupported_vllm_option_says_why():
    with pytest.raises(TypeError, match="vLLM's 'presence_penalty' is not supported here"):
        SamplingParams(presence_penalty=0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), r"SamplingParams.n=0 must be an integer >= 1"),
        (dict(logprobs=-1), r"SamplingParams.logprobs=-1 must be an integer >= 0"),
        (dict(stop=[""]), r"SamplingParams.stop=\[''\] must be a non-empty string"),
        (dict(stop=3), r"SamplingParams.stop=3 must be a non-empty string or a list of them"),
        (dict(stop_token_ids=[-1]), r"SamplingParams.stop_token_ids=\[-1\] must be a list of token ids >= 0"),
        (dict(include_stop_str_in_output=1), r"include_stop_str_in_output=1 must be a bool"),
    ],
)
def test_bad_vllm_values_name_the_field(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SamplingParams(**kwargs)


# ---- n ---------------------------------------------------------------------------------------------
def test_n_samples_use_seed_seed_plus_one(llm):
    out = _gen(llm, PROMPT, gen_length=8, temperature=1.0, n=3, seed=10, stop_at_eos=False)
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    alone = [_gen(llm, PROMPT, gen_length=8, temperature=1.0, seed=10 + i, stop_at_eos=False) for i in range(3)]
    assert [c.token_ids for c in out.outputs] == [a.outputs[0].token_ids for a in alone]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct seeds give distinct samples


def test_n_in_a_batch_keeps_prompt_order(llm):
    outs = llm.generate(["w1 w2", "w3 w4 w5"], SamplingParams(gen_length=4, n=2, stop_at_eos=False), use_tqdm=False)
    assert [o.prompt for o in outs] == ["w1 w2", "w3 w4 w5"]
    assert [len(o.outputs) for o in outs] == [2, 2]


def test_abort_of_the_parent_aborts_every_child_and_frees_pages(llm):
    eng = llm.llm_engine
    bm = eng.block_manager
    eng.add_request("parent", PROMPT, SamplingParams(gen_length=16, n=3, stop_at_eos=False))
    assert eng.num_unfinished_requests == 3
    eng.step()
    assert bm.num_used_pages + bm.num_reserved_pages > 0
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("parent", PROMPT, SamplingParams(gen_length=4))
    assert eng.abort_request("parent") is True
    assert not eng.has_unfinished_requests()
    assert bm.num_used_pages == 0 and bm.num_reserved_pages == 0 and bm.live_requests == []
    assert eng.abort_request("parent") is False
    eng.add_request("parent", PROMPT, SamplingParams(gen_length=4, n=2))  # the id is free again
    assert eng.run_to_completion()[0].request_id == "parent"


# ---- stop strings and stop token ids ---------------------------------------------------------------
def test_stop_string_cuts_before_it(llm):
    base = _gen(llm, PROMPT, gen_length=12, ignore_eos=True).outputs[0]
    stop = " " + base.text.split()[4]
    at = base.text.find(stop)
    assert at > 0
    out = _gen(llm, PROMPT, gen_length=12, ignore_eos=True, stop=[stop, "never there"]).outputs[0]
    assert out.text == base.text[:at]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == base.token_ids[: len(out.token_ids)] and len(out.token_ids) < len(base.token_ids)
    assert stop in llm.tokenizer.decode(out.token_ids)  # vLLM keeps the token that completes the string
    kept = _gen(llm, PROMPT, gen_length=12, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    assert kept.outputs[0].text == base.text[: at + len(stop)]


def test_no_stop_string_hit_keeps_length(llm):
    out = _gen(llm, PROMPT, gen_length=6, ignore_eos=True, stop=["nothing like this"]).outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None and len(out.token_ids) == 6


def test_stop_token_ids_end_the_completion(llm):
    base = _gen(llm, PROMPT, gen_length=12, ignore_eos=True).outputs[0].token_ids
    stop_id = base[5]
    cut = base.index(stop_id)
    out = _gen(llm, PROMPT, gen_length=12, ignore_eos=True, stop_token_ids=[stop_id]).outputs[0]
    assert out.token_ids == base[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_needs_a_tokenizer(llada_gqa_dir):
    llm = LLM(str(llada_gqa_dir), kv_policy="full")
    with pytest.raises(ValueError, match="SamplingParams.stop needs the model's tokenizer"):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(gen_length=4, stop="x"), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


# ---- logprobs --------------------------------------------------------------------------------------
def test_logprobs_are_the_log_softmax_at_the_commit_step(llm):
    """Each token's logprob is log_softmax of the logits of the step that committed it, at its position,
    computed here directly from the logits the sampler received."""
    eng = llm.llm_engine
    seen: dict[int, torch.Tensor] = {}  # absolute position -> logits row of the step that committed it
    write = eng.sampler.write

    def spy(request, positions, chosen, tokens, logits):
        committed = write(request, positions, chosen, tokens, logits)
        rows = {p: i for i, p in enumerate(positions.cpu().tolist())}
        for p in committed.tolist():
            seen[p] = logits[rows[p]].detach().float().cpu().clone()
        return committed

    eng.sampler.write = spy
    try:
        out = _gen(llm, PROMPT, gen_length=8, steps=4, ignore_eos=True, logprobs=3, temperature=0.7, seed=1)
    finally:
        eng.sampler.write = write
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 8
    prompt_len = len(out.prompt_token_ids)
    total = 0.0
    for i, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        logp = torch.log_softmax(seen[prompt_len + i], dim=-1)
        assert entry[tok].logprob == pytest.approx(float(logp[tok]), abs=1e-5)
        assert entry[tok].rank == int((logp > logp[tok]).sum()) + 1
        top = torch.topk(logp, 3)
        assert set(top.indices.tolist()) <= set(entry) and len(entry) <= 4
        for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-5)
        assert entry[tok].decoded_token == llm.tokenizer.decode([tok])
        total += float(logp[tok])
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_logprobs_zero_and_none(llm):
    zero = _gen(llm, PROMPT, gen_length=4, ignore_eos=True, logprobs=0).outputs[0]
    assert [list(e) for e in zero.logprobs] == [[t] for t in zero.token_ids]
    plain = _gen(llm, PROMPT, gen_length=4, ignore_eos=True).outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None


# ---- LLM -------------------------------------------------------------------------------------------
def test_prompt_dict_with_text(llm):
    sp = SamplingParams(gen_length=4, stop_at_eos=False)
    by_dict = llm.generate([{"prompt": PROMPT}], sp, use_tqdm=False)[0]
    by_text = llm.generate([PROMPT], sp, use_tqdm=False)[0]
    assert by_dict.prompt == PROMPT and by_dict.prompt_token_ids == by_text.prompt_token_ids
    assert by_dict.outputs[0].token_ids == by_text.outputs[0].token_ids


def test_get_tokenizer(llm, llada_dir):
    assert llm.get_tokenizer() is llm.tokenizer and llm.get_tokenizer() is not None
    assert LLM(str(llada_dir), kv_policy="none", skip_tokenizer_init=True).get_tokenizer() is None


def test_chat_keywords(llm):
    msgs = [{"role": "user", "content": "w3 w4"}]
    sp = SamplingParams(gen_length=4, stop_at_eos=False)
    tok = llm.tokenizer
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    assert llm.chat(msgs, sp, use_tqdm=False)[0].prompt_token_ids[-1] == assistant
    plain = llm.chat(msgs, sp, use_tqdm=False, add_generation_prompt=False)[0]
    assert plain.prompt_token_ids[-1] != assistant
    template = "{% for m in messages %}w9 {{ m['content'] }} {% endfor %}"
    own = llm.chat(msgs, sp, use_tqdm=False, chat_template=template)[0]
    assert own.prompt_token_ids == tok.encode("w9 w3 w4")
    with pytest.raises(ValueError, match="cannot both be True"):
        llm.chat(msgs, sp, use_tqdm=False, continue_final_message=True)


def test_gpu_memory_utilization_on_the_cpu_warns(llada_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="maskkv_engine.engine.llm_engine"):
        llm = LLM(str(llada_dir), kv_policy="full", device="cpu", gpu_memory_utilization=0.5)
    assert "gpu_memory_utilization is ignored on the CPU" in caplog.text
    assert _gen(llm, PROMPT, gen_length=4).finished
