"""dLLM-Cache (maomaocun/dLLM-cache): prompt and response refreshed on their own periods, with V-verify
partial updates of the response in between.

Forward s (1-based) refreshes the prompt when (s-1) % K_p == 0 and the whole response when
(s-1) % K_r == 0. Per layer the response keeps K, V, the attention output and the MLP output. On a
step without a response refresh, each layer computes V for every response row, compares it with the
cached V (cosine over the whole vector) and recomputes only the floor(rho * G) least similar rows
(their Q, K, attention and MLP); the other rows take their cached attention / MLP outputs on top of
their current input, attend with their cached K and their fresh V. With rho = 0 there is no V-verify
(the official hook's ``transfer`` is ``0 < rho <= 1``): the response's cached K *and V* are used as they
are, also by the prompt rows of a prompt-only refresh. Layer 0 always refreshes the response (the
official code refreshes layer 0 fully).

Here the prompt lives in the KV policy's pages: a prompt refresh is a full pass that rewrites the
kept tokens' K/V (no re-selection). Between prompt refreshes the prompt is not in the step at all, so
the official "layer 0 refreshes the prompt too" changes nothing here (the prompt's layer-0 K/V depend
only on its tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskkv_engine.refresh.base import RefreshState, RefreshStrategy, StepPlan


class DLLMCacheState(RefreshState):
    def __init__(self, request, cfg: DLLMCache):
        super().__init__(request)
        self.cfg = cfg
        self.forwards = 0  # forward passes run so far (s - 1 for the next one)
        self.k: dict[int, torch.Tensor] = {}  # layer -> [G, H_kv, D] response K
        self.v: dict[int, torch.Tensor] = {}
        self.attn: dict[int, torch.Tensor] = {}  # layer -> [G, d] attention output (after out_proj)
        self.mlp: dict[int, torch.Tensor] = {}
        self.refresh_response = True
        self._rows: dict[int, torch.Tensor | None] = {}
        self._selected: dict[int, torch.Tensor] = {}

    def before_plan(self) -> None:
        self.refresh_response = self.forwards % self.cfg.K_r == 0  # forwards = (s - 1) of the coming forward

    def plan_cached_step(self) -> StepPlan:
        r = self.request
        if self.forwards % self.cfg.K_p == 0:  # a prompt refresh: rewrite the kept tokens' K/V
            return StepPlan(0, r.num_tokens, full_pass=True, rewrite=True)
        return StepPlan(r.n_cached, r.num_tokens, use_pages=True)

    @property
    def _resp0(self) -> int:
        """First response row of the step (local)."""
        return self.request.n_cached - self.plan.start

    def prepare(self, layer, q, k, v):
        r0 = self._resp0
        k_resp, v_resp = k[r0:], v[r0:]
        if self.refresh_response or layer == 0 or layer not in self.v:
            self.k[layer], self.v[layer] = k_resp.clone(), v_resp.clone()
            self._rows[layer] = None
            return k, v, None, None
        chosen = torch.zeros(0, dtype=torch.long, device=k.device)
        if self.cfg.rho > 0:  # V-verify (the official hook's `transfer`): V is replaced for every row
            chosen = self._least_similar(v_resp, self.v[layer])
            self.v[layer] = v_resp.clone()
            self.k[layer][chosen] = k_resp[chosen]
        self._selected[layer] = chosen
        k_out, v_out = k.clone(), v.clone()
        k_out[r0:], v_out[r0:] = self.k[layer], self.v[layer]  # cached K/V except the chosen rows' K
        self._rows[layer] = torch.cat([torch.arange(r0, device=k.device), chosen + r0])
        return k_out, v_out, None, None

    def _least_similar(self, v_new: torch.Tensor, v_old: torch.Tensor) -> torch.Tensor:
        """The floor(rho * G) rows whose V changed most (lowest cosine over the whole vector), in the
        model's precision or higher (float32 for half-precision models)."""
        n = v_new.shape[0]
        n_sel = math.floor(self.cfg.rho * n)
        if n_sel == 0:
            return torch.zeros(0, dtype=torch.long, device=v_new.device)
        dtype = torch.promote_types(v_new.dtype, torch.float32)
        sim = F.cosine_similarity(v_new.reshape(n, -1).to(dtype), v_old.reshape(n, -1).to(dtype), dim=-1)
        return torch.topk(sim, n_sel, largest=False).indices.sort().values

    def rows(self, layer):
        return self._rows.get(layer)

    def merge(self, layer, x, rows, x1, attn_out, mlp_out):
        r0 = self._resp0
        if rows is None:
            self.attn[layer], self.mlp[layer] = attn_out[r0:].clone(), mlp_out[r0:].clone()
            return None
        chosen = self._selected[layer]
        resp = x[r0:] + self.attn[layer] + self.mlp[layer]  # cached outputs on the current input
        computed = x1 + mlp_out
        resp[chosen] = computed[r0:]
        self.attn[layer][chosen] = attn_out[r0:]
        self.mlp[layer][chosen] = mlp_out[r0:]
        return torch.cat([computed[:r0], resp])

    def after_step(self, num_layers, committed) -> None:
        self.forwards += 1
        full = self.refresh_response or self.plan.full_pass
        self.layers_recomputed += num_layers if full else 1  # layer 0 always refreshes the response
        self.layers_total += num_layers
        self._rows.clear()
        self._selected.clear()


@dataclass
class DLLMCache(RefreshStrategy):
    name = "dllm_cache"

    K_p: int = 100  # prompt refresh period (forward passes); demo_LLaDA.py's value
    K_r: int = 7  # response refresh period
    rho: float = 0.25  # share of response rows V-verify recomputes between refreshes

    def cache_bytes_per_token(self, cfg, dtype_bytes: int) -> int:
        """K, V, attention and MLP outputs of every layer for the response rows."""
        return cfg.num_layers * 2 * (cfg.num_kv_heads * cfg.head_dim + cfg.hidden_size) * dtype_bytes

    def __post_init__(self) -> None:
        for name in ("K_p", "K_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.rho, (int, float)) or not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho={self.rho!r} must be in [0, 1]")

    def new_state(self, request) -> RefreshState:
        return DLLMCacheState(request, self)
