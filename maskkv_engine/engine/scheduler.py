"""Forms one batch per step from requests at different stages: new ones needing their first full pass
and running ones at any denoising step, each with its own lengths, schedule and KV budget.

Admission is FCFS: the oldest waiting request is admitted once its pages can be reserved, and no
younger request jumps ahead of it (a long prompt is never starved). Running requests share the token
budget least-recently-run first, so none is skipped twice in a row while others run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from maskkv_engine.config import SchedulerConfig
from maskkv_engine.engine.block_manager import BlockManager
from maskkv_engine.engine.request import Request, RequestStatus
from maskkv_engine.refresh.base import StepPlan


@dataclass
class ScheduledRequest:
    request: Request
    plan: StepPlan  # what the request computes this step (its refresh strategy decides)
    layers: tuple[int, int] | None = None  # a chunk of a long first pass: layers [start, end) only
    num_layers: int = 1

    @property
    def full_pass(self) -> bool:
        return self.plan.full_pass

    @property
    def capture(self) -> bool:
        return self.plan.capture

    @property
    def num_tokens(self) -> int:
        """Tokens this step computes (twice with classifier-free guidance); a layer chunk counts its
        share of the layers."""
        n = self.plan.num_tokens * (2 if self.request.params.cfg_scale > 0 else 1)
        if self.layers is None:
            return n
        return -(-n * (self.layers[1] - self.layers[0]) // self.num_layers)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    failed: list[tuple[Request, Exception]] = field(default_factory=list)  # planning raised: finish with an error

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager | None,
        caches_kv: bool,
        pages_needed: Callable[[Request], int],
        num_layers: int = 1,
    ):
        self.config = config
        self.num_layers = num_layers
        self.block_manager = block_manager
        self.caches_kv = caches_kv
        self.pages_needed = pages_needed
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._step = 0
        self._last_run: dict[str, int] = {}

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self._step += 1
        self._admit()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        order = sorted(self.running, key=lambda r: (self._last_run.get(r.request_id, -1), r.metrics.arrival_time))
        for req in order:
            try:
                plan = req.refresh_state.plan_step()
            except Exception as error:  # one request's broken state must not stop the others
                out.failed.append((req, error))
                continue
            item = ScheduledRequest(req, plan, num_layers=self.num_layers)
            left = budget - out.num_tokens
            if req.prefill is not None or (self._chunkable(item) and item.num_tokens > left):
                layers = self._layer_chunk(item, left, first=not out.scheduled)
                if layers is None:
                    continue
                item.layers = None if layers == (0, self.num_layers) else layers
            elif out.scheduled and item.num_tokens > left:
                continue
            out.scheduled.append(item)
            self._last_run[req.request_id] = self._step
        return out

    def _chunkable(self, item: ScheduledRequest) -> bool:
        """Only a cached policy's first pass is split: its pages fill layer by layer anyway."""
        return self.config.enable_chunked_prefill and item.plan.capture and item.request.params.cfg_scale == 0

    def _layer_chunk(self, item: ScheduledRequest, left: int, first: bool) -> tuple[int, int] | None:
        """The next layers of a (long) first pass that fit ``left`` tokens; at least one layer when the
        batch is still empty, so a prompt longer than the whole budget still advances."""
        req = item.request
        start = req.prefill.next_layer if req.prefill is not None else 0
        per_layer = item.plan.num_tokens / self.num_layers
        count = int(left // per_layer) if per_layer > 0 else self.num_layers
        if count < 1:
            if not first:
                return None
            count = 1
        return start, min(self.num_layers, start + count)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self.block_manager is not None and self.caches_kv:
                need = self.pages_needed(req)
                if not self.block_manager.can_reserve(need):
                    break  # FCFS: nobody overtakes the oldest waiting request
                self.block_manager.reserve(req.request_id, need)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and return every page it held."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._last_run.pop(request.request_id, None)
        if self.block_manager is not None:
            self.block_manager.free(request.request_id)
            if request.prefill is not None:  # aborted between two layer chunks: its full-layer KV is gone
                self.block_manager.set_transient_bytes(0)
        request.prefill = None

    def find(self, request_id: str) -> Request | None:
        for r in self.running:
            if r.request_id == request_id:
                return r
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        return None
