"""The block manager never leaks, double-frees or shares a page, and its accounting is exact.

A hypothesis state machine drives the real ``BlockManager`` through random admission, per-layer
stores, releases, finishes and aborts (before, during and after the prefill's layers) against a
plain model of what each live request should own; plain unit tests pin the exact numbers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from maskkv_engine.engine.block_manager import BlockManager, OutOfPagesError

NUM_PAGES, PAGE, LAYERS, HEADS, DIM = 24, 4, 3, 2, 3


def pages_needed(lens: list[int]) -> int:
    return sum(-(-n // PAGE) for n in lens)


class LiveRequest:
    """What the model expects one request to hold."""

    def __init__(self, reserved: int):
        self.reserved = reserved
        self.lens: dict[int, list[int]] = {}  # layer -> kept tokens per head
        self.k: dict[int, torch.Tensor] = {}  # layer -> rows written [H, n_max, D]
        self.v: dict[int, torch.Tensor] = {}

    @property
    def pages(self) -> int:
        return sum(pages_needed(lens) for lens in self.lens.values())


class BlockManagerMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_PAGES, PAGE, LAYERS, HEADS, DIM, torch.float32)
        self.live: dict[str, LiveRequest] = {}
        self.next_id = 0
        self.peak = 0
        self.transient = 0

    # ---- helpers ---------------------------------------------------------------------------------
    def snapshot(self):
        """Everything a refused call must leave untouched."""
        bm = self.bm
        owned = {
            rid: ([list(map(list, layer)) for layer in bm.request_kv(rid).pages], bm.request_kv(rid).reserved)
            for rid in bm.live_requests
        }
        lens = {rid: bm.request_kv(rid).lens.clone() for rid in bm.live_requests}
        return (sorted(bm._free), bm.num_reserved_pages, owned, bm.k_pool.clone(), bm.v_pool.clone(), lens)

    def assert_unchanged(self, before) -> None:
        after = self.snapshot()
        assert before[:3] == after[:3]
        for a, b in zip(before[3:5], after[3:5]):  # bitwise: never-used pages hold whatever empty() gave
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), "a refused call wrote into the pools"
        assert before[5].keys() == after[5].keys()
        assert all(torch.equal(before[5][r], after[5][r]) for r in before[5])

    def free_pages(self) -> int:
        return NUM_PAGES - sum(r.pages for r in self.live.values()) - sum(r.reserved for r in self.live.values())

    # ---- rules -----------------------------------------------------------------------------------
    @rule(target=requests, n=st.integers(0, NUM_PAGES + 4))
    def reserve(self, n):
        rid = f"r{self.next_id}"
        self.next_id += 1
        before = self.snapshot()
        if n <= self.free_pages():
            assert self.bm.can_reserve(n)
            self.bm.reserve(rid, n)
            self.live[rid] = LiveRequest(n)
        else:
            assert not self.bm.can_reserve(n)
            with pytest.raises(OutOfPagesError):
                self.bm.reserve(rid, n)
            self.assert_unchanged(before)
            assert not self.bm.has_request(rid)
        return rid

    @rule(rid=requests, n=st.integers(0, 3))
    def reserve_twice_is_refused(self, rid, n):
        if rid in self.live:
            before = self.snapshot()
            with pytest.raises(ValueError, match="already holds pages"):
                self.bm.reserve(rid, n)
            self.assert_unchanged(before)

    @rule(rid=requests, layer=st.integers(0, LAYERS - 1), data=st.data())
    def store(self, rid, layer, data):
        req = self.live.get(rid)
        if req is None or layer in req.lens:
            return
        lens = data.draw(st.lists(st.integers(0, 3 * PAGE), min_size=HEADS, max_size=HEADS), label="lens")
        extra = data.draw(st.integers(0, 2), label="extra rows")  # rows past a head's length are not kept
        n_max = max(lens) + extra
        k, v = torch.randn(2, HEADS, n_max, DIM, generator=torch.Generator().manual_seed(self.next_id + layer))
        need = pages_needed(lens)
        before = self.snapshot()
        if need - min(need, req.reserved) > self.free_pages():
            with pytest.raises(OutOfPagesError):
                self.bm.store(rid, layer, k, v, torch.tensor(lens))
            self.assert_unchanged(before)
            return
        self.bm.store(rid, layer, k, v, torch.tensor(lens))
        req.reserved -= min(need, req.reserved)
        req.lens[layer], req.k[layer], req.v[layer] = lens, k, v
        self.peak = max(self.peak, self.bm.used_bytes + self.transient)

    @rule(rid=requests, data=st.data())
    def store_bad_lengths_is_refused(self, rid, data):
        """Lengths that cannot be honoured (negative, more than the rows given, wrong head count)."""
        req = self.live.get(rid)
        layer = next((li for li in range(LAYERS) if li not in (req.lens if req else {})), None)
        if req is None or layer is None:
            return
        bad = data.draw(
            st.sampled_from([[-PAGE, PAGE], [PAGE + 1, 1], [1] * (HEADS + 1), [1] * (HEADS - 1)]), label="bad lens"
        )
        k, v = torch.randn(2, HEADS, PAGE, DIM)
        before = self.snapshot()
        with pytest.raises(ValueError):
            self.bm.store(rid, layer, k, v, torch.tensor(bad))
        self.assert_unchanged(before)

    @rule(rid=requests)
    def release_reservation(self, rid):
        if rid in self.live:
            self.bm.release_reservation(rid)
            self.live[rid].reserved = 0

    @rule(rid=consumes(requests))
    def free(self, rid):
        """Finish or abort: before any store, between layers, or after the last one."""
        req = self.live.pop(rid, None)
        returned = self.bm.free(rid)
        assert returned == (0 if req is None else req.pages)
        assert self.bm.free(rid) == 0  # idempotent
        assert not self.bm.has_request(rid)

    @rule(nbytes=st.integers(0, 10_000))
    def set_transient_bytes(self, nbytes):
        self.transient = nbytes
        self.bm.set_transient_bytes(nbytes)
        self.peak = max(self.peak, self.bm.used_bytes + nbytes)

    @precondition(lambda self: self.transient == 0)
    @rule()
    def reset_peak(self):
        self.bm.reset_peak()
        self.peak = self.bm.used_bytes

    # ---- invariants ------------------------------------------------------------------------------
    @invariant()
    def internal_invariants(self):
        self.bm.check_invariants()

    @invariant()
    def accounting_is_exact(self):
        bm = self.bm
        used = sum(r.pages for r in self.live.values())
        assert bm.num_used_pages == used == sum(bm.request_pages(rid) for rid in bm.live_requests)
        assert bm.num_reserved_pages == sum(r.reserved for r in self.live.values())
        assert bm.num_free_pages == self.free_pages()
        assert bm.used_bytes == used * bm.page_bytes
        assert sorted(bm.live_requests) == sorted(self.live)
        assert bm.peak_bytes == self.peak

    @invariant()
    def rows_read_back_exactly(self):
        bm = self.bm
        for rid, req in self.live.items():
            kv = bm.request_kv(rid)
            table = kv.block_table()  # cached between calls: a store must invalidate it
            for layer in range(LAYERS):
                lens = req.lens.get(layer, [0] * HEADS)
                assert kv.lens[layer].tolist() == lens
                for h, n in enumerate(lens):
                    pages = kv.pages[layer][h]
                    assert len(pages) == -(-n // PAGE)
                    assert table[layer, h, : len(pages)].tolist() == pages
                    if not pages:
                        continue
                    k_rows = bm.k_pool[pages].reshape(-1, DIM)
                    v_rows = bm.v_pool[pages].reshape(-1, DIM)
                    assert torch.equal(k_rows[:n], req.k[layer][h, :n])
                    assert torch.equal(v_rows[:n], req.v[layer][h, :n])
                    assert not k_rows[n:].any() and not v_rows[n:].any(), "a page's unused slots are not zero"


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---- plain unit tests --------------------------------------------------------------------------------
def manager(num_pages: int = 16, block_size: int = 16, dtype: torch.dtype = torch.bfloat16) -> BlockManager:
    return BlockManager(num_pages, block_size, num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype)


@pytest.mark.parametrize("n,pages", [(0, 0), (1, 1), (16, 1), (17, 2), (32, 2), (33, 3)])
def test_exact_page_counts(n, pages):
    bm = manager()
    assert bm.pages_for(torch.tensor([n])) == pages
    bm.reserve("a", 0)
    bm.store("a", 0, torch.ones(2, max(n, 1), 8), torch.ones(2, max(n, 1), 8), torch.tensor([n, 0]))
    assert bm.request_pages("a") == bm.num_used_pages == pages
    assert bm.free("a") == pages and bm.num_free_pages == 16


def test_bytes_accounting():
    bm = manager(dtype=torch.bfloat16)
    assert bm.page_bytes == 2 * 16 * 8 * 2 == BlockManager.bytes_per_page(16, 8, torch.bfloat16)
    assert BlockManager.bytes_per_page(16, 8, torch.float32) == 2 * bm.page_bytes
    bm.reserve("a", 5)
    assert bm.used_bytes == 0 and bm.num_free_pages == 11  # a reservation is not use
    bm.store("a", 1, torch.ones(2, 20, 8), torch.ones(2, 20, 8), torch.tensor([20, 3]))
    assert bm.used_bytes == 3 * bm.page_bytes and bm.num_reserved_pages == 2
    bm.release_reservation("a")
    assert bm.num_free_pages == 13


def test_store_beyond_the_reservation_draws_from_the_free_pool():
    bm = manager(num_pages=4)
    bm.reserve("a", 1)
    bm.reserve("b", 2)
    with pytest.raises(OutOfPagesError):  # 3 pages: 1 reserved + 2 free would eat b's reservation
        bm.store("a", 0, torch.ones(2, 32, 8), torch.ones(2, 32, 8), torch.tensor([32, 1]))
    bm.store("a", 0, torch.ones(2, 32, 8), torch.ones(2, 32, 8), torch.tensor([17, 0]))
    assert bm.num_free_pages == 0 and bm.num_reserved_pages == 2
    bm.check_invariants()


def test_peak_tracks_transient_full_kv():
    bm = manager()
    bm.reserve("a", 4)
    bm.set_transient_bytes(10_000)  # a full layer of KV alive during the prefill pass
    assert bm.peak_bytes == 10_000
    bm.store("a", 0, torch.ones(2, 32, 8), torch.ones(2, 32, 8), torch.tensor([32, 32]))
    assert bm.peak_bytes == 10_000 + 4 * bm.page_bytes
    bm.set_transient_bytes(0)
    assert bm.peak_bytes == 10_000 + 4 * bm.page_bytes  # a peak only goes down on reset
    bm.reset_peak()
    assert bm.peak_bytes == 4 * bm.page_bytes
    bm.free("a")
    assert bm.peak_bytes == 4 * bm.page_bytes and bm.used_bytes == 0


def test_a_layer_is_stored_once():
    bm = manager()
    bm.reserve("a", 2)
    bm.store("a", 0, torch.ones(2, 1, 8), torch.ones(2, 1, 8), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="already has pages for layer 0"):
        bm.store("a", 0, torch.ones(2, 1, 8), torch.ones(2, 1, 8), torch.tensor([1, 1]))
    bm.check_invariants()


def test_negative_reservation_is_refused():
    bm = manager()
    with pytest.raises(ValueError, match="num_pages"):
        bm.reserve("a", -1)
    assert not bm.has_request("a") and bm.num_reserved_pages == 0
