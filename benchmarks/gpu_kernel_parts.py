"""Parts 1 and 2 of ``python -m benchmarks.gpu_suite``: the CUDA test subset (``pytest -m cuda``) and the
paged attention microbenchmark (benchmarks/paged_attention.py at 4k / 16k / 32k, bandwidth against a copy)."""

from __future__ import annotations

import argparse
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict

import torch

from benchmarks.gpu_parts import ROOT, SIZES, Recorder, device_for


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
