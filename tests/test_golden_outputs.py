"""Golden outputs: the token ids of a fixed set of mixed batches over every kv_policy x refresh x decoding
rule x model family (LLaDA / Dream, GQA and not, with and without a profile), recorded before the engine was
restructured (issue 15). A refactor must leave every one of them unchanged; a deliberate behaviour change
re-records them in the same commit and says why (``MASKKV_RECORD_GOLDEN=1 pytest tests/test_golden_outputs.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.combinations import MODEL_CASES, POLICIES, build_models, make_llm, random_request_case

GOLDEN = Path(__file__).parent / "golden" / "outputs.json"
REQUESTS_PER_BATCH = 5


def _batches():
    rng = torch.Generator().manual_seed(2026)
    for case in MODEL_CASES:
        for policy in POLICIES:
            yield case, policy, [random_request_case(rng, case.dream, policy) for _ in range(REQUESTS_PER_BATCH)]


def _run_all(root: Path) -> dict[str, list]:
    paths = build_models(root)
    recorded = {}
    for case, policy, requests in _batches():
        llm = make_llm(paths[case.name], policy)
        prompts = [{"prompt_token_ids": list(r.prompt)} for r in requests]
        outs = llm.generate(prompts, [r.params(case.dream) for r in requests], use_tqdm=False)
        recorded[f"{case.name}/{policy}"] = [
            {"tokens": o.outputs[0].token_ids, "finish": o.outputs[0].finish_reason, "steps": o.metrics.num_steps}
            for o in outs
        ]
    return recorded


def test_golden_outputs_unchanged(tmp_path):
    got = _run_all(tmp_path)
    if os.environ.get("MASKKV_RECORD_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=0, sort_keys=True) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    expected = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(expected)
    changed = [key for key in expected if got[key] != expected[key]]
    assert not changed, f"{len(changed)} batches changed, e.g. {changed[:5]}"
