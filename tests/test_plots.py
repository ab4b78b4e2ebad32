"""The speed / memory plot redraws from RESULTS.md's tables, every policy in every panel."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskkv_engine.benchmarks.plots import STYLES, plot_points, points_from_markdown

RESULTS = Path(__file__).parents[1] / "benchmarks" / "RESULTS.md"


def test_results_tables_parse_with_none_everywhere():
    points, title = points_from_markdown(RESULTS.read_text())
    for gen in (32, 128):
        assert {p.label for p in points if p.gen == gen} == set(STYLES)
    none = [p for p in points if p.label == "none"]
    assert none and all(p.kv_mib > 0 and p.speedup == 1.0 for p in none)  # none has a peak-KV point too
    flags = {(p.gen, p.n): p.none_extrapolated for p in points}
    assert flags[(32, 8192)] and not flags[(32, 1024)] and flags[(128, 2048)]
    assert "CPU" in title and "random-weight" in title


def test_plot_points_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    points, title = points_from_markdown(RESULTS.read_text())
    out = tmp_path / "speed.png"
    plot_points(points, out, title)
    assert out.stat().st_size > 10_000
