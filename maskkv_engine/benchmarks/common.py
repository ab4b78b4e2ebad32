"""What the speed / memory benchmarks share: model shapes, one model reused by many engines, a single
request run step by step, peak memory, the machine and load, and the RESULTS.md writer.

Lives in the package (not in ``benchmarks/``) so that ``maskkv bench`` works from an installed wheel;
the scripts in ``benchmarks/`` import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from maskkv_engine.config import EngineConfig
from maskkv_engine.engine.llm_engine import LLMEngine
from maskkv_engine.kv.base import ModelStats
from maskkv_engine.kv.calibrate import measure_stats
from maskkv_engine.kv.planner import KVPlanner
from maskkv_engine.kv.profile import load_profile, save_profile
from maskkv_engine.kv.registry import get_policy
from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.models.loader import load_model
from maskkv_engine.models.random_checkpoint import llada_config
from maskkv_engine.sampling_params import SamplingParams

BLOCK_SIZE = 16  # CacheConfig.block_size default


# ---- model shapes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A LLaDA-layout model shape (random weights: ``load_format='dummy'``)."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def describe(self) -> str:
        return (
            f"`{self.name}`: d_model {self.d_model}, {self.n_layers} layers, {self.n_heads} heads / "
            f"{self.n_kv_heads} KV heads (head_dim {self.head_dim}), mlp {self.mlp}, vocab {self.vocab}"
        )

    def hf_config(self, max_len: int, torch_dtype: str = "float32") -> dict:
        return llada_config(
            d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            mlp_hidden_size=self.mlp, vocab_size=self.vocab, max_sequence_length=max_len, torch_dtype=torch_dtype,
        )  # fmt: skip


SHAPES = {
    # LLaDA-8B-Instruct as released (MHA, head_dim 128, mlp 3x): for GPUs.
    "llada-8b": ModelShape("llada-8b", 4096, 32, 32, 32, 12288, 126464),
    # LLaDA's proportions (MHA, head_dim 128, mlp 3x) at a size one contended CPU core runs to 16k in minutes;
    # the vocab is cut so the LM head stays a LLaDA-like share of the weights (23% here, 7% in LLaDA-8B).
    "cpu": ModelShape("cpu", 256, 4, 2, 2, 768, 4096),
    # Wider, with GQA (4 query heads over 2 KV heads): the KV-policy comparison (benchmarks/kv_policies.py).
    "cpu-gqa": ModelShape("cpu-gqa", 512, 4, 4, 2, 1536, 4096),
    # Smoke tests.
    "tiny": ModelShape("tiny", 64, 2, 2, 2, 128, 512),
}


def model_dir(shape: ModelShape, root: Path, max_len: int, torch_dtype: str = "float32") -> Path:
    """A directory with just config.json (the engine fills random weights with ``load_format='dummy'``)."""
    path = Path(root) / f"{shape.name}-{max_len}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(shape.hf_config(max_len, torch_dtype), indent=1))
    return path


def load_dummy(path: Path, device: torch.device, dtype: str) -> tuple[nn.Module, DiffusionLMConfig]:
    """The random-weight model the engine itself would build (same seed), loaded once."""
    return load_model(path, dtype=dtype, device=device, load_format="dummy", seed=0)


@contextlib.contextmanager
def shared_model(model: nn.Module, cfg: DiffusionLMConfig) -> Iterator[None]:
    """Engines built inside reuse ``model`` instead of loading their own: a random 8B model takes minutes to
    initialise, and every engine of a run must see the same weights anyway. (LLMEngine has no option to
    pass a built model in; this swaps the loader it calls for the duration.)"""
    import maskkv_engine.engine.llm_engine as llm_engine

    original = llm_engine.load_model
    llm_engine.load_model = lambda *args, **kwargs: (model, cfg)
    try:
        yield
    finally:
        llm_engine.load_model = original


def calibrate_random(
    path: Path, model: nn.Module, cfg: DiffusionLMConfig, num_prompts: int = 4, prompt_len: int = 512, gen: int = 32
) -> ModelStats:
    """Write ``<path>/maskkv_profile.json`` for a random-weight model, from random prompts.

    Same measurement as ``maskkv calibrate`` (``kv.calibrate.measure_stats``), on the already loaded
    dummy model (``calibrate()`` loads safetensors itself). With the profile, maskkv and squeeze know their
    budgets before the forward pass and evict layer by layer.
    """
    gen_ = torch.Generator().manual_seed(1234)
    stats = [measure_stats(model, cfg, random_prompt(prompt_len, cfg, gen_), gen) for _ in range(num_prompts)]
    profile = ModelStats(
        layer_importance=torch.stack([s.layer_importance for s in stats]).mean(0),
        prompt_preference=torch.stack([s.prompt_preference for s in stats]).mean(0),
    )
    meta = {"num_prompts": num_prompts, "prompt_len": prompt_len, "gen_length": gen, "random_prompts": True}
    save_profile(path, profile, cfg, meta)
    return profile


def random_prompt(n: int, cfg: DiffusionLMConfig, generator: torch.Generator) -> list[int]:
    """``n`` random token ids, none of them the mask token."""
    ids = torch.randint(0, cfg.vocab_size - 1, (n,), generator=generator)
    ids[ids == cfg.mask_token_id] = 0
    return ids.tolist()


# ---- engines -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicySpec:
    """One configuration of a comparison: a KV policy, its budget, and a refresh strategy."""

    label: str
    policy: str
    budget: int | None = None
    refresh: str = "every_step"


def pages_needed(path: Path, cfg: DiffusionLMConfig, spec: PolicySpec, n_prompt: int, gen: int) -> int:
    """Pages one request of this configuration reserves at admission (what the engine's planner computes)."""
    policy = get_policy(spec.policy)
    if not policy.caches:
        return 0
    planner = KVPlanner(policy, cfg, BLOCK_SIZE, load_profile(str(path), cfg))
    n_cached = n_prompt - (1 if cfg.logits_shift else 0)
    ctx = planner.context(n_cached, n_prompt, n_prompt + gen, planner.budget(spec.budget, None))
    return planner.pages_needed(ctx, planner.plan(ctx))


def make_engine(
    path: Path, spec: PolicySpec, device: torch.device, dtype: str, backend: str | None, **options
) -> LLMEngine:
    kwargs = dict(
        kv_policy=spec.policy, kv_budget=spec.budget, refresh=spec.refresh, load_format="dummy",
        skip_tokenizer_init=True, device=str(device), dtype=dtype, **options,
    )  # fmt: skip
    if backend:
        kwargs["attention_backend"] = backend
    return LLMEngine(EngineConfig.from_kwargs(str(path), **kwargs))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Give freed memory back (so the next configuration's RSS starts from the same floor)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak process memory of one measurement.

    CPU: resident set size (``rss()``), and its high-water mark (Linux VmHWM, reset through
    /proc/self/clear_refs so every configuration gets its own peak). GPU: torch.cuda.max_memory_allocated.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.idle = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.idle = torch.cuda.memory_allocated(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self.idle = rss()

    def peak(self) -> int:
        if self.device.type == "cuda":
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        now = rss()
        with contextlib.suppress(OSError, AttributeError):
            found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            return max(now, int(found.group(1)) * 1024)
        return now


def rss() -> int:
    """Resident set size in bytes: psutil where installed (GPU machines may lack it), else /proc/self/statm."""
    try:
        import psutil
    except ImportError:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


# ---- one request, step by step -----------------------------------------------------------------------
@dataclass
class RequestRun:
    """Times in seconds, memory in bytes. The first ``prefill_steps`` engine steps are the prefill (the
    first, full pass: one step, or several when the engine splits a long first pass by layers)."""

    step_times: list[float] = field(default_factory=list)
    prefill_steps: int = 1
    end_to_end: float = 0.0
    finished: bool = False
    kv_held: int = 0  # pages in use after the prefill (bytes)
    kv_peak: int = 0  # block manager peak, including the transient full-layer KV of the prefill
    kv_tokens_kept: int = 0
    mem_idle: int = 0
    mem_peak: int = 0
    num_steps: int = 0

    @property
    def prefill(self) -> float:
        return sum(self.step_times[: self.prefill_steps])

    @property
    def denoise_steps(self) -> list[float]:
        return self.step_times[self.prefill_steps :]

    @property
    def mean_step(self) -> float:
        return statistics.fmean(self.denoise_steps) if self.denoise_steps else float("nan")

    @property
    def median_step(self) -> float:
        return statistics.median(self.denoise_steps) if self.denoise_steps else float("nan")


def run_request(
    engine: LLMEngine, ids: list[int], params: SamplingParams, max_steps: int | None = None, request_id: str = "bench"
) -> RequestRun:
    """Run one request alone, timing every engine step; stop (abort) after ``max_steps`` steps if given."""
    device = engine.device
    bm = engine.block_manager
    release_memory(device)
    mem = PeakMemory(device)
    mem.start()
    if bm is not None:
        bm.reset_peak()
    run = RequestRun(mem_idle=mem.idle)
    sync(device)
    start = time.perf_counter()
    engine.add_request(request_id, {"prompt_token_ids": ids}, params)
    req = engine.scheduler.find(request_id)
    while True:
        t0 = time.perf_counter()
        outs = engine.step()
        sync(device)
        run.step_times.append(time.perf_counter() - t0)
        if req.prefill is not None:  # the first pass goes on in the next step (chunked by layers)
            run.prefill_steps += 1
        elif bm is not None and len(run.step_times) == run.prefill_steps:
            run.kv_held = bm.request_pages(request_id) * bm.page_bytes
        if any(o.request_id == request_id and o.finished for o in outs):
            run.finished = True
            break
        if max_steps is not None and len(run.step_times) >= max_steps:
            engine.abort_request(request_id)
            break
    run.end_to_end = time.perf_counter() - start
    run.mem_peak = mem.peak()
    run.num_steps = req.metrics.num_steps
    run.kv_tokens_kept = req.metrics.kv_tokens_kept
    if bm is not None:
        run.kv_peak = bm.peak_bytes
    return run


def warm_up(engine: LLMEngine, cfg: DiffusionLMConfig, gen: int = 8) -> None:
    """One short request so first-call costs (allocator, kernels) stay out of the measurements."""
    params = SamplingParams(gen_length=gen, stop_at_eos=False, seed=0)
    run_request(engine, random_prompt(128, cfg, torch.Generator().manual_seed(0)), params, request_id="warm-up")


# ---- reporting ---------------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as run, with the environment that matters for CPU timings."""
    args = argv if argv is not None else sys.argv[1:]
    command = " ".join([script, *args])
    with contextlib.suppress(OSError):
        if os.nice(0) > 0:
            command = f"nice -n {os.nice(0)} {command}"
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"
    return command


def header(command: str, device: torch.device, load_start: str, load_end: str, wall: float) -> list[str]:
    return [
        f"Command: `{command}`  ",
        f"Machine: {machine(device)}  ",
        f"Date: {datetime.date.today().isoformat()}; wall time {wall / 60:.1f} min; "
        f"load average (1/5/15 min) at start {load_start}, at end {load_end}  ",
    ]


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def write_results(path: Path, title: str, body: list[str]) -> None:
    """Replace this benchmark's section (``## title`` up to the next ``## ``), or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n" + "\n".join(body) + "\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def ratio(a: float, b: float) -> str:
    """a / b as '3.2x' (or '—' when undefined)."""
    if not a or not b or a != a or b != b:
        return "—"
    return f"{a / b:.2f}x" if a / b < 10 else f"{a / b:.1f}x"
