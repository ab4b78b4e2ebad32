"""Decoding rules against hand-built logits and confidences."""

from __future__ import annotations

import pytest
import torch

from maskkv_engine.sampling.remasking import dream_choose, llada_choose
from maskkv_engine.sampling.schedule import dream_transfer_count, llada_transfer_counts
from maskkv_engine.sampling.selection import select_factor, select_threshold, select_top_k


def test_llada_transfer_schedule():
    assert llada_transfer_counts(10, 4) == [3, 3, 2, 2]
    assert llada_transfer_counts(8, 8) == [1] * 8
    assert llada_transfer_counts(3, 5) == [1, 1, 1, 0, 0]
    assert sum(llada_transfer_counts(37, 6)) == 37


def test_dream_transfer_schedule_commits_everything_by_the_last_step():
    steps, masks, committed = 5, 16, []
    left = masks
    for i in range(steps):
        n = dream_transfer_count(left, i, steps, 1e-3)
        committed.append(n)
        left -= n
    assert left == 0 and committed[-1] > 0
    # first step: int(16 * (1 - s/t)) with t=1, s=linspace(1, eps, 6)[1]
    s = torch.linspace(1, 1e-3, 6)[1]
    assert committed[0] == int(torch.tensor(16.0) * (1 - s))


def test_low_confidence_picks_the_most_confident_positions():
    logits = torch.tensor(
        [
            [0.0, 5.0, 0.0],  # confident in 1
            [1.0, 1.1, 1.0],  # unsure
            [9.0, 0.0, 0.0],  # most confident in 0
            [0.0, 0.0, 3.0],  # fairly confident in 2
        ]
    )
    x0, conf = llada_choose(logits, temperature=0.0, remasking="low_confidence", generator=None)
    assert x0.tolist() == [1, 1, 0, 2]
    expected = torch.softmax(logits.double(), -1).max(-1).values
    assert torch.equal(conf, expected)
    assert sorted(select_top_k(conf, 2).tolist()) == [0, 2]
    assert select_top_k(conf, 0).numel() == 0
    assert sorted(select_top_k(conf, 10).tolist()) == [0, 1, 2, 3]


def test_gumbel_sampling_is_reproducible_under_a_seed_and_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    a, _ = llada_choose(logits, 1.0, "low_confidence", torch.Generator().manual_seed(7))
    b, _ = llada_choose(logits, 1.0, "low_confidence", torch.Generator().manual_seed(7))
    c, _ = llada_choose(logits, 1.0, "low_confidence", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    freq = torch.bincount(a, minlength=4).double() / a.numel()
    assert torch.allclose(freq, torch.softmax(logits[0].double(), -1), atol=0.03)


def test_random_remasking_confidence_comes_from_the_generator():
    logits = torch.randn(6, 5)
    _, c1 = llada_choose(logits, 0.0, "random", torch.Generator().manual_seed(1))
    _, c2 = llada_choose(logits, 0.0, "random", torch.Generator().manual_seed(1))
    assert torch.equal(c1, c2) and ((c1 >= 0) & (c1 < 1)).all()


def test_dream_confidences():
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 0.9]])
    probs = torch.softmax(logits, -1)
    x0, conf = dream_choose(logits, "maskgit_plus", 0.0, None, None, None)
    assert x0.tolist() == [0, 0] and torch.allclose(conf, probs.max(-1).values)
    _, margin = dream_choose(logits, "topk_margin", 0.0, None, None, None)
    top2 = probs.sort(-1, descending=True).values
    assert torch.allclose(margin, top2[:, 0] - top2[:, 1])
    _, ent = dream_choose(logits, "entropy", 0.0, None, None, None)
    assert torch.allclose(ent, (probs * torch.log(probs + 1e-10)).sum(-1))
    assert ent[0] > ent[1]  # the peaked row is more confident


def test_dream_top_k_and_top_p_restrict_sampling():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(500, 1)
    x0, _ = dream_choose(logits, "maskgit_plus", 1.0, None, 2, torch.Generator().manual_seed(0))
    assert set(x0.tolist()) <= {0, 1}
    x0, _ = dream_choose(logits, "maskgit_plus", 1.0, 0.5, None, torch.Generator().manual_seed(0))
    assert set(x0.tolist()) == {0}


def test_threshold_rule_commits_top1_plus_confident():
    conf = torch.tensor([0.5, 0.95, 0.2, 0.91, 0.89])
    assert sorted(select_threshold(conf, 0.9).tolist()) == [1, 3]
    assert select_threshold(conf, 0.99).tolist() == [1]  # nothing passes: the top-1 still commits
    assert select_threshold(conf, 1.5).tolist() == [1]


@pytest.mark.parametrize(
    "conf,factor,expected",
    [
        # c(2) >= 1 - 1/3 and c(3) >= 1 - 1/4, c(4)=0.5 < 1 - 1/5: the first three commit
        ([0.99, 0.9, 0.8, 0.5, 0.1], 1.0, 3),
        # first failure at rank 2 (0.3 < 2/3): only the top-1
        ([0.99, 0.3, 0.2], 1.0, 1),
        # quirk of the official code: first failure at the last candidate commits all of them
        ([0.99, 0.9, 0.1], 1.0, 3),
        ([0.5], 1.0, 1),
    ],
)
def test_factor_rule(conf, factor, expected):
    conf = torch.tensor(conf)
    chosen = select_factor(conf, factor)
    assert len(chosen) == expected
    assert sorted(chosen.tolist()) == sorted(torch.argsort(conf, descending=True)[:expected].tolist())
