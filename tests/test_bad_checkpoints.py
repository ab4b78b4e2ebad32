"""Every way a checkpoint directory can be broken ends in one CheckpointError whose message starts with
the file at fault and names the field or tensor: from ``LLM(...)`` in-process, and from ``maskkv
generate`` as one stderr line with exit code 2 (a few cases: each is a fresh Python process)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskkv_engine import LLM
from maskkv_engine.kv.base import ModelStats
from maskkv_engine.kv.profile import PROFILE_FILE, save_profile
from maskkv_engine.models.config import DiffusionLMConfig
from maskkv_engine.models.errors import CheckpointError
from maskkv_engine.models.loader import load_config
from maskkv_engine.models.random_checkpoint import dream_config, llada_config, write_checkpoint, write_word_tokenizer

ROOT = Path(__file__).parents[1]
VOCAB = 64
INDEX = "model.safetensors.index.json"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
Q0 = "model.transformer.blocks.0.q_proj.weight"


def _write_good(path: Path, cfg: dict, shards: int) -> Path:
    write_checkpoint(path, cfg, seed=0, shards=shards)
    write_word_tokenizer(path, VOCAB, cfg["mask_token_id"], cfg["eos_token_id"])
    parsed = load_config(path)
    layers, heads = parsed.num_layers, parsed.num_kv_heads
    stats = ModelStats(torch.full((layers,), 0.5), torch.full((layers, heads), 0.5))
    save_profile(path, stats, parsed)
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """Tiny, valid checkpoints: LLaDA in one file, LLaDA in two shards with an index, Dream; each with a
    tokenizer and a calibration profile, so that every file the loader reads is present."""
    base = tmp_path_factory.mktemp("good")
    llada = llada_config(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64, vocab_size=VOCAB)
    dream = dream_config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
    )
    return {
        "llada": _write_good(base / "llada", llada, shards=1),
        "sharded": _write_good(base / "sharded", llada, shards=2),
        "dream": _write_good(base / "dream", dream, shards=1),
    }


def _copy(good: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(good[kind], dst, symlinks=True)
    return dst


# ---- ways to break a checkpoint: each edits a copy and returns nothing ---------------------------------------
def set_config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for key, value in changes.items():
            if value is _DROP:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


_DROP = object()


def write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())

    return edit


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) - keep])

    return edit


def huge_header(name: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(struct.pack("<Q", 1 << 62) + data[8:])

    return edit


def edit_tensors(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        tensors = load_file(str(d / name))
        change(tensors)
        save_file(tensors, str(d / name), metadata={"format": "pt"})

    return edit


def set_tensor(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(t: dict) -> None:
        t[key] = fn(t[key])

    return change


def poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[3] = value
        return t

    return fn


def set_index(weight_map) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = json.loads((d / INDEX).read_text())
        if weight_map is _DROP:
            data.pop("weight_map")
        elif callable(weight_map):
            data["weight_map"] = weight_map(data["weight_map"])
        else:
            data["weight_map"] = weight_map
        (d / INDEX).write_text(json.dumps(data))

    return edit


def index_outside(d: Path) -> None:
    """The index names a shard one folder up (a real, loadable file there): must be refused, not read."""
    outside = d.parent / "stolen.safetensors"
    shutil.copy(d / SHARD2, outside)
    set_index(lambda m: {k: ("../stolen.safetensors" if v == SHARD2 else v) for k, v in m.items()})(d)


def symlink_outside(d: Path) -> None:
    """A shard that is a symlink to a file outside the model folder: the same refusal."""
    outside = d.parent / "elsewhere.safetensors"
    shutil.move(d / SHARD2, outside)
    os.symlink(outside, d / SHARD2)


def duplicate_tensor(d: Path) -> None:
    first = load_file(str(d / SHARD1))
    name = next(iter(first))
    edit_tensors(SHARD2, lambda t: t.update({name: first[name]}))(d)


def set_profile(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = json.loads((d / PROFILE_FILE).read_text())
        for key, value in changes.items():
            if value is _DROP:
                data.pop(key)
            else:
                data[key] = value
        (d / PROFILE_FILE).write_text(json.dumps(data))

    return edit


# (id, base checkpoint, how to break it, the file the error must start with, what the message must name)
# fmt: off
CASES = [
    ("config-not-json", "llada", write("config.json", "{not json"), "config.json", "not valid JSON"),
    ("config-binary", "llada", write("config.json", b"\xff\xfe\x00garbage"), "config.json", "not valid JSON"),
    ("config-not-object", "llada", write("config.json", "[1, 2]"), "config.json", "JSON object"),
    ("d_model-string", "llada", set_config(d_model="abc"), "config.json", "d_model='abc'"),
    ("d_model-missing", "llada", set_config(d_model=_DROP), "config.json", "d_model is missing"),
    ("d_model-null", "llada", set_config(d_model=None), "config.json", "d_model is missing"),
    ("d_model-float", "llada", set_config(d_model=32.5), "config.json", "d_model=32.5"),
    ("n_heads-zero", "llada", set_config(n_heads=0), "config.json", "n_heads=0"),
    ("n_kv_heads-zero", "llada", set_config(n_kv_heads=0), "config.json", "n_kv_heads=0"),
    ("n_kv_heads-not-divisor", "llada", set_config(n_kv_heads=3), "config.json", "n_kv_heads=3"),
    ("n_layers-negative", "llada", set_config(n_layers=-1), "config.json", "n_layers=-1"),
    ("n_layers-bool", "llada", set_config(n_layers=True), "config.json", "n_layers=True"),
    ("embedding_size-zero", "llada", set_config(embedding_size=0), "config.json", "embedding_size=0"),
    ("vocab-missing", "llada", set_config(embedding_size=_DROP, vocab_size=_DROP), "config.json", "vocab_size"),
    ("mlp-zero", "llada", set_config(mlp_hidden_size=0), "config.json", "mlp_hidden_size=0"),
    ("heads-do-not-divide", "llada", set_config(d_model=30), "config.json", "d_model=30 must be a multiple of n_heads"),
    ("head_dim-odd", "llada", set_config(d_model=36), "config.json", "head_dim=9"),
    ("mask-outside-vocab", "llada", set_config(mask_token_id=VOCAB), "config.json", f"mask_token_id={VOCAB}"),
    ("mask-negative", "llada", set_config(mask_token_id=-1), "config.json", "mask_token_id=-1"),
    ("mask-default-outside-vocab", "llada", set_config(mask_token_id=_DROP), "config.json", "mask_token_id=126336"),
    ("eos-outside-vocab", "llada", set_config(eos_token_id=[3, 999]), "config.json", "eos_token_id=[999]"),
    ("eos-string", "llada", set_config(eos_token_id="</s>"), "config.json", "eos_token_id='</s>'"),
    ("torch_dtype-int8", "llada", set_config(torch_dtype="int8"), "config.json", "torch_dtype='int8'"),
    ("bool-as-string", "llada", set_config(weight_tying="false"), "config.json", "weight_tying='false'"),
    ("rope_theta-zero", "llada", set_config(rope_theta=0), "config.json", "rope_theta=0"),
    ("architectures-missing", "llada", set_config(architectures=_DROP), "config.json", "architectures is missing"),
    ("architectures-string", "llada", set_config(architectures="GPT2"), "config.json", "architectures"),
    ("dream-kv-heads-zero", "dream", set_config(num_key_value_heads=0), "config.json", "num_key_value_heads=0"),
    ("dream-hidden-string", "dream", set_config(hidden_size="abc"), "config.json", "hidden_size='abc'"),
    ("dream-vocab-null", "dream", set_config(vocab_size=None), "config.json", "vocab_size is missing"),
    ("dream-eos-outside", "dream", set_config(eos_token_id=VOCAB + 5), "config.json", f"eos_token_id=[{VOCAB + 5}]"),
    ("safetensors-empty", "llada", write("model.safetensors", b""), "model.safetensors", "safetensors"),
    ("safetensors-truncated", "llada", truncate("model.safetensors", 100), "model.safetensors", "safetensors"),
    ("safetensors-garbage", "llada", write("model.safetensors", b"garbage" * 50), "model.safetensors", "safetensors"),
    ("safetensors-huge-header", "llada", huge_header("model.safetensors"), "model.safetensors", "header"),
    ("shard-truncated", "sharded", truncate(SHARD2, 10), SHARD2, "safetensors"),
    ("index-not-json", "sharded", write(INDEX, "{"), INDEX, "not valid JSON"),
    ("index-no-weight_map", "sharded", set_index(_DROP), INDEX, "weight_map=None"),
    ("index-weight_map-list", "sharded", set_index([SHARD1]), INDEX, "weight_map="),
    ("index-shard-missing", "sharded", set_index(lambda m: dict(m, x="gone.safetensors")), INDEX, "gone.safetensors"),
    ("index-outside-dir", "sharded", index_outside, INDEX, "'../stolen.safetensors' resolves to"),
    ("index-absolute-path", "sharded", set_index(lambda m: dict(m, x="/etc/hostname")), INDEX, "outside the model"),
    ("symlink-outside-dir", "sharded", symlink_outside, INDEX, "outside the model directory"),
    ("tensor-in-two-shards", "sharded", duplicate_tensor, SHARD2, "is also in"),
    ("tensor-int8", "llada", edit_tensors("model.safetensors", set_tensor(Q0, lambda t: t.to(torch.int8))),
     "model.safetensors", f"{Q0} is stored as I8"),
    ("tensor-wrong-shape", "llada", edit_tensors("model.safetensors", set_tensor(Q0, lambda t: t[:3])),
     "model.safetensors", f"{Q0} has shape (3, 32), expected (32, 32)"),
    ("tensor-missing", "llada", edit_tensors("model.safetensors", lambda t: t.pop(Q0)),
     "model.safetensors", f"missing weights ['{Q0}']"),
    ("tensor-unexpected", "llada", edit_tensors("model.safetensors", lambda t: t.update(extra=torch.zeros(2))),
     "model.safetensors", "unexpected weights ['extra']"),
    ("tensor-missing-sharded", "sharded", edit_tensors(SHARD1, lambda t: t.pop("model.transformer.wte.weight")),
     INDEX, "missing weights ['model.transformer.wte.weight']"),
    ("tensor-nan", "llada", edit_tensors("model.safetensors", set_tensor(Q0, poison(float("nan")))),
     "model.safetensors", f"{Q0} holds NaN or Inf"),
    ("tensor-inf", "llada", edit_tensors("model.safetensors", set_tensor("model.transformer.ln_f.weight",
     poison(float("inf")))), "model.safetensors", "ln_f.weight holds NaN or Inf"),
    ("tokenizer-json-corrupt", "llada", write("tokenizer.json", '{"version": '), "tokenizer.json", "not valid JSON"),
    ("tokenizer-json-not-a-tokenizer", "llada", write("tokenizer.json", "{}"), "tokenizer.json", "tokenizer"),
    ("tokenizer-config-corrupt", "llada", write("tokenizer_config.json", "{,}"), "tokenizer_config.json", "JSON"),
    ("profile-not-json", "llada", write(PROFILE_FILE, "nope"), PROFILE_FILE, "not valid JSON"),
    ("profile-wrong-shape", "llada", set_profile(prompt_preference=[[0.5]] * 2), PROFILE_FILE,
     "prompt_preference is for (2, 1)"),
    ("profile-wrong-layers", "llada", set_profile(layer_importance=[0.5] * 5), PROFILE_FILE,
     "layer_importance is for (5,)"),
    ("profile-missing-field", "llada", set_profile(layer_importance=_DROP), PROFILE_FILE, "layer_importance is missing"),
    ("profile-ragged", "llada", set_profile(prompt_preference=[[0.5, 0.5], [0.5]]), PROFILE_FILE, "prompt_preference"),
    ("profile-strings", "llada", set_profile(layer_importance=["a", "b"]), PROFILE_FILE, "layer_importance"),
    ("profile-nan", "llada", set_profile(layer_importance=[float("nan"), 0.5]), PROFILE_FILE, "finite"),
]
# fmt: on


@pytest.mark.parametrize(("base", "breaker", "file", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_named(good, tmp_path, base, breaker, file, needle):
    d = _copy(good, base, tmp_path)
    breaker(d)
    with pytest.raises(CheckpointError) as info:
        LLM(str(d), kv_policy="maskkv", device="cpu")
    message = str(info.value)
    assert message.startswith(str(d / file) + ": "), message
    assert needle in message, message
    assert "\n" not in message


@pytest.mark.parametrize("base", ["llada", "sharded", "dream"])
def test_good_checkpoints_load(good, base):
    """The fixture itself is valid: every failure above comes from the one thing broken."""
    llm = LLM(str(good[base]), kv_policy="maskkv", device="cpu")
    assert llm.llm_engine.planner.profile is not None and llm.tokenizer is not None


def test_huggingface_cache_snapshot_links_are_allowed(good, tmp_path):
    """A hub snapshot's files are symlinks into the repo's blobs/ folder: that is not 'outside'."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in good["sharded"].iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    llm = LLM(str(snapshot), kv_policy="full", device="cpu")
    assert llm.llm_engine.model_config.num_layers == 2


def test_config_errors_name_the_key_of_the_file(good):
    """Programmatic configs name their own fields; a loaded one names the key spelled in config.json."""
    with pytest.raises(ValueError, match="num_kv_heads=0 must be an integer >= 1"):
        DiffusionLMConfig("x", 64, 32, 2, 4, 0, 8, 64, 1e4, 1e-5, 128, 1, (2,))
    assert load_config(good["llada"]).key("num_kv_heads") == "n_kv_heads"
    assert load_config(good["dream"]).key("num_kv_heads") == "num_key_value_heads"


def test_fp16_overflow_is_named_as_a_conversion(good, tmp_path):
    """Finite in the file, infinite once cast: the error says the cast did it."""
    d = _copy(good, "llada", tmp_path)
    edit_tensors("model.safetensors", set_tensor(Q0, poison(1e6)))(d)
    LLM(str(d), kv_policy="full", device="cpu", dtype="float32")  # fine in float32
    with pytest.raises(CheckpointError, match=f"{Q0} holds NaN or Inf values after conversion to float16"):
        LLM(str(d), kv_policy="full", device="cpu", dtype="float16")


# ---- the same through the CLI: one stderr line, exit code 2, no traceback ----------------------------------
CLI_CASES = [
    "config-not-json",
    "n_kv_heads-zero",
    "mask-outside-vocab",
    "safetensors-truncated",
    "index-outside-dir",
    "tensor-int8",
    "tensor-nan",
    "tokenizer-json-corrupt",
    "profile-wrong-shape",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_checkpoint_through_the_cli(good, tmp_path, case):
    _, base, breaker, file, needle = next(c for c in CASES if c[0] == case)
    d = _copy(good, base, tmp_path)
    breaker(d)
    cmd = [sys.executable, "-m", "maskkv_engine.entrypoints.cli", "generate", "--model", str(d), "--prompt", "w1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"maskkv generate: error: {d / file}: ") and needle in lines[0], lines[0]
