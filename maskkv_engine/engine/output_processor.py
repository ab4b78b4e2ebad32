"""From a request's canvas to its CompletionOutput: stop tokens, stop strings, stop_reason, logprobs.

The scheduler and the sampler know nothing of text; vLLM's stop conditions are applied here, where the
engine turns a request into its output, and (stop strings) once per step to end a request early.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from maskkv_engine.outputs import CompletionOutput, Logprob, RequestOutput
from maskkv_engine.request import Request, RequestStatus
from maskkv_engine.sampling.logprobs import committed_logprobs
from maskkv_engine.sampling_params import SamplingParams

Decode = Callable[[list[int]], str]


class OutputProcessor:
    """Turns requests into RequestOutputs: the text, the completion's stops and logprobs, the canvas."""

    def __init__(self, tokenizer, mask_id: int):
        self.tokenizer = tokenizer
        self.mask_id = mask_id

    def make_output(self, req: Request) -> RequestOutput:
        completion = make_completion(req, 0, self.decode, self.tokenizer)  # stops, stop_reason, logprobs
        req.metrics.num_generated_tokens = len(completion.token_ids)
        finished = req.finished
        canvas = None if finished else req.response.tolist()
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            metrics=req.metrics,
            canvas_token_ids=canvas,
            canvas_text=None if canvas is None else self.decode_canvas(canvas),
            error=req.error,
        )

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def decode_canvas(self, canvas: list[int], mask_text: str = "[MASK]") -> str:
        """The response canvas as text with masks shown (streaming of intermediate states)."""
        if self.tokenizer is None:
            return ""
        pieces, run = [], []
        for t in canvas:
            if t == self.mask_id:
                if run:
                    pieces.append(self.decode(run))
                    run = []
                pieces.append(mask_text)
            else:
                run.append(t)
        if run:
            pieces.append(self.decode(run))
        return "".join(pieces)


def request_stop_rules(
    params: SamplingParams, eos_ids: tuple[int, ...], mask_id: int, has_tokenizer: bool
) -> tuple[SamplingParams, tuple[int, ...]]:
    """The params and stop token ids a Request runs with. ``stop_token_ids`` join the EOS ids; with
    ``ignore_eos`` they alone stop the request (the request then sees ``stop_at_eos`` on, over them only)."""
    if params.stop and not has_tokenizer:
        raise ValueError("SamplingParams.stop needs the model's tokenizer (this model has none): use stop_token_ids")
    extra = tuple(t for t in params.stop_token_ids if t != mask_id)
    if mask_id in params.stop_token_ids:
        raise ValueError(f"SamplingParams.stop_token_ids contains the mask token id {mask_id}")
    if params.stop_at_eos:
        return params, eos_ids + tuple(t for t in extra if t not in eos_ids)
    if extra:
        return dataclasses.replace(params, stop_at_eos=True), extra
    return params, eos_ids


def finish_on_stop_string(req: Request, decode: Decode) -> bool:
    """After a step: end the request when a stop string lies in its committed prefix (the response up to its
    first [MASK]): committed tokens never change, so the completion cannot change before the string."""
    stops = req.params.stop
    if not stops or req.finished:
        return False
    raw = req.response.tolist()
    n = raw.index(req.mask_id) if req.mask_id in raw else len(raw)
    prefix = _cut_at_stop_token(req, raw[:n])
    text = decode(prefix)
    if any(s in text for s in stops):
        req.status = RequestStatus.FINISHED_STOPPED
        return True
    return False


def make_completion(req: Request, index: int, decode: Decode | None, tokenizer=None) -> CompletionOutput:
    """The request's completion as it stands (finished or not): token ids cut at the first stop token,
    text cut before the first stop string, finish / stop reason, and logprobs when asked for."""
    p = req.params
    finished = req.finished
    token_ids = req.output_token_ids()
    positions = _token_positions(req)[: len(token_ids)]
    finish = req.status.value if finished else None
    stop_reason: str | int | None = None
    if finished and req.status is RequestStatus.FINISHED_STOPPED:
        raw = req.response.tolist()
        if len(token_ids) < len(raw) and raw[len(token_ids)] in p.stop_token_ids:
            stop_reason = raw[len(token_ids)]
    text = decode(token_ids) if decode is not None else ""
    hit = _first_stop_string(text, p.stop) if decode is not None else None
    if hit is not None:
        at, stop = hit
        keep = _shortest_prefix_containing(token_ids, stop, decode)
        token_ids, positions = token_ids[:keep], positions[:keep]
        text = text[: at + len(stop)] if p.include_stop_str_in_output else text[:at]
        if finished and req.status is not RequestStatus.FINISHED_ABORTED:
            finish, stop_reason = "stop", stop
    logprobs, cumulative = _logprobs(req, positions, tokenizer) if p.logprobs is not None else (None, None)
    return CompletionOutput(index, text, token_ids, finish, stop_reason, logprobs, cumulative)


def _cut_at_stop_token(req: Request, tokens: list[int]) -> list[int]:
    if req.params.stop_at_eos:
        for i, t in enumerate(tokens):
            if t in req.stop_token_ids:
                return tokens[:i]
    return tokens


def _token_positions(req: Request) -> list[int]:
    """Absolute canvas position of each token output_token_ids() returns (same cut, masks skipped)."""
    raw = _cut_at_stop_token(req, req.response.tolist())
    return [req.prompt_len + i for i, t in enumerate(raw) if t != req.mask_id]


def _first_stop_string(text: str, stops: list[str]) -> tuple[int, str] | None:
    hits = [(text.find(s), -len(s), s) for s in stops if s in text]
    if not hits:
        return None
    at, _, stop = min(hits)  # earliest; the longest of those starting there
    return at, stop


def _shortest_prefix_containing(token_ids: list[int], stop: str, decode: Decode) -> int:
    """The fewest leading tokens whose text contains ``stop`` (vLLM keeps the token that completes it)."""
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if stop in decode(token_ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _logprobs(req: Request, positions: list[int], tokenizer) -> tuple[list[dict[int, Logprob]], float]:
    record = committed_logprobs(req)
    out: list[dict[int, Logprob]] = []
    total = 0.0
    for pos in positions:
        c = record.get(pos)
        if c is None:  # not committed by a scored step (cannot happen for a request that asked from the start)
            out.append({})
            continue
        entry = {tid: Logprob(lp, rank + 1, _piece(tokenizer, tid)) for rank, (tid, lp) in enumerate(c.top)}
        entry[c.token_id] = Logprob(c.logprob, c.rank, _piece(tokenizer, c.token_id))
        out.append(entry)
        total += c.logprob
    return out, total


def _piece(tokenizer, token_id: int) -> str | None:
    return None if tokenizer is None else tokenizer.decode([token_id])
