"""The baselines against their official code: each reference below restates what the official
implementation computes (repo, file, function in its docstring), and our scorer/allocator must agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskkv_engine.kv.allocators.adakv import AdaKVAllocator
from maskkv_engine.kv.base import PolicyContext
from maskkv_engine.kv.registry import get_policy
from maskkv_engine.kv.scorers.snapkv import SnapKVScorer


def official_adakv_counts(scores: torch.Tensor, per_head: int) -> torch.Tensor:
    """FFY0/AdaKV ``AdaptiveSnapKVCluster.update_kv_gqa``: how many of each head's scores are in the
    flattened top-(H x B) of all heads' scores."""
    num_heads, n = scores.shape
    picks = torch.topk(scores.reshape(-1), num_heads * per_head).indices // n
    return torch.bincount(picks, minlength=num_heads).double()


def official_adakv_split(scores: torch.Tensor, per_head: int, floor_alpha: float) -> torch.Tensor:
    """The official split: ``round(count * (1 - alpha) + int(B * alpha))`` per head (its total can fall
    short of H x B by the ``int`` and drift by the ``round``)."""
    counts = official_adakv_counts(scores, per_head)
    return torch.round(counts * (1 - floor_alpha) + int(per_head * floor_alpha)).long()


def test_adakv_mixes_the_global_topk_counts_with_the_floor():
    """15 of the top 20 are head 0's: the official split is 0.8 x (15, 5) + 2 = (14, 6), not the
    'floor first, then top-k of the rest' split (15, 5) this allocator used to make."""
    head0 = 100.0 - torch.arange(20, dtype=torch.float64)  # 100 .. 81
    head1 = torch.cat([torch.tensor([99.5, 97.5, 95.5, 93.5, 91.5]), 50.0 - torch.arange(15)]).double()
    scores = torch.stack([head0, head1])
    ctx = PolicyContext(1, 2, n_cached=20, n_prompt=20, n_total=30, budget=10)
    got = AdaKVAllocator(floor_alpha=0.2).split_heads(0, 20, scores, ctx)
    assert got.tolist() == [14, 6] == official_adakv_split(scores, 10, 0.2).tolist()


@pytest.mark.parametrize("seed", range(40))
def test_adakv_split_is_the_official_one_up_to_rounding(seed):
    g = torch.Generator().manual_seed(seed)
    heads = int(torch.randint(1, 9, (1,), generator=g))
    n = int(torch.randint(4, 200, (1,), generator=g))
    per_head = int(torch.randint(1, n + 1, (1,), generator=g))
    alpha = float(torch.rand(1, generator=g))
    # peaked heads next to flat ones, as AdaKV's motivating case
    scores = torch.rand(heads, n, generator=g, dtype=torch.float64) ** (1 + 8 * torch.rand(heads, 1, generator=g))
    ctx = PolicyContext(1, heads, n_cached=n, n_prompt=n, n_total=n + 8, budget=per_head)
    got = AdaKVAllocator(floor_alpha=alpha).split_heads(0, heads * per_head, scores, ctx)
    # the official formula before its int / round; those make its total drift, ours is exact
    want = official_adakv_counts(scores, per_head) * (1 - alpha) + alpha * per_head
    assert int(got.sum()) == heads * per_head
    # each head gets its wish rounded down or up (leftovers go to the largest wishes, kv/budgets.py)
    assert (got - want).abs().max() <= 1, (got.tolist(), want.tolist())
    assert (got >= int(alpha * per_head)).all() and (got <= n).all()


def test_adakv_floor_alpha_is_checked():
    with pytest.raises(ValueError, match=r"floor_alpha=1\.5 must be a number in \[0, 1\]"):
        get_policy("adakv", {"floor_alpha": 1.5})


def official_snapkv_votes(probs: torch.Tensor, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """FasterDecoding/SnapKV ``SnapKVCluster.update_kv`` on one query head's window probabilities
    [window, n] (AdaKV's ``gqa_support`` path first averages the group's heads): votes of the window
    queries for the keys before the window, summed and pooled (stride 1, padding kernel // 2); it keeps
    their top-(budget - window) and the window itself."""
    n = probs.shape[-1]
    votes = probs[:, : n - window].sum(0)[None, None]
    pool = F.max_pool1d if pooling == "maxpool" else F.avg_pool1d
    return pool(votes, kernel_size=kernel, padding=kernel // 2, stride=1)[0, 0]


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
@pytest.mark.parametrize("group", [1, 4])
def test_snapkv_keeps_what_the_official_code_keeps(pooling, group):
    g = torch.Generator().manual_seed(7 + group)
    n, window, kernel, budget = 96, 8, 7, 24
    ctx = PolicyContext(1, 1, n_cached=n, n_prompt=n, n_total=n, budget=budget)
    probs = torch.softmax(3 * torch.randn(group, window, n, generator=g, dtype=torch.float64), dim=-1)
    scorer = SnapKVScorer(window_size=window, kernel_size=kernel, pooling=pooling)
    assert scorer.observation(ctx) == slice(n - window, n)
    ours = set(torch.topk(scorer.score(probs, ctx), budget).indices.tolist())
    assert set(range(n - window, n)) <= ours
    pooled = official_snapkv_votes(probs.mean(0), window, kernel, pooling)
    # pooling makes plateaus of equal votes, so compare the kept votes, not which of the tied tokens
    kept = sorted(pooled[sorted(ours - set(range(n - window, n)))].tolist())
    assert torch.allclose(
        torch.tensor(kept, dtype=pooled.dtype), torch.topk(pooled, budget - window).values.sort().values
    )
