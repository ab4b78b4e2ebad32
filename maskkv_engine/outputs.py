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
class CompletionOutput:
    """``token_ids``: generated tokens (the first EOS and what follows dropped when stop_at_eos).

    finish_reason: 'stop' (an EOS ended it), 'length' (gen_length filled), 'abort'.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # Intermediate outputs (streaming) carry the whole response canvas, masks included.
    canvas_token_ids: list[int] | None = field(default=None, repr=False)
    canvas_text: str | None = field(default=None, repr=False)
    error: str | None = None
