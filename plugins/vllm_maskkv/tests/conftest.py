"""Tiny LLaDA / Dream checkpoints in the released layouts, and the environment vLLM needs on a small CPU box.

head_dim is 32 everywhere: vLLM's CPU attention kernel supports head sizes from 32 up, not 16.
Level-2 tests (tests/level2) need the Triton-interpreter shim imported before vLLM, so they run in
their own process: ``pytest tests`` leaves them out, ``pytest tests/level2`` runs them (ci.sh runs both).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV; otherwise sized from a fraction of RAM
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: 12 s per test process, not 30

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from maskkv_engine.models.random_checkpoint import dream_config, llada_config, write_checkpoint  # noqa: E402

MAX_MODEL_LEN = 256


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name == "level2" and not any("level2" in str(a) for a in config.args):
        return True
    return None


def pytest_report_header(config: pytest.Config) -> str:
    return "vllm_maskkv: tests/level2 (Triton-interpreter shim) runs in its own process: pytest tests/level2"


def write_test_checkpoint(path: Path, config: dict, seed: int, shards: int = 1, attention_scale: float = 3.0) -> Path:
    """A random checkpoint in the released layout, with q/k projections scaled up.

    Random weights give near-uniform attention, and then every [MASK] position predicts the same token
    whatever the context: decoding tests would compare constant outputs. Sharper attention makes the
    canvas depend on its context, so that a wrong KV shows up in the tokens.
    """
    write_checkpoint(path, config, seed=seed, shards=shards)
    for f in sorted(path.glob("*.safetensors")):
        weights = load_file(str(f))
        for name in weights:
            if any(k in name for k in ("q_proj.", "k_proj.")):
                weights[name] = weights[name] * attention_scale
        save_file(weights, str(f), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def llada_dir(tmp_path_factory) -> Path:
    """LLaDA with GQA (4 query heads over 2 KV heads, head_dim 32), two shards with an index json."""
    path = tmp_path_factory.mktemp("llada")
    cfg = llada_config(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=256, vocab_size=256)
    return write_test_checkpoint(path, cfg, seed=1, shards=2)


@pytest.fixture(scope="session")
def llada_tied_dir(tmp_path_factory) -> Path:
    """LLaDA with weight_tying (no top-level ff_out: the LM head is the embedding)."""
    path = tmp_path_factory.mktemp("llada_tied")
    cfg = llada_config(d_model=64, n_layers=2, n_heads=2, vocab_size=256, weight_tying=True)
    return write_test_checkpoint(path, cfg, seed=4)


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory) -> Path:
    """Dream with GQA (2 query heads over 1 KV head, head_dim 32) and q/k/v biases."""
    path = tmp_path_factory.mktemp("dream")
    cfg = dream_config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=256
    )
    return write_test_checkpoint(path, cfg, seed=3)


def prompt_ids(n: int, seed: int = 0, low: int = 3, high: int = 200) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).tolist()


def pooling_llm(path: Path):
    """vLLM's own LLM on the pooling runner: what a vLLM user writes for level 1."""
    from vllm import LLM

    return LLM(
        model=str(path),
        runner="pooling",
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_MODEL_LEN,
        seed=0,
    )


def shutdown_vllm(llm) -> None:
    """Shut vLLM's in-process engine down before the next one is built (see VLLMModelRunner.shutdown)."""
    llm.llm_engine.engine_core.shutdown()


def encode_logits(llm, sequences: list[list[int]]) -> list[torch.Tensor]:
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=s) for s in sequences]
    return [o.outputs.data for o in llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)]
