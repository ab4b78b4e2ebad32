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
from maskkv_engine.models.config import DiffusionLMConfig, read_bool, read_float, read_ids, read_int, read_str
from maskkv_engine.models.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, linear, swiglu

DREAM_MASK_ID = 151666

# DiffusionLMConfig field -> the config.json key Dream (Qwen2) spells it with
DREAM_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_position": "max_position_embeddings",
    "eos_token_ids": "eos_token_id",
}


def parse_dream_config(cfg: dict) -> DiffusionLMConfig:
    arch = "DreamModel"
    if cfg.get("use_sliding_window"):
        raise ValueError(f"use_sliding_window=true is not supported for {arch} (allowed: false)")
    if cfg.get("rope_scaling") not in (None, {}):
        raise ValueError(f"rope_scaling={cfg['rope_scaling']!r} is not supported for {arch} (allowed: null)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported for {arch} (allowed: 'silu')")
    hidden = read_int(cfg, "hidden_size")
    n_heads = read_int(cfg, "num_attention_heads")
    if cfg.get("head_dim") is None and hidden % n_heads:
        raise ValueError(f"hidden_size={hidden} must be a multiple of num_attention_heads={n_heads} (or give head_dim)")
    return DiffusionLMConfig(
        architecture=arch,
        vocab_size=read_int(cfg, "vocab_size"),
        hidden_size=hidden,
        num_layers=read_int(cfg, "num_hidden_layers"),
        num_heads=n_heads,
        num_kv_heads=read_int(cfg, "num_key_value_heads", n_heads),
        head_dim=read_int(cfg, "head_dim", hidden // n_heads),
        intermediate_size=read_int(cfg, "intermediate_size"),
        rope_theta=read_float(cfg, "rope_theta", 10000.0),
        rms_norm_eps=read_float(cfg, "rms_norm_eps", 1e-6),
        max_position=read_int(cfg, "max_position_embeddings", 32768),
        mask_token_id=read_int(cfg, "mask_token_id", DREAM_MASK_ID, minimum=0),
        eos_token_ids=read_ids(cfg, "eos_token_id", (151643,)),
        qkv_bias=True,
        tie_word_embeddings=read_bool(cfg, "tie_word_embeddings", False),
        logits_shift=True,
        rope_in_float32=False,
        torch_dtype=read_str(cfg, "torch_dtype", "float32"),
        keys=DREAM_KEYS,
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

        def qkv(h: torch.Tensor, rows: slice = slice(None)):  # h: norm1(x[rows])
            q = a.q_proj(h).view(-1, a.n_heads, a.head_dim)
            k = a.k_proj(h).view(-1, a.n_kv, a.head_dim)
            v = a.v_proj(h).view(-1, a.n_kv, a.head_dim)
            return rotary.apply(q, cos[rows], sin[rows]), rotary.apply(k, cos[rows], sin[rows]), v

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
        return self.run_layers(self.embed(input_ids), positions)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """Layers [start, end) over hidden states x (a long prefill may run a few layers per step)."""
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in list(self.model.layers)[start:end]:
            x = layer(x, self.rotary, cos, sin)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(hidden)
        if hasattr(self, "lm_head"):
            return self.lm_head(h)
        return linear(h, self.model.embed_tokens.weight)
