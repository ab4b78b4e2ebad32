"""benchmarks/long_prompt_memory.py --quick: the script runs and reports every configuration."""

from __future__ import annotations

import json

import pytest

from benchmarks import long_prompt_memory


def test_quick_run_reports_every_configuration(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert long_prompt_memory.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    labels = {long_prompt_memory.label(r) for r in result["rows"]}
    assert labels == {f"{p} {c}" for p in ("none", "full", "maskkv-16") for c in ("unchunked", "chunk 32")}
    assert all(r["ok"] and r["peak_above_idle"] >= 0 for r in result["rows"]), result["rows"]
    limits = {name: limit["longest"] for name, limit in result["longest_completed"].items()}
    # a 768 KiB pool holds full KV of 128 tokens (512 KiB), not of 256 (1 MiB); maskkv keeps 16 per head
    assert limits["full unchunked"] == limits["full chunk 32"] == 128
    assert "pool" in result["longest_completed"]["full unchunked"]["first_failure"]
    assert limits["maskkv-16 chunk 32"] == limits["maskkv-16 unchunked"] == 256
    assert not any(name.startswith("none") for name in limits)  # keeps no KV: no pool bounds it
    assert "Peak RSS above idle" in capsys.readouterr().out


def test_trimmed_sweep_skips_the_costly_runs():
    sweep = long_prompt_memory.FULL
    assert len(sweep.configs_at(8192)) == 6
    assert ("none", None, 0) not in sweep.configs_at(16384) and ("none", None, 2048) in sweep.configs_at(16384)
    assert sweep.configs_at(32768) == [("full", None, 2048), ("maskkv", 256, 2048)]


def test_plot_draws_from_a_result(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the bench extra")
    rows = [
        {"policy": p, "budget": b, "chunk": 32, "n": n, "ok": True, "peak_above_idle": n * k}
        for p, b, k in (("full", None, 100), ("maskkv", 16, 10))
        for n in (128, 256)
    ]
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"shape": "tiny", "rows": rows}))
    assert long_prompt_memory.main(["--replot", str(result), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
