"""Our LLaDA and Dream forwards against independent implementations, and the loader's errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskkv_engine.models.forward import full_forward_logits
from maskkv_engine.models.loader import load_model
from tests.conftest import prompt_ids
from tests.naive_llada import naive_llada_logits, read_weights


@pytest.mark.parametrize("fixture", ["llada_dir", "llada_gqa_dir"])
def test_llada_forward_matches_naive_float64(fixture, request):
    path = request.getfixturevalue(fixture)
    ids = prompt_ids(23, seed=5)
    expected = naive_llada_logits(path, ids)
    model64, _ = load_model(path, dtype="float64")
    got64 = full_forward_logits(model64, [ids])[0]
    assert (got64 - expected).abs().max() < 1e-5
    model32, _ = load_model(path, dtype="float32")
    got32 = full_forward_logits(model32, [ids])[0].double()
    assert (got32 - expected).abs().max() < 1e-3


def test_llada_is_bidirectional(llada_dir):
    model, _ = load_model(llada_dir)
    ids = prompt_ids(12, seed=1)
    changed = list(ids)
    changed[-1] = (changed[-1] + 1) % 200 + 3
    a, b = full_forward_logits(model, [ids, changed])
    assert not torch.allclose(a[0], b[0]), "a late token must change the first position's logits"


def test_dream_forward_matches_transformers_qwen2_bidirectional(dream_dir):
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((dream_dir / "config.json").read_text())
    qcfg = transformers.Qwen2Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        attn_implementation="eager",
    )
    hf = transformers.Qwen2ForCausalLM(qcfg).double().eval()
    missing, unexpected = hf.load_state_dict(read_weights(dream_dir), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = prompt_ids(19, seed=7)
    n = len(ids)
    full_mask = torch.ones(1, 1, n, n, dtype=torch.bool)  # every position sees every position
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), attention_mask=full_mask).logits[0]
        causal = hf(torch.tensor([ids])).logits[0]
    model, mcfg = load_model(dream_dir, dtype="float64")
    assert mcfg.logits_shift and mcfg.num_kv_heads == 1 and mcfg.group_size == 7
    got = full_forward_logits(model, [ids])[0]
    assert (got - expected).abs().max() < 1e-5  # transformers builds its rotary tables in float32
    assert (got - causal).abs().max() > 1e-3, "bidirectional attention must differ from causal"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_runs(llada_dir, dtype):
    model, _ = load_model(llada_dir, dtype=dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    logits = full_forward_logits(model, [prompt_ids(9)])[0]
    ref = full_forward_logits(load_model(llada_dir, dtype="float32")[0], [prompt_ids(9)])[0]
    assert torch.isfinite(logits).all()
    assert (logits.float() - ref).abs().max() < 0.5


def test_sharded_checkpoint_loads(llada_dir):
    assert (llada_dir / "model.safetensors.index.json").is_file()
    assert len(list(llada_dir.glob("model-*-of-*.safetensors"))) == 2
    load_model(llada_dir)


@pytest.fixture
def broken_copy(llada_gqa_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(llada_gqa_dir, dst)
    return dst


def test_unknown_architecture_is_refused(broken_copy):
    cfg = json.loads((broken_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (broken_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"architectures=\['GPT2LMHeadModel'\] is not supported.*LLaDAModelLM"):
        load_model(broken_copy)


def test_dispatch_is_on_architectures_not_model_type(broken_copy):
    cfg = json.loads((broken_copy / "config.json").read_text())
    cfg["model_type"] = "my-finetune"
    (broken_copy / "config.json").write_text(json.dumps(cfg))
    _, mcfg = load_model(broken_copy)
    assert mcfg.architecture == "LLaDAModelLM"


def test_missing_and_unexpected_weights_are_named(broken_copy):
    f = broken_copy / "model.safetensors"
    w = load_file(str(f))
    del w["model.transformer.blocks.1.k_proj.weight"]
    w["model.transformer.extra.weight"] = torch.zeros(2)
    save_file(w, str(f))
    with pytest.raises(ValueError, match=r"missing weights \['model.transformer.blocks.1.k_proj.weight'\].*unexpected"):
        load_model(broken_copy)


def test_mismatched_weight_shape_is_named(broken_copy):
    f = broken_copy / "model.safetensors"
    w = load_file(str(f))
    w["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(3, 3)
    save_file(w, str(f))
    with pytest.raises(ValueError, match=r"blocks.0.q_proj.weight has shape \(3, 3\).*expected \(64, 64\)"):
        load_model(broken_copy)


def test_unsupported_config_option_is_refused(broken_copy):
    cfg = json.loads((broken_copy / "config.json").read_text())
    cfg["alibi"] = True
    (broken_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="alibi=True is not supported"):
        load_model(broken_copy)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ValueError, match="is not a local directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path)


def test_bad_dtype(llada_dir):
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        load_model(llada_dir, dtype="int8")
