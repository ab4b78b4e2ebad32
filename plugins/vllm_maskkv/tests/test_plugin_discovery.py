"""The entry point is what makes vLLM know our architectures, in every process it spawns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points

import torch

from maskkv_engine.models.forward import full_forward_logits
from maskkv_engine.models.loader import load_model
from tests.conftest import MAX_MODEL_LEN, prompt_ids
from tests.server import post, vllm_server

OFFLINE = f"""
from vllm import LLM
if __name__ == "__main__":
    LLM(model={{path!r}}, runner="pooling", skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        max_model_len={MAX_MODEL_LEN}, max_num_batched_tokens={MAX_MODEL_LEN})
"""


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("maskkv") == "vllm_maskkv:register"


def test_maskkv_engine_finds_the_runner_through_its_entry_point(llada_dir):
    """maskkv-engine never imports the plugin: backend='vllm' is the runner this package registers."""
    import pytest

    from maskkv_engine import LLM

    eps = {ep.name: ep.value for ep in entry_points(group="maskkv_engine.model_runners")}
    assert eps.get("vllm") == "vllm_maskkv.engine_runner:build_runner"
    with pytest.raises(ValueError, match="kv_policy='full' is not available"):
        LLM(str(llada_dir), kv_policy="full", backend="vllm")  # refused before vLLM starts


def test_served_model_runs_in_vllm_spawned_processes(tmp_path, llada_dir):
    """`vllm serve` (multiprocess: API server, engine core, worker) on the pooling runner. The model is built
    in a spawned process, which knows LLaDA only if vLLM loaded our entry point there."""
    seq = prompt_ids(12, seed=3)
    args = ["--model", str(llada_dir), "--runner", "pooling", "--skip-tokenizer-init", "--dtype", "float32"]
    args += ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(MAX_MODEL_LEN)]
    log = tmp_path / "server.log"
    with vllm_server(args, log) as port:
        body = {"model": str(llada_dir), "input": seq, "task": "token_classify"}
        got = torch.tensor(post(port, "/pooling", body)["data"][0]["data"])
    ours, _ = load_model(llada_dir, dtype="float32")
    assert (got - full_forward_logits(ours, [seq])[0]).abs().max().item() < 1e-4
    roles = set(re.findall(r"\((\S+) pid=\d+\) INFO .* maskkv plugin registered", log.read_text()))
    assert {"EngineCore", "VllmWorker-0"} <= roles, f"register() ran in: {roles}"


def test_without_the_plugin_vllm_cannot_load_the_checkpoint(tmp_path, llada_dir):
    """Control: with vLLM's plugins disabled, LLaDA does not load (nothing else registers it)."""
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE.format(path=str(llada_dir)))
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "llada" in proc.stderr.lower()
