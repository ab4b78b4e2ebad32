"""Speed and memory of one request per KV policy, against the reference decoder, by prompt length.

    maskkv bench                                     # CPU: the `cpu` shape, 1k..32k as far as time allows
    python benchmarks/speed_memory.py                # the same, writing RESULTS.md and the PNG in benchmarks/
    maskkv bench --shape llada-8b --device cuda      # GPU: LLaDA-8B shape, triton backend, bfloat16

For each gen_length and prompt length, one request alone in the engine per configuration:

    none        the reference decoder (every step recomputes prompt + response)
    full        all prompt KV cached once, the response recomputed every step
    dllm-cache  full + dLLM-Cache's periodic refresh (K_p=100, K_r=7, rho=0.25: its defaults)
    maskkv-64, maskkv-256, snapkv-256   pruned prompt KV (64 / 256 pairs per head on average)

reporting prefill time, mean denoise-step time, end-to-end time, tokens/s, peak KV bytes (block manager
peak, including the full-layer KV alive during prefill) and peak process memory (RSS high-water mark on
the CPU, torch.cuda.max_memory_allocated on a GPU), each as a ratio against ``none`` of the same run; a
roofline floor per configuration; a PNG of speedup and memory against prompt length.

``none`` recomputes the whole sequence every step, so where its full run would not fit the time budget
it runs its prefill and a few steps and its end-to-end time is extrapolated as
prefill + (steps - 1) x mean step (marked *); at the short lengths both are measured, to show the
extrapolation holds. Lengths whose projected cost exceeds the time left are skipped, and said so.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from maskkv_engine.benchmarks import common
from maskkv_engine.benchmarks.common import PolicySpec, RequestRun
from maskkv_engine.benchmarks.roofline import DevicePeak, StepFloor, measure_peak, step_floor
from maskkv_engine.benchmarks.speed_report import (
    extrapolation_check,
    gpu_section,
    headline,
    roofline_table,
    speed_table,
)
from maskkv_engine.engine.block_manager import OutOfPagesError
from maskkv_engine.sampling_params import SamplingParams

POLICIES = [
    PolicySpec("none", "none"),
    PolicySpec("full", "full"),
    PolicySpec("dllm-cache", "full", refresh="dllm_cache"),
    PolicySpec("maskkv-64", "maskkv", 64),
    PolicySpec("maskkv-256", "maskkv", 256),
    PolicySpec("snapkv-256", "snapkv", 256),
]
BLOCK_LENGTH = 32  # LLaDA's generate.py default (gen 128 = 4 blocks of 32)
K_P = 100  # dLLM-Cache's prompt refresh period (a full pass): refresh/dllm_cache.py default
SAFETY = 1.2  # a group starts only if 1.2x its projected cost fits in the time left (contention varies)


@dataclass
class Result:
    spec: PolicySpec
    n: int
    gen: int
    run: RequestRun | None = None
    e2e: float = float("nan")
    extrapolated: bool = False
    extrapolation_check: float | None = None  # e2e extrapolated from the first steps, when e2e was measured
    floor: StepFloor | None = None
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.run is not None

    @property
    def tokens_per_second(self) -> float:
        return self.gen / self.e2e


class Planner:
    """Projects the cost of the next (length, gen) group from the full passes measured so far."""

    def __init__(self, budget_s: float, none_steps: int, true_limit_s: float):
        self.budget_s = budget_s
        self.none_steps = none_steps
        self.true_limit_s = true_limit_s
        self.start = time.perf_counter()
        self.passes: dict[int, float] = {}  # tokens -> seconds of a full pass (largest seen per length)
        self.cached_step: dict[int, float] = {}  # prompt length -> slowest mean cached step

    @property
    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def pass_time(self, tokens: int) -> float | None:
        """A full pass over ``tokens``, scaled from the nearest measured pass as t ~ tokens^p, with p fitted on
        the two longest passes measured (long passes grow faster than n^2 here: caches), 2 until there are two."""
        if not self.passes:
            return None
        measured = sorted(self.passes)
        p = 2.0
        if len(measured) >= 2:
            (n1, n2) = measured[-2:]
            p = min(max(math.log(self.passes[n2] / self.passes[n1]) / math.log(n2 / n1), 1.0), 3.0)
        below = [m for m in measured if m <= tokens]
        ref = below[-1] if below else measured[0]
        return self.passes[ref] * (tokens / ref) ** p

    def none_is_true(self, n: int, gen: int) -> bool:
        t = self.pass_time(n + gen)
        return t is None or gen * t <= self.true_limit_s

    def group_cost(self, n: int, gen: int, specs: list[PolicySpec]) -> float | None:
        t = self.pass_time(n + gen)
        if t is None:
            return None
        passes, steps = 0, 0
        for s in specs:
            if s.policy == "none":
                passes += gen if self.none_is_true(n, gen) else self.none_steps
            else:
                passes += 1 + ((gen - 1) // K_P if s.refresh == "dllm_cache" else 0)
                steps += gen - 1
        below = [k for k in sorted(self.cached_step) if k <= n]
        step = self.cached_step[below[-1]] * n / below[-1] if below else 0.0  # full's step grows with n
        return passes * t + steps * step

    def record(self, r: Result) -> None:
        if r.run is None:
            return
        tokens = r.n + r.gen
        self.passes[tokens] = max(self.passes.get(tokens, 0.0), r.run.prefill)
        if r.spec.policy != "none" and r.run.denoise_steps:
            self.cached_step[r.n] = max(self.cached_step.get(r.n, 0.0), r.run.mean_step)


def measure(
    path: Path, cfg, spec: PolicySpec, n: int, gen: int, args, planner: Planner, peak: DevicePeak, elem: int
) -> Result:
    device = torch.device(args.device)
    result = Result(spec, n, gen)
    options = {}
    if spec.policy != "none":
        options["num_pages"] = common.pages_needed(path, cfg, spec, n, gen) + 1  # the pool this request needs
    engine = common.make_engine(path, spec, device, args.dtype, args.attention_backend, **options)
    try:
        common.warm_up(engine, cfg)
        ids = common.random_prompt(n, cfg, torch.Generator().manual_seed(n))
        params = SamplingParams(gen_length=gen, block_length=min(BLOCK_LENGTH, gen), stop_at_eos=False, seed=0)
        true_run = spec.policy != "none" or planner.none_is_true(n, gen)
        run = common.run_request(engine, ids, params, max_steps=None if true_run else args.none_steps)
    except (OutOfPagesError, torch.OutOfMemoryError, MemoryError) as e:
        result.skipped = f"out of memory ({type(e).__name__})"
        return result
    finally:
        del engine
        common.release_memory(device)
    result.run = run
    first = run.step_times[: args.none_steps]
    projected = first[0] + (gen - 1) * statistics.fmean(first[1:]) if len(first) > 1 else float("nan")
    if run.finished:
        result.e2e = run.end_to_end
        if spec.policy == "none":
            result.extrapolation_check = projected
    else:
        result.e2e, result.extrapolated = projected, True
    result.floor = floor_of(cfg, spec, n, gen, run, peak, elem)
    return result


def floor_of(cfg, spec: PolicySpec, n: int, gen: int, run: RequestRun, peak: DevicePeak, elem: int) -> StepFloor:
    """The floor of the configuration's plain denoise step (a full pass for ``none``)."""
    logit_rows = (min(BLOCK_LENGTH, gen) + 1) / 2  # masked positions of the block, averaged over its steps
    if spec.policy == "none":
        return step_floor(cfg, peak, elem, n + gen, n + gen, 0, logit_rows)
    kept_per_head = run.kv_tokens_kept / (cfg.num_layers * cfg.num_kv_heads)
    return step_floor(cfg, peak, elem, gen, kept_per_head + gen, run.kv_held, logit_rows)


def run_all(args, on_result=None) -> tuple[list[Result], DevicePeak, str, object]:
    """Every (gen, length, policy) in order; ``on_result(result)`` after each (the GPU suite saves as it goes)."""
    device = torch.device(args.device)
    shape = common.SHAPES[args.shape]
    specs = [s for s in POLICIES if s.label in args.policies]
    max_len = max(args.lengths) + max(args.gen_lengths)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="maskkv-bench-"))
    torch_dtype = "float32" if args.dtype == "float32" else "bfloat16"
    path = common.model_dir(shape, work, max_len, torch_dtype)
    model, cfg = common.load_dummy(path, device, args.dtype)
    elem = next(model.parameters()).element_size()
    peak = measure_peak(device, next(model.parameters()).dtype)
    if any(s.policy in ("maskkv", "squeeze") for s in specs):
        common.calibrate_random(path, model, cfg, num_prompts=args.calibration_prompts)
    planner = Planner(args.time_budget, args.none_steps, args.true_e2e_limit)
    results: list[Result] = []
    with common.shared_model(model, cfg):
        for gen in args.gen_lengths:
            too_long = None
            for n in sorted(args.lengths):
                cost = planner.group_cost(n, gen, specs)
                if too_long is None and cost is not None and cost * SAFETY > planner.left:
                    too_long = f"skipped for time (projected {cost / 60:.0f} min, {max(planner.left, 0) / 60:.0f} left)"
                if too_long:
                    results += [Result(s, n, gen, skipped=too_long) for s in specs]
                    continue
                for spec in specs:
                    r = measure(path, cfg, spec, n, gen, args, planner, peak, elem)
                    planner.record(r)
                    results.append(r)
                    print(progress_line(r), flush=True)
                    if on_result is not None:
                        on_result(r)
    return results, peak, shape.describe(), cfg


def progress_line(r: Result) -> str:
    if not r.ok:
        return f"  gen {r.gen} n {r.n} {r.spec.label}: {r.skipped}"
    return (
        f"  gen {r.gen} n {r.n} {r.spec.label}: prefill {r.run.prefill:.2f}s step {r.run.mean_step * 1e3:.1f}ms "
        f"e2e {r.e2e:.1f}s{'*' if r.extrapolated else ''} kv-peak {common.mib(r.run.kv_peak)}MiB "
        f"mem-peak {common.mib(r.run.mem_peak)}MiB (load {os.getloadavg()[0]:.1f})"
    )


# ---- entry point -------------------------------------------------------------------------------------
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="cpu", choices=sorted(common.SHAPES), help="model shape (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--attention-backend", default=None, help="default: torch on the CPU, triton on a GPU")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768", help="prompt lengths, comma list")
    p.add_argument("--gen-lengths", default="32,128")
    p.add_argument("--policies", default=",".join(s.label for s in POLICIES))
    p.add_argument("--time-budget", type=float, default=1080, help="seconds; longer lengths are skipped, and said so")
    p.add_argument("--true-e2e-limit", type=float, default=45, help="run none to the end when projected under this (s)")
    p.add_argument("--none-steps", type=int, default=3, help="passes of none measured when it is extrapolated")
    p.add_argument("--calibration-prompts", type=int, default=4)
    p.add_argument("--results", type=Path, default=None, help="write a section into this RESULTS.md")
    p.add_argument("--plot", type=Path, default=None, help="write the PNG here")
    p.add_argument("--work-dir", default=None, help="where the model's config.json and profile go (default: a tmp dir)")
    return p


def parse(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.gen_lengths = [int(x) for x in str(args.gen_lengths).split(",")]
    args.policies = [x.strip() for x in args.policies.split(",")]
    unknown = sorted(set(args.policies) - {s.label for s in POLICIES})
    if unknown:
        raise ValueError(f"--policies: unknown {unknown} (allowed: {[s.label for s in POLICIES]})")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.attention_backend = args.attention_backend or ("triton" if cuda else "torch")
    return args


def main(
    argv: list[str] | None = None,
    script: str = "maskkv bench",
    default_results: Path | None = None,
    default_plot: Path | None = None,
) -> list[Result]:
    """Run, print the tables, and write the RESULTS.md section / PNG if asked (the script asks by default)."""
    args = parse(argv, prog=script)
    args.results = args.results or default_results
    args.plot = args.plot or default_plot
    device = torch.device(args.device)
    load_start, t0 = common.load_average(), time.perf_counter()
    print(f"{script}: {common.machine(device)}; load average {load_start}", flush=True)
    results, peak, shape_text, cfg = run_all(args)
    wall = time.perf_counter() - t0
    load_end = common.load_average()
    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    command = common.command_line(script, argv)
    body = common.header(command, device, load_start, load_end, wall)
    body += [
        f"Model: {shape_text} (random weights, {args.dtype}); attention backend {args.attention_backend}; "
        f"one request alone; block_length {BLOCK_LENGTH}, steps = gen_length. MaskKV budgets from a calibration "
        f"profile of the random model ({args.calibration_prompts} random 512-token prompts), so prefill evicts "
        f"layer by layer.  ",
        f"Roofline: {peak.describe()} (measured in this run).",
        "",
        "Ratios: against `none` of the same prompt and gen length (x none = this / none; none / this = speedup). "
        "`*` = end-to-end extrapolated as prefill + (steps - 1) x mean step (none only). Peak KV: block "
        "manager peak incl. the full-layer KV alive during prefill; for none (no pages), one layer's K/V in "
        "flight, computed. Peak memory: process RSS high-water mark (GPU: max_memory_allocated); 'above idle' "
        "subtracts the process just before the request (weights, runtime, engine), i.e. what the request adds.",
    ]
    for gen in args.gen_lengths:
        body += ["", f"### gen_length {gen} ({device.type})", "", *speed_table(results, gen, cfg, elem)]
    checks = extrapolation_check(results)
    if checks:
        body += ["", "Extrapolation check (none measured end to end and extrapolated from its first passes):", *checks]
    body += ["", "### Headline", "", *headline(results)]
    body += [
        "",
        "Paper (arXiv 2510.09309, LLaDA-8B on a GPU): 31x at 32k against dLLM-Cache (about 4.5x against no "
        "cache) and 65% less peak memory.",
    ]
    for gen in args.gen_lengths:
        body += ["", f"### Roofline, gen_length {gen}", "", *roofline_table(results, gen)]
    if args.plot:
        from maskkv_engine.benchmarks.plots import plot_speed_memory

        title = f"Speed and memory per KV policy, one request at a time\n{shape_text} on {common.machine(device)}"
        plot_speed_memory(results, args.plot, title, cfg=cfg, elem=elem)
        body += ["", f"Plot: `{args.plot.name}`"]
    if device.type == "cpu":
        body += ["", "### GPU (triton, bfloat16, `llada-8b`)", "", *gpu_section(script)]
    if args.results:
        common.write_results(args.results, f"Speed and memory per policy ({device.type}, `{args.shape}`)", body)
    print(f"\nwall {wall / 60:.1f} min; load average {load_start} -> {load_end}")
    with contextlib.suppress(Exception):
        print("\n".join(["", *headline(results)]))
    for gen in args.gen_lengths:
        print("\n".join(["", f"gen_length {gen}", *speed_table(results, gen, cfg, elem)]))
    return results
