"""The per-request record at the bottom of the house: its tokens (prompt + response canvas), its status and
the state each contract keeps for it. It imports nothing from engine/, kv/, refresh/ or sampling/: the engine
fills the contract fields when it admits the request, and each contract reads only its own field.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import torch

from maskkv_engine.outputs import RequestMetrics
from maskkv_engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # annotations only: the record never imports the contracts at run time
    from maskkv_engine.kv.base import BudgetPlan, PolicyContext
    from maskkv_engine.refresh.base import RefreshState
    from maskkv_engine.sampling.denoise_state import DenoiseState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


class Request:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        mask_id: int,
        stop_token_ids: tuple[int, ...],
        logits_shift: bool,
        seed: int,
        kv_budget: int,
        device: torch.device,
        uses_cache: bool = True,
        num_layers: int = 0,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.mask_id = mask_id
        self.stop_token_ids = stop_token_ids
        self.eos_token_ids = stop_token_ids  # the model's own EOS ids, a subset (set by the engine)
        self.logits_shift = logits_shift
        self.kv_budget = kv_budget
        self.prompt_len = len(prompt_token_ids)
        self.tokens = torch.cat(
            [
                torch.tensor(prompt_token_ids, dtype=torch.long),
                torch.full((params.gen_length,), mask_id, dtype=torch.long),
            ]
        )
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.status = RequestStatus.WAITING
        self.num_layers = num_layers
        self.uses_cache = uses_cache  # False with kv_policy='none'
        self.kv_ready = False  # prompt KV written into pages (after the first full pass)
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.error: str | None = None  # set when a step that ran this request failed
        # ---- each contract's state, set by the engine when the request is added ----------------------
        self.state: DenoiseState | None = None  # decoding rule: where it stands in its schedule
        self.refresh_state: RefreshState | None = None  # refresh strategy: what each step recomputes
        self.policy_ctx: PolicyContext | None = None  # KV policy: the shape facts of this request
        self.kv_plan: BudgetPlan | None = None  # KV policy: budgets, None when decided online at the first pass
        self.collect_stats = False  # KV policy: measure layer importance / prompt preference online
        self.prefill: Any = None  # a first pass split over steps by layers: its progress (the runner's)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def n_cached(self) -> int:
        """Prompt positions whose KV may live in pages. Dream's last prompt token stays in the computed
        region: its hidden state predicts the first response token."""
        return self.prompt_len - (1 if self.logits_shift else 0)

    @property
    def response(self) -> torch.Tensor:
        return self.tokens[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.status.finished

    def output_token_ids(self) -> list[int]:
        """Generated tokens; with stop_at_eos, the first stop token and what follows are dropped.
        Positions still masked (an aborted request) are dropped too."""
        out = self.response.tolist()
        if self.params.stop_at_eos:
            for i, tok in enumerate(out):
                if tok in self.stop_token_ids:
                    out = out[:i]
                    break
        return [t for t in out if t != self.mask_id]

    def check_finished(self) -> bool:
        """After a step: finish when the schedule is done, or (stop_at_eos) when everything before the
        first committed stop token is committed, since committed tokens never change again."""
        if self.params.stop_at_eos and self.stop_token_ids:
            resp = self.response
            is_stop = torch.isin(resp, torch.tensor(self.stop_token_ids, dtype=torch.long))
            if bool(is_stop.any()):
                first = int(is_stop.nonzero()[0])
                if not bool((resp[:first] == self.mask_id).any()):
                    self.status = RequestStatus.FINISHED_STOPPED
                    return True
        if self.state.finished(self.tokens, self.mask_id) or self.metrics.num_steps >= self.max_steps:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    @property
    def max_steps(self) -> int:
        """A bound known in advance: a fixed schedule runs at most ``steps`` forward passes, and every other
        rule (threshold, factor, Elastic's window) commits at least one token per pass. A request that
        reaches it ends whatever the model outputs, so none can step forever."""
        return max(self.params.steps, self.params.gen_length)
