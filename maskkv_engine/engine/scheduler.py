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

    @property
    def full_pass(self) -> bool:
        return self.plan.full_pass

    @property
    def capture(self) -> bool:
        return self.plan.capture

    @property
    def num_tokens(self) -> int:
        """Tokens this step computes (twice with classifier-free guidance)."""
        return self.plan.num_tokens * (2 if self.request.params.cfg_scale > 0 else 1)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)

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
    ):
        self.config = config
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
            item = ScheduledRequest(req, req.refresh_state.plan_step())
            if out.scheduled and out.num_tokens + item.num_tokens > budget:
                continue
            out.scheduled.append(item)
            self._last_run[req.request_id] = self._step
        return out

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

    def find(self, request_id: str) -> Request | None:
        for r in self.running:
            if r.request_id == request_id:
                return r
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        return None
