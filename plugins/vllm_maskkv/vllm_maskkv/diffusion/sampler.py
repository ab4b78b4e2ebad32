"""LLaDA's low-confidence remasking, written to vLLM's diffusion sampler contract (Model Runner V2).

vLLM's dLLM path reuses speculative decoding: the canvas travels as a request's draft tokens, and each
step the sampler gets the logits of the canvas rows and says how many query tokens to keep.
Per request (one slot), the life of a block is:

* prefill done (no logits): the canvas starts as ``width`` [MASK] tokens;
* ``steps`` denoising steps: greedy x0 = argmax, confidence = softmax probability of x0 (float64, as in
  LLaDA's ``generate``), the most confident masked positions are unmasked on LLaDA's schedule
  (``get_num_transfer_tokens``: masks spread evenly over the steps, extras first). Nothing is kept
  (``num_rejected`` = query length): vLLM rolls the canvas' KV back;
* one commit step: the finished canvas runs once more, its KV is kept and its tokens are emitted
  (``num_sampled`` = width); the next block starts.

A canvas the scheduler cut short because the step's token budget ran out is computed again next step,
unchanged (a partial canvas attends to part of itself only). A canvas cut by max_model_len is the
final block, shorter: it is decoded at that width.

Greedy only (LLaDA's temperature 0): vLLM refuses temperature != 1 for dLLMs, and Gumbel noise
would need a per-request generator here. Per-request knobs honoured: ``extra_args`` ``diffusion_max_steps``
(steps per block, at most the served ``max_denoising_steps``) and ``diffusion_canvas_length``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.sample.output import SamplerOutput

logger = init_logger(f"vllm.{__name__}")

_IGNORED_KNOBS = ("diffusion_seed_canvas", "diffusion_pinned", "diffusion_read_only", "diffusion_constrained")


def transfer_counts(num_masks: int, steps: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens for one block: tokens unmasked at each step."""
    base, extra = divmod(num_masks, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


class LLaDABlockSampler:
    def __init__(
        self,
        sampler: Any,
        canvas_length: int,
        max_denoising_steps: int,
        mask_token_id: int,
        max_model_len: int,
        max_num_reqs: int,
        device: torch.device,
    ):
        self.req_states = sampler.req_states  # draft_tokens[slot, :width] is the next step's canvas
        self.sampling_states = sampler.sampling_states  # read by the runner's speculator path only
        self.penalties_state = SimpleNamespace(output_bin_counts=None)  # no penalties on this path
        self.compute_nans = False
        self.canvas_length = canvas_length
        self.max_steps = max_denoising_steps
        self.mask_id = mask_token_id
        self.max_model_len = max_model_len
        self.device = device
        self.canvas = torch.full((max_num_reqs, canvas_length), mask_token_id, dtype=torch.int64, device=device)
        self.width = np.full(max_num_reqs, canvas_length, dtype=np.int64)
        self.steps = np.full(max_num_reqs, max_denoising_steps, dtype=np.int64)
        self.step = np.zeros(max_num_reqs, dtype=np.int64)  # denoising steps taken in the current block
        self.committing = np.zeros(max_num_reqs, dtype=bool)
        self.schedule: list[list[int]] = [[] for _ in range(max_num_reqs)]
        self.num_recomputed_canvases = 0  # canvases the token budget cut short, computed again (a statistic)

    # ---- per request -----------------------------------------------------------------------------
    def add_request(self, slot: int, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        ignored = [k for k in _IGNORED_KNOBS if extra.get(k)]
        if ignored:
            logger.warning_once("LLaDADiffusionLM ignores the diffusion options %s", ignored)
        self.width[slot] = min(int(extra.get("diffusion_canvas_length") or self.canvas_length), self.canvas_length)
        steps = int(extra.get("diffusion_max_steps") or self.max_steps)
        if steps > self.max_steps:
            logger.warning_once("diffusion_max_steps above the served max_denoising_steps=%d is capped", self.max_steps)
        self.steps[slot] = max(1, min(steps, self.max_steps))

    def apply_staged_writes(self) -> None:
        return None

    def _new_canvas(self, slot: int) -> None:
        self.canvas[slot].fill_(self.mask_id)
        self.step[slot] = 0
        self.committing[slot] = False
        self.schedule[slot] = transfer_counts(int(self.width[slot]), int(self.steps[slot]))

    def _denoise(self, slot: int, logits: torch.Tensor) -> None:
        width = int(self.width[slot])
        canvas = self.canvas[slot, :width]
        x0 = logits.argmax(dim=-1)
        p = torch.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[:, None]).squeeze(-1)
        confidence = torch.where(canvas == self.mask_id, p, torch.full_like(p, -torch.inf))
        k = self.schedule[slot][self.step[slot]]
        if k > 0:
            idx = torch.topk(confidence, k).indices
            canvas[idx] = x0[idx]
        self.step[slot] += 1
        self.committing[slot] = self.step[slot] >= self.steps[slot]

    # ---- per step --------------------------------------------------------------------------------
    def __call__(self, logits: torch.Tensor, input_batch: InputBatch, draft_logits: Any = None) -> SamplerOutput:
        num_reqs = input_batch.num_reqs
        slots = input_batch.idx_mapping_np[:num_reqs]
        cu_logits = input_batch.cu_num_logits_np[: num_reqs + 1]
        query_lens = np.diff(input_batch.query_start_loc_np[: num_reqs + 1])
        sampled = torch.zeros(num_reqs, self.canvas_length, dtype=torch.int64, device=self.device)
        num_sampled = np.zeros(num_reqs, dtype=np.int32)
        num_rejected = np.zeros(num_reqs, dtype=np.int32)
        for i, slot in enumerate(slots.tolist()):
            start, n = int(cu_logits[i]), int(cu_logits[i + 1] - cu_logits[i])
            if n == 0:  # a prefill: its last chunk starts the first canvas
                computed = input_batch.num_computed_prefill_tokens_np[i] + input_batch.num_scheduled_tokens[i]
                if computed >= input_batch.prefill_len_np[i]:
                    self._new_canvas(slot)
                    self.req_states.draft_tokens[slot, : self.width[slot]] = self.canvas[slot, : self.width[slot]]
                continue
            num_rejected[i] = query_lens[i]  # default: keep nothing (a denoising step, or a retried one)
            width = int(self.width[slot])
            if n < width:
                if n < self.max_model_len - int(input_batch.num_computed_tokens_np[i]):
                    # cut by the step's token budget: compute the same canvas again next step
                    self.req_states.draft_tokens[slot, :width] = self.canvas[slot, :width]
                    self.num_recomputed_canvases += 1
                    continue
                # cut by max_model_len (from the block's first step on): a shorter final block
                self.width[slot] = width = n
                self.schedule[slot] = transfer_counts(width, int(self.steps[slot]))
            if self.committing[slot]:
                sampled[i, :width] = self.canvas[slot, :width]
                num_sampled[i], num_rejected[i] = width, query_lens[i] - width
                self._new_canvas(slot)
            else:
                self._denoise(slot, logits[start : start + width])
            width = int(self.width[slot])
            self.req_states.draft_tokens[slot, :width] = self.canvas[slot, :width]
        return SamplerOutput(
            sampled_token_ids=sampled,
            logprobs_tensors=None,
            num_nans=None,
            num_sampled=torch.from_numpy(num_sampled).to(self.device),
            num_rejected=torch.from_numpy(num_rejected).to(self.device),
        )
