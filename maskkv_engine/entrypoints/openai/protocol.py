"""The OpenAI wire format: request bodies (with the diffusion fields) and response objects.

Requests are strict: a wrong type or an unknown field is a 400 that names it, never silently
coerced or ignored (a misspelt ``step`` would otherwise decode with the default schedule). OpenAI
fields that a diffusion decoder cannot honour are accepted only at their neutral value.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from maskkv_engine.refresh.registry import get_refresh, strategy_class
from maskkv_engine.sampling_params import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS, SamplingParams

# OpenAI's documented default for /v1/completions; chat has no limit in OpenAI, and a diffusion
# canvas must have one, so chat uses the engine's default gen_length (or what room the prompt leaves).
COMPLETION_DEFAULT_MAX_TOKENS = DEFAULT_COMPLETION_MAX_TOKENS
CHAT_DEFAULT_MAX_TOKENS = DEFAULT_CHAT_MAX_TOKENS


# Integers in refresh_config beyond this are refused: no period or window is that long, and torch
# index arithmetic would overflow long before.
MAX_CONFIG_INT = 2**31 - 1
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class OpenAIError(Exception):
    """An error the client caused (or a full queue, or a failed step): becomes an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))


def _json_kinds(annotation: str) -> set[str]:
    """``'int | str'`` -> {'int', 'str'}: the JSON kinds a strategy field takes (annotations are strings)."""
    return {part.strip() for part in annotation.split("|")}


def _value_fits(value: Any, kinds: set[str]) -> bool:
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return ("int" in kinds or "float" in kinds) and abs(value) <= MAX_CONFIG_INT
    if isinstance(value, float):
        return "float" in kinds and math.isfinite(value)
    if isinstance(value, str):
        return "str" in kinds
    return False


def check_refresh_config(name: str, config: dict[str, Any]) -> None:
    """Type- and range-check a request's ``refresh_config`` for strategy ``name``, as SamplingParams checks
    its fields: a 400 naming ``refresh_config.<key>``, never a strategy error at step time (a 500)."""
    try:
        cls = strategy_class(name)
    except ValueError as e:
        raise OpenAIError(400, str(e), param="refresh") from None
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    for key, value in config.items():
        param = f"refresh_config.{key}"
        field = fields.get(key)
        if field is None:
            allowed = sorted(fields) or "none"
            raise OpenAIError(400, f"{param} is not an option of refresh={name!r} (allowed: {allowed})", param=param)
        kinds = _json_kinds(str(field.type))
        if not _value_fits(value, kinds):
            limit = f", |value| <= {MAX_CONFIG_INT}" if kinds & {"int", "float"} else ""
            raise OpenAIError(400, f"{param}={value!r} must be {' or '.join(sorted(kinds))}{limit}", param=param)
    try:
        get_refresh(name, config)  # the strategy's own range checks (K_r >= 1, 0 <= rho <= 1, ...)
    except (TypeError, ValueError) as e:
        key = re.search(r": (\w+)=", str(e))
        raise OpenAIError(400, str(e), param=f"refresh_config.{key.group(1)}" if key else "refresh_config") from e


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    # maskkv: every denoising step sends a chunk with the whole response canvas, masks shown
    include_denoising: bool = False


# SamplingParams fields the engine knows: OpenAI's n / stop / logprobs are mapped onto them where the
# engine has them (vLLM's names), and refused at anything but their neutral value where it has not.
ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def unsupported(param: str, value: Any, why: str = "is not supported by the diffusion decoder") -> OpenAIError:
    return OpenAIError(400, f"{param}={value!r} {why}", param=param)


class DiffusionFields(OpenAIBaseModel):
    """Sampling fields shared by both routes: OpenAI's, then the diffusion ones (extra body fields)."""

    model: str | None = None  # may be left out when the server serves one model
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    # diffusion decoding (see SamplingParams)
    steps: int | None = None
    block_length: int | None = None
    remasking: str | None = None
    kv_budget: int | None = None
    threshold: float | None = None
    factor: float | None = None
    cfg_scale: float | None = None
    top_k: int | None = None
    alg_temp: float | None = None
    refresh: str | None = None
    refresh_config: dict[str, Any] | None = None
    ignore_eos: bool = False

    def check_supported(self) -> None:
        """OpenAI fields the engine cannot honour: a 400 naming the field unless at their neutral value."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise unsupported(name, getattr(self, name))
        if self.logit_bias:
            raise unsupported("logit_bias", self.logit_bias)
        if self.n != 1 and "n" not in ENGINE_FIELDS:
            raise unsupported("n", self.n)
        if self.stop and "stop" not in ENGINE_FIELDS:
            raise unsupported("stop", self.stop)
        if self.stop_token_ids and "stop_token_ids" not in ENGINE_FIELDS:
            raise unsupported("stop_token_ids", self.stop_token_ids)
        if self.include_stop_str_in_output and "include_stop_str_in_output" not in ENGINE_FIELDS:
            raise unsupported("include_stop_str_in_output", True)
        if self.logprobs_k is not None and "logprobs" not in ENGINE_FIELDS:
            raise unsupported("logprobs", self.logprobs_k)

    @property
    def logprobs_k(self) -> int | None:
        """Top log-probabilities asked for per token (None: none); each route spells it its own way."""
        return None

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """Map onto SamplingParams (max_tokens = gen_length); its own checks raise ValueError naming the field."""
        kw: dict[str, Any] = dict(gen_length=max_tokens, stop_at_eos=not self.ignore_eos)
        diffusion = ("steps", "block_length", "remasking", "kv_budget", "threshold", "factor", "cfg_scale", "refresh",
                     "refresh_config")  # fmt: skip
        for name in diffusion:
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        for name in ("temperature", "top_p", "top_k", "alg_temp", "seed"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        # vLLM's names, only where the engine has them (check_supported refused the rest)
        openai = {
            "n": self.n if self.n != 1 else None,
            "stop": [self.stop] if isinstance(self.stop, str) else (self.stop or None),
            "stop_token_ids": self.stop_token_ids or None,
            "include_stop_str_in_output": self.include_stop_str_in_output or None,
            "logprobs": self.logprobs_k,
        }
        for name, value in openai.items():
            if value is not None and name in ENGINE_FIELDS:
                kw[name] = value
        return SamplingParams(**kw)

    @property
    def include_denoising(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_denoising

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(DiffusionFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise unsupported("echo", True)
        if self.best_of not in (None, 1):
            raise unsupported("best_of", self.best_of)
        if self.suffix:
            raise unsupported("suffix", self.suffix)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise OpenAIError(400, f"logprobs={self.logprobs} must be in [0, {MAX_LOGPROBS}]", param="logprobs")

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs

    @property
    def gen_length(self) -> int:
        return COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list: OpenAI allows one text, one token list, or a batch of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt is empty")
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(DiffusionFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # tool use: agent frameworks send these at their neutral values on every call
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        no_tools = "tool use is not supported by this server: send no tools (or tools: [])"
        if self.tools:
            raise OpenAIError(400, f"tools: {no_tools}", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise OpenAIError(400, f"tool_choice={self.tool_choice!r}: {no_tools}", param="tool_choice")
        kind = None if self.response_format is None else self.response_format.get("type")
        if self.response_format is not None and (kind != "text" or len(self.response_format) != 1):
            raise OpenAIError(400, f"response_format={self.response_format!r} is not supported: the decoder cannot "
                              'constrain its output (allowed: {"type": "text"})', param="response_format")  # fmt: skip
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise OpenAIError(400, f"top_logprobs={self.top_logprobs} must be in [0, {MAX_LOGPROBS}]",
                                  param="top_logprobs")  # fmt: skip

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def gen_length(self, room: int) -> int:
        """max_completion_tokens, else max_tokens, else the default cut to the ``room`` the prompt leaves."""
        for value in (self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return value
        return max(1, min(CHAT_DEFAULT_MAX_TOKENS, room))

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# ---- responses ------------------------------------------------------------------------------------
# Shaped as OpenAI's: a field OpenAI always sends is sent as null when empty (``finish_reason`` of a
# non-final chunk, ``logprobs`` when not asked); the fields in ``_omit_if_none`` (our extensions, and
# what OpenAI leaves out) are left out when empty. Dump with model_dump(mode="json") / model_dump_json().
def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ResponseModel(BaseModel):
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_empty_extensions(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self._omit_if_none:
            if data.get(name, 0) is None:
                del data[name]
        return data


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Denoising(ResponseModel):
    """One denoising step of the response canvas (``include_denoising``)."""

    step: int
    canvas: str  # the whole response, [MASK] where nothing is committed yet
    num_masked: int


class CompletionLogprobs(ResponseModel):
    """The legacy completions shape: one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    _omit_if_none = frozenset({"denoising", "stop_reason"})

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token that ended it
    denoising: Denoising | None = None


class CompletionResponse(ResponseModel):
    _omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: list[TokenLogprob] | None = None
    refusal: None = None


class ChatChoice(ResponseModel):
    _omit_if_none = frozenset({"stop_reason"})

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    _omit_if_none = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    _omit_if_none = frozenset({"denoising", "stop_reason"})

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    denoising: Denoising | None = None


class ChatCompletionChunk(ResponseModel):
    _omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "maskkv"
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- vLLM's tokenizer routes ------------------------------------------------------------------------
class TokenizeRequest(OpenAIBaseModel):
    """``prompt`` (a text) or ``messages`` (through the chat template), as vLLM's /tokenize."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(ResponseModel):
    _omit_if_none = frozenset({"token_strs"})

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str
