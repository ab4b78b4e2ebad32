"""LLaDA's released weight names -> the names of vLLM's Llama modules (both integration levels load through it).

``model.transformer.{wte, blocks.N.*, ln_f, ff_out}`` (OLMo style) become ``model.{embed_tokens, layers.N.*,
norm}`` and ``lm_head``; vLLM's LlamaModel then stacks q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj`` itself. Dream already uses the Qwen2 names and needs no mapping.
"""

from __future__ import annotations

import re

from vllm.model_executor.models.utils import WeightsMapper

_BLOCK = r"^model\.transformer\.blocks\.(\d+)\."
_LAYER = r"model.layers.\1."

LLADA_WEIGHTS_MAPPER = WeightsMapper(
    orig_to_new_regex={
        re.compile(r"^model\.transformer\.wte\."): "model.embed_tokens.",
        re.compile(r"^model\.transformer\.ln_f\."): "model.norm.",
        re.compile(r"^model\.transformer\.ff_out\."): "lm_head.",  # the top-level ff_out is the LM head
        re.compile(_BLOCK + r"(q_proj|k_proj|v_proj)\."): _LAYER + r"self_attn.\2.",
        re.compile(_BLOCK + r"attn_out\."): _LAYER + "self_attn.o_proj.",
        re.compile(_BLOCK + r"ff_proj\."): _LAYER + "mlp.gate_proj.",  # ff_proj is the SwiGLU gate
        re.compile(_BLOCK + r"up_proj\."): _LAYER + "mlp.up_proj.",
        re.compile(_BLOCK + r"ff_out\."): _LAYER + "mlp.down_proj.",
        re.compile(_BLOCK + r"attn_norm\."): _LAYER + "input_layernorm.",
        re.compile(_BLOCK + r"ff_norm\."): _LAYER + "post_attention_layernorm.",
    }
)
