"""The two ways vLLM silently corrupts a bidirectional prompt, reproduced, and the plugin preventing both.

Each hazard is shown twice: with the plugin's protection bypassed (its config hook and the non_causal tag
of its attention's KV spec), the output changes; with the plugin as shipped, it equals the reference.
"""

from __future__ import annotations

import pytest

from tests.conftest import prompt_ids
from tests.level2.conftest import BLOCK, STEPS, diffusion_llm, generate

GEN = 2 * BLOCK


@pytest.fixture
def unprotected(monkeypatch):
    """Undo the plugin's protection for one engine: what a naive plugin would ship."""
    from vllm.model_executor.layers.attention import Attention, PrefillPrefixLMAttention
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    from vllm_maskkv.diffusion import ARCHITECTURE
    from vllm_maskkv.diffusion.config_hook import require_diffusion_config

    class DiffusionConfigOnly(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            require_diffusion_config(vllm_config)

    monkeypatch.setitem(MODELS_CONFIG_MAP, ARCHITECTURE, DiffusionConfigOnly)
    monkeypatch.setattr(PrefillPrefixLMAttention, "get_kv_cache_spec", Attention.get_kv_cache_spec)


SEEDS = range(4)  # four independent cases: the corruption must show in at least one


def _shared_prefix_prompts(llm, seed: int) -> tuple[list[int], list[int]]:
    """Two prompts whose first KV block (block_size tokens) is identical; 44 + 16 tokens fit max_model_len 64."""
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    shared = prompt_ids(block_size, seed=100 + seed)
    return shared + prompt_ids(12, seed=200 + seed), shared + prompt_ids(12, seed=300 + seed)


def _two_long_prompts(seed: int) -> list[list[int]]:
    """40 + 40 tokens exceed one step's budget (64): the second is chunked if chunked prefill is on."""
    return [prompt_ids(40, seed=400 + seed), prompt_ids(40, seed=500 + seed)]


def _prefix_scenario(llm, reference) -> tuple[list[bool], list[int]]:
    """a, then b (a prefix cache would now hold a's first block): does b equal the reference? b's cached tokens."""
    same, cached = [], []
    for seed in SEEDS:
        a, b = _shared_prefix_prompts(llm, seed)
        out_a = generate(llm, [a], GEN)[0]
        out_b = generate(llm, [b], GEN)[0]
        assert list(out_a.outputs[0].token_ids) == reference.generate(a, GEN, BLOCK, STEPS)
        same.append(list(out_b.outputs[0].token_ids) == reference.generate(b, GEN, BLOCK, STEPS))
        cached.append(out_b.num_cached_tokens or 0)
    return same, cached


def _chunked_scenario(llm, reference) -> list[bool]:
    """Both prompts at once: does the second (the one a chunked prefill would split) equal the reference?"""
    same = []
    for seed in SEEDS:
        prompts = _two_long_prompts(seed)
        first, second = generate(llm, prompts, GEN)
        assert list(first.outputs[0].token_ids) == reference.generate(prompts[0], GEN, BLOCK, STEPS)
        same.append(list(second.outputs[0].token_ids) == reference.generate(prompts[1], GEN, BLOCK, STEPS))
    return same


# ---- the plugin as shipped ----------------------------------------------------------------------------
def test_plugin_turns_both_features_off(protected_llm):
    config = protected_llm.llm_engine.vllm_config  # both were asked for explicitly
    assert config.cache_config.enable_prefix_caching is False
    assert config.scheduler_config.enable_chunked_prefill is False


def test_shared_prefix_equals_reference(protected_llm, reference):
    same, cached = _prefix_scenario(protected_llm, reference)
    assert all(same) and not any(cached)


def test_prompts_over_one_step_budget_equal_reference(protected_llm, reference):
    assert all(_chunked_scenario(protected_llm, reference))


def test_budget_below_max_model_len_is_refused(llada_dir):
    with pytest.raises(ValueError, match="max_num_batched_tokens=32 is smaller than max_model_len=64"):
        diffusion_llm(llada_dir, max_num_batched_tokens=32, max_model_len=64)


# ---- the hazards, protection bypassed -----------------------------------------------------------------
def test_prefix_caching_would_corrupt_the_second_prompt(unprotected, llada_dir, reference):
    llm = diffusion_llm(llada_dir, enable_prefix_caching=True, enable_chunked_prefill=False)
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    same, cached = _prefix_scenario(llm, reference)
    assert all(cached)  # every b reused the KV block computed with a's tail
    assert not all(same)


def test_chunked_prefill_would_corrupt_a_chunked_prompt(unprotected, llada_dir, reference):
    llm = diffusion_llm(llada_dir, enable_prefix_caching=False, enable_chunked_prefill=True)
    assert llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
    assert not all(_chunked_scenario(llm, reference))
