"""From (request id, prompt, SamplingParams) to a Request with each contract's state set, or a clear error.

Every check runs before the engine's state changes: a refused request holds nothing. The request's decoding
rule, refresh strategy and KV plan are decided here, once, so the scheduler and the runner only read them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import torch

from maskkv_engine.config import EngineConfig
from maskkv_engine.engine.output_processor import request_stop_rules
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.planner import KVPlanner
from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.refresh.base import RefreshStrategy
from maskkv_engine.refresh.registry import get_refresh
from maskkv_engine.refresh.view import PromptKVReader, RequestView
from maskkv_engine.request import Request
from maskkv_engine.sampling.registry import get_rule
from maskkv_engine.sampling.sliding_window import denoise_state_for
from maskkv_engine.sampling_params import SamplingParams

PromptType = str | dict[str, Any] | list[int]

REFRESH_CACHE_SIZE = 64  # distinct per-request refresh configs kept built (a client can send any number)


class InputProcessor:
    def __init__(
        self,
        config: EngineConfig,
        model_config: DiffusionLMConfig,
        max_model_len: int,
        tokenizer,
        policy: KVPolicy,
        planner: KVPlanner,
        stop_token_ids: tuple[int, ...],
        num_pages: int | None,
        device: torch.device,
        read_prompt_kv: PromptKVReader | None = None,
    ):
        """``read_prompt_kv``: a read-only reader of a request's kept prompt KV, for refresh strategies."""
        self.config = config
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.policy = policy
        self.planner = planner
        self.stop_token_ids = stop_token_ids
        self.num_pages = num_pages
        self.device = device
        self.read_prompt_kv = read_prompt_kv
        self.refresh = get_refresh(config.refresh, config.refresh_config)
        self._check_refresh(self.refresh, cfg_scale=0.0)
        self._refresh_by_config: OrderedDict[tuple, RefreshStrategy] = OrderedDict()

    def process(
        self, request_id: str, prompt: PromptType, params: SamplingParams, arrival_time: float | None, seed: int
    ) -> Request:
        text, token_ids = self.tokenize(prompt)
        self.validate(params, token_ids)
        refresh = self.refresh_for(params)
        budget = self.planner.budget(params.kv_budget, self.config.kv_budget)
        params, stop_ids = request_stop_rules(
            params, self.stop_token_ids, self.model_config.mask_token_id, self.tokenizer is not None
        )
        cfg = self.model_config
        req = Request(
            request_id,
            text,
            token_ids,
            params,
            arrival_time if arrival_time is not None else time.monotonic(),
            cfg.mask_token_id,
            stop_ids,
            cfg.logits_shift,
            params.seed if params.seed is not None else seed,
            budget,
            self.device,
            uses_cache=self.policy.caches,
            num_layers=cfg.num_layers,
        )
        req.eos_token_ids = tuple(i for i in cfg.eos_token_ids if i in self.stop_token_ids)
        view = RequestView(req, self.read_prompt_kv)
        refresh.check(view)
        req.state = denoise_state_for(params, req.prompt_len, cfg.logits_shift, refresh.decoding_region(view))
        req.refresh_state = refresh.new_state(view)
        req.policy_ctx = self.planner.context(req.n_cached, req.prompt_len, req.num_tokens, budget)
        req.kv_plan = self.planner.plan(req.policy_ctx)
        req.collect_stats = self.planner.online
        if self.num_pages is not None:
            need = self.planner.pages_needed(req.policy_ctx, req.kv_plan)
            if need > self.num_pages:
                raise ValueError(
                    f"request {request_id!r} needs up to {need} KV pages but the pool has only "
                    f"{self.num_pages}: lower kv_budget or the prompt length, or give the pool more memory"
                )
        return req

    # ---- the refresh strategy --------------------------------------------------------------------
    def refresh_for(self, params: SamplingParams) -> RefreshStrategy:
        """The request's refresh strategy (its own when SamplingParams names one), checked against the policy.
        Built strategies are kept for the last few distinct configs only."""
        if params.refresh is None and params.refresh_config is None:
            strategy = self.refresh
        else:
            name = params.refresh or self.config.refresh
            config = (
                params.refresh_config
                if params.refresh_config is not None
                else (self.config.refresh_config if name == self.config.refresh else {})
            )
            key = (name, tuple(sorted((k, repr(v)) for k, v in config.items())))
            strategy = self._refresh_by_config.pop(key, None) or get_refresh(name, config)
            self._refresh_by_config[key] = strategy
            while len(self._refresh_by_config) > REFRESH_CACHE_SIZE:
                self._refresh_by_config.popitem(last=False)
        self._check_refresh(strategy, params.cfg_scale)
        return strategy

    def _check_refresh(self, strategy: RefreshStrategy, cfg_scale: float) -> None:
        if strategy.needs_cache and not self.policy.caches:
            raise ValueError(
                f"refresh={strategy.name!r} reuses cached KV, but kv_policy='none' keeps none "
                f"(allowed with 'none': 'every_step', the reference decoder)"
            )
        if strategy.needs_cache and cfg_scale > 0:
            raise ValueError(f"cfg_scale > 0 runs with refresh='every_step' only (refresh={strategy.name!r})")

    # ---- prompt and params -----------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and isinstance(prompt.get("prompt"), str):
            prompt = prompt["prompt"]  # vLLM's TextPrompt
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt needs the key 'prompt_token_ids' (token ids) or 'prompt' (text)")
            ids = prompt["prompt_token_ids"]
            text = prompt.get("prompt")
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "this model has no tokenizer (or skip_tokenizer_init=True): pass {'prompt_token_ids': [...]}"
                )
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            text = prompt
        elif isinstance(prompt, (list, tuple)):
            ids, text = list(prompt), None
        else:
            raise TypeError(f"prompt must be a string, a token id list or a dict, got {type(prompt).__name__}")
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of ints")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids contains ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return text, list(ids)

    def validate(self, params: SamplingParams, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty: give at least one token")
        total = len(token_ids) + params.gen_length
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + gen_length ({params.gen_length}) = {total} exceeds "
                f"max_model_len={self.max_model_len}"
            )
        if self.model_config.mask_token_id in token_ids:
            raise ValueError(f"prompt contains the mask token id {self.model_config.mask_token_id}")
        dream = self.model_config.logits_shift
        get_rule(params.remasking).validate(params, dream)
        if dream and params.block_length != params.gen_length:
            raise ValueError("Dream decodes the whole response as one block: leave block_length unset (= gen_length)")
        if dream and params.cfg_scale > 0:
            raise ValueError("cfg_scale > 0 is a LLaDA option; Dream has no classifier-free guidance")
        if params.cfg_scale > 0 and self.policy.caches:
            raise ValueError(
                f"cfg_scale > 0 runs with kv_policy='none' only (the unconditional branch would need its own cache); "
                f"kv_policy={self.config.kv_policy!r}"
            )
