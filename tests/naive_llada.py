"""LLaDA written out plainly in float64, straight from the checkpoint files (no package code).

Layer-level primitives let the tests build independent reference decoders (full recompute, prefix
caches, Elastic-Cache) to compare the engine with.
"""

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


class NaiveLLaDA:
    def __init__(self, path: Path):
        self.cfg = cfg = json.loads((Path(path) / "config.json").read_text())
        self.w = read_weights(Path(path))
        self.d, self.nh, self.nkv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
        self.hd, self.eps = self.d // self.nh, cfg["rms_norm_eps"]
        self.num_layers = cfg["n_layers"]
        self.inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd)

    def rms(self, x, weight):
        return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rope(self, x, positions):  # x [n, heads, hd]
        ang = torch.as_tensor(positions, dtype=torch.float64)[:, None] * self.inv_freq[None]
        cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
        half = self.hd // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def embed(self, ids) -> torch.Tensor:
        return self.w["model.transformer.wte.weight"][torch.as_tensor(ids)]

    def qkv(self, layer: int, x: torch.Tensor, positions):
        """Post-RoPE q [n, H, D], k and v [n, H_kv, D] of rows ``x`` at ``positions``."""
        p = f"model.transformer.blocks.{layer}."
        n = x.shape[0]
        h = self.rms(x, self.w[p + "attn_norm.weight"])
        q = (h @ self.w[p + "q_proj.weight"].T).view(n, self.nh, self.hd)
        k = (h @ self.w[p + "k_proj.weight"].T).view(n, self.nkv, self.hd)
        v = (h @ self.w[p + "v_proj.weight"].T).view(n, self.nkv, self.hd)
        return self.rope(q, positions), self.rope(k, positions), v

    def probs(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Softmax attention [H, n, m] of q [n, H, D] over keys [m, H_kv, D] (no mask)."""
        k = keys.transpose(0, 1).repeat_interleave(self.nh // self.nkv, dim=0)
        return torch.softmax(q.transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(self.hd), dim=-1)

    def finish(self, layer: int, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """The rest of the block for rows ``x`` given their queries and the key/value set."""
        p = f"model.transformer.blocks.{layer}."
        v = values.transpose(0, 1).repeat_interleave(self.nh // self.nkv, dim=0)
        att = (self.probs(q, keys) @ v).transpose(0, 1).reshape(x.shape[0], self.d)
        x = x + att @ self.w[p + "attn_out.weight"].T
        h = self.rms(x, self.w[p + "ff_norm.weight"])
        gate, up = h @ self.w[p + "ff_proj.weight"].T, h @ self.w[p + "up_proj.weight"].T
        return x + (torch.nn.functional.silu(gate) * up) @ self.w[p + "ff_out.weight"].T

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.rms(x, self.w["model.transformer.ln_f.weight"])
        head = (
            self.w["model.transformer.wte.weight"]
            if self.cfg["weight_tying"]
            else self.w["model.transformer.ff_out.weight"]
        )
        return x @ head.T

    def forward(self, ids, positions=None, extra_k=None, extra_v=None):
        """Rows ``ids`` at ``positions`` attending to themselves plus per-layer extra (cached) K/V.

        Returns logits [n, V] and per layer the rows' (q, k, v)."""
        positions = list(range(len(ids))) if positions is None else positions
        x = self.embed(ids)
        per_layer = []
        for layer in range(self.num_layers):
            q, k, v = self.qkv(layer, x, positions)
            per_layer.append((q, k, v))
            keys, values = k, v
            if extra_k is not None:
                keys, values = torch.cat([extra_k[layer], k]), torch.cat([extra_v[layer], v])
            x = self.finish(layer, x, q, keys, values)
        return self.logits(x), per_layer


def naive_llada(path: Path, ids: list[int]):
    """Logits [n, V] and, per layer, the post-RoPE q [n, H, D], k and v [n, H_kv, D] of a full pass."""
    logits, per_layer = NaiveLLaDA(path).forward(ids)
    return logits, [q for q, _, _ in per_layer], [k for _, k, _ in per_layer], [v for _, _, v in per_layer]


def naive_llada_logits(path: Path, ids: list[int]) -> torch.Tensor:
    return naive_llada(path, ids)[0]
