"""Calibration: measure layer importance and head prompt preference over a few prompts, offline.

Each prompt runs one full pass over [prompt + gen_length masks] (the state of a request at its first
denoising step); the capture hook records, per layer, 1 - mean cos(h_in, h_out) of the attention
sub-layer, and per KV head the share of the mask queries' attention mass on the prompt. Averages over
the prompts form the profile that fixes MaskKV's (and SqueezeAttention's) budgets before a request's
forward pass, which is what lets prefill evict layer by layer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from maskkv_engine.kv.full import FullCachePolicy
from maskkv_engine.kv.prefill_capture import CaptureTarget, PrefillCapture
from maskkv_engine.kv.profile import save_profile
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext
from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.models.forward import full_forward_logits
from maskkv_engine.models.loader import load_model
from maskkv_engine.tokenizer import load_tokenizer


def measure_stats(model, cfg: DiffusionLMConfig, prompt_ids: list[int], gen_length: int) -> ModelStats:
    """Statistics of one prompt at its first denoising step (nothing is kept, nothing is scored)."""
    seq = list(prompt_ids) + [cfg.mask_token_id] * gen_length
    n_cached = len(prompt_ids) - (1 if cfg.logits_shift else 0)
    ctx = PolicyContext(cfg.num_layers, cfg.num_kv_heads, n_cached, len(prompt_ids), len(seq), budget=0)
    keep_nothing = BudgetPlan(per_head=torch.zeros(cfg.num_layers, cfg.num_kv_heads, dtype=torch.long))
    target = CaptureTarget("calibration", 0, ctx, plan=keep_nothing, collect_stats=True)
    full_forward_logits(model, [seq], hooks=PrefillCapture(FullCachePolicy(), None, [target]))
    return PrefillCapture.stats(target)


def calibrate(
    model_path: str | os.PathLike,
    prompts: Sequence[str | list[int]] | None = None,
    gen_length: int = 32,
    num_prompts: int = 8,
    prompt_len: int = 512,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    use_tqdm: bool = True,
) -> ModelStats:
    """Average statistics over ``prompts`` (text needs the model's tokenizer; token id lists always work).

    Without prompts, ``num_prompts`` random token sequences of ``prompt_len`` tokens are used: fine for
    random-weight models, but real models should be calibrated on prompts like the ones they will serve.
    Writes the profile to ``out`` (a file, or a directory: ``<dir>/maskkv_profile.json``) if given.
    """
    model, cfg = load_model(model_path, dtype=dtype, device=device)
    random_prompts = prompts is None
    if prompts is None:
        gen = torch.Generator().manual_seed(seed)
        high = min(cfg.vocab_size, 32000)
        prompts = []
        for _ in range(num_prompts):
            ids = torch.randint(0, high, (prompt_len,), generator=gen)
            ids[ids == cfg.mask_token_id] = 0
            prompts.append(ids.tolist())
    tokenizer = None
    stats = []
    for p in tqdm(prompts, desc="Calibrating", disable=not use_tqdm):
        if isinstance(p, str):
            tokenizer = tokenizer or load_tokenizer(str(model_path))
            if tokenizer is None:
                raise ValueError("text calibration prompts need a tokenizer in the model directory; pass token ids")
            p = tokenizer.encode(p)
        if len(p) < 2:
            raise ValueError("calibration prompts need at least 2 tokens")
        stats.append(measure_stats(model, cfg, p, gen_length))
    profile = ModelStats(
        layer_importance=torch.stack([s.layer_importance for s in stats]).mean(0),
        prompt_preference=torch.stack([s.prompt_preference for s in stats]).mean(0),
    )
    if out is not None:
        meta = {"num_prompts": len(stats), "gen_length": gen_length, "random_prompts": random_prompts}
        save_profile(out, profile, cfg, meta)
    return profile
