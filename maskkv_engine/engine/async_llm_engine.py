"""AsyncLLMEngine: many concurrent asyncio callers share one LLMEngine batch.

One background task owns the engine. Between steps it applies queued adds and aborts; the step itself
(CPU- or GPU-bound, synchronous) runs in a dedicated worker thread so the event loop keeps serving
HTTP while the model computes. Every engine call happens in that order, never concurrently, so the
engine needs no locks. Each request gets its own output stream; a caller that stops listening
(a client that disconnects cancels its task) aborts the request, and its pages are freed before
the next step starts.

All public methods must be called from the event loop that runs the engine (the server's loop).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from maskkv_engine.config import EngineConfig
from maskkv_engine.engine.llm_engine import LLMEngine, PromptType
from maskkv_engine.outputs import RequestOutput
from maskkv_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_queue_len``: the caller should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The stepping loop stopped on an unexpected error; no request can make progress."""


@dataclass
class StepStats:
    """One engine step, as the metrics see it. Times in seconds."""

    latency: float
    num_requests: int
    finished: list[RequestOutput]


class RequestStream:
    """The outputs of one request, in step order; ends after the finished output (or an error)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        if self.finished:
            return
        if isinstance(item, BaseException) or item.finished:
            self.finished = True
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass
class _NewRequest:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    arrival_time: float
    accepted: asyncio.Future[RequestStream]


class AsyncLLMEngine:
    """asyncio front of an LLMEngine: ``generate()`` yields a request's outputs, one per step.

    max_queue_len: requests allowed to wait for admission (not yet running); beyond it
    ``add_request`` raises QueueFullError instead of queueing without bound. None = unbounded.
    """

    def __init__(self, engine: LLMEngine, max_queue_len: int | None = None):
        if max_queue_len is not None and (not isinstance(max_queue_len, int) or max_queue_len < 0):
            raise ValueError(f"max_queue_len={max_queue_len!r} must be an integer >= 0 or None")
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self._streams: dict[str, RequestStream] = {}
        self._new: list[_NewRequest] = []
        self._aborts: set[str] = set()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        # One thread: steps never overlap, and the engine only ever runs on it or between its steps.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskkv-step")

    @classmethod
    def from_engine_args(cls, model: str, max_queue_len: int | None = None, **engine_kwargs: Any) -> AsyncLLMEngine:
        """Build from the same flat keyword arguments as ``LLM`` (kv_policy, kv_budget, max_num_seqs, ...)."""
        return cls(LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs)), max_queue_len)

    # ---- state the server reports ------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted: queued here for the next step, or in the scheduler's waiting queue."""
        return len(self._new) + len(self.engine.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._dead!r}") from self._dead

    # ---- requests ----------------------------------------------------------------------------------
    async def add_request(
        self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None
    ) -> RequestStream:
        """Queue a request and return its stream once the engine has accepted it.

        The engine validates it between two steps; a bad prompt or parameter raises its ValueError /
        TypeError here, so a server can answer 400 before it starts a stream.
        """
        self.check_health()
        if request_id in self._streams or any(r.request_id == request_id for r in self._new):
            raise ValueError(f"request_id={request_id!r} is already in use")
        if self.max_queue_len is not None and self.num_waiting >= self.max_queue_len:
            raise QueueFullError(f"the waiting queue is full ({self.max_queue_len} requests): retry later")
        self._ensure_loop()
        accepted: asyncio.Future[RequestStream] = asyncio.get_running_loop().create_future()
        params = sampling_params or SamplingParams()
        self._new.append(_NewRequest(request_id, prompt, params, time.monotonic(), accepted))
        self._wakeup.set()
        try:
            return await accepted
        except asyncio.CancelledError:
            # cancelled after the engine took it, but before the caller got the stream: nobody will read it
            if accepted.done() and not accepted.cancelled() and accepted.exception() is None:
                self.abort(request_id)
            raise

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after each of its steps (canvas included); the last is finished.

        Leaving the loop early, or cancelling the task that iterates, aborts the request.
        """
        stream = await self.add_request(request_id, prompt, sampling_params)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its pages are returned before the next step. Unknown or finished ids are ignored."""
        for i, new in enumerate(self._new):
            if new.request_id == request_id:
                del self._new[i]
                if not new.accepted.done():
                    new.accepted.cancel()
                return
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        stream.finished = True
        self._aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    # ---- the loop ----------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self.is_running:
            return
        self.check_health()
        self._wakeup = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="maskkv-engine-loop")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._apply_aborts()
                self._apply_new()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.clear()
                    if not self._new and not self._aborts:
                        await self._wakeup.wait()
                    continue
                start = time.perf_counter()
                try:
                    outputs = await loop.run_in_executor(self._executor, self.engine.step, True)
                except Exception as e:  # a failing step fails its requests, not the server
                    logger.exception("engine step failed; aborting the %d requests in flight", len(self._streams))
                    self._fail_all(e)
                    continue
                latency = time.perf_counter() - start
                finished = self._dispatch(outputs)
                stats = StepStats(latency, len(outputs), finished)
                for listener in self.step_listeners:
                    listener(stats)
                await asyncio.sleep(0)  # let handlers run between back-to-back steps
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._dead = e
            logger.exception("the engine loop stopped")
            self._fail_all(EngineDeadError(f"the engine loop stopped: {e!r}"))
            raise

    def _apply_aborts(self) -> None:
        while self._aborts:
            self.engine.abort_request(self._aborts.pop())

    def _apply_new(self) -> None:
        new, self._new = self._new, []
        for item in new:
            if item.accepted.done():  # the caller went away while it was queued
                continue
            try:
                self.engine.add_request(item.request_id, item.prompt, item.params, item.arrival_time)
            except Exception as e:
                item.accepted.set_exception(e)
                continue
            stream = RequestStream(item.request_id)
            self._streams[item.request_id] = stream
            item.accepted.set_result(stream)

    def _dispatch(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        finished = []
        for out in outputs:
            # the engine keeps updating a request's metrics object while the next step runs: snapshot it
            out.metrics = copy.copy(out.metrics)
            if out.finished:
                finished.append(out)
                stream = self._streams.pop(out.request_id, None)
            else:
                stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
        return finished

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.put(error)
        self._streams.clear()
        for item in self._new:
            if not item.accepted.done():
                item.accepted.set_exception(error)
        self._new.clear()

    async def shutdown(self) -> None:
        """Stop the loop, wait for a step in flight, and fail what is still open."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        self._dead = EngineDeadError("the engine was shut down")
        self._fail_all(self._dead)
