"""SamplingParams: how one request is denoised. Validated at construction, with the field named.

vLLM's names work where they mean the same thing (``max_tokens``, ``ignore_eos``, ``n``, ``stop``,
``stop_token_ids``, ``logprobs``, ``include_stop_str_in_output``); an unknown keyword names the closest
valid one, and a vLLM option the diffusion decoder cannot honour says so.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, fields

# One default response length per kind of call, here so that the CLI and the server import them.
# 128 is LLaDA's published gen_length (its generate.py and evaluations): what a Python user, a CLI user
# and a chat client get when they say nothing. /v1/completions keeps OpenAI's documented default of 16
# tokens, because OpenAI clients that omit max_tokens expect exactly that.
DEFAULT_GEN_LENGTH = 128
DEFAULT_CHAT_MAX_TOKENS = DEFAULT_GEN_LENGTH
DEFAULT_COMPLETION_MAX_TOKENS = 16


@dataclass
class SamplingParams:
    """Diffusion decoding settings of one request.

    gen_length:   response tokens (all start as [MASK]); vLLM's ``max_tokens`` is an alias (a diffusion
                  canvas has exactly this many positions; EOS or a stop ends the completion earlier).
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
                  vLLM's ``ignore_eos=True`` is ``stop_at_eos=False``.
    top_p, top_k, alg_temp, eps: Dream's sampling knobs, as its generation config names them.
    refresh, refresh_config: this request's refresh strategy (overrides the engine's; see refresh/).

    vLLM's names:
    n:            samples of the prompt, with seeds seed, seed+1, ... (distinct engine seeds when seed is
                  None); ``RequestOutput.outputs`` holds them, indices 0..n-1.
    stop:         strings; the completion is cut before the first one (finish_reason 'stop', stop_reason
                  the string); ``include_stop_str_in_output`` keeps the string. A stop string whose
                  committed prefix is final ends the request early, as EOS does.
    stop_token_ids: ids that end the completion like EOS (stop_reason = the id); they apply with
                  ignore_eos too.
    logprobs:     k: for each generated token, the log-probability the model gave it at the denoising step
                  that committed it (log_softmax of that step's logits, before temperature / top-p / top-k),
                  plus the top-k tokens at that position and step: the diffusion analogue of vLLM's
                  per-token logprobs. 0 = the committed token only.
    """

    gen_length: int = DEFAULT_GEN_LENGTH
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
    # vLLM's names (see the docstring); max_tokens and ignore_eos are keyword aliases (properties below)
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self._vllm_names()
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
        if not isinstance(self.remasking, str) or not self.remasking:
            # which names exist (and for which model family) is the decoding-rule registry's to say, at add_request
            raise ValueError(f"SamplingParams.remasking={self.remasking!r} must be a decoding rule's name")
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

    def _vllm_names(self) -> None:
        """Check vLLM's fields and normalise ``stop`` / ``stop_token_ids`` to lists."""
        _int_at_least("n", self.n, 1)
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop)):
            raise ValueError(f"SamplingParams.stop={self.stop!r} must be a non-empty string or a list of them")
        self.stop = list(stop or [])
        ids = self.stop_token_ids
        if ids is not None and not (
            isinstance(ids, (list, tuple))
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            raise ValueError(f"SamplingParams.stop_token_ids={self.stop_token_ids!r} must be a list of token ids >= 0")
        self.stop_token_ids = list(ids or [])
        if self.logprobs is not None:
            _int_at_least("logprobs", self.logprobs, 0)
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError(
                f"SamplingParams.include_stop_str_in_output={self.include_stop_str_in_output!r} must be a bool"
            )

    @property
    def max_tokens(self) -> int:
        """vLLM's name for gen_length."""
        return self.gen_length

    @property
    def ignore_eos(self) -> bool:
        """vLLM's name for ``not stop_at_eos``."""
        return not self.stop_at_eos

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


# vLLM SamplingParams options the diffusion decoder does not honour, and why.
UNSUPPORTED_VLLM = {
    "best_of": "use n and pick yourself",
    "presence_penalty": "penalties need a left-to-right history; a diffusion step commits tokens anywhere",
    "frequency_penalty": "penalties need a left-to-right history; a diffusion step commits tokens anywhere",
    "repetition_penalty": "penalties need a left-to-right history; a diffusion step commits tokens anywhere",
    "min_p": "not implemented (top_p / top_k are, for Dream)",
    "min_tokens": "a diffusion canvas has gen_length positions; EOS may be committed anywhere in it",
    "prompt_logprobs": "a diffusion LM does not score the prompt left to right",
    "logits_processors": "not implemented",
    "bad_words": "not implemented",
    "guided_decoding": "not implemented",
    "structured_outputs": "not implemented",
    "detokenize": "text is always decoded when the model has a tokenizer",
    "skip_special_tokens": "special tokens are always skipped in the text",
}
ALIASES = {"max_tokens": "gen_length", "ignore_eos": "stop_at_eos (negated)"}
_FIELD_NAMES = tuple(f.name for f in fields(SamplingParams))
_dataclass_init = SamplingParams.__init__


@functools.wraps(_dataclass_init)
def _checked_init(self, *args, **kwargs) -> None:
    """The dataclass __init__, plus the keyword aliases and a named error for an unknown keyword. The aliases
    are not fields, so ``dataclasses.replace`` never sees a stale alias disagreeing with a changed field."""
    for name in kwargs:
        if name in _FIELD_NAMES or name in ALIASES:
            continue
        if name in UNSUPPORTED_VLLM:
            raise TypeError(f"SamplingParams: vLLM's {name!r} is not supported here ({UNSUPPORTED_VLLM[name]})")
        valid = _FIELD_NAMES + tuple(ALIASES)
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"allowed: {', '.join(valid)}"
        raise TypeError(f"SamplingParams got an unknown keyword {name!r} ({hint})")
    max_tokens = kwargs.pop("max_tokens", None)
    if max_tokens is not None:
        _int_at_least("max_tokens", max_tokens, 1)
        given = kwargs.get("gen_length", args[0] if args else None)
        if given is not None and given != max_tokens:
            raise ValueError(
                f"SamplingParams: max_tokens={max_tokens} and gen_length={given} disagree "
                "(max_tokens is an alias of gen_length: give one)"
            )
        if not args:
            kwargs["gen_length"] = max_tokens
    ignore_eos = kwargs.pop("ignore_eos", None)
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos={ignore_eos!r} must be a bool")
        if kwargs.get("stop_at_eos", not ignore_eos) == ignore_eos:
            raise ValueError(
                f"SamplingParams: ignore_eos={ignore_eos} and stop_at_eos={kwargs['stop_at_eos']} disagree "
                "(ignore_eos is an alias of not stop_at_eos: give one)"
            )
        kwargs["stop_at_eos"] = not ignore_eos
    _dataclass_init(self, *args, **kwargs)


SamplingParams.__init__ = _checked_init
