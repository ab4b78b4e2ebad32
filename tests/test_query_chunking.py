"""Query-chunked full passes (``prefill_chunk_size``): attention and MLP over chunks of query rows give
the tokens of the unchunked pass for every policy and refresh, logits within fp32 tolerance, while the
hooks see every row at once and peak KV stays one layer of full KV plus the pages."""

from __future__ import annotations

import pytest
import torch

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.models.forward import full_forward_logits
from maskkv_engine.models.loader import load_model
from tests.combinations import POLICIES, REFRESHES, build_models, make_llm
from tests.conftest import prompt_ids

CHUNK = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("chunk_models"))


@pytest.mark.parametrize("case", ["llada_gqa", "llada_gqa_profile", "dream_gqa", "dream_mha_profile"])
def test_logits_within_fp32_tolerance(models, case):
    model, _ = load_model(str(models[case]), dtype="float32", device="cpu")
    seqs = [prompt_ids(70, seed=1, high=100), prompt_ids(9, seed=2, high=100), prompt_ids(40, seed=3, high=100)]
    whole = full_forward_logits(model, seqs)
    chunked = full_forward_logits(model, seqs, chunk_rows=CHUNK)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_projections_attention_and_mlp_see_at_most_a_chunk_of_rows(models, monkeypatch):
    model, _ = load_model(str(models["llada_gqa"]), dtype="float32", device="cpu")
    seen = {"sdpa": [], "mlp": [], "q_proj": []}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda q, *a, **kw: (seen["sdpa"].append(q.shape[-2]), sdpa(q, *a, **kw))[1],
    )
    block = next(m for m in model.modules() if type(m).__name__ == "LLaDABlock")
    mlp = block.mlp
    monkeypatch.setattr(block, "mlp", lambda h: (seen["mlp"].append(h.shape[0]), mlp(h))[1])
    block.q_proj.register_forward_hook(lambda mod, args, out: seen["q_proj"].append(args[0].shape[0]))
    full_forward_logits(model, [prompt_ids(70, seed=1, high=100)], chunk_rows=CHUNK)
    assert seen["sdpa"] and max(seen["sdpa"]) <= CHUNK
    assert seen["mlp"] and max(seen["mlp"]) <= CHUNK
    assert seen["q_proj"] and max(seen["q_proj"]) <= CHUNK  # q/k/v and RoPE: no temporaries over every row
    seen["sdpa"].clear()
    full_forward_logits(model, [prompt_ids(70, seed=1, high=100)])
    # without chunking one call sees every row (the torch backend folds a KV group's query heads into rows)
    assert max(seen["sdpa"]) >= 70


@pytest.mark.parametrize("case", ["llada_gqa_profile", "dream_mha_profile", "llada_gqa"])
@pytest.mark.parametrize("policy", POLICIES)
def test_tokens_identical_for_every_policy_and_refresh(models, case, policy, monkeypatch):
    dream = case.startswith("dream")
    refreshes = ("every_step",) if policy == "none" else REFRESHES
    prompts, params = [], []
    for i, refresh in enumerate(refreshes):
        kw = {"gen_length": 8, "seed": i, "refresh": refresh, "stop_at_eos": False}
        if not dream:
            kw.update(block_length=4, steps=8)
        if refresh == "dllm_cache":
            kw["refresh_config"] = {"K_p": 3, "K_r": 2, "rho": 0.25}
        elif refresh == "elastic":
            kw["refresh_config"] = {"window": 4, "gamma": 0.9}
        prompts.append({"prompt_token_ids": prompt_ids(30 + 11 * i, seed=i, high=100)})
        params.append(SamplingParams(**kw))
    import maskkv_engine.attention.backend as backend_module
    from maskkv_engine.engine.model_runner import NativeModelRunner

    calls = {"chunked": 0, "layer_split": 0}
    chunked_attention, prefill_chunk = backend_module.chunked_attention, NativeModelRunner._prefill_chunk
    monkeypatch.setattr(
        backend_module, "chunked_attention", lambda *a: (calls.__setitem__("chunked", 1), chunked_attention(*a))[1]
    )
    monkeypatch.setattr(
        NativeModelRunner,
        "_prefill_chunk",
        lambda self, item: (calls.__setitem__("layer_split", 1), prefill_chunk(self, item))[1],
    )
    outs = {}
    for chunk in (None, CHUNK):
        # the default small pool / token budget: first passes are split by layers and interleaved
        llm = make_llm(
            models[case], policy, prefill_chunk_size=chunk, enable_chunked_prefill=True, max_num_batched_tokens=48
        )
        outs[chunk] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[CHUNK] == outs[None]
    assert calls["chunked"], "some pass was chunked"
    assert calls["layer_split"] or policy == "none", "first passes were split by layers and interleaved"


def test_peak_kv_is_one_layer_plus_pages_with_chunking(calibrated_llada):
    prompt = prompt_ids(200, seed=3)
    eng = LLM(str(calibrated_llada), kv_policy="maskkv", kv_budget=8, prefill_chunk_size=CHUNK).llm_engine
    eng.block_manager.reset_peak()
    eng.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(gen_length=16, steps=16, block_length=8))
    eng.step()
    cfg, bm = eng.model_config, eng.block_manager
    one_layer = 2 * (len(prompt) + 16) * cfg.num_kv_heads * cfg.head_dim * 4
    assert bm.used_bytes > 0 and bm.peak_bytes <= one_layer + bm.used_bytes


def test_prefill_chunk_size_is_validated(llada_gqa_dir):
    with pytest.raises(ValueError, match=r"prefill_chunk_size=0 must be an integer >= 1 \(query rows\) or None"):
        LLM(str(llada_gqa_dir), prefill_chunk_size=0)
