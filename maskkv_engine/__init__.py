"""maskkv-engine: a high-throughput inference engine for diffusion LMs with per-head pruned, paged KV."""

from maskkv_engine.engine.llm_engine import LLMEngine
from maskkv_engine.llm import LLM
from maskkv_engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from maskkv_engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics"]
__version__ = "0.1.0"
