"""StepContext: one engine step's hooks. It composes the scheduled requests' plans (KV policy capture,
refresh strategy layer hooks) into what each layer of the one batched forward computes.

The plain case (every planned row recomputed, keys = fresh rows + pages) passes tensors through
untouched; only requests whose refresh state recomputes a subset of rows or adds cached keys make the
context gather queries and assemble per-sequence dense keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_engine.attention.hooks import StepHooks
from maskkv_engine.attention.metadata import AttentionMetadata, RowLayout
from maskkv_engine.kv.prefill_capture import PrefillCapture
from maskkv_engine.refresh.base import RefreshState


@dataclass
class PlannedSequence:
    """One sequence of the packed stream: rows [offset, offset + length) of the step."""

    request_id: str
    offset: int
    length: int
    state: RefreshState | None  # None: plain rows (e.g. the unconditional branch of CFG)


class StepContext(StepHooks):
    def __init__(
        self,
        sequences: list[PlannedSequence],
        base_meta: AttentionMetadata,
        capture: PrefillCapture | None,
    ):
        self.sequences = sequences
        self.base_meta = base_meta
        self.capture = capture
        self.custom = [s for s in sequences if s.state is not None and s.state.custom_layers]
        self._rows: dict[int, torch.Tensor | None] = {}
        self._local_rows: dict[int, list[torch.Tensor | None]] = {}
        self._computed_offset: dict[int, dict[int, int]] = {}  # layer -> packed offset -> offset in computed rows
        self._layout_cache: dict[tuple, tuple[RowLayout, RowLayout]] = {}  # (q lens, kv lens) -> layouts

    # ---- StepHooks -------------------------------------------------------------------------------
    def prepare_attention(self, layer, q, k, v, meta):
        if self.capture is not None:
            self.capture.on_qkv(layer, q, k, v)
        if not self.custom:
            return q, k, v, meta
        qs, ks, vs, q_lens, kv_lens, rows, local_rows = [], [], [], [], [], [], []
        computed_offset: dict[int, int] = {}
        cursor = 0
        for seq in self.sequences:
            sl = slice(seq.offset, seq.offset + seq.length)
            q_s, k_s, v_s = q[sl], k[sl], v[sl]
            local = None
            extra_k = extra_v = None
            if seq.state is not None and seq.state.custom_layers:
                k_s, v_s, extra_k, extra_v = seq.state.prepare(layer, q_s, k_s, v_s)
                local = seq.state.rows(layer)
            if local is not None:
                q_s = q_s[local]
                rows.append(local + seq.offset)
            else:
                rows.append(torch.arange(seq.offset, seq.offset + seq.length, device=q.device))
            if extra_k is not None and extra_k.shape[0]:
                k_s, v_s = torch.cat([k_s, extra_k]), torch.cat([v_s, extra_v])
            local_rows.append(local)
            computed_offset[seq.offset] = cursor
            cursor += int(q_s.shape[0])
            qs.append(q_s)
            ks.append(k_s)
            vs.append(v_s)
            q_lens.append(int(q_s.shape[0]))
            kv_lens.append(int(k_s.shape[0]))
        all_rows = torch.cat(rows)
        self._rows[layer] = None if all_rows.numel() == q.shape[0] and all(r is None for r in local_rows) else all_rows
        self._local_rows[layer] = local_rows
        self._computed_offset[layer] = computed_offset
        q_layout, kv_layout = self._layouts(q_lens, kv_lens, q.device)
        new_meta = AttentionMetadata(
            q=q_layout,
            kv=kv_layout,
            block_tables=meta.block_tables,
            cached_lens=meta.cached_lens,
            k_pool=meta.k_pool,
            v_pool=meta.v_pool,
        )
        return torch.cat(qs), torch.cat(ks), torch.cat(vs), new_meta

    def _layouts(self, q_lens: list[int], kv_lens: list[int], device: torch.device) -> tuple[RowLayout, RowLayout]:
        """The layouts of these lengths, built once per step: strategies that recompute the same number of rows
        at every layer (dual cache, dLLM-Cache) reuse the first layer's, instead of a copy per layer."""
        key = (tuple(q_lens), tuple(kv_lens))
        if key not in self._layout_cache:
            meta = AttentionMetadata.build(q_lens, device, kv_lens=kv_lens)  # both layouts in one copy
            self._layout_cache[key] = (meta.q, meta.kv)
        return self._layout_cache[key]

    def rows(self, layer: int) -> torch.Tensor | None:
        return self._rows.get(layer)

    def on_attention_residual(self, layer, h_in, h_out):
        """A first pass computes all of its rows, whatever the other requests of the step do: its statistics
        are read from its own rows, found in the computed rows through their offsets."""
        if self.capture is None:
            return
        if self._rows.get(layer) is None:
            self.capture.on_attention_residual(layer, h_in, h_out)
        else:
            self.capture.on_attention_residual(layer, h_in, h_out, self._computed_offset[layer])

    def merge(self, layer, x, rows, x1, attn_out, mlp_out):
        if not self.custom:
            return x1 + mlp_out
        out = torch.empty_like(x)
        cursor = 0  # position in the computed rows (x1, attn_out, mlp_out)
        for seq, local in zip(self.sequences, self._local_rows.get(layer, [None] * len(self.sequences))):
            sl = slice(seq.offset, seq.offset + seq.length)
            n = seq.length if local is None else int(local.numel())
            c = slice(cursor, cursor + n)
            cursor += n
            merged = None
            if seq.state is not None and seq.state.custom_layers:
                merged = seq.state.merge(layer, x[sl], local, x1[c], attn_out[c], mlp_out[c])
            if merged is None:
                assert local is None, "a refresh state that skips rows must merge them"
                merged = x1[c] + mlp_out[c]
            out[sl] = merged
        return out

    # ---- after the forward -----------------------------------------------------------------------
    def finalize(self) -> None:
        if self.capture is not None:
            self.capture.finalize()
