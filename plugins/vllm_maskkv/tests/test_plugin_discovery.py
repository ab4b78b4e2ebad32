"""The entry point is what makes vLLM know our architectures, in every process it spawns."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import torch

from maskkv_engine.models.forward import full_forward_logits
from maskkv_engine.models.loader import load_model
from tests.conftest import MAX_MODEL_LEN, prompt_ids

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    if __name__ == "__main__":  # vLLM spawns processes: the guard is required
        path, seq, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
        llm = LLM(model=path, runner="pooling", skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                  max_model_len={max_len}, max_num_batched_tokens={max_len}, seed=0)
        res = llm.encode([TokensPrompt(prompt_token_ids=seq)], pooling_task="token_classify", use_tqdm=False)
        json.dump({{"pid": os.getpid(), "logits": res[0].outputs.data.tolist()}}, open(out, "w"))
    """
).format(max_len=MAX_MODEL_LEN)


def _run(tmp_path, model_dir, seq, **env):
    script = tmp_path / "run_vllm.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    full_env = {**os.environ, **env}
    proc = subprocess.run(
        [sys.executable, str(script), str(model_dir), json.dumps(seq), str(out)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("maskkv") == "vllm_maskkv:register"


def test_plugin_runs_in_vllm_spawned_processes(tmp_path, llada_dir):
    """Default multiprocess engine: the model is built in the engine-core process, which imports nothing of
    ours unless vLLM loads the entry point there."""
    seq = prompt_ids(12, seed=3)
    proc, out = _run(tmp_path, llada_dir, seq, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    pids = {int(p) for p in re.findall(r"maskkv plugin registered .* \(pid (\d+)\)", proc.stdout + proc.stderr)}
    spawned = pids - {result["pid"]}
    assert len(spawned) >= 2, f"register() should run in the engine-core and worker processes: {pids}"
    ours, _ = load_model(llada_dir, dtype="float32")
    want = full_forward_logits(ours, [seq])[0]
    assert (torch.tensor(result["logits"]) - want).abs().max().item() < 1e-4


def test_without_the_plugin_vllm_cannot_load_the_checkpoint(tmp_path, llada_dir):
    """Control for the test above: with plugins disabled, the same script fails (nothing else registers LLaDA)."""
    proc, _ = _run(tmp_path, llada_dir, prompt_ids(4), VLLM_PLUGINS="", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert proc.returncode != 0
    assert "llada" in proc.stderr.lower()
