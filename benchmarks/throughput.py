"""64 requests (prompt 2k, gen 32): one at a time vs continuous batching, per KV policy (issue 5).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/throughput.py

All 64 requests arrive at once, in both modes, so latencies compare:

    one-at-a-time  the engine with max_num_seqs=1: requests run one after the other (FCFS)
    batched        the scheduler as configured by default (max_num_seqs 64, max_num_batched_tokens 16384):
                   continuous batching, prefills packed into steps, every running request stepped together

for kv_policy none (the reference decoder), full, and maskkv at budget 64. Reported: wall time, throughput
(generated tokens/s), p50 / p99 latency (arrival to finish), peak KV pages (and bytes, including the
full-layer KV alive during prefills), and batched / one-at-a-time ratios from the same run.

The model is the small `cpu` shape (LLaDA proportions, 4 layers): the request count and lengths are as
specified. ``none`` recomputes the whole 2k sequence at each of its 32 steps: 2048 full passes per mode,
far beyond the time bound on this CPU. It runs its first requests (one at a time) and its first engine
steps (batched) for real; totals and latencies are projected from those (each of its steps costs the
same) and the scheduler's deterministic order, and marked as projected.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskkv_engine.benchmarks import common
from maskkv_engine.benchmarks.common import PolicySpec
from maskkv_engine.config import SchedulerConfig
from maskkv_engine.sampling_params import SamplingParams

POLICIES = [PolicySpec("none", "none"), PolicySpec("full", "full"), PolicySpec("maskkv-64", "maskkv", 64)]
MODES = {"one-at-a-time": {"max_num_seqs": 1}, "batched": {}}


@dataclass
class ModeResult:
    spec: PolicySpec
    mode: str
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    peak_pages: int = 0
    peak_kv_bytes: int = 0
    engine_steps: int = 0
    prefill_steps: int = 0  # engine steps that ran at least one prefill (first, full pass)
    prefill_step_time: float = 0.0  # seconds spent in those steps
    projected: str | None = None  # how the numbers were projected, if they were

    def tokens_per_second(self, gen: int) -> float:
        return len(self.latencies) * gen / self.wall

    def percentile(self, q: float) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[round(q) - 1]


def run_mode(engine, prompts: list[list[int]], params: SamplingParams, stop_after: dict | None) -> ModeResult:
    """Submit everything at once and step. ``stop_after``: {'requests': k}, {'steps': k} or {'seconds': s}
    (projection runs; 'seconds' stops at the first step that ends past s seconds)."""
    bm = engine.block_manager
    common.release_memory(engine.device)
    if bm is not None:
        bm.reset_peak()
    res = ModeResult(spec=None, mode="")  # type: ignore[arg-type]
    start = time.perf_counter()
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    finished = []
    step_times = []
    sched = engine.scheduler
    while engine.has_unfinished_requests():
        pending = [r for r in [*sched.running, *sched.waiting] if r.metrics.prefill_time is None]
        t0 = time.perf_counter()
        outs = engine.step()
        step_times.append(time.perf_counter() - t0)
        prefills = sum(r.metrics.prefill_time is not None for r in pending)
        if prefills:
            res.prefill_steps += 1
            res.prefill_step_time += step_times[-1]
        finished += [o for o in outs if o.finished]
        if bm is not None:
            res.peak_pages = max(res.peak_pages, bm.num_used_pages)
        if stop_after and (
            len(finished) >= stop_after.get("requests", 1 << 30)
            or len(step_times) >= stop_after.get("steps", 1 << 30)
            or time.perf_counter() - start >= stop_after.get("seconds", float("inf"))
        ):
            for rid in ids:
                engine.abort_request(rid)
            break
    res.wall = time.perf_counter() - start
    res.engine_steps = len(step_times)
    res.latencies = [o.metrics.latency for o in finished]
    res.step_times = step_times  # type: ignore[attr-defined]
    res.service = [o.metrics.finished_time - o.metrics.first_scheduled_time for o in finished]  # type: ignore[attr-defined]
    if bm is not None:
        res.peak_kv_bytes = bm.peak_bytes
    return res


def round_robin_finish_steps(n_requests: int, steps_each: int, per_step: int) -> list[int]:
    """Engine step at which each request finishes under the scheduler's order (least recently run first,
    then arrival), when ``per_step`` identical requests fit in one step's token budget."""
    last = [-1] * n_requests
    left = [steps_each] * n_requests
    done = [0] * n_requests
    step = 0
    while any(left):
        step += 1
        order = sorted((i for i in range(n_requests) if left[i]), key=lambda i: (last[i], i))[:per_step]
        for i in order:
            last[i] = step
            left[i] -= 1
            if not left[i]:
                done[i] = step
    return done


def project_none(res: ModeResult, n_requests: int, gen: int, prompt: int) -> ModeResult:
    """Whole-run figures for ``none`` from its measured part (every step of it is the same full pass)."""
    if res.mode == "one-at-a-time":
        service = statistics.fmean(res.service)  # type: ignore[attr-defined]
        res.latencies = [service * (i + 1) for i in range(n_requests)]
        res.wall = service * n_requests
        res.engine_steps = n_requests * gen
        res.projected = (
            f"{len(res.service)} of {n_requests} requests run (service {service:.1f} s each), rest projected"  # type: ignore[attr-defined]
        )
        return res
    per_step = SchedulerConfig().max_num_batched_tokens // (prompt + gen)
    step = statistics.fmean(res.step_times[1:] or res.step_times)  # type: ignore[attr-defined]
    done = round_robin_finish_steps(n_requests, gen, per_step)
    res.latencies = [d * step for d in done]
    res.wall = max(done) * step
    res.projected = (
        f"{res.engine_steps} of {max(done)} engine steps run ({per_step} requests each, {step:.1f} s per step), "
        "rest projected with the scheduler's round-robin order"
    )
    res.engine_steps = max(done)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="cpu", choices=sorted(common.SHAPES))
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--none-requests", type=int, default=2, help="none, one at a time: requests run before projecting")
    p.add_argument("--none-steps", type=int, default=4, help="none, batched: engine steps run before projecting")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args(argv)

    device = torch.device("cpu")
    load_start, t0 = common.load_average(), time.perf_counter()
    print(f"throughput: {common.machine(device)}; load average {load_start}", flush=True)
    shape = common.SHAPES[args.shape]
    path = common.model_dir(shape, Path(tempfile.mkdtemp(prefix="maskkv-throughput-")), args.prompt + args.gen_length)
    model, cfg = common.load_dummy(path, device, "float32")
    common.calibrate_random(path, model, cfg)
    gen = torch.Generator().manual_seed(0)
    prompts = [common.random_prompt(args.prompt, cfg, gen) for _ in range(args.requests)]
    params = SamplingParams(gen_length=args.gen_length, stop_at_eos=False)
    # one pool for every configuration: room for all requests with every prompt token cached
    full_pages = common.pages_needed(path, cfg, PolicySpec("full", "full"), args.prompt, args.gen_length)
    num_pages = args.requests * full_pages + 1
    results: list[ModeResult] = []
    with common.shared_model(model, cfg):
        for spec in POLICIES:
            for mode, options in MODES.items():
                engine = common.make_engine(path, spec, device, "float32", None, num_pages=num_pages, **options)
                common.warm_up(engine, cfg)
                stop = None
                if spec.policy == "none":
                    stop = {"requests": args.none_requests} if mode == "one-at-a-time" else {"steps": args.none_steps}
                res = run_mode(engine, prompts, params, stop)
                res.spec, res.mode = spec, mode
                if stop:
                    project_none(res, args.requests, args.gen_length, args.prompt)
                results.append(res)
                del engine
                print(
                    f"  {spec.label} {mode}: wall {res.wall:.1f}s{' (projected)' if res.projected else ''}, "
                    f"{res.tokens_per_second(args.gen_length):.1f} tok/s, peak pages {res.peak_pages} "
                    f"(load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    wall = time.perf_counter() - t0
    load_end = common.load_average()
    lines = table(results, args.gen_length)
    body = common.header(
        common.command_line("python benchmarks/throughput.py", argv), device, load_start, load_end, wall
    )
    body += [
        f"Model: {shape.describe()} (random weights, float32), calibrated (maskkv evicts layer by layer); "
        f"attention backend torch. {args.requests} requests x (prompt {args.prompt}, gen {args.gen_length}, "
        f"{args.gen_length} steps, block {params.block_length}), all submitted at once; page pool {num_pages} pages "
        f"({common.mib(num_pages * 2 * common.BLOCK_SIZE * cfg.head_dim * 4)} MiB) for every configuration. "
        "Throughput = generated tokens / wall time; latency = arrival to finish (queueing included).",
        "",
        *lines,
        "",
        *[f"- {r.spec.label}, {r.mode}: projected: {r.projected}" for r in results if r.projected],
    ]
    common.write_results(args.results, "Throughput: one at a time vs continuous batching (cpu)", body)
    print(f"\nwall {wall / 60:.1f} min; load average {load_start} -> {load_end}; wrote {args.results}\n")
    print("\n".join(lines))


def table(results: list[ModeResult], gen: int) -> list[str]:
    by = {(r.spec.label, r.mode): r for r in results}
    rows = []
    for r in results:
        single = by[(r.spec.label, "one-at-a-time")]
        none = by.get(("none", r.mode))
        star = "*" if r.projected else ""
        rows.append(
            [
                r.spec.label,
                r.mode,
                f"{r.wall:.1f}{star}",
                f"{r.tokens_per_second(gen):.2f}{star}",
                common.ratio(r.tokens_per_second(gen), single.tokens_per_second(gen)),
                common.ratio(r.tokens_per_second(gen), none.tokens_per_second(gen)) if none else "—",
                f"{r.percentile(50):.1f}{star}",
                f"{r.percentile(99):.1f}{star}",
                str(r.peak_pages) if r.spec.policy != "none" else "— (no pages)",
                common.mib(r.peak_kv_bytes) if r.spec.policy != "none" else "—",
                str(r.engine_steps),
                "—" if r.projected else f"{r.prefill_steps}: {r.prefill_step_time:.1f}",
                "—" if r.projected else f"{r.engine_steps - r.prefill_steps}: {r.wall - r.prefill_step_time:.1f}",
            ]
        )
    head = [
        "policy", "mode", "wall s", "tokens/s", "vs one-at-a-time", "vs none (same mode)", "p50 latency s",
        "p99 latency s", "peak pages", "peak KV MiB", "engine steps", "steps with prefills: s",
        "denoise-only steps: s",
    ]  # fmt: skip
    return common.markdown_table(head, rows) + [
        "",
        "`*` projected for none (see below). The last two columns split the wall time between engine steps that "
        "ran at least one prefill (the first, full pass of a request) and steps that only denoised.",
    ]


if __name__ == "__main__":
    main()
