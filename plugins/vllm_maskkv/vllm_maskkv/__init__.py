"""vLLM plugin for LLaDA and Dream checkpoints (entry point ``vllm.general_plugins: maskkv``).

vLLM calls :func:`register` in every process it starts (front end, engine core, workers), so the
config classes and architectures exist wherever a model is built. Architectures:

* ``LLaDAModelLM``, ``DreamModel`` (the names real checkpoints carry): level 1, exact. Bidirectional
  per-position logits on the pooling runner (``runner="pooling"``, ``LLM.encode(..., "token_classify")``).
* ``LLaDADiffusionLM`` (experimental, level 2): LLaDA decoded natively by vLLM's DiffusionScheduler with
  paged prompt KV (prefix-cache decoding, not the exact decoder). Select it with
  ``hf_overrides={"architectures": ["LLaDADiffusionLM"]}``.
"""

from __future__ import annotations

ARCHITECTURES = {
    "LLaDAModelLM": "vllm_maskkv.token_logits:LLaDATokenLogits",
    "DreamModel": "vllm_maskkv.token_logits:DreamTokenLogits",
    "LLaDADiffusionLM": "vllm_maskkv.diffusion.model:LLaDADiffusionLM",
}


def register() -> None:
    """Register the config classes with transformers and the architectures with vLLM (idempotent)."""
    import os

    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.logger import init_logger

    from vllm_maskkv.configs import DreamConfig, LLaDAConfig
    from vllm_maskkv.diffusion.config_hook import register_config_hook

    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    AutoConfig.register("Dream", DreamConfig, exist_ok=True)
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)  # lazy "module:Class": nothing heavy imported here
    register_config_hook()
    # One line per vLLM process: shows where the plugin is live (the multiprocess test reads it).
    init_logger(f"vllm.{__name__}").info("maskkv plugin registered %s (pid %d)", ", ".join(ARCHITECTURES), os.getpid())
