"""Runs a KV policy inside a request's first full pass and writes the kept prompt KV into pages.

The step context hands it every layer's post-RoPE q/k/v of the whole packed batch. For each request
being captured it scores the cached-prompt keys with the policy's observation queries, picks the top-k
per KV head and stores them, then lets the layer's full KV go. With budgets known before the pass (a
profile, or an allocator that needs none) this happens layer by layer; otherwise (online statistics)
every layer's prompt KV is held until ``finalize``. Pages go to a ``PageStore`` handed in (the engine's
BlockManager), so nothing here reaches back up into the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from maskkv_engine.attention.hooks import StepHooks
from maskkv_engine.attention.transfer import to_device
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.page_store import PageStore
from maskkv_engine.kv.types import BudgetPlan, ModelStats, PolicyContext


@dataclass
class CaptureTarget:
    """One request captured in this pass: its rows in the packed stream and its plan."""

    request_id: str
    row_start: int
    ctx: PolicyContext
    plan: BudgetPlan | None  # None: decided at finalize from the request's own statistics
    collect_stats: bool = False
    rewrite: bool = False  # a refresh: rewrite the already kept tokens' K/V, choose nothing
    kept_tokens: int = 0
    # online buffers, per layer
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    importance: list[float] = field(default_factory=list)
    preference: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.ctx.n_total)


class PrefillCapture(StepHooks):
    """Also usable on its own as the hooks of a plain full pass (calibration, tests: ``pages=None``
    writes nothing)."""

    def __init__(self, policy: KVPolicy, pages: PageStore | None, targets: list[CaptureTarget]):
        self.policy = policy
        self.pages = pages
        self.targets = targets

    # ---- hooks called by the model ---------------------------------------------------------------
    def prepare_attention(self, layer, q, k, v, meta):
        self.on_qkv(layer, q, k, v)
        return q, k, v, meta

    def on_qkv(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        held = 0
        for t in self.targets:
            if t.rewrite:
                if self.pages is not None:
                    n = t.ctx.n_cached
                    self.pages.rewrite(t.request_id, layer, k[t.rows][:n], v[t.rows][:n])
                continue
            qs, ks, vs = q[t.rows], k[t.rows], v[t.rows]
            scores, preference = self._score(qs, ks, t)
            if t.collect_stats:  # statistics are host math (calibration, online plans)
                t.preference.append(preference.cpu())
            if t.plan is not None:
                self._keep(t, layer, ks, vs, scores, t.plan, preference)
            else:
                n = t.ctx.n_cached
                t.keys.append(ks[:n].clone())
                t.values.append(vs[:n].clone())
                t.scores.append(scores)
            held += sum(x.numel() * x.element_size() for x in t.keys + t.values)
        layer_kv = k.numel() * k.element_size() + v.numel() * v.element_size()
        if self.pages is not None:
            self.pages.set_transient_bytes(layer_kv + held)

    def on_attention_residual(
        self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor, offsets: dict[int, int] | None = None
    ) -> None:
        """``offsets``: where each target's rows start in ``h_in`` / ``h_out`` when the step computed only
        some rows of other sequences (keyed by the target's packed ``row_start``); None: packed order."""
        for t in self.targets:
            if t.collect_stats:
                start = t.row_start if offsets is None else offsets[t.row_start]
                rows = slice(start, start + t.ctx.n_total)
                cos = F.cosine_similarity(h_in[rows].float(), h_out[rows].float(), dim=-1)
                t.importance.append(1.0 - float(cos.mean()))

    def finalize(self) -> None:
        """Decide online plans, write their pages, drop every full-KV buffer, return unused reservations."""
        for t in self.targets:
            if t.rewrite:
                continue
            if t.plan is None:
                plan = self.policy.plan(t.ctx, self.stats(t))
                for layer in range(t.ctx.num_layers):
                    self._keep_selected(t, layer, t.keys[layer], t.values[layer], t.scores[layer], plan)
                t.keys, t.values, t.scores = [], [], []
            if self.pages is not None and self.pages.has_request(t.request_id):
                self.pages.release_reservation(t.request_id)
        if self.pages is not None:
            self.pages.set_transient_bytes(0)

    @staticmethod
    def stats(t: CaptureTarget) -> ModelStats:
        return ModelStats(
            layer_importance=torch.tensor(t.importance, dtype=torch.float64),
            prompt_preference=torch.stack(t.preference).double(),
        )

    # ---- scoring ---------------------------------------------------------------------------------
    def _score(
        self, qs: torch.Tensor, ks: torch.Tensor, t: CaptureTarget
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-KV-head scores of the cached keys [H_kv, n_cached] (None if the policy keeps everything),
        and, when collecting statistics, each head's prompt preference [H_kv]. Both stay on the device: one
        head at a time bounds the probabilities' memory, and nothing is read back per head."""
        ctx = t.ctx
        want_scores = self.policy.needs_scores
        want_preference = t.collect_stats or (t.plan is not None and t.plan.needs_preference)
        if not want_scores and not want_preference:
            return None, None
        obs = self.policy.observation(ctx)
        mask = ctx.mask_queries
        n_kv = ks.shape[1]
        group = qs.shape[1] // n_kv
        scale = 1.0 / math.sqrt(qs.shape[-1])
        compute = torch.float64 if qs.dtype == torch.float64 else torch.float32
        scores = torch.empty(n_kv, ctx.n_cached, dtype=compute, device=qs.device) if want_scores else None
        preference = torch.empty(n_kv, dtype=torch.float64, device=qs.device) if want_preference else None
        for h in range(n_kv):
            keys = ks[:, h].to(compute)  # [N, D]
            heads = slice(h * group, (h + 1) * group)

            def probs_for(rows: slice, heads=heads, keys=keys) -> torch.Tensor:
                qg = qs[rows, heads].to(compute).transpose(0, 1)  # [G, n_obs, D]
                return torch.softmax(torch.matmul(qg, keys.t()) * scale, dim=-1)  # [G, n_obs, N]

            probs = probs_for(obs) if want_scores else None
            if want_scores:
                scores[h] = self.policy.score(probs, ctx)
            if want_preference:
                mprobs = probs if (want_scores and obs == mask) else probs_for(mask)
                # share of the mask queries' attention mass on the (cacheable) prompt keys
                preference[h] = mprobs[:, :, : ctx.n_cached].sum(-1).mean()
        return scores, preference

    # ---- selection and storage -------------------------------------------------------------------
    def _keep(self, t: CaptureTarget, layer: int, ks, vs, scores, plan: BudgetPlan, preference=None) -> None:
        n = t.ctx.n_cached
        self._keep_selected(t, layer, ks[:n], vs[:n], scores, plan, preference)

    @staticmethod
    def _to_host(scores: torch.Tensor | None, preference: torch.Tensor | None) -> tuple:
        """(scores, preference) on the host from one copy (packed as float64: exact for both)."""
        given = [x for x in (scores, preference) if x is not None]
        if not given:
            return scores, preference
        host = torch.cat([x.double().reshape(-1) for x in given]).cpu()
        out = iter(host.split([x.numel() for x in given]))
        return tuple(None if x is None else next(out).view(x.shape).to(x.dtype) for x in (scores, preference))

    def _keep_selected(self, t: CaptureTarget, layer: int, kc, vc, scores, plan: BudgetPlan, preference=None) -> None:
        """kc, vc: [n_cached, H_kv, D] of one layer; store the top-``budget`` of each head. ``preference``:
        this request's prompt preference [H_kv] at the layer (for plans that split heads by it). The top-k
        runs on the device; the kept positions come to the host once per layer, with the page write."""
        if plan.per_head is not None:
            lens = plan.per_head[layer]
        else:  # the allocator's split is host math over this layer's scores and preference: one copy
            host_scores, host_preference = self._to_host(scores, preference)
            lens = self.policy.split_heads(layer, int(plan.per_layer[layer]), host_scores, t.ctx, host_preference)
        lens = lens.clamp(0, t.ctx.n_cached).to(torch.long)
        n_kv = kc.shape[1]
        keeps = lens.tolist()
        width = max(max(keeps), 1)
        positions = torch.zeros(n_kv, width, dtype=torch.long, device=kc.device)
        for h, keep in enumerate(keeps):
            if keep == 0:
                continue
            if scores is None or keep >= t.ctx.n_cached:
                positions[h, :keep] = torch.arange(keep, device=kc.device)
            else:
                positions[h, :keep] = torch.topk(scores[h], keep).indices.sort().values
        (kept,) = to_device([torch.arange(width)[None, :] < lens[:, None]], kc.device)  # [H_kv, width]
        heads = torch.arange(n_kv, device=kc.device)[:, None]
        kept = kept.bool()[..., None]
        k_rows = torch.where(kept, kc[positions, heads], 0)  # [H_kv, width, D], zero past each head's length
        v_rows = torch.where(kept, vc[positions, heads], 0)
        t.kept_tokens += sum(keeps)
        if self.pages is not None:
            self.pages.store(t.request_id, layer, k_rows, v_rows, lens, positions)
