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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maskkv_engine.refresh.registry import REFRESH_STRATEGIES, get_refresh
from maskkv_engine.sampling_params import SamplingParams

# OpenAI's documented default for /v1/completions; chat has no limit in OpenAI, and a diffusion
# canvas must have one, so chat uses the engine's default gen_length (or what room the prompt leaves).
COMPLETION_DEFAULT_MAX_TOKENS = 16
CHAT_DEFAULT_MAX_TOKENS = SamplingParams.gen_length


# Integers in refresh_config beyond this are refused: no period or window is that long, and torch
# index arithmetic would overflow long before.
MAX_CONFIG_INT = 2**31 - 1


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
    cls = REFRESH_STRATEGIES.get(name)
    if cls is None:
        raise OpenAIError(400, f"refresh={name!r} is not known (allowed: {sorted(REFRESH_STRATEGIES)})",
                          param="refresh")  # fmt: skip
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


class DiffusionFields(OpenAIBaseModel):
    """Sampling fields shared by both routes: OpenAI's, then the diffusion ones (extra body fields)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
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

    @model_validator(mode="after")
    def _neutral_openai_fields(self) -> DiffusionFields:
        unsupported = {
            "n": self.n != 1,
            "stop": bool(self.stop),
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }
        for name, bad in unsupported.items():
            if bad:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported by the diffusion decoder")
        return self

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

    @model_validator(mode="after")
    def _neutral_completion_fields(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo=True is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported by the diffusion decoder")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of={self.best_of!r} is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

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

    @model_validator(mode="after")
    def _neutral_chat_fields(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs is not None:
            raise ValueError("logprobs is not supported by the diffusion decoder")
        return self

    def gen_length(self, room: int) -> int:
        """max_completion_tokens, else max_tokens, else the default cut to the ``room`` the prompt leaves."""
        for value in (self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return value
        return max(1, min(CHAT_DEFAULT_MAX_TOKENS, room))

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# ---- responses ------------------------------------------------------------------------------------
def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Denoising(BaseModel):
    """One denoising step of the response canvas (``include_denoising``)."""

    step: int
    canvas: str  # the whole response, [MASK] where nothing is committed yet
    num_masked: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    denoising: Denoising | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    denoising: Denoising | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "maskkv"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
