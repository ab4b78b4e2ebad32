"""One normalised description of a dLLM checkpoint, whatever its config.json spells.

The ``read_*`` helpers read one config.json field each and refuse a wrong type or range with the field's
name: ``int("abc")`` or ``cfg.get("n_kv_heads") or n_heads`` would either crash without saying which
field, or quietly turn ``n_kv_heads: 0`` into a different model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# config.json ``torch_dtype`` values a checkpoint may declare (the loader casts to the dtype asked for)
SUPPORTED_TORCH_DTYPES = ("float32", "bfloat16", "float16", "float64")

_MISSING: Any = object()


@dataclass(frozen=True)
class DiffusionLMConfig:
    """The architecture facts the engine needs, read from a released config.json.

    ``logits_shift``: Dream predicts token i from position i-1 (an AR-initialised model); LLaDA from i.
    ``keys``: this config's field name -> the config.json key it came from, so errors name the key a
    user can find in the file (``n_kv_heads`` for LLaDA, ``num_key_value_heads`` for Dream).
    """

    architecture: str
    vocab_size: int  # rows of the embedding / logits width
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    logits_shift: bool = False
    rope_in_float32: bool = True
    torch_dtype: str = "float32"
    # ids that are tokens: LLaDA may pad its embedding beyond its vocab_size (``embedding_size``); None: all rows
    token_vocab_size: int | None = None
    keys: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.key(name)}={value!r} must be an integer >= 1")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{self.key(name)}={value!r} must be a finite number > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.key('num_heads')}={self.num_heads} must be a multiple of "
                f"{self.key('num_kv_heads')}={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rotary embedding)")
        vocab = f"[0, {self.vocab_size}) ({self.key('vocab_size')}={self.vocab_size})"
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"{self.key('mask_token_id')}={self.mask_token_id} is outside the vocabulary {vocab}")
        bad = [i for i in self.eos_token_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.key('eos_token_ids')}={bad} is outside the vocabulary {vocab}")
        if self.torch_dtype not in SUPPORTED_TORCH_DTYPES:
            raise ValueError(
                f"{self.key('torch_dtype')}={self.torch_dtype!r} is not supported (allowed: {SUPPORTED_TORCH_DTYPES})"
            )

    def key(self, name: str) -> str:
        """The config.json key a field was read from (the field's own name when built in code)."""
        return self.keys.get(name, name)

    def logit_rows(self, positions):
        """Rows whose hidden state predicts ``positions`` (see ``logit_rows``)."""
        return logit_rows(positions, self.logits_shift)

    @property
    def num_real_tokens(self) -> int:
        """Logit rows that are tokens; the rows above are padding and are never sampled."""
        return self.token_vocab_size or self.vocab_size

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def logit_rows(positions, logits_shift: bool):
    """Rows whose hidden state predicts ``positions``: Dream's logits are shifted by one (row i predicts token
    i+1), LLaDA's are not. The one place that knows it."""
    return positions - 1 if logits_shift else positions


def _given(config: dict, key: str) -> bool:
    """null counts as absent, as transformers reads it."""
    return config.get(key) is not None


def read_int(config: dict, key: str, default: Any = _MISSING, minimum: int = 1) -> int:
    """An integer field (an integral float such as 4096.0 is accepted); absent or null -> ``default``."""
    if not _given(config, key):
        if default is _MISSING:
            raise ValueError(f"{key} is missing (an integer >= {minimum} is required)")
        return default
    value = config[key]
    ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or value < minimum:
        raise ValueError(f"{key}={value!r} must be an integer >= {minimum}")
    return int(value)


def read_float(config: dict, key: str, default: float) -> float:
    """A positive, finite number (rope theta, norm epsilon); absent or null -> ``default``."""
    if not _given(config, key):
        return default
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{key}={value!r} must be a finite number > 0")
    return float(value)


def read_bool(config: dict, key: str, default: bool) -> bool:
    """true / false only: ``bool("false")`` is True, so a string would silently flip the model."""
    if not _given(config, key):
        return default
    value = config[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be true or false")
    return value


def read_str(config: dict, key: str, default: str) -> str:
    if not _given(config, key):
        return default
    value = config[key]
    if not isinstance(value, str):
        raise ValueError(f"{key}={value!r} must be a string")
    return value


def read_ids(config: dict, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """One token id or a list of them (``eos_token_id``); absent -> ``default``, null -> none."""
    if key not in config:
        return default
    value = config[key]
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{key}={value!r} must be a token id (an integer >= 0) or a list of them")
    return tuple(values)
