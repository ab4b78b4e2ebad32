"""Level 2 behind `vllm serve`: concurrent OpenAI completions decoded by the diffusion scheduler.

The server spawns its engine process, so the TEST-ONLY shim travels by ``sitecustomize`` on PYTHONPATH:
every Python process of the server imports it before vLLM.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import prompt_ids
from tests.level2.conftest import BLOCK, LEVEL2_MAX_MODEL_LEN, STEPS
from tests.server import post, vllm_server


def test_vllm_serve_decodes_concurrent_requests(tmp_path, llada_dir, reference):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import vllm_maskkv.cpu_triton_shim  # noqa: F401\n")
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p),
        "VLLM_USE_V2_MODEL_RUNNER": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    args = ["--model", str(llada_dir), "--skip-tokenizer-init", "--dtype", "float32", "--enforce-eager"]
    args += ["--max-model-len", str(LEVEL2_MAX_MODEL_LEN), "--max-num-batched-tokens", str(LEVEL2_MAX_MODEL_LEN)]
    args += ["--hf-overrides", json.dumps({"architectures": ["LLaDADiffusionLM"]})]
    args += ["--diffusion-config", json.dumps({"canvas_length": BLOCK, "max_denoising_steps": STEPS})]
    prompts = [prompt_ids(n, seed=60 + n) for n in (5, 11, 23)]
    with vllm_server(args, tmp_path / "server.log", env) as port:

        def complete(prompt: list[int]) -> list[int]:
            body = {"model": str(llada_dir), "prompt": prompt, "max_tokens": 2 * BLOCK, "ignore_eos": True}
            return post(port, "/v1/completions", {**body, "return_token_ids": True})["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            outputs = list(pool.map(complete, prompts))
    for prompt, out in zip(prompts, outputs):
        assert out == reference.generate(prompt, 2 * BLOCK, BLOCK, STEPS)
