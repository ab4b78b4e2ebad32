"""Dream (``architectures: ["DreamModel"]``): the Qwen2 layout with q/k/v biases, bidirectional attention,
and logits shifted by one position (token i is predicted from hidden state i-1).

Module names mirror the released checkpoint: ``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``model.layers.N.mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``,
``lm_head``.
"""

from __future__ import annotations

import torch
from torch import nn

from maskkv_engine.models.block import block_forward
from maskkv_engine.models.config import DiffusionLMConfig, as_id_tuple, require
from maskkv_engine.models.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, linear, swiglu

DREAM_MASK_ID = 151666


def parse_dream_config(cfg: dict) -> DiffusionLMConfig:
    arch = "DreamModel"
    if cfg.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true is not supported for DreamModel (allowed: false)")
    if cfg.get("rope_scaling") not in (None, {}):
        raise ValueError(f"config.json: rope_scaling={cfg['rope_scaling']!r} is not supported (allowed: null)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={cfg['hidden_act']!r} is not supported (allowed: 'silu')")
    hidden = int(require(cfg, "hidden_size", arch))
    n_heads = int(require(cfg, "num_attention_heads", arch))
    return DiffusionLMConfig(
        architecture=arch,
        vocab_size=int(require(cfg, "vocab_size", arch)),
        hidden_size=hidden,
        num_layers=int(require(cfg, "num_hidden_layers", arch)),
        num_heads=n_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        intermediate_size=int(require(cfg, "intermediate_size", arch)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=int(cfg.get("max_position_embeddings", 32768)),
        mask_token_id=int(cfg.get("mask_token_id", DREAM_MASK_ID)),
        eos_token_ids=as_id_tuple(cfg.get("eos_token_id", 151643)),
        qkv_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        logits_shift=True,
        rope_in_float32=False,
        torch_dtype=str(cfg.get("torch_dtype") or "float32"),
    )


class DreamAttention(nn.Module):
    def __init__(self, cfg: DiffusionLMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = Linear(d, cfg.num_heads * cfg.head_dim, bias=True)
        self.k_proj = Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, d, bias=False)


class DreamMLP(nn.Module):
    def __init__(self, cfg: DiffusionLMConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DreamDecoderLayer(nn.Module):
    def __init__(self, layer_id: int, cfg: DiffusionLMConfig):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = DreamAttention(cfg)
        self.mlp = DreamMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor):
        a = self.self_attn

        def qkv(h: torch.Tensor):
            q = a.q_proj(h).view(-1, a.n_heads, a.head_dim)
            k = a.k_proj(h).view(-1, a.n_kv, a.head_dim)
            v = a.v_proj(h).view(-1, a.n_kv, a.head_dim)
            return rotary.apply(q, cos, sin), rotary.apply(k, cos, sin), v

        return block_forward(
            self.layer_id, x, self.input_layernorm, qkv, a.o_proj, self.post_attention_layernorm, self.mlp_forward
        )

    def mlp_forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        return m.down_proj(swiglu(m.gate_proj(h), m.up_proj(h)))


class DreamBackbone(nn.Module):
    def __init__(self, cfg: DiffusionLMConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(i, cfg) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DreamModel(nn.Module):
    """Forward over packed tokens. ``compute_logits(hidden[i-1])`` gives the logits of position i."""

    def __init__(self, cfg: DiffusionLMConfig):
        super().__init__()
        self.config = cfg
        self.model = DreamBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, in_float32=cfg.rope_in_float32)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, self.rotary, cos, sin)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(hidden)
        if hasattr(self, "lm_head"):
            return self.lm_head(h)
        return linear(h, self.model.embed_tokens.weight)
