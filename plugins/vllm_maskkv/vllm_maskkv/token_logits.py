"""Level 1: LLaDA and Dream as bidirectional per-position-logit models on vLLM's pooling path.

Every forward returns the logits of every position ([tokens, vocab]); the token pooler hands them back
unchanged (``LLM.encode(..., pooling_task="token_classify")``). Attention is ENCODER_ONLY (the config
says ``is_causal=False``): no KV cache, so each call is a full bidirectional pass, which is exactly what
the reference dLLM decoders compute at every step. vLLM turns chunked prefill and prefix caching off for
such models by itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.pooler.activations import PoolerIdentity
from vllm.model_executor.layers.pooler.tokwise.poolers import pooler_for_token_classify
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors

from vllm_maskkv.weights import LLADA_WEIGHTS_MAPPER


class _TokenLogitsLM(nn.Module):
    """Backbone + LM head; the pooler returns the raw logits of every position."""

    is_pooling_model = True
    backbone_cls: type[nn.Module]
    hf_to_vllm_mapper: WeightsMapper | None = None

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = self.backbone_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.pooler = pooler_for_token_classify(vllm_config.model_config.pooler_config, act_fn=PoolerIdentity())

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        return self.logits_processor(self.lm_head, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # With tied embeddings the loader fills the shared tensor once, from whichever name comes first.
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class LLaDATokenLogits(_TokenLogitsLM):
    """``LLaDAModelLM`` checkpoints: logits row i predicts token i."""

    backbone_cls = LlamaModel
    hf_to_vllm_mapper = LLADA_WEIGHTS_MAPPER


class DreamTokenLogits(_TokenLogitsLM):
    """``DreamModel`` checkpoints: logits row i predicts token i+1 (the caller shifts, as Dream's own code does)."""

    backbone_cls = Qwen2Model
