"""maskkv-engine: a high-throughput inference engine for diffusion LMs with per-head pruned, paged KV.

The public names load on first use (PEP 562), so ``maskkv --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskkv_engine.engine.llm_engine import LLMEngine
    from maskkv_engine.llm import LLM
    from maskkv_engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from maskkv_engine.sampling_params import SamplingParams

_EXPORTS = {
    "LLM": "maskkv_engine.llm",
    "LLMEngine": "maskkv_engine.engine.llm_engine",
    "SamplingParams": "maskkv_engine.sampling_params",
    "RequestOutput": "maskkv_engine.outputs",
    "CompletionOutput": "maskkv_engine.outputs",
    "Logprob": "maskkv_engine.outputs",
    "RequestMetrics": "maskkv_engine.outputs",
}

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maskkv_engine' has no attribute {name!r}")
