"""Calibration: measure layer importance and head prompt preference over a few prompts, offline.

Each prompt runs one full pass over [prompt + gen_length masks] (the state of a request at its first
denoising step); the capture hook records, per layer, 1 - mean cos(h_in, h_out) of the attention
sub-layer, and per KV head the share of the mask queries' attention mass on the prompt. Averages over
the prompts form the profile that fixes MaskKV's (and SqueezeAttention's) budgets before a request's
forward pass, which is what lets prefill evict layer by layer.

The statistics are only as good as the prompts: calibrating on random tokens (or on text the tokenizer
mostly maps to its unknown token) measures how the model attends to noise, which can send budget to
the wrong layers and heads for real prompts. Without prompts, the default is therefore a shipped
public-domain English text (``assets/calibration/``) through the model's own tokenizer; random tokens
only when asked for explicitly (``random_prompts=True``, e.g. for random-weight test models).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

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

logger = logging.getLogger(__name__)

CALIBRATION_TEXT = Path(__file__).resolve().parents[1] / "assets" / "calibration" / "devils_dictionary.txt"
MAX_UNKNOWN_SHARE = 0.5  # above this share of unknown tokens the text says little about real prompts


def text_prompts(tokenizer, num_prompts: int, prompt_len: int, mask_token_id: int | None = None) -> list[list[int]]:
    """``num_prompts`` windows of ``prompt_len`` tokens, evenly spaced over the shipped calibration text
    tokenized by ``tokenizer``. Refuses a tokenizer that maps most of the text to its unknown token."""
    ids = tokenizer(CALIBRATION_TEXT.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids:
        share = sum(1 for i in ids if i == unk) / len(ids)
        if share > MAX_UNKNOWN_SHARE:
            raise ValueError(
                f"the model's tokenizer maps {share:.0%} of the calibration text ({CALIBRATION_TEXT.name}) to its "
                f"unknown token (a word-level vocabulary?): a profile measured on it would describe attention to "
                f"unknown-token runs. Calibrate on prompts like the ones the model serves (--prompts-file / prompts=)"
            )
    if mask_token_id is not None:
        ids = [i for i in ids if i != mask_token_id]
    total = len(ids)
    length = min(prompt_len, total)
    if length < 2:
        raise ValueError("the calibration text tokenizes to fewer than 2 tokens")
    last = total - length
    starts = [round(last * i / max(num_prompts - 1, 1)) for i in range(num_prompts)]
    return [ids[s : s + length] for s in starts]


def random_token_prompts(cfg: DiffusionLMConfig, num_prompts: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Random token ids (never the mask token): only for random-weight models, whose attention means nothing."""
    gen = torch.Generator().manual_seed(seed)
    high = min(cfg.vocab_size, 32000)
    prompts = []
    for _ in range(num_prompts):
        ids = torch.randint(0, high, (prompt_len,), generator=gen)
        ids[ids == cfg.mask_token_id] = 0
        prompts.append(ids.tolist())
    return prompts


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
    random_prompts: bool = False,
) -> ModelStats:
    """Average statistics over ``prompts`` (text needs the model's tokenizer; token id lists always work).

    Without prompts: ``num_prompts`` windows of ``prompt_len`` tokens of the shipped public-domain English
    text, through the model's tokenizer (a model without one, or whose tokenizer maps most of the text to
    its unknown token, raises ValueError); with ``random_prompts=True``, random token sequences instead
    (``seed``), which only suit random-weight models. Real models are best calibrated on prompts like the
    ones they will serve. Writes the profile to ``out`` (a file, or a directory:
    ``<dir>/maskkv_profile.json``) if given.
    """
    model, cfg = load_model(model_path, dtype=dtype, device=device)
    tokenizer = None
    source = "given"
    if prompts is not None and random_prompts:
        raise ValueError("give either prompts or random_prompts=True, not both")
    if random_prompts:
        prompts, source = random_token_prompts(cfg, num_prompts, prompt_len, seed), "random"
    elif prompts is None:
        tokenizer = load_tokenizer(str(model_path))
        if tokenizer is None:
            raise ValueError(
                f"{model_path} has no tokenizer, so the calibration text cannot be tokenized: pass prompts as "
                f"token id lists (--prompts-file), or random_prompts=True (--random-prompts) for a random-weight model"
            )
        prompts, source = text_prompts(tokenizer, num_prompts, prompt_len, cfg.mask_token_id), CALIBRATION_TEXT.name
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
        meta = {
            "num_prompts": len(stats),
            "gen_length": gen_length,
            "random_prompts": random_prompts,
            "prompts": source,
        }
        save_profile(out, profile, cfg, meta)
    return profile
