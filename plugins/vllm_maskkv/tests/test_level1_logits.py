"""Level 1: vLLM's pooling path gives the per-position logits of our own model, bidirectionally."""

from __future__ import annotations

import pytest
import torch

from maskkv_engine.models.forward import full_forward_logits
from maskkv_engine.models.loader import load_model
from tests.conftest import encode_logits, pooling_llm, prompt_ids, shutdown_vllm

CASES = {
    "llada_dir": ("LLaDAModelLM", "LLaDATokenLogits"),
    "llada_tied_dir": ("LLaDAModelLM", "LLaDATokenLogits"),
    "dream_dir": ("DreamModel", "DreamTokenLogits"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    path = request.getfixturevalue(request.param)
    ours, _ = load_model(path, dtype="float32")
    llm = pooling_llm(path)
    yield request.param, path, llm, ours
    shutdown_vllm(llm)


def test_architecture_resolves_from_config_json(case):
    name, _, llm, _ = case
    arch, cls_name = CASES[name]
    assert llm.llm_engine.model_config.architecture == arch
    assert llm.apply_model(lambda model: type(model).__name__) == [cls_name]


def test_logits_equal_our_forward(case):
    _, _, llm, ours = case
    mask = ours.config.mask_token_id
    sequences = [prompt_ids(5, seed=0), prompt_ids(40, seed=1) + [mask] * 24, prompt_ids(130, seed=2)]
    got = encode_logits(llm, sequences)  # one batch: three sequences packed together by vLLM
    want = full_forward_logits(ours, sequences)
    for g, w, s in zip(got, want, sequences):
        assert g.shape == (len(s), ours.config.vocab_size) and g.dtype == torch.float32
        # fp32 with another summation order: the error scales with the logits' size (up to ~40 here)
        assert (g - w).abs().max().item() <= 2e-5 * w.abs().max().item()
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_late_token_changes_early_logits(case):
    """Bidirectional: position 0 sees the last token. A causal model would give identical row-0 logits."""
    _, _, llm, _ = case
    seq = prompt_ids(20, seed=5)
    changed = seq[:-1] + [seq[-1] + 1]
    a, b = encode_logits(llm, [seq, changed])
    assert (a[0] - b[0]).abs().max().item() > 1e-3
