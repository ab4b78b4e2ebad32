"""The three contracts are open: a new decoding rule and a new refresh strategy are registered through their
registries alone (no edit anywhere else) and run in the engine next to the built-ins, and the layers hold."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.refresh.base import RefreshState, RefreshStrategy, StepPlan
from maskkv_engine.refresh.registry import REFRESH_STRATEGIES, register_refresh
from maskkv_engine.sampling.registry import RULES, register_rule
from maskkv_engine.sampling.rules.base import LLADA, DecodingRule
from tests.combinations import assert_pool_empty

ROOT = Path(__file__).resolve().parents[1]


class LeftToRight(DecodingRule):
    """Greedy tokens; the leftmost masks commit first (an autoregressive order)."""

    name = "left_to_right"
    families = (LLADA,)

    def choose(self, logits, params, dream, generator):
        x0 = logits.argmax(-1)
        confidence = -torch.arange(x0.numel(), dtype=torch.float64)  # candidates come in ascending position
        return x0, confidence


class FullPassEveryOther(RefreshState):
    """Recompute the whole sequence (rewriting the kept prompt KV) every other cached step."""

    def __init__(self, request):
        super().__init__(request)
        self.cached_steps = 0

    def plan_cached_step(self) -> StepPlan:
        r = self.request
        self.cached_steps += 1
        if self.cached_steps % 2 == 0:
            return StepPlan(0, r.num_tokens, full_pass=True, rewrite=True)
        return StepPlan(r.n_cached, r.num_tokens, use_pages=True)


@dataclass
class EveryOther(RefreshStrategy):
    name = "every_other"

    def new_state(self, request):
        return FullPassEveryOther(request)


@pytest.fixture
def registered():
    register_rule(LeftToRight)
    register_refresh("every_other", EveryOther)
    yield
    RULES.pop("left_to_right")
    REFRESH_STRATEGIES.pop("every_other")


def test_a_new_rule_and_strategy_run_through_the_registries_alone(llada_dir, registered):
    llm = LLM(str(llada_dir), kv_policy="maskkv", kv_budget=4, device="cpu", num_pages=256)
    prompt = {"prompt_token_ids": list(range(3, 30))}
    mine = SamplingParams(gen_length=8, block_length=8, remasking="left_to_right", refresh="every_other")
    plain = SamplingParams(gen_length=8, block_length=4, seed=1)
    together = llm.generate([prompt, prompt], [mine, plain], use_tqdm=False)
    alone = llm.generate(prompt, mine, use_tqdm=False)[0]
    assert together[0].outputs[0].token_ids == alone.outputs[0].token_ids
    assert together[1].outputs[0].token_ids == llm.generate(prompt, plain, use_tqdm=False)[0].outputs[0].token_ids
    # left to right: each step commits exactly the leftmost mask, so the canvas fills in order
    assert alone.metrics.committed_per_step == [1] * 8
    assert alone.metrics.num_full_passes == 1 + 3  # the first pass, then every other of the 7 cached steps
    assert_pool_empty(llm)


def test_rule_names_are_the_registrys(llada_dir, dream_dir, registered):
    llada = LLM(str(llada_dir), kv_policy="full", device="cpu")
    with pytest.raises(ValueError, match=r"'maskgit_plus' is not a LLaDA rule \(allowed: \[.*'left_to_right'"):
        llada.generate({"prompt_token_ids": [3, 4]}, SamplingParams(remasking="maskgit_plus"), use_tqdm=False)
    dream = LLM(str(dream_dir), kv_policy="full", device="cpu")
    with pytest.raises(ValueError, match="'left_to_right' is not a Dream rule"):
        dream.generate({"prompt_token_ids": [3, 4]}, SamplingParams(remasking="left_to_right"), use_tqdm=False)


def test_import_layers_hold():
    """lint-imports (pyproject's contracts): no cycles, no upward edges, plugins on the public API only."""
    linter = Path(sys.executable).with_name("lint-imports")
    if not linter.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {"PYTHONPATH": str(ROOT / "plugins" / "vllm_maskkv"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(linter)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
