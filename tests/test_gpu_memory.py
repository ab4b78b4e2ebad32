"""The GPU pool sizing (engine/gpu_memory.py): its arithmetic with a fake device, its error, its profile pass."""

from __future__ import annotations

import pytest
import torch

from maskkv_engine.engine.gpu_memory import ACTIVATION_MARGIN, GPUMemory, pool_pages, profile_step

GIB = 2**30


def fake_device(free_gib: float, total_gib: float = 80, torch_reserved_gib: float = 20, weights_gib: float = 16):
    """An 80 GiB card as mem_get_info would report it once the weights are in and the profile has run."""
    return GPUMemory(
        total=int(total_gib * GIB),
        free=int(free_gib * GIB),
        torch_reserved=int(torch_reserved_gib * GIB),
        weights=int(weights_gib * GIB),
        activation=4 * GIB,
    )


def test_pool_is_what_the_utilization_leaves_after_context_weights_activations_and_refresh_caches():
    mem = fake_device(free_gib=59.5)  # 0.5 GiB outside torch (the CUDA context)
    assert mem.outside_torch == GIB // 2
    page = 2 * 2**20
    left = 80 * GIB * 0.9 - GIB // 2 - 16 * GIB - ACTIVATION_MARGIN * 4 * GIB - 1 * GIB
    assert pool_pages(mem, 0.9, GIB, page) == int(left // page)
    # torch's reserved-but-free blocks (a warm-up in the same process) are not charged to the pool
    assert pool_pages(fake_device(free_gib=39.5, torch_reserved_gib=40), 0.9, GIB, page) == int(left // page)
    # other processes are
    assert pool_pages(fake_device(free_gib=49.5), 0.9, GIB, page) == int((left - 10 * GIB) // page)


def test_a_reserve_that_does_not_fit_names_the_field_its_range_and_the_least_value():
    mem = fake_device(free_gib=59.5)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.2 .*at least 0\.2[0-9]+ \(allowed: \(0, 1\]\)"):
        pool_pages(mem, 0.2, 0, 2 * 2**20)
    huge = GPUMemory(total=80 * GIB, free=0, torch_reserved=80 * GIB, weights=70 * GIB, activation=20 * GIB)
    with pytest.raises(ValueError, match="does not fit this device even at 1.0"):
        pool_pages(huge, 1.0, 0, 2 * 2**20)


def test_the_profile_pass_runs_the_largest_step_shapes(llada_gqa_dir):
    from maskkv_engine.attention.torch_ref import TorchAttentionBackend
    from maskkv_engine.models.loader import load_model

    model, cfg = load_model(llada_gqa_dir, dtype="float32", load_format="dummy")
    profile_step(model, TorchAttentionBackend(), 96, 40, (cfg.num_kv_heads, cfg.head_dim), chunk_rows=32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_pool_and_a_step_fit_the_utilization(llada_gqa_dir):
    """The sized pool plus a generate's peak stays under utilization x total (the profile's whole point)."""
    from maskkv_engine import LLM, SamplingParams

    util = 0.5
    llm = LLM(llada_gqa_dir, load_format="dummy", kv_policy="full", gpu_memory_utilization=util, device="cuda")
    llm.generate({"prompt_token_ids": list(range(1, 200))}, SamplingParams(gen_length=32), use_tqdm=False)
    free, total = torch.cuda.mem_get_info()
    assert llm.llm_engine.block_manager.num_pages > 0
    assert torch.cuda.max_memory_allocated() <= util * total
