"""LLaDA (``architectures: ["LLaDAModelLM"]``), written for inference in this package (no remote code).

Module names mirror the released checkpoint so its safetensors load by name:
``model.transformer.{wte, blocks.N.{q_proj,k_proj,v_proj,attn_out,attn_norm,ff_norm,ff_proj,up_proj,ff_out},
ln_f, ff_out}``; the top-level ``model.transformer.ff_out`` is the LM head (absent when weight_tying).
"""

from __future__ import annotations

import torch
from torch import nn

from maskkv_engine.models.block import block_forward
from maskkv_engine.models.config import DiffusionLMConfig, read_bool, read_float, read_ids, read_int, read_str
from maskkv_engine.models.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, linear, swiglu

LLADA_MASK_ID = 126336

# Released-config options this implementation does not cover; refused with a clear error rather than
# silently computing something else.
_UNSUPPORTED = {
    "alibi": (False, None),
    "attention_layer_norm": (False, None),
    "rope": (True, None),
    "scale_logits": (False, None),
    "include_bias": (False, None),
    "block_type": ("llama", None),
    "layer_norm_type": ("rms", None),
    "activation_type": ("silu", "swiglu", None),
}

# DiffusionLMConfig field -> the config.json key LLaDA spells it with (errors name the key in the file)
LLADA_KEYS = {
    "hidden_size": "d_model",
    "num_layers": "n_layers",
    "num_heads": "n_heads",
    "num_kv_heads": "n_kv_heads",
    "intermediate_size": "mlp_hidden_size",
    "max_position": "max_sequence_length",
    "eos_token_ids": "eos_token_id",
}


def parse_llada_config(cfg: dict) -> DiffusionLMConfig:
    arch = "LLaDAModelLM"
    for key, allowed in _UNSUPPORTED.items():
        if cfg.get(key) not in allowed:
            raise ValueError(f"{key}={cfg.get(key)!r} is not supported for {arch} (allowed: {allowed[:-1]})")
    d_model = read_int(cfg, "d_model")
    n_heads = read_int(cfg, "n_heads")
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads} (the head size)")
    n_kv = read_int(cfg, "n_kv_heads", 1 if cfg.get("multi_query_attention") else n_heads)
    mlp = read_int(cfg, "mlp_hidden_size", read_int(cfg, "mlp_ratio", 4) * d_model)
    vocab_key = "embedding_size" if cfg.get("embedding_size") is not None else "vocab_size"
    rows = read_int(cfg, vocab_key)
    declared = cfg.get("vocab_size")  # with a padded embedding, the ids that are tokens
    tokens = declared if isinstance(declared, int) and not isinstance(declared, bool) and 1 < declared < rows else None
    return DiffusionLMConfig(
        architecture=arch,
        vocab_size=rows,
        token_vocab_size=tokens,
        hidden_size=d_model,
        num_layers=read_int(cfg, "n_layers"),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=d_model // n_heads,
        intermediate_size=mlp,
        rope_theta=read_float(cfg, "rope_theta", 10000.0),
        rms_norm_eps=read_float(cfg, "rms_norm_eps", 1e-5),
        max_position=read_int(cfg, "max_sequence_length", 4096),
        mask_token_id=read_int(cfg, "mask_token_id", LLADA_MASK_ID, minimum=0),
        eos_token_ids=read_ids(cfg, "eos_token_id", (126081,)),
        qkv_bias=read_bool(cfg, "include_qkv_bias", False),
        tie_word_embeddings=read_bool(cfg, "weight_tying", False),
        logits_shift=False,
        rope_in_float32=read_bool(cfg, "rope_full_precision", True),
        torch_dtype=read_str(cfg, "torch_dtype", "float32"),
        keys=dict(LLADA_KEYS, vocab_size=vocab_key),
    )


class LLaDABlock(nn.Module):
    def __init__(self, layer_id: int, cfg: DiffusionLMConfig):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, kv_width = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(d, d, bias=cfg.qkv_bias)
        self.k_proj = Linear(d, kv_width, bias=cfg.qkv_bias)
        self.v_proj = Linear(d, kv_width, bias=cfg.qkv_bias)
        self.attn_out = Linear(d, d, bias=False)
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = Linear(d, cfg.intermediate_size, bias=False)  # the gate
        self.up_proj = Linear(d, cfg.intermediate_size, bias=False)
        self.ff_out = Linear(cfg.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor):
        def qkv(h: torch.Tensor, rows: slice = slice(None)):  # h: norm1(x[rows])
            q = self.q_proj(h).view(-1, self.n_heads, self.head_dim)
            k = self.k_proj(h).view(-1, self.n_kv, self.head_dim)
            v = self.v_proj(h).view(-1, self.n_kv, self.head_dim)
            return rotary.apply(q, cos[rows], sin[rows]), rotary.apply(k, cos[rows], sin[rows]), v

        return block_forward(self.layer_id, x, self.attn_norm, qkv, self.attn_out, self.ff_norm, self.mlp)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.ff_out(swiglu(self.ff_proj(h), self.up_proj(h)))


class LLaDATransformer(nn.Module):
    def __init__(self, cfg: DiffusionLMConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": Embedding(cfg.vocab_size, cfg.hidden_size),
                "blocks": nn.ModuleList(LLaDABlock(i, cfg) for i in range(cfg.num_layers)),
                "ln_f": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
            }
        )
        if not cfg.tie_word_embeddings:
            self.transformer["ff_out"] = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class LLaDAModelLM(nn.Module):
    """Forward over packed tokens; logits only for the rows asked for (masked positions)."""

    def __init__(self, cfg: DiffusionLMConfig):
        super().__init__()
        self.config = cfg
        self.model = LLaDATransformer(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, in_float32=cfg.rope_in_float32)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, d] (before ln_f)."""
        return self.run_layers(self.embed(input_ids), positions)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](input_ids)

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """Layers [start, end) over hidden states x (a long prefill may run a few layers per step)."""
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for block in list(self.model.transformer["blocks"])[start:end]:
            x = block(x, self.rotary, cos, sin)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        h = t["ln_f"](hidden)
        if "ff_out" in t:
            return t["ff_out"](h)
        return linear(h, t["wte"].weight)
