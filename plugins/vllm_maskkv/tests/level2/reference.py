"""An independent reference for level 2: LLaDA prefix-cache block decoding, in plain torch.

It reads the checkpoint's safetensors itself (neither vLLM's nor maskkv-engine's model code) and runs
one full pass per step over [prompt, committed blocks, canvas] with a segment mask: a token of segment s
attends to the tokens of segments <= s (prompt = 0, block b = b + 1). That is exactly the KV vLLM holds
on level 2: the prompt's KV written at prefill from the prompt alone, each block's KV written at its
commit step against what came before, the canvas attending to all of it and to itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class PrefixCacheLLaDA:
    def __init__(self, path: str | Path):
        root = Path(path)
        self.cfg = json.loads((root / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for f in sorted(root.glob("*.safetensors")):
            self.w.update({k: v.float() for k, v in load_file(str(f)).items()})
        c = self.cfg
        self.n_heads, self.n_kv = c["n_heads"], c["n_kv_heads"]
        self.head_dim = c["d_model"] // c["n_heads"]
        self.eps = c.get("rms_norm_eps", 1e-5)
        self.mask_id = c["mask_token_id"]
        half = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        self.inv_freq = 1.0 / (c["rope_theta"] ** half)

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x [N, H, D], neox style
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * emb.cos() + rotated * emb.sin()

    @torch.no_grad()
    def logits(self, tokens: list[int], segments: list[int]) -> torch.Tensor:
        """[N, vocab] logits of one sequence; token i attends to token j iff segments[j] <= segments[i]."""
        w, n = self.w, len(tokens)
        pos = torch.arange(n)
        seg = torch.tensor(segments)
        allowed = seg[None, :] <= seg[:, None]
        x = w["model.transformer.wte.weight"][torch.tensor(tokens)]
        for layer in range(self.cfg["n_layers"]):
            p = f"model.transformer.blocks.{layer}."
            h = self._rms(x, p + "attn_norm.weight")
            q = self._rope((h @ w[p + "q_proj.weight"].T).view(n, self.n_heads, self.head_dim), pos)
            k = self._rope((h @ w[p + "k_proj.weight"].T).view(n, self.n_kv, self.head_dim), pos)
            v = (h @ w[p + "v_proj.weight"].T).view(n, self.n_kv, self.head_dim)
            group = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed
            ).transpose(0, 1)
            x = x + o.reshape(n, -1) @ w[p + "attn_out.weight"].T
            h = self._rms(x, p + "ff_norm.weight")
            x = x + (F.silu(h @ w[p + "ff_proj.weight"].T) * (h @ w[p + "up_proj.weight"].T)) @ w[p + "ff_out.weight"].T
        head = w.get("model.transformer.ff_out.weight", w["model.transformer.wte.weight"])
        return self._rms(x, "model.transformer.ln_f.weight") @ head.T

    def generate(
        self, prompt: list[int], gen_length: int, block_length: int, steps_per_block: int, max_len: int | None = None
    ) -> list[int]:
        """LLaDA's greedy low-confidence remasking, block by block, each block attending to what precedes it.
        ``max_len`` (vLLM's max_model_len) shortens the last block to what fits, and ends decoding there."""
        seq, segments = list(prompt), [0] * len(prompt)
        for block in range(gen_length // block_length):
            width = min(block_length, (max_len or len(seq) + block_length) - len(seq))
            if width <= 0:
                break
            canvas = torch.full((width,), self.mask_id)
            base, extra = divmod(width, steps_per_block)
            for step in range(steps_per_block):
                logits = self.logits(seq + canvas.tolist(), segments + [block + 1] * width)[-width:]
                x0 = logits.argmax(-1)
                p = torch.softmax(logits.double(), -1).gather(-1, x0[:, None]).squeeze(-1)
                confidence = torch.where(canvas == self.mask_id, p, torch.tensor(-torch.inf, dtype=p.dtype))
                k = base + (1 if step < extra else 0)
                if k:
                    idx = torch.topk(confidence, k).indices
                    canvas[idx] = x0[idx]
            seq += canvas.tolist()
            segments += [block + 1] * width
        return seq[len(prompt) :]
