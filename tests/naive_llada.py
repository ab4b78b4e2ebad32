"""LLaDA's forward written out plainly in float64, straight from the checkpoint files (no package code)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    return {k: v.double() for k, v in weights.items()}


def naive_llada(
    path: Path, ids: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """LLaDA's forward written out plainly in float64 from the checkpoint tensors (no package code).

    Returns the logits [n, V] and, per layer, the post-RoPE q [n, H, D], k and v [n, H_kv, D]."""
    cfg = json.loads((path / "config.json").read_text())
    w = read_weights(path)
    d, nh, nkv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    hd, eps = d // nh, cfg["rms_norm_eps"]
    n = len(ids)

    def rms(x, weight):
        return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # [heads, n, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    qs, ks, vs = [], [], []
    x = w["model.transformer.wte.weight"][torch.tensor(ids)]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "q_proj.weight"].T).view(n, nh, hd).transpose(0, 1)
        k = (h @ w[p + "k_proj.weight"].T).view(n, nkv, hd).transpose(0, 1)
        v = (h @ w[p + "v_proj.weight"].T).view(n, nkv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        qs.append(q.transpose(0, 1))
        ks.append(k.transpose(0, 1))
        vs.append(v.transpose(0, 1))
        k = k.repeat_interleave(nh // nkv, dim=0)
        v = v.repeat_interleave(nh // nkv, dim=0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1) @ v  # no causal mask
        x = x + att.transpose(0, 1).reshape(n, d) @ w[p + "attn_out.weight"].T
        h = rms(x, w[p + "ff_norm.weight"])
        gate, up = h @ w[p + "ff_proj.weight"].T, h @ w[p + "up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "ff_out.weight"].T
    x = rms(x, w["model.transformer.ln_f.weight"])
    head = w["model.transformer.wte.weight"] if cfg["weight_tying"] else w["model.transformer.ff_out.weight"]
    return x @ head.T, qs, ks, vs


def naive_llada_logits(path: Path, ids: list[int]) -> torch.Tensor:
    return naive_llada(path, ids)[0]
