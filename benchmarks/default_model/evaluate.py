"""Exact-match accuracy of a model on the long-context suite with the reference decoder."""

from __future__ import annotations

from collections import defaultdict

import torch

from benchmarks.default_model.decode import generate
from benchmarks.longctx import TASKS, Sample, generate_suite

SUMMARY_SEED = 12345  # the suite seed of every train_summary.json accuracy table


def evaluate(model, samples: list[Sample], mask_id: int, eos_id: int, batch_tokens: int = 16384) -> dict:
    """{(task, length): accuracy}; samples of one (task, length) are decoded together in batches.

    A sample is correct when its generation, cut at the first EOS, equals the answer exactly.
    gen_length = Sample.gen_length (answer + 3 EOS slots), steps = block_length = gen_length (one token per step).
    """
    groups: dict[tuple, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[(s.task, s.length, len(s.answer_token_ids))].append(s)
    correct: dict[tuple, list[bool]] = defaultdict(list)
    model.eval()
    device = next(model.parameters()).device
    for (task, length, _), group in groups.items():
        gen_length = group[0].gen_length
        per_batch = max(1, batch_tokens // (length + gen_length))
        for i in range(0, len(group), per_batch):
            chunk = group[i : i + per_batch]
            prompt = torch.tensor([s.prompt_token_ids for s in chunk], device=device)
            out = generate(model, prompt, mask_id, gen_length)
            for s, row in zip(chunk, out.tolist()):
                correct[(task, length)].append(s.is_answered_by(row, (eos_id,)))
    return {k: sum(v) / len(v) for k, v in sorted(correct.items())}


def summary_accuracy(model, tokenizer, n: int, lengths: list[int]) -> dict:
    """train_summary.json's evaluation: {(task, length): accuracy} of every task at `lengths`, `n`
    samples each, full cache, the summary seed."""
    suite = generate_suite(list(TASKS), lengths, n, seed=SUMMARY_SEED, tokenizer=tokenizer)
    return evaluate(model, suite, tokenizer.mask_token_id, tokenizer.eos_token_id)


def evaluate_engine(llm, samples: list[Sample], batch: int = 64) -> dict:
    """{(task, length): accuracy} through maskkv_engine's LLM (whatever kv_policy it was built with),
    with the same decoding: greedy low-confidence, gen_length = steps = block_length."""
    from maskkv_engine import SamplingParams

    correct: dict[tuple, list[bool]] = defaultdict(list)
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        params = [SamplingParams(gen_length=s.gen_length) for s in chunk]
        outs = llm.generate([{"prompt_token_ids": s.prompt_token_ids} for s in chunk], params, use_tqdm=False)
        for s, out in zip(chunk, outs):
            correct[(s.task, s.length)].append(list(out.outputs[0].token_ids) == s.answer_token_ids)
    return {k: sum(v) / len(v) for k, v in sorted(correct.items())}


def format_table(acc: dict, lengths: list[int]) -> str:
    """A markdown table: one row per task, one column per prompt length."""
    tasks = sorted({t for t, _ in acc}, key=lambda t: list(dict.fromkeys(t for t, _ in acc)).index(t))
    head = "| task | " + " | ".join(f"{n}" for n in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    rows = [
        f"| {t} | " + " | ".join(f"{100 * acc[(t, n)]:.0f}%" if (t, n) in acc else "-" for n in lengths) + " |"
        for t in tasks
    ]
    return "\n".join([head, rule, *rows])


def main(argv=None) -> None:
    """Re-evaluate a saved checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    import argparse

    from benchmarks.default_model.model import load_checkpoint
    from benchmarks.longctx import load_tokenizer

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default="maskkv_engine/assets/default_model")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--n", type=int, default=50, help="samples per (task, length)")
    p.add_argument("--seed", type=int, default=SUMMARY_SEED)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--kv-policy",
        default=None,
        help="run through maskkv_engine.LLM with this kv_policy (e.g. full); default: this module's decoder",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    lengths = [int(n) for n in args.lengths.split(",")]
    suite = generate_suite(args.tasks.split(","), lengths, args.n, args.seed, tokenizer)
    if args.kv_policy:
        from maskkv_engine import LLM

        acc = evaluate_engine(LLM(model=args.model, kv_policy=args.kv_policy), suite)
    else:
        acc = evaluate(load_checkpoint(args.model), suite, tokenizer.mask_token_id, tokenizer.eos_token_id)
    print(format_table(acc, lengths))


if __name__ == "__main__":
    main()
