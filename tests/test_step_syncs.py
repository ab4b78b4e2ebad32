"""The step path reads the device once per step: the batch's committed tokens, in one copy.

Counted with benchmarks/gpu_syncs.py's CPU counter (every Tensor method that reads to the host and every
``Tensor.to(device)``, charged to its line); on the CPU it also counts reads of host tensors, which are
listed here by name with why they stay.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

if not torch.cuda.is_available():  # the GPU path's backend, in triton's CPU interpreter (decided at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.gpu_syncs import CACHED_STEP, FIRST_PASS, HOST_ONLY, SyncCounter, by_site  # noqa: E402
from maskkv_engine.attention.metadata import RowLayout  # noqa: E402
from maskkv_engine.attention.transfer import to_device  # noqa: E402
from maskkv_engine.config import EngineConfig  # noqa: E402
from maskkv_engine.engine.llm_engine import LLMEngine  # noqa: E402
from maskkv_engine.sampling.sampler import Choice, Sampler  # noqa: E402
from maskkv_engine.sampling.selection import rank_factor, rank_threshold, select_factor  # noqa: E402
from maskkv_engine.sampling_params import SamplingParams  # noqa: E402


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


# ---- the engine's step path -------------------------------------------------------------------------
def step_counts(model_dir, policy: str, refresh: str, batch: int) -> list[Counter]:
    """Per engine step, the reads to the host and copies to the device, by call site (lines dropped)."""
    engine = LLMEngine(
        EngineConfig.from_kwargs(
            str(model_dir), kv_policy=policy, refresh=refresh, attention_backend="triton", load_format="dummy",
            skip_tokenizer_init=True, device="cpu", dtype="float32", num_pages=256,
        )
    )  # fmt: skip
    params = SamplingParams(gen_length=16, block_length=16, steps=8, stop_at_eos=False)
    for i in range(batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": list(range(3 + i, 40 + i))}, params)
    steps = []
    while engine.has_unfinished_requests():
        with SyncCounter(torch.device("cpu")) as counter:
            engine.step()
        steps.append(by_site(counter.counts))
    return steps


@pytest.mark.parametrize("refresh,layout_copies", [("every_step", 0), ("fast_dllm_dual", 1)])
def test_a_cached_step_reads_the_device_once_for_the_whole_batch(llada_gqa_dir, refresh, layout_copies):
    """Every cached step (not the first pass, not the last step, where requests finish) at B = 2: one read of
    the committed tokens, one copy of the inputs (one more for the refresh layouts, however many layers),
    and the host-only reads of each request's canvas (gpu_syncs.CACHED_STEP says why each stays)."""
    b = 2
    steps = step_counts(llada_gqa_dir, "full", refresh, b)
    expected = Counter(
        {
            "maskkv_engine/sampling/sampler.py cpu": 1,
            "maskkv_engine/attention/transfer.py to(device)": 1 + layout_copies,
            "maskkv_engine/sampling/denoise_state.py nonzero": 2 * b,
            "maskkv_engine/sampling/denoise_state.py bool": 2 * b,
        }
    )
    assert set(expected) == set(CACHED_STEP)
    assert len(steps) == 8
    for i, counts in enumerate(steps[1:-1], start=1):
        assert counts == expected, f"step {i}"


def test_a_first_pass_reads_the_device_only_for_the_committed_tokens(llada_gqa_dir):
    """The capturing first pass at B = 2 over 3 layers: per-head scoring, top-k and page writes read nothing
    back; what the counter sees besides the sampler is host math on the plan (gpu_syncs.FIRST_PASS)."""
    b, layers = 2, 3
    first = step_counts(llada_gqa_dir, "snapkv", "every_step", b)[0]
    per_layer = b * layers
    once = {"sampler.py cpu": 1, "types.py int": b, "denoise_state.py nonzero": b, "denoise_state.py bool": b}
    expected = Counter(
        {
            site: once.get(site.split("/")[-1], 1 + 2 * per_layer if site.endswith("to(device)") else per_layer)
            for site in FIRST_PASS
        }
    )
    assert first == expected
    device = sorted(site for site in first if site not in HOST_ONLY)
    assert device == ["maskkv_engine/attention/transfer.py to(device)", "maskkv_engine/sampling/sampler.py cpu"]


def test_nothing_on_the_host_means_no_copy():
    on_device = torch.empty(3, device="meta")
    with SyncCounter(torch.device("cpu")) as counter:
        assert to_device([on_device], torch.device("meta"))[0] is on_device and to_device([], "meta") == []
    assert sum(counter.counts.values()) == 0
