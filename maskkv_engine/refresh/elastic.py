"""Elastic-Cache (VILA-Lab/Elastic-Cache): refresh only when attention drifts, only from the layer where
it drifts, and decode a sliding window of the leftmost masks.

Per step (after the first, full pass):
* the queried rows Q are the tracked tokens T, the tokens committed by the previous step, and the
  window's masks (all masks without ``block_caching``); layers run in *reuse* mode: only Q is
  recomputed, every other row attends with the K/V it had when it was last computed, and keeps the
  layer input it had then;
* in each reuse layer, the drift test compares the attention of T over all keys with what it was at
  the previous step (cosine across heads, averaged); the first layer where it falls below ``gamma``
  makes every deeper layer a *refresh* layer: all rows are recomputed from their cached layer input;
* in every layer the ``track_num`` most attended tokens of the queried mask rows (the window, or every
  mask of the decoding region without ``block_caching``) are tracked for the next step; the region's
  masks are never tracked;
* with ``early_stop``, the first step that commits a stop token cuts the decoding region to the masks
  before it, once: the masks after it are never decoded (nor queried), even if a stop token is
  committed further left later.

Adaptations (documented in docs/refresh.md): the prompt's K/V live in the KV policy's pages and are
frozen after the first pass (MaskKV's prompt-state exclusion), so refreshes recompute the response
(plus, for Dream, the last prompt token) and tracked tokens are chosen among those positions (none
before a response token is committed).
``window='block'`` is our block-wise variant for LLaDA's fixed blocks: the window is the current
block and the block schedule decides how many tokens commit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskkv_engine.refresh.base import RefreshState, RefreshStrategy, StepPlan


class ElasticState(RefreshState):
    def __init__(self, request, cfg: ElasticCache, num_layers: int):
        super().__init__(request)
        self.cfg = cfg
        self.num_layers = num_layers
        self.x: dict[int, torch.Tensor] = {}  # layer -> [A, d] layer input of the active rows
        self.q: dict[int, torch.Tensor] = {}  # layer -> [A, H_q, D]
        self.k: dict[int, torch.Tensor] = {}  # layer -> [A, H_kv, D]
        self.v: dict[int, torch.Tensor] = {}
        self.track: dict[int, torch.Tensor] = {}  # layer -> tracked active rows (local)
        self.new_rows = torch.zeros(0, dtype=torch.long)  # rows committed by the previous step
        self.start = num_layers  # first refreshed layer of the current step
        self.query_rows = torch.zeros(0, dtype=torch.long)
        self.window_rows = torch.zeros(0, dtype=torch.long)
        self.mask_rows = torch.zeros(0, dtype=torch.long)  # queried mask rows (local)
        self.region_positions = torch.zeros(0, dtype=torch.long)  # the decoding region's masks (absolute)
        self.tracked = torch.zeros(0, dtype=torch.long)

    # ---- planning --------------------------------------------------------------------------------
    def before_plan(self) -> None:
        r = self.request
        a0 = r.n_cached
        window = r.logit_rows(r.candidates()) - a0  # rows whose hidden state predicts the window
        self.window_rows = window
        self.region_positions = r.region()
        # official `query_masked_position`: the mask rows queried (and whose attention picks tracked tokens)
        self.mask_rows = window if self.cfg.block_caching else r.logit_rows(self.region_positions) - a0

    def plan_cached_step(self) -> StepPlan:
        r = self.request
        plan = StepPlan(r.n_cached, r.num_tokens, use_pages=True)
        rows = [self.window_rows, self.new_rows, self.mask_rows]
        if self.track:
            self.tracked = torch.unique(torch.cat(list(self.track.values())))
            rows.append(self.tracked)
        else:
            self.tracked = torch.zeros(0, dtype=torch.long)
        self.query_rows = torch.unique(torch.cat(rows))
        self.start = self.num_layers
        return plan

    # ---- layer hooks -----------------------------------------------------------------------------
    def _active(self, t: torch.Tensor) -> torch.Tensor:
        """The active rows (response, plus Dream's last prompt token) of a tensor over the step's rows."""
        return t[self.request.n_cached - self.plan.start :]

    def prepare(self, layer, q, k, v):
        qa, ka, va = self._active(q), self._active(k), self._active(v)
        device = q.device
        if self.plan.full_pass:
            self.q[layer], self.k[layer], self.v[layer] = qa.clone(), ka.clone(), va.clone()
            self._track(layer, q, k, full=True)
            return k, v, None, None
        if layer >= self.start:  # refresh layer: everything recomputed
            self.q[layer], self.k[layer], self.v[layer] = qa.clone(), ka.clone(), va.clone()
            self._track(layer, q, k, full=False)
            return k, v, None, None
        rows = self.query_rows.to(device)
        tracked = self.tracked.to(device)
        q_old, k_old = self.q[layer][tracked].clone(), self.k[layer].clone()
        self.k[layer][rows], self.v[layer][rows], self.q[layer][rows] = ka[rows], va[rows], qa[rows]
        if tracked.numel():
            sim = self._attention_similarity(layer, q_old, k_old, qa[tracked], self.k[layer])
            if sim < self.cfg.gamma:
                self.start = layer + 1
        self._track(layer, q, self.k[layer], full=False)
        return self.k[layer].clone(), self.v[layer].clone(), None, None

    def rows(self, layer):
        if self.plan.full_pass or layer >= self.start:
            return None
        return self.query_rows.to(self.k[layer].device)

    def merge(self, layer, x, rows, x1, attn_out, mlp_out):
        self.x[layer] = self._active(x).clone()
        if rows is None:
            return None
        if layer + 1 < self.num_layers:
            out = self.x[layer + 1].clone()  # rows not queried keep the input they had at the next layer
        else:
            out = torch.zeros_like(x)
        out[rows] = x1 + mlp_out
        return out

    def after_step(self, num_layers, committed) -> None:
        self.layers_recomputed += num_layers if self.plan.full_pass else num_layers - self.start
        self.layers_total += num_layers
        self.new_rows = committed.cpu() - self.request.n_cached

    # ---- attention probabilities over the whole key set -------------------------------------------
    def _key_set(self, layer: int, k_active: torch.Tensor):
        """Per KV head: (keys [n_h, D], key positions [n_h]) = the kept prompt tokens + the active rows."""
        r = self.request
        a0 = r.n_cached
        active_pos = torch.arange(a0, r.num_tokens, device=k_active.device)
        out = []
        kept = r.prompt_kv(layer)
        if kept is not None:
            pk, _, lens, pos = kept
            for h in range(k_active.shape[1]):
                n = int(lens[h])
                keys = torch.cat([pk[h, :n].to(k_active.dtype), k_active[:, h]])
                out.append((keys, torch.cat([pos[h, :n].to(k_active.device), active_pos])))
        else:
            for h in range(k_active.shape[1]):
                out.append((k_active[:, h], active_pos))
        return out

    def _probs(self, q_rows: torch.Tensor, key_set, num_positions: int) -> torch.Tensor:
        """Softmax attention of q_rows [n, H_q, D] over each head's keys, scattered onto sequence
        positions: [H_q, n, num_positions] (0 where a head holds no key)."""
        n, n_q, d = q_rows.shape
        group = n_q // len(key_set)
        dtype = torch.promote_types(q_rows.dtype, torch.float32)  # the model's precision or higher
        probs = q_rows.new_zeros(n_q, n, num_positions, dtype=dtype)
        for h, (keys, pos) in enumerate(key_set):
            qh = q_rows[:, h * group : (h + 1) * group].transpose(0, 1).to(dtype)  # [G, n, D]
            p = torch.softmax(qh @ keys.to(dtype).t() / math.sqrt(d), dim=-1)
            probs[h * group : (h + 1) * group][:, :, pos] = p
        return probs

    def _attention_similarity(self, layer, q_old, k_old, q_new, k_new) -> float:
        """Mean over (tracked token, key) of the cosine similarity across heads, old vs new attention."""
        n_pos = self.request.num_tokens
        old = self._probs(q_old, self._key_set(layer, k_old), n_pos)
        new = self._probs(q_new, self._key_set(layer, k_new), n_pos)
        present = (old.abs().sum(dim=(0, 1)) + new.abs().sum(dim=(0, 1))) > 0  # positions some head holds
        return float(F.cosine_similarity(old[:, :, present], new[:, :, present], dim=0).mean())

    def _track(self, layer: int, q, k_keys, full: bool) -> None:
        """The ``track_num`` most attended tokens of the queried mask rows (the window, or every region mask
        without block caching), summed over heads and rows. As in the official code the region's masks
        cannot be tracked (masks cut off by the early stop can); unlike it, prompt tokens cannot either
        (their K/V are frozen), so fewer than ``track_num`` tokens, or none, may be tracked."""
        r = self.request
        a0 = r.n_cached
        mask_rows = self.mask_rows.to(q.device)
        allowed = torch.ones(r.num_tokens - a0, dtype=torch.bool, device=q.device)
        allowed[(self.region_positions - a0).to(q.device)] = False
        idx = allowed.nonzero().squeeze(-1)
        if mask_rows.numel() == 0 or idx.numel() == 0:
            self.track[layer] = torch.zeros(0, dtype=torch.long)
            return
        if full:  # the first pass: the whole sequence is the step; every token is a fresh key
            key_set = [(k_keys[:, h], torch.arange(r.num_tokens, device=q.device)) for h in range(k_keys.shape[1])]
            probs = self._probs(q[mask_rows + a0], key_set, r.num_tokens)
        else:
            probs = self._probs(self._active(q)[mask_rows], self._key_set(layer, k_keys), r.num_tokens)
        score = probs.sum(dim=(0, 1))[a0:][idx]  # over heads and mask rows, allowed active positions only
        top = torch.topk(score, min(self.cfg.track_num, idx.numel())).indices
        self.track[layer] = idx[top].cpu()


@dataclass
class ElasticCache(RefreshStrategy):
    name = "elastic"

    gamma: float = 0.9  # refresh when the attention similarity falls below it
    window: int | str = 16  # sliding window of leftmost masks, or 'block' (our block-wise variant)
    track_num: int = 1  # most attended tokens tracked per layer
    block_caching: bool = True  # masks outside the window are not queried
    early_stop: bool = True  # masks after the first committed EOS are never decoded
    stop_tokens: str = "eos"  # what early_stop cuts at: 'eos' (the model's EOS, official) or 'all' (every stop id)

    def cache_bytes_per_token(self, cfg, dtype_bytes: int) -> int:
        """q, K, V and the layer input of every layer for the active rows."""
        return cfg.num_layers * ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.hidden_size) * dtype_bytes

    def __post_init__(self) -> None:
        if not isinstance(self.gamma, (int, float)):
            raise ValueError(f"gamma={self.gamma!r} must be a number")
        if self.window != "block" and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window={self.window!r} must be an integer >= 1 or 'block'")
        if not isinstance(self.track_num, int) or self.track_num < 1:
            raise ValueError(f"track_num={self.track_num!r} must be an integer >= 1")
        if self.stop_tokens not in ("eos", "all"):
            raise ValueError(f"stop_tokens={self.stop_tokens!r} must be 'eos' or 'all'")

    def check(self, request) -> None:
        if request.logits_shift and request.params.remasking == "origin" and self.window != "block":
            raise ValueError(
                "refresh='elastic' decodes its window by confidence, one token a step (or by threshold / factor); "
                "remasking='origin' has no confidence: use maskgit_plus, topk_margin or entropy"
            )

    def decoding_region(self, request) -> dict | None:
        """Elastic decodes a sliding window of the leftmost masks (sampling/sliding_window.py) unless
        ``window='block'``, which keeps LLaDA's block schedule."""
        if self.window == "block":
            return None
        stops = request.eos_token_ids if self.stop_tokens == "eos" else request.stop_token_ids
        return {"region": "sliding_window", "window": self.window, "early_stop": self.early_stop, "stop_ids": stops}

    def new_state(self, request) -> RefreshState:
        return ElasticState(request, self, num_layers=request.num_layers)
