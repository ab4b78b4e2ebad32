"""Random add / abort / step with every policy, refresh and decoding rule: accounting holds after every
operation and everything is back at the end (tests/soak.py; the long run is marked slow)."""

from __future__ import annotations

import pytest

from tests.soak import run_soak


def _check(report):
    assert report.violations == []
    assert report.internal_errors == []
    assert report.adds > 0 and report.rejected > 0 and report.aborts > 0 and report.finished > 0


def test_soak(tmp_path):
    _check(run_soak(ops=1500, seed=0, root=tmp_path))


@pytest.mark.slow
def test_long_soak(tmp_path):
    _check(run_soak(ops=20000, seed=1, root=tmp_path, engines_per_policy=2))
