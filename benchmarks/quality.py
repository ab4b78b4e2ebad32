"""Long-context quality of every KV policy and budget on the embedded default model.

For each task of the synthetic suite (benchmarks/longctx), prompt length and needle depth, the model
answers with each policy (none, full, maskkv, snapkv, pyramidkv, adakv, squeeze) at each budget (KV
pairs kept per head); a sample is correct when its answer, cut at the first EOS, matches exactly.
Retention = accuracy / accuracy at full cache. Decoding is LLaDA's reference rule, greedy, one token
per step (gen_length = answer length + 3 EOS slots: Sample.gen_length), as the model was trained and evaluated.

    OMP_NUM_THREADS=1 python -m benchmarks.quality                    # the whole grid, a few minutes
    python -m benchmarks.quality --lengths 512 --n 4 --budgets 16      # a quick look

Prints a table last, writes the full figures to benchmarks/out/quality.json, the markdown tables into
benchmarks/RESULTS.md (section "Long-context quality"), and PNG plots to benchmarks/plots/.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.longctx import TASKS, generate_suite, load_tokenizer
from maskkv_engine import LLM, SamplingParams
from maskkv_engine.benchmarks.common import command_line, machine, write_results
from maskkv_engine.llm import default_model_path

# label -> (kv_policy, kv_policy_config). SnapKV and the policies built on it keep their 32-token
# observation window first, so at budgets <= 32 they keep only the prompt's end: snapkv-w8 shows SnapKV's
# scoring with a window that leaves room for it.
PRUNING = {
    "maskkv": ("maskkv", {}),
    "snapkv": ("snapkv", {}),
    "snapkv-w8": ("snapkv", {"window_size": 8}),
    "pyramidkv": ("pyramidkv", {}),
    "adakv": ("adakv", {}),
    "squeeze": ("squeeze", {}),
}
OUT = Path(__file__).parent / "out"
PLOTS = Path(__file__).parent / "plots"
RESULTS = Path(__file__).parent / "RESULTS.md"


def run_policy(model: str, policy: str, budget: int | None, samples, config: dict | None = None) -> list[bool]:
    """Whether each sample is answered exactly; all samples in one batched generate call."""
    llm = LLM(model, kv_policy=policy, kv_budget=budget, kv_policy_config=config)
    params = [
        SamplingParams(gen_length=s.gen_length, steps=s.gen_length, block_length=s.gen_length, stop_at_eos=False)
        for s in samples
    ]
    outs = llm.generate([{"prompt_token_ids": s.prompt_token_ids} for s in samples], params, use_tqdm=False)
    stop = llm.llm_engine.stop_token_ids
    return [s.is_answered_by(o.outputs[0].token_ids, stop) for o, s in zip(outs, samples)]


def accuracy(correct: list[bool], samples, key) -> dict:
    groups = defaultdict(list)
    for ok, s in zip(correct, samples):
        groups[key(s)].append(ok)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def learned(results: dict, tasks: list[str]) -> list[str]:
    """Tasks the model answers at full cache (>= 50%): retention is only meaningful on those."""
    return [t for t in tasks if results["full"]["by_task"][t] >= 0.5]


def retention(results: dict, name: str, tasks: list[str]) -> float | None:
    """Accuracy of ``name`` over the learned tasks, relative to the full cache's."""
    full = sum(results["full"]["by_task"][t] for t in tasks)
    return sum(results[name]["by_task"][t] for t in tasks) / full if tasks and full else None


def markdown(results: dict, tasks: list[str], budgets: list[int], at: int) -> list[str]:
    """Retention table (policy x budget, learned tasks) and accuracy per task at budget ``at``."""
    known = learned(results, tasks)
    full = sum(results["full"]["by_task"][t] for t in known) / max(1, len(known))
    lines = [
        f"Accuracy on the learned tasks ({', '.join(known) or 'none'}) and its retention vs the full cache "
        f"({100 * full:.0f}%), per KV pairs per head:",
        "",
        "| policy | " + " | ".join(str(b) for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for label in PRUNING:
        cells = []
        for b in budgets:
            r = retention(results, f"{label}@{b}", known)
            acc = sum(results[f"{label}@{b}"]["by_task"][t] for t in known) / max(1, len(known))
            cells.append("-" if r is None else f"{100 * acc:.0f}% ({100 * r:.0f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cols = ["none", "full"] + [f"{label}@{at}" for label in PRUNING]
    lines += [
        "",
        f"Accuracy per task at {at} KV pairs per head (`none` and `full` keep everything):",
        "",
        "| task | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(f"{100 * results[c]['by_task'][task]:.0f}%" for c in cols) + " |")
    return lines


def plot(
    results: dict, tasks: list[str], lengths: list[int], budgets: list[int], heat_budget: int, samples
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for p in PRUNING:
            ax.plot(budgets, [100 * results[f"{p}@{b}"]["by_task"][task] for b in budgets], marker="o", label=p)
        ax.axhline(100 * results["full"]["by_task"][task], color="k", ls="--", lw=1, label="full")
        ax.set_xscale("log", base=2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("KV pairs per head")
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = PLOTS / "quality_vs_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    depths = sorted({s.depth for s in samples if s.task == "single_needle"})
    cols = ["full"] + [f"{p}@{heat_budget}" for p in PRUNING]
    fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols), 2.8), squeeze=False)
    for ax, c in zip(axes[0], cols):
        grid = [[results[c]["needle"].get(f"{n}/{d}", float("nan")) for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(c, fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_xlabel("prompt tokens", fontsize=8)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    fig.tight_layout()
    path = PLOTS / "needle_heatmap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--budgets", default="8,16,32,64,128")
    p.add_argument("--n", type=int, default=12, help="samples per (task, length), depths evenly spaced")
    p.add_argument(
        "--heat-budget", type=int, default=32, help="budget of the per-task table and needle heatmap (one of --budgets)"
    )
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md or the plots")
    args = p.parse_args(argv)
    model = args.model or default_model_path()
    tasks = args.tasks.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    tokenizer = load_tokenizer(model)
    samples = generate_suite(tasks, lengths, args.n, args.seed, tokenizer)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    configs = [("none", "none", None, {}), ("full", "full", None, {})] + [
        (f"{label}@{b}", policy, b, config) for label, (policy, config) in PRUNING.items() for b in budgets
    ]
    results = {}
    for name, policy, budget, config in configs:
        t = time.perf_counter()
        correct = run_policy(model, policy, budget, samples, config)
        results[name] = {
            "overall": sum(correct) / len(correct),
            "by_task": accuracy(correct, samples, lambda s: s.task),
            "by_task_length": {f"{k[0]}/{k[1]}": v for k, v in accuracy(correct, samples, lambda s: (s.task, s.length)).items()},
            "needle": {f"{k[0]}/{k[1]}": v for k, v in accuracy(
                [c for c, s in zip(correct, samples) if s.task == "single_needle"],
                [s for s in samples if s.task == "single_needle"], lambda s: (s.length, s.depth)).items()},
            "seconds": round(time.perf_counter() - t, 1),
        }  # fmt: skip
        print(f"{name:>14}: {100 * results[name]['overall']:5.1f}%  ({results[name]['seconds']}s)", flush=True)
    elapsed = time.perf_counter() - t0
    OUT.mkdir(exist_ok=True)
    (OUT / "quality.json").write_text(json.dumps(results, indent=1))
    heat = args.heat_budget if args.heat_budget in budgets else budgets[len(budgets) // 2]
    table = "\n".join(markdown(results, tasks, budgets, heat))
    paths = (
        plot(results, tasks, lengths, budgets, heat, samples) if "single_needle" in tasks and not args.no_write else []
    )
    per_length = ["| task | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for task in tasks:
        per_length.append(
            f"| {task} | "
            + " | ".join(f"{100 * results['full']['by_task_length'].get(f'{task}/{n}', 0):.0f}%" for n in lengths)
            + " |"
        )
    shares = {b: 100.0 * b / (sum(lengths) / len(lengths)) for b in budgets}
    known = learned(results, tasks)
    small = [b for b in budgets if b <= 0.05 * min(lengths)]
    summary = ""
    if small and known:
        b = max(small)
        others = ", ".join(f"{p} {100 * retention(results, f'{p}@{b}', known):.0f}%" for p in list(PRUNING)[1:])
        summary = (
            f"At <= 5% of the prompt (budget {b} per head, prompts of {min(lengths)}+ tokens) MaskKV keeps "
            f"{100 * retention(results, f'maskkv@{b}', known):.0f}% of full-cache accuracy on the tasks the model "
            f"has learned ({', '.join(known)}); {others}. The paper reports 94% of LongBench quality "
            f"at 256 KV pairs per head for LLaDA-8B. Tasks the model does not answer at full cache "
            f"({', '.join(t for t in tasks if t not in known) or 'none'}) are at chance under every policy (differences there are noise)."
        )
    cmd = command_line("python -m benchmarks.quality", argv)
    shown = "the embedded default model" if args.model is None else model
    body = [
        f"Command: `{cmd}` — {machine(torch.device('cpu'))}, "
        f"{elapsed / 60:.1f} min, load average {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}.",
        f"Model: {shown}; {args.n} samples per (task, length) at lengths {lengths}, needle depths evenly "
        f"spaced, seed {args.seed}; greedy, one token per step. Budgets are KV pairs per head "
        f"({', '.join(f'{b} = {shares[b]:.1f}%' for b in budgets)} of the mean prompt).",
        "",
        "Full-cache accuracy per task and prompt length:",
        "",
        *per_length,
        "",
        table,
        "",
        "SnapKV, PyramidKV, AdaKV and SqueezeAttention keep SnapKV's 32-token observation window first, as "
        "their official code does: at budgets <= 32 they keep only the end of the prompt. `snapkv-w8` is "
        "SnapKV with an 8-token window, which leaves room for its attention scores at small budgets.",
        "",
        summary,
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in paths],
    ]
    if not args.no_write:
        write_results(RESULTS, "Long-context quality", body)
    print()
    print(table)
    if summary:
        print(summary)


if __name__ == "__main__":
    main()
