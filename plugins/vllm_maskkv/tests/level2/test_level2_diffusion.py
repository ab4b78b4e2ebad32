"""Level 2: vLLM's own LLM decodes LLaDA on its diffusion scheduler, in continuous batches with paged KV."""

from __future__ import annotations

from maskkv_engine import LLM as MaskKVLLM
from maskkv_engine import SamplingParams
from tests.conftest import prompt_ids
from tests.level2.conftest import BLOCK, STEPS, generate


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def test_runs_on_vllms_diffusion_stack(protected_llm):
    core = _core(protected_llm)
    runner = core.model_executor.driver_worker.worker.model_runner
    assert type(core.scheduler).__name__ == "DiffusionScheduler"
    assert type(runner).__name__ == "CPUModelRunner"  # Model Runner V2 on the CPU
    assert type(runner.model_state).__name__ == "LLaDAModelState"
    assert type(runner.sampler).__name__ == "LLaDABlockSampler"
    assert protected_llm.llm_engine.model_config.is_diffusion


def test_concurrent_requests_equal_prefix_cache_reference(protected_llm, reference):
    prompts = [prompt_ids(n, seed=i) for i, n in enumerate([4, 7, 13, 22, 40])]  # + 24 tokens <= 64
    # per request (extra_args): (block = canvas width, steps per block), never above the served (8, 4)
    knobs = [(BLOCK, STEPS), (BLOCK, 3), (BLOCK, 1), (4, 2), (BLOCK, STEPS)]
    extra = [{"diffusion_canvas_length": b, "diffusion_max_steps": s} for b, s in knobs]
    outs = generate(protected_llm, prompts, gen_length=3 * BLOCK, extra=extra)
    for prompt, (block, steps), out in zip(prompts, knobs, outs):
        assert list(out.outputs[0].token_ids) == reference.generate(prompt, 3 * BLOCK, block, steps)


def test_canvas_cut_by_the_token_budget_is_recomputed(llada_dir, reference):
    """Twelve 8-token canvases against a 60-token step budget: the scheduler cuts some canvases short.
    A cut canvas must be computed again whole next step, never denoised half-seen."""
    from tests.level2.conftest import diffusion_llm

    llm = diffusion_llm(llada_dir, max_model_len=60, max_num_batched_tokens=60, max_num_seqs=12)
    prompts = [prompt_ids(5, seed=20 + i) for i in range(12)]
    outs = generate(llm, prompts, gen_length=2 * BLOCK)
    sampler = _core(llm).model_executor.driver_worker.worker.model_runner.sampler
    assert sampler.num_recomputed_canvases > 0, "the budget never cut a canvas: the test needs more requests"
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == reference.generate(prompt, 2 * BLOCK, BLOCK, STEPS)


def test_last_block_cut_by_max_model_len_is_shorter(protected_llm, reference):
    """50 prompt tokens + 16 asked > max_model_len 64: vLLM admits it and stops at 64; the last canvas holds
    the 6 positions that fit, and is decoded as a 6-token block."""
    prompt = prompt_ids(50, seed=1)
    out = generate(protected_llm, [prompt], gen_length=2 * BLOCK)[0].outputs[0]
    assert out.finish_reason == "length"
    assert list(out.token_ids) == reference.generate(prompt, 2 * BLOCK, BLOCK, STEPS, max_len=64)
    assert len(out.token_ids) == 64 - 50


def test_it_is_prefix_cache_decoding_not_the_exact_decoder(protected_llm, reference, llada_dir):
    """Documented semantics: the exact decoder recomputes the prompt against the masks every step; level 2
    does not, so its tokens generally differ (here on at least one of the prompts)."""
    exact = MaskKVLLM(str(llada_dir), kv_policy="none", max_model_len=64, skip_tokenizer_init=True)
    prompts = [prompt_ids(n, seed=40 + n) for n in (6, 12, 24)]
    sp = SamplingParams(gen_length=2 * BLOCK, block_length=BLOCK, steps=2 * STEPS, stop_at_eos=False)
    exact_out = [o.outputs[0].token_ids for o in exact.generate([{"prompt_token_ids": p} for p in prompts], sp)]
    level2 = [list(o.outputs[0].token_ids) for o in generate(protected_llm, prompts, gen_length=2 * BLOCK)]
    assert level2 == [reference.generate(p, 2 * BLOCK, BLOCK, STEPS) for p in prompts]
    assert level2 != exact_out


def test_reference_is_llada(reference, llada_dir):
    """With one segment the reference is a plain bidirectional LLaDA forward (maskkv-engine's model); with
    two, the first segment's logits are those of the first segment alone (it never sees what follows)."""
    from maskkv_engine.models.forward import full_forward_logits
    from maskkv_engine.models.loader import load_model

    ours, _ = load_model(llada_dir, dtype="float32")
    seq = prompt_ids(40, seed=9)
    full, head = full_forward_logits(ours, [seq, seq[:20]])
    assert (reference.logits(seq, [0] * 40) - full).abs().max().item() < 1e-4
    assert (reference.logits(seq, [0] * 20 + [1] * 20)[:20] - head).abs().max().item() < 1e-4
    assert (full[:20] - head).abs().max().item() > 1e-3
