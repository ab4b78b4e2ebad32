"""AsyncLLMEngine: concurrent callers share one batch, get LLM's exact outputs, and cancelling frees pages."""

from __future__ import annotations

import asyncio

import pytest

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine, QueueFullError
from maskkv_engine.entrypoints.openai.settled import SettledText
from tests.conftest import prompt_ids


@pytest.fixture(scope="module")
def llm(llada_dir):
    return LLM(str(llada_dir), kv_policy="full")


def make_engine(llada_dir, kv_policy: str = "full", **kw) -> AsyncLLMEngine:
    if kv_policy == "maskkv":
        kw.setdefault("kv_budget", 8)
    return AsyncLLMEngine.from_engine_args(str(llada_dir), kv_policy=kv_policy, **kw)


def params(i: int) -> SamplingParams:
    return SamplingParams(gen_length=16, steps=8, block_length=8, temperature=1.0, seed=100 + i)


async def collect(engine: AsyncLLMEngine, prompt, sp, rid):
    outs = [o async for o in engine.generate(prompt, sp, rid)]
    return outs


def test_concurrent_callers_share_the_batch_and_match_llm(llada_dir, llm):
    prompts = [{"prompt_token_ids": prompt_ids(n, seed=n)} for n in (5, 23, 40, 9)]
    expected = llm.generate(prompts, [params(i) for i in range(4)], use_tqdm=False)

    async def main():
        engine = make_engine(llada_dir)
        batch_sizes = []
        engine.step_listeners.append(lambda s: batch_sizes.append(s.num_requests))
        results = await asyncio.gather(*(collect(engine, p, params(i), f"r{i}") for i, p in enumerate(prompts)))
        await engine.shutdown()
        return results, batch_sizes

    results, batch_sizes = asyncio.run(main())
    assert max(batch_sizes) == 4  # one batch, not four engines taking turns
    for outs, exp in zip(results, expected):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].token_ids == exp.outputs[0].token_ids
        assert outs[-1].outputs[0].text == exp.outputs[0].text
        # intermediate outputs show the canvas with its masks
        assert outs[0].canvas_token_ids is not None and "[MASK]" in outs[0].canvas_text


@pytest.mark.parametrize("kv_policy", ["full", "maskkv"])
def test_cancelling_a_caller_aborts_and_frees_its_pages_at_once(llada_dir, kv_policy):
    async def main():
        engine = make_engine(llada_dir, kv_policy)
        bm = engine.engine.block_manager
        long = SamplingParams(gen_length=128, steps=128)
        other = asyncio.ensure_future(collect(engine, {"prompt_token_ids": prompt_ids(30, 1)}, long, "other"))
        seen = 0

        async def victim():
            nonlocal seen
            async for _ in engine.generate({"prompt_token_ids": prompt_ids(50, 2)}, long, "victim"):
                seen += 1

        task = asyncio.ensure_future(victim())
        while seen < 3:
            await asyncio.sleep(0.001)
        assert bm.request_pages("victim") > 0
        task.cancel()
        # freed before the next step completes: the other request is still mid-denoising
        for _ in range(200):
            if not bm.has_request("victim"):
                break
            await asyncio.sleep(0.005)
        assert not bm.has_request("victim") and engine.engine.scheduler.find("victim") is None
        assert not other.done()
        outs = await other
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason in ("stop", "length")
        assert bm.num_used_pages == 0 and bm.num_reserved_pages == 0
        await engine.shutdown()

    asyncio.run(main())


def test_bad_requests_raise_at_add_and_queue_limit(llada_dir):
    async def main():
        engine = make_engine(llada_dir, max_num_seqs=1, max_queue_len=1)
        with pytest.raises(ValueError, match="exceeds max_model_len"):
            await engine.add_request("big", {"prompt_token_ids": [5] * 5000}, SamplingParams(gen_length=4))
        long = SamplingParams(gen_length=512, steps=512)
        running = await engine.add_request("a", {"prompt_token_ids": [5, 6]}, long)
        await anext(running)  # admitted and stepping
        waiting = await engine.add_request("b", {"prompt_token_ids": [5, 6]}, SamplingParams(gen_length=4))
        assert engine.num_waiting == 1
        with pytest.raises(QueueFullError):
            await engine.add_request("c", {"prompt_token_ids": [5, 6]}, SamplingParams(gen_length=4))
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_request("a", {"prompt_token_ids": [5, 6]}, SamplingParams(gen_length=4))
        engine.abort("a")
        outs = [o async for o in waiting]
        assert outs[-1].finished
        assert engine.engine.block_manager.num_used_pages == 0
        await engine.shutdown()

    asyncio.run(main())


class _WordTokenizer:
    """decode joins words with spaces, like the word-level test tokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids if i != 99)


def test_settled_text_is_the_committed_prefix_cut_at_eos():
    mask, eos = 0, 99
    s = SettledText(_WordTokenizer(), mask, [eos], stop_at_eos=True)
    assert s.update([mask, 5, 6, mask]) == ""  # committed tokens after a mask are not settled yet
    assert s.update([4, 5, 6, mask]) == "w4 w5 w6"
    assert s.update([4, 5, 6, mask]) == ""
    assert s.update([4, 5, 6, 7, eos, 8]) == " w7"  # cut at EOS: 8 is never shown
    assert s.finish("w4 w5 w6 w7") == ""
    assert s.sent == "w4 w5 w6 w7"
    keep = SettledText(_WordTokenizer(), mask, [eos], stop_at_eos=False)
    assert keep.update([4, eos, 8, mask]) == "w4 w8"
    assert keep.finish("w4 w8 w9") == " w9"
