"""Pages of per-head pruned KV, with exact accounting.

One page holds ``block_size`` tokens of ONE kv head of ONE layer: K and V pools are
``[num_pages, block_size, head_dim]``, shared by all layers and heads. A request owns, for every
(layer, kv_head), a page list and a kept length; lengths differ between heads, so page counts do too.

Admission reserves the pages a request may need (known before its forward pass from its budget plan);
the prefill pass then allocates, per layer, exactly what each head keeps, out of that reservation, and
gives the rest back. At every moment: pages in use == sum of pages owned by live requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from maskkv_engine.attention.transfer import to_device


class OutOfPagesError(RuntimeError):
    pass


@dataclass
class RequestKV:
    """One request's pages: ``pages[layer][head]`` page ids, ``lens[layer, head]`` tokens kept."""

    num_layers: int
    num_kv_heads: int
    pages: list[list[list[int]]] = field(default_factory=list)
    lens: torch.Tensor = field(default=None)  # type: ignore[assignment]
    positions: list[torch.Tensor | None] = field(default_factory=list)  # per layer [H, n_max]: kept token positions
    reserved: int = 0  # pages reserved, not yet allocated
    _table: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.pages = [[[] for _ in range(self.num_kv_heads)] for _ in range(self.num_layers)]
        self.lens = torch.zeros(self.num_layers, self.num_kv_heads, dtype=torch.long)
        self.positions = [None] * self.num_layers

    @property
    def num_pages(self) -> int:
        return sum(len(p) for layer in self.pages for p in layer)

    def block_table(self) -> torch.Tensor:
        """[L, H_kv, max_pages] page ids, zero padded (padding is masked by ``lens``)."""
        if self._table is None:
            width = max(1, max(len(p) for layer in self.pages for p in layer))
            table = torch.zeros(self.num_layers, self.num_kv_heads, width, dtype=torch.long)
            for li, layer in enumerate(self.pages):
                for h, pages in enumerate(layer):
                    if pages:
                        table[li, h, : len(pages)] = torch.tensor(pages, dtype=torch.long)
            self._table = table
        return self._table


class BlockManager:
    def __init__(
        self,
        num_pages: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.num_pages = num_pages
        self.block_size = block_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # Allocated lazily by the OS (empty, not zeros: a 1 GiB memset costs seconds). Pages are zeroed
        # when handed out, and page 0 (where padded block-table entries point) now: every value a
        # backend may read stays finite, so masked-out entries contribute exactly nothing.
        self.k_pool = torch.empty(num_pages, block_size, head_dim, dtype=dtype, device=device)
        self.v_pool = torch.empty(num_pages, block_size, head_dim, dtype=dtype, device=device)
        self.k_pool[0].zero_()
        self.v_pool[0].zero_()
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._requests: dict[str, RequestKV] = {}
        self._reserved_total = 0
        self.transient_bytes = 0  # full-layer KV alive during a prefill pass (reported by the capture)
        self.peak_bytes = 0

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def page_bytes(self) -> int:
        """Bytes of one page, K and V together."""
        return 2 * self.block_size * self.head_dim * self.k_pool.element_size()

    @staticmethod
    def bytes_per_page(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * block_size * head_dim * torch.empty(0, dtype=dtype).element_size()

    def pages_for(self, lens: torch.Tensor) -> int:
        """Pages needed to hold ``lens`` tokens per (layer, head)."""
        return int(((lens + self.block_size - 1) // self.block_size).sum())

    @property
    def num_free_pages(self) -> int:
        """Pages neither owned nor reserved."""
        return len(self._free) - self._reserved_total

    @property
    def num_used_pages(self) -> int:
        """Pages owned by requests (written or being written)."""
        return self.num_pages - len(self._free)

    @property
    def num_reserved_pages(self) -> int:
        return self._reserved_total

    @property
    def used_bytes(self) -> int:
        return self.num_used_pages * self.page_bytes

    def request_pages(self, request_id: str) -> int:
        kv = self._requests.get(request_id)
        return 0 if kv is None else kv.num_pages

    def request_kv(self, request_id: str) -> RequestKV:
        return self._requests[request_id]

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def live_requests(self) -> list[str]:
        return list(self._requests)

    # ---- admission -------------------------------------------------------------------------------
    def can_reserve(self, num_pages: int) -> bool:
        return num_pages <= self.num_free_pages

    def reserve(self, request_id: str, num_pages: int) -> None:
        """Set pages aside for a request about to run its prefill pass. Refusal changes nothing."""
        if num_pages < 0:
            raise ValueError(f"request {request_id!r}: num_pages={num_pages} must be >= 0")
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already holds pages")
        if not self.can_reserve(num_pages):
            raise OutOfPagesError(f"request {request_id!r} needs {num_pages} pages, {self.num_free_pages} are free")
        self._requests[request_id] = RequestKV(self.num_layers, self.num_kv_heads, reserved=num_pages)
        self._reserved_total += num_pages

    def release_reservation(self, request_id: str) -> None:
        """Give back what the prefill pass did not use."""
        kv = self._requests[request_id]
        self._reserved_total -= kv.reserved
        kv.reserved = 0

    # ---- writing ---------------------------------------------------------------------------------
    def store(
        self,
        request_id: str,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        lens: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Allocate pages for one layer and write its kept rows.

        k, v: [H_kv, n_max, D] kept rows per head (head h uses its first ``lens[h]`` rows);
        positions: [H_kv, n_max] the sequence positions of those rows (kept so a refresh can rewrite them).
        Pages come out of the request's reservation first, then from the free pool.
        """
        kv = self._requests[request_id]
        if any(kv.pages[layer]):
            raise ValueError(f"request {request_id!r} already has pages for layer {layer}")
        lens = lens.to(torch.long).cpu()
        self._check_rows(k, v, lens)  # before anything moves: a bad call must not leak or half-write pages
        per_head = ((lens + self.block_size - 1) // self.block_size).tolist()
        need = sum(per_head)
        from_reserve = min(need, kv.reserved)
        if need - from_reserve > self.num_free_pages:
            raise OutOfPagesError(f"request {request_id!r} needs {need} pages for layer {layer}")
        kv.reserved -= from_reserve
        self._reserved_total -= from_reserve
        ids = [self._free.pop() for _ in range(need)]
        start = 0
        for h, n in enumerate(per_head):
            kv.pages[layer][h] = ids[start : start + n]
            start += n
        kv.lens[layer] = lens
        kv.positions[layer] = positions  # where the caller made them (the device): read only by a refresh
        kv._table = None
        if need:
            self._write_rows(kv.pages[layer], k, v, lens, zero=torch.tensor(ids))
        self._update_peak()

    def _check_rows(self, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> None:
        heads, dim = self.num_kv_heads, self.head_dim
        if lens.shape != (heads,):
            raise ValueError(f"lens has shape {tuple(lens.shape)}, expected ({heads},): one length per kv head")
        if k.shape != v.shape or k.dim() != 3 or k.shape[0] != heads or k.shape[2] != dim:
            raise ValueError(f"k, v must both be [{heads}, n_max, {dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
        if bool((lens < 0).any()) or int(lens.max()) > k.shape[1]:
            raise ValueError(f"kept lengths {lens.tolist()} must be in [0, {k.shape[1]}] (the rows given)")

    def _write_rows(
        self, pages: list[list[int]], k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, zero=None
    ) -> None:
        """Write each head's first ``lens[h]`` rows of k, v [H, n_max, D] into its pages (after zeroing the
        page ids ``zero``). Where each row goes is index math on the host, moved in one copy: no boolean
        mask on the device (a nonzero, so a sync, each)."""
        n_max = k.shape[1]
        width = max(len(p) for p in pages)
        table = torch.zeros(len(pages), max(width, 1), dtype=torch.long)
        for h, p in enumerate(pages):
            if p:
                table[h, : len(p)] = torch.tensor(p)
        t = torch.arange(n_max)
        heads, rows = (t[None, :] < lens[:, None]).nonzero(as_tuple=True)  # host: the mask's order
        slots = table[heads, rows // self.block_size] * self.block_size + rows % self.block_size
        zero = torch.zeros(0, dtype=torch.long) if zero is None else zero
        slots, heads, rows, zero = to_device([slots, heads, rows, zero], self.k_pool.device)
        d = self.head_dim
        if zero.numel():
            self.k_pool[zero] = 0
            self.v_pool[zero] = 0
        self.k_pool.view(-1, d)[slots] = k[heads, rows].to(self.k_pool.dtype)
        self.v_pool.view(-1, d)[slots] = v[heads, rows].to(self.v_pool.dtype)

    def rewrite(self, request_id: str, layer: int, k_seq: torch.Tensor, v_seq: torch.Tensor) -> None:
        """Overwrite a layer's kept rows in place with fresh K/V of the same positions (a refresh).

        k_seq, v_seq: [n, H_kv, D], the whole cached region of the sequence from a full pass.
        """
        kv = self._requests[request_id]
        pos = kv.positions[layer]
        if pos is None or not any(kv.pages[layer]):
            return
        heads = torch.arange(pos.shape[0])[:, None].expand_as(pos)
        pos, heads = to_device([pos, heads], k_seq.device)
        self._write_rows(kv.pages[layer], k_seq[pos, heads], v_seq[pos, heads], kv.lens[layer])  # [H, n_max, D]

    def kept(self, request_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's kept prompt KV, gathered: k, v [H_kv, n_max, D], lens [H_kv], positions [H_kv, n_max]."""
        kv = self._requests[request_id]
        lens = kv.lens[layer]
        n_max = max(int(lens.max()), 1)
        table = kv.block_table()[layer]  # [H, P]
        t = torch.arange(n_max)
        page = table.gather(1, (t // self.block_size).clamp(max=table.shape[1] - 1)[None, :].expand(table.shape[0], -1))
        (slots,) = to_device([page * self.block_size + t % self.block_size], self.k_pool.device)
        d = self.head_dim
        k = self.k_pool.view(-1, d)[slots]
        v = self.v_pool.view(-1, d)[slots]
        pos = kv.positions[layer]
        if pos is None:
            pos = torch.zeros(lens.shape[0], n_max, dtype=torch.long)
        return k, v, lens, pos[:, :n_max] if pos.shape[1] >= n_max else pos

    # ---- freeing ---------------------------------------------------------------------------------
    def free(self, request_id: str) -> int:
        """Return every page and any reservation of a request (finished or aborted). Idempotent."""
        kv = self._requests.pop(request_id, None)
        if kv is None:
            return 0
        self._reserved_total -= kv.reserved
        n = 0
        for layer in kv.pages:
            for pages in layer:
                self._free.extend(reversed(pages))
                n += len(pages)
        return n

    # ---- peak tracking ---------------------------------------------------------------------------
    def set_transient_bytes(self, nbytes: int) -> None:
        """The capture reports how much full (not yet pruned) KV is alive right now."""
        self.transient_bytes = nbytes
        self._update_peak()

    def _update_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.used_bytes + self.transient_bytes)

    def reset_peak(self) -> None:
        self.peak_bytes = self.used_bytes + self.transient_bytes

    def check_invariants(self) -> None:
        """Pages are owned at most once, free + owned == all, reservations add up (tests call this)."""
        owned = [p for kv in self._requests.values() for layer in kv.pages for ps in layer for p in ps]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert not set(owned) & set(self._free), "a page is both free and owned"
        assert len(owned) + len(self._free) == self.num_pages, "pages leaked"
        assert len(set(self._free)) == len(self._free), "a page is free twice"
        assert self._reserved_total == sum(kv.reserved for kv in self._requests.values())
        assert 0 <= self._reserved_total <= len(self._free)
