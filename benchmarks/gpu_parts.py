"""What every part of ``python -m benchmarks.gpu_suite`` shares: the sizes (GPU, or toy sizes on the CPU for
``--dry-run``), the recorder that saves a part's figures after every measurement (a part stopped at its
time limit keeps what it measured), random weights drawn on the device, and the entry of a part's process.

The parts themselves: gpu_kernel_parts.py (1 CUDA tests, 2 paged attention), gpu_engine_parts.py
(3 speed / memory, 4 throughput, 5 host syncs). Each reuses the benchmark that owns its measurement.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import sys
import time
from collections.abc import Iterator
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


# ---- random weights on the device ------------------------------------------------------------------
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
    loader._random_state = functools.partial(original, draw_device=device)
    try:
        yield
    finally:
        loader._random_state = original


def run_part(name: str, out: Path, dry: bool, limit_s: float) -> int:
    """Entry of a part's own process (``python -m benchmarks.gpu_suite --part NAME``)."""
    import maskkv_engine.benchmarks.common  # noqa: F401  (the engine, the models, torch)

    # the benchmarks call gc.collect() between configurations: with the imported modules' objects frozen it
    # takes milliseconds instead of most of a second per call
    gc.freeze()
    from benchmarks import gpu_engine_parts, gpu_kernel_parts

    parts = {
        "cuda_tests": gpu_kernel_parts.cuda_tests,
        "attention": gpu_kernel_parts.attention,
        "speed": gpu_engine_parts.speed,
        "throughput": gpu_engine_parts.throughput,
        "syncs": gpu_engine_parts.syncs,
    }
    rec = Recorder(out, name, device_text(device_for(dry)))
    start = time.time()
    try:
        parts[name](rec, dry, start + limit_s)
    except BaseException as e:
        rec.status = f"failed: {type(e).__name__}: {e}"
        rec.save()
        raise
    rec.status = "ok"
    rec.figures["seconds"] = time.time() - start
    rec.save()
    sys.stdout.flush()
    return 0
