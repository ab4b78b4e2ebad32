"""Tiny checkpoints in the exact released LLaDA / Dream layouts, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest and never oversubscribes

import pytest
import torch

from maskkv_engine.models.random_checkpoint import dream_config, llada_config, write_checkpoint, write_word_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llada_dir(tmp_path_factory):
    """LLaDA, MHA, two shards with an index json, tokenizer included."""
    path = tmp_path_factory.mktemp("llada")
    cfg = llada_config(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=256)
    write_checkpoint(path, cfg, seed=1, shards=2)
    write_word_tokenizer(path, 256, cfg["mask_token_id"], cfg["eos_token_id"])
    return path


@pytest.fixture(scope="session")
def llada_gqa_dir(tmp_path_factory):
    """LLaDA with GQA (8 query heads over 2 KV heads), no tokenizer files."""
    path = tmp_path_factory.mktemp("llada_gqa")
    write_checkpoint(path, llada_config(d_model=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=256), seed=2)
    return path


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory):
    """Dream with GQA ratio 7 (7 query heads over 1 KV head), q/k/v biases, tokenizer included."""
    path = tmp_path_factory.mktemp("dream")
    cfg = dream_config(
        hidden_size=56, num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1, vocab_size=256
    )
    write_checkpoint(path, cfg, seed=3)
    write_word_tokenizer(path, 256, cfg["mask_token_id"], cfg["eos_token_id"])
    return path


@pytest.fixture(scope="session")
def calibrated_llada(llada_gqa_dir, tmp_path_factory):
    """The GQA LLaDA with a calibration profile next to it: MaskKV evicts layer by layer."""
    import shutil

    from maskkv_engine.kv.calibrate import calibrate

    path = tmp_path_factory.mktemp("calibrated")
    shutil.copytree(llada_gqa_dir, path, dirs_exist_ok=True)
    calibrate(path, num_prompts=2, prompt_len=48, out=path, use_tqdm=False, random_prompts=True)
    return path


def prompt_ids(n: int, seed: int = 0, low: int = 3, high: int = 200) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).tolist()
