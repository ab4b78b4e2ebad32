"""backend='vllm' is validated before anything heavy happens (vLLM itself is tested in plugins/vllm_maskkv)."""

from __future__ import annotations

import sys

import pytest

from maskkv_engine import LLM


def test_unknown_backend_is_refused(llada_dir):
    with pytest.raises(ValueError, match="backend='sglang' is not supported"):
        LLM(str(llada_dir), kv_policy="none", backend="sglang")


def test_vllm_backend_refuses_kv_policies(llada_dir):
    with pytest.raises(ValueError, match="kv_policy='full' is not available"):
        LLM(str(llada_dir), kv_policy="full", backend="vllm")


def test_vllm_backend_without_vllm_says_what_to_install(llada_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm_maskkv.engine_runner", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install plugins/vllm_maskkv"):
        LLM(str(llada_dir), kv_policy="none", backend="vllm")
