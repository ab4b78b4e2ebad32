"""LLMEngine: add_request / abort_request / step, vLLM-shaped.

One step is three calls, data flowing one way: the scheduler says what to run, the runner runs it, the
scheduler applies the results (commits, refresh bookkeeping, finishing, freeing). Requests come in
through the input processor and leave through the output processor.
"""

from __future__ import annotations

import itertools
import logging

import torch

from maskkv_engine.attention.selector import get_attention_backend
from maskkv_engine.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from maskkv_engine.engine import gpu_memory
from maskkv_engine.engine.block_manager import BlockManager
from maskkv_engine.engine.input_processor import InputProcessor, PromptType
from maskkv_engine.engine.model_runner import NativeModelRunner
from maskkv_engine.engine.output_processor import OutputProcessor, finish_on_stop_string
from maskkv_engine.engine.parallel_sampling import ParentRequests
from maskkv_engine.engine.runner_protocol import ModelRunner, runner_factory
from maskkv_engine.engine.scheduler import Scheduler, SchedulerOutput, StepFailure
from maskkv_engine.kv.planner import KVPlanner
from maskkv_engine.kv.profile import load_profile
from maskkv_engine.kv.registry import get_policy
from maskkv_engine.models.loader import load_config, load_model, resolve_dtype
from maskkv_engine.outputs import RequestOutput
from maskkv_engine.refresh.registry import get_refresh
from maskkv_engine.request import Request
from maskkv_engine.sampling.sampler import Sampler
from maskkv_engine.sampling_params import SamplingParams
from maskkv_engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "PromptType"]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.torch_device
        # cheap checks first: a misspelt policy or backend should not wait for the weights to load
        self.policy = get_policy(config.kv_policy, config.kv_policy_config)
        self.backend = get_attention_backend(config.attention_backend, self.device)
        factory = None if config.backend == "native" else runner_factory(config.backend)
        if factory is None:
            self.model, self.model_config = load_model(
                config.model, config.dtype, self.device, config.load_format, config.seed
            )
            self.dtype = next(self.model.parameters()).dtype
        else:  # another engine computes the forward passes: our weights are never loaded
            self.model, self.model_config = None, load_config(config.model)
            self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.max_model_len = self._max_model_len()
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model)
        self.stop_token_ids = self._stop_token_ids()
        self.block_manager = self._make_block_manager() if self.policy.caches else None
        profile = load_profile(config.model, self.model_config, config.kv_policy_config.get("profile_path"))
        self.planner = KVPlanner(self.policy, self.model_config, config.cache.block_size, profile)
        self.input_processor = InputProcessor(
            config,
            self.model_config,
            self.max_model_len,
            self.tokenizer,
            self.policy,
            self.planner,
            self.stop_token_ids,
            None if self.block_manager is None else self.block_manager.num_pages,
            self.device,
            read_prompt_kv=self._read_prompt_kv,
        )
        self.output_processor = OutputProcessor(self.tokenizer, self.model_config.mask_token_id)
        self.sampler = Sampler(self.model_config.mask_token_id, self.model_config.num_real_tokens)
        self.scheduler = Scheduler(
            config.scheduler,
            self.block_manager,
            self.planner,
            self.sampler,
            self.model_config.num_layers,
            stop_check=lambda req: finish_on_stop_string(req, self.output_processor.decode),
        )
        self.runner: ModelRunner = (
            NativeModelRunner(
                self.model,
                self.model_config,
                self.backend,
                self.block_manager,
                self.policy,
                self.device,
                prefill_chunk_size=config.prefill_chunk_size,
            )
            if factory is None
            else factory(config, self.model_config, self.dtype, self.max_model_len, self.device)
        )
        self._parents = ParentRequests()  # SamplingParams.n > 1: parent id -> child requests
        self._counter = itertools.count()

    # ---- construction helpers --------------------------------------------------------------------
    def _read_prompt_kv(self, request_id: str, layer: int):
        """A request's kept prompt KV of one layer, read only (what refresh strategies may see of the pool)."""
        bm = self.block_manager
        if bm is None or not bm.has_request(request_id):
            return None
        return bm.kept(request_id, layer)

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
        """The page pool: num_pages, or kv_memory_bytes, or a share of the GPU, or a CPU default."""
        cache = self.config.cache
        cfg = self.model_config
        page_bytes = BlockManager.bytes_per_page(cache.block_size, cfg.head_dim, self.dtype)
        if cache.num_pages is not None:
            num_pages = cache.num_pages
        elif cache.kv_memory_bytes is not None:
            num_pages = cache.kv_memory_bytes // page_bytes
        elif self.device.type == "cuda" and self.model is not None:
            num_pages = self._gpu_pages(page_bytes)
        elif self.device.type == "cuda":  # another engine runs the forward: no profile of ours to measure
            util = cache.gpu_memory_utilization or 0.9
            free, total = torch.cuda.mem_get_info(self.device)
            used_elsewhere = total - free
            num_pages = int((total * util - used_elsewhere) * 0.8) // page_bytes  # 20% left for activations
        else:
            if cache.gpu_memory_utilization is not None:  # a GPU script should run unchanged on a laptop
                logger.warning("gpu_memory_utilization is ignored on the CPU (pool: kv_memory_bytes or num_pages)")
            num_pages = DEFAULT_CPU_KV_BYTES // page_bytes
        if num_pages < 1:
            raise ValueError(
                f"the KV page pool would hold {num_pages} pages: give it more memory (kv_memory_bytes / num_pages)"
            )
        return BlockManager(
            num_pages, cache.block_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device
        )

    def _gpu_pages(self, page_bytes: int) -> int:
        """Pages from the device's memory after the weights and a profile of the largest step (gpu_memory.py)."""
        cfg, sched = self.model_config, self.config.scheduler
        tokens = max(sched.max_num_batched_tokens, self.max_model_len)
        rows = min(tokens, sched.max_num_seqs * gpu_memory.CANDIDATES_PER_SEQ)
        kv_shape = (cfg.num_kv_heads, cfg.head_dim)
        chunk = self.config.prefill_chunk_size
        mem = gpu_memory.measure(
            self.model,
            lambda: gpu_memory.profile_step(self.model, self.backend, tokens, rows, kv_shape, chunk),
            self.device,
        )
        per_token = get_refresh(self.config.refresh, self.config.refresh_config).cache_bytes_per_token(
            cfg, self.dtype.itemsize
        )
        util = self.config.cache.gpu_memory_utilization or 0.9
        pages = gpu_memory.pool_pages(mem, util, per_token * sched.max_num_batched_tokens, page_bytes)
        logger.info("KV pool: %d pages (%s, utilization %.2f)", pages, mem, util)
        return pages

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
        if self.scheduler.find(request_id) is not None or request_id in self._parents:
            raise ValueError(f"request_id={request_id!r} is already in use")
        if params.n > 1:
            return self._add_parent(request_id, prompt, params, arrival_time)
        seed = self.config.seed * 1_000_003 + next(self._counter)
        req = self.input_processor.process(request_id, prompt, params, arrival_time, seed)
        self.scheduler.add(req)
        return req

    def _add_parent(self, request_id: str, prompt: PromptType, params: SamplingParams, arrival_time) -> Request:
        """SamplingParams.n > 1: n child requests (parallel_sampling.py); all added, or none."""
        children = ParentRequests.fan_out(request_id, params)
        added: list[Request] = []
        try:
            for child_id, child_params in children:
                added.append(self.add_request(child_id, prompt, child_params, arrival_time))
        except Exception:
            for req in added:
                self.abort_request(req.request_id)
            raise
        self._parents.add(request_id, [cid for cid, _ in children])
        return added[0]

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free everything it holds. Returns False if it is unknown or done.
        A parent of n samples aborts every child."""
        if request_id in self._parents:
            return any([self.abort_request(child) for child in self._parents.pop(request_id)])
        return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- the step --------------------------------------------------------------------------------
    def step(self, intermediate: bool = False) -> list[RequestOutput]:
        """Run one denoising step for a batch. Returns the outputs of the requests it finished (with
        ``intermediate``: of every request it stepped, showing the canvas). A failure inside the step ends
        only the requests it touched (``finish_reason='error'``); the engine serves the next call."""
        scheduled = self.scheduler.schedule()
        results = self._execute(scheduled)
        update = self.scheduler.update_from_output(scheduled, results)
        shown = update.stepped if intermediate else update.finished
        return self._parents.gather([self.output_processor.make_output(req) for req in shown])

    def _execute(self, scheduled: SchedulerOutput) -> list:
        """The runner's results; a forward pass that raises fails every request it held."""
        if scheduled.is_empty:
            return []
        try:
            return self.runner.execute(scheduled.scheduled)
        except Exception as error:
            logger.exception("engine step failed; finishing its %d requests with an error", len(scheduled.scheduled))
            return [StepFailure(error)] * len(scheduled.scheduled)

    def decode_canvas(self, canvas: list[int], mask_text: str = "[MASK]") -> str:
        """The response canvas as text with masks shown (streaming of intermediate states)."""
        return self.output_processor.decode_canvas(canvas, mask_text)

    def run_to_completion(self) -> list[RequestOutput]:
        """Step until every request is done; finished outputs in completion order."""
        finished: list[RequestOutput] = []
        while self.has_unfinished_requests():
            finished.extend(o for o in self.step() if o.finished)
        return finished

    def shutdown(self) -> None:
        shutdown = getattr(self.runner, "shutdown", None)
        if shutdown is not None:
            shutdown()
