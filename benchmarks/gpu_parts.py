"""The parts of ``python -m benchmarks.gpu_suite``: each runs in its own process, saves its figures as it
goes (a part stopped at its time limit keeps what it measured) and renders its own Markdown.

Every part reuses the benchmark that owns the measurement (benchmarks/paged_attention.py,
maskkv_engine/benchmarks/speed_memory.py, benchmarks/throughput.py, benchmarks/gpu_syncs.py); this file
only picks the sizes (GPU, or toy sizes on the CPU for ``--dry-run``) and collects the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from maskkv_engine.benchmarks.common import PolicySpec

ROOT = Path(__file__).resolve().parent.parent

MASKKV_32, NONE = PolicySpec("maskkv", "maskkv", 32), PolicySpec("none", "none")
# sizes per mode: 'gpu' (one H100, the real run) and 'dry' (toy sizes on a CPU, triton interpreted)
SIZES = {
    "gpu": {
        "attention": {
            "shapes": [("8b", 1), ("llada", 1), ("8b", 16)],  # (shape, sequences in the step)
            "lengths": [4096, 16384, 32768],
            "gen": 32,
            "budget": 256,
            "min_seconds": 0.1,
            "copy_bytes": 1 << 30,
        },
        "speed": {
            "shape": "llada-8b",
            "lengths": "4096,16384,32768",
            "gen_lengths": "32,128",
            "policies": "none,full,dllm-cache,maskkv-256",
            "true_e2e_limit": 8,
            "calibration_prompts": 2,
        },
        "throughput": {"shape": "llada-8b", "requests": 64, "prompt": 2048, "gen": 32, "alone_seconds": 15},
        "syncs": {
            "shape": "tiny",
            "prompt": 200,
            "gen": 32,
            "runs": [(MASKKV_32, 1), (MASKKV_32, 4), (NONE, 1), (NONE, 4)],
        },
    },
    "dry": {
        "attention": {
            "shapes": [("small", 1)],
            "lengths": [128, 256],
            "gen": 8,
            "budget": 32,
            "min_seconds": 0.001,
            "copy_bytes": 16 << 20,
        },
        "speed": {
            "shape": "tiny",
            "lengths": "128",
            "gen_lengths": "8,16",
            "policies": "none,full,dllm-cache,maskkv-256",
            "true_e2e_limit": 0.5,
            "calibration_prompts": 1,
        },
        "throughput": {"shape": "tiny", "requests": 6, "prompt": 64, "gen": 8, "alone_seconds": 1},
        "syncs": {"shape": "tiny", "prompt": 40, "gen": 4, "runs": [(MASKKV_32, 2), (NONE, 1)]},
    },
}


class Recorder:
    """A part's figures and Markdown, written to ``<out>/parts/<name>.json`` after every measurement."""

    def __init__(self, out: Path, name: str, device: str):
        self.device = device
        self.path = Path(out) / "parts" / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.figures: dict = {}
        self.markdown: list[str] = []
        self.status = "running"
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"status": self.status, "device": self.device, "figures": self.figures, "markdown": self.markdown},
                indent=1,
            )
        )
        tmp.replace(self.path)


def device_for(dry: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")


def device_text(device: torch.device) -> str:
    """The machine, and on a GPU its name and memory."""
    from maskkv_engine.benchmarks.common import machine

    if device.type != "cuda":
        return machine(device)
    total = torch.cuda.get_device_properties(device).total_memory
    return f"{torch.cuda.get_device_name(device)}, {total / 2**30:.1f} GiB; {machine(device)}"


# ---- part 1: the CUDA test subset --------------------------------------------------------------------
def cuda_tests(rec: Recorder, dry: bool, deadline: float) -> None:
    """``pytest -m cuda`` in this process (plugins that the GPU machine may lack stay unloaded), junit XML parsed."""
    import pytest

    junit = rec.path.with_name("cuda_tests.xml")
    args = ["-q", "-rs", "-m", "cuda", "-o", "addopts=", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    rc = pytest.main([*args, str(ROOT / "tests" / "test_cuda.py")])
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = {"failure": "failed", "error": "error"}.get(tag, tag), found.get("message", "")
        cases.append(
            {"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), "why": message}
        )
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    rec.figures = {"exit_code": int(rc), **counts, "tests": cases}
    rec.markdown = [
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped "
        f"(`pytest -m cuda tests/test_cuda.py`, exit code {int(rc)}).",
        "",
        "| test | outcome | s | note |",
        "|---|---|---|---|",
        *[f"| {c['test']} | {c['outcome']} | {c['seconds']:.2f} | {c['why'][:120]} |" for c in cases],
    ]


# ---- part 2: paged attention microbenchmark ----------------------------------------------------------
def attention(rec: Recorder, dry: bool, deadline: float) -> None:
    from benchmarks import paged_attention as pa
    from maskkv_engine.attention.selector import get_attention_backend

    size = SIZES["dry" if dry else "gpu"]["attention"]
    device = device_for(dry)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {**pa.SHAPES, "llada": pa.Shape("32q/32kv/d128", 32, 32, 128)}
    backends = {"torch": get_attention_backend("torch", device), "triton": get_attention_backend("triton", device)}
    copy_bw = pa.copy_bandwidth(device, size["copy_bytes"])
    rec.figures = {"device": str(device), "dtype": str(dtype), "copy_bandwidth_Bps": copy_bw, "rows": []}
    rows: list = []
    for key, batch in size["shapes"]:
        for prompt in size["lengths"]:
            if time.time() > deadline - 5:
                rec.figures["stopped"] = f"out of time before {key} batch {batch} prompt {prompt}"
                break
            args = argparse.Namespace(
                batch=batch, gen=size["gen"], prompt=prompt, budget=size["budget"], min_seconds=size["min_seconds"]
            )
            torch.manual_seed(0)
            for r in pa.run_shape(shapes[key], args, backends, device, dtype):
                r.shape = f"{r.shape} x{batch}"
                rows.append(r)
                rec.figures["rows"].append(
                    {
                        **asdict(r),
                        "batch": batch,
                        "bandwidth_Bps": r.read_bytes / r.seconds,
                        "of_copy": r.read_bytes / r.seconds / copy_bw,
                    }
                )
            rec.markdown = [
                f"dtype {str(dtype).removeprefix('torch.')}; {size['gen']} response queries per sequence; mean budget "
                f"{size['budget']} per kv head; one layer. Device-to-device copy ({size['copy_bytes'] >> 20} MiB, read + "
                f"write): {copy_bw / 1e9:.1f} GB/s.",
                "",
                *pa.table(rows, copy_bw),
            ]
            rec.save()


# ---- part 3: speed and memory at the llada-8b shape --------------------------------------------------
def random_state_on_device(expected: dict, seed: int, dtype: torch.dtype, device: torch.device) -> dict:
    """``models.loader._random_state`` with the draws on ``device`` itself (same names, shapes, dtypes)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in expected.items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight") or ".norm." in name:
            state[name] = torch.ones(p.shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            state[name] = torch.zeros(p.shape, dtype=dtype, device=device)
        else:
            state[name] = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
    return state


@contextlib.contextmanager
def weights_on_device(device: torch.device, always: bool = False) -> Iterator[None]:
    """Random weights drawn on the GPU itself: the loader draws them on the CPU (a minute for 8B parameters),
    which would eat the suite's budget. Values differ, shapes and dtypes do not: speed does not care.
    Only on CUDA unless ``always`` (tests)."""
    if device.type != "cuda" and not always:
        yield
        return
    from maskkv_engine.models import loader

    original = loader._random_state
    loader._random_state = random_state_on_device
    try:
        yield
    finally:
        loader._random_state = original


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
                f"{run['per_denoise_step']:.1f} per denoise step ({run['num_denoise_steps']} steps). Per denoise step:",
                *[f"- {site}: {n / max(run['num_denoise_steps'], 1):.1f}" for site, n in run["denoise_steps"].items()],
            ]
            rec.markdown = lines
            rec.save()


PARTS = {"cuda_tests": cuda_tests, "attention": attention, "speed": speed, "throughput": throughput, "syncs": syncs}


def run_part(name: str, out: Path, dry: bool, limit_s: float) -> int:
    """Entry of a part's own process (``python -m benchmarks.gpu_suite --part NAME``)."""
    import maskkv_engine.benchmarks.common  # noqa: F401  (the engine, the models, torch)

    # the benchmarks call gc.collect() between configurations: with the imported modules' objects frozen it
    # takes milliseconds instead of most of a second per call
    gc.freeze()
    rec = Recorder(out, name, device_text(device_for(dry)))
    start = time.time()
    try:
        PARTS[name](rec, dry, start + limit_s)
    except BaseException as e:
        rec.status = f"failed: {type(e).__name__}: {e}"
        rec.save()
        raise
    rec.status = "ok"
    rec.figures["seconds"] = time.time() - start

    rec.save()
    sys.stdout.flush()
    return 0
