"""Continuous batching: batch invariance under the scheduler, abort, admission, limits, metrics."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from maskkv_engine import LLM, SamplingParams
from tests.conftest import prompt_ids


@pytest.fixture(scope="module")
def model_dir(calibrated_llada):
    return calibrated_llada


def mixed_requests(n: int, seed: int, temperature: float):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        gen = rng.choice([8, 16, 24])
        block = rng.choice([b for b in (4, 8, gen) if gen % b == 0])
        steps = rng.choice([s for s in (gen, gen // 2) if s % (gen // block) == 0])
        sp = SamplingParams(
            gen_length=gen,
            block_length=block,
            steps=steps,
            temperature=temperature,
            seed=1000 + i if temperature > 0 else None,
            kv_budget=rng.choice([None, 2, 4, 8, 16, 64]),
            stop_at_eos=rng.random() < 0.5,
        )
        reqs.append(({"prompt_token_ids": prompt_ids(rng.randint(3, 150), seed=seed * 100 + i)}, sp))
    return reqs


@pytest.mark.parametrize("policy", ["maskkv", "adakv", "none"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batch_invariance_under_the_scheduler(model_dir, policy, temperature):
    """50 requests with mixed budgets, lengths, schedules and arrival times: each gets the tokens it
    gets alone."""
    llm = LLM(str(model_dir), kv_policy=policy, kv_budget=8, max_num_seqs=16, max_num_batched_tokens=1024)
    eng = llm.llm_engine
    reqs = mixed_requests(50, seed=7, temperature=temperature)
    pending = list(enumerate(reqs))
    results = {}
    step = 0
    while pending or eng.has_unfinished_requests():
        for _ in range(3 if step % 2 == 0 else 0):  # requests arrive while others are mid-flight
            if pending:
                i, (prompt, sp) = pending.pop(0)
                eng.add_request(f"r{i}", prompt, sp)
        for out in eng.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
        assert len(eng.scheduler.running) <= 16
    assert len(results) == 50
    assert eng.block_manager is None or eng.block_manager.num_used_pages == 0
    for i, (prompt, sp) in enumerate(reqs):
        alone = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
        assert alone == results[f"r{i}"], f"request {i} differs when batched"


def test_abort_mid_flight_frees_every_page_at_once(model_dir):
    eng = LLM(str(model_dir), kv_policy="full").llm_engine
    bm = eng.block_manager
    sp = SamplingParams(gen_length=16, steps=16, block_length=8, stop_at_eos=False)
    for i in range(4):
        eng.add_request(f"a{i}", {"prompt_token_ids": prompt_ids(40 + 10 * i, seed=i)}, sp)
    eng.step()
    eng.step()
    held = {rid: bm.request_pages(rid) for rid in bm.live_requests}
    assert all(n > 0 for n in held.values()) and len(held) == 4
    assert eng.abort_request("a1") and eng.abort_request("a2")
    assert bm.num_used_pages == held["a0"] + held["a3"]
    assert not eng.abort_request("a1"), "a second abort is a no-op"
    assert not eng.abort_request("unknown")
    bm.check_invariants()
    done = {o.request_id for o in eng.run_to_completion()}
    assert done == {"a0", "a3"} and bm.num_used_pages == 0 and bm.num_reserved_pages == 0


def test_admission_waits_for_pages_and_loses_nothing(model_dir):
    # room for about two requests' pages at a time
    llm = LLM(str(model_dir), kv_policy="full", num_pages=3 * 2 * 7)
    eng = llm.llm_engine
    sp = SamplingParams(gen_length=8, steps=8, stop_at_eos=False)
    prompts = [{"prompt_token_ids": prompt_ids(100, seed=i)} for i in range(8)]
    for i, p in enumerate(prompts):
        eng.add_request(f"q{i}", p, sp)
    saw_queue, finished = False, []
    while eng.has_unfinished_requests():
        finished += [o for o in eng.step() if o.finished]
        saw_queue |= len(eng.scheduler.waiting) > 0 and len(eng.scheduler.running) > 0
        assert eng.block_manager.num_used_pages + eng.block_manager.num_reserved_pages <= eng.block_manager.num_pages
    assert saw_queue and len(finished) == 8
    order = [int(o.request_id[1:]) for o in finished]
    assert order == sorted(order), "FCFS: requests of equal work finish in arrival order"
    for o, p in zip(sorted(finished, key=lambda o: int(o.request_id[1:])), prompts):
        assert o.outputs[0].token_ids == llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids


def test_a_request_that_can_never_fit_is_refused(model_dir):
    eng = LLM(str(model_dir), kv_policy="full", num_pages=10).llm_engine
    with pytest.raises(ValueError, match="needs up to .* KV pages but the pool has only 10"):
        eng.add_request("big", {"prompt_token_ids": prompt_ids(300)}, SamplingParams(gen_length=8))
    assert not eng.has_unfinished_requests() and eng.block_manager.num_free_pages == 10


def test_token_budget_limits_the_batch(model_dir):
    eng = LLM(str(model_dir), kv_policy="full", max_num_batched_tokens=200).llm_engine
    sp = SamplingParams(gen_length=8, steps=8, stop_at_eos=False)
    for i in range(6):
        eng.add_request(f"t{i}", {"prompt_token_ids": prompt_ids(120, seed=i)}, sp)
    seen = []
    original = eng.runner.execute
    eng.runner.execute = lambda scheduled: (seen.append(sum(s.num_tokens for s in scheduled)), original(scheduled))[1]
    eng.run_to_completion()
    assert max(seen) <= 200 and len(seen) > 8


def test_metrics_per_request(model_dir):
    llm = LLM(str(model_dir), kv_policy="maskkv", kv_budget=4)
    out = llm.generate(
        {"prompt_token_ids": prompt_ids(60)},
        SamplingParams(gen_length=16, steps=8, block_length=8, stop_at_eos=False),
        use_tqdm=False,
    )[0]
    m = out.metrics
    assert m.time_in_queue is not None and m.time_in_queue >= 0
    assert m.prefill_time is not None and m.prefill_time > 0
    assert m.num_steps == 8 and m.num_full_passes == 1
    assert m.kv_pages_peak == 3 * 2 * 1 and m.kv_tokens_kept == 3 * 2 * 4
    assert m.num_generated_tokens == 16 and m.tokens_per_second > 0 and m.latency > 0


def test_stream_shows_the_canvas_and_ends_with_the_final_output(llada_dir):
    llm = LLM(str(llada_dir), kv_policy="full")
    sp = SamplingParams(gen_length=8, steps=8, stop_at_eos=False)
    states = list(llm.stream("w1 w2 w3", sp))
    assert states[-1].finished and not any(s.finished for s in states[:-1])
    mask = llm.llm_engine.model_config.mask_token_id
    masks = [s.canvas_token_ids.count(mask) for s in states[:-1]]
    assert masks == sorted(masks, reverse=True) and masks[0] == 7
    assert "[MASK]" in states[0].canvas_text
    final = llm.generate("w1 w2 w3", sp, use_tqdm=False)[0]
    assert states[-1].outputs[0].token_ids == final.outputs[0].token_ids
    # stopping early aborts the request and frees its pages
    it = llm.stream("w1 w2 w3", sp)
    next(it)
    it.close()
    assert llm.llm_engine.block_manager.num_used_pages == 0 and not llm.llm_engine.has_unfinished_requests()


class EngineMachine(RuleBasedStateMachine):
    """Random add / abort / step never leaks pages or crashes, and every non-aborted request finishes."""

    model_dir = None

    @initialize()
    def setup(self):
        self.llm = LLM(str(EngineMachine.model_dir), kv_policy="maskkv", num_pages=60, max_num_seqs=4)
        self.eng = self.llm.llm_engine
        self.live: set[str] = set()
        self.aborted: set[str] = set()
        self.finished: set[str] = set()
        self.n = 0

    @rule(length=st.integers(1, 120), gen=st.sampled_from([4, 8]), budget=st.sampled_from([None, 1, 3, 16]))
    def add(self, length, gen, budget):
        rid = f"h{self.n}"
        self.n += 1
        sp = SamplingParams(gen_length=gen, steps=gen, kv_budget=budget)
        try:
            self.eng.add_request(rid, {"prompt_token_ids": prompt_ids(length, seed=self.n)}, sp)
        except ValueError as e:
            assert "KV pages" in str(e)
            return
        self.live.add(rid)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        assert self.eng.abort_request(rid)
        self.live.discard(rid)
        self.aborted.add(rid)

    @rule()
    def step(self):
        for out in self.eng.step():
            if out.finished:
                self.live.discard(out.request_id)
                self.finished.add(out.request_id)

    @invariant()
    def pages_are_accounted(self):
        if not hasattr(self, "eng"):
            return
        bm = self.eng.block_manager
        bm.check_invariants()
        assert bm.num_used_pages == sum(bm.request_pages(r) for r in bm.live_requests)
        assert set(bm.live_requests) <= self.live

    def teardown(self):
        if not hasattr(self, "eng"):
            return
        for out in self.eng.run_to_completion():
            self.live.discard(out.request_id)
            self.finished.add(out.request_id)
        assert not self.live, f"requests never finished: {self.live}"
        assert not (self.finished & self.aborted)
        assert self.eng.block_manager.num_used_pages == 0 and self.eng.block_manager.num_reserved_pages == 0


def test_random_add_abort_step_streams(model_dir):
    EngineMachine.model_dir = model_dir
    machine = EngineMachine.TestCase
    machine.settings = settings(
        max_examples=25, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine().runTest()


def test_per_request_seed_is_independent_of_arrival_order(model_dir):
    llm = LLM(str(model_dir), kv_policy="maskkv", kv_budget=4)
    sps = [SamplingParams(gen_length=8, steps=8, temperature=1.0, seed=s) for s in (1, 2, 3)]
    prompts = [{"prompt_token_ids": prompt_ids(20 + i, seed=i)} for i in range(3)]
    a = [o.outputs[0].token_ids for o in llm.generate(prompts, sps, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in llm.generate(prompts[::-1], sps[::-1], use_tqdm=False)][::-1]
    assert a == b
    assert torch.tensor([len(x) for x in a]).min() >= 0


def test_long_first_pass_runs_in_layer_chunks_while_others_keep_denoising(model_dir):
    """A prompt over the token budget is prefilled a few layers per step; the running request keeps
    denoising every step, and the long request's tokens and pages equal an unsplit run."""
    sp = SamplingParams(gen_length=8, steps=8, stop_at_eos=False)
    long_prompt = {"prompt_token_ids": prompt_ids(300, seed=9)}
    short_prompt = {"prompt_token_ids": prompt_ids(20, seed=8)}
    whole = LLM(str(model_dir), kv_policy="maskkv", kv_budget=16)
    expected = whole.generate(long_prompt, sp, use_tqdm=False)[0]

    llm = LLM(str(model_dir), kv_policy="maskkv", kv_budget=16, max_num_batched_tokens=150)
    eng = llm.llm_engine
    chunks = []
    run_layers = eng.model.run_layers
    eng.model.run_layers = lambda x, pos, start=0, end=None: (
        chunks.append((start, end)),
        run_layers(x, pos, start, end),
    )[1]
    eng.add_request("short", short_prompt, sp)
    eng.step()  # the short request's first pass
    short_steps = eng.scheduler.requests["short"].metrics.num_steps
    eng.add_request("long", long_prompt, sp)
    done = {}
    while "long" not in done:
        before = eng.scheduler.requests["short"].metrics.num_steps if "short" in eng.scheduler.requests else None
        outs = eng.step()
        done.update({o.request_id: o for o in outs if o.finished})
        if (
            before is not None
            and "short" not in done
            and eng.scheduler.requests.get("long")
            and eng.scheduler.requests["long"].prefill
        ):
            assert eng.scheduler.requests["short"].metrics.num_steps == before + 1, "the short request must not stall"
    layer_chunks = [c for c in chunks if c != (0, None)]
    assert len(layer_chunks) > 1 and layer_chunks[0][0] == 0 and layer_chunks[-1][1] == 3
    assert done["long"].outputs[0].token_ids == expected.outputs[0].token_ids
    assert done["long"].metrics.kv_tokens_kept == expected.metrics.kv_tokens_kept
    assert short_steps == 1
    eng.run_to_completion()
    assert eng.block_manager.num_used_pages == 0


def test_abort_between_layer_chunks_frees_everything(model_dir):
    eng = LLM(str(model_dir), kv_policy="maskkv", kv_budget=16, max_num_batched_tokens=100).llm_engine
    eng.add_request("long", {"prompt_token_ids": prompt_ids(300, seed=2)}, SamplingParams(gen_length=8, steps=8))
    eng.step()
    req = eng.scheduler.requests["long"]
    assert req.prefill is not None and eng.block_manager.num_used_pages > 0
    assert eng.abort_request("long")
    assert eng.block_manager.num_used_pages == 0 and eng.block_manager.num_reserved_pages == 0
    assert eng.block_manager.transient_bytes == 0 and not eng.has_unfinished_requests()
    eng.block_manager.check_invariants()


def test_chunked_prefill_can_be_turned_off(model_dir):
    eng = LLM(
        str(model_dir), kv_policy="maskkv", kv_budget=16, max_num_batched_tokens=100, enable_chunked_prefill=False
    ).llm_engine
    eng.add_request("long", {"prompt_token_ids": prompt_ids(300, seed=2)}, SamplingParams(gen_length=8, steps=8))
    eng.step()
    assert (
        eng.scheduler.requests["long"].kv_ready and eng.scheduler.requests["long"].prefill is None
    )  # ran whole, alone
