"""Long-context quality of every KV policy and budget on the embedded default model.

For each task of the synthetic suite (benchmarks/longctx), prompt length and needle depth, the model
answers with each policy (none, full, maskkv, snapkv, pyramidkv, adakv, squeeze) at each budget (KV
pairs kept per head); a sample is correct when its answer, cut at the first EOS, matches exactly.
Retention = accuracy / accuracy at full cache. Every pooled accuracy carries its 95% Wilson interval, and
MaskKV separates from a baseline at a budget when the two intervals are disjoint. Decoding is LLaDA's reference rule, greedy, one token
per step (gen_length = answer length + 3 EOS slots: Sample.gen_length), as the model was trained and evaluated.

    OMP_NUM_THREADS=1 python -m benchmarks.quality                    # the whole grid, ~13 minutes on one CPU thread
    python -m benchmarks.quality --lengths 512 --n 4 --budgets 16      # a quick look
    python -m benchmarks.quality --replot                              # redraw the PNGs from RESULTS.md

Prints a table last, writes the full figures to benchmarks/out/quality.json, the markdown tables into
benchmarks/RESULTS.md (section "Long-context quality"), and PNG plots to benchmarks/plots/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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
    return {k: c / n for k, (c, n) in counts(correct, samples, key).items()}


def counts(correct: list[bool], samples, key) -> dict:
    """{group: (correct, total)}."""
    groups = defaultdict(list)
    for ok, s in zip(correct, samples):
        groups[key(s)].append(ok)
    return {k: (sum(v), len(v)) for k, v in groups.items()}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a binomial proportion k / n: unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0% or 100%."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled(results: dict, name: str, tasks: list[str]) -> tuple[int, int]:
    """(correct, total) of ``name`` over ``tasks``."""
    got = [results[name]["by_task_counts"][t] for t in tasks]
    return sum(k for k, _ in got), sum(n for _, n in got)


def cell(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def separation(results: dict, tasks: list[str], budgets: list[int]) -> str:
    """Per baseline, the budgets where MaskKV's 95% interval lies wholly above / below the baseline's
    (pooled over ``tasks``), the rest being ties within the intervals."""
    parts = []
    for label in list(PRUNING)[1:]:
        above, below = [], []
        for b in budgets:
            m_lo, m_hi = wilson(*pooled(results, f"maskkv@{b}", tasks))
            o_lo, o_hi = wilson(*pooled(results, f"{label}@{b}", tasks))
            if m_lo > o_hi:
                above.append(b)
            elif m_hi < o_lo:
                below.append(b)
        tied = [b for b in budgets if b not in above + below]
        text = f"{label}: above at {_budgets(above)}" if above else f"{label}: never above"
        text += f", below at {_budgets(below)}" if below else ""
        text += f", tied at {_budgets(tied)}" if tied else ""
        parts.append(text)
    return "; ".join(parts)


def _budgets(bs: list[int]) -> str:
    return ", ".join(map(str, bs))


def learned(results: dict, tasks: list[str]) -> list[str]:
    """Tasks the model answers at full cache (>= 50%): retention is only meaningful on those."""
    return [t for t in tasks if results["full"]["by_task"][t] >= 0.5]


def retention(results: dict, name: str, tasks: list[str]) -> float | None:
    """Accuracy of ``name`` over the learned tasks, relative to the full cache's."""
    full = sum(results["full"]["by_task"][t] for t in tasks)
    return sum(results[name]["by_task"][t] for t in tasks) / full if tasks and full else None


def budget_header(budgets: list[int]) -> list[str]:
    """The two header lines of a policy x budget table."""
    return ["| policy | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]


def markdown(results: dict, tasks: list[str], budgets: list[int], at: int) -> list[str]:
    """Accuracy with its 95% interval and retention (policy x budget, pooled over the learned tasks), the
    same per learned task, and accuracy per task at budget ``at``."""
    known = learned(results, tasks)
    k, n = pooled(results, "full", known) if known else (0, 1)
    lines = [
        f"Accuracy on the learned tasks ({', '.join(known) or 'none'}), pooled, with its 95% Wilson interval, and "
        f"its retention vs the full cache ({100 * k / n:.0f}%), per KV pairs per head:",
        "",
        *budget_header(budgets),
    ]
    for label in PRUNING:
        cells = []
        for b in budgets:
            r = retention(results, f"{label}@{b}", known)
            cells.append("-" if r is None else f"{cell(*pooled(results, f'{label}@{b}', known))} ({100 * r:.0f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for task in known if len(known) > 1 else []:
        full = cell(*results["full"]["by_task_counts"][task])
        lines += ["", f"{task} (full cache {full}), per KV pairs per head:", ""]
        lines += budget_header(budgets)
        for label in PRUNING:
            row = [cell(*results[f"{label}@{b}"]["by_task_counts"][task]) for b in budgets]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
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


# one look per policy, told apart without colour too; the SnapKV-scored policies often coincide, so each is
# also nudged sideways a little (the budgets stay readable on the axis)
STYLES = {
    "maskkv": dict(color="C3", marker="o", ls="-", ms=9, lw=2.2),
    "snapkv": dict(color="C0", marker="s", ls="--", ms=11, mfc="none", mew=1.6),
    "snapkv-w8": dict(color="C2", marker="D", ls="-.", ms=7),
    "pyramidkv": dict(color="C1", marker="^", ls=":", ms=9, mfc="none", mew=1.6),
    "adakv": dict(color="C4", marker="v", ls="--", ms=7),
    "squeeze": dict(color="C5", marker="x", ls=":", ms=8, mew=1.6),
}


def plot_budget(series: dict[str, list[float]], budgets: list[int], full: float, title: str, path: Path) -> Path:
    """Accuracy (%) against KV pairs per head, one line per policy, the full cache as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.6))
    for i, (label, values) in enumerate(series.items()):
        nudge = 2 ** (0.05 * (i - (len(series) - 1) / 2))
        ax.plot([b * nudge for b in budgets], values, label=label, **STYLES.get(label, dict(marker="o")))
    ax.axhline(full, color="k", ls="--", lw=1, label=f"full cache ({full:.0f}%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_ylim(-5, 105)
    ax.set_xlabel("KV pairs kept per head (log scale)", fontsize=11)
    ax.set_ylabel("exact-answer accuracy (%)", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=10, loc="center right")
    ax.set_title(title, fontsize=10.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_heatmap(
    grids: dict[str, list[list[float]]], lengths: list[int], depths: list[float], title: str, path: Path
) -> Path:
    """single_needle accuracy per (needle depth, prompt length), one panel per policy, one shared colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 1.2, 3.4 * rows + 1.0), squeeze=False)
    image = None
    for ax, (name, grid) in zip(axes.flat, grids.items()):
        image = ax.imshow([[100 * v for v in r] for r in grid], vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_title(name, fontsize=11)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=9)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=8)
        ax.set_xlabel("prompt tokens", fontsize=9)
        ax.set_ylabel("needle depth (0 = start)", fontsize=9)
    for ax in list(axes.flat)[len(grids) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    bar = fig.colorbar(image, cax=fig.add_axes((0.93, 0.15, 0.015, 0.7)))
    bar.set_label("accuracy (%)", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot(
    results: dict, tasks: list[str], lengths: list[int], budgets: list[int], heat_budget: int, samples, n: int
) -> list[Path]:
    PLOTS.mkdir(parents=True, exist_ok=True)
    known = learned(results, tasks) or ["single_needle"]
    series = {
        p: [100 * sum(results[f"{p}@{b}"]["by_task"][t] for t in known) / len(known) for b in budgets] for p in PRUNING
    }
    full = 100 * sum(results["full"]["by_task"][t] for t in known) / len(known)
    paths = [plot_budget(series, budgets, full, budget_title(known, lengths, n), PLOTS / "quality_vs_budget.png")]
    depths = sorted({s.depth for s in samples if s.task == "single_needle"})
    cols = ["full"] + [f"{p}@{heat_budget}" for p in PRUNING]
    grids = {c: [[results[c]["needle"].get(f"{m}/{d}", float("nan")) for m in lengths] for d in depths] for c in cols}
    paths.append(plot_heatmap(grids, lengths, depths, heatmap_title(heat_budget, n), PLOTS / "needle_heatmap.png"))
    return paths


def budget_title(known: list[str], lengths: list[int], n: int) -> str:
    return (
        f"Accuracy vs KV budget on the tasks the default model learned ({', '.join(known)})\n"
        f"embedded default model (0.5M-parameter LLaDA), greedy, CPU; prompts of {', '.join(map(str, lengths))} "
        f"tokens,\n{n} samples per length; lines nudged sideways where policies share a value"
    )


def heatmap_title(budget: int, n: int) -> str:
    return (
        f"single_needle accuracy by needle depth and prompt length: full cache and each policy at {budget} KV "
        f"pairs per head\nembedded default model (0.5M-parameter LLaDA), one sample per cell ({n} depths per "
        "length), greedy, CPU"
    )


def replot(argv=None) -> None:
    """--replot: the budget plot from RESULTS.md's retention table; the needle heatmap from a rerun of only
    the single_needle samples of that run (full + each policy at the heat budget: seconds, not the grid)."""
    text = RESULTS.read_text()
    section = text[text.index("## Long-context quality") :]
    section = section[: section.find("\n## ", 1)]
    cmd = re.search(r"spaced, seed (\d+)", section)
    seed = int(cmd.group(1))
    n = int(re.search(r"(\d+) samples per \(task, length\)", section).group(1))
    lengths = [int(x) for x in re.search(r"at lengths \[([\d, ]+)\]", section).group(1).split(",")]
    head = re.search(r"Accuracy on the learned tasks \(([^)]*)\).*?\((\d+)%\), per KV pairs per head:", section)
    known, full = head.group(1).split(", "), float(head.group(2))
    table = section[head.end() :].split("\n\n")[1].splitlines()
    budgets = [int(c) for c in table[0].strip("| ").split(" | ")[1:]]
    series = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("| ").split("|")]
        series[cells[0]] = [float(c.split("%")[0]) for c in cells[1:]]
    paths = [plot_budget(series, budgets, full, budget_title(known, lengths, n), PLOTS / "quality_vs_budget.png")]
    at = int(re.search(r"Accuracy per task at (\d+) KV pairs per head", section).group(1))
    per_task = re.search(r"\| single_needle \| ([^\n]*) \|\n", section[section.index("Accuracy per task at") :])
    expected = [float(c.strip().rstrip("%")) for c in per_task.group(1).split("|")][1:]  # drop none: full, ...@at
    model = default_model_path()
    samples = generate_suite(["single_needle"], lengths, n, seed, load_tokenizer(model))
    depths = sorted({s.depth for s in samples})
    grids = {}
    for (name, policy, budget, config), want in zip(
        [("full", "full", None, {})] + [(f"{p}@{at}", pol, at, cfg) for p, (pol, cfg) in PRUNING.items()], expected
    ):
        correct = run_policy(model, policy, budget, samples, config)
        cell = accuracy(correct, samples, lambda s: (s.length, s.depth))
        grids[name] = [[cell.get((m, d), float("nan")) for m in lengths] for d in depths]
        got = 100 * sum(correct) / len(correct)
        print(f"{name:>14}: {got:5.1f}% (RESULTS.md: {want:.0f}%)", flush=True)
        if round(got) != round(want):
            print(f"  warning: {name} does not reproduce RESULTS.md's single_needle accuracy", flush=True)
    paths.append(plot_heatmap(grids, lengths, depths, heatmap_title(at, n), PLOTS / "needle_heatmap.png"))
    print("wrote " + ", ".join(str(p) for p in paths))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--budgets", default="8,16,32,64,128,256")
    p.add_argument("--n", type=int, default=20, help="samples per (task, length), depths evenly spaced")
    p.add_argument(
        "--heat-budget", type=int, default=32, help="budget of the per-task table and needle heatmap (one of --budgets)"
    )
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md or the plots")
    p.add_argument(
        "--replot", action="store_true", help="redraw the plots from RESULTS.md (the heatmap reruns only its cells)"
    )
    args = p.parse_args(argv)
    if args.replot:
        return replot()
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
            "by_task_counts": counts(correct, samples, lambda s: s.task),
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
        plot(results, tasks, lengths, budgets, heat, samples, args.n)
        if "single_needle" in tasks and not args.no_write
        else []
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
        summary += (
            "\n\nWhere MaskKV and each baseline separate (learned tasks pooled; 'above' = MaskKV's 95% interval "
            f"wholly above the baseline's): {separation(results, known, budgets)}."
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
