"""One normalised description of a dLLM checkpoint, whatever its config.json spells."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiffusionLMConfig:
    """The architecture facts the engine needs, read from a released config.json.

    ``logits_shift``: Dream predicts token i from position i-1 (an AR-initialised model); LLaDA from i.
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

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim={self.head_dim} must be even (rotary embedding)")

    def logit_rows(self, positions):
        """Rows whose hidden state predicts ``positions``: Dream's logits are shifted by one (row i predicts
        token i+1), LLaDA's are not. The one place that knows it."""
        return positions - 1 if self.logits_shift else positions

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def require(config: dict, key: str, arch: str):
    if key not in config:
        raise ValueError(f"config.json for {arch} is missing the field '{key}'")
    return config[key]


def as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)
