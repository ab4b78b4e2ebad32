"""Level 2 runs real vLLM (DiffusionScheduler, CPU Model Runner V2, paged CPU attention) on a CPU, which
only works with the TEST-ONLY Triton-interpreter shim imported before vLLM, and the engine in-process
(a spawned engine process would not have the shim). So this directory runs in its own pytest process.
"""

from __future__ import annotations

import os
import sys

if "vllm" in sys.modules:
    raise RuntimeError("tests/level2 must run in its own process (pytest tests/level2): vllm was imported first")

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes below

import pytest  # noqa: E402

import vllm_maskkv.cpu_triton_shim  # noqa: E402,F401  (before vllm)
from tests.level2.reference import PrefixCacheLLaDA  # noqa: E402
from vllm_maskkv.diffusion import llada_diffusion_kwargs  # noqa: E402

BLOCK, STEPS = 8, 4  # canvas (LLaDA block) and denoising steps per block
LEVEL2_MAX_MODEL_LEN = 64  # short sequences: a tiny random model's canvas still depends on its prompt

# In-process vLLM engines share process-wide distributed state, and one that is garbage-collected tears it
# down under the others: every engine made here lives until the session ends.
_ENGINES: list = []


def diffusion_llm(path, **overrides):
    from vllm import LLM

    options = dict(
        model=str(path),
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=LEVEL2_MAX_MODEL_LEN,
        max_num_batched_tokens=LEVEL2_MAX_MODEL_LEN,
        max_num_seqs=8,
        block_size=32,  # the smallest CPU KV block: a shared prefix of one block is 32 tokens
        kv_cache_memory_bytes=64 << 20,  # plenty for these tiny models; several engines live at once
        seed=0,
        **llada_diffusion_kwargs(BLOCK, STEPS),
    )
    options.update(overrides)
    llm = LLM(**options)
    _ENGINES.append(llm)
    return llm


def generate(llm, prompts: list[list[int]], gen_length: int, extra: list[dict] | None = None):
    """All prompts submitted together (one continuous batch); per-request diffusion knobs in ``extra``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(max_tokens=gen_length, ignore_eos=True, detokenize=False, extra_args=e or None)
        for e in (extra or [None] * len(prompts))
    ]
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


@pytest.fixture(scope="session")
def reference(llada_dir) -> PrefixCacheLLaDA:
    return PrefixCacheLLaDA(llada_dir)


@pytest.fixture(scope="session")
def protected_llm(llada_dir):
    """What a user gets, even when asking for both hazardous features: the plugin turns them off."""
    return diffusion_llm(llada_dir, enable_prefix_caching=True, enable_chunked_prefill=True)
