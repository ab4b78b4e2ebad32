"""The torch backend's cached step: pages gathered into contiguous K/V, one SDPA call per sequence.

Exactness against the float64 reference of test_attention_backends (its ``Case``: shuffled pages in a
garbage-filled pool), at prompt lengths over many pages, every head equal (``full``) or ragged (MaskKV)
with zeros and page multiples, GQA; bitwise batch invariance; and the cost structure itself: the number
of attention calls does not grow with the pages (the old backend ran an online-softmax update per tile).
"""

from __future__ import annotations

import pytest
import torch

import maskkv_engine.attention.torch_ref as torch_ref
from maskkv_engine.attention.torch_ref import TorchAttentionBackend
from tests.test_attention_backends import Case, assert_batch_invariant

SEQ_LENS = [32, 1, 7, 32]


def full_kept(n_seqs: int, n_kv: int, prompt: int) -> list[list[int]]:
    """Every head of a sequence keeps the same length (the ``full`` policy); one sequence holds nothing."""
    return [[0 if s == 1 else prompt + s] * n_kv for s in range(n_seqs)]


def ragged_kept(n_kv: int, page: int) -> list[list[int]]:
    """MaskKV-like: lengths differ per head, with 0, exact page multiples and repeats."""
    return [[0, 3 * page] + [5] * (n_kv - 2), [0] * n_kv, [4 * page + 1, 4 * page + 1] + [0] * (n_kv - 2),
            [9 * page + 3 + h for h in range(n_kv)]]  # fmt: skip


def count_sdpa(monkeypatch) -> list[int]:
    calls = [0]
    real = torch_ref.F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_ref.F, "scaled_dot_product_attention", counted)
    return calls


@pytest.mark.parametrize("n_q,n_kv", [(4, 4), (8, 2), (7, 1)], ids=["mha", "gqa4", "gqa7"])
@pytest.mark.parametrize("kind", ["full", "ragged"])
def test_gathered_pages_equal_the_reference(n_q, n_kv, kind):
    page = 16
    if kind == "full":
        kept = full_kept(len(SEQ_LENS), n_kv, 150)  # 150..153 tokens: ~10 pages, not a multiple
    else:
        kept = ragged_kept(n_kv, page) if n_kv >= 2 else [[0], [3 * page], [0], [137]]
    case = Case(SEQ_LENS, n_q, n_kv, 32, page, kept, torch.float32, seed=n_q + n_kv)
    err = (case.run(TorchAttentionBackend()).double() - case.reference()).abs().max().item()
    assert err < 1e-5, f"max error {err:.3g}"


@pytest.mark.parametrize("kind", ["full", "ragged"])
def test_batch_invariance_is_bitwise(kind):
    n_q, n_kv, page = 8, 2, 4
    kept = full_kept(len(SEQ_LENS), n_kv, 70) if kind == "full" else ragged_kept(n_kv, page)
    case = Case(SEQ_LENS, n_q, n_kv, 16, page, kept, torch.float32, seed=5)
    assert_batch_invariant(TorchAttentionBackend(), case)


@pytest.mark.parametrize("prompt", [40, 900])
@pytest.mark.parametrize("kind", ["full", "ragged"])
def test_one_attention_call_per_sequence_whatever_the_prompt(monkeypatch, prompt, kind):
    """One SDPA per sequence, for 3 pages as for 57, equal or ragged head lengths (no loop over pages
    or heads)."""
    calls = count_sdpa(monkeypatch)
    kept = full_kept(len(SEQ_LENS), 2, prompt)
    if kind == "ragged":
        kept = [[n, n // 3] for n, _ in kept]
    case = Case(SEQ_LENS, 4, 2, 16, 16, kept, torch.float32)
    case.run(TorchAttentionBackend())
    assert calls[0] == len(SEQ_LENS)


def test_reused_page_buffer_never_leaks_between_calls():
    """The gathered pages live in a buffer the backend reuses: a long call, a short one with other pages,
    then the long one again give the reference each time (the short call sees no stale rows)."""
    backend = TorchAttentionBackend()
    long = Case(SEQ_LENS, 8, 2, 16, 4, full_kept(len(SEQ_LENS), 2, 300), torch.float32, seed=7)
    short = Case(SEQ_LENS, 8, 2, 16, 4, ragged_kept(2, 4), torch.float32, seed=8)
    first = long.run(backend)
    for case in (short, long):
        err = (case.run(backend).double() - case.reference()).abs().max().item()
        assert err < 1e-5
    assert torch.equal(long.run(backend), first)
