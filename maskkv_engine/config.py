"""Engine configuration: validated dataclasses built once from the user's keyword arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from importlib.metadata import entry_points
from typing import Any

import torch

DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB of pages when nothing is said, on the CPU


@dataclass
class CacheConfig:
    """The page pool. One page = ``block_size`` tokens of one KV head of one layer (K and V).

    Size it by exactly one of: ``num_pages``; ``kv_memory_bytes``; ``gpu_memory_utilization`` (a
    fraction of device memory, GPU only). Default: 1 GiB on the CPU, 0.9 utilization on a GPU.
    """

    block_size: int = 16
    num_pages: int | None = None
    kv_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 1024:
            raise ValueError(f"CacheConfig.block_size={self.block_size!r} must be an integer in [1, 1024]")
        given = [n for n in ("num_pages", "kv_memory_bytes", "gpu_memory_utilization") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(
                f"CacheConfig: set only one of num_pages, kv_memory_bytes, gpu_memory_utilization (got {given})"
            )
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 1):
            raise ValueError(f"CacheConfig.num_pages={self.num_pages!r} must be an integer >= 1")
        if self.kv_memory_bytes is not None and (not isinstance(self.kv_memory_bytes, int) or self.kv_memory_bytes < 1):
            raise ValueError(f"CacheConfig.kv_memory_bytes={self.kv_memory_bytes!r} must be an integer >= 1")
        u = self.gpu_memory_utilization
        if u is not None and not (isinstance(u, (int, float)) and 0.0 < u <= 1.0):
            raise ValueError(f"CacheConfig.gpu_memory_utilization={u!r} must be in (0, 1]")


@dataclass
class SchedulerConfig:
    """max_num_seqs: requests in one batch. max_num_batched_tokens: tokens computed in one step
    (a full pass counts the whole sequence, a cached denoise step only its response).

    enable_chunked_prefill: a first pass that does not fit the step's token budget runs a group of
    layers per step (all its tokens through those layers), so running requests keep denoising while a
    long prompt is prefilled. Bidirectional attention needs every token's K/V at a layer before any
    query of the next layer, so layers, not query chunks, are the unit a bidirectional prefill splits by.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 16384
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name}={value!r} must be an integer >= 1")
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"SchedulerConfig.enable_chunked_prefill={self.enable_chunked_prefill!r} must be a bool")


@dataclass
class EngineConfig:
    model: str
    kv_policy: str = "maskkv"
    kv_budget: int | None = None
    kv_policy_config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    skip_tokenizer_init: bool = False
    load_format: str = "auto"
    attention_backend: str | None = None
    refresh: str = "every_step"
    refresh_config: dict[str, Any] = field(default_factory=dict)
    max_model_len: int | None = None
    prefill_chunk_size: int | None = 2048  # full passes: attention and MLP over this many query rows at a time
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    backend: str = "native"  # or a runner from the maskkv_engine.model_runners entry points ('vllm': the plugin)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"backend={self.backend!r} must be 'native' or a registered runner name such as 'vllm'")
        if self.kv_budget is not None and (not isinstance(self.kv_budget, int) or self.kv_budget < 1):
            raise ValueError(f"kv_budget={self.kv_budget!r} must be an integer >= 1 (KV pairs per head) or None")
        self.kv_policy_config = {} if self.kv_policy_config is None else self.kv_policy_config
        self.refresh_config = {} if self.refresh_config is None else self.refresh_config
        if not isinstance(self.kv_policy_config, dict):
            raise ValueError(f"kv_policy_config must be a dict, got {type(self.kv_policy_config).__name__}")
        if not isinstance(self.refresh_config, dict):
            raise ValueError(f"refresh_config must be a dict, got {type(self.refresh_config).__name__}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len={self.max_model_len!r} must be an integer >= 2")
        chunk = self.prefill_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"prefill_chunk_size={chunk!r} must be an integer >= 1 (query rows) or None (no chunking)")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"device={self.device!r} is not a torch device (allowed: 'auto', 'cpu', 'cuda[:N]')"
            ) from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} asked for CUDA, but no CUDA device is available")
        return dev

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Route flat keyword arguments (vLLM style) to the sub-configs; unknown names fail here."""
        cache_names = {f.name for f in fields(CacheConfig)}
        sched_names = {f.name for f in fields(SchedulerConfig)}
        own_names = {f.name for f in fields(cls)} - {"cache", "scheduler", "model"}
        cache_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in cache_names}
        sched_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in sched_names}
        unknown = sorted(set(kwargs) - own_names)
        if unknown:
            allowed = sorted(own_names | cache_names | sched_names)
            raise TypeError(f"unknown engine option(s) {unknown} (allowed: {allowed})")
        return cls(model=model, cache=CacheConfig(**cache_kw), scheduler=SchedulerConfig(**sched_kw), **kwargs)


def registered_class(registry: dict[str, type], group: str, base: type, name: str, field: str) -> type:
    """``name`` in an in-process registry, else loaded once from the entry-point ``group``; an unknown name
    fails naming ``field`` and every allowed name (the three contracts' registries share this)."""
    if name in registry:
        return registry[name]
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        raise ValueError(f"{field}={name!r} is not known (allowed: {sorted(set(registry) | set(found))})")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"entry point {name!r} in {group} does not name a {base.__name__} subclass")
    registry[name] = cls
    return cls


def build_component(cls: type, config: dict[str, Any] | None, option: str, name: str) -> Any:
    """Instantiate a policy / strategy dataclass from a user's ``*_config`` dict: unknown keys and bad
    values fail here, naming the option and the allowed keys."""
    config = dict(config or {})
    if dataclasses.is_dataclass(cls):
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(
                f"{option}_config has unknown key(s) {unknown} for {option}={name!r} (allowed: {sorted(allowed)})"
            )
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{option}_config for {option}={name!r}: {e}") from e
