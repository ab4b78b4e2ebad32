"""LLaDA (``architectures: ["LLaDAModelLM"]``), written for inference in this package (no remote code).

Module names mirror the released checkpoint so its safetensors load by name:
``model.transformer.{wte, blocks.N.{q_proj,k_proj,v_proj,attn_out,attn_norm,ff_norm,ff_proj,up_proj,ff_out},
ln_f, ff_out}``; the top-level ``model.transformer.ff_out`` is the LM head (absent when weight_tying).
"""

from __future__ import annotations

import torch
from torch import nn

from maskkv_engine.models.block import block_forward
from maskkv_engine.models.config import DiffusionLMConfig, as_id_tuple, require
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


def parse_llada_config(cfg: dict) -> DiffusionLMConfig:
    arch = "LLaDAModelLM"
    for key, allowed in _UNSUPPORTED.items():
        if cfg.get(key) not in allowed:
            raise ValueError(
                f"config.json: {key}={cfg.get(key)!r} is not supported for {arch} (allowed: {allowed[:-1]})"
            )
    d_model = int(require(cfg, "d_model", arch))
    n_heads = int(require(cfg, "n_heads", arch))
    n_kv = cfg.get("n_kv_heads") or (1 if cfg.get("multi_query_attention") else n_heads)
    mlp = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4)) * d_model
    vocab = int(cfg.get("embedding_size") or require(cfg, "vocab_size", arch))
    eos = as_id_tuple(cfg.get("eos_token_id", 126081))
    return DiffusionLMConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=d_model,
        num_layers=int(require(cfg, "n_layers", arch)),
        num_heads=n_heads,
        num_kv_heads=int(n_kv),
        head_dim=d_model // n_heads,
        intermediate_size=int(mlp),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position=int(cfg.get("max_sequence_length", 4096)),
        mask_token_id=int(cfg.get("mask_token_id", LLADA_MASK_ID)),
        eos_token_ids=eos,
        qkv_bias=bool(cfg.get("include_qkv_bias", False)),
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        logits_shift=False,
        rope_in_float32=bool(cfg.get("rope_full_precision", True)),
        torch_dtype=str(cfg.get("torch_dtype") or "float32"),
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
        def qkv(h: torch.Tensor):
            q = self.q_proj(h).view(-1, self.n_heads, self.head_dim)
            k = self.k_proj(h).view(-1, self.n_kv, self.head_dim)
            v = self.v_proj(h).view(-1, self.n_kv, self.head_dim)
            return rotary.apply(q, cos, sin), rotary.apply(k, cos, sin), v

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
        t = self.model.transformer
        x = t["wte"](input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for block in t["blocks"]:
            x = block(x, self.rotary, cos, sin)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        h = t["ln_f"](hidden)
        if "ff_out" in t:
            return t["ff_out"](h)
        return linear(h, t["wte"].weight)
