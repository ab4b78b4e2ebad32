"""The OpenAI routes' logic: request -> engine requests -> a response object or a stream of SSE chunks.

Kept free of HTTP details (the api_server module maps exceptions to status codes), so the same
object serves a plain uvicorn server and each Ray Serve replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from maskkv_engine.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    Denoising,
    DiffusionFields,
    ModelCard,
    ModelList,
    OpenAIError,
    UsageInfo,
    check_refresh_config,
    random_id,
)
from maskkv_engine.entrypoints.openai.settled import SettledText
from maskkv_engine.outputs import RequestOutput
from maskkv_engine.sampling_params import SamplingParams

MAX_SEED = 2**63 - 1


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


@dataclass
class SSEStream:
    """A streamed response: its SSE lines, and what to call when the response ends for any reason
    (a cancelled body iterator that never started would otherwise never abort its requests)."""

    body: AsyncIterator[str]
    on_close: Callable[[], None]


@dataclass
class _Job:
    """One prompt of a request: its engine stream and what its client has been sent so far."""

    stream: RequestStream
    settled: SettledText


class OpenAIServing:
    """max_tokens_limit: response tokens one HTTP request may ask for, summed over a batch's prompts
    (and the most denoising steps); default max_model_len. model_aliases: other ids accepted for the
    served model (e.g. the --model path), never shown."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str], max_tokens_limit: int | None = None,
                 model_aliases: Sequence[str] = ()):  # fmt: skip
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.model_aliases = {a: self.served_model_names[0] for a in model_aliases}
        self.max_model_len = engine.engine.max_model_len
        self.max_tokens_limit = self.max_model_len if max_tokens_limit is None else max_tokens_limit
        if not isinstance(self.max_tokens_limit, int) or self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit={max_tokens_limit!r} must be an integer >= 1")

    # ---- shared ------------------------------------------------------------------------------------
    def show_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=n, max_model_len=self.max_model_len) for n in self.served_model_names])

    def _check_model(self, request: DiffusionFields) -> None:
        """404 unless the request names a served model; an alias is replaced by the served name it stands for."""
        model = request.model
        if model in self.model_aliases:
            request.model = self.model_aliases[model]
        elif model not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def _check_batch(self, num_prompts: int) -> None:
        """A batch larger than the waiting queue would get 503 + Retry-After forever: say the limit instead."""
        limit = self.engine.max_queue_len
        if limit is not None and num_prompts > limit:
            raise OpenAIError(400, f"a batch of {num_prompts} prompts can never fit the waiting queue of this "
                              f"server (--max-queue-len {limit}): send at most {limit} per request", param="prompt")  # fmt: skip

    def _sampling_params(self, request: DiffusionFields, gen_length: int, num_prompts: int = 1) -> SamplingParams:
        if not 1 <= gen_length <= self.max_model_len:
            raise OpenAIError(400, f"max_tokens={gen_length} must be in [1, {self.max_model_len}]", param="max_tokens")
        limit = self.max_tokens_limit
        if gen_length * num_prompts > limit:
            asked = f"max_tokens={gen_length}" + (f" x {num_prompts} prompts" if num_prompts > 1 else "")
            raise OpenAIError(400, f"{asked} exceeds this server's limit of {limit} response tokens per request "
                              "(--max-tokens-limit)", param="max_tokens")  # fmt: skip
        if request.steps is not None and not 1 <= request.steps <= min(self.max_model_len, limit):
            raise OpenAIError(400, f"steps={request.steps} must be in [1, {min(self.max_model_len, limit)}]",
                              param="steps")  # fmt: skip
        if request.refresh is not None or request.refresh_config is not None:
            check_refresh_config(request.refresh or self.engine.engine.config.refresh, request.refresh_config or {})
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise OpenAIError(400, f"seed={request.seed} must be in [0, 2**63 - 1]", param="seed")
        if request.kv_budget is not None and request.kv_budget > self.max_model_len:
            raise OpenAIError(400, f"kv_budget={request.kv_budget} exceeds max_model_len", param="kv_budget")
        try:
            return request.to_sampling_params(gen_length)
        except (ValueError, TypeError) as e:
            raise OpenAIError(400, str(e)) from e

    async def _start(self, base_id: str, prompts: list, params: SamplingParams) -> list[_Job]:
        """Hand every prompt to the engine at once; all or nothing, so a bad one is a 400 before any stream."""
        engine = self.engine.engine
        ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        adds = [asyncio.ensure_future(self.engine.add_request(rid, p, params)) for rid, p in zip(ids, prompts)]
        try:
            results = await asyncio.gather(*adds, return_exceptions=True)
        except asyncio.CancelledError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for rid in ids:
                self.engine.abort(rid)
            if isinstance(errors[0], (ValueError, TypeError)):  # the engine refused a prompt or the parameters
                raise OpenAIError(400, str(errors[0])) from errors[0]
            raise errors[0]
        mask, stops = engine.model_config.mask_token_id, engine.stop_token_ids
        return [_Job(s, SettledText(self.engine.tokenizer, mask, stops, params.stop_at_eos)) for s in results]

    async def _outputs(self, jobs: list[_Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every job's outputs, interleaved as they come; leaving early aborts what is unfinished."""
        pending: dict[asyncio.Task, int] = {}
        try:
            for i, job in enumerate(jobs):
                pending[asyncio.ensure_future(anext(job.stream, None))] = i
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=pending.__getitem__):
                    i = pending.pop(task)
                    out = task.result()
                    if out is None:
                        continue
                    yield i, out
                    if not out.finished:
                        pending[asyncio.ensure_future(anext(jobs[i].stream, None))] = i
        finally:
            for task in pending:
                task.cancel()
            self.abort(jobs)

    def abort(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if not job.stream.finished:
                self.engine.abort(job.stream.request_id)

    def _denoising(self, out: RequestOutput) -> Denoising:
        mask = self.engine.engine.model_config.mask_token_id
        masked = sum(1 for t in out.canvas_token_ids or [] if t == mask)
        return Denoising(step=out.metrics.num_steps, canvas=out.canvas_text or "", num_masked=masked)

    @staticmethod
    def _usage(finals: dict[int, RequestOutput]) -> UsageInfo:
        prompt = sum(len(o.prompt_token_ids) for o in finals.values())
        completion = sum(len(o.outputs[0].token_ids) for o in finals.values())
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # ---- /v1/completions ---------------------------------------------------------------------------
    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | SSEStream:
        """The response, or with ``stream: true`` its SSE chunks."""
        self._check_model(request)
        try:
            prompts = request.prompts()
        except ValueError as e:
            raise OpenAIError(400, str(e), param="prompt") from e
        self._check_batch(len(prompts))
        params = self._sampling_params(request, request.gen_length, len(prompts))
        base_id = random_id("cmpl")
        jobs = await self._start(base_id, prompts, params)
        if request.stream:
            return SSEStream(self._completion_stream(request, base_id, jobs), lambda: self.abort(jobs))
        finals = await self._collect(jobs)
        choices = [
            CompletionChoice(index=i, text=o.outputs[0].text, finish_reason=o.outputs[0].finish_reason)
            for i, o in sorted(finals.items())
        ]
        return CompletionResponse(id=base_id, model=request.model, choices=choices, usage=self._usage(finals))

    def _completion_stream(self, request: CompletionRequest, base_id: str, jobs: list[_Job]) -> AsyncIterator[str]:
        def chunk(i: int, text: str, finish_reason: str | None, denoising: Denoising | None) -> BaseModel:
            choice = CompletionChoice(index=i, text=text, finish_reason=finish_reason, denoising=denoising)
            return CompletionResponse(id=base_id, model=request.model, choices=[choice])

        def usage(u: UsageInfo) -> BaseModel:
            return CompletionResponse(id=base_id, model=request.model, choices=[], usage=u)

        return self._stream(request, jobs, None, chunk, usage)

    # ---- /v1/chat/completions ----------------------------------------------------------------------
    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | SSEStream:
        self._check_model(request)
        ids = self._apply_chat_template(request)
        prompt = {"prompt_token_ids": ids, "prompt": None}
        room = min(self.max_model_len - len(ids), self.max_tokens_limit)
        params = self._sampling_params(request, request.gen_length(room))
        base_id = random_id("chatcmpl")
        jobs = await self._start(base_id, [prompt], params)
        if request.stream:
            return SSEStream(self._chat_stream(request, base_id, jobs), lambda: self.abort(jobs))
        finals = await self._collect(jobs)
        out = finals[0].outputs[0]
        choice = ChatChoice(index=0, message=ChatResponseMessage(content=out.text), finish_reason=out.finish_reason)
        return ChatCompletionResponse(id=base_id, model=request.model, choices=[choice], usage=self._usage(finals))

    def _apply_chat_template(self, request: ChatCompletionRequest) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise OpenAIError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            ids = tok.apply_chat_template(request.conversation(), add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template that rejects the conversation (roles out of order, ...)
            raise OpenAIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        if not isinstance(ids, list):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _chat_stream(self, request: ChatCompletionRequest, base_id: str, jobs: list[_Job]) -> AsyncIterator[str]:
        def chunk(i: int, text: str, finish_reason: str | None, denoising: Denoising | None) -> BaseModel:
            choice = ChatChunkChoice(index=i, delta=DeltaMessage(content=text), finish_reason=finish_reason,
                                     denoising=denoising)  # fmt: skip
            return ChatCompletionChunk(id=base_id, model=request.model, choices=[choice])

        def usage(u: UsageInfo) -> BaseModel:
            return ChatCompletionChunk(id=base_id, model=request.model, choices=[], usage=u)

        first = ChatCompletionChunk(
            id=base_id,
            model=request.model,
            choices=[ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
        )
        return self._stream(request, jobs, first, chunk, usage)

    # ---- helpers -----------------------------------------------------------------------------------
    async def _stream(self, request: DiffusionFields, jobs: list[_Job], first: BaseModel | None,
                      chunk: Callable[..., BaseModel], usage: Callable[[UsageInfo], BaseModel]) -> AsyncIterator[str]:  # fmt: skip
        """The SSE lines of a streamed request: newly settled text per output (or every denoising step),
        the finish reason on the last chunk, usage, [DONE]. A failed step sends an error event, then [DONE]."""
        finals: dict[int, RequestOutput] = {}

        def line(body: BaseModel) -> str:
            return sse(body.model_dump_json(exclude_none=True))

        try:
            if first is not None:
                yield line(first)
            async with contextlib.aclosing(self._outputs(jobs)) as outputs:
                async for i, out in outputs:
                    failure = engine_failure(out)
                    if failure is not None:
                        yield sse(_stream_error(step_error(failure)))
                        yield sse("[DONE]")
                        return
                    settled = jobs[i].settled
                    if out.finished:
                        finals[i] = out
                        final = out.outputs[0]
                        yield line(chunk(i, settled.finish(final.text), final.finish_reason, None))
                        continue
                    text = settled.update(out.canvas_token_ids or [])
                    if request.include_denoising:
                        yield line(chunk(i, text, None, self._denoising(out)))
                    elif text:
                        yield line(chunk(i, text, None, None))
            if request.include_usage:
                yield line(usage(self._usage(finals)))
        except Exception as e:  # the engine failed mid-stream: the status line is already sent
            yield sse(_stream_error(e))
        yield sse("[DONE]")

    async def _collect(self, jobs: list[_Job]) -> dict[int, RequestOutput]:
        """Every job's final output; a step that failed on one of them is this request's 500."""
        finals: dict[int, RequestOutput] = {}
        try:
            async with contextlib.aclosing(self._outputs(jobs)) as outputs:
                async for i, out in outputs:
                    failure = engine_failure(out)
                    if failure is not None:
                        raise step_error(failure)
                    if out.finished:
                        finals[i] = out
        except (OpenAIError, EngineDeadError):
            raise
        except Exception as e:  # an engine that fails a step by raising into the streams
            raise step_error(f"{type(e).__name__}: {e}") from e
        return finals


def engine_failure(out: RequestOutput) -> str | None:
    """The message of an output the engine finished with an error (a step that raised), else None."""
    if out.finished and out.outputs and out.outputs[0].finish_reason == "error":
        return getattr(out, "error", None) or "the engine step failed"
    return None


def step_error(message: str) -> OpenAIError:
    return OpenAIError(500, f"the engine failed while running this request: {message}", type="server_error",
                       code="engine_error")  # fmt: skip


def _stream_error(e: Exception) -> str:
    """The error event of a stream whose status line is already sent (OpenAI's error shape)."""
    if isinstance(e, OpenAIError):
        return e.body.model_dump_json()
    if not isinstance(e, EngineDeadError):
        e = step_error(f"{type(e).__name__}: {e}")
        return e.body.model_dump_json()
    return json.dumps({"error": {"message": str(e), "type": "server_error", "param": None, "code": "engine_dead"}})
