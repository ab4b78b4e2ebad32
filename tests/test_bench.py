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
