"""Forms one batch per step from requests at different stages, and applies each step's results.

``schedule()`` picks new requests needing their first full pass and running ones at any denoising step, each
with its own lengths, schedule and KV budget. ``update_from_output()`` applies what the runner computed:
commits (the sampler), refresh bookkeeping, finishing, freeing. The scheduler owns the block manager and
the KV planner; nothing below it calls back up.

Admission is FCFS: the oldest waiting request is admitted once its pages can be reserved, and no
younger request jumps ahead of it (a long prompt is never starved). Running requests share the token
budget least-recently-run first, so none is skipped twice in a row while others run.

Fail-safe: an error while planning, computing or applying one request's step finishes that request with
``finish_reason='error'`` and frees what it held; a failed forward pass fails the requests it held.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from maskkv_engine.config import SchedulerConfig
from maskkv_engine.engine.block_manager import BlockManager
from maskkv_engine.kv.planner import KVPlanner
from maskkv_engine.refresh.base import StepPlan
from maskkv_engine.request import Request, RequestStatus
from maskkv_engine.sampling.guidance import num_branches
from maskkv_engine.sampling.sampler import Sampler

logger = logging.getLogger(__name__)


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
        n = self.plan.num_tokens * num_branches(self.request.params.cfg_scale)
        if self.layers is None:
            return n
        return -(-n * (self.layers[1] - self.layers[0]) // self.num_layers)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    failed: list[tuple[Request, Exception]] = field(default_factory=list)  # planning raised: finish with an error
    time: float = 0.0  # when the step was scheduled (time.monotonic())

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass
class StepFailure:
    """The runner's result for a request whose forward pass raised."""

    error: Exception


@dataclass
class SchedulerUpdate:
    """What a step did: every request it stepped (finished or not), and those it finished."""

    stepped: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager | None,
        planner: KVPlanner,
        sampler: Sampler,
        num_layers: int,
        stop_check: Callable[[Request], bool] = lambda req: False,
    ):
        """``stop_check``: a condition the scheduler cannot see (stop strings need the tokenizer)."""
        self.config = config
        self.num_layers = num_layers
        self.block_manager = block_manager
        self.planner = planner
        self.sampler = sampler
        self.stop_check = stop_check
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._step = 0
        self._last_run: dict[str, int] = {}

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self._step += 1
        out = SchedulerOutput(time=time.monotonic())
        for req in self.running:
            # never before the first pass has run: it is needed anyway, and skipping ahead of it would make
            # the schedule depend on when the request got its first step (batching, layer-split prefill)
            if req.metrics.num_steps > 0:
                self._guard(out, req, req.state.skip_empty_steps, req.tokens, req.mask_id)
        self._admit()
        budget = self.config.max_num_batched_tokens
        failed = {id(r) for r, _ in out.failed}
        order = sorted(self.running, key=lambda r: (self._last_run.get(r.request_id, -1), r.metrics.arrival_time))
        for req in order:
            if id(req) in failed:
                continue
            plan = self._guard(out, req, req.refresh_state.plan_step)
            if plan is None:  # its state raised: it fails alone, the others go on
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
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = out.time
        return out

    @staticmethod
    def _guard(out: SchedulerOutput, req: Request, fn, *args):
        """``fn(*args)``; if it raises, the request is recorded as failed (and None returned)."""
        try:
            return fn(*args)
        except Exception as error:
            out.failed.append((req, error))
            return None

    # ---- applying a step's results ---------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, results: list) -> SchedulerUpdate:
        """Apply the runner's result for each scheduled request (None: a layer chunk, nothing to commit)."""
        update = SchedulerUpdate()
        for req, error in out.failed:
            self._fail(req, error, update)
        done = time.monotonic()
        chosen = []  # (item, result, the sampler's choice still on the device)
        for item, result in zip(out.scheduled, results):
            if result is None:
                continue
            if isinstance(result, StepFailure):
                self._fail(item.request, result.error, update)
                continue
            try:
                chosen.append((item, result, self.sampler.choose(item.request, result.logits)))
            except Exception as error:  # this request's own rule: it alone ends
                self._fail(item.request, error, update)
        host = self.sampler.to_host([choice for _, _, choice in chosen])  # the step's one read of the device
        for (item, result, _), picked in zip(chosen, host):
            try:
                self._apply(item, result, picked, out.time, done, update)
            except Exception as error:  # this request's own bookkeeping: it alone ends
                self._fail(item.request, error, update)
        if self.block_manager is not None and any(isinstance(r, StepFailure) for r in results):
            self.block_manager.set_transient_bytes(0)  # the failed pass's full-layer KV is gone
        return update

    def _apply(
        self, item: ScheduledRequest, result, picked, scheduled: float, done: float, update: SchedulerUpdate
    ) -> None:
        req = item.request
        m = req.metrics
        m.num_steps += 1
        if item.full_pass:
            m.num_full_passes += 1
            if m.prefill_time is None:  # from its first chunk when the pass was split
                m.prefill_time = done - (m.first_scheduled_time if item.layers is not None else scheduled)
        if item.capture:
            req.kv_ready = True
        if self.block_manager is not None:
            m.kv_pages_peak = max(m.kv_pages_peak, self.block_manager.request_pages(req.request_id))
        committed = self.sampler.write(req, result.positions, *picked, result.logits)
        m.committed_per_step.append(int(committed.numel()))
        state = req.refresh_state
        state.after_step(self.num_layers, committed)
        m.layers_recomputed, m.layers_total = state.layers_recomputed, state.layers_total
        update.stepped.append(req)
        if req.check_finished() or self.stop_check(req):
            self.finish(req)
            update.finished.append(req)

    def _fail(self, req: Request, error: Exception, update: SchedulerUpdate) -> None:
        logger.error("request %r failed: %s: %s", req.request_id, type(error).__name__, error, exc_info=error)
        req.status = RequestStatus.FINISHED_ERROR
        req.error = f"{type(error).__name__}: {error}"
        self.finish(req)
        update.stepped.append(req)
        update.finished.append(req)

    # ---- admission ---------------------------------------------------------------------------------
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
            if self.block_manager is not None:
                need = self.planner.pages_needed(req.policy_ctx, req.kv_plan)
                if not self.block_manager.can_reserve(need):
                    break  # FCFS: nobody overtakes the oldest waiting request
                self.block_manager.reserve(req.request_id, need)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free everything it holds. False if it is unknown or done."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        req.status = RequestStatus.FINISHED_ABORTED
        self.finish(req)
        return True

    def finish(self, request: Request) -> None:
        """Remove a finished, failed or aborted request and return every page it held."""
        request.metrics.finished_time = time.monotonic()
        self.requests.pop(request.request_id, None)
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
        return self.requests.get(request_id)
