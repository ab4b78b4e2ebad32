"""The KV policy contract, checked on every registered policy and on compositions no class names.

Contract, not implementation: after a request's first pass, each (layer, KV head) holds exactly the
top-scoring cached tokens of the policy's own scorer (computed here from an independent float64 model);
the request keeps L x H_kv x min(budget, n_cached) tokens in total (every cached token for a keep-all
allocator), no head more than n_cached; the pages in use are exactly what the kept lengths need, which
is what the plan reserved when the plan is per head, and nothing stays reserved. kv/ reaches the pages
through the PageStore protocol only, never by importing engine/.
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.engine.block_manager import BlockManager
from maskkv_engine.kv.allocators.pyramidkv import PyramidKVAllocator
from maskkv_engine.kv.maskkv import MaskKVPolicy
from maskkv_engine.kv.page_store import PageStore
from maskkv_engine.kv.registry import BUILTIN_POLICIES
from maskkv_engine.kv.scorers.mask_voting import MaskVotingScorer
from tests.conftest import prompt_ids
from tests.naive_llada import naive_llada

KV_DIR = Path(__file__).parent.parent / "maskkv_engine" / "kv"
COMPOSITIONS = {
    "maskkv+pyramidkv": ("maskkv", {"allocator": "pyramidkv"}),
    "maskkv+adakv": ("maskkv", {"allocator": "adakv"}),
    "snapkv+maskkv": ("snapkv", {"allocator": "maskkv", "window_size": 8}),
    "maskkv+squeeze": ("maskkv", {"allocator": "squeeze"}),
}
CASES = {name: (name, {}) for name in sorted(BUILTIN_POLICIES)} | COMPOSITIONS
PROMPT_LEN, GEN = 60, 16


def _first_pass(path, policy: str, config: dict, budget: int):
    llm = LLM(str(path), kv_policy=policy, kv_policy_config=config, kv_budget=budget, dtype="float64", block_size=4)
    eng = llm.llm_engine
    prompt = prompt_ids(PROMPT_LEN, seed=11)
    if eng.block_manager is not None:
        eng.block_manager.reset_peak()
    eng.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(gen_length=GEN, steps=GEN, block_length=8))
    eng.step()  # the first (full) pass writes the pages
    return eng, prompt


@pytest.mark.parametrize("budget", [5, 20, 100])
@pytest.mark.parametrize("profile", [True, False], ids=["profile", "online"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_first_pass_keeps_the_top_scores_within_a_conserved_budget(
    calibrated_llada, llada_gqa_dir, case, profile, budget
):
    policy_name, config = CASES[case]
    eng, prompt = _first_pass(calibrated_llada if profile else llada_gqa_dir, policy_name, config, budget)
    policy, bm, cfg = eng.policy, eng.block_manager, eng.model_config
    if not policy.caches:
        assert bm is None
        return
    n_cached = len(prompt)  # LLaDA: the whole prompt is cacheable
    kv = bm.request_kv("r")
    lens = kv.lens
    assert (lens >= 0).all() and (lens <= n_cached).all(), "no head keeps more than the prompt"
    per_head = n_cached if policy.allocator.keeps_all else min(budget, n_cached)
    assert int(lens.sum()) == cfg.num_layers * cfg.num_kv_heads * per_head, "the total is conserved exactly"

    ctx = eng.planner.context(n_cached, len(prompt), len(prompt) + GEN, budget)
    plan = eng.planner.plan(ctx)  # None: decided online from the request's own statistics
    used = int(((lens + bm.block_size - 1) // bm.block_size).sum())
    assert bm.num_used_pages == kv.num_pages == used and bm.num_reserved_pages == 0
    if plan is not None and plan.per_head is not None:
        assert torch.equal(lens, plan.per_head)
        assert used == eng.planner.pages_needed(ctx, plan), "the reservation is exactly what the pass used"
    else:
        assert used <= eng.planner.pages_needed(ctx, plan)

    _, qs, ks, _ = naive_llada(calibrated_llada, prompt + [cfg.mask_token_id] * GEN)
    group, scale = cfg.group_size, 1.0 / math.sqrt(cfg.head_dim)
    obs = policy.observation(ctx)
    for layer in range(cfg.num_layers):
        k_kept, _, kept_lens, positions = bm.kept("r", layer)
        for h in range(cfg.num_kv_heads):
            n = int(kept_lens[h])
            kept = positions[h, :n].long()
            assert torch.allclose(k_kept[h, :n].double().cpu(), ks[layer][kept, h], atol=1e-9)
            if policy.needs_scores:
                qg = qs[layer][obs, h * group : (h + 1) * group].transpose(0, 1)
                probs = torch.softmax(qg @ ks[layer][:, h].T * scale, dim=-1)
                scores = policy.score(probs, ctx)
                dropped = torch.ones(n_cached, dtype=torch.bool)
                dropped[kept] = False
                if dropped.any() and n:
                    assert scores[kept].min() >= scores[dropped].max() - 1e-9, f"layer {layer} head {h}"
            else:
                assert kept.tolist() == list(range(n_cached))


def test_a_new_composition_runs_end_to_end_with_no_new_class(calibrated_llada):
    """Mask-Voting's token choice with PyramidKV's layer schedule: configuration only."""
    llm = LLM(str(calibrated_llada), kv_policy="maskkv", kv_budget=12, kv_policy_config={"allocator": "pyramidkv"})
    policy = llm.llm_engine.policy
    assert type(policy) is MaskKVPolicy
    assert isinstance(policy.scorer, MaskVotingScorer) and isinstance(policy.allocator, PyramidKVAllocator)
    prompts = [{"prompt_token_ids": prompt_ids(n, seed=n)} for n in (40, 55)]
    sp = SamplingParams(gen_length=16, steps=8, block_length=8, stop_at_eos=False)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    cfg = llm.llm_engine.model_config
    for out in outs:
        assert out.error is None and len(out.outputs[0].token_ids) == 16
        assert out.metrics.kv_tokens_kept == cfg.num_layers * cfg.num_kv_heads * 12
    ctx = llm.llm_engine.planner.context(40, 40, 56, 12)
    assert policy.scorer.window(ctx) == 0, "no observation window to set aside: the whole budget is a pyramid"
    layers = llm.llm_engine.planner.plan(ctx).per_head.sum(dim=1)
    assert (layers[:-1] > layers[1:]).all(), f"a pyramid, first layer most: {layers.tolist()}"
    assert llm.llm_engine.block_manager.num_used_pages == 0


def test_kv_imports_nothing_from_the_engine():
    for path in sorted(KV_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("maskkv_engine.engine") for n in names), f"{path.name} imports {names}"


def test_the_block_manager_is_a_page_store():
    """BlockManager satisfies PageStore structurally: every protocol method, with the same parameters."""
    methods = [m for m in vars(PageStore) if not m.startswith("_") and callable(getattr(PageStore, m))]
    assert sorted(methods) == ["has_request", "release_reservation", "rewrite", "set_transient_bytes", "store"]
    for m in methods:
        want = list(inspect.signature(getattr(PageStore, m)).parameters)
        assert list(inspect.signature(getattr(BlockManager, m)).parameters) == want, m
