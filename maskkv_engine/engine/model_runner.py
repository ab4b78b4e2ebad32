"""Runs one engine step: packs the scheduled requests into one token stream, runs the model once (one
forward per layer for the whole mixed batch), and returns the logits of each request's candidates.

What a request computes is its step plan (refresh/base.py): a full pass over [prompt + response]
(its first step, where the KV policy writes the kept prompt KV into pages; every step of 'none'; a
refresh), or a cached step over part of its sequence that reads its pruned prompt pages (and whatever
its refresh strategy caches). Logits are computed only for the positions it may commit this step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maskkv_engine.attention.backend import AttentionBackend
from maskkv_engine.attention.metadata import AttentionMetadata, ForwardContext, set_forward_context
from maskkv_engine.engine.block_manager import BlockManager
from maskkv_engine.engine.runner_protocol import StepResult
from maskkv_engine.engine.scheduler import ScheduledRequest
from maskkv_engine.engine.step_context import PlannedSequence, StepContext
from maskkv_engine.kv.base import KVPolicy
from maskkv_engine.kv.prefill_capture import CaptureTarget, PrefillCapture
from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.sampling.guidance import guided_logits, num_branches, unconditional_tokens


@dataclass
class PrefillProgress:
    """A first pass split over steps by layers: the hidden states between two chunks, the next layer,
    and the capture that keeps choosing and writing pages layer by layer."""

    hidden: torch.Tensor
    next_layer: int
    capture: PrefillCapture


class NativeModelRunner:
    """The ModelRunner of ``backend='native'``: this package's models, attention backends and paged KV."""

    def __init__(
        self,
        model: nn.Module,
        model_config: DiffusionLMConfig,
        backend: AttentionBackend,
        block_manager: BlockManager | None,
        policy: KVPolicy,
        device: torch.device,
        prefill_chunk_size: int | None = None,
    ):
        self.model = model
        self.config = model_config
        self.backend = backend
        self.block_manager = block_manager
        self.policy = policy
        self.device = device
        self.prefill_chunk_size = prefill_chunk_size  # query rows per attention / MLP chunk of a full pass

    def shutdown(self) -> None:
        """Nothing to release: the weights and pages go with the engine."""

    @torch.no_grad()
    def execute(self, scheduled: list[ScheduledRequest]) -> list[StepResult | None]:
        """One result per scheduled request; None for a layer chunk that is not the last of its pass."""
        whole = [s for s in scheduled if s.layers is None]
        results = dict(zip(map(id, whole), self._execute_batch(whole))) if whole else {}
        for item in scheduled:
            if item.layers is not None:
                results[id(item)] = self._prefill_chunk(item)
        return [results[id(item)] for item in scheduled]

    def _prefill_chunk(self, item: ScheduledRequest) -> StepResult | None:
        """Run layers [start, end) of a request's first pass; logits once the last layer has run."""
        req = item.request
        start, end = item.layers
        n = req.num_tokens
        cand = req.state.candidates(req.tokens, req.mask_id)
        meta, (positions, tokens, rows) = AttentionMetadata.build_with(
            [n], self.device, [torch.arange(n), req.tokens, self.config.logit_rows(cand)]
        )
        if req.prefill is None:
            target = CaptureTarget(req.request_id, 0, req.policy_ctx, req.kv_plan, req.collect_stats)
            capture = PrefillCapture(self.policy, self.block_manager, [target])
            req.prefill = PrefillProgress(self.model.embed(tokens), 0, capture)
        progress = req.prefill
        assert progress.next_layer == start, "layer chunks run in order"
        # the refresh state sees every layer of the first pass (it caches per-layer state there), split or not
        sequence = PlannedSequence(req.request_id, 0, n, req.refresh_state)
        hooks = StepContext([sequence], meta, progress.capture)
        with set_forward_context(self._context(meta, hooks)):
            progress.hidden = self.model.run_layers(progress.hidden, positions, start, end)
        progress.next_layer = end
        if end < self.config.num_layers:
            return None
        hooks.finalize()
        req.prefill = None
        req.metrics.kv_tokens_kept = progress.capture.targets[0].kept_tokens
        logits = self.model.compute_logits(progress.hidden[rows])
        return StepResult(positions=cand, logits=logits)

    def _context(self, meta: AttentionMetadata, hooks: StepContext) -> ForwardContext:
        return ForwardContext(attn=meta, backend=self.backend, hooks=hooks, chunk_rows=self.prefill_chunk_size)

    def _execute_batch(self, scheduled: list[ScheduledRequest]) -> list[StepResult]:
        ids, pos, seq_lens, uses_pages = [], [], [], []
        sequences: list[PlannedSequence] = []
        logit_rows: list[torch.Tensor] = []
        candidates: list[torch.Tensor] = []
        targets: list[CaptureTarget] = []
        row = 0
        for item in scheduled:
            req, plan = item.request, item.plan
            cand = req.state.candidates(req.tokens, req.mask_id)
            candidates.append(cand)
            branches = [req.tokens]
            if req.params.cfg_scale > 0:
                branches.append(unconditional_tokens(req.tokens, req.prompt_len, req.mask_id))
            for b, tokens in enumerate(branches):
                n = plan.end - plan.start
                ids.append(tokens[plan.start : plan.end])
                pos.append(torch.arange(plan.start, plan.end))
                seq_lens.append(n)
                uses_pages.append(plan.use_pages)
                logit_rows.append(row + self.config.logit_rows(cand) - plan.start)
                if b == 0 and (plan.capture or plan.rewrite):
                    targets.append(
                        CaptureTarget(
                            req.request_id,
                            row,
                            req.policy_ctx,
                            req.kv_plan,
                            plan.capture and req.collect_stats,
                            rewrite=plan.rewrite,
                        )
                    )
                sequences.append(PlannedSequence(req.request_id, row, n, req.refresh_state if b == 0 else None))
                row += n

        inputs = [torch.cat(ids), torch.cat(pos), torch.cat(logit_rows)]
        meta, (input_ids, positions, all_rows) = self._metadata(scheduled, seq_lens, uses_pages, inputs)
        capture = PrefillCapture(self.policy, self.block_manager, targets) if targets else None
        hooks = StepContext(sequences, meta, capture)
        with set_forward_context(self._context(meta, hooks)):
            hidden = self.model(input_ids, positions)
        hooks.finalize()
        for t in targets:
            if not t.rewrite:
                self._request_by_id(scheduled, t.request_id).metrics.kv_tokens_kept = t.kept_tokens
        logits = self.model.compute_logits(hidden[all_rows])
        return self._split(scheduled, candidates, logits)

    @staticmethod
    def _request_by_id(scheduled, request_id):
        return next(s.request for s in scheduled if s.request.request_id == request_id)

    def _split(self, scheduled, candidates, logits) -> list[StepResult]:
        results, offset = [], 0
        for item, cand in zip(scheduled, candidates):
            n = int(cand.numel())
            out = logits[offset : offset + n]
            offset += n
            cfg = item.request.params.cfg_scale
            if cfg > 0:
                uncond = logits[offset : offset + n]
                offset += n
                out = guided_logits(out, uncond, cfg)
            results.append(StepResult(positions=cand, logits=out))
        return results

    def _metadata(
        self, scheduled, seq_lens: list[int], uses_pages: list[bool], inputs: list[torch.Tensor]
    ) -> tuple[AttentionMetadata, list[torch.Tensor]]:
        """The step's metadata and ``inputs`` on the device: built on the host, moved in one copy."""
        bm = self.block_manager
        if bm is None or not any(uses_pages):
            return AttentionMetadata.build_with(seq_lens, self.device, inputs)
        tables, lens = [], []
        empty_table = torch.zeros(self.config.num_layers, self.config.num_kv_heads, 1, dtype=torch.long)
        empty_lens = torch.zeros(self.config.num_layers, self.config.num_kv_heads, dtype=torch.long)
        seq = 0
        for item in scheduled:
            n_branches = num_branches(item.request.params.cfg_scale)
            for _ in range(n_branches):
                if uses_pages[seq]:
                    kv = bm.request_kv(item.request.request_id)
                    tables.append(kv.block_table())
                    lens.append(kv.lens)
                else:
                    tables.append(empty_table)
                    lens.append(empty_lens)
                seq += 1
        width = max(t.shape[-1] for t in tables)
        padded = torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in tables], dim=1)
        return AttentionMetadata.build_with(
            seq_lens,
            self.device,
            inputs,
            block_tables=padded,  # [L, S, H_kv, P]
            cached_lens=torch.stack(lens, dim=1),  # [L, S, H_kv]
            k_pool=bm.k_pool,
            v_pool=bm.v_pool,
        )
