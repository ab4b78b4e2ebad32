"""The GPU path at realistic shapes (``pytest -m cuda``; part 1 of ``python -m benchmarks.gpu_suite``).

Triton paged attention against the float64 reference and the torch backend at head_dim 128, 32 query
heads over 8 and 32 kv heads, page-multiple, ragged and zero kept lengths, in fp32 / bf16 / fp16;
xformers when it imports; batch invariance (kernel bitwise, engine greedy tokens) on the GPU.

Without CUDA every test skips, unless MASKKV_CUDA_DRY_RUN=1: then they run on the CPU at toy shapes
(triton in its interpreter), which is how the suite's --dry-run proves this file before a GPU sees it.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.test_attention_backends import Case, assert_batch_invariant, backend_or_skip

CUDA = torch.cuda.is_available()
DRY = not CUDA and os.environ.get("MASKKV_CUDA_DRY_RUN") == "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (CUDA or DRY), reason="needs a CUDA device (MASKKV_CUDA_DRY_RUN=1: toy shapes on the CPU)"),
]

# max |error| against float64: bugs (a wrong page, another head's rows) give errors of order 10 (the pool is
# filled with 50x garbage), rounding of long softmax sums in half precision stays well under these
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
if CUDA:  # (query heads, kv heads, head_dim, page size, longest kept run per head)
    SHAPES = [(32, 8, 128, 16, 4096), (32, 32, 128, 16, 1024)]
    SEQ_LENS = [32, 1, 32, 17, 64]  # response blocks: full, a single row, ragged
else:
    SHAPES = [(4, 2, 16, 4, 40), (4, 4, 16, 4, 24)]
    SEQ_LENS = [8, 1, 5]


def kept_lengths(n_seqs: int, n_kv: int, page_size: int, longest: int, seed: int) -> list[list[int]]:
    """Per-head kept lengths: ragged, exact page multiples, zero heads, a sequence with no cache, one longest run."""
    g = torch.Generator().manual_seed(seed)
    kept = torch.randint(0, longest, (n_seqs, n_kv), generator=g)
    kept.view(-1)[1::3] = kept.view(-1)[1::3] // page_size * page_size  # whole pages
    kept[0, 0] = 0  # one empty head
    kept[0, -1] = longest  # the longest run (several key tiles, many pages)
    kept[1] = 0  # a sequence holding no cache at all
    return kept.tolist()


def shape_id(s) -> str:
    return f"q{s[0]}kv{s[1]}d{s[2]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_triton_matches_the_reference(shape, dtype):
    """Triton and the torch backend both within tolerance of the float64 reference, on the same pages."""
    n_q, n_kv, d, page, longest = shape
    case = Case(SEQ_LENS, n_q, n_kv, d, page, kept_lengths(len(SEQ_LENS), n_kv, page, longest, n_kv), dtype)
    reference = case.reference()
    for name in ("triton", "torch"):
        err = (case.run(backend_or_skip(name)).double() - reference).abs().max().item()
        assert err < TOLERANCE[dtype], f"{name} {dtype} max error {err:.3g} (tolerance {TOLERANCE[dtype]})"


@pytest.mark.parametrize("shape", SHAPES[:1], ids=shape_id)
def test_xformers_matches_the_reference(shape):
    pytest.importorskip("xformers")
    n_q, n_kv, d, page, longest = shape
    case = Case(SEQ_LENS, n_q, n_kv, d, page, kept_lengths(len(SEQ_LENS), n_kv, page, longest, 7), torch.bfloat16)
    err = (case.run(backend_or_skip("xformers")).double() - case.reference()).abs().max().item()
    assert err < TOLERANCE[torch.bfloat16], f"xformers max error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_batch_invariance_is_bitwise(dtype):
    """Each sequence alone (its own table width and padding) gives the same bits as in the mixed batch."""
    n_q, n_kv, d, page, longest = SHAPES[0]
    case = Case(SEQ_LENS, n_q, n_kv, d, page, kept_lengths(len(SEQ_LENS), n_kv, page, longest, 11), dtype)
    assert_batch_invariant(backend_or_skip("triton"), case)


@pytest.mark.parametrize("policy", ["maskkv", "full"] if CUDA else ["maskkv"])
def test_engine_batch_invariance_greedy(llada_gqa_dir, policy):
    """Greedy tokens of each request alone equal its tokens in a mixed batch (other lengths, budgets), on the
    device with the triton backend: whatever the batch does to kernel choices must not change a token."""
    from maskkv_engine import LLM, SamplingParams
    from tests.conftest import prompt_ids

    llm = LLM(str(llada_gqa_dir), kv_policy=policy, attention_backend="triton", dtype="float32", device=str(DEVICE))
    lengths, gen = ((9, 70, 33), 16) if CUDA else ((9, 40), 8)  # the interpreter is slow: fewer steps on the CPU
    prompts = [{"prompt_token_ids": prompt_ids(n, seed=n)} for n in lengths]
    params = [
        SamplingParams(gen_length=gen, steps=gen, block_length=8, kv_budget=8, stop_at_eos=False),
        SamplingParams(gen_length=8, steps=8, kv_budget=24, stop_at_eos=False),
        SamplingParams(gen_length=gen, steps=gen // 2, block_length=gen, kv_budget=4, stop_at_eos=False),
    ][: len(lengths)]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert batched == alone
