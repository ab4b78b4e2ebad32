"""SamplingParams: how one request is denoised. Validated at construction, with the field named."""

from __future__ import annotations

from dataclasses import dataclass

LLADA_REMASKING = ("low_confidence", "random")
DREAM_REMASKING = ("origin", "maskgit_plus", "topk_margin", "entropy")
# For Dream, "low_confidence" is accepted as maskgit_plus (highest top-1 probability first).
REMASKING = LLADA_REMASKING + DREAM_REMASKING


@dataclass
class SamplingParams:
    """Diffusion decoding settings of one request.

    gen_length:   response tokens (all start as [MASK]).
    steps:        denoising steps (default: gen_length, one token per step).
    block_length: LLaDA's semi-autoregressive block (default: gen_length, a single block).
    temperature:  0 = greedy. LLaDA samples by Gumbel-max in float64; Dream by categorical sampling.
    remasking:    which masked positions are committed first: LLaDA 'low_confidence' | 'random';
                  Dream 'origin' | 'maskgit_plus' | 'topk_margin' | 'entropy'.
    cfg_scale:    classifier-free guidance (LLaDA's unconditional pass masks the prompt).
    threshold / factor: confidence-aware parallel decoding (Fast-dLLM); None = the fixed schedule.
    kv_budget:    prompt KV pairs kept per head on average (overrides the engine's kv_budget).
    seed:         per-request seed; the same seed gives the same tokens whatever the batch.
    stop_at_eos:  drop the first EOS and what follows; stop as soon as that prefix is final.
    top_p, top_k, alg_temp, eps: Dream's sampling knobs, as its generation config names them.
    refresh, refresh_config: this request's refresh strategy (overrides the engine's; see refresh/).
    """

    gen_length: int = 128
    steps: int | None = None
    block_length: int | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    threshold: float | None = None
    factor: float | None = None
    kv_budget: int | None = None
    seed: int | None = None
    stop_at_eos: bool = True
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float | None = None
    eps: float = 1e-3
    refresh: str | None = None
    refresh_config: dict | None = None

    def __post_init__(self) -> None:
        _int_at_least("gen_length", self.gen_length, 1)
        if self.block_length is None:
            self.block_length = self.gen_length
        if self.steps is None:
            self.steps = self.gen_length
        _int_at_least("block_length", self.block_length, 1)
        _int_at_least("steps", self.steps, 1)
        if self.gen_length % self.block_length:
            raise ValueError(
                f"SamplingParams.block_length={self.block_length} must divide gen_length={self.gen_length} "
                f"(allowed: a divisor of gen_length)"
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"SamplingParams.steps={self.steps} must be a multiple of the number of blocks "
                f"gen_length/block_length={self.num_blocks}"
            )
        _number_at_least("temperature", self.temperature, 0.0)
        if self.remasking not in REMASKING:
            raise ValueError(f"SamplingParams.remasking={self.remasking!r} is not known (allowed: {REMASKING})")
        _number_at_least("cfg_scale", self.cfg_scale, 0.0)
        if self.threshold is not None:
            _number_at_least("threshold", self.threshold, 0.0, strict=True)
        if self.factor is not None:
            _number_at_least("factor", self.factor, 0.0, strict=True)
        if self.threshold is not None and self.factor is not None:
            raise ValueError("SamplingParams: set threshold or factor, not both")
        if self.kv_budget is not None:
            _int_at_least("kv_budget", self.kv_budget, 1)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"SamplingParams.seed={self.seed!r} must be an int or None")
        if not isinstance(self.stop_at_eos, bool):
            raise ValueError(f"SamplingParams.stop_at_eos={self.stop_at_eos!r} must be a bool")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingParams.top_p={self.top_p!r} must be in (0, 1]")
        if self.top_k is not None:
            _int_at_least("top_k", self.top_k, 1)
        if self.alg_temp is not None:
            _number_at_least("alg_temp", self.alg_temp, 0.0)
        if not (isinstance(self.eps, (int, float)) and 0.0 < self.eps < 1.0):
            raise ValueError(f"SamplingParams.eps={self.eps!r} must be in (0, 1)")
        if self.refresh is not None and not isinstance(self.refresh, str):
            raise ValueError(f"SamplingParams.refresh={self.refresh!r} must be a strategy name or None")
        if self.refresh_config is not None and not isinstance(self.refresh_config, dict):
            raise ValueError(f"SamplingParams.refresh_config={self.refresh_config!r} must be a dict or None")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def parallel_decoding(self) -> bool:
        return self.threshold is not None or self.factor is not None


def _int_at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"SamplingParams.{name}={value!r} must be an integer >= {low}")


def _number_at_least(name: str, value, low: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low) and value == value  # rejects NaN
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} must be a number {'>' if strict else '>='} {low}")
