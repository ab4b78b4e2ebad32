"""SamplingParams.n: one request id fanned out into n child requests, gathered back into one output.

Each child is an ordinary request (its own canvas, generator and pages) with ``n=1`` and seed
``seed + i`` (or its own engine seed when the parent has none), so n samples batch like n requests.
The parent id is what the caller sees: aborting it aborts every child, and its finished
RequestOutput holds the n completions with indices 0..n-1.
"""

from __future__ import annotations

import dataclasses

from maskkv_engine.outputs import RequestOutput
from maskkv_engine.sampling_params import SamplingParams

SEPARATOR = "#sample"


class ParentRequests:
    def __init__(self) -> None:
        self._children: dict[str, list[str]] = {}
        self._parent_of: dict[str, tuple[str, int]] = {}
        self._finished: dict[str, dict[int, RequestOutput]] = {}

    @staticmethod
    def fan_out(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
        """(child id, child params) for each of the n samples."""
        return [
            (
                f"{request_id}{SEPARATOR}{i}",
                dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i),
            )
            for i in range(params.n)
        ]

    def add(self, request_id: str, child_ids: list[str]) -> None:
        self._children[request_id] = list(child_ids)
        self._finished[request_id] = {}
        for i, cid in enumerate(child_ids):
            self._parent_of[cid] = (request_id, i)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._children

    def pop(self, request_id: str) -> list[str]:
        """Forget a parent; returns its child ids (to abort them)."""
        children = self._children.pop(request_id, [])
        self._finished.pop(request_id, None)
        for cid in children:
            self._parent_of.pop(cid, None)
        return children

    def gather(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Replace children's outputs by their parent's: an unfinished child's as it stands (its one
        completion, with its index), and, once the last child finishes, the parent's finished output."""
        result = []
        for out in outputs:
            owner = self._parent_of.get(out.request_id)
            if owner is None:
                result.append(out)
                continue
            parent, index = owner
            for c in out.outputs:
                c.index = index
            if not out.finished:
                result.append(dataclasses.replace(out, request_id=parent))
                continue
            done = self._finished[parent]
            done[index] = out
            if len(done) == len(self._children[parent]):
                first = done[0]
                completions = [c for i in sorted(done) for c in done[i].outputs]
                result.append(dataclasses.replace(first, request_id=parent, outputs=completions, finished=True))
                self.pop(parent)
        return result
