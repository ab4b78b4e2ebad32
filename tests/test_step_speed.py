"""benchmarks/step_speed.py --quick end to end (a few seconds): the engine's fast_dllm(_dual) tokens equal the
dense decoders' (the script asserts it), every configuration is timed, and its RESULTS section is written."""

from __future__ import annotations

import pytest

from benchmarks import step_speed


def test_step_speed_quick(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    step_speed.main(["--quick", "--results", str(results)])
    text = results.read_text()
    assert "## Cached denoise steps vs dense Fast-dLLM decoders (cpu)" in text
    for label, _ in step_speed.CONFIGS:
        assert f"| {label} |" in text
    assert "load average (1/5/15 min) at start" in text
    assert "Goals of issue 19" in text and "(goal >= 3.00x)" in text
    assert "nan" not in text
    assert "cached step" in capsys.readouterr().out


def test_settings_are_checked():
    with pytest.raises(ValueError, match="--settings: rule 'often'"):
        step_speed.main(["--settings", "64/16/8/often", "--no-write"])
