"""PNG plots of the speed / memory benchmark (matplotlib, the ``bench`` extra).

Drawn from a run's results, or again from the tables a run wrote into benchmarks/RESULTS.md without
rerunning anything:

    python -m maskkv_engine.benchmarks.plots --replot benchmarks/RESULTS.md --out benchmarks/speed_memory.png
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

SECTION = "## Speed and memory per policy"
# one look per policy, told apart without colour too: series that coincide (full / dllm-cache, maskkv-256 /
# snapkv-256) get a large hollow marker behind a small filled one and different line styles
STYLES = {
    "none": dict(color="black", marker="x", ls=":", ms=7),
    "full": dict(color="C0", marker="s", ls="-", ms=9, mfc="none", mew=1.6),
    "dllm-cache": dict(color="C1", marker="o", ls="--", ms=4),
    "maskkv-64": dict(color="C2", marker="D", ls="-", ms=6),
    "maskkv-256": dict(color="C3", marker="^", ls="-", ms=10, mfc="none", mew=1.6),
    "snapkv-256": dict(color="C4", marker="v", ls="--", ms=5),
}


@dataclass
class SpeedPoint:
    gen: int
    n: int  # prompt tokens
    label: str
    speedup: float  # end to end, none / this
    none_extrapolated: bool  # the speedup's none reference was extrapolated
    kv_mib: float  # peak KV (none: one layer's K/V in flight)
    above_idle_mib: float  # peak process memory above the idle process


def points_from_results(results, cfg=None, elem: int | None = None) -> list[SpeedPoint]:
    """From speed_memory.Result objects; ``cfg`` and ``elem`` (bytes per element) give none's computed KV."""
    from maskkv_engine.benchmarks.speed_report import none_kv_bytes

    done = {(r.gen, r.n, r.spec.label): r for r in results if r.ok}
    points = []
    for (gen, n, label), r in done.items():
        ref = done.get((gen, n, "none"))
        if label == "none":
            kv = none_kv_bytes(cfg, n, gen, elem) if cfg is not None and elem else float("nan")
        else:
            kv = r.run.kv_peak
        above = max(r.run.mem_peak - r.run.mem_idle, 1)
        speed = ref.e2e / r.e2e if ref is not None else float("nan")
        extrap = ref is not None and ref.extrapolated
        points.append(SpeedPoint(gen, n, label, speed, extrap, kv / 2**20, above / 2**20))
    return points


def points_from_markdown(text: str) -> tuple[list[SpeedPoint], str]:
    """The speed tables of RESULTS.md's speed / memory section, and a title from its Machine and Model lines."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    points, gen, starred = [], None, set()
    for line in section.splitlines():
        m = re.match(r"### gen_length (\d+)", line)
        if line.startswith("### "):
            gen = int(m.group(1)) if m else None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if gen is None or len(cells) != 9 or not cells[0].isdigit() or "skipped" in cells[2]:
            continue
        n, label = int(cells[0]), cells[1]
        if label == "none" and cells[4].split()[0].endswith("*"):  # none's end to end was extrapolated
            starred.add((gen, n))
        points.append(SpeedPoint(gen, n, label, _ratio(cells[4]), False, _value(cells[6]), _value(cells[7])))
    for p in points:
        p.none_extrapolated = (p.gen, p.n) in starred
    return points, _title(section)


def _ratio(cell: str) -> float:
    return float(re.search(r"\(([\d.]+)x\)", cell).group(1))


def _value(cell: str) -> float:
    return float(cell.split()[0].rstrip("*"))


def _title(section: str) -> str:
    machine = re.search(r"Machine: ([^,]+), (\d+) cores", section)
    model = re.search(r"Model: `(\w[\w-]*)`: ([^(]+)\(", section)
    where = (
        f"CPU: {machine.group(1).replace('(R)', '').strip()}, {machine.group(2)} cores, 1 thread" if machine else "CPU"
    )
    shape = (
        f"random-weight LLaDA-shaped model `{model.group(1)}` ({model.group(2).strip().rstrip(',')})" if model else ""
    )
    return f"Speed and memory per KV policy, one request at a time\n{shape}, on a {where}"


def plot_speed_memory(results, out: Path, title: str, cfg=None, elem: int | None = None) -> None:
    """Plot a run's results (see plot_points)."""
    plot_points(points_from_results(results, cfg, elem), out, title)


def plot_points(points: list[SpeedPoint], out: Path, title: str) -> None:
    """One row per gen_length: end-to-end speedup over ``none``, peak KV, and peak process memory above the
    idle process, each against prompt length, one line per policy; grey where ``none`` was extrapolated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    gens = sorted({p.gen for p in points})
    labels = list(dict.fromkeys(p.label for p in points))
    tokens = FuncFormatter(lambda x, _: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}")
    plain = FuncFormatter(lambda y, _: f"{y:g}")
    fig, axes = plt.subplots(len(gens), 3, figsize=(15, 4.4 * len(gens) + 1.2), squeeze=False)
    for row, gen in zip(axes, gens):
        mine = [p for p in points if p.gen == gen]
        extrap = sorted({p.n for p in mine if p.none_extrapolated})
        for label in labels:
            series = sorted((p for p in mine if p.label == label), key=lambda p: p.n)
            if not series:
                continue
            style = STYLES.get(label, dict(marker="o", ls="-"))
            xs = [p.n for p in series]
            row[0].plot(xs, [p.speedup for p in series], label=label, lw=1.5, **style)
            row[1].plot(xs, [p.kv_mib for p in series], label=label, lw=1.5, **style)
            row[2].plot(xs, [p.above_idle_mib for p in series], label=label, lw=1.5, **style)
        if extrap:
            for ax in row:
                ax.axvspan(extrap[0] / 1.3, extrap[-1] * 1.3, color="0.9", zorder=0)
        row[0].set_title(f"gen_length {gen}: end-to-end speedup over none", fontsize=11)
        row[1].set_title(f"gen_length {gen}: peak KV (MiB)", fontsize=11)
        row[2].set_title(f"gen_length {gen}: peak memory above idle (MiB)", fontsize=11)
        row[0].set_ylabel("speedup (x, log)", fontsize=10)
        row[1].set_ylabel("MiB (log)", fontsize=10)
        row[2].set_ylabel("MiB (log)", fontsize=10)
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(tokens)
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("prompt tokens", fontsize=10)
            ax.tick_params(labelsize=9)
            ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=10, frameon=False)
    fig.suptitle(
        f"{title}\ngrey band: none's end-to-end time extrapolated from its first passes. full and dllm-cache, "
        "and maskkv-256 and snapkv-256, nearly coincide (large hollow marker behind the small one)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replot", type=Path, required=True, help="a RESULTS.md with a speed / memory section")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    points, title = points_from_markdown(args.replot.read_text())
    if not points:
        raise SystemExit(f"no speed / memory table found in {args.replot}")
    plot_points(points, args.out, title)
    print(f"wrote {args.out} ({len(points)} points)")


if __name__ == "__main__":
    main()
