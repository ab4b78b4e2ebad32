"""benchmarks/long_prompt_memory.py --quick: the script runs and reports every configuration."""

from __future__ import annotations

import json

from benchmarks import long_prompt_memory


def test_quick_run_reports_every_configuration(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert long_prompt_memory.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    labels = {long_prompt_memory.label(r) for r in result["rows"]}
    assert labels == {f"{p} {c}" for p in ("none", "full", "maskkv-16") for c in ("unchunked", "chunk 32")}
    assert all(r["ok"] and r["peak_above_idle"] >= 0 for r in result["rows"]), result["rows"]
    limits = result["longest_completed"]
    # a 768 KiB pool holds full KV of 128 tokens (512 KiB), not of 256 (1 MiB); maskkv keeps 16 per head
    assert limits["full unchunked"] == limits["full chunk 32"] == 128
    assert limits["maskkv-16 chunk 32"] == limits["none chunk 32"] == 256
    assert "Peak RSS above idle" in capsys.readouterr().out
