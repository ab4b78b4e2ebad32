"""``LLaDADiffusionLM``: LLaDA for vLLM's generate path, with paged KV that is bidirectional on every step.

The layers are vLLM's Llama layers; only the attention module differs: ``PrefillPrefixLMAttention`` keeps
a paged KV cache (DECODER attention) but builds every step's metadata with ``causal=False``. So the prompt
attends to itself bidirectionally at prefill, and a canvas attends to [prompt KV, committed blocks' KV,
itself] bidirectionally at each denoising step. The layer also tags its KV spec ``non_causal``, which
makes vLLM's engine core turn off prefix caching and chunked prefill (config_hook.py does it earlier).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import LlamaConfig
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import PrefillPrefixLMAttention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from vllm_maskkv.weights import LLADA_WEIGHTS_MAPPER


class BidirectionalCachedAttention(LlamaAttention):
    """LlamaAttention (same projections, rotary and forward) over ``PrefillPrefixLMAttention``."""

    def __init__(
        self,
        config: LlamaConfig,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        attn_type: str | None = None,  # ignored: always DECODER with causal=False
    ) -> None:
        nn.Module.__init__(self)  # LlamaAttention.__init__ would register a second attention layer under prefix
        tp_size = get_tensor_model_parallel_world_size()
        self.hidden_size = hidden_size
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.max_position_embeddings = max_position_embeddings
        self.qkv_proj = QKVParallelLinear(
            hidden_size,
            self.head_dim,
            num_heads,
            num_kv_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            num_heads * self.head_dim,
            hidden_size,
            bias=bias_o_proj,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self._init_rotary_emb(config, quant_config=quant_config)
        self.attn = PrefillPrefixLMAttention(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )


def _decoder_layer(*, vllm_config: VllmConfig, prefix: str = "") -> nn.Module:
    return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, attn_layer_type=BidirectionalCachedAttention)


class LLaDADiffusionLM(nn.Module):
    """Weights load from the released ``LLaDAModelLM`` names; vLLM samples through LLaDAModelState."""

    hf_to_vllm_mapper = LLADA_WEIGHTS_MAPPER

    @staticmethod
    def get_model_state_cls():
        from vllm_maskkv.diffusion.model_state import LLaDAModelState

        return LLaDAModelState

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = LlamaModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"), layer_type=_decoder_layer
        )
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
