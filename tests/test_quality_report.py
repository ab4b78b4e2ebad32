"""The quality benchmark's statistics: Wilson intervals and where two policies separate."""

from __future__ import annotations

import math

import pytest

from benchmarks.quality import PRUNING, separation, wilson


def test_wilson_matches_the_closed_form_and_stays_in_range():
    lo, hi = wilson(18, 36)  # p = 0.5: centre 0.5, half-width z sqrt(p q / n + z^2 / 4n^2) / (1 + z^2 / n)
    half = 1.96 * math.sqrt(0.25 / 36 + 1.96**2 / (4 * 36**2)) / (1 + 1.96**2 / 36)
    assert lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    assert wilson(0, 36)[0] == 0.0 and 0.08 < wilson(0, 36)[1] < 0.11  # not empty at 0%
    assert wilson(36, 36)[1] == 1.0 and 0.89 < wilson(36, 36)[0] < 0.92
    assert wilson(30, 60)[1] - wilson(30, 60)[0] < wilson(15, 30)[1] - wilson(15, 30)[0]  # more samples, narrower


def test_separation_needs_disjoint_intervals():
    def result(k, n=60):
        return {"by_task_counts": {"multi_key": (k, n)}}

    results = {f"{label}@{b}": result(30) for label in PRUNING for b in (16, 64)}
    results["maskkv@16"] = result(58)  # 97% vs 50%: disjoint
    results["maskkv@64"] = result(36)  # 60% vs 50%: overlapping
    results["snapkv@64"] = result(5)  # maskkv 60% vs 8%: disjoint
    results["adakv@16"] = result(60)  # 100% vs maskkv 97%: overlapping
    text = separation(results, ["multi_key"], [16, 64])
    assert "snapkv: above at 16, 64;" in text
    assert "pyramidkv: above at 16, tied at 64" in text
    assert "adakv: never above, tied at 16, 64" in text
