"""KV bytes, prefill time and denoise-step time of every KV policy and budget, prompts 1k / 4k / 8k (issue 4).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/kv_policies.py

One run, one random-weight LLaDA-layout model with GQA (the `cpu-gqa` shape: 4 query heads over 2 KV
heads, head_dim 128), calibrated first on random prompts so that maskkv and squeeze know their budgets
before the forward pass and evict layer by layer. For each prompt length, each configuration runs one
request alone: its prefill (the first, full pass, where the policy keeps k[l, h] tokens per KV head) and a
few denoise steps (gen_length 32), then is aborted. Reported:

    KV held    bytes of the pages the request owns after prefill (whole pages)
    peak KV    block manager peak: pages + the full-layer KV alive during prefill
    kept/head  prompt KV pairs kept per (layer, KV head), on average (the budget, if the prompt is longer)
    prefill    seconds of the first pass; step: median of the denoise steps

with ratios against ``none`` (no cache: every step is a full pass) and ``full`` (all prompt KV), from the
same run. Results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from maskkv_engine.benchmarks import common
from maskkv_engine.benchmarks.common import PolicySpec, RequestRun
from maskkv_engine.sampling_params import SamplingParams

PRUNED = ("maskkv", "snapkv", "pyramidkv", "adakv", "squeeze")


@dataclass
class Row:
    spec: PolicySpec
    n: int
    run: RequestRun


def specs_for(budgets: list[int]) -> list[PolicySpec]:
    specs = [PolicySpec("none", "none"), PolicySpec("full", "full")]
    return specs + [PolicySpec(f"{p}-{b}", p, b) for p in PRUNED for b in budgets]


def measure(path: Path, cfg, spec: PolicySpec, n: int, gen: int, steps: int) -> Row:
    options = {} if spec.policy == "none" else {"num_pages": common.pages_needed(path, cfg, spec, n, gen) + 1}
    engine = common.make_engine(path, spec, torch.device("cpu"), "float32", None, **options)
    common.warm_up(engine, cfg)
    ids = common.random_prompt(n, cfg, torch.Generator().manual_seed(n))
    params = SamplingParams(gen_length=gen, stop_at_eos=False, seed=0)
    # none: every step is the same full pass, two are enough; the others: prefill + (steps - 1) cached steps
    run = common.run_request(engine, ids, params, max_steps=2 if spec.policy == "none" else steps)
    del engine
    common.release_memory(torch.device("cpu"))
    return Row(spec, n, run)


def table(rows: list[Row], cfg) -> list[str]:
    ref = {(r.n, r.spec.label): r.run for r in rows}
    out = []
    for r in rows:
        none, full = ref[(r.n, "none")], ref.get((r.n, "full"))
        run = r.run
        kept = run.kv_tokens_kept / (cfg.num_layers * cfg.num_kv_heads)
        caches = r.spec.policy != "none"
        out.append(
            [
                str(r.n),
                r.spec.label,
                f"{kept:.1f}" if caches else "—",
                common.mib(run.kv_held) if caches else "— (recomputes)",
                common.ratio(run.kv_held, full.kv_held) if caches and full else "—",
                common.mib(run.kv_peak) if caches else "—",
                common.ratio(run.kv_peak, full.kv_peak) if caches and full else "—",
                f"{run.prefill:.2f}",
                common.ratio(run.prefill, none.prefill),
                f"{run.median_step * 1e3:.1f}",
                common.ratio(none.median_step, run.median_step),
                common.ratio(full.median_step, run.median_step) if full else "—",
            ]
        )
    head = [
        "prompt", "policy", "kept/head", "KV held MiB", "KV held vs full", "peak KV MiB", "peak KV vs full",
        "prefill s", "prefill vs none", "step ms", "step speedup vs none", "step speedup vs full",
    ]  # fmt: skip
    return common.markdown_table(head, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="cpu-gqa", choices=sorted(common.SHAPES))
    p.add_argument("--lengths", default="1024,4096,8192")
    p.add_argument("--budgets", default="64,256")
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=11, help="engine steps per cached configuration (prefill included)")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    specs = specs_for([int(x) for x in args.budgets.split(",")])

    device = torch.device("cpu")
    load_start, t0 = common.load_average(), time.perf_counter()
    print(f"kv_policies: {common.machine(device)}; load average {load_start}", flush=True)
    shape = common.SHAPES[args.shape]
    path = common.model_dir(shape, Path(tempfile.mkdtemp(prefix="maskkv-kv-policies-")), max(lengths) + args.gen_length)
    model, cfg = common.load_dummy(path, device, "float32")
    t_cal = time.perf_counter()
    common.calibrate_random(path, model, cfg)
    t_cal = time.perf_counter() - t_cal
    rows: list[Row] = []
    with common.shared_model(model, cfg):
        for n in lengths:
            for spec in specs:
                row = measure(path, cfg, spec, n, args.gen_length, args.steps)
                rows.append(row)
                print(
                    f"  n {n} {spec.label}: prefill {row.run.prefill:.2f}s step {row.run.median_step * 1e3:.1f}ms "
                    f"kv {common.mib(row.run.kv_held)}MiB (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    wall = time.perf_counter() - t0
    load_end = common.load_average()
    lines = table(rows, cfg)
    body = common.header(
        common.command_line("python benchmarks/kv_policies.py", argv), device, load_start, load_end, wall
    )
    body += [
        f"Model: {shape.describe()} (random weights, float32); attention backend torch. Calibrated first "
        f"({t_cal:.0f} s: 4 random 512-token prompts) so maskkv and squeeze evict layer by layer. One request alone "
        f"per row, gen_length {args.gen_length}; none runs 2 full passes (its step is a full pass), the others "
        f"prefill + {args.steps - 1} denoise steps (step = median). Page size {common.BLOCK_SIZE} tokens.",
        "",
        *lines,
    ]
    common.write_results(args.results, "KV policies: bytes, prefill and step time (cpu)", body)
    print(f"\nwall {wall / 60:.1f} min; load average {load_start} -> {load_end}; wrote {args.results}\n")
    longest = max(lengths)
    print("\n".join(table([r for r in rows if r.n == longest], cfg)))


if __name__ == "__main__":
    main()
