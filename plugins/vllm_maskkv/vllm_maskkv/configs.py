"""transformers config classes for the released LLaDA and Dream ``config.json`` files (no remote code).

vLLM builds its layers from a Llama / Qwen2 config, so each class translates its checkpoint's own keys
onto those fields and keeps every original key as well. ``is_causal=False``: both models attend
bidirectionally everywhere, which vLLM's Llama and Qwen2 layers turn into ENCODER_ONLY attention.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, Qwen2Config

LLADA_MASK_ID = 126336  # when config.json names none

# LLaDA options the vLLM Llama layers do not compute; refused rather than silently computing something else.
_LLADA_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "alibi": (False, None),
    "attention_layer_norm": (False, None),
    "rope": (True, None),
    "scale_logits": (False, None),
    "include_bias": (False, None),
    "block_type": ("llama", None),
    "layer_norm_type": ("rms", None),
    "activation_type": ("silu", "swiglu", None),
}


def _llada_to_llama(kw: dict[str, Any]) -> dict[str, Any]:
    """LLaDA's OLMo-style keys -> Llama keys. Keys already in Llama form win (a config that vLLM re-serialised)."""
    for key, allowed in _LLADA_UNSUPPORTED.items():
        if kw.get(key) not in allowed:
            raise ValueError(f"LLaDA config.json: {key}={kw.get(key)!r} is not supported (allowed: {allowed[:-1]})")
    out = dict(kw)
    if "d_model" in kw:
        d_model, n_heads = int(kw["d_model"]), int(kw["n_heads"])
        n_kv = kw.get("n_kv_heads") or (1 if kw.get("multi_query_attention") else n_heads)
        translated = {
            "hidden_size": d_model,
            "num_hidden_layers": int(kw["n_layers"]),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(n_kv),
            "head_dim": d_model // n_heads,
            "intermediate_size": int(kw.get("mlp_hidden_size") or int(kw.get("mlp_ratio", 4)) * d_model),
            "max_position_embeddings": int(kw.get("max_sequence_length", 4096)),
            "vocab_size": int(kw.get("embedding_size") or kw["vocab_size"]),
            "tie_word_embeddings": bool(kw.get("weight_tying", False)),
            "qkv_bias": bool(kw.get("include_qkv_bias", False)),  # vLLM's Llama layer reads qkv_bias for q/k/v only
            "rope_theta": float(kw.get("rope_theta", 10000.0)),
        }
        for key, value in translated.items():
            if key not in kw or key == "vocab_size":
                out[key] = value
    out.setdefault("hidden_act", "silu")
    out.setdefault("rms_norm_eps", 1e-5)
    out.setdefault("is_causal", False)
    return out


class LLaDAConfig(LlamaConfig):
    """``model_type: "llada"`` (GSAI-ML/LLaDA-8B-*), read as a bidirectional Llama."""

    model_type = "llada"

    def __init__(self, **kwargs: Any):
        super().__init__(**_llada_to_llama(kwargs))


class DreamConfig(Qwen2Config):
    """``model_type: "Dream"`` (Dream-org/Dream-v0-*): Qwen2 keys, bidirectional, logits shifted by one."""

    model_type = "Dream"

    def __init__(self, **kwargs: Any):
        if kwargs.get("use_sliding_window"):
            raise ValueError("Dream config.json: use_sliding_window=true is not supported (allowed: false)")
        kwargs.setdefault("is_causal", False)
        super().__init__(**kwargs)
