"""The OpenAI routes' logic: request -> engine requests -> a response object or a stream of SSE chunks.

Kept free of HTTP details (the api_server module maps exceptions to status codes), so the same
object serves a plain uvicorn server and each Ray Serve replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel

from maskkv_engine import __version__
from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from maskkv_engine.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs
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
    DetokenizeRequest,
    DetokenizeResponse,
    DiffusionFields,
    ModelCard,
    ModelList,
    OpenAIError,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
    check_refresh_config,
    random_id,
)
from maskkv_engine.entrypoints.openai.settled import SettledText
from maskkv_engine.outputs import CompletionOutput, RequestOutput
from maskkv_engine.sampling_params import SamplingParams

MAX_SEED = 2**63 - 1
# what a request field is called in the engine's errors -> its name in the request body
_ENGINE_NAMES = {"gen_length": "max_tokens", "prompt_token_ids": "prompt"}


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
    started: bool = field(default=False)  # an output has arrived (the request left the queue)


def param_of(message: str, fields: Sequence[str]) -> str | None:
    """The request field an engine error is about: ``SamplingParams.block_length=3 ...`` -> block_length,
    ``prompt (5000 tokens) ...`` -> prompt; None when the message names none."""
    m = re.match(r"(?:SamplingParams\.)?(\w+)", message)
    if m is None:
        return None
    name = _ENGINE_NAMES.get(m.group(1), m.group(1))
    return name if name in fields else None


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
        # which build answered: the engine version and the KV policy change what a seed gives
        self.system_fingerprint = f"fp_maskkv-{__version__}-{engine.engine.config.kv_policy}"
        self.abort_listeners: list[Callable[[], None]] = []  # once per request aborted while it ran or waited
        self.start_listeners: list[Callable[[RequestOutput], None]] = []  # a request's first step

    # ---- shared ------------------------------------------------------------------------------------
    def show_models(self) -> ModelList:
        return ModelList(data=[self._card(n) for n in self.served_model_names])

    def show_model(self, model_id: str) -> ModelCard:
        name = self.model_aliases.get(model_id, model_id)
        if name not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return self._card(name)

    def _card(self, name: str) -> ModelCard:
        return ModelCard(id=name, max_model_len=self.max_model_len)

    def _check_model(self, request: DiffusionFields | TokenizeRequest | DetokenizeRequest) -> None:
        """404 unless the request names a served model; an alias (or no model, when one is served) becomes
        the served name."""
        model = request.model
        if model is None:
            if len(self.served_model_names) != 1:
                raise OpenAIError(
                    400, f"model is required: this server serves {self.served_model_names}", param="model"
                )
            request.model = self.served_model_names[0]
        elif model in self.model_aliases:
            request.model = self.model_aliases[model]
        elif model not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def _check_request(self, request: DiffusionFields) -> None:
        self._check_model(request)
        request.check_supported()

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
        if gen_length * num_prompts * request.n > limit:
            asked = f"max_tokens={gen_length}" + (f" x {num_prompts} prompts" if num_prompts > 1 else "")
            asked += f" x n={request.n}" if request.n > 1 else ""
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
            raise OpenAIError(400, str(e), param=param_of(str(e), list(type(request).model_fields))) from e

    async def _start(self, base_id: str, prompts: list, params: SamplingParams, fields: Sequence[str]) -> list[_Job]:
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
                raise OpenAIError(400, str(errors[0]), param=param_of(str(errors[0]), fields)) from errors[0]
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
                    if not jobs[i].started:
                        jobs[i].started = True
                        for listener in self.start_listeners:
                            listener(out)
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
                for listener in self.abort_listeners:
                    listener()

    def _denoising(self, out: RequestOutput) -> Denoising:
        mask = self.engine.engine.model_config.mask_token_id
        masked = sum(1 for t in out.canvas_token_ids or [] if t == mask)
        return Denoising(step=out.metrics.num_steps, canvas=out.canvas_text or "", num_masked=masked)

    @staticmethod
    def _usage(finals: dict[int, RequestOutput]) -> UsageInfo:
        prompt = sum(len(o.prompt_token_ids) for o in finals.values())
        completion = sum(len(c.token_ids) for o in finals.values() for c in o.outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _decode_one(self, token_id: int) -> str:
        tok = self.engine.tokenizer
        return "" if tok is None else tok.decode([token_id])

    def _choices(
        self, request: DiffusionFields, finals: dict[int, RequestOutput]
    ) -> list[tuple[int, CompletionOutput]]:
        """(choice index, output) of every sample, as vLLM numbers them: prompt i's sample j is i * n + j."""
        return [(i * request.n + c.index, c) for i, o in sorted(finals.items()) for c in o.outputs]

    # ---- /v1/completions ---------------------------------------------------------------------------
    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | SSEStream:
        """The response, or with ``stream: true`` its SSE chunks."""
        self._check_request(request)
        try:
            prompts = request.prompts()
        except ValueError as e:
            raise OpenAIError(400, str(e), param="prompt") from e
        self._check_batch(len(prompts))
        params = self._sampling_params(request, request.gen_length, len(prompts))
        base_id = random_id("cmpl")
        jobs = await self._start(base_id, prompts, params, list(CompletionRequest.model_fields))
        if request.stream:
            return SSEStream(self._completion_stream(request, base_id, jobs), lambda: self.abort(jobs))
        finals = await self._collect(jobs)
        choices = [self._completion_choice(request, index, c, c.text) for index, c in self._choices(request, finals)]
        return CompletionResponse(id=base_id, model=request.model, system_fingerprint=self.system_fingerprint,
                                  choices=choices, usage=self._usage(finals))  # fmt: skip

    def _completion_choice(
        self, request: CompletionRequest, index: int, c: CompletionOutput, text: str
    ) -> CompletionChoice:
        k = request.logprobs_k
        lps = None if k is None else completion_logprobs(c.token_ids, getattr(c, "logprobs", None), k, self._decode_one)
        return CompletionChoice(index=index, text=text, logprobs=lps, finish_reason=c.finish_reason,
                                stop_reason=getattr(c, "stop_reason", None))  # fmt: skip

    def _completion_stream(self, request: CompletionRequest, base_id: str, jobs: list[_Job]) -> AsyncIterator[str]:
        def wrap(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> BaseModel:
            return CompletionResponse(id=base_id, model=request.model, system_fingerprint=self.system_fingerprint,
                                      choices=choices, usage=usage)  # fmt: skip

        def partial(i: int, text: str, denoising: Denoising | None) -> BaseModel:
            return wrap([CompletionChoice(index=i, text=text, denoising=denoising)])

        def final(index: int, c: CompletionOutput, text: str) -> BaseModel:
            return wrap([self._completion_choice(request, index, c, text)])

        return self._stream(request, jobs, None, partial, final, lambda u: wrap([], u))

    # ---- /v1/chat/completions ----------------------------------------------------------------------
    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | SSEStream:
        self._check_request(request)
        ids = self._apply_chat_template(request.conversation(), True)
        prompt = {"prompt_token_ids": ids, "prompt": None}
        room = min(self.max_model_len - len(ids), self.max_tokens_limit // request.n)
        params = self._sampling_params(request, request.gen_length(room))
        base_id = random_id("chatcmpl")
        jobs = await self._start(base_id, [prompt], params, list(ChatCompletionRequest.model_fields))
        if request.stream:
            return SSEStream(self._chat_stream(request, base_id, jobs), lambda: self.abort(jobs))
        finals = await self._collect(jobs)
        choices = [
            ChatChoice(
                index=index,
                message=ChatResponseMessage(content=c.text),
                logprobs=self._chat_logprobs(request, c),
                finish_reason=c.finish_reason,
                stop_reason=getattr(c, "stop_reason", None),
            )  # fmt: skip
            for index, c in self._choices(request, finals)
        ]
        return ChatCompletionResponse(id=base_id, model=request.model, system_fingerprint=self.system_fingerprint,
                                      choices=choices, usage=self._usage(finals))  # fmt: skip

    def _chat_logprobs(self, request: ChatCompletionRequest, c: CompletionOutput):
        k = request.logprobs_k
        return None if k is None else chat_logprobs(c.token_ids, getattr(c, "logprobs", None), k, self._decode_one)

    def _apply_chat_template(self, conversation: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise OpenAIError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            ids = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
        except Exception as e:  # a template that rejects the conversation (roles out of order, ...)
            raise OpenAIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        if not isinstance(ids, list):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _chat_stream(self, request: ChatCompletionRequest, base_id: str, jobs: list[_Job]) -> AsyncIterator[str]:
        def wrap(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> BaseModel:
            return ChatCompletionChunk(id=base_id, model=request.model, system_fingerprint=self.system_fingerprint,
                                       choices=choices, usage=usage)  # fmt: skip

        def partial(i: int, text: str, denoising: Denoising | None) -> BaseModel:
            return wrap([ChatChunkChoice(index=i, delta=DeltaMessage(content=text), denoising=denoising)])

        def final(index: int, c: CompletionOutput, text: str) -> BaseModel:
            return wrap([ChatChunkChoice(index=index, delta=DeltaMessage(content=text), finish_reason=c.finish_reason,
                                         logprobs=self._chat_logprobs(request, c),
                                         stop_reason=getattr(c, "stop_reason", None))])  # fmt: skip

        first = wrap(
            [ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content="")) for j in range(request.n)]
        )
        return self._stream(request, jobs, first, partial, final, lambda u: wrap([], u))

    # ---- vLLM's /tokenize, /detokenize -------------------------------------------------------------
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check_model(request)
        tok = self.engine.tokenizer
        if tok is None:
            raise OpenAIError(400, "this model has no tokenizer", param="prompt")
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError(400, "give exactly one of prompt or messages", param="prompt")
        if request.prompt is not None:
            special = True if request.add_special_tokens is None else request.add_special_tokens
            ids = list(tok.encode(request.prompt, add_special_tokens=special))
        else:
            conversation = [{"role": m.role, "content": m.text()} for m in request.messages]
            ids = self._apply_chat_template(conversation, request.add_generation_prompt)
        strs = tok.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(request)
        tok = self.engine.tokenizer
        if tok is None:
            raise OpenAIError(400, "this model has no tokenizer", param="tokens")
        vocab = self.engine.engine.model_config.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"tokens outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=tok.decode(request.tokens))

    # ---- helpers -----------------------------------------------------------------------------------
    async def _stream(self, request: DiffusionFields, jobs: list[_Job], first: BaseModel | None,
                      partial: Callable[[int, str, Denoising | None], BaseModel],
                      final: Callable[[int, CompletionOutput, str], BaseModel],
                      usage: Callable[[UsageInfo], BaseModel]) -> AsyncIterator[str]:  # fmt: skip
        """The SSE lines of a streamed request: newly settled text per output (or every denoising step),
        the finish reason on the last chunk, usage, [DONE]. A failed step sends an error event, then [DONE].

        With n > 1 or stop strings / stop_token_ids the text comes whole on the last chunk: the settled
        prefix is of one canvas, and text that a stop will cut must not be sent before the cut is known.
        """
        finals: dict[int, RequestOutput] = {}
        incremental = request.n == 1 and not request.stop and not request.stop_token_ids

        def line(body: BaseModel) -> str:
            return sse(body.model_dump_json())

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
                        for c in out.outputs:
                            text = settled.finish(c.text) if incremental else c.text
                            yield line(final(i * request.n + c.index, c, text))
                        continue
                    text = settled.update(out.canvas_token_ids or []) if incremental else ""
                    if request.include_denoising:
                        yield line(partial(i * request.n, text, self._denoising(out)))
                    elif text:
                        yield line(partial(i * request.n, text, None))
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
