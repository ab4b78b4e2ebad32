"""Refresh strategies and parallel decoding on top of MaskKV's pruned pages, side by side.

Combinations (kv policy + refresh + decoding rule):
  none                       the reference decoder (every step recomputes everything)
  full                       all prompt KV cached once, response recomputed every step
  maskkv                     MaskKV pages, response recomputed every step
  maskkv+fast_dllm+t0.9      Fast-dLLM prefix cache, confidence threshold 0.9 (block 32)
  maskkv+dllm_cache          dLLM-Cache (K_p 100, K_r 7, rho 0.25), fixed schedule
  maskkv+elastic             Elastic-Cache (gamma 0.9, sliding window 16), threshold 0.9

Part A, quality: the embedded default model on the long-context suite (benchmarks/longctx): exact-match
accuracy, forward passes (NFE), time per request and its speed-up over `none`, peak KV bytes.
Part B, speed: a random-weight LLaDA-shaped model (maskkv_engine/benchmarks, shape `cpu`): NFE, time per
request, speed-up over `none`, peak KV bytes, recompute fraction. Both at prompt lengths 1k / 4k and
gen_length 32 / 256, every ratio against `none` in the same run. Where `none` would take too long it is
extrapolated as prefill + (steps - 1) x mean step from the first few steps, and marked `*`.

    OMP_NUM_THREADS=1 python -m benchmarks.refresh
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.benchmarks.common import (
    SHAPES,
    calibrate_random,
    command_line,
    load_dummy,
    machine,
    make_engine,
    model_dir,
    random_prompt,
    run_request,
    shared_model,
    warm_up,
    write_results,
)
from maskkv_engine.benchmarks.common import PolicySpec as _Spec
from maskkv_engine.llm import default_model_path

OUT = Path(__file__).parent / "out"
RESULTS = Path(__file__).parent / "RESULTS.md"
BUDGET = 64
BLOCK = 32


@dataclass(frozen=True)
class Combo:
    label: str
    policy: str
    refresh: str = "every_step"
    refresh_config: tuple = ()
    threshold: float | None = None

    def params(self, gen: int, seed: int = 0) -> SamplingParams:
        block = min(BLOCK, gen)
        return SamplingParams(
            gen_length=gen, steps=gen, block_length=block, threshold=self.threshold, stop_at_eos=False, seed=seed,
            refresh=self.refresh, refresh_config=dict(self.refresh_config),
        )  # fmt: skip


COMBOS = [
    Combo("none", "none"),
    Combo("full", "full"),
    Combo("maskkv", "maskkv"),
    Combo("maskkv+fast_dllm+t0.9", "maskkv", "fast_dllm", threshold=0.9),
    Combo("maskkv+dllm_cache", "maskkv", "dllm_cache"),
    Combo("maskkv+elastic", "maskkv", "elastic", threshold=0.9),
]


# ---- part A: quality on the default model ---------------------------------------------------------------
def part_a(model: str, lengths: list[int], gens: list[int], n: int, seed: int, tasks: list[str]) -> list[dict]:
    from benchmarks.longctx import generate_suite, load_tokenizer

    tokenizer = load_tokenizer(model)
    rows = []
    for length in lengths:
        samples = generate_suite(tasks, [length], n, seed, tokenizer)
        for gen in gens:
            base = None
            for combo in COMBOS:
                llm = LLM(model, kv_policy=combo.policy, kv_budget=BUDGET if combo.policy == "maskkv" else None)
                eng = llm.llm_engine
                if eng.block_manager is not None:
                    eng.block_manager.reset_peak()
                t0 = time.perf_counter()
                outs = llm.generate(
                    [{"prompt_token_ids": s.prompt_token_ids} for s in samples], combo.params(gen), use_tqdm=False
                )
                wall = time.perf_counter() - t0
                stop = eng.stop_token_ids
                correct = [s.is_answered_by(o.outputs[0].token_ids, stop) for o, s in zip(outs, samples)]
                row = {
                    "part": "A", "length": length, "gen": gen, "combo": combo.label,
                    "accuracy": sum(correct) / len(correct),
                    "nfe": statistics.fmean(o.metrics.num_steps for o in outs),
                    "seconds_per_request": wall / len(samples),
                    "kv_peak_bytes": eng.block_manager.peak_bytes if eng.block_manager is not None else 0,
                    "recompute_fraction": statistics.fmean(o.metrics.recompute_fraction or 1.0 for o in outs),
                }  # fmt: skip
                base = base or row
                row["speedup"] = base["seconds_per_request"] / row["seconds_per_request"]
                rows.append(row)
                print(_line(row), flush=True)
    return rows


# ---- part B: speed on a random-weight LLaDA-shaped model --------------------------------------------------
def part_b(shape_name: str, lengths: list[int], gens: list[int], none_steps: int) -> list[dict]:
    shape = SHAPES[shape_name]
    device = torch.device("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(shape, Path(tmp), max(lengths) + max(gens) + 64)
        model, cfg = load_dummy(path, device, "float32")
        calibrate_random(path, model, cfg)
        with shared_model(model, cfg):
            for length in lengths:
                prompt = random_prompt(length, cfg, torch.Generator().manual_seed(length))
                for gen in gens:
                    base = None
                    for combo in COMBOS:
                        spec = _Spec(combo.label, combo.policy, BUDGET if combo.policy == "maskkv" else None)
                        engine = make_engine(path, spec, device, "float32", None)
                        warm_up(engine, cfg)
                        limit = none_steps if combo.policy == "none" else None
                        run = run_request(engine, prompt, combo.params(gen), max_steps=limit)
                        extrapolated = not run.finished
                        seconds = run.end_to_end
                        nfe = run.num_steps
                        if extrapolated:  # the fixed schedule: one forward per token
                            nfe = gen
                            seconds = run.prefill + (gen - 1) * run.mean_step
                        req_layers = cfg.num_layers
                        row = {
                            "part": "B", "length": length, "gen": gen, "combo": combo.label,
                            "nfe": nfe, "seconds_per_request": seconds, "extrapolated": extrapolated,
                            "kv_peak_bytes": run.kv_peak, "prefill": run.prefill, "mean_step": run.mean_step,
                            "layers": req_layers,
                        }  # fmt: skip
                        base = base or row
                        row["speedup"] = base["seconds_per_request"] / row["seconds_per_request"]
                        rows.append(row)
                        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    acc = f" acc {100 * row['accuracy']:5.1f}%" if "accuracy" in row else ""
    star = "*" if row.get("extrapolated") else ""
    return (
        f"[{row['part']}] {row['length']:>5}/{row['gen']:<3} {row['combo']:<22}{acc} NFE {row['nfe']:6.1f} "
        f"{row['seconds_per_request']:8.2f}s{star} x{row['speedup']:6.1f} KV {row['kv_peak_bytes'] / 2**20:7.2f} MiB"
    )


def table(rows: list[dict], part: str) -> str:
    rows = [r for r in rows if r["part"] == part]
    quality = part == "A"
    head = (
        "| prompt | gen | combination | "
        + ("accuracy | " if quality else "")
        + "NFE | s / request | vs none | peak KV (MiB) |"
    )
    out = [head, "|---:|---:|---|" + ("---:|" if quality else "") + "---:|---:|---:|---:|"]
    for r in rows:
        acc = f"{100 * r['accuracy']:.0f}% | " if quality else ""
        star = "*" if r.get("extrapolated") else ""
        out.append(
            f"| {r['length']} | {r['gen']} | {r['combo']} | {acc}{r['nfe']:.1f} | {r['seconds_per_request']:.2f}{star} | "
            f"{r['speedup']:.1f}x | {r['kv_peak_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="part A model (default: the embedded default model)")
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--gens", default="32,256")
    p.add_argument("--n", type=int, default=8, help="part A samples per (task, length)")
    p.add_argument("--tasks", default="single_needle", help="part A tasks (the ones the default model answers)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--shape", default="cpu", help="part B model shape (maskkv_engine/benchmarks/common.py)")
    p.add_argument("--none-steps", type=int, default=4, help="part B: steps of `none` measured before extrapolating")
    p.add_argument("--parts", default="A,B")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    gens = [int(x) for x in args.gens.split(",")]
    load0, t0 = os.getloadavg(), time.perf_counter()
    rows = []
    if "A" in args.parts:
        rows += part_a(args.model or default_model_path(), lengths, gens, args.n, args.seed, args.tasks.split(","))
    if "B" in args.parts:
        rows += part_b(args.shape, lengths, gens, args.none_steps)
    OUT.mkdir(exist_ok=True)
    (OUT / "refresh.json").write_text(json.dumps(rows, indent=1))
    minutes = (time.perf_counter() - t0) / 60
    cmd = command_line("python -m benchmarks.refresh", argv)
    lines = [
        f"Command: `{cmd}` — {machine(torch.device('cpu'))}; {minutes:.1f} min; load average "
        f"{load0[0]:.2f} -> {os.getloadavg()[0]:.2f}. MaskKV budget {BUDGET} KV pairs per head (a profile "
        f"fixes its budgets); blocks of {BLOCK}; steps = gen_length for the fixed schedules. `*`: `none` "
        f"extrapolated from its first {args.none_steps} steps. Speed-ups are against `none` in the same run.",
        "",
    ]
    if "A" in args.parts:
        lines += [
            f"Part A — the default model, tasks {args.tasks}, {args.n} samples per (task, length):",
            "",
            table(rows, "A"),
            "",
        ]
    if "B" in args.parts:
        lines += [
            f"Part B — random-weight LLaDA-shaped model ({SHAPES[args.shape].describe()}):",
            "",
            table(rows, "B"),
            "",
        ]
    lines.append(
        "Papers, for reference (LLaDA-8B on GPUs, GSM8K-class tasks, against the reference decoder): Fast-dLLM "
        "8.1x (27.6x at 1024 tokens), dLLM-Cache up to 9.1x, Elastic-Cache 8.7x (256 tokens) / 45.1x (longer)."
    )
    if not args.no_write:
        write_results(RESULTS, "Refresh strategies and parallel decoding", lines)
    print()
    for part in ("A", "B"):
        if any(r["part"] == part for r in rows):
            print(table(rows, part))
            print()


if __name__ == "__main__":
    main()
