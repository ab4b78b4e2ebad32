"""KV policies: budget conservation, MaskKV's formulas, selection = top-k of independent scores,
layer-by-layer eviction memory, full equivalence at a large budget, calibration, registration."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.kv.allocators.maskkv import MaskKVAllocator
from maskkv_engine.kv.allocators.pyramidkv import PyramidKVAllocator
from maskkv_engine.kv.base import ModelStats, PolicyContext
from maskkv_engine.kv.profile import PROFILE_FILE
from maskkv_engine.kv.registry import SCORERS, get_policy, register_scorer
from maskkv_engine.kv.scorers.base import Scorer
from tests.conftest import prompt_ids
from tests.naive_llada import naive_llada

PRUNING = ["maskkv", "snapkv", "pyramidkv", "adakv", "squeeze"]


def random_stats(layers: int, heads: int, seed: int) -> ModelStats:
    g = torch.Generator().manual_seed(seed)
    return ModelStats(
        layer_importance=torch.rand(layers, generator=g, dtype=torch.float64) * 0.5,
        prompt_preference=torch.rand(layers, heads, generator=g, dtype=torch.float64),
    )


@settings(max_examples=120, deadline=None)
@given(
    policy=st.sampled_from(PRUNING),
    allocator=st.sampled_from([None, "uniform", "maskkv", "pyramidkv", "adakv", "squeeze"]),
    layers=st.integers(1, 8),
    heads=st.integers(1, 6),
    n_cached=st.integers(1, 400),
    budget=st.integers(1, 600),
    seed=st.integers(0, 1000),
)
def test_budgets_are_conserved_and_bounded(policy, allocator, layers, heads, n_cached, budget, seed):
    """Every preset, and every preset's scorer with every allocator (None: the preset's own)."""
    pol = get_policy(policy, {} if allocator is None else {"allocator": allocator})
    ctx = PolicyContext(layers, heads, n_cached, n_cached + 1, n_cached + 9, budget)
    stats = random_stats(layers, heads, seed)
    plan = pol.plan(ctx, stats)
    total = layers * heads * min(budget, n_cached)
    if plan.per_head is not None:
        k = plan.per_head
    else:  # AdaKV: per-layer totals, split from the layer's scores
        g = torch.Generator().manual_seed(seed)
        k = torch.stack(
            [
                pol.split_heads(li, int(plan.per_layer[li]), torch.rand(heads, n_cached, generator=g), ctx)
                for li in range(layers)
            ]
        )
        floor = min(int(pol.allocator.floor_alpha * min(budget, n_cached)), n_cached)
        assert (k >= floor).all()
    assert int(k.sum()) == total
    assert (k >= 0).all() and (k <= n_cached).all()
    assert plan.max_pages(16, heads) >= int(((k + 15) // 16).sum())


def test_maskkv_layer_and_head_budgets_follow_the_paper():
    pol = MaskKVAllocator()  # alpha 0.1, beta 0.4, boundary = first and last layers
    imp = torch.tensor([0.4, 0.1, 0.1, 0.4], dtype=torch.float64)
    layer = pol.layer_budgets(4, 10.0, imp)
    # k_base = 4; k_imp = 24 split 0.8 / 0.2 between boundary and middle groups, evenly inside each
    assert torch.allclose(layer, torch.tensor([13.6, 6.4, 6.4, 13.6], dtype=torch.float64))
    pref = torch.tensor([[0.9, 0.3]] * 4, dtype=torch.float64)  # P̂ = 0.75 / 0.25
    wish = pol.head_wish(layer, pref)
    assert torch.allclose(
        wish[0],
        torch.tensor([0.1 * 13.6 + 0.9 * 2 * 13.6 * 0.75, 0.1 * 13.6 + 0.9 * 2 * 13.6 * 0.25], dtype=torch.float64),
    )
    ctx = PolicyContext(4, 2, n_cached=1000, n_prompt=1000, n_total=1032, budget=10)
    budgets = pol.plan(ctx, ModelStats(imp, pref)).per_head
    assert int(budgets.sum()) == 80
    assert (budgets >= torch.floor(wish).long()).all(), "the floors are never undercut"
    # a clamp by a short prompt hands the excess to the other layers and heads
    short = PolicyContext(4, 2, n_cached=12, n_prompt=12, n_total=44, budget=10)
    clamped = pol.plan(short, ModelStats(imp, pref)).per_head
    assert int(clamped.sum()) == 80 and int(clamped.max()) == 12
    assert (clamped[1:3] >= torch.floor(wish[1:3]).long()).all()


@pytest.mark.parametrize("policy", PRUNING)
def test_budget_at_least_the_prompt_gives_exactly_full(calibrated_llada, policy):
    prompts = [{"prompt_token_ids": prompt_ids(n, seed=n)} for n in (20, 45)]
    sp = SamplingParams(gen_length=16, steps=8, block_length=8, stop_at_eos=False)
    full = LLM(str(calibrated_llada), kv_policy="full").generate(prompts, sp, use_tqdm=False)
    pruned = LLM(str(calibrated_llada), kv_policy=policy, kv_budget=64).generate(prompts, sp, use_tqdm=False)
    for a, b in zip(full, pruned):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.metrics.kv_tokens_kept == b.metrics.kv_tokens_kept


def _kept_rows(engine, request_id, layer, head):
    bm = engine.block_manager
    kv = bm.request_kv(request_id)
    pages = torch.tensor(kv.pages[layer][head], dtype=torch.long)
    n = int(kv.lens[layer, head])
    return bm.k_pool[pages].reshape(-1, bm.head_dim)[:n], n


def _independent_scores(policy, q, k, n_cached, n_prompt, group):
    """Scores of the cached keys per KV head, from the naive model's own post-RoPE q / k."""
    n_kv, d = k.shape[1], k.shape[2]
    scores = []
    for h in range(n_kv):
        keys = k[:, h]
        if policy == "maskkv":
            rows = slice(n_prompt, q.shape[0])
        else:
            w = min(32, n_cached)
            rows = slice(n_cached - w, n_cached)
        qg = q[rows, h * group : (h + 1) * group].transpose(0, 1)
        probs = torch.softmax(qg @ keys.T / math.sqrt(d), dim=-1)
        if policy == "maskkv":
            scores.append(probs[:, :, :n_cached].sum(1).mean(0))
        else:
            votes = probs[:, :, : n_cached - w].sum(1).mean(0)
            pooled = F.max_pool1d(votes[None, None], 7, stride=1, padding=3)[0, 0]
            scores.append(torch.cat([pooled, 1e9 + torch.arange(w, dtype=torch.float64)]))
    return scores


@pytest.mark.parametrize("policy", ["maskkv", "snapkv"])
def test_selection_equals_top_k_of_independent_scores(calibrated_llada, policy):
    llm = LLM(str(calibrated_llada), kv_policy=policy, kv_budget=7, dtype="float64")
    eng = llm.llm_engine
    prompt = prompt_ids(60, seed=11)
    gen = 16
    eng.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(gen_length=gen, steps=16, block_length=8))
    eng.step()  # the first (full) pass writes the pages
    seq = prompt + [eng.model_config.mask_token_id] * gen
    _, qs, ks, _ = naive_llada(calibrated_llada, seq)
    cfg = eng.model_config
    kv = eng.block_manager.request_kv("r")
    assert int(kv.lens.sum()) == cfg.num_layers * cfg.num_kv_heads * 7
    for layer in range(cfg.num_layers):
        scores = _independent_scores(policy, qs[layer], ks[layer], len(prompt), len(prompt), cfg.group_size)
        for h in range(cfg.num_kv_heads):
            rows, n = _kept_rows(eng, "r", layer, h)
            expected = torch.topk(scores[h], n).indices.sort().values
            assert torch.allclose(rows, ks[layer][expected, h], atol=1e-9), f"layer {layer} head {h}"


def test_layer_by_layer_eviction_holds_one_layer_of_full_kv(calibrated_llada, llada_gqa_dir, tmp_path, caplog):
    prompt = prompt_ids(200, seed=3)
    sp = SamplingParams(gen_length=16, steps=16, block_length=8)

    def prefill_peak(path):
        eng = LLM(str(path), kv_policy="maskkv", kv_budget=8).llm_engine
        eng.block_manager.reset_peak()
        eng.add_request("r", {"prompt_token_ids": prompt}, sp)
        eng.step()
        return eng, eng.block_manager.peak_bytes, eng.block_manager.used_bytes

    eng, peak, pages = prefill_peak(calibrated_llada)
    cfg = eng.model_config
    elem = 4  # float32
    n = len(prompt) + 16
    one_layer = 2 * n * cfg.num_kv_heads * cfg.head_dim * elem
    all_layers_prompt = 2 * len(prompt) * cfg.num_kv_heads * cfg.head_dim * elem * cfg.num_layers
    assert pages > 0
    assert peak <= one_layer + pages, "with a profile only one layer of full KV may be alive"
    assert eng.planner.online is False

    online_dir = tmp_path / "noprofile"
    shutil.copytree(llada_gqa_dir, online_dir)
    with caplog.at_level(logging.WARNING):
        eng2, peak2, _ = prefill_peak(online_dir)
    assert eng2.planner.online and "no calibration profile" in caplog.text
    assert peak2 >= all_layers_prompt, "online budgets hold every layer's prompt KV until the pass ends"


def test_maskkv_head_budgets_per_request_over_the_profiles_layer_budgets(llada_gqa_dir, tmp_path):
    """The paper's "offline layer-wise, adaptive head-wise": with a profile, layer budgets are the profile's
    and each layer's head split follows THIS request's prompt preference, measured in its first pass."""
    from maskkv_engine.kv.calibrate import calibrate, measure_stats

    prompt, other, gen, budget = prompt_ids(120, seed=5), prompt_ids(120, seed=9), 16, 24
    profiled = tmp_path / "profiled"
    shutil.copytree(llada_gqa_dir, profiled)
    calibrate(profiled, [prompt], gen_length=gen, out=profiled, use_tqdm=False)  # the profile IS this request

    def kept(path, p, **config):
        eng = LLM(str(path), kv_policy="maskkv", kv_budget=budget, kv_policy_config=config).llm_engine
        eng.add_request("r", {"prompt_token_ids": p}, SamplingParams(gen_length=gen, steps=gen, block_length=8))
        eng.block_manager.reset_peak()
        eng.step()
        return eng, eng.block_manager.request_kv("r").lens.clone()

    eng, request = kept(profiled, prompt)
    _, online = kept(llada_gqa_dir, prompt)  # no profile: everything from the request, all layers jointly
    alloc, ctx = eng.policy.allocator, eng.planner.context(120, 120, 120 + gen, budget)
    assert alloc.head_budgets == "request"
    profile_layers = alloc.plan(ctx, eng.planner.profile).per_head.sum(dim=1)
    assert torch.equal(request.sum(dim=1), profile_layers), "layer budgets are the profile's"
    assert int((request - online).abs().max()) <= 1, "the online head split, up to integer rounding"
    stats = measure_stats(eng.runner.model, eng.model_config, prompt, gen)  # this request's preference
    for layer in range(ctx.num_layers):
        want = alloc.split_heads(layer, int(profile_layers[layer]), None, ctx, stats.prompt_preference[layer])
        assert torch.equal(request[layer], want), f"layer {layer}"
    # another prompt: the same layer budgets, its own head split (the profile's fixed split differs)
    eng_b, request_b = kept(profiled, other)
    _, fixed_b = kept(profiled, other, head_budgets="profile")
    assert torch.equal(request_b.sum(dim=1), fixed_b.sum(dim=1))
    assert not torch.equal(request_b, fixed_b), "head budgets follow the request, not the profile"
    with pytest.raises(ValueError, match="head_budgets='layer' must be 'request' or 'profile'"):
        LLM(str(profiled), kv_policy="maskkv", kv_policy_config={"head_budgets": "layer"})


def test_denoise_steps_compute_only_the_response(calibrated_llada):
    eng = LLM(str(calibrated_llada), kv_policy="maskkv", kv_budget=8).llm_engine
    model = eng.runner.model
    seen_tokens, seen_logit_rows = [], []
    forward, logits = model.forward, model.compute_logits
    model.forward = lambda ids, pos: (seen_tokens.append(int(ids.numel())), forward(ids, pos))[1]
    model.compute_logits = lambda h: (seen_logit_rows.append(int(h.shape[0])), logits(h))[1]
    prompt = prompt_ids(50, seed=1)
    eng.add_request(
        "r", {"prompt_token_ids": prompt}, SamplingParams(gen_length=16, steps=8, block_length=8, stop_at_eos=False)
    )
    eng.run_to_completion()
    assert seen_tokens[0] == 66 and all(t == 16 for t in seen_tokens[1:])
    # logits only for the still-masked positions of the current block: 8, 6, 4, 2 per block
    assert seen_logit_rows == [8, 6, 4, 2, 8, 6, 4, 2]


def test_profile_is_loaded_and_validated(calibrated_llada, tmp_path):
    data = json.loads((calibrated_llada / PROFILE_FILE).read_text())
    assert len(data["layer_importance"]) == 3 and len(data["prompt_preference"][0]) == 2
    eng = LLM(str(calibrated_llada), kv_policy="maskkv").llm_engine
    assert eng.planner.profile is not None and not eng.planner.online
    bad = tmp_path / "bad.json"
    data["prompt_preference"] = [[0.5]] * 3
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"is for \(3, 1\) \(layers, kv heads\), the model has \(3, 2\)"):
        LLM(str(calibrated_llada), kv_policy="maskkv", kv_policy_config={"profile_path": str(bad)})
    with pytest.raises(ValueError, match="profile_path.*does not exist"):
        LLM(str(calibrated_llada), kv_policy="maskkv", kv_policy_config={"profile_path": str(tmp_path / "none.json")})


def test_policy_config_errors(llada_gqa_dir):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gamma'\] for kv_policy='maskkv'"):
        LLM(str(llada_gqa_dir), kv_policy="maskkv", kv_policy_config={"gamma": 1})
    with pytest.raises(ValueError, match="alpha=1.5 must be in"):
        LLM(str(llada_gqa_dir), kv_policy="maskkv", kv_policy_config={"alpha": 1.5})
    with pytest.raises(ValueError, match="kernel_size=4 must be an odd integer"):
        LLM(str(llada_gqa_dir), kv_policy="snapkv", kv_policy_config={"kernel_size": 4})


def test_config_keys_reach_the_part_that_has_them():
    pol = get_policy("pyramidkv", {"window_size": 8, "beta": 5.0})
    assert pol.scorer.window_size == 8 and pol.allocator.beta == 5.0
    ctx = PolicyContext(4, 2, n_cached=100, n_prompt=100, n_total=116, budget=20)
    expected = PyramidKVAllocator(beta=5.0).plan(ctx, None, window=8).per_head
    assert torch.equal(pol.plan(ctx, None).per_head, expected), "the scorer's window reaches the schedule"
    swapped = get_policy("snapkv", {"allocator": "maskkv", "alpha": 0.2})
    assert swapped.scorer.name == "snapkv" and swapped.allocator.alpha == 0.2 and swapped.needs_stats
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['alpha'\] for kv_policy='maskkv' \(scorer 'mask_voting', "
    ):
        get_policy("maskkv", {"allocator": "pyramidkv", "alpha": 0.2})  # alpha belongs to the allocator swapped out
    with pytest.raises(
        ValueError, match=r"kv_policy_config\['allocator'\]='pyramid' is not known \(allowed: \['adakv'"
    ):
        get_policy("maskkv", {"allocator": "pyramid"})
    with pytest.raises(ValueError, match="scorer 'keep_all' ranks no tokens, so it cannot prune"):
        get_policy("snapkv", {"scorer": "keep_all"})
    with pytest.raises(ValueError, match="kv_policy='none' keeps no KV"):
        get_policy("none", {"allocator": "uniform"})


def test_pyramidkv_falls_back_to_uniform_snapkv_on_short_prompts():
    """Official PyramidKV: a prompt shorter than 2 x (budget - window) gets SnapKV's uniform budgets."""
    alloc = PyramidKVAllocator()
    short = PolicyContext(4, 2, n_cached=60, n_prompt=60, n_total=76, budget=40)  # 60 < 2 * (40 - 8)
    assert alloc.plan(short, None, window=8).per_head.unique().tolist() == [40]
    edge = PolicyContext(4, 2, n_cached=64, n_prompt=64, n_total=80, budget=40)  # 64 = 2 * 32: a pyramid
    layers = alloc.plan(edge, None, window=8).per_head.sum(dim=1)
    assert (layers[:-1] > layers[1:]).all(), layers.tolist()


def test_squeeze_gives_its_least_important_group_forty_percent():
    """SqueezeAttention's paper setting p = 0.4 of the average budget for the lazy layer group."""
    alloc = get_policy("squeeze").allocator
    assert alloc.squeeze_ratio == 0.4
    ctx = PolicyContext(6, 1, n_cached=1000, n_prompt=1000, n_total=1016, budget=100)
    imp = torch.tensor([0.5, 0.5, 0.25, 0.25, 0.01, 0.01], dtype=torch.float64)  # last two: least important
    layers = alloc.layer_budgets(ctx, imp)
    assert torch.allclose(layers[4:], torch.full((2,), 40.0, dtype=torch.float64))
    assert torch.allclose(layers[:4], torch.full((4,), 130.0, dtype=torch.float64))


def test_a_composed_allocator_reads_the_profile(calibrated_llada):
    profile = str(calibrated_llada / PROFILE_FILE)
    eng = LLM(
        str(calibrated_llada), kv_policy="snapkv", kv_policy_config={"allocator": "maskkv", "profile_path": profile}
    ).llm_engine
    assert eng.policy.allocator.profile_path == profile and eng.planner.profile is not None
    assert not eng.planner.online, "budgets known before the pass: eviction layer by layer"


def test_a_registered_scorer_composes_by_name(llada_gqa_dir):
    """The docs' example: a new scorer, used with an existing allocator through configuration."""
    from dataclasses import dataclass

    @dataclass
    class RecentScorer(Scorer):
        name = "recent"

        def score(self, probs, ctx):
            return torch.arange(ctx.n_cached, dtype=probs.dtype)

    register_scorer(RecentScorer)
    try:
        llm = LLM(str(llada_gqa_dir), kv_policy="pyramidkv", kv_budget=4, kv_policy_config={"scorer": "recent"})
        eng = llm.llm_engine
        eng.add_request("r", {"prompt_token_ids": prompt_ids(30)}, SamplingParams(gen_length=8, steps=8))
        eng.step()
        for layer in range(eng.model_config.num_layers):
            _, _, lens, positions = eng.block_manager.kept("r", layer)
            for h, n in enumerate(lens.tolist()):
                assert positions[h, :n].tolist() == list(range(30 - n, 30)), "the most recent tokens"
    finally:
        SCORERS.pop("recent")


def test_third_party_policy_registers_through_the_entry_point(tmp_path, llada_gqa_dir, monkeypatch):
    (tmp_path / "my_policies.py").write_text(
        "from dataclasses import dataclass\n"
        "from maskkv_engine.kv.snapkv import SnapKVPolicy\n"
        "@dataclass\n"
        "class RecentOnly(SnapKVPolicy):\n"
        "    name = 'recent'\n"
        "    def score(self, probs, ctx):\n"
        "        import torch\n"
        "        return torch.arange(ctx.n_cached, dtype=probs.dtype)\n"
    )
    dist = tmp_path / "my_policies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-policies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[maskkv_engine.kv_policies]\nrecent = my_policies:RecentOnly\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    llm = LLM(str(llada_gqa_dir), kv_policy="recent", kv_budget=4)
    out = llm.generate({"prompt_token_ids": prompt_ids(30)}, SamplingParams(gen_length=8, steps=8), use_tqdm=False)
    assert out[0].metrics.kv_tokens_kept == 3 * 2 * 4
    kv_policy = llm.llm_engine.policy
    assert type(kv_policy).__name__ == "RecentOnly"
    sys.modules.pop("my_policies", None)
