"""``LLaDAModelState``: what Model Runner V2 needs beyond the defaults to run LLaDA as a dLLM.

Inputs, positions and attention metadata are vLLM's defaults (the attention layers force causal=False
themselves). What changes: no token is sampled after a prefill or a step (the canvas carries the output,
``num_new_sampled_tokens_per_step = 0``), and sampling is LLaDA's block remasking.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from vllm_maskkv.configs import LLADA_MASK_ID
from vllm_maskkv.diffusion.sampler import LLaDABlockSampler


class LLaDAModelState(DefaultModelState):
    num_new_sampled_tokens_per_step: int = 0

    def get_supported_generation_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def custom_sampler(self, sampler: Any) -> tuple[Any, Any] | None:
        diffusion = self.vllm_config.diffusion_config
        hf_config = self.model_config.hf_config
        block_sampler = LLaDABlockSampler(
            sampler,
            canvas_length=diffusion.canvas_length,
            max_denoising_steps=diffusion.max_denoising_steps,
            mask_token_id=getattr(hf_config, "mask_token_id", None) or LLADA_MASK_ID,
            max_model_len=self.max_model_len,
            max_num_reqs=self.max_num_reqs,
            device=self.device,
        )
        return block_sampler, None  # no rejection sampler: nothing is verified
