"""`maskkv bench` end to end on a tiny shape and one length (about 10 s), and the CLI's argument routing."""

from __future__ import annotations

import importlib.util

import pytest

from maskkv_engine.benchmarks.speed_memory import POLICIES
from maskkv_engine.entrypoints import cli


def test_bench_smoke(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    argv = ["bench", "--shape", "tiny", "--lengths", "160", "--gen-lengths", "8", "--time-budget", "120"]
    argv += ["--results", str(results), "--work-dir", str(tmp_path / "model")]
    plot = tmp_path / "speed.png"
    if importlib.util.find_spec("matplotlib") is not None:  # the `bench` extra; CI installs `dev` only
        argv += ["--plot", str(plot)]
    assert cli.main(argv) == 0

    text = results.read_text()
    assert "## Speed and memory per policy (cpu, `tiny`)" in text
    assert "load average (1/5/15 min) at start" in text
    for spec in POLICIES:  # every configuration measured (none's true end-to-end, the others in full)
        assert f"| 160 | {spec.label} | " in text
    assert "skipped" not in text and "out of memory" not in text
    assert "### Roofline, gen_length 8" in text and "Not measured" in text
    assert (tmp_path / "model" / "tiny-168" / "maskkv_profile.json").is_file()  # calibrated: layer-by-layer eviction
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.stat().st_size > 1000
    assert "| 160 | maskkv-64 |" in capsys.readouterr().out  # the table is printed last


def test_bench_bad_policy_is_one_line_error(capsys):
    assert cli.main(["bench", "--policies", "full,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_other_commands_still_reject_unknown_arguments():
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--no-such-flag"])


def test_a_first_pass_split_by_layers_counts_as_prefill(tmp_path):
    """With a step token budget below the prompt, the engine runs the first pass over several steps:
    the benchmark must count all of them as prefill, not as denoise steps."""
    import torch

    from maskkv_engine.benchmarks.common import SHAPES, PolicySpec, make_engine, model_dir, random_prompt, run_request
    from maskkv_engine.sampling_params import SamplingParams

    path = model_dir(SHAPES["tiny"], tmp_path, 512)
    params = SamplingParams(gen_length=8, steps=8, stop_at_eos=False)
    runs = {}
    for budget in (4096, 128):  # the whole first pass in one step; split by layers
        engine = make_engine(path, PolicySpec("full", "full"), torch.device("cpu"), "float32", None,
                             max_num_batched_tokens=budget)  # fmt: skip
        prompt = random_prompt(200, engine.model_config, torch.Generator().manual_seed(0))
        runs[budget] = run_request(engine, prompt, params)
    whole, split = runs[4096], runs[128]
    assert whole.prefill_steps == 1 and split.prefill_steps == engine.model_config.num_layers
    assert len(whole.denoise_steps) == len(split.denoise_steps) == 7 and whole.finished and split.finished
    assert split.kv_held == whole.kv_held > 0
