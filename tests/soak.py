"""A seeded soak: random add / abort / step over engines of every policy, with every refresh strategy and
decoding rule mixed in, checking the block manager's accounting after every operation.

Run as a script for the long version: ``python -m tests.soak --ops 20000 --seed 1``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskkv_engine import SamplingParams
from tests.combinations import MODEL_CASES, POLICIES, assert_pool_empty, build_models, make_llm, random_request_case


@dataclass
class SoakReport:
    ops: int = 0
    adds: int = 0
    rejected: int = 0  # adds refused with a clear error (bad input on purpose)
    aborts: int = 0
    steps: int = 0
    finished: int = 0
    internal_errors: list[str] = field(default_factory=list)  # requests that ended with finish_reason 'error'
    violations: list[str] = field(default_factory=list)  # accounting broken after an operation
    seconds: float = 0.0


def check_accounting(llm) -> str | None:
    """Pages belong only to live, admitted requests; free + owned == all; no transient KV between steps
    unless a layer-split first pass is in flight."""
    engine = llm.llm_engine
    bm = engine.block_manager
    if bm is None:
        return None
    try:
        bm.check_invariants()
    except AssertionError as e:
        return f"invariants: {e}"
    live = set(engine.scheduler.requests)
    running = {r.request_id for r in engine.scheduler.running}
    if not set(bm.live_requests) <= running <= live:
        return f"pages held by {sorted(set(bm.live_requests) - running)}, not running"
    if bm.transient_bytes and not any(r.prefill is not None for r in engine.scheduler.running):
        return f"{bm.transient_bytes} transient bytes with no first pass in flight"
    return None


def _bad_request(rng: torch.Generator, mask_id: int) -> tuple[dict, SamplingParams | None]:
    """An add that must be refused without touching the engine's state."""
    kind = int(torch.randint(4, (1,), generator=rng))
    if kind == 0:
        return {"prompt_token_ids": [5, mask_id, 6]}, SamplingParams(gen_length=4)
    if kind == 1:
        return {"prompt_token_ids": []}, SamplingParams(gen_length=4)
    if kind == 2:
        return {"prompt_token_ids": [5] * 5000}, SamplingParams(gen_length=4)
    return {"prompt_token_ids": [5, 6]}, SamplingParams(gen_length=4, refresh="no_such_strategy")


def run_soak(ops: int, seed: int, root: Path, engines_per_policy: int = 1) -> SoakReport:
    rng = torch.Generator().manual_seed(seed)
    paths = build_models(root)
    engines = []
    for i, policy in enumerate(POLICIES):
        for j in range(engines_per_policy):
            case = MODEL_CASES[(i + j * 3 + seed) % len(MODEL_CASES)]
            engines.append((case, make_llm(paths[case.name], policy, num_pages=64), policy))
    report = SoakReport()
    start = time.perf_counter()
    counter = 0
    for _ in range(ops):
        case, llm, policy = engines[int(torch.randint(len(engines), (1,), generator=rng))]
        engine = llm.llm_engine
        action = float(torch.rand((), generator=rng))
        report.ops += 1
        if action < 0.3:
            counter += 1
            rid = f"soak-{counter}"
            if float(torch.rand((), generator=rng)) < 0.1:
                prompt, params = _bad_request(rng, engine.model_config.mask_token_id)
            else:
                req = random_request_case(rng, case.dream, policy)
                prompt, params = {"prompt_token_ids": list(req.prompt)}, req.params(case.dream)
            try:
                engine.add_request(rid, prompt, params)
                report.adds += 1
            except ValueError:
                report.rejected += 1
        elif action < 0.4 and engine.scheduler.requests:
            live = sorted(engine.scheduler.requests)
            engine.abort_request(live[int(torch.randint(len(live), (1,), generator=rng))])
            report.aborts += 1
        else:
            for out in engine.step():
                report.finished += out.finished
                if out.error is not None:
                    report.internal_errors.append(f"{policy}/{case.name}: {out.error}")
            report.steps += 1
        problem = check_accounting(llm)
        if problem:
            report.violations.append(f"op {report.ops} ({policy}/{case.name}): {problem}")
    for _, llm, _ in engines:  # drain: half the engines finish their work, the other half abort it
        engine = llm.llm_engine
        if float(torch.rand((), generator=rng)) < 0.5:
            for rid in list(engine.scheduler.requests):
                engine.abort_request(rid)
        for out in engine.run_to_completion():
            if out.error is not None:
                report.internal_errors.append(out.error)
        try:
            assert_pool_empty(llm)
        except AssertionError as e:
            report.violations.append(f"at the end: {e}")
    report.seconds = time.perf_counter() - start
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=20000, help="random operations (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    parser.add_argument("--engines-per-policy", type=int, default=2, help="engines per policy (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        report = run_soak(args.ops, args.seed, Path(root), args.engines_per_policy)
    print(
        f"ops {report.ops} (adds {report.adds}, refused {report.rejected}, aborts {report.aborts}, "
        f"steps {report.steps}), finished {report.finished}, violations {len(report.violations)}, "
        f"internal errors {len(report.internal_errors)}, {report.seconds:.0f} s"
    )
    for line in (report.violations + report.internal_errors)[:20]:
        print("  ", line)


if __name__ == "__main__":
    main()
