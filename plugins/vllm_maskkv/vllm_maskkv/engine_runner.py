"""maskkv-engine's ``backend="vllm"``: our scheduler, denoising loop and schedules; vLLM's forward.

Registered in the entry-point group ``maskkv_engine.model_runners`` (``build_runner``), so maskkv-engine
finds it without importing the plugin. The ModelRunner contract (``maskkv_engine.runner_api``): per scheduled
request, the logits of the positions it may commit this step. Every step is one full bidirectional pass
over [prompt + canvas] on vLLM's pooling path (level 1), so decoding equals our reference decoder
(``kv_policy="none"``). KV policies are not available here: their pruned per-head pages live in our own
runner and do not fit vLLM's cache manager.
"""

from __future__ import annotations

import torch
from vllm import LLM
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform

from maskkv_engine.runner_api import (
    DiffusionLMConfig,
    EngineConfig,
    ScheduledRequest,
    SchedulerConfig,
    StepResult,
    guided_logits,
    unconditional_tokens,
)


def build_runner(
    config: EngineConfig, model_config: DiffusionLMConfig, dtype: torch.dtype, max_model_len: int, device
) -> VLLMModelRunner:
    """backend='vllm': vLLM's pooling path computes every forward; our weights are never loaded. Exact
    reference decoding only: KV policies prune pages that live in maskkv-engine's own runner."""
    if config.kv_policy != "none":
        raise ValueError(
            f"backend='vllm' decodes with full recompute only: kv_policy={config.kv_policy!r} is not available "
            "(set kv_policy='none'; KV policies run on backend='native')"
        )
    if config.attention_backend is not None or config.load_format != "auto":
        raise ValueError("attention_backend and load_format apply to backend='native'; vLLM chooses its own")
    return VLLMModelRunner(config.model, model_config, dtype, max_model_len, config.scheduler, config.seed, device)


class VLLMModelRunner:
    def __init__(
        self,
        model: str,
        model_config: DiffusionLMConfig,
        dtype: torch.dtype,
        max_model_len: int,
        scheduler: SchedulerConfig,
        seed: int,
        device: torch.device,
    ):
        self.config = model_config
        self.device = device
        self.llm = LLM(
            model=model,
            runner="pooling",
            skip_tokenizer_init=True,  # maskkv-engine tokenizes; vLLM only sees token ids
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=max_model_len,
            # a bidirectional sequence is computed in one step, never chunked: the budget must hold the longest
            max_num_batched_tokens=max(max_model_len, scheduler.max_num_batched_tokens),
            max_num_seqs=2 * scheduler.max_num_seqs,  # classifier-free guidance sends two sequences per request
            enforce_eager=current_platform.is_cpu(),  # torch.compile costs minutes on the CPU for no gain here
            seed=seed,
        )

    def shutdown(self) -> None:
        """Tear vLLM's engine down now.

        vLLM's in-process engine destroys the process-wide distributed groups when it is garbage
        collected; if that happens after another vLLM engine was built, the newer one loses its groups.
        Call this before building the next engine in the same process.
        """
        self.llm.llm_engine.engine_core.shutdown()

    @torch.no_grad()
    def execute(self, scheduled: list[ScheduledRequest]) -> list[StepResult]:
        prompts: list[TokensPrompt] = []
        candidates: list[torch.Tensor] = []
        for item in scheduled:
            if not item.full_pass or item.layers is not None:
                raise RuntimeError("backend='vllm' computes whole full passes only (kv_policy='none')")
            req = item.request
            candidates.append(req.state.candidates(req.tokens, req.mask_id))
            prompts.append(TokensPrompt(prompt_token_ids=req.tokens.tolist()))
            if req.params.cfg_scale > 0:
                uncond = unconditional_tokens(req.tokens, req.prompt_len, req.mask_id)
                prompts.append(TokensPrompt(prompt_token_ids=uncond.tolist()))
        outputs = iter(self.llm.encode(prompts, pooling_task="token_classify", use_tqdm=False))

        results = []
        for item, cand in zip(scheduled, candidates):
            rows = self.config.logit_rows(cand)
            logits = next(outputs).outputs.data[rows]
            cfg = item.request.params.cfg_scale
            if cfg > 0:
                uncond = next(outputs).outputs.data[rows]
                logits = guided_logits(logits, uncond, cfg)
            results.append(StepResult(positions=cand, logits=logits.to(self.device)))
        return results
