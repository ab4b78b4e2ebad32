"""A small LLaDA for training, and its checkpoint in the released LLaDA layout.

The math is LLaDA's (modeling_llada.py, block_type "llama"): pre-norm blocks,
``x = x + attn_out(attn(attn_norm(x)))`` then ``x = x + ff_out(silu(ff_proj(h)) * up_proj(h))`` with
``h = ff_norm(x)``, a final ``ln_f``, the LM head ``ff_out`` (or ``wte`` when weight_tying), RMSNorm in
float32, neox-style RoPE in float32, bidirectional attention scaled by 1/sqrt(head_dim), and GQA
where query head i reads kv head i // (n_heads / n_kv_heads). Parameter names are the checkpoint's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from maskkv_engine.models.layers import RMSNorm  # the engine's: statistics in float32, then the weight


@dataclass
class ModelConfig:
    vocab_size: int
    embedding_size: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    n_kv_heads: int = 2
    mlp_hidden_size: int = 384
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = True
    max_sequence_length: int = 8192
    mask_token_id: int = 1
    eos_token_id: int = 0
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_llada_json(self) -> dict:
        """config.json with the keys of the released LLaDA-8B config."""
        return {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers,
            "mlp_hidden_size": self.mlp_hidden_size,
            "mlp_ratio": self.mlp_hidden_size // self.d_model,
            "vocab_size": self.vocab_size,
            "embedding_size": self.embedding_size,
            "max_sequence_length": self.max_sequence_length,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "weight_tying": self.weight_tying,
            "activation_type": "silu",
            "block_type": "llama",
            "layer_norm_type": "rms",
            "rope": True,
            "rope_full_precision": True,
            "alibi": False,
            "attention_layer_norm": False,
            "include_bias": False,
            "include_qkv_bias": False,
            "bias_for_layer_norm": False,
            "scale_logits": False,
            "flash_attention": False,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_llada_json(cls, cfg: dict) -> ModelConfig:
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in cfg.items() if k in fields})


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotate_half on the two halves of D (neox style), in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def queries_keys(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated queries and keys [B, H, T, D] of the normed input ``h``, keys repeated per query head
        (query head i reads kv head i // group). Training losses on the attention pattern use it too."""
        b, t, _ = h.shape
        c = self.cfg
        q = apply_rope(self.q_proj(h).view(b, t, c.n_heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        return q, k.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.cfg
        h = self.attn_norm(x)
        q, k = self.queries_keys(h, cos, sin)
        v = self.v_proj(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = v.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # scale 1/sqrt(head_dim)
        x = x + self.attn_out(o.transpose(1, 2).reshape(b, t, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class _Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.embedding_size, cfg.d_model),
                "blocks": nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
                "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            }
        )
        if not cfg.weight_tying:
            self.transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class LLaDA(nn.Module):
    """`forward(ids [B, T]) -> logits [B, T, embedding_size]`; state_dict names are the checkpoint's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Transformer(cfg)
        for p in self.parameters():  # every matrix N(0, 0.02), norms at one
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor, causal: bool = False, hidden_after: int | None = None):
        """ids [B, T] -> logits [B, T, V]. Training-only extras: `causal=True` masks the future
        (LLaDA itself is bidirectional); `hidden_after=i` also returns the residual after block i."""
        t = self.model.transformer
        x = t["wte"](ids)
        cos, sin = rope_cos_sin(torch.arange(ids.shape[1], device=ids.device), self.cfg.head_dim, self.cfg.rope_theta)
        hidden = None
        for i, block in enumerate(t["blocks"]):
            x = block(x, cos, sin, causal)
            if i == hidden_after:
                hidden = x
        logits = self.lm_head(x)
        return logits if hidden_after is None else (logits, hidden)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        head = t["wte"].weight if self.cfg.weight_tying else t["ff_out"].weight
        return F.linear(t["ln_f"](x), head)


def save_checkpoint(model: LLaDA, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
    """Write config.json and model.safetensors in the released LLaDA layout."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.cfg.to_llada_json()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_checkpoint(directory: str | os.PathLike) -> LLaDA:
    root = Path(directory)
    cfg = ModelConfig.from_llada_json(json.loads((root / "config.json").read_text()))
    model = LLaDA(cfg)
    state = {k: v.float() for k, v in load_file(str(root / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
