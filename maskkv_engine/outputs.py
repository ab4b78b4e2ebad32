"""What generate() and the engine return, shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Times are ``time.monotonic()`` seconds; durations in seconds."""

    arrival_time: float
    first_scheduled_time: float | None = None
    prefill_time: float | None = None  # duration of the request's first (full) pass
    finished_time: float | None = None
    num_steps: int = 0  # denoising steps that ran a forward pass (NFE)
    num_full_passes: int = 0  # of those, passes over the whole sequence
    kv_pages_peak: int = 0  # pages this request held at its peak
    kv_tokens_kept: int = 0  # prompt KV pairs kept, summed over layers and heads
    num_generated_tokens: int = 0
    committed_per_step: list[int] = field(default_factory=list)  # tokens each step committed
    layers_recomputed: int = 0  # (step, layer) pairs in which every computed row was recomputed
    layers_total: int = 0

    @property
    def recompute_fraction(self) -> float | None:
        """Share of (step, layer) pairs that recomputed the step's rows (1.0 without a refresh strategy)."""
        return self.layers_recomputed / self.layers_total if self.layers_total else None

    @property
    def time_in_queue(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time

    @property
    def tokens_per_second(self) -> float | None:
        if self.finished_time is None or self.first_scheduled_time is None:
            return None
        busy = self.finished_time - self.first_scheduled_time
        return self.num_generated_tokens / busy if busy > 0 else None


@dataclass
class Logprob:
    """vLLM's Logprob: a token's log-probability at the step that committed it, and its rank there (1 = top)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """``token_ids``: generated tokens (the first EOS and what follows dropped when stop_at_eos).

    index:         which of the request's ``n`` samples this is.
    finish_reason: 'stop' (an EOS, a stop token id or a stop string ended it), 'length' (gen_length
                   filled), 'abort', 'error' (the step that ran it failed; ``RequestOutput.error`` says why).
    stop_reason:   the stop string or stop token id that ended it; None for EOS, 'length' and 'abort'.
    logprobs:      with ``SamplingParams(logprobs=k)``, one dict per token of ``token_ids``: token id ->
                   Logprob, the committed token and the step's top-k at that position; else None.
    cumulative_logprob: the sum of the committed tokens' logprobs (with ``logprobs``), else None.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One request's result: ``outputs`` holds its ``n`` completions (index 0..n-1); ``finished`` is True once
    every one of them is done (streamed intermediate outputs carry the completions stepped so far)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # Intermediate outputs (streaming) carry the whole response canvas, masks included.
    canvas_token_ids: list[int] | None = field(default=None, repr=False)
    canvas_text: str | None = field(default=None, repr=False)
    error: str | None = None  # why the request failed (finish_reason 'error'); None otherwise
