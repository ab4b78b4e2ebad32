"""The embedded default model (maskkv_engine/assets/default_model): layout, tokenizer, and that it
really answers the retrieval it was trained for when run through the engine with the full cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

import maskkv_engine

ASSET = Path(maskkv_engine.__file__).parent / "assets" / "default_model"
LLADA_KEYS = {
    "architectures", "model_type", "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
    "mlp_ratio", "vocab_size", "embedding_size", "max_sequence_length", "rope_theta", "rms_norm_eps",
    "mask_token_id", "eos_token_id", "pad_token_id", "weight_tying", "activation_type", "block_type",
    "layer_norm_type", "rope", "rope_full_precision", "alibi", "attention_layer_norm", "include_bias",
    "include_qkv_bias", "bias_for_layer_norm", "scale_logits", "flash_attention", "torch_dtype",
}  # fmt: skip


def config() -> dict:
    return json.loads((ASSET / "config.json").read_text())


def test_files_and_size():
    names = {p.name for p in ASSET.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md"} <= names  # fmt: skip
    assert sum(p.stat().st_size for p in ASSET.iterdir()) < 25 * 2**20


def test_config_is_the_released_llada_format():
    cfg = config()
    assert LLADA_KEYS <= set(cfg)
    assert cfg["architectures"] == ["LLaDAModelLM"] and cfg["max_sequence_length"] >= 8192


def test_checkpoint_layout():
    cfg = config()
    d, hd = cfg["d_model"], cfg["d_model"] // cfg["n_heads"]
    kv, mlp, emb = cfg["n_kv_heads"] * hd, cfg["mlp_hidden_size"], cfg["embedding_size"]
    want = {"model.transformer.wte.weight": (emb, d), "model.transformer.ln_f.weight": (d,)}
    if not cfg["weight_tying"]:
        want["model.transformer.ff_out.weight"] = (emb, d)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        want |= {p + "q_proj.weight": (d, d), p + "k_proj.weight": (kv, d), p + "v_proj.weight": (kv, d),
                 p + "attn_out.weight": (d, d), p + "ff_proj.weight": (mlp, d), p + "up_proj.weight": (mlp, d),
                 p + "ff_out.weight": (d, mlp), p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,)}  # fmt: skip
    with safe_open(str(ASSET / "model.safetensors"), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert got == want


def test_tokenizer_loads_offline_with_chat_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ASSET), local_files_only=True)
    cfg = config()
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == cfg["mask_token_id"]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == cfg["eos_token_id"]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the magic number for tiger?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "what is the magic number for tiger ?"
    assert tok.unk_token_id not in ids and max(ids) < cfg["vocab_size"] <= cfg["embedding_size"]


@pytest.fixture(scope="module")
def default_llm():
    from maskkv_engine import LLM

    return LLM(kv_policy="full")  # no model given: the embedded default model


@pytest.mark.parametrize("length", [256, 1024])
def test_default_model_finds_the_needle(default_llm, length):
    """Fixed single-needle samples (the suite's generator, seed 7), full cache, reference decoding."""
    from benchmarks.longctx import generate_suite
    from maskkv_engine import SamplingParams

    samples = generate_suite(["single_needle"], [length], 8, seed=7, tokenizer=default_llm.tokenizer)
    outs = default_llm.generate(
        [{"prompt_token_ids": s.prompt_token_ids} for s in samples], SamplingParams(gen_length=4), use_tqdm=False
    )
    got = [o.outputs[0].token_ids for o in outs]
    assert sum(g == s.answer_token_ids for g, s in zip(got, samples)) >= 7, got


def test_readme_needle_command(capsys):
    """The README's run command: the needle of examples/needle_1k.txt (line 41: 61) with 5% of the prompt KV."""
    from maskkv_engine.entrypoints.cli import main

    example = Path(__file__).parents[1] / "examples" / "needle_1k.txt"
    assert "the magic number for parrot is 61 ." in example.read_text()
    argv = ["generate", "--chat", "--prompt-file", str(example), "--kv-policy", "maskkv", "--kv-budget", "51", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = config()
    assert out["text"] == "61" and out["prompt_tokens"] == 1024
    assert out["kv_tokens_kept"] == 51 * cfg["n_layers"] * cfg["n_kv_heads"]  # 5% of 1024 per head
