"""``python -m benchmarks.gpu_suite --dry-run``: every part runs at toy sizes on the CPU and leaves figures,
a part over its limit is stopped without stopping the suite, and the host-sync counter charges each call
to its line in maskkv_engine/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_syncs import SyncCounter

ROOT = Path(__file__).resolve().parent.parent


def suite(out: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--out", str(out), "--dry-run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_writes_every_part_with_figures(tmp_path):
    run = suite(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    parts = result["parts"]
    assert list(parts) == ["cuda_tests", "attention", "speed", "throughput", "syncs"]
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("log_tail"))
        assert part["figures"], name
    tests = parts["cuda_tests"]["figures"]
    assert tests["passed"] >= 5 and tests["failed"] == tests["error"] == 0  # the CUDA tests ran, on the CPU
    attention = parts["attention"]["figures"]["rows"]
    assert {r["backend"] for r in attention} == {"torch", "triton", "sdpa"}
    assert all(r["seconds"] > 0 and r["bandwidth_Bps"] > 0 for r in attention)
    speed = [r for r in parts["speed"]["figures"]["results"] if not r["skipped"]]
    assert {r["policy"] for r in speed} == {"none", "full", "dllm-cache", "maskkv-256"}
    assert all(r["e2e_s"] > 0 and "e2e_speedup_vs_none" in r and "step_over_floor" in r for r in speed)
    rows = parts["throughput"]["figures"]["rows"]
    assert {(r["policy"], r["mode"]) for r in rows} == {
        (p, m) for p in ("maskkv-256", "full") for m in ("batched", "one-at-a-time")
    }
    syncs = parts["syncs"]["figures"]["runs"]
    assert all(run["per_denoise_step"] > 0 for run in syncs.values())
    assert result["goals"]["prompt"] and result["goals"]["maskkv_e2e_speedup"] > 0
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "Device: cpu (dry run" in markdown and "### Headline" in markdown
    assert run.stdout.strip().splitlines()[-1] == result["headline"]  # the headline is printed last


def test_a_part_over_its_limit_is_stopped_and_the_suite_goes_on(tmp_path):
    run = suite(tmp_path, "--parts", "attention,syncs", "--part-limit", "1.5")
    assert run.returncode == 0, run.stdout + run.stderr
    parts = json.loads((tmp_path / "gpu_suite.json").read_text())["parts"]
    assert list(parts) == ["attention", "syncs"]  # the second part still ran after the first was stopped
    assert all(p["status"].startswith("stopped at its time limit") for p in parts.values())
    assert all(p["seconds"] < 10 for p in parts.values())
    assert "stopped at its time limit" in (tmp_path / "gpu_suite.md").read_text()


def test_sync_counter_charges_each_call_to_its_line_in_the_package():
    from maskkv_engine.sampling.denoise_state import DenoiseState
    from maskkv_engine.sampling_params import SamplingParams

    state = DenoiseState(SamplingParams(gen_length=8, block_length=8), prompt_len=4, dream=False)
    tokens = torch.tensor([1, 2, 3, 4] + [9] * 8)
    before = dict(torch.Tensor.__dict__)
    with SyncCounter(torch.device("cpu")) as counter:
        state.candidates(tokens, 9)
        state.candidates(tokens, 9)
        torch.ones(1).item()  # a call from outside maskkv_engine/ is not on the step path
    assert dict(torch.Tensor.__dict__) == before  # every wrapped method is restored as it was
    sites = {site: n for site, n in counter.counts.items() if "denoise_state.py" in site}
    assert list(sites.values()) == [2] and next(iter(sites)).endswith(" nonzero")
    assert sum(counter.counts.values()) == 2


def test_weights_drawn_on_the_device_fill_every_parameter(llada_gqa_dir):
    """The suite's loader swap (GPU-only in a run) builds the same model: every weight, right shapes."""
    from benchmarks.gpu_parts import weights_on_device
    from maskkv_engine.models import loader

    original = loader._random_state
    with weights_on_device(torch.device("cpu"), always=True):
        model, cfg = loader.load_model(llada_gqa_dir, dtype="float32", load_format="dummy")
    reference, _ = loader.load_model(llada_gqa_dir, dtype="float32", load_format="dummy")
    assert loader._random_state is original
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert p.shape == theirs[name].shape and p.dtype == theirs[name].dtype, name
        if theirs[name].std() == 0:  # norms (ones) and biases (zeros), as the loader's
            assert torch.equal(p, theirs[name]), name
        else:
            assert 0.01 < p.std() < 0.03, name


def test_without_cuda_the_real_run_refuses_and_names_the_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real run would start")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0 and "--dry-run" in run.stderr
    assert not (tmp_path / "gpu_suite.json").exists()
