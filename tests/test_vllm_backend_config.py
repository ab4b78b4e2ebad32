"""backend='vllm' is validated before anything heavy happens (vLLM itself is tested in plugins/vllm_maskkv)."""

from __future__ import annotations

import pytest

from maskkv_engine import LLM


def test_unknown_backend_is_refused(llada_dir):
    with pytest.raises(ValueError, match="backend=.sglang. is not known"):
        LLM(str(llada_dir), kv_policy="none", backend="sglang")


def test_vllm_backend_without_the_plugin_says_what_to_install(llada_dir):
    """The core never imports the plugin: backend='vllm' is found through the entry point the plugin
    registers (its kv_policy checks are tested in plugins/vllm_maskkv)."""
    with pytest.raises(ValueError, match="pip install plugins/vllm_maskkv"):
        LLM(str(llada_dir), kv_policy="none", backend="vllm")
