"""Write random-weight checkpoints in the exact released LLaDA / Dream layouts.

Tests, the demo and the speed benchmarks use them: the hubs are unreachable here, and a random
checkpoint exercises the same loader, names and shapes as the real one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from maskkv_engine.models.dream import DREAM_MASK_ID
from maskkv_engine.models.llada import LLADA_MASK_ID


def llada_config(
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    mlp_hidden_size: int = 128,
    vocab_size: int = 512,
    max_sequence_length: int = 4096,
    rope_theta: float = 500000.0,
    mask_token_id: int | None = None,
    eos_token_id: int | None = None,
    weight_tying: bool = False,
    torch_dtype: str = "float32",
) -> dict:
    """config.json as LLaDA-8B releases it (same keys), scaled down. Ids fit inside a small vocab."""
    mask = LLADA_MASK_ID if vocab_size > LLADA_MASK_ID else (vocab_size - 1 if mask_token_id is None else mask_token_id)
    eos = 126081 if vocab_size > 126081 else (vocab_size - 2 if eos_token_id is None else eos_token_id)
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": d_model,
        "embedding_dropout": 0.0,
        "embedding_size": vocab_size,
        "eos_token_id": eos,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": mask,
        "max_sequence_length": max_sequence_length,
        "mlp_hidden_size": mlp_hidden_size,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads or n_heads,
        "n_layers": n_layers,
        "pad_token_id": eos,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": rope_theta,
        "scale_logits": False,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": vocab_size,
        "weight_tying": weight_tying,
    }


def dream_config(
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1000000.0,
    tie_word_embeddings: bool = False,
    torch_dtype: str = "float32",
) -> dict:
    """config.json as Dream-v0 releases it (Qwen2 keys), scaled down."""
    mask = DREAM_MASK_ID if vocab_size > DREAM_MASK_ID else vocab_size - 1
    eos = 151643 if vocab_size > 151643 else vocab_size - 2
    return {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": eos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "mask_token_id": mask,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": num_hidden_layers,
        "model_type": "Dream",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads or num_attention_heads,
        "pad_token_id": eos,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.46.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def llada_weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, vocab, mlp = cfg["d_model"], cfg["embedding_size"], cfg["mlp_hidden_size"]
    kv = (d // cfg["n_heads"]) * cfg["n_kv_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.transformer.wte.weight": (vocab, d)}
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes.update(
            {
                p + "q_proj.weight": (d, d),
                p + "k_proj.weight": (kv, d),
                p + "v_proj.weight": (kv, d),
                p + "attn_out.weight": (d, d),
                p + "attn_norm.weight": (d,),
                p + "ff_norm.weight": (d,),
                p + "ff_proj.weight": (mlp, d),
                p + "up_proj.weight": (mlp, d),
                p + "ff_out.weight": (d, mlp),
            }
        )
    shapes["model.transformer.ln_f.weight"] = (d,)
    if not cfg["weight_tying"]:
        shapes["model.transformer.ff_out.weight"] = (vocab, d)
    return shapes


def dream_weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, vocab, mlp = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (mlp, d),
                p + "mlp.up_proj.weight": (mlp, d),
                p + "mlp.down_proj.weight": (d, mlp),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    shapes["model.norm.weight"] = (d,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


LM_HEADS = ("model.transformer.ff_out.weight", "lm_head.weight")
EMBEDDINGS = ("model.transformer.wte.weight", "model.embed_tokens.weight")


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, logit_std: float, dtype: torch.dtype) -> dict:
    """Fan-in scaled normal weights: unit-variance activations, logits with std ``logit_std``.

    Norm weights and biases are perturbed (around 1 and 0) so that a wrong norm or bias shows up in parity tests.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            centre = 0.0 if name.endswith(".bias") else 1.0
            t = centre + 0.1 * torch.randn(shape, generator=gen)
        elif name in EMBEDDINGS:
            t = torch.randn(shape, generator=gen)
        else:
            std = (logit_std if name in LM_HEADS else 1.0) / shape[1] ** 0.5
            t = std * torch.randn(shape, generator=gen)
        out[name] = t.to(dtype)
    return out


def write_checkpoint(
    path: str | os.PathLike, config: dict, seed: int = 0, logit_std: float = 4.0, shards: int = 1
) -> Path:
    """Write config.json + safetensors (``shards`` > 1 writes model-0000N-of-0000M + the index json).

    ``logit_std`` is large by default so tiny random models have peaked, well separated logits:
    decoding tests then compare real choices instead of near-ties.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    arch = config["architectures"][0]
    shapes = llada_weight_shapes(config) if arch == "LLaDAModelLM" else dream_weight_shapes(config)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config["torch_dtype"]]
    weights = random_weights(shapes, seed, logit_std, dtype)
    with (root / "config.json").open("w") as f:
        json.dump(config, f, indent=2)
    names = list(weights)
    if shards <= 1:
        save_file(weights, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, str(root / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    with (root / "model.safetensors.index.json").open("w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return root


def write_word_tokenizer(path: str | os.PathLike, vocab_size: int, mask_id: int, eos_id: int, words: int = 200) -> None:
    """A word-level tokenizer (``w0 w1 ...``) in the transformers format with a chat template, sized to
    a random checkpoint, so that text prompts work end to end."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"<|endoftext|>": eos_id, "<|mdm_mask|>": mask_id, "<unk>": 0, "<|user|>": 1, "<|assistant|>": 2}
    vocab = dict(specials)
    taken = set(vocab.values())
    next_id = 3
    for i in range(words):
        while next_id in taken:
            next_id += 1
        if next_id >= vocab_size:
            break
        vocab[f"w{i}"] = next_id
        taken.add(next_id)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        mask_token="<|mdm_mask|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
        "{% else %}<|assistant|> {{ m['content'] }} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(str(path))
