"""PageStore: what the prefill capture needs from whoever keeps the pages (the engine's BlockManager).

The capture runs inside the forward pass and writes the kept prompt KV as each layer finishes; handing
it this narrow protocol instead of the block manager keeps kv/ free of engine/ imports (data flows one
way) and lets tests or another engine pass any object with these five methods.
"""

from __future__ import annotations

from typing import Protocol

import torch


class PageStore(Protocol):
    def store(
        self,
        request_id: str,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        lens: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Write one layer's kept rows into pages (once per request and layer).

        k, v: [H_kv, n_max, D]; head h keeps its first ``lens[h]`` rows (tokens). positions: [H_kv, n_max],
        the sequence positions of those rows, so a refresh can rewrite them later.
        """

    def rewrite(self, request_id: str, layer: int, k_seq: torch.Tensor, v_seq: torch.Tensor) -> None:
        """Overwrite a layer's already kept rows with fresh K/V of the same positions (a refresh).

        k_seq, v_seq: [n_cached, H_kv, D], the whole cacheable region of the sequence.
        """

    def release_reservation(self, request_id: str) -> None:
        """Return the pages reserved at admission that the first pass did not use."""

    def has_request(self, request_id: str) -> bool:
        """Whether the store holds pages (or a reservation) for ``request_id``."""

    def set_transient_bytes(self, nbytes: int) -> None:
        """Report how many bytes of full (not yet pruned) KV are alive right now, for peak accounting."""
