"""Parts 3-5 of ``python -m benchmarks.gpu_suite``, the whole engine: speed and memory per policy at the
llada-8b shape (maskkv_engine/benchmarks/speed_memory.py), throughput batched vs one at a time
(benchmarks/throughput.py), and host syncs per step (benchmarks/gpu_syncs.py)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_parts import SIZES, Recorder, device_for, weights_on_device
from maskkv_engine.benchmarks.common import PolicySpec


def speed(rec: Recorder, dry: bool, deadline: float) -> None:
    from maskkv_engine.benchmarks import speed_memory as sm
    from maskkv_engine.benchmarks import speed_report

    size = SIZES["dry" if dry else "gpu"]["speed"]
    device = device_for(dry)
    budget = max(deadline - time.time() - (5 if dry else 45), 1)  # model, calibration and peaks come first
    argv = [
        "--shape", size["shape"], "--device", str(device), "--lengths", size["lengths"],
        "--gen-lengths", size["gen_lengths"], "--policies", size["policies"], "--time-budget", f"{budget:.0f}",
        "--true-e2e-limit", str(size["true_e2e_limit"]), "--calibration-prompts", str(size["calibration_prompts"]),
        "--work-dir", tempfile.mkdtemp(prefix="gpu-suite-speed-"),
    ]  # fmt: skip
    if device.type == "cpu":  # the interpreter would take minutes for whole requests: parts 1, 2 and 5 run triton
        argv += ["--attention-backend", "torch"]
    args = sm.parse(argv, prog="gpu_suite speed")
    if dry:  # a 2048^3 matmul and a 256 MiB copy take seconds on a shared CPU core; the toy run needs no true peak
        from maskkv_engine.benchmarks import roofline

        sm.measure_peak = lambda dev, dt: roofline.measure_peak(dev, dt, matmul_size=256, copy_bytes=16 << 20)
    results: list = []
    state: dict = {}

    def weights() -> int:
        if "weights" not in state:
            from maskkv_engine.benchmarks.common import SHAPES

            s = SHAPES[size["shape"]]
            per_layer = s.d_model * (2 * s.n_heads + 2 * s.n_kv_heads) * s.head_dim + 3 * s.d_model * s.mlp
            elem = 2 if args.dtype == "bfloat16" else 4
            state["weights"] = (s.n_layers * per_layer + 2 * s.vocab * s.d_model) * elem
        return state["weights"]

    def on_result(r) -> None:
        results.append(r)
        rec.figures.setdefault("results", []).append(speed_row(r, results, weights()))
        rec.markdown = ["Measured so far (the full tables follow when the part completes):", "", *progress_table(rec)]
        rec.save()

    rec.figures = {"shape": size["shape"], "dtype": args.dtype, "backend": args.attention_backend, "budget_s": budget}
    with weights_on_device(device):
        results_all, peak, shape_text, cfg = sm.run_all(args, on_result=on_result)
    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    rec.figures.update(
        {
            "peak_flops": peak.flops,
            "copy_bandwidth_Bps": peak.bandwidth,
            "model": shape_text,
            "weights_bytes": weights(),
        }
    )
    rec.markdown = [
        f"Model: {shape_text} (random weights, {args.dtype}); attention backend {args.attention_backend}; one request "
        f"alone. Roofline: {peak.describe()} (measured in this run). Weights {weights() / 2**30:.2f} GiB.",
    ]
    for gen in args.gen_lengths:
        rec.markdown += ["", f"gen_length {gen}:", "", *speed_report.speed_table(results_all, gen, cfg, elem)]
        rec.markdown += ["", *speed_report.roofline_table(results_all, gen)]
    rec.markdown += ["", *speed_report.headline(results_all)]
    rec.save()


def progress_table(rec: Recorder) -> list[str]:
    """The saved rows as a table: what a part stopped at its limit still shows."""
    lines = [
        "| prompt | gen | policy | prefill s | step ms | end-to-end s | x none | step / floor | peak above weights GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rec.figures.get("results", []):
        if r.get("skipped"):
            lines.append(f"| {r['prompt']} | {r['gen']} | {r['policy']} | {r['skipped']} | | | | | |")
            continue
        x_none = f"{r['e2e_speedup_vs_none']:.1f}x" if "e2e_speedup_vs_none" in r else "—"
        floor = f"{r['step_over_floor']:.1f}x" if "step_over_floor" in r else "—"
        lines.append(
            f"| {r['prompt']} | {r['gen']} | {r['policy']} | {r['prefill_s']:.2f} | {r['step_ms']:.1f} | "
            f"{r['e2e_s']:.1f}{'*' if r['extrapolated'] else ''} | {x_none} | {floor} | "
            f"{r['peak_above_weights_bytes'] / 2**30:.2f} |"
        )
    return lines


def speed_row(r, results: list, weights: int) -> dict:
    """One configuration's figures, with its ratios against none of the same run and its roofline."""
    row = {"policy": r.spec.label, "prompt": r.n, "gen": r.gen, "skipped": r.skipped}
    if not r.ok:
        return row
    run = r.run
    row.update(
        prefill_s=run.prefill, step_ms=run.mean_step * 1e3, e2e_s=r.e2e, extrapolated=r.extrapolated,
        tokens_per_s=r.tokens_per_second, peak_memory_bytes=run.mem_peak, idle_memory_bytes=run.mem_idle,
        peak_above_weights_bytes=run.mem_peak - weights, kv_peak_bytes=run.kv_peak, kv_held_bytes=run.kv_held,
        # what neither the weights nor the pages explain: activations and refresh caches, the reserve that
        # gpu_memory_utilization sizing must leave free (the pool itself is sized to the request here)
        other_peak_bytes=run.mem_peak - weights - run.kv_peak,
    )  # fmt: skip
    if r.floor is not None:
        row.update(
            floor_ms=r.floor.seconds * 1e3, floor_bound=r.floor.bound, step_over_floor=run.mean_step / r.floor.seconds
        )
    none = next((x for x in results if x.ok and x.spec.label == "none" and (x.n, x.gen) == (r.n, r.gen)), None)
    if none is not None:
        row.update(
            e2e_speedup_vs_none=none.e2e / r.e2e,
            step_speedup_vs_none=none.run.mean_step / run.mean_step,
            prefill_vs_none=run.prefill / none.run.prefill,
            peak_memory_vs_none=run.mem_peak / none.run.mem_peak,
        )
    return row


# ---- part 4: throughput, batched vs one at a time ----------------------------------------------------
def throughput(rec: Recorder, dry: bool, deadline: float) -> None:
    from benchmarks import throughput as tp
    from maskkv_engine.benchmarks import common
    from maskkv_engine.sampling_params import SamplingParams

    size = SIZES["dry" if dry else "gpu"]["throughput"]
    device = device_for(dry)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    backend = "triton" if device.type == "cuda" else "torch"  # the interpreter is too slow for 100s of steps
    max_len = max(size["prompt"] + size["gen"], 256)  # the warm-up request is 128 + 8 tokens
    path = common.model_dir(common.SHAPES[size["shape"]], Path(tempfile.mkdtemp()), max_len, dtype)
    with weights_on_device(device):
        model, cfg = common.load_dummy(path, device, dtype)
    common.calibrate_random(path, model, cfg, num_prompts=1)
    gen = torch.Generator().manual_seed(0)
    prompts = [common.random_prompt(size["prompt"], cfg, gen) for _ in range(size["requests"])]
    params = SamplingParams(gen_length=size["gen"], stop_at_eos=False)
    options = {}
    if device.type == "cpu":  # on a GPU the pool is sized by gpu_memory_utilization, as a user would get it
        full = common.pages_needed(path, cfg, PolicySpec("full", "full"), size["prompt"], size["gen"])
        options["num_pages"] = size["requests"] * full + 1
    results = []
    rec.figures = {"shape": size["shape"], "requests": size["requests"], "prompt": size["prompt"], "gen": size["gen"]}
    with common.shared_model(model, cfg):
        for spec in (PolicySpec("maskkv-256", "maskkv", 256), PolicySpec("full", "full")):
            for mode, mode_options in (("batched", {}), ("one-at-a-time", {"max_num_seqs": 1})):
                left = deadline - time.time() - 5
                if left < 3:
                    rec.figures.setdefault("skipped", []).append(f"{spec.label} {mode}: out of time")
                    continue
                common.release_memory(device)  # the pool is sized from free memory: hand back the cached blocks
                engine = common.make_engine(path, spec, device, dtype, backend, **options, **mode_options)
                common.warm_up(engine, cfg)
                stop = {"seconds": min(size["alone_seconds"], left / 2)} if mode == "one-at-a-time" else None
                res = tp.run_mode(engine, prompts, params, stop)
                res.spec, res.mode = spec, mode
                pool = engine.block_manager.num_pages if engine.block_manager is not None else 0
                del engine
                common.release_memory(device)
                if not res.latencies:
                    rec.figures.setdefault("skipped", []).append(f"{spec.label} {mode}: no request finished in time")
                    continue
                if len(res.latencies) < size["requests"]:  # stopped for time: project from the requests served
                    tp.project_none(res, size["requests"], size["gen"], size["prompt"])
                results.append(res)
                rec.figures.setdefault("rows", []).append(
                    {
                        "policy": spec.label, "mode": mode, "wall_s": res.wall, "tokens_per_s": res.tokens_per_second(size["gen"]),
                        "p50_latency_s": res.percentile(50), "p99_latency_s": res.percentile(99), "peak_pages": res.peak_pages,
                        "pool_pages": pool, "peak_kv_bytes": res.peak_kv_bytes, "engine_steps": res.engine_steps,
                        "projected": res.projected,
                    }
                )  # fmt: skip
                rec.save()
    by = {(r.spec.label, r.mode): r for r in results}
    for label in ("maskkv-256", "full"):
        if (label, "batched") in by and (label, "one-at-a-time") in by:
            b, a = by[label, "batched"], by[label, "one-at-a-time"]
            rec.figures[f"{label}_batched_over_alone"] = b.tokens_per_second(size["gen"]) / a.tokens_per_second(
                size["gen"]
            )
    complete = [r for r in results if (r.spec.label, "one-at-a-time") in by]
    rec.markdown = [
        f"{size['requests']} requests x (prompt {size['prompt']}, gen {size['gen']}), all submitted at once; "
        f"{rec.figures['shape']} shape, {dtype}, {backend}; page pool "
        + ("from gpu_memory_utilization (default)." if device.type == "cuda" else f"{options['num_pages']} pages."),
        "",
        *(tp.table(complete, size["gen"]) if complete else ["(no complete policy)"]),
    ]
    rec.save()


# ---- part 5: host syncs per step ---------------------------------------------------------------------
def syncs(rec: Recorder, dry: bool, deadline: float) -> None:
    from benchmarks.gpu_syncs import per_step
    from maskkv_engine.benchmarks import common
    from maskkv_engine.sampling_params import SamplingParams

    size = SIZES["dry" if dry else "gpu"]["syncs"]
    device = device_for(dry)
    path = common.model_dir(
        common.SHAPES[size["shape"]], Path(tempfile.mkdtemp()), max(size["prompt"] + size["gen"], 128)
    )
    model, cfg = common.load_dummy(path, device, "float32")
    common.calibrate_random(path, model, cfg, num_prompts=1, prompt_len=64)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(gen_length=size["gen"], block_length=min(32, size["gen"]), stop_at_eos=False)
    method = "torch.cuda.set_sync_debug_mode('warn')" if device.type == "cuda" else "wrapped Tensor methods (CPU)"
    rec.figures = {"method": method, "backend": "triton", "runs": {}}
    lines = [
        f"Counted with {method}; backend triton; `{size['shape']}` shape; prompt {size['prompt']}, gen {size['gen']}."
    ]
    with common.shared_model(model, cfg):
        for spec, batch in size["runs"]:
            if time.time() > deadline - 3:
                break
            options = {"num_pages": 4096} if spec.policy != "none" else {}
            engine = common.make_engine(path, spec, device, "float32", "triton", **options)
            ids = [common.random_prompt(size["prompt"], cfg, gen) for _ in range(batch)]
            run = per_step(engine, ids, params)
            rec.figures["runs"][f"{spec.label} x{batch}"] = run
            lines += [
                "",
                f"{spec.label}, batch {batch}: first step {run['first_step_total']} syncs, "
                f"{run['per_denoise_step']:.1f} per denoise step ({run['num_denoise_steps']} steps); of them, device "
                f"reads: {run['first_step_device_reads']} first, {run['device_reads_per_denoise_step']:.1f} per denoise "
                "step. Per denoise step:",
                *[f"- {site}: {n / max(run['num_denoise_steps'], 1):.1f}" for site, n in run["denoise_steps"].items()],
            ]
            rec.markdown = lines
            rec.save()
