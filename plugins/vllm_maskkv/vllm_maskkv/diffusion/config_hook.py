"""Engine-config rules for ``LLaDADiffusionLM``, run by vLLM while it builds its VllmConfig (every process).

LLaDA's prompt is bidirectional: each prompt token's KV depends on every other prompt token. Two vLLM
features assume causal prompts and silently corrupt it (both reproduced in tests/level2/test_level2_hazards.py):
* prefix caching reuses a block of KV computed with another prompt's tail;
* chunked prefill computes a long prompt in chunks, each attending only to the chunks before it.
So this hook turns prefix caching and chunked prefill off, and refuses a token budget smaller than
max_model_len (without chunking, a longer prompt could never be scheduled). The attention layers also
tag their KV spec ``non_causal``, on which vLLM's engine core disables both features by itself; the hook
makes the rule visible at config time and independent of that mechanism.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger

from vllm_maskkv.diffusion import ARCHITECTURE

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(f"vllm.{__name__}")  # under "vllm": shown by vLLM's log handlers


def enforce_bidirectional_prompt_rules(vllm_config: VllmConfig) -> None:
    cache = vllm_config.cache_config
    sched = vllm_config.scheduler_config
    max_model_len = vllm_config.model_config.max_model_len
    if cache.enable_prefix_caching:
        logger.warning("%s: prefix caching corrupts bidirectional prompts; turning it off.", ARCHITECTURE)
        cache.enable_prefix_caching = False
    if sched.enable_chunked_prefill:
        logger.info("%s: chunked prefill corrupts bidirectional prompts; turning it off.", ARCHITECTURE)
        sched.enable_chunked_prefill = False
    if sched.max_num_batched_tokens < max_model_len:
        raise ValueError(
            f"{ARCHITECTURE}: max_num_batched_tokens={sched.max_num_batched_tokens} is smaller than "
            f"max_model_len={max_model_len}. A bidirectional prompt must be computed in one step (chunked "
            "prefill would change its KV), so raise max_num_batched_tokens or lower max_model_len."
        )


def require_diffusion_config(vllm_config: VllmConfig) -> None:
    """The canvas is LLaDA's block: the user chooses it, there is no default worth guessing."""
    diffusion = vllm_config.diffusion_config
    if diffusion is None:
        raise ValueError(
            f"{ARCHITECTURE} needs diffusion_config={{'canvas_length': <block_length>, "
            "'max_denoising_steps': <steps per block>}} (CLI: --diffusion-config)"
        )
    if diffusion.max_denoising_steps is None:
        diffusion.max_denoising_steps = diffusion.canvas_length  # LLaDA's default: one token per step
    # vLLM treats a model as a dLLM (DiffusionScheduler, Model Runner V2, diffusion SamplingParams rules)
    # when its HF config carries canvas_length.
    vllm_config.model_config.hf_config.canvas_length = diffusion.canvas_length


def register_config_hook() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class LLaDADiffusionConfig(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config: VllmConfig) -> None:
            require_diffusion_config(vllm_config)
            enforce_bidirectional_prompt_rules(vllm_config)

    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, LLaDADiffusionConfig)
