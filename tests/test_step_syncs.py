"""The step path reads the device once per step: the batch's committed tokens, in one copy.

Counted with benchmarks/gpu_syncs.py's CPU counter (every Tensor method that reads to the host and every
``Tensor.to(device)``, charged to its line); on the CPU it also counts reads of host tensors, which are
listed here by name with why they stay.
"""

from __future__ import annotations

import torch

from benchmarks.gpu_syncs import SyncCounter
from maskkv_engine.attention.metadata import RowLayout
from maskkv_engine.attention.transfer import to_device
from maskkv_engine.sampling.sampler import Choice, Sampler
from maskkv_engine.sampling.selection import rank_factor, rank_threshold, select_factor


def _factor_loop(confidence: torch.Tensor, factor: float) -> list[int]:
    """The official code's factor rule, as a Python loop over the ranked confidences."""
    m = confidence.numel()
    order = torch.argsort(confidence, descending=True, stable=True)
    ranked = confidence[order].tolist()
    n = m - 1
    for i in range(m):
        if ranked[i] < (-1.0 if i == 0 else 1.0 - factor / (i + 2)):
            n = i
            break
    if n == 0 or n == m - 1:
        n += 1
    return order[:n].tolist()


def test_factor_rule_on_the_device_matches_the_official_loop():
    gen = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 5, 17):
        for _ in range(40):
            conf = torch.rand(m, generator=gen) ** 0.3
            for factor in (0.5, 1.0, 2.0):
                assert select_factor(conf, factor).tolist() == _factor_loop(conf, factor)


def test_parallel_rules_leave_their_count_on_the_device():
    conf = torch.tensor([0.5, 0.95, 0.2, 0.91])
    with SyncCounter(torch.device("cpu")) as counter:
        order, count = rank_threshold(conf, 0.9)
        order_f, count_f = rank_factor(conf, 1.0)
    assert sum(counter.counts.values()) == 0
    assert isinstance(count, torch.Tensor) and order[: int(count)].tolist() == [1, 3]
    assert isinstance(count_f, torch.Tensor)


def test_the_batch_choices_come_to_the_host_in_one_copy():
    choices = [
        Choice(torch.tensor([3, 0, 2]), torch.tensor([30, 0, 20]), torch.tensor(2)),  # threshold: 2 of 3
        Choice(torch.tensor([1]), torch.tensor([11]), 1),  # top-k: count known on the host
        Choice(torch.tensor([0, 1]), torch.tensor([5, 6]), torch.tensor(0)),
    ]
    with SyncCounter(torch.device("cpu")) as counter:
        host = Sampler.to_host(choices)
    assert [(c.tolist(), t.tolist()) for c, t in host] == [([3, 0], [30, 0]), ([1], [11]), ([], [])]
    assert sorted(site.split()[-1] for site in counter.counts.elements()) == ["cpu", "tolist"]


def test_host_inputs_move_in_one_copy_as_views_of_it():
    ids, table = torch.tensor([5, 6, 7]), torch.arange(12).view(2, 3, 2)
    on_device = torch.empty(4, device="meta")  # a slice of earlier metadata: passed through, not copied
    with SyncCounter(torch.device("cpu")) as counter:
        moved = to_device([ids, table, on_device], torch.device("meta"))
    assert [site.split()[-1] for site in counter.counts.elements()] == ["to(device)"]
    assert [m.shape for m in moved] == [ids.shape, table.shape, on_device.shape] and moved[2] is on_device
    assert all(m.device.type == "meta" and m.dtype == torch.long for m in moved[:2])
    a, b = to_device([ids, table], torch.device("cpu"))
    assert torch.equal(a, ids) and torch.equal(b, table)
    assert a.data_ptr() + 3 * 8 == b.data_ptr()  # one buffer


def test_row_layout_index_is_built_on_the_device_without_reads():
    layout = RowLayout.build([3, 0, 70], torch.device("cpu"))
    with SyncCounter(torch.device("cpu")) as counter:
        index, valid = layout.index, layout.valid
    assert sum(counter.counts.values()) == 0
    assert index.shape == valid.shape == (3, 128)
    assert valid.sum(dim=1).tolist() == [3, 0, 70]
    assert index[0, :3].tolist() == [0, 1, 2] and index[2, :70].tolist() == list(range(3, 73))
    assert int(index[~valid].abs().sum()) == 0  # padding points at row 0
