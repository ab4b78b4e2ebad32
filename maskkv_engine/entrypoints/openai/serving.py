"""The OpenAI routes' logic: request -> engine requests -> a response object or a stream of SSE chunks.

Kept free of HTTP details (the api_server module maps exceptions to status codes), so the same
object serves a plain uvicorn server and each Ray Serve replica.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine, RequestStream
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
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
    random_id,
)
from maskkv_engine.entrypoints.openai.settled import SettledText
from maskkv_engine.outputs import RequestOutput
from maskkv_engine.sampling_params import SamplingParams

MAX_SEED = 2**63 - 1


class OpenAIError(Exception):
    """An error the client caused (or a full queue): becomes an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))


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
    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str]):
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.max_model_len = engine.engine.max_model_len

    # ---- shared ------------------------------------------------------------------------------------
    def show_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=n, max_model_len=self.max_model_len) for n in self.served_model_names])

    def _check_model(self, model: str) -> None:
        if model not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def _sampling_params(self, request: DiffusionFields, gen_length: int) -> SamplingParams:
        if not 1 <= gen_length <= self.max_model_len:
            raise OpenAIError(400, f"max_tokens={gen_length} must be in [1, {self.max_model_len}]", param="max_tokens")
        if request.steps is not None and not 1 <= request.steps <= self.max_model_len:
            raise OpenAIError(400, f"steps={request.steps} must be in [1, {self.max_model_len}]", param="steps")
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
        self._check_model(request.model)
        try:
            prompts = request.prompts()
        except ValueError as e:
            raise OpenAIError(400, str(e), param="prompt") from e
        params = self._sampling_params(request, request.gen_length)
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

    async def _completion_stream(
        self, request: CompletionRequest, base_id: str, jobs: list[_Job]
    ) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}

        def chunk(choice: CompletionChoice) -> str:
            return sse(
                CompletionResponse(id=base_id, model=request.model, choices=[choice]).model_dump_json(exclude_none=True)
            )

        try:
            async for i, out in self._outputs(jobs):
                settled = jobs[i].settled
                if out.finished:
                    finals[i] = out
                    text = settled.finish(out.outputs[0].text)
                    yield chunk(CompletionChoice(index=i, text=text, finish_reason=out.outputs[0].finish_reason))
                    continue
                text = settled.update(out.canvas_token_ids or [])
                if request.include_denoising:
                    yield chunk(CompletionChoice(index=i, text=text, denoising=self._denoising(out)))
                elif text:
                    yield chunk(CompletionChoice(index=i, text=text))
            if request.include_usage:
                usage = CompletionResponse(id=base_id, model=request.model, choices=[], usage=self._usage(finals))
                yield sse(usage.model_dump_json(exclude_none=True))
        except Exception as e:  # the engine failed mid-stream: the status line is already sent
            yield sse(_stream_error(e))
        yield sse("[DONE]")

    # ---- /v1/chat/completions ----------------------------------------------------------------------
    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | SSEStream:
        self._check_model(request.model)
        ids = self._apply_chat_template(request)
        prompt = {"prompt_token_ids": ids, "prompt": None}
        params = self._sampling_params(request, request.gen_length(self.max_model_len - len(ids)))
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

    async def _chat_stream(self, request: ChatCompletionRequest, base_id: str, jobs: list[_Job]) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}

        def chunk(choice: ChatChunkChoice) -> str:
            body = ChatCompletionChunk(id=base_id, model=request.model, choices=[choice])
            return sse(body.model_dump_json(exclude_none=True))

        try:
            yield chunk(ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content="")))
            async for i, out in self._outputs(jobs):
                settled = jobs[i].settled
                if out.finished:
                    finals[i] = out
                    text = settled.finish(out.outputs[0].text)
                    yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(content=text),
                                                finish_reason=out.outputs[0].finish_reason))  # fmt: skip
                    continue
                text = settled.update(out.canvas_token_ids or [])
                if request.include_denoising:
                    yield chunk(
                        ChatChunkChoice(index=i, delta=DeltaMessage(content=text), denoising=self._denoising(out))
                    )
                elif text:
                    yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(content=text)))
            if request.include_usage:
                body = ChatCompletionChunk(id=base_id, model=request.model, choices=[], usage=self._usage(finals))
                yield sse(body.model_dump_json(exclude_none=True))
        except Exception as e:
            yield sse(_stream_error(e))
        yield sse("[DONE]")

    # ---- helpers -----------------------------------------------------------------------------------
    async def _collect(self, jobs: list[_Job]) -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for i, out in self._outputs(jobs):
            if out.finished:
                finals[i] = out
        return finals


def _stream_error(e: Exception) -> str:
    return json.dumps({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
