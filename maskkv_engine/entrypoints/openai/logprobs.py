"""An engine's per-token log-probabilities in OpenAI's two wire shapes (legacy completions, chat).

The engine gives them as vLLM does: ``CompletionOutput.logprobs`` is one entry per generated token, a
dict from token id to a ``Logprob`` (``.logprob``, optionally ``.decoded_token``) or a bare float,
holding the chosen token and the top ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from maskkv_engine.entrypoints.openai.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

Decode = Callable[[int], str]


def _value(entry: Any) -> float:
    return float(entry if isinstance(entry, (int, float)) else entry.logprob)


def _text(token_id: int, entry: Any, decode: Decode) -> str:
    text = getattr(entry, "decoded_token", None)
    return text if isinstance(text, str) else decode(token_id)


def _ranked(position: Mapping[int, Any], k: int) -> list[tuple[int, Any]]:
    """The top ``k`` of a position, best first."""
    ranked = sorted(position.items(), key=lambda item: -_value(item[1]))
    return ranked[:k] if k else []


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Any]] | None, k: int,
                        decode: Decode) -> CompletionLogprobs | None:  # fmt: skip
    if logprobs is None:
        return None
    out = CompletionLogprobs()
    offset = 0
    for tid, position in zip(token_ids, logprobs):
        entry = position.get(tid)
        text = _text(tid, entry, decode)
        out.tokens.append(text)
        out.token_logprobs.append(None if entry is None else _value(entry))
        top = _ranked(position, k)
        out.top_logprobs.append({_text(t, e, decode): _value(e) for t, e in top} if top else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[Mapping[int, Any]] | None, k: int,
                  decode: Decode) -> ChatLogprobs | None:  # fmt: skip
    if logprobs is None:
        return None
    content = []
    for tid, position in zip(token_ids, logprobs):
        entry = position.get(tid)
        text = _text(tid, entry, decode)
        top = [
            TopLogprob(token=_text(t, e, decode), logprob=_value(e), bytes=list(_text(t, e, decode).encode()))
            for t, e in _ranked(position, k)
        ]
        lp = -9999.0 if entry is None else _value(entry)  # OpenAI's value for "not computed"
        content.append(TokenLogprob(token=text, logprob=lp, bytes=list(text.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)
